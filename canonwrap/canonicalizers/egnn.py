"""A learned SO(3) canonicalizer: a multi-channel EGNN predicts a frame per molecule."""

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
from canonwrap.groups.rotations import SO3
from canonwrap.nn.egnn import EGNN
from canonwrap.nn.graph import Aggregation, fully_connected_edges
from canonwrap.pointclouds import (
    centre,
    check_point_cloud,
    graph_index,
    num_samples,
    remove_mean,
    segment_sum,
)

__all__ = ["EGNNCanonicalizer", "frame_from_vectors"]

_NOISE = 1000.0  # pooled vectors below this many machine epsilons of their terms count as 0


def _safe_norm(v: Tensor, eps: float) -> Tensor:
    """``|v|`` over the last axis, clamped below at ``eps`` (finite value and gradient)."""
    return v.pow(2).sum(-1, keepdim=True).clamp_min(eps * eps).sqrt()


def _gram_schmidt(
    u1: Tensor,
    u2: Tensor,
    eps: float,
    parallel_tol: float,
    noise1: Tensor | float = 0.0,
    noise2: Tensor | float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``frame_from_vectors`` and the masks ``[B]`` of rows whose ``e1`` (resp. ``e2``) came
    from the vectors rather than from a fallback; ``noise1``, ``noise2`` (``[B, 1]``) are
    further floors on ``|u1|`` and ``|w|``."""
    eye = torch.eye(3, dtype=u1.dtype, device=u1.device)
    sq1 = u1.pow(2).sum(-1, keepdim=True)
    first = (sq1 > eps * eps) & (sq1 > noise1 * noise1)
    e1 = torch.where(first, u1 / _safe_norm(u1, eps), eye[0].expand_as(u1))

    # fallback second axis: the basis vector least aligned with e1, made orthogonal to it
    a = eye[e1.detach().abs().argmin(-1)]  # [B, 3]
    a = a - (a * e1).sum(-1, keepdim=True) * e1  # |a| >= sqrt(2/3)
    fallback = a / _safe_norm(a, eps)

    w = u2 - (u2 * e1).sum(-1, keepdim=True) * e1
    sqw = w.pow(2).sum(-1, keepdim=True)
    sq2 = u2.pow(2).sum(-1, keepdim=True)
    second = (sqw > eps * eps) & (sqw > parallel_tol**2 * sq2) & (sqw > noise2 * noise2)
    e2 = torch.where(second, w / _safe_norm(w, eps), fallback)
    e3 = torch.linalg.cross(e1, e2, dim=-1)
    return torch.stack([e1, e2, e3], dim=-1), first[..., 0], second[..., 0]


def frame_from_vectors(
    u1: Tensor, u2: Tensor, eps: float = 1e-6, parallel_tol: float = 1e-4
) -> Tensor:
    """Rotation ``R = [e1, e2, e3]`` (columns) from two vectors by Gram-Schmidt.

    ``e1 = u1 / |u1|``, ``e2`` is the normalised part of ``u2`` orthogonal to ``e1`` and
    ``e3 = e1 x e2``, so ``R`` is in SO(3) and ``R(Q u1, Q u2) = Q R(u1, u2)`` for every
    rotation ``Q`` whenever neither fallback below fires.

    Fallbacks (deterministic, never NaN in values or gradients):

    - ``|u1| <= eps``: ``e1 = (1, 0, 0)``;
    - the part ``w`` of ``u2`` orthogonal to ``e1`` has ``|w| <= eps`` or
      ``|w| <= parallel_tol * |u2|``: ``e2`` is the normalised projection orthogonal to ``e1``
      of the standard basis vector least aligned with ``e1`` (the first one on ties).

    Both fallbacks give up rotation equivariance: the vectors alone cannot fix the frame.
    [`EGNNCanonicalizer`][canonwrap.canonicalizers.EGNNCanonicalizer] does not use them; it
    takes the missing axes from the atoms instead.

    Parameters
    ----------
    u1 : Tensor
        ``[B, 3]``.
    u2 : Tensor
        ``[B, 3]``.
    eps : float
        Absolute threshold on vector norms, in the units of ``u``.
    parallel_tol : float
        Relative threshold below which ``u2`` counts as parallel to ``u1``.

    Returns
    -------
    Tensor
        ``[B, 3, 3]``, orthogonal with determinant +1.
    """
    return _gram_schmidt(u1, u2, eps, parallel_tol)[0]


def _feature_error(feats: Tensor | None, n: int, f: int) -> str:
    """Why node features ``feats`` do not fit ``EGNNCanonicalizer(num_features=f)``."""
    got = None if feats is None else tuple(feats.shape)
    msg = f"EGNNCanonicalizer: expects x [N={n}, F={f}]; got {got}"
    if feats is None:
        return msg + " (the data have no node features: pass EGNNCanonicalizer(num_features=0))"
    if feats.dim() == 2 and feats.shape[0] == n:
        return msg + f" (pass EGNNCanonicalizer(num_features={feats.shape[1]}))"
    return msg


class EGNNCanonicalizer(Canonicalizer):
    """Learned SO(3) canonicalizer: a multi-channel EGNN predicts two vectors per molecule.

    A [`EGNN`][canonwrap.nn.EGNN] with ``C = vector_channels`` vector channels per node
    (Levy et al. 2023) runs on the centred positions and the node features ``x`` of each
    molecule (fully connected graph). Its invariant read-out gives ``2 C`` scalars per node,
    ``s_i [C, 2]``, and the two vectors per molecule are the equivariant, permutation
    invariant pool ``u_k = sum_i sum_c s_i[c, k] (X_i^c - mean_j X_j^c)``. The element is a
    frame ``R = [e1, e2, e3]`` (columns) and the canonical pose is ``R^T (pos - mean)``.
    ``normalize`` is centring; ``prior_loss`` is ``None``.

    The pooled vectors are fixed by every symmetry of the molecule (a rotation or
    reflection that maps it onto itself with atoms of equal features swapped), so they
    vanish or come out parallel exactly on symmetric molecules, where no equivariant frame
    exists. Which case applies is decided per molecule from rotation-invariant quantities:
    with ``d_k = 1000 * epsilon * sum_i sum_c |s_i[c, k]| |X_i^c - mean_j X_j^c|`` (``epsilon``
    the machine epsilon of the dtype; a floor above the rounding error of the cancelling
    sum ``u_k``: 2.2e-13 of its terms in float64, 1.2e-4 in float32),

    1. ``|u1| > max(eps, d_1)`` and the part ``w`` of ``u2`` orthogonal to ``u1`` has
       ``|w| > max(eps, parallel_tol |u2|, d_2)``: ``R`` is Gram-Schmidt of ``(u1, u2)`` (see
       ``frame_from_vectors``). This is the case of point groups ``C_1`` and ``C_s`` (no
       symmetry, or a single mirror plane, as for a planar molecule with no other
       symmetry: both vectors then lie in its plane). ``R(Q x) = Q R(x)`` for every
       rotation ``Q`` up to rounding (float64 error about 1e-12; at the published size on
       29-atom molecules of QM9's spread in float32, about 1e-5 for ``R`` and 2e-5 to 1e-4
       for the pose), and gradients reach the parameters and the positions through ``R``.
    2. ``|u1| > max(eps, d_1)`` but ``u2`` is parallel to ``u1`` or vanishes: point groups
       ``C_n`` and ``C_nv`` (``n >= 2``, ``C_inf_v`` included), whose symmetries fix one
       axis: water, ammonia, hydrogen cyanide, two atoms of different elements.
       ``e1 = u1 / |u1|``; ``e2`` is the direction of one atom's part orthogonal to ``e1``,
       chosen by an invariant score of the resulting pose (below) among the atoms whose
       part is at least half the largest one.
    3. ``|u1| <= max(eps, d_1)``: every other point group, whose symmetries fix no vector
       (methane, ethane, acetylene, cyanogen, benzene, two atoms of one element). ``e1`` is
       the direction of one atom among those at least half as far from the centre as the
       farthest, ``e2`` as in case 2, both chosen by the score. One atom, or all atoms
       coincident: ``R`` is the identity.

    Collinear molecules (cases 2 and 3): when every atom lies on the ``e1`` axis to
    ``max(eps, t rho)``, with ``rho`` the molecule's root-mean-square radius and
    ``t = max(1e-9, 1000 epsilon)`` (1e-9 in float64, 1.2e-4 in float32), ``e2`` follows a
    fixed lab-frame rule (the standard basis vector least aligned with ``e1``, made
    orthogonal to it); the pose, all on the first axis, does not depend on it. The same
    floor applies to the atom vectors of cases 2 and 3. Planar molecules take case 1 only
    when their plane is their only symmetry; a planar ``C_2v`` molecule (water,
    formaldehyde) takes case 2 and a planar ``D_nh`` one (benzene, ethylene) case 3.

    The score of a candidate frame is ``sum_i w_i exp(-|p_i / rho - r|^2)`` over its pose
    ``p = R^T x``, with ``rho`` the root-mean-square radius, ``r`` a fixed generic point
    and ``w_i`` a fixed generic function of ``x_i`` (so atom types count); the largest
    score wins, and the first candidate (in node order) among scores tied to ``1e-9``. The
    candidates rotate with the input and their scores are invariant, and candidates that a
    symmetry maps onto each other give the same pose, so in cases 2 and 3 the canonical
    pose is invariant, under rotations and node permutations, as a set of points with
    their features (atoms of equal features may trade places); ``R`` is a rotation,
    equivariant only up to the molecule's symmetries. Gradients stay finite: they reach
    the positions through the chosen atoms and, in case 2, the parameters through ``e1``.
    A nearly symmetric molecule whose vectors clear the thresholds takes case 1: its frame
    is set by the small asymmetry, and the rounding error of the vectors relative to
    ``min(|u1|, |w|)`` is what remains. On the 13,083 molecules of QM9's test split (a
    freshly initialised 3-layer network, one exact random rotation each) the canonical
    pose then moves, as a point set, by at most 2.7e-8 Angstrom in float64 and 1.6e-2 in
    float32 (4 molecules beyond 1e-3), against 4.6 Angstrom (48 molecules beyond 0.1) for
    the vectors-only frame; at the published size, on the split's first 2,000 molecules in
    float64, 3.4e-8 against 3.8 (24 molecules beyond 0.1). A generic molecule whose
    vectors happen to fall below a threshold takes case 2 or 3, which is still invariant
    (a fresh network at the published size does so for 2 % of QM9 in float32, half of
    them by ``parallel_tol`` alone).

    Parameters
    ----------
    num_features : int
        ``F``, the width of ``data.x`` (0: the network sees positions only).
    hidden : int
        Width of the EGNN (published size: 64).
    layers : int
        Number of EGNN blocks (published size: 9).
    vector_channels : int
        ``C``, vector channels per node.
    inv_sublayers
        See [`EGNN`][canonwrap.nn.EGNN] (EDM's defaults).
    attention
        See [`EGNN`][canonwrap.nn.EGNN] (EDM's defaults).
    tanh
        See [`EGNN`][canonwrap.nn.EGNN] (EDM's defaults).
    coords_range
        See [`EGNN`][canonwrap.nn.EGNN] (EDM's defaults).
    norm_constant
        See [`EGNN`][canonwrap.nn.EGNN] (EDM's defaults).
    normalization_factor
        See [`EGNN`][canonwrap.nn.EGNN] (EDM's defaults).
    aggregation : Literal['sum', 'mean']
        Message aggregation (EDM: ``'sum'`` divided by ``normalization_factor = 1``).
    eps : float
        Absolute threshold on the pooled vectors' norms (cases above) and, in the units
        of ``pos``, on the atom vectors that may set a direction in cases 2 and 3.
    parallel_tol : float
        Relative threshold below which ``u2`` counts as parallel to ``u1`` (case 2).
    """

    def __init__(
        self,
        num_features: int = 6,
        hidden: int = 64,
        layers: int = 9,
        vector_channels: int = 4,
        inv_sublayers: int = 1,
        attention: bool = True,
        tanh: bool = True,
        coords_range: float = 15.0,
        norm_constant: float = 1.0,
        normalization_factor: float = 1.0,
        aggregation: Aggregation = "sum",
        eps: float = 1e-6,
        parallel_tol: float = 1e-4,
    ) -> None:
        super().__init__()
        self.group = SO3()
        self.num_features = int(num_features)
        self.vector_channels = int(vector_channels)
        self.eps = float(eps)
        self.parallel_tol = float(parallel_tol)
        self.egnn = EGNN(
            in_features=max(self.num_features, 1),
            out_features=2 * self.vector_channels,
            hidden=hidden,
            layers=layers,
            vector_channels=vector_channels,
            inv_sublayers=inv_sublayers,
            attention=attention,
            tanh=tanh,
            coords_range=coords_range,
            norm_constant=norm_constant,
            normalization_factor=normalization_factor,
            aggregation=aggregation,
        )

    def normalize(self, data: Any) -> Any:
        return centre(data)

    def vectors(self, data: Any) -> Tensor:
        """The two pooled equivariant vectors per molecule, ``[B, 3, 2]``.

        ``data`` must be centred (see
        [`normalize`][canonwrap.canonicalizers.EGNNCanonicalizer.normalize]).
        """
        return self._pool(data)[0]

    def _pool(self, data: Any) -> tuple[Tensor, Tensor]:
        """``vectors`` and ``[B, 2]`` the sums ``sum_i sum_c |s_i[c, k]| |X_i^c - mean|`` of
        the sizes of their terms (no gradient), which bound their rounding error."""
        batch = graph_index(data)
        b = num_samples(data)
        pos = data.pos
        if self.num_features > 0:
            feats = getattr(data, "x", None)
            if feats is None or feats.shape != (pos.shape[0], self.num_features):
                raise ValueError(_feature_error(feats, pos.shape[0], self.num_features))
            feats = feats.to(pos.dtype)
        else:
            feats = pos.new_ones(pos.shape[0], 1)
        scalars, x = self.egnn(feats, pos, fully_connected_edges(batch))
        x = remove_mean(x, batch, b)  # translation invariant, [N, 3, C]
        weights = scalars.view(-1, self.vector_channels, 2)  # [N, C, 2]
        u = segment_sum(torch.einsum("nic,nck->nik", x, weights), batch, b)
        sizes = torch.einsum("nc,nck->nk", x.detach().norm(dim=1), weights.detach().abs())
        return u, segment_sum(sizes, batch, b)

    def frame(self, data: Any) -> Tensor:
        """The rotation ``R [B, 3, 3]`` (columns ``e1, e2, e3``) of centred ``data``.

        Cases 2 and 3 of the class description take the missing axes from the atoms.
        """
        u, sizes = self._pool(data)
        noise = _NOISE * torch.finfo(u.dtype).eps * sizes  # [B, 2]
        rot, first, second = _gram_schmidt(
            u[..., 0], u[..., 1], self.eps, self.parallel_tol, noise[:, :1], noise[:, 1:]
        )
        missing = ~(first & second)
        if not bool(missing.any()):
            return rot
        feats = data.x if self.num_features > 0 else None
        weights = atom_weights(feats, data.pos.shape[0], data.pos.device)

        def candidates(g: int, pos: Tensor) -> Tensor:
            if bool(first[g]):  # case 2: e1 from u1, e2 from an atom
                return axis_candidates(pos, rot[g, :, 0][None], self.eps)
            return free_candidates(pos, self.eps)  # case 3

        graphs = missing.nonzero()[:, 0]
        chosen = resolve_frames(data.pos, graph_index(data), weights, graphs, candidates)
        return rot.index_put((graphs,), chosen.to(rot.dtype))

    def forward(self, data: Any) -> CanonOutput:
        check_point_cloud(data, "EGNNCanonicalizer", finite=False)
        rot = self.frame(self.normalize(data))
        return CanonOutput(canonical=self.apply_inverse(data, rot), element=rot)
