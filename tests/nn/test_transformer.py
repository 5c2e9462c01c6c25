"""TransformerDenoiser: permutation equivariance, batch and padding independence, time."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch

from canonwrap.groups import SO3
from canonwrap.nn import TransformerDenoiser
from canonwrap.testing import assert_equivariant, permute_nodes
from tests.nn.test_gnn import random_molecules, rotate_output


def _model(dtype=torch.float64, **kw) -> TransformerDenoiser:
    """A small transformer whose zero-initialised layers are randomised.

    At initialisation the gates and the head are zero (every output is 0), which would let
    every equivariance check pass trivially; random weights make the checks bite.
    """
    torch.manual_seed(0)
    model = TransformerDenoiser(num_features=6, hidden=16, layers=2, heads=4, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.to(dtype)


@pytest.mark.parametrize("kw", [{}, {"distance_bias": False}])
def test_shape_dtype_zero_centre_of_mass(kw):
    gen = torch.Generator().manual_seed(0)
    data = random_molecules([3, 5, 9], generator=gen)
    out = _model(**kw)(data, torch.rand(3, generator=gen, dtype=torch.float64))
    assert out.shape == (data.num_nodes, 9) and out.dtype == torch.float64
    com = torch.zeros(3, 3, dtype=out.dtype).index_add_(0, data.batch, out[:, :3])
    assert com.abs().max() < 1e-12
    assert out.abs().max() > 1e-3  # not the trivial zero output
    assert torch.isfinite(out).all()


def test_float32_matches_float64():
    gen = torch.Generator().manual_seed(10)
    data = random_molecules([4, 6], generator=gen)
    t = torch.rand(2, generator=gen, dtype=torch.float64)
    out64 = _model(torch.float64)(data, t)
    data32 = data.clone()
    data32.pos, data32.x = data.pos.float(), data.x.float()
    out32 = _model(torch.float32)(data32, t.float())
    assert out32.dtype == torch.float32
    assert (out32.double() - out64).abs().max() < 1e-4


def test_fresh_model_starts_at_zero_output():
    """The zero-initialised head makes the untrained model predict zero noise (DiT init)."""
    data = random_molecules([3, 4], generator=torch.Generator().manual_seed(11))
    model = TransformerDenoiser(num_features=6, hidden=16, layers=2, heads=2).double()
    assert torch.equal(model(data, 0.5), torch.zeros(data.num_nodes, 9, dtype=torch.float64))


@pytest.mark.parametrize("distance_bias", [True, False])
def test_permutation_equivariant(distance_bias):
    gen = torch.Generator().manual_seed(3)
    data = random_molecules([4, 7, 5], generator=gen)
    t = torch.rand(3, generator=gen, dtype=torch.float64)
    model = _model(distance_bias=distance_bias)
    permuted, perm = permute_nodes(data, gen)
    assert (model(permuted, t) - model(data, t)[perm]).abs().max() < 1e-10


def test_permutation_negative_control():
    """A positional index breaks permutation equivariance, and the same check sees it."""
    gen = torch.Generator().manual_seed(3)
    data = random_molecules([5, 6], generator=gen)
    t = torch.rand(2, generator=gen, dtype=torch.float64)
    model = _model()

    def indexed(d):
        d = d.clone()
        d.x = d.x + 0.1 * torch.arange(d.num_nodes, dtype=d.x.dtype)[:, None]
        return model(d, t)

    permuted, perm = permute_nodes(data, gen)
    assert (indexed(permuted) - indexed(data)[perm]).abs().max() > 1e-4


def test_batch_and_padding_independence():
    """Each sample's output is the same alone, in any batch, next to any padding amount."""
    gen = torch.Generator().manual_seed(4)
    data = random_molecules([3, 5, 4], generator=gen)
    t = torch.rand(3, generator=gen, dtype=torch.float64)
    model = _model()
    together = model(data, t)
    graphs = data.to_data_list()
    for i, g in enumerate(graphs):
        alone = model(Batch.from_data_list([g]), t[i : i + 1])
        assert (alone - together[data.batch == i]).abs().max() < 1e-12
    # a much larger neighbour changes the padding of every other sample
    big = random_molecules([29], generator=gen).to_data_list()[0]
    mixed = Batch.from_data_list([graphs[0], big])
    out = model(mixed, torch.stack([t[0], t[1]]))
    assert (out[mixed.batch == 0] - together[data.batch == 0]).abs().max() < 1e-12
    # and changing one sample leaves the others untouched
    other = data.clone()
    middle = other.batch == 1
    other.pos[middle] = other.pos[middle] * 2.0
    changed = model(other, t)
    assert torch.equal(changed[~middle], together[~middle])
    assert not torch.allclose(changed[middle], together[middle])


def test_not_rotation_equivariant():
    """Negative control: raw coordinates enter as numbers, so the rotation check must fail."""
    gen = torch.Generator().manual_seed(2)
    data = random_molecules([4, 6], generator=gen)
    t = torch.rand(2, generator=gen, dtype=torch.float64)
    model = _model()
    with pytest.raises(AssertionError, match="not equivariant"):
        assert_equivariant(
            lambda d: model(d, t), SO3(), data, out_act=rotate_output(data.batch), generator=gen
        )


def test_distance_bias_is_rotation_invariant():
    gen = torch.Generator().manual_seed(6)
    model = _model()
    pos = torch.randn(2, 7, 3, generator=gen, dtype=torch.float64)
    rot = SO3().random(2, generator=gen, dtype=torch.float64)
    rotated = torch.einsum("bij,bnj->bni", rot, pos)
    bias = model.biases[0]
    a = bias(torch.cdist(pos, pos))
    b = bias(torch.cdist(rotated, rotated))
    assert a.shape == (2, 4, 7, 7)
    assert (a - b).abs().max() < 1e-10


def test_time_conditioning_and_bad_time():
    data = random_molecules([3, 4], generator=torch.Generator().manual_seed(1))
    model = _model()
    a = model(data, torch.tensor([0.3, 0.3], dtype=torch.float64))
    assert torch.equal(a, model(data, 0.3))
    assert not torch.allclose(a, model(data, 0.7))
    with pytest.raises(ValueError, match="B=2"):
        model(data, torch.rand(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        model(data, float("nan"))
    with pytest.raises(ValueError, match="x"):
        TransformerDenoiser(num_features=5, hidden=8, layers=1, heads=2).double()(data, 0.3)
    with pytest.raises(ValueError, match="divisible"):
        TransformerDenoiser(hidden=10, heads=4)


def test_unsorted_batch_vector_raises():
    data = random_molecules([3, 4], generator=torch.Generator().manual_seed(1))
    data.batch = data.batch.flip(0)
    with pytest.raises(ValueError, match="sorted"):
        _model()(data, 0.3)


def test_gradients_reach_all_parameters():
    data = random_molecules([3, 4], generator=torch.Generator().manual_seed(5))
    model = _model()
    model(data, torch.tensor([0.2, 0.8], dtype=torch.float64)).pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_packed_block_matches_the_dense_block():
    """The denoiser runs its linear layers on packed points; a block gives the same numbers
    on the dense, padded layout (float64), and garbage in the padding rows of the dense
    layout cannot reach the real points."""
    from torch_geometric.utils import to_dense_batch

    from canonwrap.nn.transformer import _Packing

    gen = torch.Generator().manual_seed(7)
    data = random_molecules([2, 6, 4], generator=gen)
    block = _model().blocks[0]
    packing = _Packing(data.batch, 3)
    h = torch.randn(data.num_nodes, 16, generator=gen, dtype=torch.float64)
    cond = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    key_mask = torch.zeros(packing.mask.shape, dtype=h.dtype).masked_fill(
        ~packing.mask, float("-inf")
    )[:, None, None, :]
    packed = block(h, cond, key_mask, packing)
    dense_h, mask = to_dense_batch(h, data.batch, batch_size=3)
    assert torch.equal(mask, packing.mask)
    assert torch.equal(packing.to_packed(packing.to_dense(h)), h)
    dense_h = dense_h.masked_fill(~mask[..., None], 1e6)  # padding rows are never read
    dense = block(dense_h, cond, key_mask)[mask]
    assert (packed - dense).abs().max() < 1e-12
    # negative control: without the key mask the padding leaks into the real points
    leaky = block(dense_h, cond, torch.zeros_like(key_mask))[mask]
    assert (leaky - dense).abs().max() > 1e-3
