"""Molecule quality metrics with the definitions of EDM (Hoogeboom et al., 2022).

Bonds are inferred from interatomic distances with tabulated bond lengths, exactly as in the
E(3) equivariant diffusion model's QM9 evaluation (``qm9/bond_analyze.py`` and
``qm9/analyze.py`` of its reference code). On top of those bonds this module computes

* **atom stability** -- an atom is stable iff the sum of its bond orders equals its allowed
  valence (H 1, C 4, N 3, O 2, F 1);
* **molecule stability** -- every atom of the molecule is stable;
* **validity** -- the RDKit molecule built from the inferred bonds passes ``SanitizeMol``; the
  SMILES of a valid molecule is the canonical SMILES of its largest fragment;
* **connected validity** -- valid and made of a single fragment;
* **uniqueness** -- distinct SMILES among the valid molecules / number of valid molecules;
* **novelty** -- distinct valid SMILES absent from a training list / distinct valid SMILES.

Definitional notes
------------------
Elements
:   Any element with an entry in the single-bond table is accepted: H, B, C, N, O, F, Si, P,
    S, Cl, As, Br, I. The QM9 evaluation only ever sees H, C, N, O, F; for the other elements
    the valences are EDM's own ``allowed_bonds`` values (B 3, Si 4, P 3 or 5, S 4, Cl 1,
    As 3, Br 1, I 1) and the bond rule is the same distance rule (EDM's GEOM evaluation uses
    a different predictor that is not reproduced here). Other atomic numbers raise
    ``ValueError``.
Missing pairs
:   A pair of accepted elements without a single-bond length (for example B--C) never bonds
    (EDM's ``check_exists`` behaviour). All pairs among H, C, N, O, F are tabulated.
Symmetry
:   The tables are symmetric. EDM's double-bond table has C--S but lacks the S--C entry, so
    its result depended on argument order; here C--S may always be double, which is what EDM
    gives when the lighter element comes first, as in its RDKit path (pairs sorted by type).
Distances
:   Computed in float64 and compared in picometres (``100 * distance``) with strict ``<``.
    EDM used the input's precision (often float32); results can differ only for distances
    within rounding error of a threshold.
Implicit hydrogens
:   As in EDM, atoms are created with RDKit's default implicit-hydrogen handling, so
    sanitization fills under-bonded atoms with implicit hydrogens. An under-bonded molecule
    is therefore often *valid* while not stable; only over-bonded atoms (or unkekulizable
    rings) make it invalid.
SMILES
:   By default the SMILES keeps the hydrogen atoms of the 3D structure as explicit ``[H]``
    atoms, which is exactly the string EDM compared (methane is ``[H]C([H])([H])[H]``). With
    ``remove_hs=True`` the hydrogens are removed first (methane is ``C``); molecules that
    EDM counts as distinct (same heavy-atom graph, different split between explicit and
    implicit hydrogens) then merge. Bond orders come only from distances; no chirality or
    double-bond stereo is ever assigned.
Novelty
:   EDM compared raw strings with a training list produced by the same pipeline. Here the
    training SMILES are by default re-written in the same convention (parse, drop stereo,
    add or remove hydrogens, canonical SMILES), so that ordinary dataset SMILES such as
    ``"CCO"`` match; pass ``canonicalize_train=False`` for EDM's raw comparison.
Empty results
:   As in EDM, uniqueness is 0.0 when no molecule is valid and novelty is 0.0 when a
    training list is given but no molecule is valid.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from rdkit import Chem

__all__ = [
    "ALLOWED_VALENCES",
    "MARGINS_PM",
    "SUPPORTED_ELEMENTS",
    "bond_order_matrix",
    "build_molecule",
    "canonicalize_smiles",
    "check_stability",
    "check_validity",
    "evaluate",
    "get_bond_order",
    "mol_to_smiles",
]

_RDKIT_HINT = (
    "RDKit is required for molecule validity, SMILES and SDF export; install it with "
    "`pip install canonwrap[molecules]` (or `pip install rdkit`)."
)

_SYMBOLS: tuple[str, ...] = tuple(
    (
        "X H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga "
        "Ge As Se Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd "
        "Pm Sm Eu Gd Tb Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac "
        "Th Pa U Np Pu Am Cm Bk Cf Es Fm Md No Lr Rf Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts Og"
    ).split()
)
"""Chemical symbols by atomic number (index 0 is a placeholder)."""
_Z_OF: dict[str, int] = {sym: z for z, sym in enumerate(_SYMBOLS) if z > 0}

# Typical bond lengths in picometres (the tables used by EDM, which cite wiredchemist.com and
# chemistry-reference.com). One entry per unordered element pair; symmetrised below.
_SINGLE_PM: dict[tuple[str, str], int] = {
    ("H", "H"): 74, ("H", "C"): 109, ("H", "N"): 101, ("H", "O"): 96, ("H", "F"): 92,
    ("H", "B"): 119, ("H", "Si"): 148, ("H", "P"): 144, ("H", "As"): 152, ("H", "S"): 134,
    ("H", "Cl"): 127, ("H", "Br"): 141, ("H", "I"): 161,
    ("C", "C"): 154, ("C", "N"): 147, ("C", "O"): 143, ("C", "F"): 135, ("C", "Si"): 185,
    ("C", "P"): 184, ("C", "S"): 182, ("C", "Cl"): 177, ("C", "Br"): 194, ("C", "I"): 214,
    ("N", "N"): 145, ("N", "O"): 140, ("N", "F"): 136, ("N", "Cl"): 175, ("N", "Br"): 214,
    ("N", "S"): 168, ("N", "I"): 222, ("N", "P"): 177,
    ("O", "O"): 148, ("O", "F"): 142, ("O", "Br"): 172, ("O", "S"): 151, ("O", "P"): 163,
    ("O", "Si"): 163, ("O", "Cl"): 164, ("O", "I"): 194,
    ("F", "F"): 142, ("F", "S"): 158, ("F", "Si"): 160, ("F", "Cl"): 166, ("F", "Br"): 178,
    ("F", "P"): 156, ("F", "I"): 187,
    ("B", "Cl"): 175,
    ("Si", "Si"): 233, ("Si", "S"): 200, ("Si", "Cl"): 202, ("Si", "Br"): 215, ("Si", "I"): 243,
    ("Cl", "Cl"): 199, ("Cl", "P"): 203, ("Cl", "S"): 207, ("Cl", "Br"): 214,
    ("S", "S"): 204, ("S", "Br"): 225, ("S", "P"): 210, ("S", "I"): 234,
    ("Br", "Br"): 228, ("Br", "P"): 222,
    ("P", "P"): 221,
    ("I", "I"): 266,
}  # fmt: skip
_DOUBLE_PM: dict[tuple[str, str], int] = {
    ("C", "C"): 134, ("C", "N"): 129, ("C", "O"): 120, ("C", "S"): 160,
    ("N", "N"): 125, ("N", "O"): 121,
    ("O", "O"): 121, ("O", "P"): 150,
    ("P", "S"): 186,
}  # fmt: skip
_TRIPLE_PM: dict[tuple[str, str], int] = {
    ("C", "C"): 120, ("C", "N"): 116, ("C", "O"): 113,
    ("N", "N"): 110,
}  # fmt: skip

MARGINS_PM: tuple[int, int, int] = (10, 5, 3)
"""Tolerances in picometres added to the single, double and triple bond lengths (EDM's values,
tuned by its authors to maximise the stability of the QM9 training molecules)."""

ALLOWED_VALENCES: dict[str, tuple[int, ...]] = {
    "H": (1,), "C": (4,), "N": (3,), "O": (2,), "F": (1,),
    "B": (3,), "Si": (4,), "P": (3, 5), "S": (4,), "Cl": (1,), "As": (3,), "Br": (1,), "I": (1,),
}  # fmt: skip
"""Allowed total bond order per element (EDM's ``allowed_bonds``); a tuple lists alternatives."""

SUPPORTED_ELEMENTS: tuple[int, ...] = tuple(sorted({_Z_OF[s] for pair in _SINGLE_PM for s in pair}))
"""Atomic numbers accepted by the metrics (elements of the single-bond table), sorted."""


def _symmetric(table: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for (a, b), length in table.items():
        out[(a, b)] = length
        out[(b, a)] = length
    return out


_SINGLE = _symmetric(_SINGLE_PM)
_DOUBLE = _symmetric(_DOUBLE_PM)
_TRIPLE = _symmetric(_TRIPLE_PM)

# Dense thresholds (bond length + margin, pm) indexed by position in SUPPORTED_ELEMENTS;
# -inf where the pair has no entry, so that the comparison ``d < threshold`` is never true.
_INDEX_OF_Z = np.full(len(_SYMBOLS), -1, dtype=np.int64)
_INDEX_OF_Z[list(SUPPORTED_ELEMENTS)] = np.arange(len(SUPPORTED_ELEMENTS))


def _threshold_matrix(table: dict[tuple[str, str], int], margin: int) -> np.ndarray:
    n = len(SUPPORTED_ELEMENTS)
    out = np.full((n, n), -np.inf)
    for (a, b), length in table.items():
        out[_INDEX_OF_Z[_Z_OF[a]], _INDEX_OF_Z[_Z_OF[b]]] = float(length + margin)
    return out


_THRESHOLDS = tuple(
    _threshold_matrix(t, m) for t, m in zip((_SINGLE, _DOUBLE, _TRIPLE), MARGINS_PM)
)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _require_rdkit() -> Any:
    """Import and return ``rdkit.Chem``, with an installation hint when it is missing."""
    try:
        return importlib.import_module("rdkit.Chem")
    except ImportError as exc:
        raise ImportError(_RDKIT_HINT) from exc


@contextlib.contextmanager
def _quiet_rdkit() -> Iterator[None]:
    """Silence RDKit's C++ log (sanitization errors are expected and handled)."""
    try:
        from rdkit.rdBase import BlockLogs
    except ImportError:  # pragma: no cover - very old RDKit
        yield
        return
    blocker = BlockLogs()
    try:
        yield
    finally:
        del blocker


def _symbol(atom: str | int) -> str:
    if isinstance(atom, str):
        return atom
    if isinstance(atom, (int, np.integer)) and not isinstance(atom, bool):
        if 1 <= int(atom) < len(_SYMBOLS):
            return _SYMBOLS[int(atom)]
        raise ValueError(f"atomic number must be between 1 and {len(_SYMBOLS) - 1}, got {atom}")
    raise TypeError(f"atom must be an element symbol or an atomic number, got {atom!r}")


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _describe(where: str) -> str:
    return f"{where}: " if where else ""


def _validate_molecule(
    z: Any, pos: Any, *, where: str = "", supported_only: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Check and convert one molecule to ``(z int64 [n], pos float64 [n, 3])``.

    Raises ``ValueError`` (prefixed with ``where``) on bad shapes, non-integer or unsupported
    atomic numbers, non-finite positions or an empty molecule.
    """
    pre = _describe(where)
    z_arr = _to_numpy(z)
    pos_arr = _to_numpy(pos)
    if z_arr.ndim != 1:
        raise ValueError(f"{pre}atomic numbers must have shape [n], got {tuple(z_arr.shape)}")
    if pos_arr.ndim != 2 or pos_arr.shape[1] != 3:
        raise ValueError(f"{pre}positions must have shape [n, 3], got {tuple(pos_arr.shape)}")
    if pos_arr.shape[0] != z_arr.shape[0]:
        raise ValueError(f"{pre}{z_arr.shape[0]} atomic numbers but {pos_arr.shape[0]} positions")
    if z_arr.shape[0] == 0:
        raise ValueError(f"{pre}molecule has no atoms")
    integral_floats = (
        z_arr.dtype.kind == "f"
        and bool(np.all(np.isfinite(z_arr)))
        and bool(np.all(z_arr % 1 == 0))
    )
    if z_arr.dtype.kind in "iu" or integral_floats:
        z_int = z_arr.astype(np.int64)
    else:
        raise ValueError(f"{pre}atomic numbers must be integers, got dtype {z_arr.dtype}")
    if pos_arr.dtype.kind not in "iuf":
        raise ValueError(f"{pre}positions must be real numbers, got dtype {pos_arr.dtype}")
    pos_f = pos_arr.astype(np.float64)
    if not np.all(np.isfinite(pos_f)):
        n_bad = int((~np.isfinite(pos_f)).any(axis=1).sum())
        raise ValueError(f"{pre}positions contain NaN/Inf values ({n_bad} atom(s))")
    if supported_only:
        bad = sorted({int(v) for v in z_int if not (0 < v < len(_SYMBOLS)) or _INDEX_OF_Z[v] < 0})
        if bad:
            names = ", ".join(
                f"{v} ({_SYMBOLS[v]})" if 0 < v < len(_SYMBOLS) else str(v) for v in bad
            )
            allowed = ", ".join(f"{_SYMBOLS[v]} ({v})" for v in SUPPORTED_ELEMENTS)
            raise ValueError(
                f"{pre}unsupported atomic number(s) {names}; the bond tables cover {allowed}"
            )
    else:
        bad = sorted({int(v) for v in z_int if not (0 < v < len(_SYMBOLS))})
        if bad:
            raise ValueError(f"{pre}invalid atomic number(s) {bad}; expected 1..118")
    return z_int, pos_f


def _bond_orders(z: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Bond-order matrix ``[n, n]`` (int64, zero diagonal) for validated inputs."""
    idx = _INDEX_OF_Z[z]
    diff = pos[:, None, :] - pos[None, :, :]
    dist_pm = 100.0 * np.sqrt(np.sum(diff**2, axis=-1))
    t1, t2, t3 = (t[idx[:, None], idx[None, :]] for t in _THRESHOLDS)
    single = dist_pm < t1
    double = single & (dist_pm < t2)
    triple = double & (dist_pm < t3)
    orders = single.astype(np.int64) + double + triple
    np.fill_diagonal(orders, 0)
    return orders


# --------------------------------------------------------------------------------------------
# bonds and stability (NumPy only)
# --------------------------------------------------------------------------------------------
def get_bond_order(atom1: str | int, atom2: str | int, distance: float) -> int:
    """Bond order between two atoms from their distance, with EDM's rule.

    With ``d = 100 * distance`` (picometres) and the tabulated lengths ``l1, l2, l3`` of the
    single, double and triple bond of the pair: the order is 0 unless ``d < l1 + 10``; then
    it is 2 if the pair has a double-bond length and ``d < l2 + 5``, and 3 if moreover the
    pair has a triple-bond length and ``d < l3 + 3``; otherwise 1.

    Parameters
    ----------
    atom1 : str or int
        Element symbols (``"C"``) or atomic numbers (``6``).
    atom2 : str or int
        Element symbols (``"C"``) or atomic numbers (``6``).
    distance : float
        Interatomic distance in Angstrom.

    Returns
    -------
    int
        0 (no bond), 1, 2 or 3. Pairs without a single-bond entry (including elements
        outside the tables) give 0.

    Raises
    ------
    ValueError
        If ``distance`` is negative or not finite.
    """
    dist = float(distance)
    if not math.isfinite(dist) or dist < 0:
        raise ValueError(f"distance must be a finite non-negative number, got {distance}")
    pair = (_symbol(atom1), _symbol(atom2))
    d_pm = 100.0 * dist
    m1, m2, m3 = MARGINS_PM
    if pair not in _SINGLE or not d_pm < _SINGLE[pair] + m1:
        return 0
    if pair in _DOUBLE and d_pm < _DOUBLE[pair] + m2:
        if pair in _TRIPLE and d_pm < _TRIPLE[pair] + m3:
            return 3
        return 2
    return 1


def bond_order_matrix(z: Any, pos: Any) -> np.ndarray:
    """Bond orders between all atom pairs of one molecule.

    Parameters
    ----------
    z : array-like of int, shape [n]
        Atomic numbers (NumPy array, torch tensor or sequence).
    pos : array-like of float, shape [n, 3]
        Positions in Angstrom.

    Returns
    -------
    numpy.ndarray
        Symmetric ``int64`` matrix ``[n, n]`` of orders 0-3 (see
        [`get_bond_order`][canonwrap.metrics.get_bond_order]) with a zero diagonal.

    Raises
    ------
    ValueError
        On bad shapes, non-finite positions or unsupported atomic numbers.
    """
    z_arr, pos_arr = _validate_molecule(z, pos)
    return _bond_orders(z_arr, pos_arr)


def _valence_counts(z: np.ndarray, orders: np.ndarray) -> tuple[int, int, int]:
    """Atoms whose bond-order sum is allowed, above the largest allowed value, below the
    smallest (an unstable atom between two allowed values, P with 4, is in neither)."""
    valence = orders.sum(axis=1)
    n_stable = n_over = n_under = 0
    for zi, vi in zip(z.tolist(), valence.tolist()):
        allowed = ALLOWED_VALENCES[_SYMBOLS[zi]]
        n_stable += int(vi in allowed)
        n_over += int(vi > max(allowed))
        n_under += int(vi < min(allowed))
    return n_stable, n_over, n_under


def _stability(z: np.ndarray, orders: np.ndarray) -> tuple[bool, int, int]:
    n_stable, _, _ = _valence_counts(z, orders)
    return n_stable == len(z), n_stable, len(z)


def check_stability(z: Any, pos: Any) -> tuple[bool, int, int]:
    """EDM's stability check of one molecule.

    An atom is stable iff the sum of the orders of its bonds equals its allowed valence
    ([`ALLOWED_VALENCES`][canonwrap.metrics.ALLOWED_VALENCES]: H 1, C 4, N 3, O 2, F 1, ...); the
    molecule is stable iff all its atoms are.

    Parameters
    ----------
    z : array-like of int, shape [n]
        Atomic numbers.
    pos : array-like of float, shape [n, 3]
        Positions in Angstrom.

    Returns
    -------
    mol_stable : bool
        Whether every atom is stable.
    n_stable_atoms : int
        Number of stable atoms.
    n_atoms : int
        Number of atoms.

    Raises
    ------
    ValueError
        On bad shapes, non-finite positions, unsupported atomic numbers or no atoms.
    """
    z_arr, pos_arr = _validate_molecule(z, pos)
    return _stability(z_arr, _bond_orders(z_arr, pos_arr))


# --------------------------------------------------------------------------------------------
# RDKit: molecules, SMILES, validity
# --------------------------------------------------------------------------------------------
def _build(z: np.ndarray, pos: np.ndarray, orders: np.ndarray, add_conformer: bool) -> Any:
    Chem = _require_rdkit()
    bond_types = {
        1: Chem.BondType.SINGLE,
        2: Chem.BondType.DOUBLE,
        3: Chem.BondType.TRIPLE,
    }
    mol = Chem.RWMol()
    for zi in z.tolist():
        mol.AddAtom(Chem.Atom(int(zi)))
    rows, cols = np.nonzero(np.triu(orders, k=1))
    for i, j in zip(rows.tolist(), cols.tolist()):
        mol.AddBond(i, j, bond_types[int(orders[i, j])])
    if add_conformer:
        conf = Chem.Conformer(len(z))
        for i, (x, y, w) in enumerate(pos.tolist()):
            conf.SetAtomPosition(i, (x, y, w))
        conf.Set3D(True)
        mol.AddConformer(conf, assignId=True)
    return mol.GetMol()


def build_molecule(z: Any, pos: Any, *, add_conformer: bool = True) -> Chem.Mol:
    """RDKit molecule with the bonds inferred by
    [`get_bond_order`][canonwrap.metrics.get_bond_order] (unsanitized).

    Parameters
    ----------
    z : array-like of int, shape [n]
        Atomic numbers.
    pos : array-like of float, shape [n, 3]
        Positions in Angstrom.
    add_conformer : bool, default True
        Attach ``pos`` as a 3D conformer (needed for SDF export; it does not affect SMILES,
        no stereochemistry is perceived).

    Returns
    -------
    rdkit.Chem.Mol
        Neutral atoms, one per input atom in the same order, and single/double/triple bonds.
        The molecule is **not** sanitized; see [`mol_to_smiles`][canonwrap.metrics.mol_to_smiles]
        and [`check_validity`][canonwrap.metrics.check_validity].

    Raises
    ------
    ImportError
        If RDKit is not installed.
    ValueError
        On bad shapes, non-finite positions, unsupported atomic numbers or no atoms.
    """
    z_arr, pos_arr = _validate_molecule(z, pos)
    return _build(z_arr, pos_arr, _bond_orders(z_arr, pos_arr), add_conformer)


def mol_to_smiles(mol: Chem.Mol, *, remove_hs: bool = False) -> str | None:
    """Canonical SMILES of a molecule after sanitization, or ``None`` if it fails.

    The input is not modified (a copy is sanitized). The whole molecule is written, so a
    molecule made of several fragments gives a dotted SMILES.

    Parameters
    ----------
    mol : rdkit.Chem.Mol
        Molecule, for instance from [`build_molecule`][canonwrap.metrics.build_molecule].
    remove_hs : bool, default False
        Remove hydrogen atoms before writing (``"C"`` instead of ``"[H]C([H])([H])[H]"``).

    Returns
    -------
    str or None
        Canonical SMILES, or ``None`` if ``Chem.SanitizeMol`` raises.

    Raises
    ------
    ImportError
        If RDKit is not installed.
    """
    Chem = _require_rdkit()
    work = Chem.Mol(mol)
    with _quiet_rdkit():
        try:
            Chem.SanitizeMol(work)
            if remove_hs:
                work = Chem.RemoveHs(work)
        except ValueError:  # RDKit's MolSanitizeException derives from ValueError
            return None
    return Chem.MolToSmiles(work)


def _validity(
    z: np.ndarray, pos: np.ndarray, orders: np.ndarray, remove_hs: bool
) -> tuple[str | None, bool]:
    Chem = _require_rdkit()
    mol = _build(z, pos, orders, add_conformer=False)
    with _quiet_rdkit():
        try:
            Chem.SanitizeMol(mol)
        except ValueError:
            return None, False
        fragments = Chem.GetMolFrags(mol, asMols=True)
    largest = max(fragments, key=lambda m: m.GetNumAtoms())  # first one on ties
    smiles = mol_to_smiles(largest, remove_hs=remove_hs)
    if smiles is None:  # pragma: no cover - a fragment of a sanitized molecule sanitizes
        return None, False
    return smiles, len(fragments) == 1


def check_validity(z: Any, pos: Any, *, remove_hs: bool = False) -> tuple[str | None, bool]:
    """EDM's validity check of one molecule.

    The molecule of [`build_molecule`][canonwrap.metrics.build_molecule] is sanitized with RDKit; if
    that succeeds it is valid and its SMILES is the canonical SMILES of its largest fragment (by
    number of atoms).

    Parameters
    ----------
    z : array-like of int, shape [n]
        Atomic numbers.
    pos : array-like of float, shape [n, 3]
        Positions in Angstrom.
    remove_hs : bool, default False
        Remove hydrogen atoms before writing the SMILES (EDM keeps them).

    Returns
    -------
    smiles : str or None
        SMILES of the largest fragment, ``None`` if the molecule is invalid.
    connected : bool
        ``True`` iff the molecule is valid and consists of a single fragment.

    Raises
    ------
    ImportError
        If RDKit is not installed.
    ValueError
        On bad shapes, non-finite positions, unsupported atomic numbers or no atoms.
    """
    z_arr, pos_arr = _validate_molecule(z, pos)
    return _validity(z_arr, pos_arr, _bond_orders(z_arr, pos_arr), remove_hs)


def canonicalize_smiles(smiles: str, *, remove_hs: bool = False) -> str | None:
    """Rewrite a SMILES string in the convention of
    [`check_validity`][canonwrap.metrics.check_validity].

    The string is parsed, stereochemistry is removed (bonds inferred from distances carry
    none) and hydrogens are made explicit atoms (``remove_hs=False``) or removed.

    Parameters
    ----------
    smiles : str
        Any SMILES, e.g. ``"OCC"``.
    remove_hs : bool, default False
        Convention of the generated SMILES to match.

    Returns
    -------
    str or None
        Canonical SMILES (``"[H]OC([H])([H])C([H])([H])[H]"`` for ``"OCC"``), or ``None``
        if RDKit cannot parse the string.

    Raises
    ------
    ImportError
        If RDKit is not installed.
    """
    Chem = _require_rdkit()
    with _quiet_rdkit():
        mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None
    Chem.RemoveStereochemistry(mol)
    if not remove_hs:
        mol = Chem.AddHs(mol)
    return Chem.MolToSmiles(mol)


# --------------------------------------------------------------------------------------------
# evaluation over a set of molecules
# --------------------------------------------------------------------------------------------
def _unpack(item: Any, index: int) -> tuple[Any, Any]:
    try:
        z, pos = item
    except (TypeError, ValueError):
        raise ValueError(
            f"molecule {index}: expected a pair (atomic_numbers [n], positions [n, 3])"
        ) from None
    return z, pos


def evaluate(
    molecules: Iterable[tuple[Any, Any]],
    train_smiles: Iterable[str] | None = None,
    *,
    remove_hs: bool = False,
    canonicalize_train: bool = True,
    progress: bool = False,
) -> dict[str, float | int | None]:
    """Stability, validity, uniqueness and novelty of generated molecules (EDM metrics).

    Parameters
    ----------
    molecules : iterable of (z, pos)
        Each molecule as atomic numbers ``[n]`` (int array or tensor) and positions
        ``[n, 3]`` in Angstrom, already stripped of padding.
    train_smiles : iterable of str, optional
        SMILES of the training set for novelty. ``None`` gives ``novelty=None``.
    remove_hs : bool, default False
        SMILES without hydrogen atoms (default: hydrogens kept as ``[H]`` atoms, as EDM).
    canonicalize_train : bool, default True
        Rewrite ``train_smiles`` with [`canonicalize_smiles`][canonwrap.metrics.canonicalize_smiles]
        in the same convention before comparing (entries RDKit cannot parse are kept verbatim).
        ``False`` compares the raw strings, as EDM did with a list built by its own pipeline.
    progress : bool, default False
        Show a ``tqdm`` progress bar.

    Returns
    -------
    dict
        ``atom_stability`` (stable atoms / atoms), ``mol_stability``, ``validity``,
        ``connected_validity`` (valid and one fragment), ``atom_stability_se`` (the
        standard error of ``atom_stability`` with molecules as the sampling unit: the
        ratio estimator's linearised variance, ``sqrt(sum_i (s_i - r n_i)^2 / (m (m - 1)))
        / mean(n_i)`` for ``m`` molecules with ``n_i`` atoms of which ``s_i`` are stable and
        ``r = atom_stability``; ``None`` for one molecule, since atoms of one molecule are not
        independent draws), ``uniqueness`` (distinct valid
        SMILES / valid; 0.0 when none is valid), ``novelty`` (distinct valid SMILES not in
        the training set / distinct valid SMILES; ``None`` without ``train_smiles``, 0.0 when
        none is valid), ``atom_over_valence`` and ``atom_under_valence`` (atoms whose
        bond-order sum is above the largest / below the smallest allowed valence, over all
        atoms: where the unstable atoms err; RDKit's sanitization, hence validity, fails on
        the first kind and accepts the second as radicals), and the counts ``n_molecules``,
        ``n_atoms``, ``n_stable_atoms``, ``n_over_valence``, ``n_under_valence``,
        ``n_stable_molecules``, ``n_valid``, ``n_connected``, ``n_unique`` and ``n_novel``
        (``None`` without ``train_smiles``).

    Raises
    ------
    ValueError
        If ``molecules`` is empty or a molecule is malformed (the message gives its index).
    TypeError
        If ``train_smiles`` is a single string.
    ImportError
        If RDKit is not installed.
    """
    Chem = _require_rdkit()  # noqa: F841 - fail early with the installation hint
    if isinstance(train_smiles, str):
        raise TypeError("train_smiles must be an iterable of SMILES strings, not one string")

    iterator: Iterable[Any] = molecules
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(molecules, desc="molecule metrics", unit="mol")

    n_molecules = n_atoms = n_stable_atoms = n_stable_molecules = n_connected = 0
    n_over = n_under = 0
    sum_ss = sum_sn = sum_nn = 0  # per-molecule second moments, for atom_stability_se
    valid_smiles: list[str] = []
    for index, item in enumerate(iterator):
        z, pos = _unpack(item, index)
        z_arr, pos_arr = _validate_molecule(z, pos, where=f"molecule {index}")
        orders = _bond_orders(z_arr, pos_arr)
        n_stable, over, under = _valence_counts(z_arr, orders)
        n = len(z_arr)
        stable = n_stable == n
        smiles, connected = _validity(z_arr, pos_arr, orders, remove_hs)
        n_molecules += 1
        n_atoms += n
        n_stable_atoms += n_stable
        sum_ss += n_stable * n_stable
        sum_sn += n_stable * n
        sum_nn += n * n
        n_over += over
        n_under += under
        n_stable_molecules += int(stable)
        n_connected += int(connected)
        if smiles is not None:
            valid_smiles.append(smiles)
    if n_molecules == 0:
        raise ValueError("evaluate() needs at least one molecule, got an empty iterable")

    n_valid = len(valid_smiles)
    unique = set(valid_smiles)
    n_unique = len(unique)
    novelty: float | None = None
    n_novel: int | None = None
    if train_smiles is not None:
        if canonicalize_train:
            reference = set()
            for s in train_smiles:
                canonical = canonicalize_smiles(s, remove_hs=remove_hs)
                reference.add(s if canonical is None else canonical)
        else:
            reference = set(train_smiles)
        n_novel = sum(1 for s in unique if s not in reference)
        novelty = n_novel / n_unique if n_unique else 0.0

    ratio = n_stable_atoms / n_atoms
    atom_se: float | None = None
    if n_molecules > 1:
        residual = max(sum_ss - 2 * ratio * sum_sn + ratio**2 * sum_nn, 0.0)
        mean_atoms = n_atoms / n_molecules
        atom_se = math.sqrt(residual / (n_molecules * (n_molecules - 1))) / mean_atoms
    return {
        "atom_stability": ratio,
        "atom_stability_se": atom_se,
        "mol_stability": n_stable_molecules / n_molecules,
        "validity": n_valid / n_molecules,
        "connected_validity": n_connected / n_molecules,
        "uniqueness": n_unique / n_valid if n_valid else 0.0,
        "novelty": novelty,
        "atom_over_valence": n_over / n_atoms,
        "atom_under_valence": n_under / n_atoms,
        "n_molecules": n_molecules,
        "n_atoms": n_atoms,
        "n_stable_atoms": n_stable_atoms,
        "n_over_valence": n_over,
        "n_under_valence": n_under,
        "n_stable_molecules": n_stable_molecules,
        "n_valid": n_valid,
        "n_connected": n_connected,
        "n_unique": n_unique,
        "n_novel": n_novel,
    }
