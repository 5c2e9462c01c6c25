"""Gradient clipping: EDM's adaptive clipping (Hoogeboom et al. 2022), fixed-norm clipping."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["GradNormQueue", "clip_grad_adaptive"]


class GradNormQueue:
    """The last ``max_len`` gradient norms, for
    [`clip_grad_adaptive`][canonwrap.training.clip_grad_adaptive].

    Parameters
    ----------
    max_len : int, default 50
        Window length.
    initial : float or None, default 3000.0
        Value the queue starts with (EDM starts with 3000, i.e. effectively no clipping
        until real norms have been recorded). ``None`` starts empty.
    """

    def __init__(self, max_len: int = 50, initial: float | None = 3000.0) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.max_len = int(max_len)
        self.items: deque[float] = deque(maxlen=self.max_len)
        if initial is not None:
            self.add(initial)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, value: float) -> None:
        """Append a norm, dropping the oldest once ``max_len`` are held."""
        self.items.append(float(value))

    def mean(self) -> float:
        """Mean of the held norms."""
        return float(np.mean(list(self.items)))

    def std(self) -> float:
        """Population standard deviation (``ddof=0``, as ``np.std``) of the held norms."""
        return float(np.std(list(self.items)))

    def max_norm(self) -> float:
        """Clipping threshold ``1.5 * mean + 2 * std``."""
        if not self.items:
            raise ValueError("GradNormQueue is empty; give it an initial value")
        return 1.5 * self.mean() + 2.0 * self.std()

    def state_dict(self) -> dict[str, Any]:
        """``{"max_len": int, "items": list[float]}`` (oldest first)."""
        return {"max_len": self.max_len, "items": list(self.items)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a [`state_dict`][canonwrap.training.GradNormQueue.state_dict]."""
        self.max_len = int(state["max_len"])
        self.items = deque((float(v) for v in state["items"]), maxlen=self.max_len)


@torch.no_grad()
def clip_grad_adaptive(params: Iterable[Tensor], history: GradNormQueue) -> float:
    """EDM-style adaptive gradient clipping.

    The threshold is ``1.5 * mean + 2 * std`` of the recent norms in ``history``; gradients
    are scaled down (``torch.nn.utils.clip_grad_norm_``) to that norm if they exceed it, and
    the norm actually kept -- the threshold when clipping, the raw norm otherwise -- is
    pushed into ``history``. A non-finite norm is *not* pushed (it would poison the
    statistics for the next 50 steps); the caller should skip the step.

    Parameters
    ----------
    params : iterable of Tensor
        Parameters whose ``.grad`` is clipped in place.
    history : GradNormQueue
        Recent norms, updated in place.

    Returns
    -------
    float
        The total gradient norm *before* clipping.
    """
    params = [p for p in params if p.grad is not None]
    max_norm = history.max_norm()
    if not params:
        return 0.0
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm, norm_type=2.0))
    if math.isfinite(norm):
        history.add(max_norm if norm > max_norm else norm)
    return norm


def _grad_norm(params: Iterable[Tensor]) -> float:
    """Total 2-norm of the gradients of ``params`` (0 when none has a gradient)."""
    norms = [torch.linalg.vector_norm(p.grad.detach(), 2.0) for p in params if p.grad is not None]
    if not norms:
        return 0.0
    if len({n.device for n in norms}) > 1:
        norms = [n.cpu() for n in norms]
    return float(torch.linalg.vector_norm(torch.stack(norms), 2.0))


def _clip_gradients(
    params: Iterable[Tensor], queue: GradNormQueue | None, max_norm: float | None
) -> float:
    """Clip adaptively (``queue`` given), to ``max_norm`` (given) or not; the norm before."""
    if queue is not None:
        return clip_grad_adaptive(params, queue)
    if max_norm is not None:
        grads = [p for p in params if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm)) if grads else 0.0
    return _grad_norm(params)
