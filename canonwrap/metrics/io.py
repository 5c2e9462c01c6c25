"""Export generated molecules to XYZ and SDF files, and read XYZ files back.

Molecules are pairs ``(z, pos)``: atomic numbers ``[n]`` and positions ``[n, 3]`` in
Angstrom, as used by ``canonwrap.metrics.molecules``. XYZ needs no extra dependency;
SDF goes through RDKit (``pip install canonwrap[molecules]``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from canonwrap.metrics.molecules import (
    _SYMBOLS,
    _Z_OF,
    _bond_orders,
    _build,
    _quiet_rdkit,
    _require_rdkit,
    _unpack,
    _validate_molecule,
)

__all__ = ["read_xyz", "write_sdf", "write_xyz"]

_Z_OF_LOWER = {sym.lower(): z for sym, z in _Z_OF.items()}


def _names(names: Sequence[str] | None, index: int, default: str) -> str:
    if names is None:
        return default
    if index >= len(names):
        raise ValueError(f"{len(names)} names given for more molecules")
    name = str(names[index])
    if "\n" in name or "\r" in name:
        raise ValueError(f"molecule {index}: name/comment must be a single line, got {name!r}")
    return name


def write_xyz(
    path: str | os.PathLike[str],
    molecules: Iterable[tuple[Any, Any]],
    *,
    comments: Sequence[str] | None = None,
    precision: int = 6,
) -> int:
    """Write molecules to one multi-molecule XYZ file.

    Each molecule is a block: the number of atoms, a comment line, then one line
    ``symbol x y z`` per atom.

    Parameters
    ----------
    path : str or os.PathLike
        Output file (overwritten).
    molecules : iterable of (z, pos)
        Atomic numbers ``[n]`` and positions ``[n, 3]`` in Angstrom (arrays or tensors).
        Any element 1-118 is accepted.
    comments : sequence of str, optional
        One single-line comment per molecule (default ``"molecule <index>"``).
    precision : int, default 6
        Decimals written for the coordinates.

    Returns
    -------
    int
        Number of molecules written.

    Raises
    ------
    ValueError
        On a malformed molecule (bad shapes, NaN positions, invalid atomic numbers), a
        multi-line comment, too few comments, or an empty molecule.
    """
    blocks: list[str] = []
    for index, item in enumerate(molecules):
        z, pos = _unpack(item, index)
        z_arr, pos_arr = _validate_molecule(z, pos, where=f"molecule {index}", supported_only=False)
        comment = _names(comments, index, f"molecule {index}")
        lines = [str(len(z_arr)), comment]
        for zi, (x, y, w) in zip(z_arr.tolist(), pos_arr.tolist()):
            lines.append(f"{_SYMBOLS[zi]:<2} {x:.{precision}f} {y:.{precision}f} {w:.{precision}f}")
        blocks.append("\n".join(lines) + "\n")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("".join(blocks))
    return len(blocks)


def _parse_element(token: str, line_no: int) -> int:
    if token.isdigit():
        z = int(token)
        if 1 <= z < len(_SYMBOLS):
            return z
    elif token.lower() in _Z_OF_LOWER:
        return _Z_OF_LOWER[token.lower()]
    raise ValueError(f"line {line_no}: unknown element {token!r}")


def read_xyz(path: str | os.PathLike[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Read every molecule of a (multi-molecule) XYZ file.

    Parameters
    ----------
    path : str or os.PathLike
        XYZ file: blocks of an atom count, a comment line and one ``element x y z`` line per
        atom. Elements may be symbols (any case) or atomic numbers; extra columns are
        ignored; blank lines between blocks are skipped.

    Returns
    -------
    list of (numpy.ndarray, numpy.ndarray)
        ``(z, pos)`` per molecule: ``int64 [n]`` atomic numbers and ``float64 [n, 3]``
        positions in Angstrom.

    Raises
    ------
    ValueError
        If the file is malformed (the message gives the line number).
    """
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    molecules: list[tuple[np.ndarray, np.ndarray]] = []
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        header = lines[i].split()
        if len(header) != 1 or not header[0].isdigit():
            raise ValueError(f"line {i + 1}: expected an atom count, got {lines[i]!r}")
        n = int(header[0])
        if i + 1 + n >= len(lines):
            raise ValueError(f"line {i + 1}: block announces {n} atoms but the file ends too early")
        z = np.empty(n, dtype=np.int64)
        pos = np.empty((n, 3), dtype=np.float64)
        for k in range(n):
            line_no = i + 3 + k
            fields = lines[line_no - 1].split()
            if len(fields) < 4:
                raise ValueError(f"line {line_no}: expected 'element x y z', got too few fields")
            z[k] = _parse_element(fields[0], line_no)
            try:
                pos[k] = [float(v) for v in fields[1:4]]
            except ValueError:
                raise ValueError(f"line {line_no}: coordinates are not numbers") from None
        molecules.append((z, pos))
        i += 2 + n
    return molecules


def write_sdf(
    path: str | os.PathLike[str],
    molecules: Iterable[tuple[Any, Any]],
    *,
    names: Sequence[str] | None = None,
) -> int:
    """Write molecules with their 3D coordinates and inferred bonds to an SDF file.

    Bonds are those of
    [`canonwrap.metrics.molecules.build_molecule`][canonwrap.metrics.build_molecule]. Molecules that
    RDKit sanitizes are written sanitized (aromatic rings kekulized in the file); those that fail
    sanitization are still written, unsanitized, so that every input gives a record. Each record
    carries the property ``canonwrap_sanitized`` (``1`` or ``0``).

    Parameters
    ----------
    path : str or os.PathLike
        Output file (overwritten).
    molecules : iterable of (z, pos)
        Atomic numbers ``[n]`` and positions ``[n, 3]`` in Angstrom; elements must be in
        [`canonwrap.metrics.molecules.SUPPORTED_ELEMENTS`][canonwrap.metrics.SUPPORTED_ELEMENTS].
    names : sequence of str, optional
        Single-line record titles (default ``"molecule <index>"``).

    Returns
    -------
    int
        Number of records written.

    Raises
    ------
    ImportError
        If RDKit is not installed.
    ValueError
        On a malformed molecule, a multi-line name or too few names.
    """
    Chem = _require_rdkit()
    records: list[Any] = []
    for index, item in enumerate(molecules):
        z, pos = _unpack(item, index)
        z_arr, pos_arr = _validate_molecule(z, pos, where=f"molecule {index}")
        mol = _build(z_arr, pos_arr, _bond_orders(z_arr, pos_arr), add_conformer=True)
        sanitized = Chem.Mol(mol)
        with _quiet_rdkit():
            try:
                Chem.SanitizeMol(sanitized)
                mol, ok = sanitized, True
            except ValueError:
                mol.UpdatePropertyCache(strict=False)
                Chem.FastFindRings(mol)
                ok = False
        mol.SetProp("_Name", _names(names, index, f"molecule {index}"))
        mol.SetIntProp("canonwrap_sanitized", int(ok))
        records.append(mol)
    writer = Chem.SDWriter(os.fspath(path))
    try:
        with _quiet_rdkit():
            for mol in records:
                writer.write(mol)
    finally:
        writer.close()
    return len(records)
