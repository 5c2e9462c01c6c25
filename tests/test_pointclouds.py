"""canonwrap.pointclouds: counting graphs, per-graph reductions, centring, layout checks."""

import pytest
import torch
from torch_geometric.data import Batch, Data

from canonwrap.pointclouds import (
    centre,
    check_point_cloud,
    collate_hint,
    graph_index,
    nodes_per_graph,
    num_samples,
    remove_mean,
    replace,
    segment_mean,
    segment_sum,
)


def _batch(*sizes, features=0):
    gen = torch.Generator().manual_seed(0)
    return Batch.from_data_list(
        [
            Data(pos=torch.randn(n, 3, generator=gen), x=torch.randn(n, features, generator=gen))
            for n in sizes
        ]
    )


def test_one_count_for_batches_single_graphs_loose_batch_vectors_and_tensors():
    assert num_samples(_batch(2, 3, 4)) == 3
    assert num_samples(Data(pos=torch.zeros(4, 3))) == 1
    # a Data carrying a batch vector but no graph count: max + 1
    assert num_samples(Data(pos=torch.zeros(4, 3), batch=torch.tensor([0, 0, 1, 2]))) == 3
    assert num_samples(torch.zeros(7, 2, 3)) == 7
    assert nodes_per_graph(_batch(2, 3, 4)).tolist() == [2, 3, 4]
    assert torch.equal(graph_index(Data(pos=torch.zeros(3, 3))), torch.zeros(3, dtype=torch.long))


def test_segment_reductions_and_centring_against_a_loop():
    data = _batch(2, 5)
    b = data.batch
    sums = segment_sum(data.pos, b, 2)
    means = segment_mean(data.pos, b, 2)
    for i in range(2):
        assert torch.allclose(sums[i], data.pos[b == i].sum(0))
        assert torch.allclose(means[i], data.pos[b == i].mean(0))
    centred = centre(data)
    assert torch.equal(centred.pos, remove_mean(data.pos, b, 2))
    assert segment_mean(centred.pos, b, 2).abs().max() < 1e-6
    assert centred is not data and torch.equal(centred.x, data.x)  # other fields kept
    moved = replace(data, pos=data.pos + 1)
    assert torch.equal(moved.pos, data.pos + 1) and torch.equal(data.pos, _batch(2, 5).pos)


def test_check_point_cloud_names_the_problem():
    check_point_cloud(_batch(3, 4, features=2), num_features=2)
    check_point_cloud(Batch.from_data_list([Data(pos=torch.randn(3, 3))]), num_features=0)
    cases = [
        (torch.zeros(2, 3), TypeError, "PCA expects a torch_geometric Data/Batch"),
        (Data(pos=torch.zeros(3, 2)), ValueError, r"PCA: pos must be \[N, 3\]"),
        (Data(pos=torch.zeros(0, 3)), ValueError, "PCA: empty batch"),
        (Data(pos=torch.zeros(3, 3, dtype=torch.long)), TypeError, "floating-point"),
        (Data(pos=torch.zeros(3, 3), x=torch.zeros(2, 1)), ValueError, r"x must be \[N=3, F\]"),
        (Data(pos=torch.zeros(3, 3), x=torch.zeros(3, 1).double()), ValueError, "share dtype"),
        (_batch(3, features=1), ValueError, "expected 2 node features, got 1"),
        (_batch(3), ValueError, "expected 2 node features, got 0"),
    ]
    for data, error, match in cases:
        with pytest.raises(error, match=match):
            check_point_cloud(data, "PCA", num_features=2 if "expected" in match else None)
    bad = _batch(3, 4)
    bad.pos[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"pos contains 1 non-finite"):
        check_point_cloud(bad)
    check_point_cloud(bad, finite=False)  # shapes only: reads no values


def test_collate_hint_only_for_lists_of_graphs_and_datasets():
    graphs = [Data(pos=torch.zeros(2, 3))] * 2
    assert "a list of 2 Data objects" in collate_hint(graphs)
    assert "Batch.from_data_list" in collate_hint(graphs)
    assert collate_hint(torch.zeros(2, 3)) == "" and collate_hint([1, 2]) == ""
    assert "a dataset (TensorDataset)" in collate_hint(
        torch.utils.data.TensorDataset(torch.zeros(2, 3))
    )
