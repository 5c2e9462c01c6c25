"""Canonicalizers with no parameters: identity, centre of mass, principal axes."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from canonwrap.canonicalizers._frames import (
    atom_weights,
    axis_candidates,
    free_candidates,
    resolve_frames,
)
from canonwrap.canonicalizers.base import Canonicalizer, CanonOutput
from canonwrap.groups.base import Group, Trivial
from canonwrap.groups.rotations import SO3
from canonwrap.groups.translations import Translations
from canonwrap.pointclouds import (
    centre,
    check_point_cloud,
    graph_index,
    is_point_cloud,
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


def _type_features(data: Any) -> Tensor | None:
    """What tells atoms apart for tie-breaking: ``x`` (``[N, F]``) if present, else ``z``."""
    n = data.pos.shape[0]
    for name in ("x", "z"):
        value = getattr(data, name, None)
        if isinstance(value, Tensor) and value.dim() in (1, 2) and value.shape[0] == n:
            return value
    return None


def _sign_candidates(axes: Tensor, sign: Tensor, free: Tensor) -> Tensor:
    """Frames ``[s1 e1, s2 e2, s1 s2 e1 x e2]`` over both signs of each axis whose third
    moment does not set one (``free [3]``), the others signed by ``sign [3]``."""
    frames = []
    for s1 in (1.0, -1.0) if bool(free[0]) else (float(sign[0]),):
        for s2 in (1.0, -1.0) if bool(free[1]) else (float(sign[1]),):
            e1, e2 = axes[:, 0] * s1, axes[:, 1] * s2
            frames.append(torch.stack([e1, e2, torch.linalg.cross(e1, e2, dim=-1)], dim=-1))
    return torch.stack(frames)


class PCACanonicalizer(Canonicalizer):
    """Principal-axes frame in SO(3) (a fixed, parameter-free canonicalizer).

    For each centred point cloud, the second-moment matrix ``C = sum_i x_i x_i^T`` is
    diagonalised; its eigenvectors sorted by decreasing eigenvalue form the frame
    ``R = [e1, e2, e3]`` and the canonical pose is ``R^T x``. Sign rule: ``e1`` and ``e2``
    point to the side of positive third moment ``sum_i (x_i . e_k)^3``; ``e3 = e1 x e2`` so
    that ``det R = +1``. Everything is computed in float64 without gradients (the frame is
    fixed; gradients still flow to the data through ``R^T x``).

    With ``l1 >= l2 >= l3`` the eigenvalues of ``C / tr C``, two eigenvalues count as equal
    when they differ by at most ``rel_tol``, and a third moment as zero when
    ``|sum_i (x_i . e_k)^3| <= rel_tol |x|^3``. The cases:

    - all eigenvalues distinct and both third moments non-zero (generic clouds, planar
      ones included): the rule above, exactly equivariant, ``R(Q x) = Q R(x)``;
    - eigenvalues distinct, a third moment zero (a cloud symmetric under the reflection
      across that principal plane, e.g. water): that axis may point either way;
    - ``l2 = l3`` (prolate symmetric tops: collinear clouds, two atoms, ethane,
      but-2-yne): ``e1 = +-`` the unique axis, ``e2`` the direction of one atom's part
      orthogonal to it (among those at least half the largest; a fixed rule when all atoms
      are on the axis);
    - ``l1 = l2`` (oblate symmetric tops: benzene): ``e3 = +-`` the unique axis, ``e1``
      from one atom's part in the plane, ``e2 = e3 x e1``;
    - ``l1 = l2 = l3`` (spherical tops: methane; one atom or coincident atoms): ``e1`` the
      direction of one atom among those at least half as far from the centre as the
      farthest, ``e2`` as in the prolate case; the identity when all atoms are at the
      centre.

    Where a choice remains, each option gives a candidate pose and the one with the
    largest invariant score ``sum_i w_i exp(-|p_i / rho - r|^2)`` is taken (``rho`` the
    root-mean-square radius, ``r`` a fixed generic point, ``w_i`` a fixed generic function
    of the node features ``x``, or of ``z`` when there is no ``x``, so atom types count;
    the first candidate on ties to ``1e-9``). The candidates rotate with the input and
    options that a symmetry maps onto each other give the same pose, so the canonical pose
    is invariant, under rotations and node permutations, as a set of points with their
    features; ``R`` is then equivariant only up to the cloud's symmetries. On the 13,083
    molecules of QM9's test split, under one exact random rotation each, the pose moves by
    at most 9e-11 Angstrom in float64 and 1.6e-4 in float32 (where leaving ties to the
    eigensolver moved three molecules by more than 0.1, up to 2.2).

    Parameters
    ----------
    rel_tol : float
        Relative tolerance for equal eigenvalues and zero third moments; raised to 1000
        machine epsilons of the input's dtype (1.2e-4 for float32 input), below which the
        input's rounding would decide.
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
        lam, axes = evals.flip(-1), evecs.flip(-1)  # decreasing eigenvalue
        proj = torch.einsum("nj,njk->nk", pos, axes[batch])  # [N, 3] coordinates in frame
        third = segment_sum(proj**3, batch, b)  # [B, 3]
        size = segment_sum(pos.pow(2).sum(-1), batch, b).sqrt()  # [B]
        # below 1000 machine epsilons of the input, rounding of the input would decide
        tol = max(self.rel_tol, 1000.0 * torch.finfo(data.pos.dtype).eps)
        free = third.abs() <= tol * size[:, None].pow(3).clamp_min(1e-300)
        sign = torch.where(free, torch.ones_like(third), torch.sign(third))
        e1 = axes[:, :, 0] * sign[:, 0:1]
        e2 = axes[:, :, 1] * sign[:, 1:2]
        rot = torch.stack([e1, e2, torch.linalg.cross(e1, e2, dim=-1)], dim=-1)

        equal12 = lam[:, 0] - lam[:, 1] <= tol
        equal23 = lam[:, 1] - lam[:, 2] <= tol
        unresolved = equal12 | equal23 | free[:, :2].any(-1)
        if bool(unresolved.any()):
            dtype = data.pos.dtype

            def candidates(g: int, p: Tensor) -> Tensor:
                ax = axes[g]
                if bool(equal12[g] & equal23[g]):
                    return free_candidates(p, precision=dtype)
                if bool(equal23[g]):  # prolate: e1 is the unique axis
                    both = torch.stack([ax[:, 0], -ax[:, 0]])
                    return axis_candidates(p, both, precision=dtype)
                if bool(equal12[g]):  # oblate: e3 is the unique axis, [e1, e2, e3] cyclic
                    both = torch.stack([ax[:, 2], -ax[:, 2]])
                    return axis_candidates(p, both, precision=dtype).roll(2, -1)
                return _sign_candidates(ax, sign[g], free[g])

            graphs = unresolved.nonzero()[:, 0]
            weights = atom_weights(_type_features(data), pos.shape[0], pos.device)
            rot[graphs] = resolve_frames(pos, batch, weights, graphs, candidates)
        return rot.to(data.pos.dtype)

    def forward(self, data: Any) -> CanonOutput:
        check_point_cloud(data, "PCACanonicalizer", finite=False)
        rot = self.frame(data)
        return CanonOutput(canonical=self.apply_inverse(data, rot), element=rot)
