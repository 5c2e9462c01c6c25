"""The user's loss function: its signature, moving its batch to a device, reading its result."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

LossFn = Callable[[nn.Module, Any], Any]
"""``loss_fn(model, batch)``, returning a scalar tensor, a mapping or an object with ``.loss``."""


def _default_loss_fn(model: nn.Module, batch: Any) -> Any:
    """``model.training_loss(batch)``."""
    if not hasattr(model, "training_loss"):
        raise AttributeError(
            f"{type(model).__name__} has no training_loss(); pass loss_fn=... to the Trainer"
        )
    return model.training_loss(batch)


def _to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors (also inside mappings, lists, tuples, objects with ``.to``) to ``device``."""
    if isinstance(batch, Tensor) or (hasattr(batch, "to") and callable(batch.to)):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _scalar(value: Any) -> float:
    if isinstance(value, Tensor):
        return float(value.detach().float().mean()) if value.numel() != 1 else float(value)
    return float(value)


def _split_loss(out: Any) -> tuple[Tensor, dict[str, Any]]:
    """``(loss, terms)`` from a tensor, a mapping with ``"loss"`` or an object with ``.loss``."""
    if isinstance(out, Tensor):
        loss, terms = out, {}
    elif isinstance(out, Mapping):
        if "loss" not in out:
            raise TypeError("loss_fn returned a mapping without a 'loss' entry")
        loss = out["loss"]
        terms = dict(out.get("terms") or {k: v for k, v in out.items() if k != "loss"})
    elif hasattr(out, "loss"):
        loss, terms = out.loss, dict(getattr(out, "terms", None) or {})
    else:
        raise TypeError(
            "loss_fn must return a scalar tensor, a mapping with 'loss' or an object with a "
            f"'.loss' attribute, got {type(out).__name__}"
        )
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"the loss must be a scalar tensor, got {shape}")
    return loss.reshape(()), terms
