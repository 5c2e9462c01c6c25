"""E(n)-equivariant graph networks: EDM's EGNN and its multi-channel generalisation.

One implementation serves both. Each node carries an invariant state ``h_i [H]`` and ``C``
vector channels ``X_i [3, C]`` (position-like, translation-equivariant). With ``C = 1`` the
layers are exactly EDM's ``EquivariantBlock`` (Satorras et al. 2021, as modified by
Hoogeboom et al. 2022): coordinate updates along normalised differences
``(x_i - x_j) / (|x_i - x_j| + 1)`` scaled by ``tanh(.) * coords_range``. With ``C > 1`` they
follow Levy et al. (2023), *Using Multiple Vector Channels Improves E(n)-Equivariant Graph
Neural Networks*: messages see the Gram matrix of the per-channel differences, and each
edge predicts an invariant ``C x C`` matrix that mixes the channels of the update.

Equivariance: every vector output is a sum of vector differences ``X_i - X_j`` multiplied
by rotation-invariant coefficients, and every scalar is a function of inner products, so
the networks are equivariant to rotations, reflections, translations and node
permutations (exactly, up to floating point rounding).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from canonwrap.nn.gnn import GCL, _read_batch
from canonwrap.nn.graph import Aggregation, aggregate, fully_connected_edges, node_times
from canonwrap.pointclouds import remove_mean

__all__ = ["EquivariantUpdate", "EGNNLayer", "EGNN", "EGNNDenoiser", "edge_geometry"]


def edge_geometry(
    x: Tensor, edge_index: Tensor, norm_constant: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Invariant edge features and normalised differences of ``C``-channel coordinates.

    Parameters
    ----------
    x : Tensor
        Vector channels ``[N, 3, C]``.
    edge_index : Tensor
        ``[2, E]`` with rows ``(i, j)``.
    norm_constant : float
        ``c`` in ``d / (|d| + c)`` (EDM: 1).

    Returns
    -------
    gram : Tensor
        Upper triangle (diagonal included) of the Gram matrix ``D^T D`` of the differences
        ``D = X_i - X_j``, ``[E, C (C + 1) / 2]``; for ``C = 1`` the squared distance.
    unit : Tensor
        ``D^c / (sqrt(|D^c|^2 + 1e-8) + norm_constant)`` per channel, ``[E, 3, C]`` (EDM's
        ``coord2diff``; finite with finite gradients for coincident nodes).
    """
    row, col = edge_index
    diff = x[row] - x[col]  # [E, 3, C]
    gram = torch.einsum("eic,eid->ecd", diff, diff)
    c = x.shape[-1]
    iu = torch.triu_indices(c, c, device=x.device)
    radial = gram.diagonal(dim1=-2, dim2=-1)  # [E, C]
    unit = diff / ((radial + 1e-8).sqrt() + norm_constant).unsqueeze(1)
    return gram[:, iu[0], iu[1]], unit


class EquivariantUpdate(nn.Module):
    """EDM's ``EquivariantUpdate`` with ``C`` channels: ``X_i += agg_j unit_ij @ W_ij``.

    ``W_ij = phi_x([h_i, h_j, a_ij])`` is an invariant ``C x C`` matrix (a scalar for
    ``C = 1``), passed through ``tanh`` and scaled by ``coords_range`` when ``tanh`` is on.
    The last linear layer has no bias and a small Xavier initialisation (gain 0.001), as in
    EDM, so that freshly initialised layers barely move the coordinates.
    """

    def __init__(
        self,
        hidden: int,
        edge_features: int,
        vector_channels: int = 1,
        tanh: bool = True,
        coords_range: float = 15.0 / 9,
        normalization_factor: float = 1.0,
        aggregation: Aggregation = "sum",
    ) -> None:
        super().__init__()
        self.c = int(vector_channels)
        self.tanh = bool(tanh)
        self.coords_range = float(coords_range)
        self.normalization_factor = float(normalization_factor)
        self.aggregation = aggregation
        last = nn.Linear(hidden, self.c * self.c, bias=False)
        nn.init.xavier_uniform_(last.weight, gain=0.001)
        act = nn.SiLU()
        self.coord_mlp = nn.Sequential(
            nn.Linear(2 * hidden + edge_features, hidden), act, nn.Linear(hidden, hidden), act, last
        )

    def forward(
        self, h: Tensor, x: Tensor, edge_index: Tensor, unit: Tensor, edge_attr: Tensor
    ) -> Tensor:
        """Updated vector channels.

        Parameters
        ----------
        h : Tensor
            Node states ``[N, H]``.
        x : Tensor
            Vector channels ``[N, 3, C]``.
        edge_index : Tensor
            ``[2, E]``; updates are aggregated onto ``edge_index[0]``.
        unit : Tensor
            Normalised differences ``[E, 3, C]`` (see ``edge_geometry``).
        edge_attr : Tensor
            Invariant edge attributes ``[E, A]``.

        Returns
        -------
        Tensor
            ``[N, 3, C]``.
        """
        row, col = edge_index
        w = self.coord_mlp(torch.cat([h[row], h[col], edge_attr], dim=-1))
        if self.tanh:
            w = torch.tanh(w) * self.coords_range
        trans = torch.einsum("eic,ecd->eid", unit, w.view(-1, self.c, self.c))
        return x + aggregate(trans, row, x.shape[0], self.aggregation, self.normalization_factor)


class EGNNLayer(nn.Module):
    """One equivariant block (EDM's ``EquivariantBlock``), with ``C`` vector channels.

    Computes the edge invariants once, ``a_ij = [gram(X_i - X_j), e_ij]`` with ``e_ij`` the
    fixed edge attributes passed in (EDM: squared distances of the input positions), runs
    ``inv_sublayers`` invariant [`GCL`][canonwrap.nn.GCL] updates of ``h`` and then one
    [`EquivariantUpdate`][canonwrap.nn.EquivariantUpdate] of ``X``.

    Parameters
    ----------
    hidden : int
        Width ``H`` of ``h``.
    edge_features : int
        Width of the fixed edge attributes ``e_ij``.
    vector_channels : int
        ``C`` (1 gives EDM's EGNN).
    inv_sublayers : int
        Invariant sublayers per block (EDM's QM9 setting: 1).
    attention
        As in EDM; ``coords_range`` is per layer here (EDM passes ``coords_range / layers``).
    tanh
        As in EDM; ``coords_range`` is per layer here (EDM passes ``coords_range / layers``).
    coords_range
        As in EDM; ``coords_range`` is per layer here (EDM passes ``coords_range / layers``).
    norm_constant
        As in EDM; ``coords_range`` is per layer here (EDM passes ``coords_range / layers``).
    normalization_factor
        As in EDM; ``coords_range`` is per layer here (EDM passes ``coords_range / layers``).
    aggregation
        As in EDM; ``coords_range`` is per layer here (EDM passes ``coords_range / layers``).
    """

    def __init__(
        self,
        hidden: int,
        edge_features: int = 1,
        vector_channels: int = 1,
        inv_sublayers: int = 1,
        attention: bool = True,
        tanh: bool = True,
        coords_range: float = 15.0 / 9,
        norm_constant: float = 1.0,
        normalization_factor: float = 1.0,
        aggregation: Aggregation = "sum",
    ) -> None:
        super().__init__()
        c = int(vector_channels)
        if c < 1:
            raise ValueError(f"vector_channels must be >= 1; got {vector_channels}")
        self.norm_constant = float(norm_constant)
        width = c * (c + 1) // 2 + int(edge_features)
        self.gcls = nn.ModuleList(
            GCL(hidden, width, attention, normalization_factor, aggregation)
            for _ in range(inv_sublayers)
        )
        self.update = EquivariantUpdate(
            hidden, width, c, tanh, coords_range, normalization_factor, aggregation
        )

    def forward(
        self, h: Tensor, x: Tensor, edge_index: Tensor, edge_attr: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Update ``h [N, H]`` and ``x [N, 3, C]`` given fixed ``edge_attr [E, A]``."""
        gram, unit = edge_geometry(x, edge_index, self.norm_constant)
        attr = torch.cat([gram, edge_attr], dim=-1)
        for gcl in self.gcls:
            h = gcl(h, edge_index, attr)
        x = self.update(h, x, edge_index, unit, attr)
        return h, x


class EGNN(nn.Module):
    """A stack of [`EGNNLayer`][canonwrap.nn.EGNNLayer]: ``(h, pos) -> (h_out, X)``.

    The input positions are copied into all ``C`` channels; the fixed edge attribute of
    every layer is the squared distance of the input positions (EDM).

    Parameters
    ----------
    in_features : int
        Node input width of the invariant stream.
    out_features : int
        Node output width of the invariant stream.
    hidden : int
        Width of the blocks.
    layers : int
        Number of blocks.
    vector_channels : int
        ``C``.
    coords_range : float
        Total coordinate range; each layer gets ``coords_range / layers`` (EDM: 15).
    inv_sublayers
        See [`EGNNLayer`][canonwrap.nn.EGNNLayer].
    attention
        See [`EGNNLayer`][canonwrap.nn.EGNNLayer].
    tanh
        See [`EGNNLayer`][canonwrap.nn.EGNNLayer].
    norm_constant
        See [`EGNNLayer`][canonwrap.nn.EGNNLayer].
    normalization_factor
        See [`EGNNLayer`][canonwrap.nn.EGNNLayer].
    aggregation
        See [`EGNNLayer`][canonwrap.nn.EGNNLayer].
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: int = 256,
        layers: int = 9,
        vector_channels: int = 1,
        inv_sublayers: int = 1,
        attention: bool = True,
        tanh: bool = True,
        coords_range: float = 15.0,
        norm_constant: float = 1.0,
        normalization_factor: float = 1.0,
        aggregation: Aggregation = "sum",
    ) -> None:
        super().__init__()
        self.vector_channels = int(vector_channels)
        self.embedding = nn.Linear(in_features, hidden)
        self.layers = nn.ModuleList(
            EGNNLayer(
                hidden,
                edge_features=1,
                vector_channels=vector_channels,
                inv_sublayers=inv_sublayers,
                attention=attention,
                tanh=tanh,
                coords_range=coords_range / max(layers, 1),
                norm_constant=norm_constant,
                normalization_factor=normalization_factor,
                aggregation=aggregation,
            )
            for _ in range(layers)
        )
        self.embedding_out = nn.Linear(hidden, out_features)

    def forward(self, h: Tensor, pos: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        """Run the network.

        Parameters
        ----------
        h : Tensor
            Invariant node inputs ``[N, in_features]``.
        pos : Tensor
            Positions ``[N, 3]``.
        edge_index : Tensor
            ``[2, E]``, e.g. from [`fully_connected_edges`][canonwrap.nn.fully_connected_edges].

        Returns
        -------
        h_out : Tensor
            ``[N, out_features]``, invariant.
        x : Tensor
            ``[N, 3, C]`` vector channels, equivariant.
        """
        row, col = edge_index
        dist = (pos[row] - pos[col]).pow(2).sum(-1, keepdim=True)  # [E, 1]
        x = pos.unsqueeze(-1).expand(-1, -1, self.vector_channels)
        h = self.embedding(h)
        for layer in self.layers:
            h, x = layer(h, x, edge_index, dist)
        return self.embedding_out(h), x


class EGNNDenoiser(nn.Module):
    """EDM's equivariant noise predictor ``denoiser(z_t, t) -> [N, 3 + F]``.

    Invariant input per node ``h_i = [x_i, t]``; after the [`EGNN`][canonwrap.nn.EGNN] the position
    noise is ``X_final - pos`` projected to zero centre of mass per graph and the feature noise is
    the invariant read-out (EDM's ``EGNN_dynamics_QM9``, ``mode="egnn_dynamics"``; EDM's extra
    read-out channel for time, which it discards, is simply not built). Messages are summed with the
    constant ``normalization_factor = 1`` (EDM's QM9 setting).

    Parameters
    ----------
    num_features : int
        ``F`` (QM9: 6).
    hidden : int
        Width (published size: 256).
    layers : int
        Number of blocks (published size: 9).
    vector_channels : int
        Vector channels per node (1 is EDM; more gives Levy et al.'s multi-channel EGNN;
        the position noise is read from channel 0).
    inv_sublayers
        See [`EGNN`][canonwrap.nn.EGNN].
    attention
        See [`EGNN`][canonwrap.nn.EGNN].
    tanh
        See [`EGNN`][canonwrap.nn.EGNN].
    coords_range
        See [`EGNN`][canonwrap.nn.EGNN].
    norm_constant
        See [`EGNN`][canonwrap.nn.EGNN].
    normalization_factor
        See [`EGNN`][canonwrap.nn.EGNN].
    aggregation : Literal['sum', 'mean']
        Message aggregation (EDM: ``'sum'`` divided by ``normalization_factor = 1``).
    """

    def __init__(
        self,
        num_features: int = 6,
        hidden: int = 256,
        layers: int = 9,
        vector_channels: int = 1,
        inv_sublayers: int = 1,
        attention: bool = True,
        tanh: bool = True,
        coords_range: float = 15.0,
        norm_constant: float = 1.0,
        normalization_factor: float = 1.0,
        aggregation: Aggregation = "sum",
    ) -> None:
        super().__init__()
        self.num_features = int(num_features)
        self.egnn = EGNN(
            in_features=self.num_features + 1,
            out_features=self.num_features,
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

    def forward(self, z_t: Any, t: Tensor | float) -> Tensor:
        """Predicted noise ``[N, 3 + F]`` for noisy molecules ``z_t`` at times ``t [B]``."""
        pos, feats, batch, b = _read_batch(self, z_t, self.num_features)
        edge_index = fully_connected_edges(batch)
        h = torch.cat([feats, node_times(t, batch, b, pos.dtype, "EGNNDenoiser")], dim=-1)
        h_out, x = self.egnn(h, pos, edge_index)
        eps_pos = remove_mean(x[:, :, 0] - pos, batch, b)
        return torch.cat([eps_pos, h_out], dim=-1)
