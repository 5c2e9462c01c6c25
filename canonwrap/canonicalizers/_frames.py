"""Frames chosen from the atoms, for point clouds that lack equivariant axes.

No rotation-equivariant frame ``R(Q x) = Q R(x)`` exists for a point cloud with a rotational
symmetry, and the axes an equivariant method derives (pooled vectors of an equivariant
network, principal axes) are fixed by every symmetry of the cloud: they vanish, become
parallel or become degenerate exactly there. What can still be had is a canonical pose
``R^T x`` that is invariant as a set of typed points. This module gives it:

1. the caller lists the *candidate* frames of a cloud, built from its atoms
   (``axis_candidates``, ``free_candidates``); the list rotates with the input
   (candidates of ``Q x`` are ``Q`` times those of ``x``, in the same order), so the candidate
   poses ``R_c^T x`` do not depend on ``Q``;
2. ``pick_frame`` takes the candidate whose pose has the largest invariant score
   ``s(P) = sum_i w_i exp(-|P_i / rho - r|^2)``, with ``rho`` the root-mean-square radius,
   ``r`` a fixed generic point and ``w_i`` a generic function of atom ``i``'s features
   (``atom_weights``). Candidates related by a symmetry of the typed cloud give the same
   pose as a point set and the same score, so which of them wins does not matter; other
   poses (mirror images included) almost never tie. Scores within ``1e-9`` of the total
   weight count as tied and the first candidate wins.

A direction is only taken from a vector at least half as long as the longest candidate
vector of its kind and longer than the floor ``max(eps, t rho)``, ``t = max(1e-9, 1000
epsilon)`` with ``epsilon`` the machine epsilon of the input's dtype (1e-9 in float64,
1.2e-4 in float32): shorter vectors are rounding noise of the input or of the axis.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["atom_weights", "axis_candidates", "free_candidates", "pick_frame", "resolve_frames"]

_REFERENCE = (0.8, 0.45, 0.25)  # generic point of the score kernel, in units of rho
_CONDITION = 0.5  # usable vectors are at least this fraction of the longest one
_TIE = 1e-9  # scores within this times sum |w_i| count as tied
_GOLDEN = 0.6180339887498949


def atom_weights(features: Tensor | None, num_nodes: int, device: torch.device) -> Tensor:
    """Score weights ``w_i = 1 + sum_f x_if gamma_f`` per atom, float64 ``[N]``.

    ``gamma_f = 0.5 + frac((f + 1) * 0.618...)`` are fixed generic coefficients, so atoms with
    different feature rows (for molecules: different atom types) get different weights.
    Non-finite features count as 0 (the weights only break ties between poses).

    Parameters
    ----------
    features : Tensor or None
        ``[N, F]`` or ``[N]`` node features (e.g. one-hot atom types, or atomic numbers);
        ``None``: every atom has weight 1.
    num_nodes : int
        ``N``.
    device : torch.device
        Device of the weights.

    Returns
    -------
    Tensor
        ``[N]`` float64, without gradient.
    """
    if features is None:
        return torch.ones(num_nodes, dtype=torch.float64, device=device)
    feats = features.detach().to(device=device, dtype=torch.float64).reshape(num_nodes, -1)
    feats = torch.nan_to_num(feats, nan=0.0, posinf=0.0, neginf=0.0)
    f = torch.arange(1, feats.shape[1] + 1, dtype=torch.float64, device=device)
    return 1.0 + feats @ (0.5 + torch.remainder(f * _GOLDEN, 1.0))


def _unit(v: Tensor) -> Tensor:
    """``v / |v|`` over the last axis (callers only pass vectors of norm above the floor)."""
    return v / v.norm(dim=-1, keepdim=True)


def _rms_radius(pos: Tensor) -> float:
    """Root-mean-square distance of the (centred) atoms from the origin."""
    return float(pos.detach().pow(2).sum(-1).mean().sqrt()) if pos.shape[0] else 0.0


def _floor(pos: Tensor, eps: float, precision: torch.dtype | None) -> float:
    """Length below which a vector of the cloud ``pos`` counts as zero."""
    rel = max(1e-9, 1000.0 * torch.finfo(precision or pos.dtype).eps)
    return max(eps, rel * _rms_radius(pos))


def _usable(norms: Tensor, floor: float) -> Tensor:
    """Vectors that may set a direction: longer than ``floor`` and than half the longest."""
    return (norms > floor) & (norms >= _CONDITION * norms.amax(-1, keepdim=True))


def _orthogonal_rule(axes: Tensor) -> Tensor:
    """A unit vector orthogonal to each unit axis ``[A, 3]`` by a fixed (lab-frame) rule: the
    standard basis vector least aligned with it, made orthogonal (norm >= sqrt(2/3))."""
    a = torch.eye(3, dtype=axes.dtype, device=axes.device)[axes.detach().abs().argmin(-1)]
    return _unit(a - (a * axes).sum(-1, keepdim=True) * axes)


def axis_candidates(
    pos: Tensor, axes: Tensor, eps: float = 0.0, precision: torch.dtype | None = None
) -> Tensor:
    """Candidate frames whose first column is one of the given unit axes.

    For each axis ``a`` and each atom ``j`` whose part ``w_j`` orthogonal to ``a`` is usable
    (at least half the longest such part and longer than the floor), the frame
    ``[a, w_j / |w_j|, a x w_j / |w_j|]``, in the order (axis, atom). An axis on which every
    atom lies gets one frame whose second column follows a fixed rule (the standard basis
    vector least aligned with ``a``, made orthogonal to it); the pose, all on the first
    axis up to the floor, does not depend on that column.

    Parameters
    ----------
    pos : Tensor
        ``[n, 3]`` centred positions of one cloud (gradients flow through the frames).
    axes : Tensor
        ``[A, 3]`` unit vectors, ``A >= 1`` (gradients flow too); they are normalised again
        in float64, so that the atom directions are orthogonal to them to float64 rounding
        even when the axes come from float32.
    eps : float
        Absolute floor on the length of a usable vector, in the units of ``pos``.
    precision : torch.dtype, optional
        The dtype the data came in, which sets the relative floor (default ``pos.dtype``).

    Returns
    -------
    Tensor
        ``[K, 3, 3]`` float64 rotations (columns ``e1, e2, e3``), ``K >= A``.
    """
    floor = _floor(pos, eps, precision)
    pos, axes = pos.to(torch.float64), _unit(axes.to(torch.float64))  # unit to float64 rounding
    perp = pos[None] - (pos @ axes.T).T[..., None] * axes[:, None]  # [A, n, 3]
    usable = _usable(perp.detach().norm(dim=-1), floor)  # [A, n]
    k, j = usable.nonzero(as_tuple=True)
    first, second = axes[k], _unit(perp[k, j])
    lone = ~usable.any(-1)
    if bool(lone.any()):
        first = torch.cat([first, axes[lone]])
        second = torch.cat([second, _orthogonal_rule(axes[lone])])
    return torch.stack([first, second, torch.linalg.cross(first, second, dim=-1)], dim=-1)


def free_candidates(pos: Tensor, eps: float = 0.0, precision: torch.dtype | None = None) -> Tensor:
    """Candidate frames from the atoms alone, for a cloud with no usable axis.

    The first column is the direction of a usable atom (at least half as far from the
    centre as the farthest one, and farther than the floor), the rest as in
    ``axis_candidates``. A cloud whose atoms all sit at the centre (one atom, coincident
    atoms) gets the identity.

    Parameters
    ----------
    pos : Tensor
        ``[n, 3]`` centred positions of one cloud.
    eps : float
        As in ``axis_candidates``.
    precision : torch.dtype, optional
        As in ``axis_candidates``.

    Returns
    -------
    Tensor
        ``[K, 3, 3]`` float64 rotations.
    """
    precision = precision or pos.dtype
    floor = _floor(pos, eps, precision)
    pos = pos.to(torch.float64)
    usable = _usable(pos.detach().norm(dim=-1), floor)
    if not bool(usable.any()):
        return torch.eye(3, dtype=torch.float64, device=pos.device)[None]
    return axis_candidates(pos, _unit(pos[usable]), eps, precision)


def _scores(pos: Tensor, weights: Tensor, frames: Tensor) -> Tensor:
    """``s(R_c^T x)`` for candidate frames ``[K, 3, 3]`` of one cloud ``pos [n, 3]``, ``[K]``."""
    poses = torch.einsum("nj,kjm->knm", pos, frames) / _rms_radius(pos)
    kernel = torch.exp(-(poses - pos.new_tensor(_REFERENCE)).pow(2).sum(-1))  # [K, n]
    return (kernel * weights).sum(-1)


def pick_frame(pos: Tensor, weights: Tensor, candidates: Tensor) -> Tensor:
    """The candidate frame whose pose ``R^T x`` has the largest score (first of near-ties).

    Parameters
    ----------
    pos : Tensor
        ``[n, 3]`` centred positions of one cloud.
    weights : Tensor
        ``[n]`` float64 weights from ``atom_weights``.
    candidates : Tensor
        ``[K, 3, 3]`` candidate rotations of this cloud.

    Returns
    -------
    Tensor
        ``[3, 3]``, one row of ``candidates`` (with its gradient).
    """
    if candidates.shape[0] == 1:
        return candidates[0]
    with torch.no_grad():
        scores = _scores(pos.detach().double(), weights, candidates.detach().double())
        tied = scores >= scores.max() - _TIE * float(weights.abs().sum())
        best = int(tied.nonzero()[0, 0])
    return candidates[best]


def resolve_frames(
    pos: Tensor,
    batch: Tensor,
    weights: Tensor,
    graphs: Tensor,
    candidates: Callable[[int, Tensor], Tensor],
) -> Tensor:
    """``pick_frame`` for each listed cloud of a batch.

    Parameters
    ----------
    pos : Tensor
        ``[N, 3]`` positions, centred per cloud.
    batch : Tensor
        ``[N]`` cloud index of each node.
    weights : Tensor
        ``[N]`` float64 weights from ``atom_weights``.
    graphs : Tensor
        ``[M]`` indices of the clouds to resolve.
    candidates : callable
        ``candidates(g, pos_g)`` returns the ``[K, 3, 3]`` candidate frames of cloud ``g``
        from its positions ``pos_g [n_g, 3]``.

    Returns
    -------
    Tensor
        ``[M, 3, 3]`` float64 rotations, differentiable where the candidates are.
    """
    chosen = []
    for g in graphs.tolist():
        mask = batch == g
        chosen.append(pick_frame(pos[mask], weights[mask], candidates(g, pos[mask])))
    return torch.stack(chosen)
