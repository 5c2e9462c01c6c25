"""How group actions reach the positions inside the supported data layouts."""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor


def is_point_cloud(data: Any) -> bool:
    """True for ``torch_geometric`` ``Data``/``Batch`` objects carrying ``pos``."""
    return hasattr(data, "pos") and not isinstance(data, Tensor)


def graph_index(data: Any) -> Tensor:
    """The ``batch [N]`` vector of a point cloud (zeros for a single ``Data``)."""
    batch = getattr(data, "batch", None)
    if batch is None:
        return data.pos.new_zeros(data.pos.shape[0], dtype=_long())
    return batch


def num_samples(data: Any) -> int:
    """Number of samples in a batch: graphs of a point cloud, or ``data.shape[0]``."""
    if not is_point_cloud(data):
        return int(data.shape[0])
    ng = getattr(data, "num_graphs", None)
    if ng is not None and getattr(data, "batch", None) is not None:
        return int(ng)
    batch = graph_index(data)
    return int(batch.max().item()) + 1 if batch.numel() else 0


def _long():
    import torch

    return torch.long


def replace(data: Any, **fields: Tensor) -> Any:
    """Shallow copy of a ``Data``/``Batch`` with some fields replaced (inputs untouched)."""
    out = copy.copy(data)
    for key, value in fields.items():
        setattr(out, key, value)
    return out
