"""Shared test fixtures that are not canonicalizer-specific."""

import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path: str):
    """Import a repository script (``examples/x.py``, ``benchmarks/y.py``) as a module."""
    path = ROOT / relative_path
    name = "canonwrap_script_" + relative_path.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module

#: per-dimension variances of the Gaussian test data x ~ N(0, diag(VAR))
VAR = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64)


class OptimalGaussianDenoiser(nn.Module):
    """Exact E[eps | z_t] for data x ~ N(0, diag(VAR)): sigma_t (alpha_t^2 S + sigma_t^2)^-1 z."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def forward(self, z, t):
        g = self.schedule.gamma(t)
        a2, s2 = torch.sigmoid(-g)[:, None], torch.sigmoid(g)[:, None]
        return s2.sqrt() * z / (a2 * VAR + s2)
