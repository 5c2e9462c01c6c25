"""The Trainer's loop: logging, checkpoint rotation, stops, non-finite losses, evaluation."""

from __future__ import annotations

import json
import time

import pytest
import torch

from canonwrap.training import find_latest_checkpoint
from tests.training.helpers import make_trainer, seed_all


def test_fit_logs_and_checkpoints(tmp_path):
    seed_all(0)
    trainer = make_trainer(tmp_path, max_steps=7, checkpoint_every=3, keep_checkpoints=2)
    state = trainer.fit()
    assert state.step == 7 and state.stop_reason == "max_steps"
    assert (state.epoch, state.batch_in_epoch) == (2, 1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt_000000006.pt", "ckpt_000000007.pt", "log.jsonl"]  # kept 2
    assert find_latest_checkpoint(tmp_path).name == "ckpt_000000007.pt"
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 7]
    for r in records:
        assert {"step", "loss", "terms", "grad_norm", "lr", "elapsed"} <= r.keys()
        assert set(r["terms"]) == {"mse", "scale"} and r["lr"] == 1e-2
    assert records == state.history


def test_non_finite_loss_raises_without_updating(tmp_path):
    seed_all(0)
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        out = model.training_loss(batch)
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    trainer = make_trainer(None, max_steps=10, loss_fn=loss_fn)
    trainer.max_steps = 2
    trainer.fit()
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    opt_state = {
        k: v.clone() for k, v in trainer.optimizer.state[trainer.model.net[0].weight].items()
    }
    trainer.max_steps = 10
    with pytest.raises(FloatingPointError, match="non-finite loss.*step 3"):
        trainer.fit()
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, weights[n]), n
        assert p.grad is None
    for k, v in trainer.optimizer.state[trainer.model.net[0].weight].items():
        assert torch.equal(v, opt_state[k])
    assert trainer.state.step == 2


def test_floating_point_error_inside_the_model_names_the_step(tmp_path):
    """A FloatingPointError raised by the model (e.g. training_loss finding a NaN denoiser
    output) reaches the user with the Trainer's step, epoch and batch added."""
    seed_all(0)
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise FloatingPointError("the denoiser returned NaN for 2 of 8 samples")
        return model.training_loss(batch)

    trainer = make_trainer(None, max_steps=10, loss_fn=loss_fn)
    with pytest.raises(FloatingPointError, match=r"^at step 4 \(epoch .*NaN for 2 of 8") as err:
        trainer.fit()
    assert isinstance(err.value.__cause__, FloatingPointError)
    assert trainer.state.step == 3
    # negative control: other errors pass through unchanged
    calls["n"] = 0

    def broken(model, batch):
        raise ValueError("bad batch")

    trainer = make_trainer(None, max_steps=10, loss_fn=broken)
    with pytest.raises(ValueError, match="^bad batch$"):
        trainer.fit()


def test_max_seconds_stops(tmp_path):
    seed_all(0)

    def slow_loss(model, batch):
        time.sleep(0.02)
        return model.training_loss(batch)

    trainer = make_trainer(tmp_path, max_seconds=0.2, loss_fn=slow_loss, progress=True)
    start = time.monotonic()
    state = trainer.fit()
    assert state.stop_reason == "max_seconds"
    assert 1 <= state.step <= 12
    assert time.monotonic() - start < 5.0
    assert state.elapsed >= 0.2
    assert find_latest_checkpoint(tmp_path).name == f"ckpt_{state.step:09d}.pt"


def test_eval_uses_ema_and_preserves_rng():
    seed_all(0)

    def eval_fn(model):
        assert not model.training
        torch.randn(100)  # must not disturb training randomness
        return {"w": float(model.net[0].weight.detach().sum())}

    trainer = make_trainer(None, max_steps=4, eval_fn=eval_fn, eval_every=2)
    trainer.fit()
    evals = [r for r in trainer.state.history if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert evals[-1]["eval"]["w"] == pytest.approx(float(trainer.ema.shadow["net.0.weight"].sum()))
    assert trainer.model.training

    seed_all(0)
    plain = make_trainer(None, max_steps=4)
    plain.fit()
    assert torch.equal(plain.model.net[0].weight, trainer.model.net[0].weight)


def test_tensorboard_scalars_match_the_log(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (dev extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seed_all(0)
    tb = tmp_path / "tb"
    trainer = make_trainer(
        tmp_path / "ckpt",
        max_steps=4,
        tensorboard_dir=tb,
        eval_fn=lambda m: {"val": 1.5},
        eval_every=2,
    )
    state = trainer.fit()
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "terms/mse", "grad_norm", "lr", "eval/val"} <= tags
    logged = [r for r in state.history if "loss" in r]
    assert [e.step for e in acc.Scalars("loss")] == [r["step"] for r in logged]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in logged])
    evals = [r for r in state.history if "eval" in r]
    assert len(evals) >= 2
    assert [e.value for e in acc.Scalars("eval/val")] == pytest.approx([1.5] * len(evals))
