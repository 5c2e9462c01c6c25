"""Exact resumption and a data order that depends on the seed and the epoch only."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from tests.training.helpers import assert_same_run, make_trainer, seed_all


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
