"""Multi-process data parallelism: two CPU ranks (gloo) training through the Trainer.

Each rank builds the same small model, wraps it in ``DistributedDataParallel`` and trains
it on its own shard (``distributed_sampler_loader``) with its own noise draws. Gradients
are averaged by DDP because the loss goes through the wrapper's ``forward``
(:meth:`CanonicalizedDiffusion.forward` is the training loss), so the weights must agree
bit for bit on every rank afterwards. A negative control trains the same model without
the wrapper and checks that its weights do drift apart.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
STEPS = 4


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


def _build_model():
    from canonwrap import CanonicalizedDiffusion, CenterOfMass, PolynomialSchedule
    from canonwrap.nn import GNNDenoiser

    torch.manual_seed(0)  # the same initial weights on every rank
    return CanonicalizedDiffusion(
        GNNDenoiser(num_features=2, hidden=16, layers=2), CenterOfMass(), PolynomialSchedule(100)
    )


def _train(model, loader, loss_fn, checkpoint_dir=None):
    from canonwrap.training import EMA, Trainer

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    trainer = Trainer(
        model, opt, loader, loss_fn=loss_fn, ema=EMA(model, decay=0.9), max_steps=STEPS,
        log_every=None, checkpoint_dir=checkpoint_dir, progress=False,
    )
    return trainer.fit()


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        from torch.nn.parallel import DistributedDataParallel
        from torch_geometric.loader import DataLoader

        from canonwrap.data.toy import rotated_shapes
        from canonwrap.training import distributed_sampler_loader

        data = rotated_shapes(32, generator=torch.Generator().manual_seed(0), num_features=2)
        dataset = data.to_data_list()
        loader = distributed_sampler_loader(dataset, batch_size=4, seed=0, loader_cls=DataLoader)
        shard = [int(i) for i in loader.sampler]

        model = _build_model()
        initial = _flat_params(model)
        ddp = DistributedDataParallel(model)
        torch.manual_seed(100 + rank)  # different t and noise on each rank
        state = _train(ddp, loader, lambda m, batch: m(batch), Path(out_dir) / "ckpt")
        synced = _flat_params(model)

        plain = _build_model()  # negative control: no gradient averaging
        torch.manual_seed(100 + rank)
        _train(plain, loader, None)
        unsynced = _flat_params(plain)

        result = {
            "rank": rank,
            "step": state.step,
            "shard": shard,
            "changed": bool((synced - initial).abs().max() > 0),
            "ddp_equal": all(torch.equal(synced, p) for p in _gather(synced)),
            "plain_equal": all(torch.equal(unsynced, p) for p in _gather(unsynced)),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        # both ranks leave together: a rank that tears gloo down while its peer still
        # has the pair open aborted the peer ("terminate called without an active
        # exception") in about one run in four
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_ddp_training_keeps_ranks_in_sync(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    for res in results:
        assert res["step"] == STEPS
        assert res["changed"], "training did not change the weights"
        assert res["ddp_equal"], f"rank {res['rank']}: DDP weights differ across ranks"
        assert not res["plain_equal"], "negative control: unsynchronised weights should differ"
    # the DistributedSampler gives each rank a disjoint half of the data
    shards = [set(res["shard"]) for res in results]
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 32
    # only rank 0 writes checkpoints: one final file for the run, with unwrapped weights
    files = list((tmp_path / "ckpt").glob("ckpt_*.pt"))
    assert len(files) == 1
    ckpt = torch.load(files[0], map_location="cpu", weights_only=True)
    assert ckpt["step"] == STEPS
    assert not any(k.startswith("module.") for k in ckpt["model"])


def test_calling_the_model_computes_its_training_loss():
    from canonwrap.data.toy import rotated_shapes

    model = _build_model()
    batch = rotated_shapes(4, generator=torch.Generator().manual_seed(0), num_features=2)
    a = model(batch, torch.Generator().manual_seed(1))
    b = model.training_loss(batch, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.t, b.t)
