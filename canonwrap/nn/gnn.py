"""GDM: EDM's non-equivariant graph denoiser (message passing on raw coordinates).

Follows ``egnn/models.py`` (``GNN``, ``GCL``) and ``EGNN_dynamics_QM9`` with
``mode="gnn_dynamics"`` of Hoogeboom et al. (2022), *Equivariant Diffusion for Molecule
Generation in 3D*: every node gets ``[pos, x, t]``, a stack of residual graph convolutions
runs on the fully connected graph of each molecule, and a linear read-out predicts the
noise. Nothing in it is equivariant to rotations: it is the denoiser that canonicalization
is meant to make usable on molecules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from canonwrap.nn._inputs import check_input_placement
from canonwrap.nn.graph import Aggregation, aggregate, fully_connected_edges, node_times
from canonwrap.pointclouds import graph_index, num_samples, remove_mean

__all__ = ["GCL", "GNN", "GNNDenoiser"]


class GCL(nn.Module):
    """One residual graph convolution (EDM's ``GCL``), invariant if its inputs are.

    For each edge ``(i, j)`` the message is ``m_ij = phi_e([h_i, h_j, a_ij])``, optionally
    gated by an attention weight ``sigmoid(w . m_ij)``; the node update is
    ``h_i <- h_i + phi_h([h_i, agg_j m_ij])``. ``phi_e`` and ``phi_h`` are two-layer SiLU
    MLPs.

    Parameters
    ----------
    hidden : int
        Width ``H`` of node states and messages.
    edge_features : int
        Width ``A`` of the edge attributes ``a_ij`` (0 for none).
    attention : bool
        Gate each message by ``sigmoid(Linear(m_ij))`` (EDM's QM9 setting: ``True``).
    normalization_factor
        How messages are aggregated, see [`canonwrap.nn.graph.aggregate`][canonwrap.nn.aggregate].
    aggregation
        How messages are aggregated, see [`canonwrap.nn.graph.aggregate`][canonwrap.nn.aggregate].
    """

    def __init__(
        self,
        hidden: int,
        edge_features: int = 0,
        attention: bool = True,
        normalization_factor: float = 1.0,
        aggregation: Aggregation = "sum",
    ) -> None:
        super().__init__()
        self.edge_features = int(edge_features)
        self.normalization_factor = float(normalization_factor)
        self.aggregation = aggregation
        act = nn.SiLU()
        self.edge_mlp = nn.Sequential(
            nn.Linear(2 * hidden + self.edge_features, hidden), act, nn.Linear(hidden, hidden), act
        )
        self.node_mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), act, nn.Linear(hidden, hidden))
        self.att_mlp = nn.Sequential(nn.Linear(hidden, 1), nn.Sigmoid()) if attention else None

    def forward(self, h: Tensor, edge_index: Tensor, edge_attr: Tensor | None = None) -> Tensor:
        """Update node states.

        Parameters
        ----------
        h : Tensor
            Node states ``[N, H]``.
        edge_index : Tensor
            ``[2, E]``; messages are aggregated onto ``edge_index[0]``.
        edge_attr : Tensor, optional
            ``[E, A]`` edge attributes (required when ``edge_features > 0``).

        Returns
        -------
        Tensor
            New node states ``[N, H]``.
        """
        row, col = edge_index
        parts = [h[row], h[col]]
        if self.edge_features:
            if edge_attr is None or edge_attr.shape[-1] != self.edge_features:
                raise ValueError(f"GCL expects edge_attr [E, {self.edge_features}]")
            parts.append(edge_attr)
        m = self.edge_mlp(torch.cat(parts, dim=-1))
        if self.att_mlp is not None:
            m = m * self.att_mlp(m)
        agg = aggregate(m, row, h.shape[0], self.aggregation, self.normalization_factor)
        return h + self.node_mlp(torch.cat([h, agg], dim=-1))


class GNN(nn.Module):
    """EDM's plain ``GNN``: embedding, ``layers`` residual [`GCL`][canonwrap.nn.GCL], linear
    read-out.

    Parameters
    ----------
    in_features : int
        Input width per node.
    out_features : int
        Output width per node.
    hidden : int
        Width of the [`GCL`][canonwrap.nn.GCL] layers.
    layers : int
        Number of [`GCL`][canonwrap.nn.GCL] layers.
    edge_features : int
        Width of the edge attributes passed to every layer (0 for none).
    attention
        Passed to each [`GCL`][canonwrap.nn.GCL].
    normalization_factor
        Passed to each [`GCL`][canonwrap.nn.GCL].
    aggregation
        Passed to each [`GCL`][canonwrap.nn.GCL].
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: int = 256,
        layers: int = 9,
        edge_features: int = 0,
        attention: bool = True,
        normalization_factor: float = 1.0,
        aggregation: Aggregation = "sum",
    ) -> None:
        super().__init__()
        self.embedding = nn.Linear(in_features, hidden)
        self.layers = nn.ModuleList(
            GCL(hidden, edge_features, attention, normalization_factor, aggregation)
            for _ in range(layers)
        )
        self.embedding_out = nn.Linear(hidden, out_features)

    def forward(self, h: Tensor, edge_index: Tensor, edge_attr: Tensor | None = None) -> Tensor:
        """Map node inputs ``[N, in_features]`` to node outputs ``[N, out_features]``."""
        h = self.embedding(h)
        for layer in self.layers:
            h = layer(h, edge_index, edge_attr)
        return self.embedding_out(h)


class GNNDenoiser(nn.Module):
    """GDM: a non-equivariant noise predictor ``denoiser(z_t, t) -> [N, 3 + F]``.

    Per node the input is ``[pos_i, x_i, t]`` (``3 + F + 1`` numbers); a [`GNN`][canonwrap.nn.GNN]
    runs on the fully connected graph of each molecule and its output ``[N, 3 + F]`` is the
    predicted noise: positions first, projected to zero centre of mass per graph (as EDM does), then
    features.

    Design choices (all EDM's QM9 defaults): messages are summed and divided by the
    constant ``normalization_factor = 1`` (``aggregation="mean"`` divides by the node
    degree instead); attention gates on; SiLU activations; no edge attributes unless
    ``distance_features=True``, which adds ``|pos_i - pos_j|^2`` to every message input.

    Parameters
    ----------
    num_features : int
        ``F``, the width of ``z_t.x`` (QM9: 6).
    hidden : int
        Width (published size: 256).
    layers : int
        Number of layers (published size: 9).
    distance_features : bool
        Add squared pairwise distances as edge attributes (not in EDM's GDM).
    attention
        See [`GCL`][canonwrap.nn.GCL].
    normalization_factor
        See [`GCL`][canonwrap.nn.GCL].
    aggregation
        See [`GCL`][canonwrap.nn.GCL].

    Notes
    -----
    Call as ``denoiser(z_t, t)`` with ``z_t`` a ``Data``/``Batch`` carrying ``pos [N, 3]``,
    ``x [N, F]`` and ``batch [N]``, and ``t`` the normalized time, float ``[B]`` (or a
    scalar shared by all graphs).
    """

    def __init__(
        self,
        num_features: int = 6,
        hidden: int = 256,
        layers: int = 9,
        distance_features: bool = False,
        attention: bool = True,
        normalization_factor: float = 1.0,
        aggregation: Aggregation = "sum",
    ) -> None:
        super().__init__()
        self.num_features = int(num_features)
        self.distance_features = bool(distance_features)
        self.gnn = GNN(
            in_features=3 + self.num_features + 1,
            out_features=3 + self.num_features,
            hidden=hidden,
            layers=layers,
            edge_features=1 if self.distance_features else 0,
            attention=attention,
            normalization_factor=normalization_factor,
            aggregation=aggregation,
        )

    def forward(self, z_t: Any, t: Tensor | float) -> Tensor:
        """Predicted noise ``[N, 3 + F]`` for noisy molecules ``z_t`` at times ``t [B]``."""
        pos, feats, batch, b = _read_batch(self, z_t, self.num_features)
        edge_index = fully_connected_edges(batch)
        time = node_times(t, batch, b, pos.dtype, "GNNDenoiser")
        edge_attr = None
        if self.distance_features:
            row, col = edge_index
            edge_attr = (pos[row] - pos[col]).pow(2).sum(-1, keepdim=True)
        out = self.gnn(torch.cat([pos, feats, time], dim=-1), edge_index, edge_attr)
        eps_pos = remove_mean(out[:, :3], batch, b)
        return torch.cat([eps_pos, out[:, 3:]], dim=-1)


def _read_batch(
    network: nn.Module, data: Any, num_features: int
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Validated ``pos [N, 3]``, features ``[N, F]``, ``batch [N]`` and ``B`` of a batch.

    ``pos`` must have the device and dtype of ``network``'s parameters; messages start with
    the network's class name.
    """
    who = type(network).__name__
    pos = getattr(data, "pos", None)
    if not isinstance(pos, Tensor) or pos.dim() != 2 or pos.shape[1] != 3:
        shape = tuple(pos.shape) if isinstance(pos, Tensor) else pos
        raise ValueError(f"{who}: expects a Data/Batch with pos [N, 3]; got {shape}")
    if not pos.is_floating_point():
        raise TypeError(f"{who}: pos must be a floating-point tensor; got {pos.dtype}")
    check_input_placement(network, pos, "z_t.pos", who)
    feats = getattr(data, "x", None)
    if num_features == 0 and feats is None:
        feats = pos.new_zeros(pos.shape[0], 0)
    if feats is None or feats.shape != (pos.shape[0], num_features):
        shape = None if feats is None else tuple(feats.shape)
        raise ValueError(f"{who}: expects x [N={pos.shape[0]}, F={num_features}]; got {shape}")
    return pos, feats.to(pos.dtype), graph_index(data), num_samples(data)
