"""A learned SO(3) canonicalizer: a multi-channel EGNN predicts a frame per molecule."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

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


def _safe_norm(v: Tensor, eps: float) -> Tensor:
    """``|v|`` over the last axis, clamped below at ``eps`` (finite value and gradient)."""
    return v.pow(2).sum(-1, keepdim=True).clamp_min(eps * eps).sqrt()


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

    Both fallbacks give up rotation equivariance (no equivariant choice exists then).

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
    eye = torch.eye(3, dtype=u1.dtype, device=u1.device)
    sq1 = u1.pow(2).sum(-1, keepdim=True)
    e1 = torch.where(sq1 > eps * eps, u1 / _safe_norm(u1, eps), eye[0].expand_as(u1))

    # fallback second axis: the basis vector least aligned with e1, made orthogonal to it
    a = eye[e1.detach().abs().argmin(-1)]  # [B, 3]
    a = a - (a * e1).sum(-1, keepdim=True) * e1  # |a| >= sqrt(2/3)
    fallback = a / _safe_norm(a, eps)

    w = u2 - (u2 * e1).sum(-1, keepdim=True) * e1
    sqw = w.pow(2).sum(-1, keepdim=True)
    sq2 = u2.pow(2).sum(-1, keepdim=True)
    ok = (sqw > eps * eps) & (sqw > parallel_tol**2 * sq2)
    e2 = torch.where(ok, w / _safe_norm(w, eps), fallback)
    e3 = torch.linalg.cross(e1, e2, dim=-1)
    return torch.stack([e1, e2, e3], dim=-1)


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
    invariant pool ``u_k = sum_i sum_c s_i[c, k] (X_i^c - mean_j X_j^c)``. The frame
    ``R = [e1, e2, e3]`` comes from ``frame_from_vectors`` (Gram-Schmidt, then
    ``e3 = e1 x e2``), the element is ``R`` and the canonical pose is ``R^T (pos - mean)``.
    ``normalize`` is centring; ``prior_loss`` is ``None``. Gradients reach the parameters
    through ``R``.

    Equivariance: ``R(Q x) = Q R(x)`` for every rotation ``Q`` up to rounding (float64 error
    about 1e-12) whenever the two pooled vectors are non-zero and not parallel, which is
    the generic case, including planar molecules (both vectors lie in the plane). In
    float32 the error comes from the EGNN's own rounding: at the published size on
    29-atom molecules of QM9's spread (freshly initialised), ``R`` is off by about 1e-5
    and the canonical positions by 2e-5 to 1e-4.

    Degenerate inputs (never NaN, in values or gradients; ``R`` is always a rotation):

    - one atom, or all atoms coincident: ``u1 = 0``, the frame is the identity;
    - collinear molecules, among them every two-atom molecule: both vectors lie on the
      molecule's axis (the network is also reflection-equivariant), so ``e2`` falls back
      to a fixed rule (see ``frame_from_vectors``). No rotation-equivariant frame
      exists for them: ``R`` is equivariant only up to a rotation about the axis, while
      the canonical positions (all on the ``e1`` axis) stay invariant;
    - molecules whose symmetry leaves no vector fixed (e.g. a perfect tetrahedron) pool to
      ``u = 0`` (up to rounding) as for any E(3)-equivariant network; the frame is then the
      identity or set by rounding noise, and the canonical pose is not invariant. Noisy
      inputs seen in diffusion training are never exactly symmetric.

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
        Thresholds of the degenerate-case fallbacks, see ``frame_from_vectors``.
    parallel_tol : float
        Thresholds of the degenerate-case fallbacks, see ``frame_from_vectors``.
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
        return segment_sum(torch.einsum("nic,nck->nik", x, weights), batch, b)

    def frame(self, data: Any) -> Tensor:
        """The rotation ``R [B, 3, 3]`` (columns ``e1, e2, e3``) of centred ``data``."""
        u = self.vectors(data)
        return frame_from_vectors(u[..., 0], u[..., 1], self.eps, self.parallel_tol)

    def forward(self, data: Any) -> CanonOutput:
        check_point_cloud(data, "EGNNCanonicalizer", finite=False)
        rot = self.frame(self.normalize(data))
        return CanonOutput(canonical=self.apply_inverse(data, rot), element=rot)
