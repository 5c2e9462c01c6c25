"""Point-cloud batches: counting graphs, per-graph reductions, centring and layout checks.

A point cloud is a ``torch_geometric`` ``Data`` (one graph) or ``Batch`` (several) with
node positions ``pos [N, D]``, optional node features ``x [N, F]`` and, for a batch, the
graph of each node ``batch [N]``. Every module of canonwrap that reads point clouds uses
these helpers, and so can user code (groups, canonicalizers, denoisers).

Validation: [`check_point_cloud`][canonwrap.pointclouds.check_point_cloud] is the full check (types,
shapes, finite values, the batch vector).
[`CanonicalizedDiffusion`][canonwrap.diffusion.CanonicalizedDiffusion] runs it once per call of
``training_loss``, ``nll`` and ``sample``; the layers it calls (canonicalizers, denoisers) check
only what is read off shapes (``finite=False``), which costs no pass over the data.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "is_point_cloud",
    "graph_index",
    "num_samples",
    "nodes_per_graph",
    "segment_sum",
    "segment_mean",
    "remove_mean",
    "centre",
    "replace",
    "check_tensor",
    "check_point_cloud",
    "collate_hint",
    "parameter_mismatch",
]


def is_point_cloud(data: Any) -> bool:
    """True for ``torch_geometric`` ``Data``/``Batch`` objects carrying ``pos``."""
    return hasattr(data, "pos") and not isinstance(data, Tensor)


def graph_index(data: Any) -> Tensor:
    """The ``batch [N]`` vector of a point cloud (zeros for a single ``Data``)."""
    batch = getattr(data, "batch", None)
    if batch is None:
        return torch.zeros(data.pos.shape[0], dtype=torch.long, device=data.pos.device)
    return batch


def num_samples(data: Any) -> int:
    """Number of samples ``B`` in a batch: graphs of a point cloud, rows of a tensor.

    A ``Batch`` reports its graph count without reading the batch vector; a single ``Data``
    is one graph; otherwise the count is ``batch.max() + 1`` (0 for an empty batch vector).
    For a plain tensor ``[B, ...]`` it is ``B``.

    Examples
    --------
    >>> from torch_geometric.data import Batch, Data
    >>> num_samples(Batch.from_data_list([Data(pos=torch.zeros(2, 3))] * 3))
    3
    >>> num_samples(torch.zeros(5, 4))
    5
    """
    if not is_point_cloud(data):
        return int(data.shape[0])
    batch = getattr(data, "batch", None)
    if batch is None:
        return 1
    ng = getattr(data, "num_graphs", None)
    if ng is not None:
        return int(ng)
    return int(batch.max().item()) + 1 if batch.numel() else 0


def nodes_per_graph(data: Any) -> Tensor:
    """Number of nodes of each graph, long ``[B]``."""
    return torch.bincount(graph_index(data), minlength=num_samples(data))


def segment_sum(values: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """Sum ``values [N, ...]`` per graph: returns ``[num_graphs, ...]``."""
    out = values.new_zeros((num_graphs,) + tuple(values.shape[1:]))
    return out.index_add_(0, batch, values)


def segment_mean(values: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """Mean of ``values [N, ...]`` per graph: returns ``[num_graphs, ...]`` (0 for empty graphs)."""
    total = segment_sum(values, batch, num_graphs)
    counts = torch.bincount(batch, minlength=num_graphs).clamp_min(1).to(values.dtype)
    return total / counts.view((-1,) + (1,) * (values.dim() - 1))


def remove_mean(pos: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """Project node positions ``pos [N, D]`` onto the zero centre-of-mass subspace per graph."""
    return pos - segment_mean(pos, batch, num_graphs)[batch]


def centre(data: Any) -> Any:
    """Point cloud with the centre of mass (unweighted mean) of each graph removed."""
    return replace(data, pos=remove_mean(data.pos, graph_index(data), num_samples(data)))


def replace(data: Any, **fields: Tensor) -> Any:
    """Shallow copy of a ``Data``/``Batch`` with some fields replaced (inputs untouched)."""
    out = copy.copy(data)
    for key, value in fields.items():
        setattr(out, key, value)
    return out


def check_tensor(name: str, value: Any, finite: bool = True) -> Tensor:
    """``value`` if it is a floating-point tensor (with finite entries when ``finite``).

    Raises
    ------
    TypeError
        For non-tensors and integer tensors.
    ValueError
        Naming ``name``, if ``finite`` and some entry is NaN or infinite.
    """
    if not isinstance(value, Tensor):
        hint = collate_hint(value)
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}{hint}")
    if not torch.is_floating_point(value):
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if finite and not bool(torch.isfinite(value).all()):
        n_bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name} contains {n_bad} non-finite (NaN/Inf) value(s)")
    return value


def parameter_mismatch(module: Any, ref: Tensor) -> tuple[str, Any, Any] | None:
    """How ``ref`` differs in placement from the parameters of ``module``, or ``None``.

    Compares the device of ``ref`` with that of the first parameter, then its dtype with
    that of the first floating-point parameter; reads only metadata, no values.

    Parameters
    ----------
    module : nn.Module
        The network whose parameters ``ref`` is meant for (no parameters: never a mismatch).
    ref : Tensor
        An input of the network (data, positions, samples).

    Returns
    -------
    tuple or None
        ``("device", ref.device, parameter device)`` or ``("dtype", ref.dtype, parameter
        dtype)`` for the first difference found; ``None`` when both agree.
    """
    p = next(iter(module.parameters()), None)
    if p is not None and p.device != ref.device:
        return "device", ref.device, p.device
    p = next((q for q in module.parameters() if q.is_floating_point()), None)
    if p is not None and p.dtype != ref.dtype:
        return "dtype", ref.dtype, p.dtype
    return None


def collate_hint(data: Any) -> str:
    """A sentence telling how to batch ``data`` when it is a dataset or a list of graphs.

    Empty for anything else. Used in the errors of functions that take one batch.
    """
    from torch.utils.data import Dataset

    if isinstance(data, (list, tuple)) and data and all(is_point_cloud(d) for d in data):
        what = f"a {type(data).__name__} of {len(data)} {type(data[0]).__name__} objects"
    elif isinstance(data, Dataset):
        what = f"a dataset ({type(data).__name__})"
    else:
        return ""
    return (
        f" ({what}): pass one batch, collated with "
        "torch_geometric.data.Batch.from_data_list(graphs) or drawn from a "
        "torch_geometric.loader.DataLoader(dataset, batch_size=...)"
    )


def check_point_cloud(
    data: Any,
    who: str = "point cloud",
    *,
    feature_key: str = "x",
    num_features: int | None = None,
    finite: bool = True,
) -> None:
    """Raise a clear error unless ``data`` is a well-formed 3D point-cloud batch.

    Checks: a ``Data``/``Batch`` with floating-point ``pos [N, 3]``, ``N >= 1``; features
    ``data.<feature_key>`` absent or ``[N, F]`` of the dtype and device of ``pos`` (and
    ``F == num_features`` when given); a batch vector ``[N]``; and, when ``finite``, no
    NaN or infinite position or feature.

    Parameters
    ----------
    who : str
        Named at the start of each message (``"PCACanonicalizer"``, ``"PointCloudSpace"``).
    finite : bool
        Also scan the values (one pass over the data and a device synchronisation); the
        shape checks alone read no data.
    """
    if not is_point_cloud(data):
        raise TypeError(
            f"{who} expects a torch_geometric Data/Batch with `pos`; got "
            f"{type(data).__name__}{collate_hint(data)}"
        )
    pos = check_tensor("pos", data.pos, finite)
    if pos.dim() != 2 or pos.shape[1] != 3:
        raise ValueError(f"{who}: pos must be [N, 3]; got {tuple(pos.shape)}")
    if pos.shape[0] == 0:
        raise ValueError(f"{who}: empty batch: the point cloud has no nodes")
    h = getattr(data, feature_key, None)
    if h is not None:
        h = check_tensor(feature_key, h, finite)
        if h.dim() != 2 or h.shape[0] != pos.shape[0]:
            raise ValueError(
                f"{who}: {feature_key} must be [N={pos.shape[0]}, F]; got {tuple(h.shape)}"
            )
        if h.dtype != pos.dtype or h.device != pos.device:
            raise ValueError(
                f"{who}: {feature_key} ({h.dtype}, {h.device}) and pos ({pos.dtype}, "
                f"{pos.device}) must share dtype and device"
            )
    width = 0 if h is None else h.shape[1]
    if num_features is not None and width != num_features:
        raise ValueError(f"{who}: expected {num_features} node features, got {width}")
    # after the features: a Batch of Data whose x and pos disagree in length gets a
    # batch vector as long as x, and the feature message above says what is wrong
    batch = graph_index(data)
    if batch.shape != (pos.shape[0],):
        raise ValueError(f"{who}: batch must be [N={pos.shape[0]}]; got {tuple(batch.shape)}")
