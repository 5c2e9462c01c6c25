"""A training run killed with SIGKILL and resumed ends bitwise equal to an uninterrupted one.

Three child processes train the same tiny ``CanonicalizedDiffusion`` (an MLP denoiser with
dropout on float64 vectors; no torch_geometric, to keep the start-up of each child short)
with :class:`~canonwrap.training.Trainer`, checkpointing after every step:

1. ``killed`` sleeps in every step and is SIGKILLed once a checkpoint of step >= 3 exists;
2. ``resumed`` starts at once, waits for the kill, then continues the killed run's folder
   to step ``N``;
3. ``reference`` trains to step ``N`` without interruption (while 1 runs).

Every tensor of the final checkpoints (weights, optimizer, EMA, gradient-norm queue, RNG
states) must be equal, and every ``ckpt_*.pt`` left by the kill must load.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from canonwrap.training import CHECKPOINT_FORMAT, find_latest_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

FINAL_STEP = 7  # the resumed run crosses the end of the first epoch (4 steps)
KILL_AFTER = 3  # usually killed in the middle of the first epoch

SCRIPT = textwrap.dedent(
    """
    import random, sys, time
    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import DataLoader
    from canonwrap import CanonicalizedDiffusion, PolynomialSchedule
    from canonwrap.training import EMA, Trainer

    class Denoiser(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 16), nn.SiLU(), nn.Dropout(0.1), nn.Linear(16, 4))

        def forward(self, z, t):
            return self.net(torch.cat([z, t[:, None]], -1))

    torch.set_num_threads(1)
    mode, folder, max_steps, sleep = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    torch.manual_seed(0)  # initial weights; the trainer seeds only the data order
    np.random.seed(0)
    random.seed(0)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 4, generator=gen, dtype=torch.float64) for _ in range(4)]
    loader = DataLoader(batches, batch_size=None, shuffle=True)  # epochs of 4 steps
    model = CanonicalizedDiffusion(Denoiser(), schedule=PolynomialSchedule(20)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss_fn(model, batch):
        time.sleep(sleep)  # gives the parent time to kill between checkpoints
        return model.training_loss(batch)  # t, eps and dropout use the global RNG

    trainer = Trainer(
        model, optimizer, loader, loss_fn=loss_fn, ema=EMA(model, 0.9),
        lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5),
        checkpoint_dir=folder, checkpoint_every=1, keep_checkpoints=None,
        log_every=1, max_steps=max_steps, progress=False, seed=7,
    )
    if mode == "resume":
        import torch._dynamo  # the optimizer's first step imports it: do it while waiting
        sys.stdin.readline()  # started early; the parent says when the killed run is dead
        trainer.resume()
    trainer.fit()
    print(mode, "done", trainer.state.step, flush=True)
    """
)


def _start(script: Path, mode: str, folder: Path, max_steps: int, sleep: float):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, str(script), mode, str(folder), str(max_steps), str(sleep)]
    return subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(proc: subprocess.Popen, timeout: float = 300.0) -> None:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{out}\n{err[-3000:]}"


def _step(path: Path | None) -> int:
    return -1 if path is None else int(path.stem.split("_")[1])


def _load(path: Path) -> Mapping[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT
    return ckpt


def _tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside nested dicts and lists, keyed by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items: Any = ()
    if isinstance(obj, Mapping):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out.update(_tensors(value, f"{prefix}/{key}"))
    return out


def test_sigkill_then_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    killed_dir, reference_dir = tmp_path / "killed", tmp_path / "reference"

    victim = _start(script, "train", killed_dir, 1000, sleep=0.15)
    reference = _start(script, "train", reference_dir, FINAL_STEP, sleep=0.0)
    # the resuming process starts now (start-up is most of its time) and waits for "go"
    resumed = _start(script, "resume", killed_dir, FINAL_STEP, sleep=0.0)
    children = [victim, reference, resumed]
    try:
        deadline = time.monotonic() + 300.0  # generous: the machine may be loaded
        while _step(find_latest_checkpoint(killed_dir)) < KILL_AFTER:
            if victim.poll() is not None:
                _, err = victim.communicate()
                pytest.fail(f"the run to be killed exited early ({victim.returncode}):\n{err}")
            assert time.monotonic() < deadline, "no checkpoint of step >= 3 appeared in time"
            time.sleep(0.02)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        assert victim.returncode == -signal.SIGKILL

        # whatever the kill interrupted, every checkpoint file there is complete
        latest = find_latest_checkpoint(killed_dir)
        killed_at = _step(latest)
        assert KILL_AFTER <= killed_at < FINAL_STEP
        assert _load(latest)["step"] == killed_at
        for path in killed_dir.glob("ckpt_*.pt"):
            _load(path)
        # a temporary file left by a kill during a write is never taken for a checkpoint
        assert not any(p.name.startswith("ckpt_") for p in killed_dir.glob("*.tmp"))

        resumed.stdin.write("go\n")
        resumed.stdin.flush()
        _finish(reference)
        _finish(resumed)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
            for stream in (child.stdin, child.stdout, child.stderr):
                if stream is not None and not stream.closed:
                    stream.close()

    name = f"ckpt_{FINAL_STEP:09d}.pt"
    got, want = _load(killed_dir / name), _load(reference_dir / name)
    assert (got["step"], got["epoch"], got["batch_in_epoch"]) == (
        want["step"],
        want["epoch"],
        want["batch_in_epoch"],
    )
    got_t, want_t = _tensors(got), _tensors(want)
    assert got_t.keys() == want_t.keys()
    assert any(k.startswith("/model/") for k in got_t) and any(k.startswith("/ema/") for k in got_t)
    differ = [k for k in want_t if not torch.equal(got_t[k], want_t[k])]
    assert not differ, f"resumed run differs from the uninterrupted one in {differ}"
    # the optimizer's plain numbers (step counts, learning rates) too
    assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
    assert got["grad_clip_queue"] == want["grad_clip_queue"]
    assert got["lr_scheduler"] == want["lr_scheduler"]
