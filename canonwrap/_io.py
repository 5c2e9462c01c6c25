"""Atomic file writes and content checksums, shared by the trainer's checkpoints and the
dataset caches."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: str = "wb", *, permissions: int | None = None
) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; it replaces ``path`` on success.

    The data are flushed and fsynced before ``os.replace``, and the folder is fsynced after
    it. If the block raises, the temporary file is removed and an existing ``path`` is left
    untouched, so ``path`` only ever holds a complete file.

    Parameters
    ----------
    path : path
        Target file; missing parent folders are created.
    mode : Literal["wb", "w"], default "wb"
        Binary or text (UTF-8) writing.
    permissions : int, optional
        ``chmod`` the file to these bits before it is renamed (``mkstemp`` creates ``0o600``
        files); ``None`` keeps ``0o600``.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if permissions is not None:
            os.chmod(tmp, permissions)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_torch_save(
    obj: Any, path: str | os.PathLike[str], *, permissions: int | None = None
) -> Path:
    """``torch.save`` to a temporary file in the target folder, fsync, then ``os.replace``.

    A crash or exception during the write leaves neither a partial ``path`` nor the
    temporary file behind; an existing ``path`` is replaced only by a complete file.

    Parameters
    ----------
    obj : object
        What ``torch.save`` writes.
    path : path
        Target file; missing parent folders are created.
    permissions : int, optional
        Mode bits of the written file (default ``0o600``, as ``mkstemp`` creates it).

    Returns
    -------
    Path
        ``path``.
    """
    with atomic_open(path, "wb", permissions=permissions) as f:
        torch.save(obj, f)
    return Path(path)


def tree_digest(obj: Any) -> str:
    """SHA-256 of a nested structure of tensors, numbers, strings, lists and mappings.

    Every tensor contributes its dtype, shape and raw bytes; every other leaf its type and
    an exact text form (floats via ``float.hex``), so the digest changes with any bit of the
    content and is the same for the structure that ``torch.load(weights_only=True)`` gives
    back from ``torch.save(obj)``. Mappings are hashed in their iteration order.

    Parameters
    ----------
    obj : object
        Tensors, NumPy arrays and scalars, ``None``, ``bool``, ``int``, ``float``,
        ``complex``, ``str``, ``bytes``, ``torch.dtype``, ``torch.device`` and lists, tuples
        and mappings of these.

    Returns
    -------
    str
        The hexadecimal digest.

    Raises
    ------
    TypeError
        For any other type of leaf, with its place in ``obj``.
    """
    h = hashlib.sha256()
    _digest_into(h, obj, "")
    return h.hexdigest()


def _digest_into(h: Any, obj: Any, where: str) -> None:
    def tag(kind: bytes, text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")
        h.update(kind + len(data).to_bytes(8, "little") + data)

    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.resolve_conj().resolve_neg().to("cpu").contiguous().reshape(-1)
        tag(b"T", f"{t.dtype}{tuple(obj.shape)}")
        h.update(t.view(torch.uint8).numpy())
    elif obj is None:
        tag(b"N", "")
    elif isinstance(obj, bool):
        tag(b"B", str(obj))
    elif isinstance(obj, int):
        tag(b"I", str(obj))
    elif isinstance(obj, float):
        tag(b"F", obj.hex())
    elif isinstance(obj, complex):
        tag(b"C", f"{obj.real.hex()},{obj.imag.hex()}")
    elif isinstance(obj, str):
        tag(b"S", obj)
    elif isinstance(obj, bytes):
        tag(b"Y", str(len(obj)))
        h.update(obj)
    elif isinstance(obj, (np.ndarray, np.generic)) and np.asarray(obj).dtype != object:
        arr = np.asarray(obj)
        tag(b"A", f"{arr.dtype.str}{arr.shape}")
        h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
    elif isinstance(obj, (torch.dtype, torch.device)):
        tag(b"O", f"{type(obj).__name__}:{obj}")
    elif isinstance(obj, Mapping):
        tag(b"D", str(len(obj)))
        for key, value in obj.items():
            _digest_into(h, key, f"{where}/<key {key!r}>")
            _digest_into(h, value, f"{where}/{key}")
    elif isinstance(obj, (list, tuple)):
        tag(b"L" if isinstance(obj, list) else b"U", str(len(obj)))
        for i, value in enumerate(obj):
            _digest_into(h, value, f"{where}/{i}")
    else:
        raise TypeError(
            f"cannot checksum a {type(obj).__qualname__} at {where or '/'}: only tensors, "
            "numbers, strings, bytes, None and lists, tuples and mappings of them are "
            "supported (what torch.load(weights_only=True) reads back)"
        )
