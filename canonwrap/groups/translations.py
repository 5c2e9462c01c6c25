"""Translations of 3D space acting on point clouds (the centre-of-mass symmetry)."""

from __future__ import annotations

import torch

from canonwrap.groups.base import Group
from canonwrap.pointclouds import graph_index, is_point_cloud, replace


class Translations(Group):
    """Translations of R^3; elements are vectors ``[B, 3]``.

    The group is not compact, so it has no Haar probability measure:
    [`random`][canonwrap.groups.Translations.random] draws from a wide Gaussian (``scale``), which
    is what invariance tests need.
    """

    name = "T(3)"
    is_compact = False

    def __init__(self, scale: float = 3.0) -> None:
        self.scale = float(scale)

    def identity(self, batch_size, *, dtype=torch.float32, device=None):
        return torch.zeros(batch_size, 3, dtype=dtype, device=device)

    def random(self, batch_size, *, generator=None, dtype=torch.float32, device=None):
        v = torch.randn(batch_size, 3, generator=generator, dtype=torch.float64) * self.scale
        return v.to(dtype=dtype, device=device)

    def compose(self, a, b):
        return a + b

    def inverse(self, g):
        return -g

    def act(self, g, data):
        if is_point_cloud(data):
            return replace(data, pos=data.pos + g.to(data.pos.dtype)[graph_index(data)])
        if data.shape[-1] != 3:
            raise ValueError(f"translations act on [..., 3] tensors; got {tuple(data.shape)}")
        shape = (data.shape[0],) + (1,) * (data.dim() - 2) + (3,)
        return data + g.to(data.dtype).view(shape)

    def distance(self, a, b):
        return (a - b).norm(dim=-1)

    def __repr__(self) -> str:
        return f"Translations(scale={self.scale})"
