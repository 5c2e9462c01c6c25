"""Checkpoint files: atomic writes, rejection of checkpoints that do not fit."""

from __future__ import annotations

import stat

import pytest
import torch
from torch import nn

from canonwrap.training import Trainer, atomic_torch_save
from tests.training.helpers import TinyRegressor, make_trainer, seed_all


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    seed_all(0)
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit()
    good = tmp_path / "ckpt_000000002.pt"
    good_bytes = good.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial checkpoint bytes")  # a half-written file, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(tmp_path / "ckpt_000000003.pt")
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(good)  # overwriting keeps the old complete file
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"x": 1}, tmp_path / "other.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000000002.pt", "log.jsonl"]
    assert good.read_bytes() == good_bytes
    monkeypatch.undo()
    assert torch.load(good, weights_only=True)["step"] == 2


def test_incompatible_checkpoint_is_rejected(tmp_path):
    seed_all(0)
    make_trainer(tmp_path, max_steps=1).fit()

    class Other(TinyRegressor):
        def __init__(self) -> None:
            super().__init__(d_in=4)
            self.extra = nn.Linear(2, 2)

    model = Other().double()
    trainer = Trainer(model, torch.optim.Adam(model.parameters()), [], progress=False, max_steps=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError) as err:
        trainer.resume(tmp_path)
    msg = str(err.value)
    assert "incompatible" in msg and "ckpt_000000001.pt" in msg
    assert "missing in checkpoint (2): extra.weight [2, 2], extra.bias [2]" in msg
    assert "shape mismatch (1): net.0.weight: checkpoint [8, 3] vs model [8, 4]" in msg
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(FileNotFoundError):
        trainer.resume(tmp_path / "nothing-here")


def test_atomic_torch_save_sets_the_requested_permissions(tmp_path):
    default = atomic_torch_save({"x": 1}, tmp_path / "sub" / "default.pt")
    assert stat.S_IMODE(default.stat().st_mode) == 0o600  # as mkstemp creates it
    shared = atomic_torch_save({"x": 2}, tmp_path / "shared.pt", permissions=0o644)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644
    assert torch.load(shared, weights_only=True) == {"x": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.pt", "sub"]  # no temporaries
