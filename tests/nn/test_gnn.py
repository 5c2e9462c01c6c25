"""GDM (non-equivariant GNN denoiser) and the fully connected graph helper."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch, Data

from canonwrap.groups import SO3
from canonwrap.nn import GNNDenoiser, aggregate, fully_connected_edges
from canonwrap.testing import assert_equivariant, permute_nodes

CHARGES = torch.tensor([1.0, 6.0, 7.0, 8.0, 9.0])


def random_molecules(sizes, dtype=torch.float64, generator=None) -> Batch:
    """QM9-like batch: centred positions, one-hot(H, C, N, O, F) / 4 and charge / 10."""
    graphs = []
    for n in sizes:
        pos = torch.randn(n, 3, generator=generator, dtype=torch.float64)
        pos = pos - pos.mean(0)
        types = torch.randint(0, 5, (n,), generator=generator)
        x = torch.zeros(n, 6, dtype=torch.float64)
        x[torch.arange(n), types] = 0.25
        x[:, 5] = CHARGES.double()[types] / 10
        graphs.append(Data(pos=pos.to(dtype), x=x.to(dtype)))
    return Batch.from_data_list(graphs)


def rotate_output(batch: torch.Tensor):
    """Group action on a denoiser output [N, 3 + F]: rotate the position part only."""

    def act(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pos = torch.einsum("nij,nj->ni", g.to(y.dtype)[batch], y[:, :3])
        return torch.cat([pos, y[:, 3:]], dim=-1)

    return act


def brute_force_edges(batch: torch.Tensor) -> set[tuple[int, int]]:
    b = batch.tolist()
    return {(i, j) for i in range(len(b)) for j in range(len(b)) if i != j and b[i] == b[j]}


# -- fully_connected_edges -----------------------------------------------------------------
@pytest.mark.parametrize(
    "batch",
    [
        [0, 0, 0, 1, 2, 2, 2, 2, 3, 3],  # sorted, with a one-node graph
        [2, 0, 1, 0, 2, 1, 1, 0, 2, 2],  # unsorted
        [0, 0, 3, 3, 3, 5],  # graph ids with gaps
        [0],
        [],
    ],
)
def test_fully_connected_edges_matches_brute_force(batch):
    batch = torch.tensor(batch, dtype=torch.long)
    ei = fully_connected_edges(batch)
    assert ei.dtype == torch.long and ei.shape[0] == 2
    pairs = list(zip(ei[0].tolist(), ei[1].tolist()))
    assert len(pairs) == len(set(pairs))  # no duplicates
    assert set(pairs) == brute_force_edges(batch)


def test_fully_connected_edges_sorted_for_pyg_batches():
    batch = torch.tensor([0, 0, 0, 1, 1])
    ei = fully_connected_edges(batch)
    key = ei[0] * 10 + ei[1]
    assert torch.equal(key, key.sort().values)
    assert ei.shape[1] == 3 * 2 + 2 * 1


def test_aggregate_sum_and_mean():
    msg = torch.tensor([[1.0], [2.0], [4.0]])
    idx = torch.tensor([0, 0, 2])
    assert aggregate(msg, idx, 3, "sum", 2.0).squeeze(-1).tolist() == [1.5, 0.0, 2.0]
    assert aggregate(msg, idx, 3, "mean").squeeze(-1).tolist() == [1.5, 0.0, 4.0]
    with pytest.raises(ValueError):
        aggregate(msg, idx, 3, "max")  # type: ignore[arg-type]


# -- GNNDenoiser ---------------------------------------------------------------------------
def _model(**kw) -> GNNDenoiser:
    torch.manual_seed(0)
    return GNNDenoiser(num_features=6, hidden=16, layers=3, **kw).double()


@pytest.mark.parametrize("kw", [{}, {"distance_features": True, "aggregation": "mean"}])
def test_gnn_shape_and_zero_centre_of_mass(kw):
    gen = torch.Generator().manual_seed(0)
    data = random_molecules([3, 5, 9], generator=gen)
    out = _model(**kw)(data, torch.rand(3, generator=gen, dtype=torch.float64))
    assert out.shape == (data.num_nodes, 9) and out.dtype == torch.float64
    com = torch.zeros(3, 3, dtype=out.dtype).index_add_(0, data.batch, out[:, :3])
    assert com.abs().max() < 1e-12
    assert torch.isfinite(out).all()


def test_gnn_scalar_time_broadcasts_and_bad_time_raises():
    data = random_molecules([3, 4], generator=torch.Generator().manual_seed(1))
    model = _model()
    a = model(data, torch.tensor([0.3, 0.3], dtype=torch.float64))
    assert torch.equal(a, model(data, 0.3))
    with pytest.raises(ValueError, match="per graph"):
        model(data, torch.rand(3))
    with pytest.raises(ValueError, match="x"):
        GNNDenoiser(num_features=5, hidden=8, layers=1).double()(data, 0.3)


def test_gnn_is_not_rotation_equivariant():
    """Negative control: GDM is not equivariant, so the check must raise."""
    gen = torch.Generator().manual_seed(2)
    data = random_molecules([4, 6], generator=gen)
    t = torch.rand(2, generator=gen, dtype=torch.float64)
    with pytest.raises(AssertionError, match="not equivariant"):
        assert_equivariant(
            lambda d: _model()(d, t), SO3(), data, out_act=rotate_output(data.batch), generator=gen
        )


def test_gnn_permutation_equivariant():
    gen = torch.Generator().manual_seed(3)
    data = random_molecules([4, 7], generator=gen)
    t = torch.rand(2, generator=gen, dtype=torch.float64)
    model = _model()
    permuted, perm = permute_nodes(data, gen)
    assert (model(permuted, t) - model(data, t)[perm]).abs().max() < 1e-10


def test_gnn_no_cross_graph_leakage():
    gen = torch.Generator().manual_seed(4)
    data = random_molecules([3, 5, 4], generator=gen)
    t = torch.rand(3, generator=gen, dtype=torch.float64)
    model = _model()
    other = data.clone()
    middle = other.batch == 1
    other.pos[middle] = other.pos[middle] * 2.0
    other.x[middle] = other.x[middle].flip(0)
    a, b = model(data, t), model(other, t)
    assert torch.equal(a[~middle], b[~middle])
    assert not torch.allclose(a[middle], b[middle])


def test_gnn_gradients_reach_all_parameters():
    data = random_molecules([3, 4], generator=torch.Generator().manual_seed(5))
    model = _model()
    model(data, 0.5).pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
