"""Small tensor helpers shared across canonwrap (point-cloud reductions, checks)."""

from __future__ import annotations

import torch
from torch import Tensor


def num_graphs_of(batch: Tensor) -> int:
    """Number of graphs in a batch vector ``batch [N]`` (``max + 1``, 0 when empty)."""
    return int(batch.max().item()) + 1 if batch.numel() > 0 else 0


def segment_sum(values: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """Sum ``values [N, ...]`` per graph: returns ``[num_graphs, ...]``."""
    out = values.new_zeros((num_graphs,) + tuple(values.shape[1:]))
    return out.index_add_(0, batch, values)


def segment_mean(values: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """Mean of ``values [N, ...]`` per graph: returns ``[num_graphs, ...]``."""
    total = segment_sum(values, batch, num_graphs)
    counts = torch.bincount(batch, minlength=num_graphs).clamp_min(1).to(values.dtype)
    return total / counts.view((-1,) + (1,) * (values.dim() - 1))


def remove_mean(pos: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """Project node positions ``pos [N, 3]`` to the zero centre-of-mass subspace per graph."""
    return pos - segment_mean(pos, batch, num_graphs)[batch]


def check_finite(name: str, value: Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` if ``value`` has NaN or Inf entries."""
    if not torch.is_floating_point(value):
        return
    if not torch.isfinite(value).all():
        n_bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name} contains {n_bad} non-finite (NaN/Inf) value(s)")
