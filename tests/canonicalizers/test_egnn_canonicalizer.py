"""The learned multi-channel EGNN canonicalizer: contract, degenerate inputs, training."""

from __future__ import annotations

import math

import pytest
import torch
from torch_geometric.data import Batch, Data

from canonwrap.canonicalizers import EGNNCanonicalizer
from canonwrap.canonicalizers.egnn import frame_from_vectors
from canonwrap.testing import assert_canonicalizer
from tests.canonicalizers.common import CanonicalizerContract
from tests.nn.test_gnn import random_molecules


def _canon(dtype=torch.float64, **kw) -> EGNNCanonicalizer:
    torch.manual_seed(0)
    kw = {"num_features": 6, "hidden": 16, "layers": 3, "vector_channels": 4} | kw
    return EGNNCanonicalizer(**kw).to(dtype)


def _molecule(pos: torch.Tensor, generator: torch.Generator) -> Data:
    n = pos.shape[0]
    x = torch.zeros(n, 6, dtype=pos.dtype)
    x[torch.arange(n), torch.randint(0, 5, (n,), generator=generator)] = 0.25
    x[:, 5] = 0.6
    return Data(pos=pos - pos.mean(0), x=x)


def _collinear(n: int, generator: torch.Generator, dtype=torch.float64) -> Data:
    axis = torch.randn(3, generator=generator, dtype=torch.float64)
    s = torch.randn(n, 1, generator=generator, dtype=torch.float64)
    return _molecule((s * axis / axis.norm()).to(dtype), generator)


def _planar(n: int, generator: torch.Generator, dtype=torch.float64) -> Data:
    basis = torch.linalg.qr(torch.randn(3, 2, generator=generator, dtype=torch.float64))[0]
    coef = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return _molecule((coef @ basis.T).to(dtype), generator)


def _assert_rotations(r: torch.Tensor, atol: float) -> None:
    eye = torch.eye(3, dtype=r.dtype)
    assert torch.isfinite(r).all()
    assert (r.transpose(-1, -2) @ r - eye).abs().max() <= atol
    assert (torch.linalg.det(r) - 1).abs().max() <= atol


class TestEGNNCanonicalizer(CanonicalizerContract):
    def make_canonicalizer(self, dtype):
        return _canon(dtype)

    def make_data(self, dtype, generator):
        sizes = torch.randint(3, 10, (5,), generator=generator).tolist()
        return random_molecules(sizes, dtype=dtype, generator=generator)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_element_is_a_rotation(dtype, atol):
    data = random_molecules([3, 5, 9], dtype=dtype, generator=torch.Generator().manual_seed(0))
    out = _canon(dtype)(data)
    assert out.prior_loss is None
    _assert_rotations(out.element, atol)


def test_planar_molecules_exactly_equivariant():
    gen = torch.Generator().manual_seed(1)
    data = Batch.from_data_list([_planar(n, gen) for n in (3, 4, 7)])
    assert_canonicalizer(_canon(), data, atol=1e-9, generator=gen)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_collinear_molecules_valid_and_canonical_pose_invariant(dtype, atol):
    """No equivariant frame exists; the frame is valid and the canonical pose invariant."""
    gen = torch.Generator().manual_seed(2)
    data = Batch.from_data_list([_collinear(n, gen, dtype) for n in (2, 3, 6)])
    canon = _canon(dtype)
    _assert_rotations(canon(data).element, 1e-5 if dtype == torch.float32 else 1e-12)
    assert_canonicalizer(canon, data, atol=atol, generator=gen, check_element=False)


def test_degenerate_inputs_give_rotations_and_finite_gradients():
    gen = torch.Generator().manual_seed(3)
    z = torch.zeros
    graphs = [
        _molecule(torch.randn(1, 3, generator=gen, dtype=torch.float64), gen),  # one atom
        _molecule(torch.randn(2, 3, generator=gen, dtype=torch.float64), gen),  # two atoms
        _collinear(5, gen),
        _planar(6, gen),
        _molecule(z(3, 3, dtype=torch.float64), gen),  # all atoms coincident
        _molecule(torch.tensor([[0.0, 0, 0], [0, 0, 0], [1e-9, 0, 0]]).double(), gen),  # ~zero
        _molecule(torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 1, 0]]).double(), gen),  # 2 coincide
    ]
    data = Batch.from_data_list(graphs)
    data.pos.requires_grad_(True)
    canon = _canon()
    out = canon(data)
    _assert_rotations(out.element, 1e-12)
    assert torch.isfinite(out.canonical.pos).all()
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(out.element[0], eye)  # one atom: identity frame
    assert torch.allclose(out.element[4], eye)  # coincident atoms: identity frame
    loss = out.canonical.pos[:, 0].pow(3).sum() + out.element[:, :, :2].sum()
    loss.backward()
    assert torch.isfinite(data.pos.grad).all()
    for name, p in canon.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_frame_from_vectors_fallbacks():
    u1 = torch.tensor([[0.0, 0, 0], [1e-9, 0, 0], [0, 2.0, 0], [1.0, 1, 1], [3.0, 0, 4]])
    u2 = torch.tensor([[1.0, 2, 3], [0, 1.0, 0], [0, -5.0, 0], [2.0, 2, 2], [0, 0, 0]])
    u1, u2 = u1.double().requires_grad_(True), u2.double().requires_grad_(True)
    r = frame_from_vectors(u1, u2)
    _assert_rotations(r, 1e-12)
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(r[0, :, 0], eye[0]) and torch.allclose(r[1, :, 0], eye[0])
    assert torch.allclose(r[2, :, 0], eye[1])  # e1 follows u1 even when u2 is parallel
    assert torch.allclose(r[3, :, 0], torch.ones(3, dtype=torch.float64) / 3**0.5)
    assert torch.allclose(r[4, :, 0], torch.tensor([0.6, 0, 0.8], dtype=torch.float64))
    r.sum().backward()
    assert torch.isfinite(u1.grad).all() and torch.isfinite(u2.grad).all()
    # generic vectors: e1 along u1, e2 in span(u1, u2) with positive u2 component
    a, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    r = frame_from_vectors(a, b)
    assert torch.allclose(r[:, :, 0], a / a.norm(dim=-1, keepdim=True))
    assert ((r[:, :, 1] * b).sum(-1) > 0).all()
    assert (r[:, :, 2] * b).sum(-1).abs().max() < 1e-12


def test_gradients_reach_parameters_and_a_step_changes_the_pose():
    data = random_molecules([4, 6, 8], generator=torch.Generator().manual_seed(4))
    canon = _canon()
    opt = torch.optim.SGD(canon.parameters(), lr=1e-2)
    before = canon(data).canonical.pos.detach()
    # a pose-dependent loss (an invariant one such as |pos|^2 would not depend on R)
    loss = canon(data).canonical.pos[:, 0].pow(2).sum()
    loss.backward()
    grads = {n: p.grad for n, p in canon.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0
    assert grads["egnn.embedding_out.weight"].abs().sum() > 0
    opt.step()
    assert (canon(data).canonical.pos - before).abs().max() > 0


def test_no_cross_graph_leakage_and_feature_checks():
    gen = torch.Generator().manual_seed(5)
    data = random_molecules([3, 5, 4], generator=gen)
    canon = _canon()
    other = data.clone()
    middle = other.batch == 1
    other.pos[middle] = other.pos[middle] * 2.0
    a, b = canon(data), canon(other)
    assert torch.equal(a.element[[0, 2]], b.element[[0, 2]])
    assert not torch.allclose(a.element[1], b.element[1])
    with pytest.raises(ValueError, match="x"):
        _canon(num_features=5)(data)
    no_x = Batch.from_data_list([Data(pos=g.pos) for g in data.to_data_list()])
    assert_canonicalizer(_canon(num_features=0), no_x, atol=1e-9, generator=gen)


def test_one_axis_symmetry_keeps_the_learned_first_axis():
    """A C3v molecule pools to parallel vectors: ``e1`` is still ``u1 / |u1|`` (so gradients
    reach the parameters), ``e2`` points to one of the three equivalent atoms."""
    ring = [[math.cos(2 * math.pi * k / 3), math.sin(2 * math.pi * k / 3), 0.0] for k in range(3)]
    pos = torch.tensor([[0.0, 0.0, 0.4]] + ring, dtype=torch.float64)
    pos = pos - pos.mean(0)
    x = torch.zeros(4, 6, dtype=torch.float64)
    x[0, 1], x[1:, 0], x[:, 5] = 0.25, 0.25, 0.6
    data = Batch.from_data_list([Data(pos=pos, x=x)])
    canon = _canon()
    u = canon.vectors(canon.normalize(data))[0]
    sine = torch.linalg.cross(u[:, 0], u[:, 1], dim=0).norm() / u.norm(dim=0).prod()
    assert sine <= 1e-9  # parallel: both on the three-fold axis
    rot = canon(data).element[0]
    assert torch.allclose(rot[:, 0], u[:, 0] / u[:, 0].norm(), atol=1e-12)
    assert torch.allclose(rot[:, 0].abs(), torch.tensor([0.0, 0, 1], dtype=torch.float64))
    perp = pos[1:] - (pos[1:] @ rot[:, 0])[:, None] * rot[:, 0]
    perp = perp / perp.norm(dim=-1, keepdim=True)
    assert (perp - rot[:, 1]).norm(dim=-1).min() <= 1e-12
    data.pos.requires_grad_(True)
    canon(data).canonical.pos[:, 2].pow(2).sum().backward()
    assert canon.egnn.embedding_out.weight.grad.abs().sum() > 0
