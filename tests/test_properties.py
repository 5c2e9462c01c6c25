"""Property-based tests (hypothesis) over random molecules and images."""

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch_geometric.data import Batch, Data

from canonwrap.canonicalizers import EGNNCanonicalizer, PCACanonicalizer
from canonwrap.data.qm9 import qm9_features
from canonwrap.groups import SO3
from canonwrap.metrics import evaluate

ELEMENTS = [1, 6, 7, 8, 9]
SETTINGS = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def molecules(draw, min_atoms=1, max_atoms=12):
    n = draw(st.integers(min_atoms, max_atoms))
    z = draw(st.lists(st.sampled_from(ELEMENTS), min_size=n, max_size=n))
    coords = draw(
        st.lists(st.floats(-4, 4, allow_nan=False, allow_infinity=False),
                 min_size=3 * n, max_size=3 * n)
    )
    pos = np.array(coords, dtype=np.float64).reshape(n, 3)
    # an irrational-looking offset keeps distances off the bond-length thresholds, which
    # hypothesis's favourite round numbers (e.g. exactly 1.5 A) would otherwise hit
    pos = pos + 1e-4 * np.sin(np.arange(3 * n) * 1.7 + 0.3).reshape(n, 3)
    return np.array(z), pos


def _batch(mols):
    data = []
    for z, pos in mols:
        zt = torch.as_tensor(z)
        data.append(Data(z=zt, pos=torch.as_tensor(pos), x=qm9_features(zt).double()))
    return Batch.from_data_list(data)


def _valid_rotations(r):
    eye = torch.eye(3, dtype=r.dtype)
    return (
        torch.isfinite(r).all()
        and (r.transpose(-1, -2) @ r - eye).abs().max() < 1e-8
        and (torch.linalg.det(r) - 1).abs().max() < 1e-8
    )


@SETTINGS
@given(st.lists(molecules(), min_size=1, max_size=4))
def test_pca_always_returns_rotations_and_rigid_poses(mols):
    batch = _batch(mols)
    out = PCACanonicalizer()(batch)
    assert _valid_rotations(out.element)
    assert torch.isfinite(out.canonical.pos).all()
    # canonical pose is a rigid motion of the centred input: distances are kept
    for i in range(len(mols)):
        a = out.canonical.pos[batch.batch == i]
        b = batch.pos[batch.batch == i]
        assert torch.allclose(torch.cdist(a, a), torch.cdist(b, b), atol=1e-8)


_EGNN = EGNNCanonicalizer(num_features=6, hidden=16, layers=2).double()


@SETTINGS
@given(st.lists(molecules(), min_size=1, max_size=3))
def test_egnn_canonicalizer_is_finite_with_finite_gradients(mols):
    batch = _batch(mols)
    batch.pos.requires_grad_(True)
    out = _EGNN(batch)
    assert _valid_rotations(out.element.detach())
    out.canonical.pos.pow(2).sum().backward()
    assert torch.isfinite(batch.pos.grad).all()
    for p in _EGNN.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    _EGNN.zero_grad()


@SETTINGS
@given(molecules(min_atoms=3, max_atoms=9), st.integers(0, 2**31 - 1))
def test_egnn_canonical_pose_is_invariant_on_generic_molecules(mol, seed):
    z, pos = mol
    # spread atoms apart so the molecule is generic (no symmetry, no coincident atoms)
    pos = pos + np.arange(len(z))[:, None] * np.array([[0.37, 0.11, -0.23]])
    batch = _batch([(z, pos)])
    gen = torch.Generator().manual_seed(seed)
    r = SO3().random(1, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        a = _EGNN(batch).canonical.pos
        b = _EGNN(SO3().act(r, batch)).canonical.pos
        u = _EGNN.vectors(batch)
    # only molecules whose two frame vectors are well separated have a stable frame
    e1 = u[0, :, 0] / u[0, :, 0].norm().clamp_min(1e-300)
    cross = torch.linalg.cross(e1, u[0, :, 1]).norm()
    if u[0, :, 0].norm() > 1e-3 and cross > 1e-3:
        assert (a - b).abs().max() < 1e-7


@SETTINGS
@given(st.lists(molecules(), min_size=1, max_size=5))
def test_metrics_are_fractions_and_rotation_invariant(mols):
    res = evaluate(mols)
    for key in ("atom_stability", "mol_stability", "validity", "connected_validity",
                "uniqueness"):
        assert 0.0 <= res[key] <= 1.0
    r = SO3().random(1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)[0]
    rotated = [(z, pos @ r.numpy().T) for z, pos in mols]
    res2 = evaluate(rotated)
    assert res2["atom_stability"] == res["atom_stability"]
    assert res2["validity"] == res["validity"]
