"""Rotated MNIST: the official ``.amat`` files, or MNIST rotated by seeded uniform angles.

Three sources, tried in this order by ``source="auto"``:

``"amat"``
:   The rotated-MNIST benchmark of Larochelle et al. (2007), ``mnist_rotation_new.zip``:
    ``mnist_all_rotation_normalized_float_train_valid.amat`` (12,000 digits) and
    ``mnist_all_rotation_normalized_float_test.amat`` (50,000 digits). Each text row holds
    784 grey levels in ``[0, 1]`` followed by the label.
``"idx"``
:   The standard MNIST IDX files (``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``
    and, when present, ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``; each
    raw or ``.gz``). Each digit is rotated by its own angle drawn uniformly from
    ``[0, 2 pi)`` with a seeded generator (bilinear, about the image centre, zero padding,
    via [`canonwrap.groups.rotate_images`][canonwrap.groups.rotate_images]).
``"torchvision"``
:   ``torchvision.datasets.MNIST(root, download=False)`` when torchvision imports; its
    digits are rotated as for ``"idx"``. Nothing is ever downloaded.

Files are looked for in ``root`` and in its sub-folders ``mnist_rotation_new``,
``MNIST/raw`` and ``raw``. Without ``root``: the folder named by the environment variable
``CANONWRAP_MNIST``. Nothing is searched for elsewhere and nothing is downloaded.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from canonwrap.groups.images import rotate_images

__all__ = [
    "AMAT_FILES",
    "IDX_FILES",
    "RotatedMNIST",
    "default_mnist_root",
    "holdout_split",
    "read_amat",
    "read_idx",
    "rotate_digits",
]

AMAT_FILES = {
    "trainval": "mnist_all_rotation_normalized_float_train_valid.amat",
    "test": "mnist_all_rotation_normalized_float_test.amat",
}
"""File names of the official rotated-MNIST benchmark."""
IDX_FILES = {
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
}
"""File names of MNIST in IDX format (each may also end in ``.gz``)."""
AMAT_NUM_TRAIN = 10_000
"""Rows of the ``train_valid`` file used for training in Larochelle et al.; the rest validate."""
_SUBDIRS = (".", "mnist_rotation_new", "MNIST/raw", "raw")
_TRAIN_SEED_OFFSET = 1_000_003  # the train file's angles use seed + this


def default_mnist_root() -> Path | None:
    """Where MNIST is looked for when no ``root`` is given: ``$CANONWRAP_MNIST``, or ``None``
    when that variable is unset or empty."""
    env = os.environ.get("CANONWRAP_MNIST")
    return Path(env).expanduser() if env else None


def _find(root: Path, name: str) -> Path | None:
    """``name`` or ``name.gz`` in ``root`` or one of its usual sub-folders."""
    for sub in _SUBDIRS:
        for candidate in (root / sub / name, root / sub / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _read_bytes(path: Path) -> bytes:
    """The bytes of ``path``, decompressed when it starts with the gzip magic number."""
    with open(path, "rb") as fh:
        head = fh.read(2)
        if head != b"\x1f\x8b":
            return head + fh.read()
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except (EOFError, OSError, zlib.error) as err:  # truncated, bad CRC, corrupt stream
        raise ValueError(
            f"{path}: cannot decompress this gzip file, truncated or corrupt "
            f"({type(err).__name__}: {err}); download it again"
        ) from err


def _check_labels(labels: Tensor, where: object) -> Tensor:
    """``labels`` if every one is a digit ``0..9``; else ``ValueError`` naming ``where``."""
    bad = (labels < 0) | (labels > 9)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{where}: {int(bad.sum())} label(s) outside the digits 0..9 (first: "
            f"{labels[i].item()}, label {i} counting from 0); the file is corrupt or not an "
            "MNIST label file"
        )
    return labels


def read_idx(path: str | Path) -> Tensor:
    """Read an IDX file of unsigned bytes (raw or gzip-compressed) as a uint8 tensor.

    Returns ``[N, 28, 28]`` for image files and ``[N]`` for label files (the shape stored
    in the header). Raises ``ValueError`` on a malformed header or a truncated file.
    """
    data = _read_bytes(Path(path))
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files are supported (type {data[2]:#x})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{path}: truncated ({len(data)} bytes, shorter than the {header}-byte header)"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = math.prod(shape)
    if len(data) < header + count:
        raise ValueError(f"{path}: truncated ({len(data) - header} of {count} bytes of data)")
    array = np.frombuffer(data, dtype=np.uint8, count=count, offset=header).reshape(shape)
    return torch.from_numpy(array.copy())


def read_amat(path: str | Path, *, transpose: bool = True) -> tuple[Tensor, Tensor]:
    """Read a rotated-MNIST ``.amat`` file: ``images [N, 1, 28, 28]`` float32, ``labels [N]``.

    Each row is 784 grey levels in ``[0, 1]`` and a label. The rows store each image
    column by column (the files come from column-major tooling), so a plain row-major
    ``reshape(28, 28)`` gives the transposed, i.e. mirrored, digit; ``transpose=True``
    (default) transposes it back. ``transpose=False`` returns the plain row-major reshape
    that many public loaders use. Since the benchmark's rotations are uniform, the two
    differ by a reflection only: orientation statistics and labels are unaffected.

    Raises ``ValueError`` naming the file when it is empty, has rows of the wrong or
    unequal length (e.g. truncated), entries that are not numbers, NaN or infinite grey
    levels, or labels that are not the digits ``0..9``.
    """
    try:
        table = np.loadtxt(path, dtype=np.float32, ndmin=2)
    except ValueError as err:  # rows of unequal length (truncated file), non-numbers, binary
        raise ValueError(f"{path}: not a valid .amat file (truncated or corrupt?): {err}") from err
    if table.shape[0] == 0:
        raise ValueError(f"{path}: the .amat file holds no rows")
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected rows of 785 numbers, got {table.shape[1]}")
    pixels, raw = table[:, :-1], table[:, -1]
    finite = np.isfinite(pixels).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"{path}: {int((~finite).sum())} row(s) hold NaN or infinite grey levels (first: "
            f"row {row + 1}); the file is corrupt"
        )
    whole = np.isfinite(raw) & (raw == np.rint(raw))
    if not whole.all():
        row = int(np.flatnonzero(~whole)[0])
        raise ValueError(f"{path}: the label of row {row + 1} is {raw[row]}, not a digit 0..9")
    images = torch.from_numpy(pixels.copy()).reshape(-1, 1, 28, 28)
    if transpose:
        images = images.transpose(-2, -1).contiguous()
    labels = _check_labels(torch.from_numpy(raw.astype(np.int64)), path)
    return images, labels


def rotate_digits(images: Tensor, seed: int, *, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Rotate each of ``images [N, C, H, W]`` by an angle drawn uniformly from ``[0, 2 pi)``.

    The angles ``[N]`` (float64, radians, counter-clockwise as displayed) come from
    ``torch.Generator().manual_seed(seed)``, one per image in order, so image ``i`` always
    gets the same angle for a given seed. Returns ``(rotated, angles)``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    angles = 2 * math.pi * torch.rand(images.shape[0], generator=gen, dtype=torch.float64)
    out = torch.empty_like(images)
    for start in range(0, images.shape[0], chunk):
        sl = slice(start, start + chunk)
        out[sl] = rotate_images(images[sl], angles[sl].to(images.dtype))
    return out, angles


def holdout_split(n: int, test_size: int = 2000, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Deterministic train/test indices for ``n`` items: ``(train_idx, test_idx)``, sorted.

    A permutation of ``range(n)`` is drawn from ``torch.Generator().manual_seed(seed)``;
    its last ``test_size`` entries are the test set, the rest the training set. With the
    10,000 MNIST test digits and the defaults: 8,000 train, 2,000 test.
    """
    if not 0 <= test_size <= n:
        raise ValueError(f"test_size must be in [0, {n}], got {test_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[: n - test_size].sort().values, perm[n - test_size :].sort().values


class RotatedMNIST(Dataset):
    """Rotated MNIST digits as ``(image [1, 28, 28] float32, label long)`` pairs.

    Splits
    :   | split | ``"amat"`` | IDX with train files | IDX, t10k files only |
        | --- | --- | --- | --- |
        | train | train_valid rows 0-9,999 | 60,000 train digits | t10k minus holdout |
        | valid | train_valid rows 10,000+ | -- | -- |
        | trainval | all 12,000 train_valid | -- | -- |
        | test | 50,000 test rows | 10,000 t10k digits | holdout of t10k |
        | all | -- | train + t10k | all 10,000 t10k |

        The holdout (IDX or torchvision without the 60,000 training digits) is
        [`holdout_split`][canonwrap.data.rotmnist.holdout_split] with ``test_size`` and
        ``split_seed``: 8,000 / 2,000 by default. ``torchvision`` follows the IDX columns.

    Angles
    :   For IDX and torchvision data, digit ``i`` of the t10k file is rotated by angle
        ``i`` of [`rotate_digits`][canonwrap.data.rotmnist.rotate_digits] with ``seed``, digit ``i``
        of the train file by angle ``i`` with ``seed + 1_000_003``; a digit keeps its angle whatever
        the split. ``angles`` holds them (``None`` for ``.amat`` data, whose angles are unknown).

    Parameters
    ----------
    root
        Folder holding the files; default
        [`default_mnist_root`][canonwrap.data.rotmnist.default_mnist_root].
    split
        One of the rows above.
    source
        ``"auto"`` (first of ``amat``, ``idx``, ``torchvision`` with the needed files),
        or one of them.
    seed
        Seed of the rotation angles (IDX / torchvision).
    rotate
        ``False`` keeps IDX / torchvision digits upright (``angles`` are then zeros).
    symmetric
        Scale grey levels from ``[0, 1]`` to ``[-1, 1]``.
    test_size
        Size of the test holdout taken from the t10k digits when only those exist.
    split_seed
        Seed of that holdout.
    amat_transpose
        See [`read_amat`][canonwrap.data.rotmnist.read_amat].

    Attributes
    ----------
    images : Tensor
        ``[N, 1, 28, 28]`` float32.
    labels : Tensor
        ``[N]`` int64.
    angles : Tensor or None
        ``[N]`` float64 radians (counter-clockwise as displayed) applied to upright digits.
    source : str
        The source actually used.
    files : list[Path]
        The files read.
    """

    SPLITS = {
        "amat": ("train", "valid", "trainval", "test"),
        "idx": ("train", "test", "all"),
        "torchvision": ("train", "test", "all"),
    }

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "test",
        source: str = "auto",
        seed: int = 0,
        *,
        rotate: bool = True,
        symmetric: bool = False,
        test_size: int = 2000,
        split_seed: int = 0,
        amat_transpose: bool = True,
    ) -> None:
        if source not in ("auto", "amat", "idx", "torchvision"):
            raise ValueError(f"source must be auto, amat, idx or torchvision; got {source!r}")
        if split not in {s for splits in self.SPLITS.values() for s in splits}:
            raise ValueError(f"unknown split {split!r}")
        resolved = Path(root).expanduser() if root is not None else default_mnist_root()
        self.root = resolved
        self.split = split
        self.seed = int(seed)
        self.files: list[Path] = []
        self.angles: Tensor | None = None
        self.source = ""

        order = ("amat", "idx", "torchvision") if source == "auto" else (source,)
        reasons = []
        for name in order:
            if split not in self.SPLITS[name]:
                reasons.append(f"{name}: split {split!r} not available ({self.SPLITS[name]})")
                continue
            loader = getattr(self, f"_load_{name}")
            result = loader(split, rotate, test_size, split_seed, amat_transpose)
            if isinstance(result, str):
                reasons.append(f"{name}: {result}")
                continue
            images, labels, angles = result
            self.source = name
            break
        else:
            raise FileNotFoundError(self._missing_message(reasons))

        if symmetric:
            images = images * 2 - 1
        self.images = images
        self.labels = labels
        self.angles = angles

    # -- sources ---------------------------------------------------------------------
    def _load_amat(self, split, rotate, test_size, split_seed, transpose):
        if self.root is None:
            return "no root folder"
        key = "test" if split == "test" else "trainval"
        path = _find(self.root, AMAT_FILES[key])
        if path is None:
            return f"{AMAT_FILES[key]} not found"
        images, labels = read_amat(path, transpose=transpose)
        self.files = [path]
        if split == "train":
            images, labels = images[:AMAT_NUM_TRAIN], labels[:AMAT_NUM_TRAIN]
        elif split == "valid":
            images, labels = images[AMAT_NUM_TRAIN:], labels[AMAT_NUM_TRAIN:]
        return images, labels, None

    def _load_idx(self, split, rotate, test_size, split_seed, transpose):
        if self.root is None:
            return "no root folder"
        parts = {}
        for key, names in IDX_FILES.items():
            paths = [_find(self.root, name) for name in names]
            if all(p is not None for p in paths):
                parts[key] = paths
        if "test" not in parts:
            return f"{IDX_FILES['test'][0]}(.gz) and {IDX_FILES['test'][1]}(.gz) not found"

        def load(key):
            images, labels = (read_idx(p) for p in parts[key])
            if images.shape[0] != labels.shape[0] or tuple(images.shape[1:]) != (28, 28):
                raise ValueError(
                    f"inconsistent IDX files {parts[key][0]} (shape {tuple(images.shape)}) and "
                    f"{parts[key][1]} (shape {tuple(labels.shape)}): expected [N, 28, 28] "
                    "images and [N] labels"
                )
            _check_labels(labels, parts[key][1])
            self.files.extend(parts[key])
            return images, labels

        return self._assemble(load, "train" in parts, split, rotate, test_size, split_seed)

    def _load_torchvision(self, split, rotate, test_size, split_seed, transpose):
        try:
            from torchvision.datasets import MNIST
        except Exception as err:  # torchvision absent, or present but broken
            return f"torchvision unavailable ({type(err).__name__})"
        root = str(self.root) if self.root is not None else "."
        sets = {}
        for key, train in (("test", False), ("train", True)):
            try:
                sets[key] = MNIST(root, train=train, download=False)
            except Exception:  # missing files: torchvision raises RuntimeError
                pass
        if "test" not in sets:
            return f"torchvision found no MNIST test set under {root}"

        def load(key):
            labels = sets[key].targets.to(torch.long)
            _check_labels(labels, f"torchvision MNIST under {root} (train={key == 'train'})")
            return sets[key].data.to(torch.uint8), labels

        return self._assemble(load, "train" in sets, split, rotate, test_size, split_seed)

    def _assemble(self, load, has_train, split, rotate, test_size, split_seed):
        """Rotate the needed files' digits and select ``split`` (IDX and torchvision)."""

        def prepared(key, offset):
            raw, labels = load(key)
            images = raw.to(torch.float32).div_(255.0).unsqueeze(1)
            if rotate:
                images, angles = rotate_digits(images, self.seed + offset)
            else:
                angles = torch.zeros(images.shape[0], dtype=torch.float64)
            return images, labels.to(torch.long), angles

        if has_train:
            keys = {"train": ["train"], "test": ["test"], "all": ["train", "test"]}[split]
            pieces = [prepared(k, _TRAIN_SEED_OFFSET if k == "train" else 0) for k in keys]
            return tuple(torch.cat(p) for p in zip(*pieces))
        images, labels, angles = prepared("test", 0)
        if split == "all":
            return images, labels, angles
        train_idx, test_idx = holdout_split(images.shape[0], test_size, split_seed)
        idx = train_idx if split == "train" else test_idx
        return images[idx], labels[idx], angles[idx]

    def _missing_message(self, reasons: Sequence[str]) -> str:
        where = (
            f"{self.root} (and its sub-folders {', '.join(_SUBDIRS[1:])})"
            if self.root is not None
            else "nowhere: no root given and $CANONWRAP_MNIST unset"
        )
        return (
            f"no MNIST data for split {self.split!r}; looked in {where}. Expected either the "
            f"rotated-MNIST files {AMAT_FILES['trainval']} / {AMAT_FILES['test']} "
            f"(mnist_rotation_new.zip, Larochelle et al. 2007), or the MNIST IDX files "
            f"{IDX_FILES['test'][0]}(.gz) + {IDX_FILES['test'][1]}(.gz) (optionally "
            f"{IDX_FILES['train'][0]}(.gz) + {IDX_FILES['train'][1]}(.gz)), or an installed "
            f"torchvision with MNIST under root. Pass root=... or set CANONWRAP_MNIST. "
            f"Details: {'; '.join(reasons)}"
        )

    # -- Dataset ---------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __repr__(self) -> str:
        return (
            f"RotatedMNIST(split={self.split!r}, source={self.source!r}, n={len(self)}, "
            f"root={str(self.root)!r})"
        )
