import pytest
import torch
from torch_geometric.data import Batch, Data

from canonwrap.canonicalizers import CenterOfMass, Identity, PCACanonicalizer, frozen
from canonwrap.groups import SO3
from canonwrap.testing import assert_canonicalizer
from tests.canonicalizers.common import CanonicalizerContract


def random_clouds(dtype, gen, sizes=(4, 6, 9), features=2):
    """Random clouds; independent Gaussian coordinates have distinct principal moments a.s."""
    scale = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    data = []
    for n in sizes:
        pos = torch.randn(n, 3, generator=gen, dtype=torch.float64) * scale
        x = torch.randn(n, features, generator=gen, dtype=torch.float64)
        data.append(Data(pos=pos.to(dtype), x=x.to(dtype)))
    return Batch.from_data_list(data)


class TestPCACanonicalizer(CanonicalizerContract):
    def make_canonicalizer(self, dtype):
        return PCACanonicalizer()

    def make_data(self, dtype, generator):
        return random_clouds(dtype, generator)


class TestCenterOfMass(CanonicalizerContract):
    def make_canonicalizer(self, dtype):
        return CenterOfMass()

    def make_data(self, dtype, generator):
        return random_clouds(dtype, generator)


def _is_rotation(r):
    eye = torch.eye(3, dtype=r.dtype)
    return bool(
        torch.isfinite(r).all()
        and (r.transpose(-1, -2) @ r - eye).abs().max() < 1e-9
        and (torch.linalg.det(r) - 1).abs().max() < 1e-9
    )


@pytest.mark.parametrize(
    "pos",
    [
        [[0.3, -0.2, 1.0]],  # one atom
        [[0.0, 0.0, 0.0], [1.1, 0.0, 0.0]],  # two atoms
        [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.5, 2.5, 2.5]],  # collinear
        [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.5, 0.0]],  # planar
        # methane: tetrahedral, three equal principal moments, zero third moments
        [
            [0, 0, 0],
            [0.63, 0.63, 0.63],
            [-0.63, -0.63, 0.63],
            [-0.63, 0.63, -0.63],
            [0.63, -0.63, -0.63],
        ],
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],  # coincident atoms
    ],
    ids=["one-atom", "two-atoms", "collinear", "planar", "methane", "coincident"],
)
def test_pca_degenerate_inputs_give_valid_rotations(pos):
    data = Batch.from_data_list([Data(pos=torch.tensor(pos, dtype=torch.float64))])
    out = PCACanonicalizer()(data)
    assert _is_rotation(out.element)
    assert torch.isfinite(out.canonical.pos).all()
    # the canonical pose is still a rigid motion of the centred input
    centred = data.pos - data.pos.mean(0)
    assert torch.allclose(
        torch.cdist(out.canonical.pos, out.canonical.pos), torch.cdist(centred, centred), atol=1e-9
    )


def test_pca_planar_molecule_lies_in_the_first_two_axes(gen):
    pos = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    pos[:, 2] = 0.0
    pos = pos * torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)
    r = SO3().random(1, generator=gen, dtype=torch.float64)[0]
    data = Batch.from_data_list([Data(pos=pos @ r.T)])
    canon = PCACanonicalizer()(data).canonical.pos
    assert canon[:, 2].abs().max() < 1e-9  # smallest axis is the plane normal
    assert canon[:, 0].var() > canon[:, 1].var()


def test_gradients_reach_the_data_through_pca(gen):
    data = random_clouds(torch.float64, gen)
    data.pos.requires_grad_(True)
    out = PCACanonicalizer()(data)
    out.canonical.pos.pow(2).sum().backward()
    assert data.pos.grad is not None and torch.isfinite(data.pos.grad).all()


def test_identity_returns_input_and_identity_elements(gen):
    data = random_clouds(torch.float64, gen)
    out = Identity()(data)
    assert out.canonical is data and out.element.shape == (3,)
    out = Identity(SO3())(data)
    assert torch.equal(out.element, SO3().identity(3, dtype=torch.float64))


def test_identity_is_not_rotation_invariant(gen):
    """Negative control on the checker itself: no canonicalization, no invariance."""
    data = random_clouds(torch.float64, gen)
    with pytest.raises(AssertionError, match="invariance error"):
        assert_canonicalizer(Identity(SO3()), data, generator=gen, check_element=False)


def test_frozen_rejects_non_canonicalizers():
    with pytest.raises(TypeError, match="Canonicalizer"):
        frozen(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("bad", ["nan", "shape", "empty", "type"])
def test_point_cloud_canonicalizers_reject_bad_input(bad):
    canon = PCACanonicalizer()
    if bad == "nan":
        data = Batch.from_data_list([Data(pos=torch.tensor([[0.0, float("nan"), 0.0]] * 2))])
        with pytest.raises(ValueError, match="non-finite"):
            canon(data)
    elif bad == "shape":
        with pytest.raises(ValueError, match=r"\[N, 3\]"):
            canon(Batch.from_data_list([Data(pos=torch.zeros(3, 2))]))
    elif bad == "empty":
        with pytest.raises(ValueError, match="empty"):
            canon(Data(pos=torch.zeros(0, 3)))
    else:
        with pytest.raises(TypeError, match="Data/Batch"):
            canon(torch.zeros(2, 5, 3))


def _ring(radius, height, count, phase=0.0):
    k = torch.arange(count, dtype=torch.float64)
    angle = phase + 2 * torch.pi * k / count
    return torch.stack([radius * angle.cos(), radius * angle.sin(), torch.full_like(k, height)], -1)


def test_pca_symmetric_tops_keep_their_unique_axis(gen):
    """Equal eigenvalues: the unique principal axis stays (e3 for an oblate top, e1 for a
    prolate one), the others point through an atom."""
    benzene = torch.cat([_ring(1.39, 0.0, 6), _ring(2.47, 0.0, 6)])  # l1 = l2
    carbons = torch.tensor([[0.0, 0, -0.765], [0, 0, 0.765]], dtype=torch.float64)
    ethane = torch.cat([carbons, _ring(1.02, 1.16, 3), _ring(1.02, -1.16, 3, torch.pi / 3)])
    r = SO3().random(2, generator=gen, dtype=torch.float64)
    data = Batch.from_data_list([Data(pos=benzene @ r[0].T), Data(pos=ethane @ r[1].T)])
    out = PCACanonicalizer()(data)
    assert _is_rotation(out.element)
    flat, top = out.canonical.pos[:12], out.canonical.pos[12:]
    assert flat[:, 2].abs().max() < 1e-9  # e3 is the ring's normal
    assert (flat[:, 1].abs() < 1e-9).any()  # e1 through an atom
    assert top[:2, 1:].abs().max() < 1e-9  # e1 is the C-C axis
    assert (top[2:, 2].abs() < 1e-9).any()  # e2 through an atom
