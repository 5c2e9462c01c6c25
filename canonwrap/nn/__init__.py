"""Reference networks and blocks: GDM's GNN, EDM's EGNN (single and multi-channel), a transformer, a
UNet."""

from canonwrap.nn.egnn import EGNN, EGNNDenoiser, EGNNLayer, EquivariantUpdate
from canonwrap.nn.gnn import GCL, GNN, GNNDenoiser
from canonwrap.nn.graph import aggregate, fully_connected_edges
from canonwrap.nn.transformer import TransformerDenoiser
from canonwrap.nn.unet import UNet

__all__ = [
    "GNNDenoiser",
    "GNN",
    "GCL",
    "EGNNDenoiser",
    "EGNN",
    "EGNNLayer",
    "EquivariantUpdate",
    "fully_connected_edges",
    "aggregate",
    "TransformerDenoiser",
    "UNet",
]
