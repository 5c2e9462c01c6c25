"""canonwrap.evaluation.heldout_nll: the mean bound and its standard error."""

from __future__ import annotations

import math

import torch
from torch_geometric.loader import DataLoader

from canonwrap import CanonicalizedDiffusion, CenterOfMass, PolynomialSchedule
from canonwrap.data.toy import rotated_shapes
from canonwrap.evaluation import heldout_nll
from canonwrap.nn import GNNDenoiser


def _model_and_loader():
    torch.manual_seed(0)
    model = CanonicalizedDiffusion(
        GNNDenoiser(num_features=2, hidden=16, layers=2), CenterOfMass(), PolynomialSchedule(50)
    ).eval()
    data = rotated_shapes(24, generator=torch.Generator().manual_seed(1), num_features=2)
    return model, DataLoader(data.to_data_list(), batch_size=5)


def test_heldout_nll_mean_and_standard_error_match_the_per_sample_values():
    model, loader = _model_and_loader()
    with torch.no_grad():
        res = heldout_nll(model, loader, seed=3)
        gen = torch.Generator().manual_seed(3)  # the same draws, one batch after another
        per = torch.cat([model.nll(b, generator=gen).nll for b in loader]).double()
    assert per.numel() == 24
    assert math.isclose(res["nll"], per.mean().item(), rel_tol=1e-6)  # float32 sums
    assert math.isclose(res["nll_se"], (per.std() / 24**0.5).item(), rel_tol=1e-9)
    # negative control: the standard error is not the standard deviation itself
    assert res["nll_se"] < per.std().item() / 2
    terms = res["kl_prior"] + res["diffusion"] + res["reconstruction"] + res["size"]
    assert math.isclose(res["nll"], terms, rel_tol=1e-5, abs_tol=1e-4)


def test_heldout_nll_of_one_sample_has_no_standard_error():
    model, loader = _model_and_loader()
    one = DataLoader([loader.dataset[0]], batch_size=1)
    with torch.no_grad():
        res = heldout_nll(model, one)
    assert math.isnan(res["nll_se"]) and math.isfinite(res["nll"])
