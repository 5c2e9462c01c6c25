"""Tests of canonwrap.training: EMA, adaptive clipping, checkpoints and exact resumption."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from canonwrap.training import (
    EMA,
    GradNormQueue,
    Trainer,
    atomic_torch_save,
    clip_grad_adaptive,
    distributed_sampler_loader,
    find_latest_checkpoint,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------
# a tiny stand-in for CanonicalizedDiffusion
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------


def test_ema_matches_hand_computation():
    model = nn.Linear(2, 1).double()
    bn = nn.BatchNorm1d(2).double()
    both = nn.Sequential(bn, model)
    p0 = {n: p.detach().clone() for n, p in both.named_parameters()}
    ema = EMA(both, decay=0.9)
    expected = dict(p0)
    for step in (1, 2, 3):
        with torch.no_grad():
            for p in both.parameters():
                p.add_(torch.randn_like(p))
            bn.running_mean.add_(1.0)
        ema.update(both, step)
        for n, p in both.named_parameters():
            expected[n] = 0.9 * expected[n] + 0.1 * p.detach()
    for n in expected:
        torch.testing.assert_close(ema.shadow[n], expected[n], rtol=0, atol=1e-14)
    torch.testing.assert_close(ema.buffers["0.running_mean"], bn.running_mean)  # copied

    raw = {n: p.detach().clone() for n, p in both.named_parameters()}
    raw_mean = bn.running_mean.clone()
    with ema.average_parameters(both):
        for n, p in both.named_parameters():
            assert torch.equal(p, ema.shadow[n])
    for n, p in both.named_parameters():  # restored
        assert torch.equal(p, raw[n])
    assert torch.equal(bn.running_mean, raw_mean)

    other = EMA(nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 1)).double(), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9 and other.num_updates == 3
    for n in expected:
        assert torch.equal(other.shadow[n], ema.shadow[n])
    ema.copy_to(model := nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 1)).double())
    for n, p in model.named_parameters():
        assert torch.equal(p, ema.shadow[n])


def test_ema_keeps_float32_for_half_params_and_rejects_other_models():
    ema = EMA(nn.Linear(2, 2).half(), decay=0.5)
    assert all(t.dtype == torch.float32 for t in ema.shadow.values())
    with pytest.raises(ValueError, match="weight"):
        ema.update(nn.Linear(3, 2), 1)
    with pytest.raises(ValueError, match="shape mismatch"):
        EMA(nn.Linear(3, 2)).load_state_dict(ema.state_dict())


def test_ema_start_step_copies_before_averaging():
    model = nn.Linear(2, 1).double()
    ema = EMA(model, decay=0.9, start_step=3)
    for step in (1, 2):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model, step)
        assert torch.equal(ema.shadow["weight"], model.weight)  # plain copy
    before = ema.shadow["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, 3)  # from start_step on: averaging
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * before + 0.1 * model.weight.detach())


# ---------------------------------------------------------------------------------------
# adaptive gradient clipping
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# trainer
# ---------------------------------------------------------------------------------------


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


@pytest.mark.parametrize(
    "interrupt",
    [
        pytest.param(4, id="mid-epoch"),
        pytest.param(3, id="epoch-boundary"),
        pytest.param("periodic", id="periodic-checkpoint-of-longer-run"),
    ],
)
def test_resume_is_bitwise_exact(tmp_path, interrupt):
    # uninterrupted: 10 steps = epochs of 3 batches -> ends in epoch 3
    seed_all(0)
    straight = make_trainer(tmp_path / "straight", max_steps=10)
    straight.fit()
    rng_straight = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())

    seed_all(0)
    if interrupt == "periodic":  # a run that crashed after its step-4 checkpoint
        first = make_trainer(tmp_path / "run", max_steps=7, checkpoint_every=4)
        first.fit()
        resume_from = tmp_path / "run" / "ckpt_000000004.pt"
    else:
        first = make_trainer(tmp_path / "run", max_steps=interrupt)
        first.fit()
        resume_from = tmp_path / "run"
    del first

    seed_all(999)  # whatever happens to the global RNGs in between must not matter
    resumed = make_trainer(tmp_path / "run", max_steps=10)
    state = resumed.resume(resume_from)
    assert state.step == (4 if interrupt == "periodic" else interrupt)
    torch.randn(5)
    np.random.rand()
    resumed.fit()

    assert_same_run(straight, resumed)
    assert torch.equal(torch.get_rng_state(), rng_straight[0])
    assert np.array_equal(np.random.get_state()[1], rng_straight[1])
    assert random.getstate() == rng_straight[2]
    # the log after resuming has one record per logging step, none duplicated
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 10


def test_data_order_depends_on_seed_and_epoch_only():
    seen = []

    def loss_fn(model, batch):
        seen.append(batch[1].clone())
        return model.training_loss(batch)

    seed_all(0)
    make_trainer(None, max_steps=6, loss_fn=loss_fn, grad_clip=None).fit()
    first, seen[:] = list(seen), []
    seed_all(1)  # different global RNG, same trainer seed: same order
    make_trainer(None, max_steps=6, loss_fn=loss_fn, grad_clip=1.0).fit()
    assert all(torch.equal(a, b) for a, b in zip(first, seen))
    # epochs differ from each other and cover the data once each
    epoch0, epoch1 = torch.cat(first[:3]), torch.cat(first[3:])
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(epoch0.sort().values, epoch1.sort().values)


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


def test_distributed_sampler_loader_single_process():
    loader = distributed_sampler_loader(make_data(), batch_size=4, seed=3)
    assert len(loader) == 3 and loader.sampler.num_replicas == 1
    seed_all(0)
    model = TinyRegressor().double()
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loader,
        max_epochs=2,
        progress=False,
    )
    state = trainer.fit()
    assert (state.step, state.epoch, state.stop_reason) == (6, 2, "max_epochs")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_single_rank_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        seed_all(0)
        trainer = make_trainer(tmp_path / "ckpt", max_steps=3, max_seconds=60.0)
        state = trainer.fit()
        assert state.stop_reason == "max_steps"
        assert find_latest_checkpoint(tmp_path / "ckpt").name == "ckpt_000000003.pt"
    finally:
        dist.destroy_process_group()


def test_tensorboard_scalars_match_the_log(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (dev extra)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seed_all(0)
    tb = tmp_path / "tb"
    trainer = make_trainer(tmp_path / "ckpt", max_steps=4, tensorboard_dir=tb,
                           eval_fn=lambda m: {"val": 1.5}, eval_every=2)
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
