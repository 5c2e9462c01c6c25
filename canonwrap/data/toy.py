"""Small synthetic data sets with a known symmetric density, for tests and examples."""

from __future__ import annotations

import torch
from torch import Tensor

from canonwrap.groups.rotations import SO3

__all__ = ["TETRA_SHAPE", "rotated_shapes", "pairwise_distances"]

TETRA_SHAPE = torch.tensor(
    [[0.0, 0.0, 0.0], [1.6, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.6], [0.9, 0.7, 0.3]],
    dtype=torch.float64,
)
"""A 5-point shape with distinct principal moments and non-zero third moments, so its
principal-axes frame is unique (no symmetry); coordinates in arbitrary units."""


def rotated_shapes(
    num_samples: int,
    shape: Tensor = TETRA_SHAPE,
    noise: float = 0.05,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    num_features: int = 0,
):
    """A batch of copies of ``shape [n, 3]``, jittered and rotated by Haar-random rotations.

    The density is invariant under SO(3) (and translations: every copy is centred).

    Returns
    -------
    Batch
        A ``torch_geometric`` ``Batch`` with ``pos [num_samples * n, 3]`` and, when
        ``num_features > 0``, constant features ``x`` (one-hot of the node index, scaled by
        1/4, truncated to ``num_features`` columns).
    """
    from torch_geometric.data import Batch, Data

    if num_samples < 1:
        raise ValueError("num_samples must be >= 1")
    n = shape.shape[0]
    base = shape.double() - shape.double().mean(0)
    jitter = noise * torch.randn(num_samples, n, 3, generator=generator, dtype=torch.float64)
    pts = base + jitter
    pts = pts - pts.mean(1, keepdim=True)
    rot = SO3().random(num_samples, generator=generator, dtype=torch.float64)
    pts = torch.einsum("bij,bnj->bni", rot, pts).to(dtype)
    feats = None
    if num_features > 0:
        eye = torch.eye(max(n, num_features), dtype=dtype)[:n, :num_features] / 4
        feats = eye
    data = [Data(pos=p, x=feats.clone() if feats is not None else None) for p in pts]
    return Batch.from_data_list(data)


def pairwise_distances(pos: Tensor, batch: Tensor, n: int) -> Tensor:
    """Sorted pairwise distances of equally sized point clouds: ``[B, n (n - 1) / 2]``."""
    pts = pos.reshape(-1, n, 3)
    d = torch.cdist(pts.double(), pts.double())
    iu = torch.triu_indices(n, n, 1)
    return d[:, iu[0], iu[1]].sort(-1).values
