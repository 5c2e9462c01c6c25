"""Graph plumbing shared by the message-passing networks: edges, aggregation, node times.

Edge convention (as EDM's ``row, col = edges``): for an edge ``(i, j)`` stored as
``edge_index[:, e] = (i, j)``, node ``i = edge_index[0, e]`` is the receiver (messages are
summed onto ``edge_index[0]``) and ``j = edge_index[1, e]`` the sender. The fully connected
graphs built here are symmetric, so the same ``edge_index`` also reads correctly under
PyG's ``source_to_target`` convention.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from canonwrap.nn._inputs import checked_times

__all__ = ["fully_connected_edges", "aggregate", "node_times"]

Aggregation = Literal["sum", "mean"]


def fully_connected_edges(batch: Tensor) -> Tensor:
    """All ordered pairs ``(i, j)``, ``i != j``, of nodes that belong to the same graph.

    Vectorised (no loop over graphs) and stateless: nothing is cached between calls. The
    batch vector does not need to be sorted; when it is (as in every PyG ``Batch``), the
    edges come out sorted by ``(i, j)``.

    Parameters
    ----------
    batch : Tensor
        Graph id of each node, long ``[N]``.

    Returns
    -------
    Tensor
        ``edge_index`` long ``[2, E]`` with ``E = sum_g n_g (n_g - 1)``; row 0 is the
        receiving node ``i``, row 1 the sending node ``j``. No self-loops.

    Examples
    --------
    >>> fully_connected_edges(torch.tensor([0, 0, 1, 1, 1])).shape
    torch.Size([2, 8])
    """
    if batch.dim() != 1:
        raise ValueError(f"batch must be a 1-D tensor [N]; got shape {tuple(batch.shape)}")
    n = batch.shape[0]
    device = batch.device
    if n == 0:
        return torch.zeros(2, 0, dtype=torch.long, device=device)
    batch = batch.long()
    perm = torch.argsort(batch, stable=True)  # sorted position -> original node
    sb = batch[perm]
    counts = torch.bincount(sb)  # nodes per graph id
    starts = torch.cumsum(counts, 0) - counts  # first sorted position of each graph
    nodes = torch.arange(n, device=device)
    local = nodes - starts[sb]  # rank of each (sorted) node inside its graph
    deg = counts[sb] - 1  # out-degree of each node
    src = torch.repeat_interleave(nodes, deg)  # [E] receiver, sorted positions
    edge_start = torch.cumsum(deg, 0) - deg
    k = torch.arange(src.shape[0], device=device) - edge_start[src]  # 0 .. deg - 1
    dst_local = k + (k >= local[src]).long()  # skip the node itself
    dst = starts[sb[src]] + dst_local
    return torch.stack([perm[src], perm[dst]])


def aggregate(
    messages: Tensor,
    index: Tensor,
    num_nodes: int,
    aggregation: Aggregation = "sum",
    normalization_factor: float = 1.0,
) -> Tensor:
    """Sum messages ``[E, ...]`` onto ``index [E]``, as EDM's ``unsorted_segment_sum``.

    ``aggregation="sum"`` divides the sum by the constant ``normalization_factor`` (EDM's
    QM9 setting is ``sum`` with factor 1); ``aggregation="mean"`` divides by each node's
    number of incoming edges (nodes without edges get zeros).

    Returns
    -------
    Tensor
        ``[num_nodes, ...]``.
    """
    out = messages.new_zeros((num_nodes,) + tuple(messages.shape[1:]))
    out = out.index_add(0, index, messages)
    if aggregation == "sum":
        return out / normalization_factor
    if aggregation == "mean":
        count = torch.bincount(index, minlength=num_nodes).clamp_min(1).to(messages.dtype)
        return out / count.view((-1,) + (1,) * (messages.dim() - 1))
    raise ValueError(f"aggregation must be 'sum' or 'mean'; got {aggregation!r}")


def node_times(
    t: Tensor | float, batch: Tensor, b: int, dtype: torch.dtype, who: str = "node_times"
) -> Tensor:
    """Broadcast per-graph times ``t [B]`` (or one scalar) to nodes: returns ``[N, 1]``.

    ``t`` must be normalized times in ``[0, 1]`` (floating point, finite); see
    ``checked_times`` in ``canonwrap.nn._inputs`` for the messages, which start with ``who``.
    """
    t = checked_times(t, b, who, dtype=dtype, device=batch.device)
    return t[batch].unsqueeze(-1)
