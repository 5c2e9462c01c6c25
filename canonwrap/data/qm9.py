"""QM9 small molecules with 3D coordinates, split and featurised as in EDM.

The data come, offline, from the CSV files shipped inside the ``qm9pack`` package on PyPI
(``pip install qm9pack``), or from an already downloaded ``torch_geometric`` QM9 folder.
Both hold the 130,831 molecules of QM9 that remain after removing the 3,054 molecules
listed as "uncharacterized" by the QM9 authors, ordered by their QM9 molecule number.

Molecules are returned as ``torch_geometric.data.Data`` objects with

* ``z``: ``LongTensor [n]``, atomic numbers (H=1, C=6, N=7, O=8, F=9);
* ``pos``: ``FloatTensor [n, 3]``, coordinates in Angstrom with the centre of geometry
  subtracted per molecule (EDM's zero-mean projection);
* ``x``: ``FloatTensor [n, 6]`` (``[n, 5]`` without hydrogens), see
[`qm9_features`][canonwrap.data.qm9_features];
* ``idx``: ``int``, position of the molecule in the full 130,831-molecule set;
* ``gdb_idx``: ``int``, the 1-based QM9 molecule number (``dsgdb9nsd_<gdb_idx>.xyz``);
* ``smiles``: ``str``.

The train/valid/test split reproduces EDM (Hoogeboom et al., 2022, inherited from
Cormorant): ``np.random.seed(0); perm = np.random.permutation(130831)``, i.e. the legacy
Mersenne-Twister ``np.random.RandomState(0)`` (not ``default_rng``); train is
``perm[:100000]``, valid ``perm[100000:117748]`` and test ``perm[117748:]``. As in EDM's
processed files, each split lists its molecules in ascending QM9 order.

Parsed tensors are cached on disk as concatenated arrays plus offsets, so after the first
parse (about 6 s, 36 MB cache file) a dataset loads in about 0.1 s.
"""

from __future__ import annotations

import csv
import importlib.metadata as importlib_metadata
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torch_geometric.data import Data

from canonwrap._io import atomic_torch_save, tree_digest
from canonwrap.molecules import CHARGE_SCALE, ONE_HOT_SCALE, QM9_ATOM_TYPES, QM9_HEAVY_ATOM_TYPES

__all__ = [
    "QM9",
    "QM9_ATOM_TYPES",
    "QM9_HEAVY_ATOM_TYPES",
    "QM9_NUM_MOLECULES",
    "QM9_SPLIT_SIZES",
    "default_cache_dir",
    "qm9_features",
    "qm9_split_indices",
]

QM9_NUM_MOLECULES: int = 130_831
"""Number of molecules after removing the 3,054 uncharacterized ones."""
QM9_SPLIT_SIZES: dict[str, int] = {"train": 100_000, "valid": 17_748, "test": 13_083}
"""EDM split sizes."""

_SYMBOL_TO_Z: dict[str, int] = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
_QM9PACK_CSVS: tuple[str, ...] = (
    "qm9pack/data/qm9_part1.csv",
    "qm9pack/data/qm9_part2.csv",
    "qm9pack/data/qm9_part3.csv",
)
_REQUIRED_COLUMNS: tuple[str, ...] = ("Index", "SMILES", "N_atoms", "Elements", "XYZ_Ang")
_CACHE_FORMAT: int = 2  # 2: SHA-256 checksum of the arrays, finite positions
_STORE_KEYS: tuple[str, ...] = (
    "z",
    "pos",
    "offsets",
    "gdb_idx",
    "smiles_bytes",
    "smiles_offsets",
)
_INSTALL_HINT = (
    "The QM9 data are read offline from the CSV files shipped in the 'qm9pack' package: "
    "install it with `pip install qm9pack` (or `pip install canonwrap[molecules]`)."
)
_REINSTALL = "reinstall with `pip install --force-reinstall qm9pack`."

Store = dict[str, Any]


# --------------------------------------------------------------------------- features


def qm9_features(z: Tensor | Sequence[int], remove_h: bool = False) -> Tensor:
    """Node features of EDM from atomic numbers.

    Parameters
    ----------
    z : Tensor or sequence of int, shape ``[n]``
        Atomic numbers.
    remove_h : bool, default False
        If False the one-hot block is over H, C, N, O, F (``QM9_ATOM_TYPES``); if True it is
        over C, N, O, F only and hydrogens are not allowed.

    Returns
    -------
    Tensor, shape ``[n, 6]`` (``[n, 5]`` if ``remove_h``), float32
        ``[one_hot(z) / 4, z / 10]``: the one-hot type divided by 4 followed by the charge
        (atomic number) divided by 10, as EDM normalises them.

    Raises
    ------
    ValueError
        If ``z`` is not one-dimensional or holds an atomic number outside the allowed types.
    """
    z = torch.as_tensor(z)
    if z.dim() != 1:
        raise ValueError(f"z must be one-dimensional [n], got shape {tuple(z.shape)}")
    if z.is_floating_point() or z.is_complex() or z.dtype == torch.bool:
        raise ValueError(f"z must hold integer atomic numbers, got dtype {z.dtype}")
    types = QM9_HEAVY_ATOM_TYPES if remove_h else QM9_ATOM_TYPES
    unknown = sorted(set(torch.unique(z).tolist()) - set(types))
    if unknown:
        raise ValueError(
            f"unknown atom type(s) (atomic numbers) {unknown} for QM9 features; "
            f"allowed: {list(types)}" + (" (remove_h=True excludes hydrogen)" if remove_h else "")
        )
    return _features_unchecked(z.long(), types)


def _features_unchecked(z: Tensor, types: tuple[int, ...]) -> Tensor:
    """[`qm9_features`][canonwrap.data.qm9_features] without validation; ``z`` long ``[n]`` already
    known valid."""
    one_hot = (z.unsqueeze(-1) == torch.tensor(types, dtype=torch.long)).to(torch.float32)
    charge = z.to(torch.float32).unsqueeze(-1)
    return torch.cat([one_hot / ONE_HOT_SCALE, charge / CHARGE_SCALE], dim=-1)


# --------------------------------------------------------------------------- split


def qm9_split_indices(num_molecules: int = QM9_NUM_MOLECULES) -> dict[str, np.ndarray]:
    """EDM's train/valid/test split of the 130,831 QM9 molecules.

    Uses ``np.random.RandomState(0).permutation(num_molecules)``, identical to EDM's
    ``np.random.seed(0); np.random.permutation(Nmols)``; test gets ``int(0.1 * N)``
    molecules, train 100,000, valid the rest. Each split is returned sorted ascending, the
    order of EDM's processed ``.npz`` files.

    Parameters
    ----------
    num_molecules : int, default 130831
        Size of the full set; only 130,831 gives EDM's split.

    Returns
    -------
    dict of str to ndarray
        ``{"train": [100000], "valid": [17748], "test": [13083]}`` int64 positions into the
        full set (sizes for the default ``num_molecules``).
    """
    n_train = 100_000
    if num_molecules <= n_train:
        raise ValueError(f"num_molecules must exceed {n_train}, got {num_molecules}")
    n_test = int(0.1 * num_molecules)
    n_valid = num_molecules - n_train - n_test
    perm = np.random.RandomState(0).permutation(num_molecules).astype(np.int64)
    return {
        "train": np.sort(perm[:n_train]),
        "valid": np.sort(perm[n_train : n_train + n_valid]),
        "test": np.sort(perm[n_train + n_valid :]),
    }


# --------------------------------------------------------------------------- qm9pack files


def default_cache_dir() -> Path:
    """Cache folder: ``$CANONWRAP_CACHE/qm9`` if that variable is set, else
    ``~/.cache/canonwrap/qm9``."""
    base = os.environ.get("CANONWRAP_CACHE")
    if base:
        return Path(base).expanduser() / "qm9"
    return Path.home() / ".cache" / "canonwrap" / "qm9"


def _qm9pack_csv_paths() -> list[Path]:
    """Locate the qm9pack CSV files through the package's installed-files record.

    ``qm9pack`` itself is not imported: its ``__init__`` needs ``pkg_resources``.
    """
    try:
        files = importlib_metadata.files("qm9pack")
    except importlib_metadata.PackageNotFoundError as err:
        raise FileNotFoundError(
            f"package 'qm9pack' is not installed; expected its files {list(_QM9PACK_CSVS)}. "
            + _INSTALL_HINT
        ) from err
    by_name = {str(f).replace("\\", "/"): f for f in (files or [])}
    paths: list[Path] = []
    missing: list[str] = []
    for name in _QM9PACK_CSVS:
        entry = by_name.get(name)
        path = Path(str(entry.locate())) if entry is not None else None
        if path is None or not path.is_file():
            missing.append(name if path is None else str(path))
        else:
            paths.append(path)
    if missing:
        raise FileNotFoundError(
            f"qm9pack is installed but its data file(s) {missing} are missing "
            f"(expected {list(_QM9PACK_CSVS)} in site-packages). Reinstall with "
            "`pip install --force-reinstall qm9pack`."
        )
    return paths


def _qm9pack_fingerprint(paths: Sequence[Path]) -> dict[str, Any]:
    """Version and file sizes of the qm9pack data, stored with the cache to detect changes."""
    try:
        version = importlib_metadata.version("qm9pack")
    except importlib_metadata.PackageNotFoundError:  # pragma: no cover - paths came from it
        version = "unknown"
    return {"version": version, "sizes": [int(p.stat().st_size) for p in paths]}


def _parse_qm9pack_csvs(
    paths: Sequence[Path], limit: int | None = None, progress: bool = True
) -> Store:
    """Parse the qm9pack CSVs into concatenated arrays.

    Only the columns ``Index``, ``SMILES``, ``N_atoms``, ``Elements`` and ``XYZ_Ang`` are
    read. ``XYZ_Ang`` is a JSON-like nested list whose numbers include tokens such as ``0.``
    and ``1.2E-5`` (``json.loads`` rejects ``0.``), so it is split on brackets and commas and
    each token is converted with ``float``.

    Parameters
    ----------
    paths : sequence of Path
        The CSV files, read in order.
    limit : int, optional
        Stop after this many molecules (testing hook); the molecule count is only checked
        against 130,831 when ``limit`` is None.
    progress : bool, default True
        Show a tqdm progress bar.

    Returns
    -------
    dict
        ``z`` uint8 ``[N_atoms]``, ``pos`` float32 ``[N_atoms, 3]`` (raw, not centred),
        ``offsets`` int64 ``[M + 1]``, ``gdb_idx`` int64 ``[M]``, ``smiles_bytes`` uint8
        ``[B]`` (UTF-8) and ``smiles_offsets`` int64 ``[M + 1]``, for ``M`` molecules sorted
        by QM9 number.
    """
    from tqdm.auto import tqdm

    z_parts: list[np.ndarray] = []
    pos_parts: list[np.ndarray] = []
    counts: list[int] = []
    gdb_idx: list[int] = []
    smiles: list[str] = []
    total = QM9_NUM_MOLECULES if limit is None else min(limit, QM9_NUM_MOLECULES)
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    bar = tqdm(total=total, desc="Parsing qm9pack QM9 CSVs", unit="mol", disable=not progress)
    try:
        for path in paths:
            if limit is not None and len(counts) >= limit:
                break
            with open(path, newline="", encoding="utf-8") as fh:
                reader = csv.reader(fh)
                header = next(reader, None)
                if header is None:
                    raise ValueError(f"qm9pack data file {path} is empty; " + _REINSTALL)
                col = {name: i for i, name in enumerate(header)}
                lacking = [c for c in _REQUIRED_COLUMNS if c not in col]
                if lacking:
                    raise ValueError(
                        f"qm9pack data file {path} lacks column(s) {lacking} (header: "
                        f"{header[:8]}...); " + _REINSTALL
                    )
                ci, cs, cn = col["Index"], col["SMILES"], col["N_atoms"]
                ce, cx = col["Elements"], col["XYZ_Ang"]
                width = max(ci, cs, cn, ce, cx)
                for row in reader:
                    if limit is not None and len(counts) >= limit:
                        break
                    if not row:
                        continue
                    try:
                        if len(row) <= width:
                            raise ValueError(f"row has {len(row)} fields, expected {len(header)}")
                        n = int(row[cn])
                        symbols = [
                            s.strip().strip("'\"") for s in row[ce].strip().strip("[]").split(",")
                        ]
                        zs = [_SYMBOL_TO_Z[s] for s in symbols]
                        tokens = row[cx].replace("[", "").replace("]", "").split(",")
                        xyz = np.fromiter(map(float, tokens), dtype=np.float64, count=len(tokens))
                        if len(zs) != n or xyz.size != 3 * n:
                            raise ValueError(
                                f"N_atoms={n} but {len(zs)} elements and {xyz.size} coordinates"
                            )
                        gidx = int(row[ci])
                    except (ValueError, KeyError) as err:
                        raise ValueError(
                            f"qm9pack data file {path} looks corrupt near line "
                            f"{reader.line_num}: {type(err).__name__}: {err}; " + _REINSTALL
                        ) from err
                    z_parts.append(np.asarray(zs, dtype=np.uint8))
                    pos_parts.append(xyz.reshape(n, 3))
                    counts.append(n)
                    gdb_idx.append(gidx)
                    smiles.append(row[cs])
                    bar.update(1)
    finally:
        bar.close()
        csv.field_size_limit(old_limit)

    num = len(counts)
    if num == 0:
        raise ValueError(f"no molecules found in qm9pack data files {list(map(str, paths))}")
    if limit is None and num != QM9_NUM_MOLECULES:
        raise ValueError(
            f"qm9pack data hold {num} molecules, expected {QM9_NUM_MOLECULES} (QM9 without the "
            "3,054 uncharacterized molecules); " + _REINSTALL
        )
    gdb = np.asarray(gdb_idx, dtype=np.int64)
    if np.unique(gdb).size != num:
        raise ValueError("qm9pack data hold duplicate molecule indices; " + _REINSTALL)
    order = np.argsort(gdb, kind="stable")
    if not np.array_equal(order, np.arange(num)):  # the files are sorted; keep EDM's order
        z_parts = [z_parts[i] for i in order]
        pos_parts = [pos_parts[i] for i in order]
        counts = [counts[i] for i in order]
        smiles = [smiles[i] for i in order]
        gdb = gdb[order]
    return _make_store(
        z=np.concatenate(z_parts),
        pos=np.concatenate(pos_parts).astype(np.float32),
        counts=np.asarray(counts, dtype=np.int64),
        gdb_idx=gdb,
        smiles=smiles,
    )


def _make_store(
    z: np.ndarray, pos: np.ndarray, counts: np.ndarray, gdb_idx: np.ndarray, smiles: list[str]
) -> Store:
    """Pack per-molecule arrays into the concatenated-tensor layout used by the cache."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    encoded = [s.encode("utf-8") for s in smiles]
    s_offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=s_offsets[1:])
    s_bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return {
        "z": torch.from_numpy(np.ascontiguousarray(z, dtype=np.uint8)),
        "pos": torch.from_numpy(np.ascontiguousarray(pos, dtype=np.float32)),
        "offsets": torch.from_numpy(offsets),
        "gdb_idx": torch.from_numpy(np.ascontiguousarray(gdb_idx, dtype=np.int64)),
        "smiles_bytes": torch.from_numpy(s_bytes),
        "smiles_offsets": torch.from_numpy(s_offsets),
    }


def _check_store(store: Store, where: str) -> None:
    """Consistency checks of a store; raises ValueError naming ``where``."""
    missing = [k for k in _STORE_KEYS if k not in store]
    if missing:
        raise ValueError(f"{where}: missing arrays {missing}")
    off, n_atoms = store["offsets"], store["z"].shape[0]
    if off.dim() != 1 or off.numel() < 2 or int(off[0]) != 0 or int(off[-1]) != n_atoms:
        raise ValueError(f"{where}: offsets do not match {n_atoms} atoms")
    if store["pos"].shape != (n_atoms, 3):
        raise ValueError(f"{where}: pos has shape {tuple(store['pos'].shape)}, expected [N, 3]")
    num = off.numel() - 1
    if store["gdb_idx"].shape != (num,) or store["smiles_offsets"].shape != (num + 1,):
        raise ValueError(f"{where}: per-molecule arrays do not match {num} molecules")
    if int(store["smiles_offsets"][-1]) != store["smiles_bytes"].numel():
        raise ValueError(f"{where}: SMILES offsets do not match the SMILES bytes")
    unknown = sorted(set(torch.unique(store["z"]).tolist()) - set(QM9_ATOM_TYPES))
    if unknown:
        raise ValueError(f"{where}: unknown atomic numbers {unknown}")
    finite = torch.isfinite(store["pos"]).all(dim=1)
    if not bool(finite.all()):
        atoms = (~finite).nonzero().flatten()
        molecules = torch.unique(torch.searchsorted(off, atoms, right=True) - 1)
        raise ValueError(
            f"{where}: non-finite positions in {molecules.numel()} molecules (indices "
            f"{molecules[:5].tolist()}{', ...' if molecules.numel() > 5 else ''})"
        )


# --------------------------------------------------------------------------- disk cache


def _cache_file(root: Path, limit: int | None) -> Path:
    suffix = "" if limit is None else f"_first{limit}"
    return root / f"qm9pack_v{_CACHE_FORMAT}{suffix}.pt"


def _load_qm9pack_store(
    root: str | os.PathLike[str] | None = None, limit: int | None = None, progress: bool = True
) -> Store:
    """Load the qm9pack data from the disk cache, parsing the CSVs and writing it if needed.

    The cache is read with ``torch.load(weights_only=True)`` and verified: the SHA-256
    checksum of its arrays, stored with them, must match, and the arrays must be
    consistent with finite positions. A cache written for another qm9pack version or file
    size is rebuilt; one that fails to read or verify is rebuilt with a warning that says
    why. If the cache folder is not writable the parsed data are still returned, with a
    warning.

    Parameters
    ----------
    root : path, optional
        Cache folder; defaults to [`default_cache_dir`][canonwrap.data.qm9.default_cache_dir].
    limit : int, optional
        Parse only the first ``limit`` molecules, cached in a separate file (testing hook).
    progress : bool, default True
        Progress bar while parsing.
    """
    root_path = Path(root).expanduser() if root is not None else default_cache_dir()
    path = _cache_file(root_path, limit)
    try:
        paths: list[Path] | None = _qm9pack_csv_paths()
    except FileNotFoundError:
        paths = None  # a complete cache is still usable without the package
    if path.is_file():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(obj, dict) or obj.get("format") != _CACHE_FORMAT:
                raise ValueError("unexpected cache format")
            if tree_digest([obj.get(k) for k in _STORE_KEYS]) != obj.get("checksum"):
                raise ValueError("checksum mismatch: the file was altered or damaged")
            _check_store(obj, f"cache {path}")
        except Exception as err:  # any unreadable cache is rebuilt
            warnings.warn(
                f"QM9 cache {path} is unreadable or damaged ({type(err).__name__}: {err}); "
                "rebuilding it",
                stacklevel=3,
            )
        else:
            if paths is None or obj.get("fingerprint") == _qm9pack_fingerprint(paths):
                return {k: obj[k] for k in _STORE_KEYS}
    if paths is None:
        _qm9pack_csv_paths()  # raises the informative FileNotFoundError
        raise AssertionError("unreachable")  # pragma: no cover
    store = _parse_qm9pack_csvs(paths, limit=limit, progress=progress)
    _check_store(store, f"qm9pack data {[str(p) for p in paths]}")
    obj = dict(
        store,
        format=_CACHE_FORMAT,
        fingerprint=_qm9pack_fingerprint(paths),
        limit=limit,
        checksum=tree_digest([store[k] for k in _STORE_KEYS]),
    )
    try:
        atomic_torch_save(obj, path, permissions=0o644)  # a cache others may read
    except OSError as err:
        warnings.warn(f"could not write QM9 cache {path}: {err}", stacklevel=3)
    return store


# --------------------------------------------------------------------------- torch_geometric


def _load_pyg_store(root: str | os.PathLike[str], check_count: bool = True) -> Store:
    """Read a downloaded ``torch_geometric.datasets.QM9`` folder without downloading.

    Parameters
    ----------
    root : path
        The folder passed to ``torch_geometric.datasets.QM9`` (holding ``raw/`` and/or
        ``processed/``).
    check_count : bool, default True
        Require the 130,831 molecules EDM's split is defined on.
    """
    from torch_geometric.data.dataset import files_exist
    from torch_geometric.datasets import QM9 as PygQM9

    root_path = Path(root).expanduser()

    class _OfflinePygQM9(PygQM9):
        def _download(self) -> None:  # never download: only accept what is on disk
            if files_exist(self.processed_paths) or files_exist(self.raw_paths):
                return
            raise FileNotFoundError(
                f"no torch_geometric QM9 data under {root_path}: expected "
                f"{self.processed_paths[0]} (or raw files {self.raw_paths}). Download it once "
                "with `torch_geometric.datasets.QM9(root)` or use source='qm9pack'."
            )

        def _process(self) -> None:
            # torch_geometric unpickles processed/pre_transform.pt and pre_filter.pt with
            # weights_only=False first: skip that (nothing is pre-transformed here)
            if files_exist(self.processed_paths):
                return
            try:  # without RDKit, torch_geometric unpickles raw/qm9_v3.pt with a fallback
                import rdkit  # noqa: F401  # to a full unpickler: refuse that path
            except ImportError as err:
                raise FileNotFoundError(
                    f"no processed torch_geometric QM9 under {root_path} and no RDKit to "
                    "process the raw files safely: install rdkit or use source='qm9pack'"
                ) from err
            os.makedirs(self.processed_dir, exist_ok=True)
            self.process()  # what torch_geometric's _process does, less the unpickling

        def load(self, path: str, data_cls: Any = Data) -> None:
            # weights only, without torch_geometric's fallback to a full unpickler
            try:
                out = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # damaged files and refused pickles fail in many ways
                raise ValueError(
                    f"cannot read torch_geometric QM9 file {path} with torch.load("
                    "weights_only=True) (damaged, or holding objects other than tensors and "
                    f"torch_geometric's data classes): {type(err).__name__}: {err}"
                ) from err
            if not isinstance(out, tuple) or len(out) not in (2, 3):
                raise ValueError(f"{path} is not a processed torch_geometric dataset")
            data, self.slices = out[0], out[1]
            cls = out[2] if len(out) == 3 else data_cls
            self.data = cls.from_dict(data) if isinstance(data, dict) else data

    if not root_path.is_dir():
        raise FileNotFoundError(
            f"torch_geometric QM9 folder {root_path} does not exist; download it once with "
            "`torch_geometric.datasets.QM9(root)` or use source='qm9pack'."
        )
    ds = _OfflinePygQM9(str(root_path))
    data, slices = ds._data, ds.slices
    if slices is None or "z" not in slices or getattr(data, "z", None) is None:
        raise ValueError(f"torch_geometric QM9 under {root_path} has no atomic numbers 'z'")
    offsets = slices["z"].long()
    counts = (offsets[1:] - offsets[:-1]).numpy()
    num = counts.size
    if check_count and num != QM9_NUM_MOLECULES:
        raise ValueError(
            f"torch_geometric QM9 under {root_path} holds {num} molecules, expected "
            f"{QM9_NUM_MOLECULES}; EDM's split is only defined on the full set"
        )
    smiles = getattr(data, "smiles", None)
    if not isinstance(smiles, list) or len(smiles) != num:
        smiles = [""] * num
    idx = getattr(data, "idx", None)
    gdb = idx.view(-1).long().numpy() + 1 if isinstance(idx, Tensor) else np.arange(num) + 1
    store = _make_store(
        z=data.z.numpy().astype(np.uint8),
        pos=data.pos.numpy().astype(np.float32),
        counts=counts,
        gdb_idx=gdb,
        smiles=[str(s) for s in smiles],
    )
    _check_store(store, f"torch_geometric QM9 under {root_path}")
    return store


# --------------------------------------------------------------------------- dataset


def _strip_hydrogens(store: Store) -> Store:
    """The same store with every hydrogen atom dropped (offsets recomputed)."""
    keep = store["z"] != 1
    cum = torch.zeros(keep.numel() + 1, dtype=torch.int64)
    torch.cumsum(keep.long(), 0, out=cum[1:])
    out = dict(store)
    out["z"] = store["z"][keep]
    out["pos"] = store["pos"][keep]
    out["offsets"] = cum[store["offsets"]]
    return out


class QM9(Dataset):
    """QM9 molecules with EDM's split and features, as ``torch_geometric`` ``Data`` objects.

    Parameters
    ----------
    split : Literal["train", "valid", "test"], default "train"
        EDM split: 100,000 / 17,748 / 13,083 molecules (see
        [`qm9_split_indices`][canonwrap.data.qm9.qm9_split_indices]).
    remove_h : bool, default False
        Drop hydrogen atoms; ``x`` then one-hot encodes C, N, O, F only (``[n, 5]``) and
        positions are centred on the heavy atoms.
    root : path, optional
        For ``source="qm9pack"`` the cache folder (default
        [`default_cache_dir`][canonwrap.data.qm9.default_cache_dir],
        i.e. ``$CANONWRAP_CACHE/qm9`` or ``~/.cache/canonwrap/qm9``); for ``source="pyg"``
        the (required) folder of an already downloaded ``torch_geometric.datasets.QM9``.
    source : Literal["qm9pack", "pyg"], default "qm9pack"
        Where the molecules come from. ``"qm9pack"`` parses the CSVs shipped in the
        ``qm9pack`` package once and caches concatenated tensors on disk; ``"pyg"`` reads a
        torch_geometric QM9 folder and never downloads.
    transform : callable, optional
        Applied to each ``Data`` object on access.
    progress : bool, default True
        Progress bar while parsing the CSVs the first time.

    Notes
    -----
    Each item is a ``Data`` with ``z`` long ``[n]``, ``pos`` float32 ``[n, 3]`` (Angstrom,
    centre of geometry removed), ``x`` float32 ``[n, 6]`` or ``[n, 5]``
    ([`qm9_features`][canonwrap.data.qm9_features]), ``idx`` (int, position in the full
    130,831-molecule set), ``gdb_idx`` (int, 1-based QM9 number) and ``smiles`` (str; the single
    SMILES column of qm9pack, or RDKit SMILES for ``source="pyg"``).

    Indexing with an int gives one molecule; a slice, index sequence, boolean mask or
    integer array gives a new ``QM9`` view on those molecules (sharing memory).

    Examples
    --------
    >>> train = QM9("train")                     # doctest: +SKIP
    >>> train[0].x.shape                         # doctest: +SKIP
    torch.Size([n, 6])
    >>> small = train[:64]                       # doctest: +SKIP
    """

    SPLITS: tuple[str, ...] = ("train", "valid", "test")
    SOURCES: tuple[str, ...] = ("qm9pack", "pyg")

    def __init__(
        self,
        split: str = "train",
        remove_h: bool = False,
        root: str | os.PathLike[str] | None = None,
        source: str = "qm9pack",
        *,
        transform: Callable[[Data], Data] | None = None,
        progress: bool = True,
    ) -> None:
        if split not in self.SPLITS:
            raise ValueError(f"unknown QM9 split {split!r}; expected one of {list(self.SPLITS)}")
        if source not in self.SOURCES:
            raise ValueError(f"unknown QM9 source {source!r}; expected one of {list(self.SOURCES)}")
        if source == "pyg":
            if root is None:
                raise ValueError(
                    "source='pyg' needs root= pointing to a downloaded torch_geometric QM9 folder"
                )
            store = _load_pyg_store(root)
        else:
            store = _load_qm9pack_store(root, progress=progress)
        num = store["offsets"].numel() - 1
        if num != QM9_NUM_MOLECULES:
            raise ValueError(f"QM9 data hold {num} molecules, expected {QM9_NUM_MOLECULES}")
        if remove_h:
            store = _strip_hydrogens(store)
        self.split = split
        self.remove_h = bool(remove_h)
        self.source = source
        self.transform = transform
        self._store = store
        self._offsets_np: np.ndarray = store["offsets"].numpy()
        self._smiles_buf: bytes = store["smiles_bytes"].numpy().tobytes()
        self._smiles_off: np.ndarray = store["smiles_offsets"].numpy()
        self._types = QM9_HEAVY_ATOM_TYPES if self.remove_h else QM9_ATOM_TYPES
        self._indices: np.ndarray = qm9_split_indices(num)[split]

    # ------------------------------------------------------------------ container protocol

    def __len__(self) -> int:
        return int(self._indices.size)

    def __getitem__(self, item: int | slice | Sequence[int] | np.ndarray | Tensor) -> Any:
        if isinstance(item, (int, np.integer)) or (
            isinstance(item, Tensor) and item.dim() == 0 and not item.is_floating_point()
        ):
            i = int(item)
            n = len(self)
            if not -n <= i < n:
                raise IndexError(f"index {i} out of range for QM9 {self.split} of size {n}")
            return self.get(int(self._indices[i]))
        if isinstance(item, slice):
            return self._view(self._indices[item])
        arr = item.cpu().numpy() if isinstance(item, Tensor) else np.asarray(item)
        if arr.dtype == np.bool_:
            if arr.shape != self._indices.shape:
                raise IndexError(f"boolean mask of shape {arr.shape}, expected ({len(self)},)")
            return self._view(self._indices[arr])
        if arr.size == 0:
            return self._view(self._indices[:0])
        if not np.issubdtype(arr.dtype, np.integer) or arr.ndim != 1:
            raise IndexError(f"cannot index QM9 with {type(item).__name__} {arr.dtype}")
        return self._view(self._indices[arr])

    def __iter__(self) -> Iterator[Data]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        h = ", remove_h=True" if self.remove_h else ""
        return f"QM9(split={self.split!r}{h}, source={self.source!r}, len={len(self)})"

    def _view(self, indices: np.ndarray) -> QM9:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._indices = np.asarray(indices, dtype=np.int64)
        return new

    # ------------------------------------------------------------------ access

    def get(self, idx: int) -> Data:
        """The molecule at position ``idx`` of the full 130,831-molecule set (any split)."""
        a, b = int(self._offsets_np[idx]), int(self._offsets_np[idx + 1])
        z = self._store["z"][a:b].long()
        pos = self._store["pos"][a:b]
        pos = pos - pos.mean(dim=0, keepdim=True)
        data = Data(
            z=z,
            pos=pos,
            x=_features_unchecked(z, self._types),
            idx=int(idx),
            gdb_idx=int(self._store["gdb_idx"][idx]),
            smiles=self._smiles_of(idx),
        )
        return self.transform(data) if self.transform is not None else data

    def _smiles_of(self, idx: int) -> str:
        a, b = int(self._smiles_off[idx]), int(self._smiles_off[idx + 1])
        return self._smiles_buf[a:b].decode("utf-8")

    @property
    def indices(self) -> np.ndarray:
        """Positions ``[len(self)]`` of this dataset's molecules in the full set (a copy)."""
        return self._indices.copy()

    def num_atoms(self) -> Tensor:
        """Number of atoms (nodes) of each molecule, long ``[len(self)]``."""
        sizes = self._offsets_np[self._indices + 1] - self._offsets_np[self._indices]
        return torch.from_numpy(sizes.astype(np.int64))

    def node_count_histogram(self) -> dict[int, int]:
        """Counts of molecules per number of atoms, ``{n_atoms: count}`` sorted by ``n_atoms``.

        Only sizes that occur are listed; the counts sum to ``len(self)``. This is EDM's
        ``n_nodes`` histogram used to sample molecule sizes.
        """
        sizes, counts = np.unique(self.num_atoms().numpy(), return_counts=True)
        return {int(s): int(c) for s, c in zip(sizes, counts)}

    def smiles(self) -> list[str]:
        """SMILES of this dataset's molecules, in dataset order (``QM9("train").smiles()``
        gives the training SMILES used for novelty)."""
        return [self._smiles_of(int(i)) for i in self._indices]

    def subset(self, n: int) -> QM9:
        """A view on the first ``n`` molecules (``self[:n]``)."""
        if n < 0:
            raise ValueError(f"subset size must be non-negative, got {n}")
        return self[:n]

    def seeded_subset(self, n: int | None, seed: int = 12345) -> QM9:
        """A fixed random subset of ``n`` molecules, in dataset order (all when ``n`` is
        ``None`` or at least ``len(self)``). The same ``n`` and ``seed`` always give the same
        molecules, so every model of a comparison is scored on the same ones (the QM9
        example's validation and test subsets are these, with the default seed)."""
        if n is None or n >= len(self):
            return self
        if n < 0:
            raise ValueError(f"subset size must be non-negative, got {n}")
        gen = torch.Generator().manual_seed(seed)
        return self[torch.randperm(len(self), generator=gen)[:n].sort().values]
