"""EDM's EGNN denoiser and the (multi-channel) EGNN layers: E(3) and permutation symmetry."""

from __future__ import annotations

import pytest
import torch

from canonwrap.groups import O3, SO3, Translations
from canonwrap.nn import EGNN, EGNNDenoiser, EGNNLayer, fully_connected_edges
from canonwrap.testing import assert_equivariant, permute_nodes
from tests.nn.test_gnn import random_molecules, rotate_output


def _model(dtype=torch.float64, **kw) -> EGNNDenoiser:
    torch.manual_seed(0)
    return EGNNDenoiser(num_features=6, hidden=16, layers=3, **kw).to(dtype)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("channels", [1, 3])
def test_egnn_denoiser_rotation_equivariant(dtype, atol, channels):
    """Position noise rotates with the input, feature noise is invariant."""
    gen = torch.Generator().manual_seed(0)
    data = random_molecules([3, 6, 9], dtype=dtype, generator=gen)
    t = torch.rand(3, generator=gen, dtype=torch.float64).to(dtype)
    model = _model(dtype, vector_channels=channels)
    err = assert_equivariant(
        lambda d: model(d, t),
        SO3(),
        data,
        out_act=rotate_output(data.batch),
        atol=atol,
        generator=gen,
    )
    assert err <= atol


def test_egnn_denoiser_reflection_and_translation():
    gen = torch.Generator().manual_seed(1)
    data = random_molecules([4, 5], generator=gen)
    t = torch.rand(2, generator=gen, dtype=torch.float64)
    model = _model()
    assert_equivariant(
        lambda d: model(d, t), O3(), data, out_act=rotate_output(data.batch), generator=gen
    )
    # the predicted noise is translation invariant (the group acts trivially on outputs)
    assert_equivariant(
        lambda d: model(d, t), Translations(), data, out_act=lambda g, y: y, generator=gen
    )


def test_egnn_denoiser_shape_and_zero_centre_of_mass():
    data = random_molecules([3, 8], generator=torch.Generator().manual_seed(2))
    out = _model()(data, 0.4)
    assert out.shape == (data.num_nodes, 9)
    com = torch.zeros(2, 3, dtype=out.dtype).index_add_(0, data.batch, out[:, :3])
    assert com.abs().max() < 1e-12


def test_egnn_denoiser_permutation_equivariant():
    gen = torch.Generator().manual_seed(3)
    data = random_molecules([5, 7], generator=gen)
    t = torch.rand(2, generator=gen, dtype=torch.float64)
    model = _model()
    permuted, perm = permute_nodes(data, gen)
    assert (model(permuted, t) - model(data, t)[perm]).abs().max() < 1e-10


def test_egnn_denoiser_no_cross_graph_leakage():
    gen = torch.Generator().manual_seed(4)
    data = random_molecules([3, 5, 4], generator=gen)
    t = torch.rand(3, generator=gen, dtype=torch.float64)
    model = _model()
    other = data.clone()
    middle = other.batch == 1
    other.pos[middle] = other.pos[middle] * 3.0
    other.x[middle] = other.x[middle].flip(0)
    a, b = model(data, t), model(other, t)
    assert torch.equal(a[~middle], b[~middle])
    assert not torch.allclose(a[middle], b[middle])


def test_multichannel_egnn_vectors_equivariant():
    """All C vector channels of the multi-channel EGNN rotate with the input."""
    gen = torch.Generator().manual_seed(5)
    data = random_molecules([4, 6], generator=gen)
    torch.manual_seed(0)
    net = EGNN(6, 2, hidden=16, layers=3, vector_channels=4).double()
    ei = fully_connected_edges(data.batch)

    def fn(d):
        return net(d.x, d.pos, ei)[1].transpose(1, 2)  # [N, C, 3]

    def act(g, y):
        return torch.einsum("nij,ncj->nci", g[data.batch], y)

    assert_equivariant(fn, SO3(), data, out_act=act, generator=gen)
    x = fn(data)
    assert x.shape == (data.num_nodes, 4, 3)
    assert (x[:, 0] - x[:, 1]).abs().max() > 1e-6  # channels differ after mixing


def test_egnn_layer_matches_closed_form():
    """One single-channel layer against EDM's update written edge by edge."""
    torch.manual_seed(0)
    hidden, n = 8, 4
    layer = EGNNLayer(hidden, edge_features=1, attention=False, coords_range=2.0).double()
    # a visible coordinate update (EDM initialises it tiny)
    torch.nn.init.normal_(layer.update.coord_mlp[-1].weight)
    h = torch.randn(n, hidden, dtype=torch.float64)
    pos = torch.randn(n, 3, dtype=torch.float64)
    ei = fully_connected_edges(torch.zeros(n, dtype=torch.long))
    e0 = torch.rand(ei.shape[1], 1, dtype=torch.float64)
    h_new, x_new = layer(h, pos[:, :, None], ei, e0)

    gcl = layer.gcls[0]
    attr = {}
    for k, (i, j) in enumerate(ei.t().tolist()):
        d = pos[i] - pos[j]
        attr[i, j] = torch.cat([d.dot(d).view(1), e0[k]])
    ref_h = torch.empty_like(h)
    for i in range(n):
        agg = sum(gcl.edge_mlp(torch.cat([h[i], h[j], attr[i, j]])) for j in range(n) if j != i)
        ref_h[i] = h[i] + gcl.node_mlp(torch.cat([h[i], agg]))
    ref_x = pos.clone()
    for i in range(n):
        for j in range(n):
            if i != j:
                d = pos[i] - pos[j]
                w = layer.update.coord_mlp(torch.cat([ref_h[i], ref_h[j], attr[i, j]]))
                ref_x[i] += d / ((d.dot(d) + 1e-8).sqrt() + 1.0) * torch.tanh(w) * 2.0
    assert (h_new - ref_h).abs().max() < 1e-12
    assert (x_new[:, :, 0] - ref_x).abs().max() < 1e-12


def test_egnn_denoiser_gradients_finite_with_coincident_atoms():
    data = random_molecules([3, 4], generator=torch.Generator().manual_seed(6))
    data.pos[1] = data.pos[0]  # two atoms on top of each other
    data.pos.requires_grad_(True)
    model = _model()
    model(data, 0.5).pow(2).sum().backward()
    assert torch.isfinite(data.pos.grad).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
