"""A tiny model, data and Trainer shared by the tests of canonwrap.training."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from canonwrap.training import EMA, Trainer


@dataclass
class TinyLoss:
    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


class TinyRegressor(nn.Module):
    """Linear regression with dropout and noisy targets: its loss uses all global RNGs."""

    def __init__(self, d_in: int = 3, hidden: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.Tanh(), nn.Dropout(0.3), nn.Linear(hidden, 1)
        )
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def training_loss(self, batch: tuple[Tensor, Tensor]) -> TinyLoss:
        x, y = batch
        self.calls += 1
        noise = 0.1 * torch.randn_like(y)  # torch RNG
        scale = 1.0 + 0.01 * float(np.random.rand()) + 0.01 * random.random()  # numpy, python
        mse = ((self.net(x).squeeze(-1) - (y + noise)) ** 2).mean() * scale
        return TinyLoss(mse, {"mse": mse.detach(), "scale": torch.tensor(scale)})


def make_data(n: int = 12, d_in: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3
    return TensorDataset(x, y)


def make_trainer(tmp_path=None, **kwargs) -> Trainer:
    """Fresh model/optimizer/loader; 12 samples, batch 5 -> 3 batches per epoch."""
    torch.manual_seed(123)
    model = TinyRegressor().double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = DataLoader(make_data(), batch_size=5, shuffle=True)
    defaults = dict(
        ema=EMA(model, decay=0.9),
        checkpoint_dir=tmp_path,
        checkpoint_every=1000,
        log_every=2,
        progress=False,
        seed=7,
    )
    defaults.update(kwargs)
    return Trainer(model, opt, loader, **defaults)


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def assert_same_run(a: Trainer, b: Trainer) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for idx in oa["state"]:
        for key, value in oa["state"][idx].items():
            other = ob["state"][idx][key]
            if isinstance(value, Tensor):
                assert torch.equal(value, other), (idx, key)
            else:
                assert value == other, (idx, key)
    for name in a.ema.shadow:
        assert torch.equal(a.ema.shadow[name], b.ema.shadow[name]), name
    assert a.ema.num_updates == b.ema.num_updates
    assert a.grad_queue.state_dict() == b.grad_queue.state_dict()
    assert (a.state.step, a.state.epoch, a.state.batch_in_epoch) == (
        b.state.step,
        b.state.epoch,
        b.state.batch_in_epoch,
    )


def _touch(path: str) -> None:
    Path(path).write_text("code from a file ran")


class Payload:
    """Unpickling calls ``_touch(marker)``: stands in for a shell command in a crafted file.

    ``torch.load(weights_only=False)`` creates ``marker``; a weights-only load refuses it.
    """

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))
