import math

import pytest
import torch
from torch_geometric.data import Batch, Data

from canonwrap.groups import O3, SO3, CyclicRotations, Translations, Trivial, rotate_images

GROUPS = [SO3(), O3(), Translations(), CyclicRotations(8), CyclicRotations(4), Trivial()]


def _data_for(group, gen):
    if isinstance(group, CyclicRotations):
        return torch.randn(3, 2, 9, 9, generator=gen, dtype=torch.float64)
    return torch.randn(3, 5, 3, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.name)
def test_group_axioms(group, gen):
    a = group.random(6, generator=gen, dtype=torch.float64)
    b = group.random(6, generator=gen, dtype=torch.float64)
    c = group.random(6, generator=gen, dtype=torch.float64)
    e = group.identity(6, dtype=torch.float64)
    assert group.distance(group.compose(a, e), a).max() <= 1e-12
    assert group.distance(group.compose(e, a), a).max() <= 1e-12
    assert group.distance(group.compose(a, group.inverse(a)), e).max() <= 1e-12
    left = group.compose(group.compose(a, b), c)
    right = group.compose(a, group.compose(b, c))
    assert group.distance(left, right).max() <= 1e-12


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.name)
def test_action_is_a_homomorphism(group, gen):
    x = _data_for(group, gen)
    a = group.random(3, generator=gen, dtype=torch.float64)
    b = group.random(3, generator=gen, dtype=torch.float64)
    if isinstance(group, CyclicRotations) and group.n != 4:
        # interpolated rotations compose only approximately; quarter turns are exact
        a, b = (a // (group.n // 4)) * (group.n // 4), (b // (group.n // 4)) * (group.n // 4)
    lhs = group.act(group.compose(a, b), x)
    rhs = group.act(a, group.act(b, x))
    assert (lhs - rhs).abs().max() <= 1e-12
    assert (group.act(group.identity(3, dtype=torch.float64), x) - x).abs().max() <= 1e-12


def test_so3_elements_are_rotations_and_haar(gen):
    r = SO3().random(20000, generator=gen, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    assert (r.transpose(1, 2) @ r - eye).abs().max() <= 1e-12
    assert (torch.linalg.det(r) - 1).abs().max() <= 1e-12
    # Haar moments: E[R] = 0 and E[R_ij^2] = 1/3 (std of the mean ~ 0.004 at this size)
    assert r.mean(0).abs().max() < 0.02
    assert (r.pow(2).mean(0) - 1 / 3).abs().max() < 0.02
    # the rotation angle has density (1 - cos w) / pi on [0, pi]: E[cos w] = -1/2
    cos_w = (r.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2
    assert abs(cos_w.mean().item() + 0.5) < 0.02


def test_o3_contains_reflections(gen):
    r = O3().random(2000, generator=gen, dtype=torch.float64)
    det = torch.linalg.det(r)
    assert ((det.abs() - 1).abs() < 1e-12).all()
    assert 0.4 < (det < 0).double().mean() < 0.6


def test_point_cloud_action_moves_each_graph_by_its_own_element(gen):
    batch = Batch.from_data_list(
        [Data(pos=torch.randn(n, 3, generator=gen, dtype=torch.float64)) for n in (2, 4)]
    )
    r = SO3().random(2, generator=gen, dtype=torch.float64)
    moved = SO3().act(r, batch)
    assert torch.allclose(moved.pos[:2], batch.pos[:2] @ r[0].T)
    assert torch.allclose(moved.pos[2:], batch.pos[2:] @ r[1].T)
    assert moved.pos is not batch.pos and batch.pos.shape == (6, 3)
    t = Translations().random(2, generator=gen, dtype=torch.float64)
    shifted = Translations().act(t, batch)
    assert torch.allclose(shifted.pos[2:], batch.pos[2:] + t[1])


def test_quarter_turns_are_exact_and_match_interpolation_direction(gen):
    img = torch.randn(2, 1, 9, 9, generator=gen, dtype=torch.float64)
    quarter = torch.full((2,), math.pi / 2, dtype=torch.float64)
    assert torch.equal(rotate_images(img, quarter), torch.rot90(img, 1, dims=(-2, -1)))
    # the interpolating path agrees with rot90 in direction
    almost = quarter + 1e-7
    assert (rotate_images(img, almost) - torch.rot90(img, 1, dims=(-2, -1))).abs().max() < 1e-5
    c4 = CyclicRotations(4)
    k = torch.tensor([1, 3])
    out = c4.act(k, img)
    assert torch.equal(out[1], torch.rot90(img[1], 3, dims=(-2, -1)))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="square images"):
        CyclicRotations(8).act(torch.zeros(2), torch.zeros(2, 1, 5, 6))
    with pytest.raises(ValueError, match=r"\[B, \.\.\., 3\]"):
        SO3().act(SO3().identity(2), torch.zeros(2, 5, 2))
    with pytest.raises(ValueError, match="positive"):
        CyclicRotations(0)


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.name)
def test_compactness_is_a_property_of_the_group(group):
    # translations have no Haar probability measure; the others are compact
    assert group.is_compact == (not isinstance(group, Translations))
