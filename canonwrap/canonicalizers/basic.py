"""Canonicalizers with no parameters: identity, centre of mass, principal axes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from canonwrap.canonicalizers.base import Canonicalizer, CanonOutput
from canonwrap.groups.base import Group, Trivial
from canonwrap.groups.rotations import SO3
from canonwrap.groups.translations import Translations
from canonwrap.pointclouds import (
    centre,
    check_point_cloud,
    graph_index,
    is_point_cloud,
    nodes_per_graph,
    num_samples,
    remove_mean,
    segment_mean,
    segment_sum,
)

__all__ = ["Identity", "CenterOfMass", "PCACanonicalizer", "centre"]


class Identity(Canonicalizer):
    """No canonicalization: returns the data unchanged and identity elements.

    ``group`` defaults to the trivial group; pass another group to obtain identity
    elements of that group (useful for baselines that share code with a real canonicalizer).
    """

    def __init__(self, group: Group | None = None) -> None:
        super().__init__()
        self.group = group if group is not None else Trivial()

    def forward(self, data: Any) -> CanonOutput:
        ref = data.pos if is_point_cloud(data) else data
        element = self.group.identity(num_samples(data), dtype=ref.dtype, device=ref.device)
        return CanonOutput(canonical=data, element=element)


class CenterOfMass(Canonicalizer):
    """Translations only: the element is each graph's centre of mass, canonical data is centred.

    The centre is the unweighted mean of node positions (what EDM calls the centre of mass).
    """

    def __init__(self) -> None:
        super().__init__()
        self.group = Translations()

    def forward(self, data: Any) -> CanonOutput:
        check_point_cloud(data, "CenterOfMass", finite=False)
        com = segment_mean(data.pos, graph_index(data), num_samples(data))
        return CanonOutput(canonical=self.apply_inverse(data, com), element=com)


class PCACanonicalizer(Canonicalizer):
    """Principal-axes frame in SO(3) (a fixed, parameter-free canonicalizer).

    For each centred point cloud, the second-moment matrix ``C = sum_i x_i x_i^T`` is
    diagonalised; its eigenvectors sorted by decreasing eigenvalue form the frame
    ``R = [e1, e2, e3]`` and the canonical pose is ``R^T x``. Sign rule: ``e1`` and ``e2``
    point to the side of positive third moment ``sum_i (x_i . e_k)^3``; ``e3 = e1 x e2`` so
    that ``det R = +1``. Everything is computed in float64 without gradients (the frame is
    fixed; gradients still flow to the data through ``R^T x``).

    Degenerate cases (documented, never NaN): when two eigenvalues coincide (symmetric
    tops such as methane, linear or single-atom molecules) the frame inside the
    degenerate eigenspace is whatever the eigensolver returns, and when a third moment
    vanishes (clouds symmetric under reflection across a principal plane) the sign falls
    back to the node of largest ``|x . e_k|`` (first such node on ties). In those cases the
    output is a valid rotation but equivariance holds only up to the symmetry of the cloud.
    One-atom clouds get the identity frame.
    """

    def __init__(self, rel_tol: float = 1e-6) -> None:
        super().__init__()
        self.group = SO3()
        self.rel_tol = float(rel_tol)

    def normalize(self, data: Any) -> Any:
        return centre(data)

    @torch.no_grad()
    def frame(self, data: Any) -> Tensor:
        """The principal-axes rotation ``R [B, 3, 3]`` (columns ``e1, e2, e3``)."""
        batch = graph_index(data)
        b = num_samples(data)
        pos = remove_mean(data.pos.detach().double(), batch, b)
        cov = segment_sum(pos[:, :, None] * pos[:, None, :], batch, b)  # [B, 3, 3]
        scale = cov.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300)  # trace
        if not bool(torch.isfinite(scale).all()):  # [B] values; eigh would fail obscurely
            raise ValueError("PCACanonicalizer: pos contains non-finite (NaN/Inf) value(s)")
        evals, evecs = torch.linalg.eigh(cov / scale[:, None, None])
        axes = evecs.flip(-1)  # decreasing eigenvalue
        proj = torch.einsum("nj,njk->nk", pos, axes[batch])  # [N, 3] coordinates in frame
        third = segment_sum(proj**3, batch, b)  # [B, 3]
        size = segment_sum(pos.pow(2).sum(-1), batch, b).sqrt()  # [B]
        small = third.abs() <= self.rel_tol * size[:, None].pow(3).clamp_min(1e-300)
        # fallback sign: the coordinate of largest magnitude (first on ties), per axis
        fallback = torch.ones_like(third)
        order = torch.arange(pos.shape[0], device=pos.device)
        for k in range(2):
            mag = proj[:, k].abs()
            best = torch.full((b,), -1.0, dtype=mag.dtype, device=mag.device)
            best = best.scatter_reduce(0, batch, mag, reduce="amax")
            is_best = mag >= best[batch] * (1 - 1e-9)
            idx = torch.full((b,), pos.shape[0], dtype=torch.long, device=pos.device)
            idx = idx.scatter_reduce(0, batch, torch.where(is_best, order, idx[batch]), "amin")
            fallback[:, k] = torch.sign(proj[idx.clamp_max(pos.shape[0] - 1), k])
        sign = torch.where(small, fallback, torch.sign(third))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        e1 = axes[:, :, 0] * sign[:, 0:1]
        e2 = axes[:, :, 1] * sign[:, 1:2]
        e3 = torch.linalg.cross(e1, e2)
        rot = torch.stack([e1, e2, e3], dim=-1)
        one_atom = nodes_per_graph(data) <= 1
        rot[one_atom] = torch.eye(3, dtype=rot.dtype, device=rot.device)
        return rot.to(data.pos.dtype)

    def forward(self, data: Any) -> CanonOutput:
        check_point_cloud(data, "PCACanonicalizer", finite=False)
        rot = self.frame(data)
        return CanonOutput(canonical=self.apply_inverse(data, rot), element=rot)
