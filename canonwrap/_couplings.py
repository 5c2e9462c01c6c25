"""Aligned priors: which noise sample a point cloud is paired with in flow matching.

Re-exported by [`canonwrap.flow`][canonwrap.flow]. Independent coupling draws ``x_0`` and
``x_1`` independently; an aligned prior moves each noise sample towards its data sample,
by rotation (Kabsch) and by re-labelling noise atoms (optimal assignment within each atom
type), before the path is interpolated. Shorter paths are straighter, which is what a
few-step ODE solver needs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from canonwrap.pointclouds import graph_index, num_samples, segment_sum
from canonwrap.spaces import PointCloudSpace, Space, State


def kabsch_rotations(x0: Tensor, x1: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """Proper rotations ``R [B, 3, 3]`` minimising ``sum_i ||R x0_i - x1_i||^2`` per graph.

    Both point sets are zero centre-of-mass per graph (``x0``, ``x1`` ``[N, 3]``); the
    rotation is ``V diag(1, 1, d) U^T`` from the SVD ``U S V^T`` of ``sum_i x0_i x1_i^T``,
    ``d = sign det(V U^T)`` so that no reflection is used.
    """
    cov = segment_sum(x0[:, :, None] * x1[:, None, :], batch, num_graphs)
    u, _, vh = torch.linalg.svd(cov)
    v = vh.transpose(-1, -2)
    d = torch.sign(torch.linalg.det(v @ u.transpose(-1, -2)))
    d = torch.where(d == 0, torch.ones_like(d), d)
    flip = torch.ones(num_graphs, 3, dtype=x0.dtype, device=x0.device)
    flip[:, 2] = d
    return v @ (flip[:, :, None] * u.transpose(-1, -2))


def assignment_permutation(
    x0: Tensor, x1: Tensor, batch: Tensor, types: Tensor | None = None
) -> Tensor:
    """Index ``perm [N]`` such that ``x0[perm]`` pairs each data node with a noise node.

    Within each graph and each type (``types [N]``, ``None``: one type), noise nodes are
    assigned to data nodes by minimising the summed squared distance
    (``scipy.optimize.linear_sum_assignment``, on the CPU).
    """
    from scipy.optimize import linear_sum_assignment

    keys = batch if types is None else batch * (int(types.max()) + 1) + types
    keys_cpu, a, b = keys.cpu(), x0.detach().cpu(), x1.detach().cpu()
    perm = torch.arange(x0.shape[0])
    for key in torch.unique(keys_cpu):
        idx = (keys_cpu == key).nonzero().flatten()
        if idx.numel() < 2:
            continue
        cost = torch.cdist(b[idx].double(), a[idx].double()) ** 2
        rows, cols = linear_sum_assignment(cost.numpy())
        perm[idx[torch.as_tensor(rows)]] = idx[torch.as_tensor(cols)]
    return perm.to(x0.device)


class AlignedPrior:
    """Pair each noise point cloud with its (canonical) data by assignment and rotation.

    Parameters
    ----------
    rotation
        Rotate each noise sample onto its data sample (Kabsch, proper rotations only).
    assignment
        Re-label noise nodes to data nodes by optimal assignment of squared distances,
        within each graph and each node type. Whole noise rows move (positions and
        features together).
    type_columns
        The feature columns that hold the node type as a one-hot block (a ``slice`` of
        ``x``; the type is the arg-max); ``None``: all nodes of a graph share one type.
        For [`MoleculeSpace`][canonwrap.molecules.MoleculeSpace] data:
        ``slice(0, len(space.atom_types))``.

    Notes
    -----
    Both moves keep the noise on the zero centre-of-mass subspace, and each leaves the
    isotropic Gaussian unchanged for a *fixed* pairing, but the pairing depends on the
    data: the noise distribution the network is trained from is the standard Gaussian
    only when the data distribution is itself invariant under the rotations (or node
    permutations within types) used. Canonical poses are not rotation invariant, so with
    ``rotation=True`` the sampler's ``N(0, I)`` start differs from the training noise near
    ``t = 0``: measure samples, not only the loss (the QM9 example's ``--coupling`` and
    ``benchmarks/steps_vs_quality.py --reference dopri5`` do; results in the docs' QM9
    results page). ``canonical_noise=True`` of
    [`CanonicalizedFlowMatching`][canonwrap.flow.CanonicalizedFlowMatching] keeps the start
    distribution consistent instead.
    """

    def __init__(
        self,
        rotation: bool = True,
        assignment: bool = False,
        type_columns: slice | None = None,
    ) -> None:
        self.rotation = bool(rotation)
        self.assignment = bool(assignment)
        self.type_columns = type_columns

    def __repr__(self) -> str:
        return (
            f"AlignedPrior(rotation={self.rotation}, assignment={self.assignment}, "
            f"type_columns={self.type_columns})"
        )

    def __call__(self, x0: State, x1: State, space: Space, template: Any) -> State:
        """The noise ``x0`` re-paired with the data ``x1`` (states of ``space``)."""
        if not isinstance(space, PointCloudSpace):
            raise TypeError(
                f"AlignedPrior pairs point clouds; this model's space is {type(space).__name__}"
            )
        batch, b = graph_index(template), num_samples(template)
        pos, h = x0
        if self.assignment:
            types = None
            if self.type_columns is not None:
                types = x1[1][:, self.type_columns].argmax(-1)
            perm = assignment_permutation(pos, x1[0], batch, types)
            pos, h = pos[perm], h[perm]
        if self.rotation:
            rot = kabsch_rotations(pos, x1[0], batch, b)
            pos = torch.einsum("nij,nj->ni", rot[batch], pos)
        return space.project((pos, h), template)
