"""Checkpoint files: atomic writes, ``ckpt_<step>.pt`` naming, finding and pruning (reading
and verifying them is in ``integrity``).

Also the name/shape comparison that explains why a checkpoint or EMA state does not fit a
model.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from canonwrap._io import atomic_torch_save

__all__ = ["CHECKPOINT_FORMAT", "atomic_torch_save", "find_latest_checkpoint"]

CHECKPOINT_FORMAT = "canonwrap.trainer/2"
"""The ``"format"`` entry of every Trainer checkpoint; ``Trainer.resume`` rejects other files.

Format 2 adds a ``"checksum"`` entry (SHA-256 of all other contents) that is verified on load.
"""
LEGACY_CHECKPOINT_FORMATS: tuple[str, ...] = ("canonwrap.trainer/1",)
"""Older formats that are still read (with a warning: they carry no checksum)."""
_CKPT_RE = re.compile(r"^ckpt_(\d+)\.pt$")


def _checkpoint_name(step: int) -> str:
    return f"ckpt_{step:09d}.pt"


def _checkpoint_files(directory: Path, *, strict: bool = True) -> list[tuple[int, Path]]:
    """``(step, path)`` of the ``ckpt_<step>.pt`` files of ``directory``, oldest first.

    With ``strict``, an entry named like a checkpoint that is no regular file (a folder, for
    instance) raises ``ValueError``: skipping it would silently roll a run back to an older
    checkpoint. Without, such entries are ignored.
    """
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _CKPT_RE.match(entry.name)
        if not match:
            continue
        if entry.is_file():
            found.append((int(match.group(1)), entry))
        elif strict:
            kind = "a folder" if entry.is_dir() else "not a regular file"
            raise ValueError(
                f"{entry} is {kind}, where a checkpoint file of that name is expected; move "
                "it away (using an older checkpoint instead would silently roll the run back)"
            )
    return sorted(found)


def find_latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The ``ckpt_<step>.pt`` file with the highest step in ``directory`` (``None`` if none).

    Parameters
    ----------
    directory : path
        A checkpoint folder.

    Raises
    ------
    ValueError
        If an entry named like a checkpoint is no regular file.
    """
    files = _checkpoint_files(Path(directory))
    return files[-1][1] if files else None


def list_checkpoints(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``ckpt_<step>.pt`` file in ``directory``, oldest first.

    An empty list if the folder does not exist or holds no checkpoint. The files are not
    read here; load one with [`read_checkpoint`][canonwrap.training.read_checkpoint] or
    [`load_weights`][canonwrap.evaluation.load_weights], which verify it.

    Parameters
    ----------
    directory : path
        A checkpoint folder (a Trainer's ``checkpoint_dir``).

    Raises
    ------
    ValueError
        If an entry named like a checkpoint is no regular file.
    """
    return _checkpoint_files(Path(directory))


def _prune_checkpoints(directory: Path, keep: int, current: Path) -> None:
    """Delete all but the newest ``keep`` checkpoints of ``directory``, never ``current``."""
    files = _checkpoint_files(directory, strict=False)
    for _, old in files[: max(len(files) - keep, 0)]:
        if old != current:
            with contextlib.suppress(OSError):
                old.unlink()


def _shape_mismatches(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    *,
    expected_name: str = "model",
    found_name: str = "checkpoint",
    limit: int = 20,
) -> list[str]:
    """Human-readable lines describing how two ``name -> shape`` tables differ."""

    def fmt(names: list[str], table: Mapping[str, tuple[int, ...]]) -> str:
        shown = ", ".join(f"{n} {list(table[n])}" for n in names[:limit])
        more = f", ... and {len(names) - limit} more" if len(names) > limit else ""
        return shown + more

    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    shapes = [n for n in expected if n in found and tuple(expected[n]) != tuple(found[n])]
    lines = []
    if missing:
        lines.append(f"missing in {found_name} ({len(missing)}): {fmt(missing, expected)}")
    if unexpected:
        lines.append(f"unexpected in {found_name} ({len(unexpected)}): {fmt(unexpected, found)}")
    if shapes:
        shown = ", ".join(
            f"{n}: {found_name} {list(found[n])} vs {expected_name} {list(expected[n])}"
            for n in shapes[:limit]
        )
        more = f", ... and {len(shapes) - limit} more" if len(shapes) > limit else ""
        lines.append(f"shape mismatch ({len(shapes)}): {shown}{more}")
    return lines


def _shapes(tensors: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) if isinstance(v, Tensor) else () for k, v in tensors.items()}
