"""Exponential moving average of model weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from canonwrap.training.checkpoint import _shape_mismatches, _shapes
from canonwrap.training.distributed import _unwrap

__all__ = ["EMA"]


class EMA:
    """Exponential moving average of a model's parameters.

    ``shadow <- decay * shadow + (1 - decay) * param`` at every
    [`update`][canonwrap.training.EMA.update] from step ``start_step`` on; before that the shadow
    simply copies the weights (a late-started EMA suits short runs, whose early weights are far from
    the final ones). Floating-point parameters are kept in at least float32 (float64 stays float64);
    buffers (e.g. batch-norm statistics) are copied, not averaged.

    Parameters
    ----------
    model : nn.Module
        Model whose parameters are tracked (a DDP/DataParallel wrapper is unwrapped).
    decay : float, default 0.999
        Weight of the old average, in ``[0, 1]``.
    start_step : int, default 0
        Updates with ``step < start_step`` copy the weights instead of averaging.

    Examples
    --------
    >>> ema = EMA(model, decay=0.999)
    >>> ema.update(model, step)              # after each optimizer step
    >>> with ema.average_parameters(model):  # evaluate with the averaged weights
    ...     evaluate(model)
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, start_step: int = 0) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.num_updates = 0
        module = _unwrap(model)
        self.shadow: dict[str, Tensor] = {
            name: self._float_copy(p) for name, p in module.named_parameters()
        }
        self.buffers: dict[str, Tensor] = {
            name: b.detach().clone() for name, b in module.named_buffers()
        }

    @staticmethod
    def _float_copy(p: Tensor) -> Tensor:
        p = p.detach()
        if p.is_floating_point():
            return p.to(dtype=torch.promote_types(p.dtype, torch.float32), copy=True)
        return p.clone()

    def _check_model(self, module: nn.Module) -> None:
        lines = _shape_mismatches(
            _shapes(self.shadow),
            _shapes(dict(module.named_parameters())),
            expected_name="EMA",
            found_name="model",
        )
        if lines:
            raise ValueError("model does not match the EMA:\n  " + "\n  ".join(lines))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Fold the current weights of ``model`` into the average.

        Parameters
        ----------
        model : nn.Module
            The trained model.
        step : int, optional
            Optimizer steps completed so far; when ``step < start_step`` the weights are
            copied. ``None`` counts the calls to [`update`][canonwrap.training.EMA.update] instead.
        """
        module = _unwrap(model)
        params = dict(module.named_parameters())
        if params.keys() != self.shadow.keys() or any(
            p.shape != self.shadow[n].shape for n, p in params.items()
        ):
            self._check_model(module)
        step = self.num_updates + 1 if step is None else step
        copy = step < self.start_step
        for name, p in params.items():
            avg = self.shadow[name]
            value = p.detach().to(device=avg.device, dtype=avg.dtype)
            if copy or not avg.is_floating_point():
                avg.copy_(value)
            else:
                avg.mul_(self.decay).add_(value, alpha=1.0 - self.decay)
        for name, b in module.named_buffers():
            if name in self.buffers:
                self.buffers[name].copy_(b.detach())
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged parameters (and the copied buffers) into ``model``."""
        module = _unwrap(model)
        self._check_model(module)
        for name, p in module.named_parameters():
            p.copy_(self.shadow[name])
        for name, b in module.named_buffers():
            if name in self.buffers:
                b.copy_(self.buffers[name])

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[nn.Module]:
        """Context manager: swap the EMA weights into ``model``, restore the raw ones after."""
        module = _unwrap(model)
        self._check_model(module)
        with torch.no_grad():
            backup_p = {n: p.detach().clone() for n, p in module.named_parameters()}
            backup_b = {n: b.detach().clone() for n, b in module.named_buffers()}
        self.copy_to(module)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in module.named_parameters():
                    p.copy_(backup_p[name])
                for name, b in module.named_buffers():
                    b.copy_(backup_b[name])

    def state_dict(self) -> dict[str, Any]:
        """Averages, buffers and settings (tensors are references, not copies)."""
        return {
            "decay": self.decay,
            "start_step": self.start_step,
            "num_updates": self.num_updates,
            "shadow": dict(self.shadow),
            "buffers": dict(self.buffers),
        }

    def _check_state(self, state: Mapping[str, Any]) -> None:
        for key in ("shadow", "buffers"):
            if key not in state:
                raise ValueError(f"EMA state has no '{key}' entry")
        lines = _shape_mismatches(
            _shapes(self.shadow),
            _shapes(state["shadow"]),
            expected_name="EMA",
            found_name="EMA state",
        )
        if lines:
            raise ValueError("EMA state does not match the model:\n  " + "\n  ".join(lines))

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a [`state_dict`][canonwrap.training.EMA.state_dict]; raises ``ValueError`` on
        mismatched names or shapes."""
        self._check_state(state)
        self.decay = float(state.get("decay", self.decay))
        self.start_step = int(state.get("start_step", self.start_step))
        self.num_updates = int(state.get("num_updates", 0))
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
        for name, value in state["buffers"].items():
            if name in self.buffers and self.buffers[name].shape == value.shape:
                self.buffers[name].copy_(value)
