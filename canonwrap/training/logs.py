"""Training logs: ``log.jsonl`` (appended, truncated on resume) and TensorBoard scalars."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from canonwrap._io import atomic_open


def _flat_scalars(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(name, value)`` for every numeric leaf of a log record, nested keys joined by ``/``."""
    for key, value in record.items():
        if key in ("step", "epoch"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flat_scalars(value, name + "/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield name, float(value)


def _tensorboard_writer(directory: Any) -> Any:
    """A ``SummaryWriter`` for ``directory``; ``ImportError`` without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(
            "tensorboard_dir needs the tensorboard package: pip install tensorboard"
        ) from err
    return SummaryWriter(str(directory))


def _write_scalars(writer: Any, record: Mapping[str, Any]) -> None:
    """Every numeric leaf of ``record`` as a TensorBoard scalar at ``record["step"]``."""
    for key, value in _flat_scalars(record):
        writer.add_scalar(key, value, record["step"])
    writer.flush()


def _append_record(path: Path, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (created with its folder if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop the records of ``path`` logged after ``step`` (the file is replaced atomically)."""
    if not path.is_file():
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if int(json.loads(line).get("step", 0)) > step:
                    continue
            except (ValueError, AttributeError):
                pass
            kept.append(line)
    with atomic_open(path, "w") as f:
        f.writelines(kept)


def read_evaluations(path: str | Path) -> list[dict[str, Any]]:
    """The evaluation records of a ``log.jsonl``, in order.

    Each is ``{"step", "elapsed", **eval}``: the step, the training seconds when the
    evaluation ran (``None`` if not logged) and the values of the record's ``eval``
    entry (for the QM9 example: ``val_loss``, ``val_nll``, frame drift). Records without
    ``eval`` (the loss lines) are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training log here (log.jsonl is in checkpoint_dir)")
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not JSON ({err})") from None
            if "eval" in rec:
                out.append({"step": rec["step"], "elapsed": rec.get("elapsed"), **rec["eval"]})
    return out
