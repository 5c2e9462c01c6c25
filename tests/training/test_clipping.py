"""EDM's adaptive gradient clipping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from canonwrap.training import GradNormQueue, clip_grad_adaptive


def _set_grad(params, norm: float) -> None:
    direction = [torch.ones_like(p) for p in params]
    total = torch.sqrt(sum((d**2).sum() for d in direction))
    for p, d in zip(params, direction):
        p.grad = d * (norm / total)


def test_clip_grad_adaptive_follows_edm():
    params = [nn.Parameter(torch.zeros(3, dtype=torch.float64)), nn.Parameter(torch.zeros(2, 2))]
    queue = GradNormQueue()  # starts with EDM's 3000
    assert list(queue.items) == [3000.0]

    # 5000 > 1.5 * 3000 + 2 * 0 = 4500: clipped to 4500, and 4500 is what is remembered
    _set_grad(params, 5000.0)
    assert clip_grad_adaptive(params, queue) == pytest.approx(5000.0)
    clipped = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
    assert float(clipped) == pytest.approx(4500.0, rel=1e-5)
    assert list(queue.items) == pytest.approx([3000.0, 4500.0])

    # below the threshold: untouched, the raw norm is remembered
    items = np.array(queue.items)
    threshold = 1.5 * items.mean() + 2 * items.std()
    assert queue.max_norm() == pytest.approx(threshold)
    _set_grad(params, 100.0)
    before = [p.grad.clone() for p in params]
    assert clip_grad_adaptive(params, queue) == pytest.approx(100.0)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, params))
    assert list(queue.items) == pytest.approx([3000.0, 4500.0, 100.0])

    # a window of 50: old norms fall out; threshold from the window by direct computation
    for value in range(60):
        queue.add(float(value))
    assert len(queue) == 50 and list(queue.items)[0] == 10.0
    window = np.arange(10, 60, dtype=float)
    _set_grad(params, 1000.0)
    assert clip_grad_adaptive(params, queue) == pytest.approx(1000.0)
    expected = 1.5 * window.mean() + 2 * window.std()
    assert list(queue.items)[-1] == pytest.approx(expected)
    clipped = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
    assert float(clipped) == pytest.approx(expected, rel=1e-5)

    # a non-finite norm is reported but not remembered
    params[0].grad = torch.full((3,), float("nan"), dtype=torch.float64)
    n = len(queue)
    snapshot = list(queue.items)
    assert not np.isfinite(clip_grad_adaptive(params, queue))
    assert len(queue) == n and list(queue.items) == snapshot
