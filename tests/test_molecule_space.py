"""MoleculeSpace: EDM's discretized decoder and -log p(N), against direct computations."""

import math

import pytest
import torch
from torch import nn
from torch_geometric.data import Batch, Data

from canonwrap import CanonicalizedDiffusion, MoleculeSpace, NodeCountDistribution
from canonwrap.data.qm9 import qm9_features
from canonwrap.schedules import PolynomialSchedule


def _phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _molecule(z, pos):
    z = torch.tensor(z)
    return Data(z=z, pos=torch.tensor(pos, dtype=torch.float64),
                x=qm9_features(z).to(torch.float64))


def _water_and_methane():
    water = _molecule([8, 1, 1], [[0, 0, 0.12], [0, 0.76, -0.47], [0, -0.76, -0.47]])
    methane = _molecule([6, 1, 1, 1, 1], [[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63],
                                          [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]])
    return Batch.from_data_list([water, methane])


def test_reconstruction_term_matches_a_direct_computation():
    data = _water_and_methane()
    space = MoleculeSpace()
    x = space.state(data)
    gen = torch.Generator().manual_seed(0)
    eps = space.noise(x, data, gen)
    eps_hat = space.noise(x, data, gen)
    gamma0 = torch.full((2,), -4.0, dtype=torch.float64)  # a large sigma_0 to make it non-trivial
    got = space.reconstruction_nll(x, eps, eps_hat, gamma0, data)

    sig = math.sqrt(1 / (1 + math.exp(4.0)))
    alp = math.sqrt(1 / (1 + math.exp(-4.0)))
    for b, n in enumerate([3, 5]):
        nodes = (data.batch == b).nonzero().flatten().tolist()
        total = 0.0
        # positions: Gaussian decoder on (n - 1) * 3 dimensions
        sq = sum(((eps[0][i] - eps_hat[0][i]) ** 2).sum().item() for i in nodes)
        total += 0.5 * sq + (n - 1) * 3 * (0.5 * -4.0 + 0.5 * math.log(2 * math.pi))
        for i in nodes:
            h = x[1][i].tolist()
            zh = [alp * h[j] + sig * eps[1][i, j].item() for j in range(6)]
            # one-hot: bin mass around 1 for each type, normalised over types
            mass = []
            for j in range(5):
                c = zh[j] * 4 - 1
                s = sig * 4
                mass.append(_phi((c + 0.5) / s) - _phi((c - 0.5) / s) + 1e-10)
            true_type = max(range(5), key=lambda j: h[j])
            total -= math.log(mass[true_type]) - math.log(sum(mass))
            # charge: bin mass around the integer charge
            c = round(h[5] * 10) - zh[5] * 10
            s = sig * 10
            total -= math.log(_phi((c + 0.5) / s) - _phi((c - 0.5) / s) + 1e-10)
        assert got[b].item() == pytest.approx(total, rel=1e-9, abs=1e-9)


def test_node_count_distribution_and_size_term():
    dist = NodeCountDistribution({3: 1, 5: 3})
    assert dist.log_prob(torch.tensor([3, 5, 4])).tolist() == pytest.approx(
        [math.log(0.25), math.log(0.75), -math.inf]
    )
    draws = dist.sample(4000, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {3, 5}
    assert abs((draws == 5).double().mean().item() - 0.75) < 0.03
    space = MoleculeSpace(node_counts=dist)
    assert space.size_nll(_water_and_methane()).tolist() == pytest.approx(
        [-math.log(0.25), -math.log(0.75)]
    )
    with pytest.raises(ValueError, match="empty"):
        NodeCountDistribution({})


def test_molecule_nll_adds_up_and_decodes():
    class Zero(nn.Module):
        def forward(self, z, t):
            return torch.zeros(z.pos.shape[0], 9, dtype=z.pos.dtype)

    space = MoleculeSpace(node_counts=NodeCountDistribution({3: 1, 5: 1}))
    model = CanonicalizedDiffusion(Zero(), schedule=PolynomialSchedule(100), space=space)
    data = _water_and_methane()
    out = model.nll(data, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.nll, out.kl_prior + out.diffusion + out.reconstruction + out.size)
    assert out.dims.tolist() == [2 * 3 + 3 * 6, 4 * 3 + 5 * 6]
    assert torch.isfinite(out.nll).all()
    mols = space.decode(data)
    assert [m[0].tolist() for m in mols] == [[8, 1, 1], [6, 1, 1, 1, 1]]


class _ZeroMolecules(nn.Module):
    def forward(self, z, t):
        return torch.zeros(z.pos.shape[0], 9, dtype=z.pos.dtype)


def test_sample_draws_sizes_from_the_node_counts():
    counts = NodeCountDistribution({3: 1, 5: 3})
    space = MoleculeSpace(node_counts=counts)
    model = CanonicalizedDiffusion(_ZeroMolecules(), schedule=PolynomialSchedule(5), space=space)
    out = model.sample(num_samples=64, generator=torch.Generator().manual_seed(0))
    sizes = torch.bincount(out.batch)
    assert out.num_graphs == 64 and out.x.shape == (int(sizes.sum()), 6)
    # the sizes are the distribution's first draw from the generator
    assert torch.equal(sizes, counts.sample(64, generator=torch.Generator().manual_seed(0)))
    again = model.sample(64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.pos, out.pos) and torch.equal(again.x, out.x)
    assert model.sample(num_nodes=[3, 4]).num_graphs == 2  # explicit sizes still work
    with pytest.raises(ValueError, match="num_samples=4 but num_nodes has 2 entries"):
        model.sample(4, num_nodes=[3, 3])
    with pytest.raises(ValueError, match="num_samples=0"):
        model.sample(0)
    with pytest.raises(ValueError, match=r"`shape` is for tensor data"):
        model.sample(2, shape=(3,))
    bare = CanonicalizedDiffusion(_ZeroMolecules(), schedule=PolynomialSchedule(5),
                                  space=MoleculeSpace())
    with pytest.raises(ValueError, match=r"MoleculeSpace has none: give num_nodes="):
        bare.sample(num_samples=2)


def test_any_point_cloud_space_can_carry_node_counts():
    from canonwrap import PointCloudSpace

    counts = NodeCountDistribution({3: 1, 5: 3})
    data = _water_and_methane()
    assert torch.equal(
        PointCloudSpace(node_counts=counts).size_nll(data),
        MoleculeSpace(node_counts=counts).size_nll(data),
    )
    assert PointCloudSpace().size_nll(data).tolist() == [0.0, 0.0]


def test_one_definition_of_the_molecule_constants():
    import canonwrap.data.qm9 as qm9
    import canonwrap.molecules as molecules

    assert molecules.QM9_ATOM_TYPES == (1, 6, 7, 8, 9)
    assert molecules.QM9_HEAVY_ATOM_TYPES == (6, 7, 8, 9)
    assert (molecules.ONE_HOT_SCALE, molecules.CHARGE_SCALE) == (4.0, 10.0)
    assert qm9.QM9_ATOM_TYPES is molecules.QM9_ATOM_TYPES
    space = MoleculeSpace()
    assert space.atom_types == molecules.QM9_ATOM_TYPES
    assert (space.onehot_scale, space.charge_scale) == (4.0, 10.0)
    x = qm9_features(torch.tensor([6]))
    assert torch.equal(x, torch.tensor([[0.0, 1 / 4, 0.0, 0.0, 0.0, 6 / 10]]))
