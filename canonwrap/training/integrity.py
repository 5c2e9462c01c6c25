"""Checkpoint integrity: a content checksum written into every checkpoint and verified when it
is read, finite weights, and the choice of the newest checkpoint of a folder that verifies.

Every file is read with ``torch.load(weights_only=True)``: a checkpoint holds tensors and
plain containers only, so a crafted file cannot run code.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from canonwrap._io import tree_digest
from canonwrap.training.checkpoint import (
    CHECKPOINT_FORMAT,
    LEGACY_CHECKPOINT_FORMATS,
    _checkpoint_files,
)

__all__ = ["CheckpointError", "read_checkpoint"]

_CHECKSUM_KEY = "checksum"
_SHOWN = 5  # names listed in messages


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: unreadable, no canonwrap checkpoint, altered
    after it was written (checksum mismatch) or holding non-finite weights."""


def _with_checksum(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` plus a ``"checksum"`` entry: the SHA-256 of everything else in it."""
    return {**state, _CHECKSUM_KEY: {"algorithm": "sha256", "digest": tree_digest(state)}}


def _nonfinite_names(named: Iterable[tuple[str, Any]]) -> list[str]:
    """Names of the floating-point tensors among ``named`` that hold a NaN or an infinity."""
    return [
        name
        for name, value in named
        if isinstance(value, Tensor)
        and (value.is_floating_point() or value.is_complex())
        and not bool(torch.isfinite(value.detach()).all())
    ]


def _all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every floating-point tensor is finite, with one reduction per device and dtype.

    The largest magnitude of each tensor (``inf``-norm) is NaN or infinite exactly when the
    tensor holds a NaN or an infinity, and unlike a sum it cannot overflow.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        if t.is_floating_point() and t.numel():
            groups.setdefault((t.device, t.dtype), []).append(t.detach())
    flags = [torch.stack(torch._foreach_norm(ts, float("inf"))) for ts in groups.values()]
    return all(bool(torch.isfinite(f).all()) for f in flags)


def _weights_of(ckpt: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(name, tensor)`` of the model's parameters and the EMA in a checkpoint's contents."""
    named: list[tuple[str, Any]] = []
    model = ckpt.get("model")
    # the parameters when listed (buffers such as masks may hold infinities on purpose)
    names = ckpt.get("parameter_names")
    if isinstance(model, Mapping):
        keep = set(names) if isinstance(names, list) else set(model)
        named += [(f"model {k}", v) for k, v in model.items() if k in keep]
    ema = ckpt.get("ema")
    if isinstance(ema, Mapping) and isinstance(ema.get("shadow"), Mapping):
        named += [(f"ema {k}", v) for k, v in ema["shadow"].items()]
    return named


def _listed(names: list[str]) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def read_checkpoint(path: str | os.PathLike[str], *, trainer_only: bool = True) -> dict[str, Any]:
    """Read a checkpoint file (weights only) and verify it.

    A file of the current format must carry a checksum of its contents that matches; a
    file of an older Trainer format (no checksum) is read with a warning. The model
    weights and the EMA must be finite.

    Parameters
    ----------
    path : path
        The file.
    trainer_only : bool, default True
        Accept only [`Trainer`][canonwrap.training.Trainer] checkpoints. ``False`` also
        accepts a plain mapping without ``"format"`` and ``"checksum"`` entries (for
        example ``{"model": state_dict}``), which cannot be verified beyond its finiteness.

    Returns
    -------
    dict
        The contents, without the checksum entry.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        If the file is no regular file, cannot be read (truncated, damaged, or it holds
        pickled objects other than tensors and plain containers), is no canonwrap
        checkpoint, fails its checksum or holds non-finite weights; the message names the
        file and the reason.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file (a checkpoint is expected there)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged files and refused pickles fail in many ways
        raise CheckpointError(
            f"cannot read checkpoint {path} ({path.stat().st_size} bytes; truncated, damaged "
            f"or holding objects other than tensors): {type(err).__name__}: {err}"
        ) from err
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path} is not a canonwrap checkpoint (a {type(ckpt).__name__})")
    ckpt = dict(ckpt)
    fmt = ckpt.get("format")
    entry = ckpt.pop(_CHECKSUM_KEY, None)
    known = fmt == CHECKPOINT_FORMAT or fmt in LEGACY_CHECKPOINT_FORMATS
    if (trainer_only or fmt is not None) and not known:
        raise CheckpointError(
            f"{path} is not a canonwrap Trainer checkpoint (format {fmt!r}; expected "
            f"{CHECKPOINT_FORMAT!r})"
        )
    if entry is not None:
        if not isinstance(entry, Mapping) or entry.get("algorithm") != "sha256":
            raise CheckpointError(f"{path}: unknown checksum entry {entry!r}")
        try:
            digest = tree_digest(ckpt)
        except TypeError as err:
            raise CheckpointError(f"{path}: {err}") from err
        if digest != entry.get("digest"):
            raise CheckpointError(
                f"{path}: checksum mismatch: the contents were altered or damaged after the "
                "file was written"
            )
    elif fmt == CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has no checksum, which format {fmt} requires")
    elif fmt is not None:
        warnings.warn(
            f"{path} was written by an older canonwrap ({fmt}) without a checksum; its "
            "contents cannot be verified",
            stacklevel=3,
        )
    if "model" not in ckpt:
        raise CheckpointError(f"{path} is not a canonwrap checkpoint (no 'model' entry)")
    bad = _nonfinite_names(_weights_of(ckpt))
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights: {_listed(bad)}")
    return ckpt


def _read_newest_verified(
    directory: Path, *, rename: bool = True, action: str = "resuming from"
) -> tuple[Path, dict[str, Any]]:
    """The newest ``ckpt_<step>.pt`` of ``directory`` that verifies, with its contents.

    Checkpoints that fail are skipped with a warning that names each and why, and (with
    ``rename``) renamed to ``<name>.corrupt`` so that nothing picks them up later. A non-file
    under a checkpoint's name is an error (falling back past it would silently roll the run
    back). ``action`` starts the warning ("resuming from", "loading").
    """
    files = _checkpoint_files(directory, strict=True)
    if not files:
        raise FileNotFoundError(f"no ckpt_<step>.pt checkpoint in {directory}")
    skipped: list[tuple[Path, str]] = []
    for _, path in reversed(files):
        try:
            ckpt = read_checkpoint(path)
        except (CheckpointError, FileNotFoundError) as err:
            skipped.append((path, str(err)))
            continue
        if skipped:
            lines = []
            for bad, reason in skipped:
                moved = bad.with_name(bad.name + ".corrupt")
                where = "left in place"
                if rename:
                    try:
                        os.replace(bad, moved)
                        where = f"renamed to {moved.name}"
                    except OSError as err:
                        where = f"could not rename it: {err}"
                lines.append(f"{bad.name} ({where}): {reason}")
            warnings.warn(
                f"{action} {path.name}, the newest checkpoint of {directory} that "
                f"verifies; skipped {len(skipped)} newer one(s):\n  " + "\n  ".join(lines),
                stacklevel=4,
            )
        return path, ckpt
    raise CheckpointError(
        f"no checkpoint in {directory} verifies:\n  "
        + "\n  ".join(f"{p.name}: {reason}" for p, reason in skipped)
    )


def _assert_finite_state(named: list[tuple[str, Any]], what: str) -> None:
    """Raise ``FloatingPointError`` naming the non-finite tensors among ``named``."""
    bad = _nonfinite_names(named)
    if bad:
        raise FloatingPointError(f"{what}: non-finite values in {_listed(bad)}")
