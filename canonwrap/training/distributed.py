"""``torch.distributed`` helpers: rank checks, wrapper unwrapping, agreed stops, DDP loaders."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["distributed_sampler_loader"]


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel``/``DataParallel`` wrapper."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_main_process() -> bool:
    return not _is_distributed() or dist.get_rank() == 0


def _any_rank(flag: bool) -> bool:
    """``True`` on every rank if ``flag`` is true on any rank (``flag`` when not distributed)."""
    if not _is_distributed():
        return flag
    backend = dist.get_backend()
    dev = (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )
    value = torch.tensor([1.0 if flag else 0.0], device=dev)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def distributed_sampler_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    num_replicas: int | None = None,
    rank: int | None = None,
    loader_cls: type[DataLoader] = DataLoader,
    **loader_kwargs: Any,
) -> DataLoader:
    """A loader whose ``DistributedSampler`` shards ``dataset`` across ranks.

    Without an initialised process group it behaves like a single replica (rank 0 of 1).
    The [`Trainer`][canonwrap.training.Trainer] calls ``sampler.set_epoch(epoch)`` every epoch.

    Parameters
    ----------
    dataset : Dataset
        Map-style dataset.
    batch_size : int
        Batch size per rank.
    shuffle
        Passed to ``DistributedSampler``.
    seed
        Passed to ``DistributedSampler``.
    drop_last
        Passed to ``DistributedSampler``.
    num_replicas : int, optional
        Number of ranks; default from ``torch.distributed`` (1 when it is not initialised).
    rank : int, optional
        This process's rank; default from ``torch.distributed`` (0 when it is not initialised).
    loader_cls : type, default DataLoader
        Loader class, e.g. ``torch_geometric.loader.DataLoader`` for graphs.
    **loader_kwargs
        Further keyword arguments of the loader (``num_workers``, ``collate_fn``, ...).
    """
    if num_replicas is None:
        num_replicas = dist.get_world_size() if _is_distributed() else 1
    if rank is None:
        rank = dist.get_rank() if _is_distributed() else 0
    sampler = DistributedSampler(
        dataset,
        num_replicas=num_replicas,
        rank=rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
    )
    return loader_cls(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **loader_kwargs
    )
