"""Tests of the QM9 dataset (qm9pack source, EDM split and features).

The first run parses the qm9pack CSVs into the default cache (``$CANONWRAP_CACHE/qm9`` or
``~/.cache/canonwrap/qm9``), about 6-15 s; afterwards every load reads the cache.
"""

from __future__ import annotations

import importlib.metadata as importlib_metadata
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from canonwrap.data import QM9, QM9_ATOM_TYPES, qm9_features
from canonwrap.data import qm9 as qm9mod

SIZES = {"train": 100_000, "valid": 17_748, "test": 13_083}

# EDM's configs/datasets_config.py: n_nodes histogram of its QM9 training split.
EDM_TRAIN_N_NODES = {
    22: 3393, 17: 13025, 23: 4848, 21: 9970, 19: 13832, 20: 9482, 16: 10644, 13: 3060,
    15: 7796, 25: 1506, 18: 13364, 12: 1689, 11: 807, 24: 539, 14: 5136, 26: 48, 7: 16,
    10: 362, 8: 49, 9: 124, 27: 266, 4: 4, 29: 25, 6: 9, 5: 5, 3: 1,
}  # fmt: skip
EDM_TRAIN_N_NODES_NO_H = {9: 83366, 8: 13625, 7: 2404, 6: 475, 5: 91, 4: 25, 3: 7, 1: 2, 2: 5}

CSV_HEADER = "XYZ_file,Index,SMILES,InChi,N_atoms,Stoichiometry,Elements,XYZ_Ang,Dipole_debye\n"


def _have_qm9_data() -> bool:
    try:
        qm9mod._qm9pack_csv_paths()
        return True
    except FileNotFoundError:
        return qm9mod._cache_file(qm9mod.default_cache_dir(), None).is_file()


needs_data = pytest.mark.skipif(not _have_qm9_data(), reason="qm9pack data not installed")


@pytest.fixture(scope="module")
def splits() -> dict[str, QM9]:
    return {s: QM9(s, progress=False) for s in SIZES}


@pytest.fixture(scope="module")
def valid_no_h() -> QM9:
    return QM9("valid", remove_h=True, progress=False)


# --------------------------------------------------------------------------- split


@needs_data
def test_split_sizes_disjoint_and_cover(splits: dict[str, QM9]) -> None:
    for name, size in SIZES.items():
        assert len(splits[name]) == size
        assert splits[name].split == name
    idx = [splits[s].indices for s in SIZES]
    union = np.concatenate(idx)
    assert np.unique(union).size == union.size == qm9mod.QM9_NUM_MOLECULES
    assert np.array_equal(np.sort(union), np.arange(qm9mod.QM9_NUM_MOLECULES))


def test_split_is_edm_random_state_permutation() -> None:
    np.random.seed(0)  # EDM: np.random.seed(0); np.random.permutation(Nmols)
    perm = np.random.permutation(qm9mod.QM9_NUM_MOLECULES)
    split = qm9mod.qm9_split_indices()
    assert np.array_equal(split["train"], np.sort(perm[:100_000]))
    assert np.array_equal(split["valid"], np.sort(perm[100_000:117_748]))
    assert np.array_equal(split["test"], np.sort(perm[117_748:]))


@needs_data
def test_train_histograms_match_edm(splits: dict[str, QM9]) -> None:
    assert splits["train"].node_count_histogram() == EDM_TRAIN_N_NODES
    assert QM9("train", remove_h=True, progress=False).node_count_histogram() == (
        EDM_TRAIN_N_NODES_NO_H
    )


@needs_data
def test_histogram_sums_to_split_size(splits: dict[str, QM9]) -> None:
    for name, ds in splits.items():
        hist = ds.node_count_histogram()
        assert sum(hist.values()) == SIZES[name]
        assert list(hist) == sorted(hist) and min(hist) >= 1 and max(hist) <= 29
        assert sum(n * c for n, c in hist.items()) == int(ds.num_atoms().sum())


def test_bad_split_and_source() -> None:
    with pytest.raises(ValueError, match="split"):
        QM9("training")
    with pytest.raises(ValueError, match="source"):
        QM9("train", source="nope")
    with pytest.raises(ValueError, match="root"):
        QM9("train", source="pyg")


# --------------------------------------------------------------------------- items


@needs_data
def test_methane_features(splits: dict[str, QM9]) -> None:
    ds = splits["train"]  # molecule 0 (methane) is in EDM's training split
    pos_in_split = int(np.searchsorted(ds.indices, 0))
    assert ds.indices[pos_in_split] == 0
    mol = ds[pos_in_split]
    assert mol.z.dtype == torch.long and mol.z.tolist() == [6, 1, 1, 1, 1]
    assert mol.idx == 0 and mol.gdb_idx == 1 and mol.smiles == "C"
    expected = torch.tensor(
        [[0, 0.25, 0, 0, 0, 0.6]] + [[0.25, 0, 0, 0, 0, 0.1]] * 4, dtype=torch.float32
    )
    assert mol.x.dtype == torch.float32
    torch.testing.assert_close(mol.x, expected)
    # raw coordinates of dsgdb9nsd_000001.xyz, centred
    raw = torch.tensor(
        [
            [-0.0126981359, 1.0858041578, 0.0080009958],
            [0.002150416, -0.0060313176, 0.0019761204],
            [1.0117308433, 1.4637511618, 0.0002765748],
            [-0.540815069, 1.4475266138, -0.8766437152],
            [-0.5238136345, 1.4379326443, 0.9063972942],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(mol.pos.double(), raw - raw.mean(0), atol=1e-5, rtol=0)


@needs_data
def test_items_dtypes_and_centred(splits: dict[str, QM9]) -> None:
    for mol in splits["test"].subset(200):
        n = mol.z.numel()
        assert mol.pos.shape == (n, 3) and mol.pos.dtype == torch.float32
        assert mol.x.shape == (n, 6) and mol.x.dtype == torch.float32
        assert set(mol.z.tolist()) <= set(QM9_ATOM_TYPES)
        torch.testing.assert_close(mol.pos.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(mol.x, qm9_features(mol.z))
        assert isinstance(mol.idx, int) and isinstance(mol.smiles, str) and mol.smiles


@needs_data
def test_remove_h(splits: dict[str, QM9], valid_no_h: QM9) -> None:
    full = splits["valid"]
    assert len(valid_no_h) == len(full)
    assert np.array_equal(valid_no_h.indices, full.indices)
    for i in range(0, len(full), 997):
        a, b = full[i], valid_no_h[i]
        heavy = a.z != 1
        assert b.idx == a.idx and b.smiles == a.smiles
        assert torch.equal(b.z, a.z[heavy]) and bool((b.z != 1).all())
        assert b.x.shape == (b.z.numel(), 5)
        torch.testing.assert_close(b.x, qm9_features(b.z, remove_h=True))
        torch.testing.assert_close(b.pos.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
        expected = a.pos[heavy] - a.pos[heavy].mean(0)  # recentred on the heavy atoms
        torch.testing.assert_close(b.pos, expected, atol=1e-5, rtol=0)
    hist = valid_no_h.node_count_histogram()
    assert sum(hist.values()) == len(full) and max(hist) <= 9


@needs_data
def test_slicing_views_and_collate(splits: dict[str, QM9]) -> None:
    from torch_geometric.loader import DataLoader

    ds = splits["test"]
    small = ds[:10]
    assert isinstance(small, QM9) and len(small) == 10
    assert np.array_equal(small.indices, ds.indices[:10])
    assert small[3].idx == ds[3].idx and ds[-1].idx == ds.indices[-1]
    assert [m.idx for m in ds[[4, 2]]] == [ds[4].idx, ds[2].idx]
    assert len(ds[torch.tensor([1, 2, 3])]) == 3
    assert ds[torch.tensor(5)].idx == ds[5].idx
    mask = np.zeros(len(ds), dtype=bool)
    mask[[0, 7]] = True
    assert len(ds[mask]) == 2
    assert ds.subset(5).smiles() == [ds[i].smiles for i in range(5)]
    with pytest.raises(IndexError):
        ds[len(ds)]
    batch = next(iter(DataLoader(small, batch_size=4)))
    assert batch.num_graphs == 4 and batch.x.shape[1] == 6
    assert batch.idx.tolist() == small.indices[:4].tolist()


@needs_data
def test_smiles_list(splits: dict[str, QM9]) -> None:
    smiles = splits["train"].smiles()
    assert len(smiles) == SIZES["train"] and all(isinstance(s, str) and s for s in smiles)


@needs_data
def test_second_load_is_fast(splits: dict[str, QM9]) -> None:
    assert qm9mod._cache_file(qm9mod.default_cache_dir(), None).is_file()
    start = time.perf_counter()
    ds = QM9("test", progress=False)
    elapsed = time.perf_counter() - start
    assert len(ds) == SIZES["test"]
    assert elapsed < 5.0, f"cached load took {elapsed:.2f} s"


# --------------------------------------------------------------------------- features


def test_qm9_features_values_and_errors() -> None:
    x = qm9_features(torch.tensor([1, 6, 7, 8, 9]))
    expected = torch.cat([torch.eye(5) / 4, torch.tensor([[0.1], [0.6], [0.7], [0.8], [0.9]])], 1)
    torch.testing.assert_close(x, expected)
    x = qm9_features([6, 9], remove_h=True)
    torch.testing.assert_close(x, torch.tensor([[0.25, 0, 0, 0, 0.6], [0, 0, 0, 0.25, 0.9]]))
    assert qm9_features(torch.zeros(0, dtype=torch.long)).shape == (0, 6)
    with pytest.raises(ValueError, match=r"unknown atom type.*\[16\]"):
        qm9_features(torch.tensor([6, 16]))
    with pytest.raises(ValueError, match="unknown atom type"):
        qm9_features([1, 6], remove_h=True)
    with pytest.raises(ValueError, match="one-dimensional"):
        qm9_features(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        qm9_features(torch.tensor([6.0]))


# --------------------------------------------------------------------------- parsing / cache


def _write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text(CSV_HEADER + "".join(r + "\n" for r in rows))
    return path


def test_parser_accepts_bare_dot_and_exponent_tokens(tmp_path: Path) -> None:
    rows = [
        '"dsgdb9nsd_000003.xyz",3,"O","InChI=1S/H2O/h1H2",3,"[2,0,0,1,0]","[\'O\',\'H\',\'H\']",'
        '"[[0.,1.5E-5,-0.],[1.,0.,0.],[0.,1.,0.]]",0.',
    ]
    store = qm9mod._parse_qm9pack_csvs(
        [_write_csv(tmp_path / "a.csv", rows)], limit=10, progress=False
    )
    assert store["z"].tolist() == [8, 1, 1]
    assert store["offsets"].tolist() == [0, 3] and store["gdb_idx"].tolist() == [3]
    torch.testing.assert_close(
        store["pos"], torch.tensor([[0.0, 1.5e-5, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    )


def test_parser_reports_corrupt_rows(tmp_path: Path) -> None:
    bad = '"x.xyz",1,"C","I",5,"[4,1,0,0,0]","[\'C\',\'H\']","[[0.0,1.0,2.0],[1,2,3]]",0.'
    with pytest.raises(ValueError, match=r"corrupt near line 2.*N_atoms=5"):
        qm9mod._parse_qm9pack_csvs([_write_csv(tmp_path / "b.csv", [bad])], progress=False)
    odd = '"x.xyz",1,"C","I",1,"[0,0,0,0,0]","[\'Si\']","[[0.0,1.0,2.0]]",0.'
    with pytest.raises(ValueError, match="corrupt"):
        qm9mod._parse_qm9pack_csvs([_write_csv(tmp_path / "c.csv", [odd])], progress=False)
    (tmp_path / "d.csv").write_text("Index,SMILES\n1,C\n")
    with pytest.raises(ValueError, match="lacks column"):
        qm9mod._parse_qm9pack_csvs([tmp_path / "d.csv"], progress=False)


def test_missing_qm9pack_gives_install_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def not_installed(name: str) -> None:
        raise importlib_metadata.PackageNotFoundError(name)

    monkeypatch.setattr(qm9mod.importlib_metadata, "files", not_installed)
    monkeypatch.setenv("CANONWRAP_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip install qm9pack"):
        qm9mod._qm9pack_csv_paths()
    with pytest.raises(FileNotFoundError, match="qm9_part1.csv"):
        QM9("test", progress=False)


@needs_data
def test_cache_mechanics(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CANONWRAP_CACHE", str(tmp_path))
    assert qm9mod.default_cache_dir() == tmp_path / "qm9"
    store = qm9mod._load_qm9pack_store(limit=25, progress=False)
    cache = tmp_path / "qm9" / "qm9pack_v2_first25.pt"
    assert cache.is_file()
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temp files left
    assert store["offsets"].numel() == 26 and store["gdb_idx"][:3].tolist() == [1, 2, 3]

    def no_parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been used")

    with monkeypatch.context() as m:
        m.setattr(qm9mod, "_parse_qm9pack_csvs", no_parse)
        again = qm9mod._load_qm9pack_store(limit=25, progress=False)
    for key, value in store.items():
        assert torch.equal(again[key], value), key

    cache.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable"):
        rebuilt = qm9mod._load_qm9pack_store(limit=25, progress=False)
    assert torch.equal(rebuilt["pos"], store["pos"])
    assert torch.load(cache, weights_only=True)["limit"] == 25


def _rebuilds(match: str, store: dict) -> None:
    """Loading the cache warns ``match``, re-parses the CSVs and gives ``store`` back."""
    with pytest.warns(UserWarning, match=match):
        rebuilt = qm9mod._load_qm9pack_store(limit=25, progress=False)
    for key, value in store.items():
        assert torch.equal(rebuilt[key], value), key


@needs_data
def test_damaged_cache_is_caught_and_rebuilt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Altered bytes, non-finite positions and pickled code in the QM9 cache never reach a
    dataset: each is caught (checksum, finiteness, weights-only load) and the cache rebuilt."""
    from canonwrap._io import tree_digest
    from tests.training.helpers import Payload

    monkeypatch.setenv("CANONWRAP_CACHE", str(tmp_path))
    store = qm9mod._load_qm9pack_store(limit=25, progress=False)
    cache = tmp_path / "qm9" / "qm9pack_v2_first25.pt"

    # finite garbage inside the positions: torch.load alone reads it without a word
    data = bytearray(cache.read_bytes())
    at = data.find(store["pos"].numpy().tobytes())
    assert at > 0
    data[at + 40 : at + 40 + 4 * 64] = np.full(64, 1.5, dtype="<f4").tobytes()
    cache.write_bytes(bytes(data))
    assert not torch.equal(torch.load(cache, weights_only=True)["pos"], store["pos"])
    _rebuilds("checksum mismatch", store)

    # NaN positions behind a matching checksum
    obj = torch.load(cache, weights_only=True)
    obj["pos"][7] = float("nan")
    obj["checksum"] = tree_digest([obj[k] for k in qm9mod._STORE_KEYS])
    torch.save(obj, cache)
    _rebuilds(r"non-finite positions in 1 molecules \(indices \[", store)

    # pickled code in place of the cache
    marker = tmp_path / "ran"
    torch.save({"format": qm9mod._CACHE_FORMAT, "x": Payload(marker)}, cache)
    _rebuilds("unreadable or damaged", store)
    assert not marker.exists()
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]


def test_novelty_smiles_cache_is_verified_and_rebuilt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import canonwrap.metrics.molecules as molecules
    from canonwrap.evaluation import qm9_reference_smiles

    raw = ["C", "CO", "CCO", "not a molecule"]

    class FakeQM9:
        def __init__(self, split: str, remove_h: bool = False, progress: bool = True) -> None:
            assert split == "train"

        def smiles(self) -> list[str]:
            return list(raw)

    calls: list[str] = []

    def canonicalize(smiles: str) -> str | None:
        calls.append(smiles)
        return None if " " in smiles else f"[{smiles}]"

    monkeypatch.setenv("CANONWRAP_CACHE", str(tmp_path))
    monkeypatch.setattr(qm9mod, "QM9", FakeQM9)
    monkeypatch.setattr(molecules, "canonicalize_smiles", canonicalize)
    expected = ["[C]", "[CO]", "[CCO]"]
    assert qm9_reference_smiles(progress=False) == expected
    path = tmp_path / "qm9" / "train_smiles_metric_v2.txt"
    calls.clear()
    assert qm9_reference_smiles(progress=False) == expected and calls == []  # reused
    good = path.read_text()

    def rebuilt(match: str) -> None:
        calls.clear()
        with pytest.warns(UserWarning, match=match):
            assert qm9_reference_smiles(progress=False) == expected
        assert len(calls) == len(raw) and path.read_text() == good

    path.write_text("\n".join(good.split("\n")[:2]))  # a 2-line cache
    rebuilt("holds 1 SMILES, its header says 3")
    path.write_text(good.replace("[CO]", "[CN]"))
    rebuilt("checksum mismatch")
    path.write_text("[C]\n[CO]\n[CCO]")  # the list alone, as older versions wrote it
    rebuilt("no valid header")
    path.write_bytes(b"\xff\xfe garbage")
    rebuilt("rebuilt")
    raw.append("CC")  # other training data: the cache no longer matches them
    with pytest.warns(UserWarning, match="built from other training SMILES"):
        assert qm9_reference_smiles(progress=False) == [*expected, "[CC]"]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_pyg_source_offline(tmp_path: Path) -> None:
    from torch_geometric.data import Data, InMemoryDataset

    with pytest.raises(FileNotFoundError, match="torch_geometric"):
        QM9("train", source="pyg", root=tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="data_v3.pt"):
        QM9("train", source="pyg", root=tmp_path / "empty")

    # a miniature processed torch_geometric QM9 folder
    mols = [
        Data(z=torch.tensor([6, 1, 1, 1, 1]), pos=torch.randn(5, 3), smiles="C", idx=0),
        Data(z=torch.tensor([8, 1, 1]), pos=torch.randn(3, 3), smiles="O", idx=2),
    ]
    (tmp_path / "pyg" / "processed").mkdir(parents=True)
    InMemoryDataset.save(mols, str(tmp_path / "pyg" / "processed" / "data_v3.pt"))
    store = qm9mod._load_pyg_store(tmp_path / "pyg", check_count=False)
    assert store["z"].tolist() == [6, 1, 1, 1, 1, 8, 1, 1]
    assert store["offsets"].tolist() == [0, 5, 8] and store["gdb_idx"].tolist() == [1, 3]
    torch.testing.assert_close(store["pos"], torch.cat([m.pos for m in mols]))
    with pytest.raises(ValueError, match="130831"):
        QM9("train", source="pyg", root=tmp_path / "pyg")


def test_pyg_source_runs_no_pickled_code(tmp_path: Path) -> None:
    """torch_geometric itself unpickles ``pre_transform.pt`` fully and falls back to a full
    unpickler when a weights-only load fails; the offline reader does neither."""
    from torch_geometric.data import Data, InMemoryDataset

    from tests.training.helpers import Payload

    processed = tmp_path / "pyg" / "processed"
    processed.mkdir(parents=True)
    mols = [
        Data(z=torch.tensor([8, 1, 1]), pos=torch.randn(3, 3), smiles="O", idx=i) for i in (0, 1)
    ]
    InMemoryDataset.save(mols, str(processed / "data_v3.pt"))
    marker = tmp_path / "ran"
    for name in ("pre_transform.pt", "pre_filter.pt"):
        torch.save(Payload(marker), processed / name)
    assert (
        qm9mod._load_pyg_store(tmp_path / "pyg", check_count=False)["z"].tolist() == [8, 1, 1] * 2
    )
    torch.save((Payload(marker), {}), processed / "data_v3.pt")
    with pytest.raises(ValueError, match="cannot read torch_geometric QM9 file .*data_v3.pt"):
        qm9mod._load_pyg_store(tmp_path / "pyg", check_count=False)
    assert not marker.exists()
