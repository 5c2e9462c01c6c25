"""Tests of the EDM molecule metrics and the XYZ/SDF export on hand-built molecules."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import numpy as np
import pytest

from canonwrap.metrics import (
    ALLOWED_VALENCES,
    SUPPORTED_ELEMENTS,
    bond_order_matrix,
    build_molecule,
    canonicalize_smiles,
    check_stability,
    check_validity,
    evaluate,
    get_bond_order,
    mol_to_smiles,
    read_xyz,
    write_sdf,
    write_xyz,
)

HAS_RDKIT = importlib.util.find_spec("rdkit") is not None
needs_rdkit = pytest.mark.skipif(not HAS_RDKIT, reason="RDKit not installed")

# ----------------------------------------------------------------------------------------------
# geometries (Angstrom)
# ----------------------------------------------------------------------------------------------
_T = 1.09 / math.sqrt(3.0)  # tetrahedral C-H of 1.09 A


def methane() -> tuple[np.ndarray, np.ndarray]:
    z = np.array([6, 1, 1, 1, 1])
    pos = np.array([[0, 0, 0], [_T, _T, _T], [-_T, -_T, _T], [-_T, _T, -_T], [_T, -_T, -_T]])
    return z, pos.astype(float)


def ethanol() -> tuple[np.ndarray, np.ndarray]:
    """MMFF-optimised ethanol: C-C 1.515, C-O 1.420, C-H 1.094, O-H 0.972."""
    rows = [
        (6, -0.8544, 0.2235, 0.1943),
        (6, 0.3871, -0.3585, -0.4489),
        (8, 1.5316, 0.3843, -0.0548),
        (1, -1.7476, -0.3278, -0.1126),
        (1, -0.9749, 1.2758, -0.0833),
        (1, -0.7771, 0.1892, 1.2860),
        (1, 0.5283, -1.4032, -0.1555),
        (1, 0.3103, -0.3138, -1.5392),
        (1, 1.5966, 0.3305, 0.9140),
    ]
    arr = np.array(rows)
    return arr[:, 0].astype(int), arr[:, 1:]


def water() -> tuple[np.ndarray, np.ndarray]:
    half = math.radians(104.5) / 2
    r = 0.9572
    pos = np.array(
        [
            [0, 0, 0],
            [r * math.sin(half), r * math.cos(half), 0],
            [-r * math.sin(half), r * math.cos(half), 0],
        ]
    )
    return np.array([8, 1, 1]), pos


def hydrogen_cyanide() -> tuple[np.ndarray, np.ndarray]:
    return np.array([1, 6, 7]), np.array([[0, 0, -1.066], [0, 0, 0], [0, 0, 1.156]])


def benzene(a: float, b: float | None = None, ch: float = 1.09) -> tuple[np.ndarray, np.ndarray]:
    """Planar C6H6 with 120 degree angles and ring bonds alternating ``a``, ``b``."""
    b = a if b is None else b
    ring = [np.zeros(2)]
    for k in range(5):
        step = a if k % 2 == 0 else b
        angle = math.radians(60 * k)
        ring.append(ring[-1] + step * np.array([math.cos(angle), math.sin(angle)]))
    c = np.array(ring)
    c -= c.mean(axis=0)  # every vertex lies on a mirror line through the centre
    h = c + ch * c / np.linalg.norm(c, axis=1, keepdims=True)
    pos = np.zeros((12, 3))
    pos[:6, :2] = c
    pos[6:, :2] = h
    return np.array([6] * 6 + [1] * 6), pos


def broken_methane() -> tuple[np.ndarray, np.ndarray]:
    """Methane with two hydrogens pulled 8-9 A away: CH2 + H + H."""
    z, pos = methane()
    pos = pos.copy()
    pos[3] = [8.0, 0.0, 0.0]
    pos[4] = [0.0, 9.0, 0.0]
    return z, pos


def ch5() -> tuple[np.ndarray, np.ndarray]:
    """Pentavalent carbon (trigonal bipyramid, C-H 1.09 A): over-bonded, invalid."""
    r = 1.09
    pos = [[0, 0, 0], [0, 0, r], [0, 0, -r]]
    for k in range(3):
        ang = 2 * math.pi * k / 3
        pos.append([r * math.cos(ang), r * math.sin(ang), 0])
    return np.array([6, 1, 1, 1, 1, 1]), np.array(pos)


def rotated(mol: tuple[np.ndarray, np.ndarray], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return mol[0], mol[1] @ q.T + rng.normal(size=3) * 5


# ----------------------------------------------------------------------------------------------
# bond orders and stability (NumPy only)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("a1", "a2", "dist", "order"),
    [
        ("C", "H", 1.09, 1),
        ("C", "C", 1.54, 1),
        ("C", "C", 1.639, 1),  # 163.9 < 154 + 10
        ("C", "C", 1.64, 0),  # strict inequality
        ("C", "C", 1.397, 1),  # aromatic length: 139.7 is not < 134 + 5
        ("C", "C", 1.38, 2),
        ("C", "C", 1.34, 2),
        ("C", "C", 1.20, 3),
        (6, 8, 1.21, 2),  # atomic numbers accepted
        ("C", "N", 1.156, 3),
        ("O", "H", 0.96, 1),
        ("H", "H", 0.74, 1),
        ("H", "H", 1.78, 0),
        ("B", "C", 1.50, 0),  # pair missing from the single-bond table
        ("C", "S", 1.60, 2),  # symmetric C-S double bond
        ("S", "C", 1.60, 2),
    ],
)
def test_get_bond_order_known_values(a1, a2, dist, order):
    assert get_bond_order(a1, a2, dist) == order


def test_get_bond_order_is_symmetric_and_matches_matrix():
    rng = np.random.default_rng(1)
    for z1 in SUPPORTED_ELEMENTS:
        for z2 in SUPPORTED_ELEMENTS:
            for d in rng.uniform(0.9, 2.8, 5):
                assert get_bond_order(z1, z2, d) == get_bond_order(z2, z1, d)
    z = rng.choice(SUPPORTED_ELEMENTS, 10)
    pos = rng.normal(size=(10, 3))
    mat = bond_order_matrix(z, pos)
    assert (mat == mat.T).all() and (np.diag(mat) == 0).all()
    for i in range(10):
        for j in range(10):
            if i != j:
                d = float(np.linalg.norm(pos[i] - pos[j]))
                assert mat[i, j] == get_bond_order(int(z[i]), int(z[j]), d)


def test_get_bond_order_rejects_bad_distance():
    with pytest.raises(ValueError, match="finite non-negative"):
        get_bond_order("C", "C", float("nan"))
    with pytest.raises(ValueError, match="finite non-negative"):
        get_bond_order("C", "C", -1.0)


def test_allowed_valences_qm9():
    assert {s: ALLOWED_VALENCES[s] for s in "HCNOF"} == {
        "H": (1,),
        "C": (4,),
        "N": (3,),
        "O": (2,),
        "F": (1,),
    }


@pytest.mark.parametrize(
    ("mol", "expected"),
    [
        (methane(), (True, 5, 5)),
        (ethanol(), (True, 9, 9)),
        (water(), (True, 3, 3)),
        (hydrogen_cyanide(), (True, 3, 3)),
        (benzene(1.34, 1.46), (True, 12, 12)),  # Kekule geometry: C=C, C-C alternate
        (benzene(1.397), (False, 6, 12)),  # real benzene: all ring bonds single, C valence 3
        (broken_methane(), (False, 2, 5)),  # C valence 2, lone H valence 0
        (ch5(), (False, 5, 6)),  # C valence 5
    ],
)
def test_check_stability(mol, expected):
    assert check_stability(*mol) == expected
    assert check_stability(*rotated(mol)) == expected


def test_benzene_bond_orders():
    ring = bond_order_matrix(*benzene(1.397))[:6, :6]
    assert sorted(ring[ring > 0].tolist()) == [1] * 12
    ring = bond_order_matrix(*benzene(1.34, 1.46))[:6, :6]
    assert sorted(ring[ring > 0].tolist()) == [1] * 6 + [2] * 6
    ring = bond_order_matrix(*benzene(1.38))[:6, :6]
    assert sorted(ring[ring > 0].tolist()) == [2] * 12


# ----------------------------------------------------------------------------------------------
# validity and SMILES (RDKit)
# ----------------------------------------------------------------------------------------------
@needs_rdkit
@pytest.mark.parametrize(
    ("mol", "smiles_h", "smiles", "connected"),
    [
        (methane(), "[H]C([H])([H])[H]", "C", True),
        (ethanol(), "[H]OC([H])([H])C([H])([H])[H]", "CCO", True),
        (water(), "[H]O[H]", "O", True),
        (hydrogen_cyanide(), "[H]C#N", "C#N", True),
        (benzene(1.34, 1.46), "[H]c1c([H])c([H])c([H])c([H])c1[H]", "c1ccccc1", True),
        # all-single ring: RDKit adds one implicit H per carbon -> cyclohexane
        (benzene(1.397), "[H]C1C([H])C([H])C([H])C([H])C1[H]", "C1CCCCC1", True),
        # CH2 (+2 implicit H) is the largest of three fragments
        (broken_methane(), "[H]C[H]", "C", False),
        (ch5(), None, None, False),
        (benzene(1.38), None, None, False),  # six C=C: carbon valence 5
    ],
)
def test_check_validity(mol, smiles_h, smiles, connected):
    assert check_validity(*mol) == (smiles_h, connected)
    assert check_validity(*mol, remove_hs=True) == (smiles, connected)
    assert check_validity(*rotated(mol, seed=3)) == (smiles_h, connected)


@needs_rdkit
def test_build_molecule_and_mol_to_smiles():
    z, pos = ethanol()
    mol = build_molecule(z, pos)
    assert mol.GetNumAtoms() == 9 and mol.GetNumBonds() == 8
    assert [a.GetAtomicNum() for a in mol.GetAtoms()] == z.tolist()
    np.testing.assert_allclose(mol.GetConformer().GetPositions(), pos)
    assert build_molecule(z, pos, add_conformer=False).GetNumConformers() == 0
    assert mol_to_smiles(mol, remove_hs=True) == "CCO"
    assert mol_to_smiles(mol) == canonicalize_smiles("OCC")
    assert mol_to_smiles(build_molecule(*broken_methane()), remove_hs=True) == "C.[HH].[HH]"
    assert mol_to_smiles(build_molecule(*ch5())) is None


@needs_rdkit
def test_canonicalize_smiles():
    assert canonicalize_smiles("OCC", remove_hs=True) == "CCO"
    assert canonicalize_smiles("C[C@H](N)O", remove_hs=True) == "CC(N)O"
    assert canonicalize_smiles("C1=CC=CC=C1") == "[H]c1c([H])c([H])c([H])c([H])c1[H]"
    assert canonicalize_smiles("not a smiles") is None


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------
def _sample() -> list[tuple[np.ndarray, np.ndarray]]:
    return [methane(), rotated(methane()), ethanol(), broken_methane(), ch5()]


@needs_rdkit
def test_evaluate_counts_and_fractions():
    out = evaluate(_sample())
    assert out["n_molecules"] == 5
    assert out["n_atoms"] == 30
    assert out["n_stable_atoms"] == 5 + 5 + 9 + 2 + 5
    assert out["atom_stability"] == pytest.approx(26 / 30)
    # the 4 unstable atoms: CH5's carbon has 5 bonds (over); the broken methane's carbon has
    # 2 and its two detached hydrogens 0 (under)
    assert (out["n_over_valence"], out["n_under_valence"]) == (1, 3)
    assert out["atom_over_valence"] == pytest.approx(1 / 30)
    assert out["atom_under_valence"] == pytest.approx(3 / 30)
    assert out["mol_stability"] == pytest.approx(3 / 5)
    assert out["n_valid"] == 4 and out["validity"] == pytest.approx(4 / 5)
    assert out["n_connected"] == 3 and out["connected_validity"] == pytest.approx(3 / 5)
    # valid SMILES: methane twice, ethanol, "[H]C[H]" (broken) -> 3 distinct of 4
    assert out["n_unique"] == 3 and out["uniqueness"] == pytest.approx(3 / 4)
    assert out["novelty"] is None and out["n_novel"] is None


@needs_rdkit
def test_evaluate_atom_stability_se_treats_molecules_as_the_unit():
    """The SE of atom stability is the ratio estimator's over molecules: computed here from
    each molecule's (stable, atoms) by check_stability, and checked against a bootstrap over
    molecules; the binomial SE over atoms (control) understates it for these clustered
    failures."""
    mols = _sample() * 4
    out = evaluate(mols)
    counts = np.array([check_stability(z, pos)[1:] for z, pos in mols], dtype=float)
    s, n = counts[:, 0], counts[:, 1]
    r = s.sum() / n.sum()
    m = len(mols)
    expected = np.sqrt(((s - r * n) ** 2).sum() / (m * (m - 1))) / n.mean()
    assert out["atom_stability_se"] == pytest.approx(expected, rel=1e-12)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, m, size=(20_000, m))
    boot = s[picks].sum(1) / n[picks].sum(1)
    assert out["atom_stability_se"] == pytest.approx(boot.std(), rel=0.05)
    binomial = np.sqrt(r * (1 - r) / n.sum())
    assert out["atom_stability_se"] > 1.3 * binomial
    assert evaluate([methane()])["atom_stability_se"] is None


@needs_rdkit
def test_evaluate_remove_hs_merges_hydrogen_variants():
    out = evaluate(_sample(), remove_hs=True)
    # "C", "C", "CCO", "C" -> 2 distinct of 4
    assert out["uniqueness"] == pytest.approx(2 / 4)


@needs_rdkit
def test_evaluate_novelty():
    train = ["C", "OCC", "c1ccccc1"]
    out = evaluate(_sample(), train_smiles=train)
    assert out["n_novel"] == 1  # only "[H]C[H]" is not a training molecule
    assert out["novelty"] == pytest.approx(1 / 3)
    raw = evaluate(_sample(), train_smiles=train, canonicalize_train=False)
    assert raw["novelty"] == pytest.approx(1.0)  # EDM-style raw string comparison
    raw = evaluate(_sample(), train_smiles=["[H]C([H])([H])[H]"], canonicalize_train=False)
    assert raw["novelty"] == pytest.approx(2 / 3)
    no_h = evaluate(_sample(), train_smiles=iter(["C"]), remove_hs=True)
    assert no_h["novelty"] == pytest.approx(1 / 2)  # {"C", "CCO"} -> "CCO" is novel


@needs_rdkit
def test_evaluate_accepts_tensors_generators_and_progress():
    torch = pytest.importorskip("torch")
    z, pos = ethanol()
    mols = ((torch.tensor(z), torch.tensor(pos, dtype=torch.float32)) for _ in range(2))
    out = evaluate(mols, progress=True)
    assert out["mol_stability"] == 1.0 and out["validity"] == 1.0
    assert out["uniqueness"] == pytest.approx(0.5)


@needs_rdkit
def test_evaluate_all_invalid_follows_edm():
    out = evaluate([ch5()], train_smiles=["C"])
    assert out["validity"] == 0.0 and out["uniqueness"] == 0.0 and out["novelty"] == 0.0


@needs_rdkit
@pytest.mark.parametrize(
    ("molecules", "match"),
    [
        ([], "at least one molecule"),
        ([(np.array([6, 1]), np.zeros((3, 3)))], r"molecule 0: 2 atomic numbers but 3"),
        ([methane(), (np.array([6]), np.zeros((1, 2)))], r"molecule 1: positions must have shape"),
        ([(np.array([[6]]), np.zeros((1, 3)))], "atomic numbers must have shape"),
        ([(np.array([6, 1]), np.array([[0, 0, 0], [np.nan, 0, 0]]))], "NaN"),
        ([(np.array([26, 6]), np.zeros((2, 3)))], r"unsupported atomic number\(s\) 26 \(Fe\)"),
        ([(np.array([0]), np.zeros((1, 3)))], "unsupported atomic number"),
        ([(np.array([6.5]), np.zeros((1, 3)))], "must be integers"),
        ([(np.array([], dtype=int), np.zeros((0, 3)))], "no atoms"),
        ([np.zeros((3, 3))], "expected a pair"),
    ],
)
def test_evaluate_errors(molecules, match):
    with pytest.raises(ValueError, match=match):
        evaluate(molecules)


@needs_rdkit
def test_evaluate_rejects_string_train_smiles():
    with pytest.raises(TypeError, match="not one string"):
        evaluate([methane()], train_smiles="CCO")


def test_check_stability_errors_without_rdkit():
    with pytest.raises(ValueError, match="unsupported atomic number"):
        check_stability([6, 92], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN/Inf"):
        check_stability([6], [[np.inf, 0.0, 0.0]])
    assert check_stability(np.array([6.0, 1.0]), [[0, 0, 0], [0, 0, 5.0]]) == (False, 0, 2)


def test_missing_rdkit_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "rdkit", None)
    monkeypatch.setitem(sys.modules, "rdkit.Chem", None)
    with pytest.raises(ImportError, match=r"pip install canonwrap\[molecules\]"):
        build_molecule(*methane())
    with pytest.raises(ImportError, match=r"canonwrap\[molecules\]"):
        evaluate([methane()])
    assert check_stability(*methane()) == (True, 5, 5)  # stability needs no RDKit


def test_importing_metrics_does_not_import_rdkit():
    code = "import sys, canonwrap.metrics; assert 'rdkit' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------
def test_xyz_round_trip(tmp_path):
    mols = [methane(), ethanol(), (np.array([26, 8]), np.array([[0.0, 0, 0], [0, 0, 1.6]]))]
    path = tmp_path / "mols.xyz"
    assert write_xyz(path, mols, comments=["a", "b", "iron oxide"]) == 3
    text = path.read_text().splitlines()
    assert text[0] == "5" and text[1] == "a" and text[2].startswith("C ")
    back = read_xyz(path)
    assert len(back) == 3
    for (z, pos), (z2, pos2) in zip(mols, back):
        assert z2.dtype == np.int64 and z2.tolist() == list(z)
        np.testing.assert_allclose(pos2, pos, atol=1e-6)
    assert check_stability(*back[1]) == (True, 9, 9)


def test_xyz_reader_variants_and_errors(tmp_path):
    path = tmp_path / "v.xyz"
    path.write_text("2\nwater-ish\no 0 0 0\n1 0 0 0.96 extra\n\n1\n\ncl 1 2 3\n")
    (z1, p1), (z2, p2) = read_xyz(path)
    assert z1.tolist() == [8, 1] and z2.tolist() == [17]
    np.testing.assert_allclose(p2, [[1, 2, 3]])
    path.write_text("3\ncomment\nC 0 0 0\n")
    with pytest.raises(ValueError, match="ends too early"):
        read_xyz(path)
    path.write_text("1\n\nQq 0 0 0\n")
    with pytest.raises(ValueError, match="line 3: unknown element 'Qq'"):
        read_xyz(path)
    with pytest.raises(ValueError, match="single line"):
        write_xyz(tmp_path / "x.xyz", [methane()], comments=["two\nlines"])
    with pytest.raises(ValueError, match="NaN"):
        write_xyz(tmp_path / "x.xyz", [(np.array([6]), np.array([[np.nan, 0, 0]]))])


@needs_rdkit
def test_sdf_written_and_read_back(tmp_path):
    from rdkit import Chem

    mols = [ethanol(), ch5(), benzene(1.34, 1.46)]
    path = tmp_path / "mols.sdf"
    assert write_sdf(path, mols, names=["ethanol", "ch5", "benzene"]) == 3

    raw = list(Chem.SDMolSupplier(str(path), sanitize=False, removeHs=False))
    assert [m.GetProp("_Name") for m in raw] == ["ethanol", "ch5", "benzene"]
    assert [m.GetIntProp("canonwrap_sanitized") for m in raw] == [1, 0, 1]
    for (z, pos), m in zip(mols, raw):
        assert [a.GetAtomicNum() for a in m.GetAtoms()] == list(z)
        np.testing.assert_allclose(m.GetConformer().GetPositions(), pos, atol=1e-4)
    assert raw[1].GetNumBonds() == 5  # the invalid molecule keeps its inferred bonds

    clean = list(Chem.SDMolSupplier(str(path), removeHs=False))
    assert clean[1] is None  # over-bonded carbon does not sanitize
    assert Chem.MolToSmiles(Chem.RemoveHs(clean[0])) == "CCO"
    assert Chem.MolToSmiles(Chem.RemoveHs(clean[2])) == "c1ccccc1"
