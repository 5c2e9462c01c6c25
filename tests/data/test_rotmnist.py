"""RotatedMNIST on tiny synthetic IDX (raw and gzip) and .amat files, plus the real
MNIST test digits when ``$CANONWRAP_MNIST`` names a folder holding them."""

from __future__ import annotations

import gzip
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from canonwrap.data import rotmnist
from canonwrap.data.rotmnist import (
    AMAT_FILES,
    RotatedMNIST,
    default_mnist_root,
    holdout_split,
    read_amat,
    read_idx,
)
from canonwrap.groups import rotate_images


def digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` asymmetric 28x28 uint8 "digits" (an L shape with random bar lengths)."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        a, b = rng.integers(6, 12, size=2)
        images[i, 8 : 8 + a, 10:13] = 255
        images[i, 8 + a - 3 : 8 + a, 10 : 10 + b] = 200
    return images, rng.integers(0, 10, size=n).astype(np.uint8)


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def make_idx(folder: Path, n_test: int, n_train: int = 0, compress: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = digits(n_test)
    write_idx(folder / "t10k-images-idx3-ubyte", images, compress)
    write_idx(folder / "t10k-labels-idx1-ubyte", labels, compress)
    if n_train:
        images, labels = digits(n_train, seed=1)
        write_idx(folder / "train-images-idx3-ubyte", images, compress)
        write_idx(folder / "train-labels-idx1-ubyte", labels, compress)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_raw_and_gzip(tmp_path, compress):
    make_idx(tmp_path, 20, compress=compress)
    images, labels = digits(20)
    name = "t10k-labels-idx1-ubyte" + (".gz" if compress else "")
    assert torch.equal(read_idx(tmp_path / name), torch.from_numpy(labels))
    ds = RotatedMNIST(tmp_path, split="all", rotate=False)
    assert ds.source == "idx" and len(ds) == 20
    assert ds.images.shape == (20, 1, 28, 28) and ds.images.dtype == torch.float32
    assert torch.allclose(ds.images[:, 0], torch.from_numpy(images).float() / 255)
    assert torch.equal(ds.labels, torch.from_numpy(labels).long())
    image, label = ds[3]
    assert image.shape == (1, 28, 28) and label.dtype == torch.long


def test_rotation_angles_are_seeded_and_applied(tmp_path):
    make_idx(tmp_path, 12)
    a = RotatedMNIST(tmp_path, split="all", seed=5)
    b = RotatedMNIST(tmp_path, split="all", seed=5)
    c = RotatedMNIST(tmp_path, split="all", seed=6)
    upright = RotatedMNIST(tmp_path, split="all", rotate=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.angles, b.angles)
    assert not torch.equal(a.angles, c.angles)
    assert ((a.angles >= 0) & (a.angles < 2 * math.pi)).all()
    expected = rotate_images(upright.images, a.angles.float())
    assert torch.allclose(a.images, expected)
    assert a.images.min() >= 0 and a.images.max() <= 1
    sym = RotatedMNIST(tmp_path, split="all", seed=5, symmetric=True)
    assert torch.allclose(sym.images, a.images * 2 - 1)
    assert sym.images.min() >= -1 and sym.images.max() <= 1


def test_holdout_split_of_test_digits_only(tmp_path):
    make_idx(tmp_path, 50, compress=False)
    train = RotatedMNIST(tmp_path, split="train", test_size=10)
    test = RotatedMNIST(tmp_path, split="test", test_size=10)
    full = RotatedMNIST(tmp_path, split="all")
    tr_idx, te_idx = holdout_split(50, 10, seed=0)
    assert len(train) == 40 and len(test) == 10
    assert set(tr_idx.tolist()).isdisjoint(te_idx.tolist())
    assert torch.equal(test.images, full.images[te_idx])  # a digit keeps its angle
    assert torch.equal(train.labels, full.labels[tr_idx])
    again = holdout_split(50, 10, seed=0)
    assert torch.equal(again[1], te_idx) and not torch.equal(holdout_split(50, 10, 1)[1], te_idx)
    # "valid" exists only in the .amat files, which are missing here
    with pytest.raises(FileNotFoundError, match="split 'valid' not available"):
        RotatedMNIST(tmp_path, split="valid")


def test_train_files_and_torchvision_layout(tmp_path):
    make_idx(tmp_path / "MNIST" / "raw", 6, n_train=9)
    assert len(RotatedMNIST(tmp_path, split="train")) == 9
    assert len(RotatedMNIST(tmp_path, split="test")) == 6
    assert len(RotatedMNIST(tmp_path, split="all")) == 15


def write_amat(path: Path, images: np.ndarray, labels: np.ndarray, transposed: bool) -> None:
    """Write rows as the benchmark files do: column-major pixels (``transposed``), label."""
    flat = (images.transpose(0, 2, 1) if transposed else images).reshape(len(images), -1)
    with open(path, "w") as fh:
        for row, label in zip(flat / 255.0, labels):
            fh.write(" ".join(f"{v:.6g}" for v in row) + f" {float(label):.1f}\n")


def test_amat(tmp_path):
    images, labels = digits(5)
    write_amat(tmp_path / AMAT_FILES["test"], images, labels, transposed=True)
    ds = RotatedMNIST(tmp_path, split="test")
    assert ds.source == "amat" and ds.angles is None and len(ds) == 5
    assert torch.allclose(ds.images[:, 0], torch.from_numpy(images).float() / 255, atol=1e-6)
    assert torch.equal(ds.labels, torch.from_numpy(labels).long())
    raw, _ = read_amat(tmp_path / AMAT_FILES["test"], transpose=False)
    assert torch.allclose(raw, ds.images.transpose(-2, -1))
    with pytest.raises(FileNotFoundError, match="train_valid"):
        RotatedMNIST(tmp_path, split="valid", source="amat")


def test_amat_train_valid_split(tmp_path, monkeypatch):
    monkeypatch.setattr(rotmnist, "AMAT_NUM_TRAIN", 4)
    images, labels = digits(6)
    write_amat(tmp_path / AMAT_FILES["trainval"], images, labels, transposed=True)
    assert len(RotatedMNIST(tmp_path, split="train")) == 4
    assert len(RotatedMNIST(tmp_path, split="valid")) == 2
    assert len(RotatedMNIST(tmp_path, split="trainval")) == 6


def test_missing_files_error_names_them(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if not installed
    with pytest.raises(FileNotFoundError) as info:
        RotatedMNIST(tmp_path / "nothing", split="test")
    message = str(info.value)
    assert "t10k-images-idx3-ubyte" in message and AMAT_FILES["test"] in message
    assert "CANONWRAP_MNIST" in message


def test_torchvision_source_without_download(tmp_path, monkeypatch):
    images, labels = digits(7)
    calls = []

    class FakeMNIST:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            if train:
                raise RuntimeError("Dataset not found")
            self.data = torch.from_numpy(images)
            self.targets = torch.from_numpy(labels).long()

    datasets = types.ModuleType("torchvision.datasets")
    datasets.MNIST = FakeMNIST
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    ds = RotatedMNIST(tmp_path, split="all", source="torchvision", rotate=False)
    assert ds.source == "torchvision" and len(ds) == 7
    assert all(download is False for _, _, download in calls)


def test_default_root_from_environment(tmp_path, monkeypatch):
    make_idx(tmp_path, 4)
    monkeypatch.setenv("CANONWRAP_MNIST", str(tmp_path))
    assert default_mnist_root() == tmp_path
    assert len(RotatedMNIST(split="all")) == 4


def test_no_default_root_without_the_environment_variable(monkeypatch):
    monkeypatch.delenv("CANONWRAP_MNIST", raising=False)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if not installed
    assert default_mnist_root() is None
    with pytest.raises(FileNotFoundError, match="CANONWRAP_MNIST unset"):
        RotatedMNIST(split="all")


def _real_mnist() -> Path | None:
    root = default_mnist_root()
    if root is None or not any(root.glob("t10k-images-idx3-ubyte*")):
        return None
    return root


@pytest.mark.skipif(
    _real_mnist() is None,
    reason="real MNIST test digits: set CANONWRAP_MNIST to a folder with the t10k IDX files",
)
def test_real_mnist_test_digits():
    ds = RotatedMNIST(split="all")
    assert ds.root.resolve() == _real_mnist().resolve()
    assert len(ds) == 10_000 and ds.images.shape == (10_000, 1, 28, 28)
    # the published class counts of the MNIST test set
    counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert torch.bincount(ds.labels, minlength=10).tolist() == counts
    assert ds.images.min() >= 0 and ds.images.max() <= 1


# ------------------------------------------------------------------ corrupt files name themselves


@pytest.mark.parametrize("damage", ["truncated", "bad-crc", "garbage-stream", "header-only"])
def test_corrupt_gzip_idx_files_are_named(tmp_path, damage):
    make_idx(tmp_path, 6)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    data = path.read_bytes()
    if damage == "truncated":  # gzip raises EOFError
        path.write_bytes(data[: len(data) // 2])
    elif damage == "bad-crc":  # the 8-byte trailer holds CRC32 and size: BadGzipFile
        path.write_bytes(data[:-8] + bytes(8))
    elif damage == "garbage-stream":  # zlib.error inside the deflate stream
        path.write_bytes(data[:10] + bytes(range(256)) * 4)
    else:
        path.write_bytes(data[:10])
    with pytest.raises(
        ValueError,
        match=r"t10k-images-idx3-ubyte\.gz: cannot decompress this gzip file, truncated or corrupt",
    ):
        read_idx(path)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz: cannot decompress"):
        RotatedMNIST(tmp_path, split="all", source="idx")


def test_idx_with_a_truncated_header_is_named(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + (2).to_bytes(4, "big"))
    with pytest.raises(
        ValueError,
        match=r"t10k-images-idx3-ubyte: truncated \(8 bytes, shorter "
        r"than the 16-byte header\)",
    ):
        read_idx(path)


def test_idx_labels_outside_the_digits_are_refused(tmp_path):
    make_idx(tmp_path, 6, compress=False)
    images, labels = digits(6)
    labels[4] = 200
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, compress=False)
    with pytest.raises(
        ValueError,
        match=r"t10k-labels-idx1-ubyte: 1 label\(s\) outside the digits 0\.\.9 \(first: 200, "
        r"label 4 counting from 0\)",
    ):
        RotatedMNIST(tmp_path, split="all", source="idx", rotate=False)


@pytest.mark.parametrize(
    "change, match",
    [
        ("label-200", r"1 label\(s\) outside the digits 0\.\.9 \(first: 200, label 2"),
        ("label--1", r"1 label\(s\) outside the digits 0\.\.9 \(first: -1, label 2"),
        ("label-3.5", r"the label of row 3 is 3\.5, not a digit 0\.\.9"),
        ("label-nan", r"the label of row 3 is nan, not a digit 0\.\.9"),
        ("pixel-nan", r"1 row\(s\) hold NaN or infinite grey levels \(first: row 3\)"),
        ("pixel-inf", r"1 row\(s\) hold NaN or infinite grey levels \(first: row 3\)"),
    ],
)
def test_amat_labels_and_pixels_are_checked(tmp_path, change, match):
    images, labels = digits(4)
    path = tmp_path / AMAT_FILES["test"]
    write_amat(path, images, labels, transposed=True)
    rows = path.read_text().splitlines()
    values = rows[2].split()
    kind, value = change.split("-", 1)
    if kind == "label":
        values[-1] = value
    else:
        values[300] = value
    rows[2] = " ".join(values)
    path.write_text("\n".join(rows) + "\n")
    name = r"mnist_all_rotation_normalized_float_test\.amat: "
    with pytest.raises(ValueError, match=name + match):
        RotatedMNIST(tmp_path, split="test", source="amat")
    write_amat(path, images, labels, transposed=True)  # control: the intact file loads
    assert len(read_amat(path)[1]) == 4


def test_torchvision_labels_outside_the_digits_name_the_root(tmp_path, monkeypatch):
    images, labels = digits(5)

    class FakeMNIST:
        def __init__(self, root, train, download):
            if train:
                raise RuntimeError("Dataset not found")
            self.data = torch.from_numpy(images)
            self.targets = torch.tensor([1, 2, 10, 3, 4])

    datasets = types.ModuleType("torchvision.datasets")
    datasets.MNIST = FakeMNIST
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    with pytest.raises(
        ValueError,
        match=re.escape(f"torchvision MNIST under {tmp_path} (train=False): 1 label(s) outside"),
    ):
        RotatedMNIST(tmp_path, split="all", source="torchvision", rotate=False)
