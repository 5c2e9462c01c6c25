"""Distributed helpers in a single process (multi-process DDP runs: tests/test_ddp.py)."""

from __future__ import annotations

import pytest
import torch

from canonwrap.training import Trainer, distributed_sampler_loader, find_latest_checkpoint
from tests.training.helpers import TinyRegressor, make_data, make_trainer, seed_all


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
