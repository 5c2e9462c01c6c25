"""Atomic file writes, shared by the trainer's checkpoints and the dataset caches."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

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
