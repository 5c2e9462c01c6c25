"""Rotation groups of 3D space: SO(3) and O(3), acting on 3D point clouds."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from canonwrap.groups.base import Group
from canonwrap.pointclouds import graph_index, is_point_cloud, replace


def quaternion_to_matrix(q: Tensor) -> Tensor:
    """Rotation matrices ``[B, 3, 3]`` from (not necessarily unit) quaternions ``q [B, 4]``."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(q.shape[:-1] + (3, 3))


def rotate_points(matrices: Tensor, data: Any) -> Any:
    """Apply one 3x3 matrix per sample to 3D data.

    ``data`` is a point cloud (``Data``/``Batch`` with ``pos [N, 3]``; node ``i`` is moved by
    ``matrices[batch[i]]``) or a tensor ``[B, ..., 3]``.
    """
    if is_point_cloud(data):
        mats = matrices[graph_index(data)]  # [N, 3, 3]
        pos = torch.einsum("nij,nj->ni", mats.to(data.pos.dtype), data.pos)
        return replace(data, pos=pos)
    if not isinstance(data, Tensor) or data.shape[-1] != 3:
        raise ValueError(
            "rotations act on point clouds with `pos` or tensors [B, ..., 3]; got "
            f"{type(data).__name__} {tuple(getattr(data, 'shape', ()))}"
        )
    flat = data.reshape(data.shape[0], -1, 3)
    out = torch.einsum("bij,bnj->bni", matrices.to(data.dtype), flat)
    return out.reshape(data.shape)


class SO3(Group):
    """Proper rotations of 3D space; elements are rotation matrices ``[B, 3, 3]``."""

    name = "SO(3)"

    def identity(self, batch_size, *, dtype=torch.float32, device=None):
        return torch.eye(3, dtype=dtype, device=device).expand(batch_size, 3, 3).clone()

    def random(self, batch_size, *, generator=None, dtype=torch.float32, device=None):
        # A standard normal 4-vector, normalized, is uniform on S^3; unit quaternions
        # double-cover SO(3), so the image is Haar-distributed.
        q = torch.randn(batch_size, 4, generator=generator, dtype=torch.float64)
        return quaternion_to_matrix(q).to(dtype=dtype, device=device)

    def compose(self, a, b):
        return a @ b

    def inverse(self, g):
        return g.transpose(-1, -2)

    def act(self, g, data):
        return rotate_points(g, data)

    def distance(self, a, b):
        return (a - b).flatten(1).norm(dim=-1)


class O3(SO3):
    """Rotations and reflections of 3D space; elements are orthogonal matrices ``[B, 3, 3]``."""

    name = "O(3)"

    def random(self, batch_size, *, generator=None, dtype=torch.float32, device=None):
        rot = super().random(batch_size, generator=generator, dtype=torch.float64)
        flip = torch.randint(0, 2, (batch_size,), generator=generator).to(torch.float64)
        sign = 1.0 - 2.0 * flip  # +1 or -1 with probability 1/2: Haar on O(3) = SO(3) x {+-1}
        return (rot * sign.view(-1, 1, 1)).to(dtype=dtype, device=device)
