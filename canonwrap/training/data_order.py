"""Data order as a pure function of ``(seed, epoch)``, and resuming in the middle of an epoch.

See rules 1 and 2 of [`canonwrap.training`][canonwrap.training]: the samplers and the loader get
generators seeded from ``(seed, epoch)``, and the batches already consumed before a checkpoint are
skipped by index, without loading them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler

from canonwrap.training.rng import _derive_seed, _generator, _preserved_rng

_END = object()  # sentinel for next(iterator, _END)


def _samplers_of(loader: DataLoader) -> list[Any]:
    if loader.batch_sampler is not None:
        inner = getattr(loader.batch_sampler, "sampler", None)
        return [loader.batch_sampler] + ([inner] if inner is not None else [])
    return [loader.sampler]


def _seed_data_order(loader: Any, seed: int, epoch: int) -> bool:
    """Make the order of ``epoch`` a function of ``(seed, epoch)``; ``True`` if it worked.

    Samplers with a ``generator`` attribute get a fresh seeded generator, samplers with
    ``set_epoch`` are told the epoch, and the loader's own generator (used for the worker
    base seed, otherwise drawn from the global RNG) is replaced by a seeded one.
    """
    if not isinstance(loader, DataLoader):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
            return True
        return isinstance(loader, (list, tuple))  # a fixed sequence of batches
    controlled = True
    for i, sampler in enumerate(_samplers_of(loader)):
        owned = False
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            owned = True
        if hasattr(sampler, "generator"):
            sampler.generator = _generator(_derive_seed(seed, epoch, 10 + i))
            owned = True
        deterministic = isinstance(sampler, (SequentialSampler, BatchSampler)) or (
            type(sampler).__name__ == "_InfiniteConstantSampler"
        )
        controlled = controlled and (owned or deterministic)
    loader.generator = _generator(_derive_seed(seed, epoch, 1))
    return controlled and not isinstance(loader.dataset, IterableDataset)


def _skipping_loader(loader: DataLoader, skip: int) -> DataLoader:
    """A loader over the same data that starts after the first ``skip`` batches.

    Index batches are regenerated from the (already seeded) sampler and the consumed ones
    are dropped without reading their samples.
    """
    kwargs: dict[str, Any] = {
        "collate_fn": loader.collate_fn,
        "num_workers": loader.num_workers,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "generator": loader.generator,
    }
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
        kwargs["multiprocessing_context"] = loader.multiprocessing_context
    if loader.batch_sampler is not None:
        kwargs["batch_sampler"] = list(loader.batch_sampler)[skip:]
    else:
        kwargs["batch_size"] = None
        kwargs["sampler"] = list(loader.sampler)[skip:]
    return DataLoader(loader.dataset, **kwargs)


def _epoch_batches(loader: Any, seed: int, epoch: int, skip: int) -> tuple[Iterator[Any], bool]:
    """The batches of ``epoch`` after the first ``skip``, and whether their order is seeded.

    The order is seeded by ``_seed_data_order``. A map-style ``DataLoader`` skips by
    index; any other loader reads the skipped batches and drops them, under preserved
    global RNG states.
    """
    controlled = _seed_data_order(loader, seed, epoch)
    if skip == 0:
        return iter(loader), controlled
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
        return iter(_skipping_loader(loader, skip)), controlled
    iterator = iter(loader)
    with _preserved_rng():  # reading the skipped batches must not shift training RNG
        for _ in range(skip):
            if next(iterator, _END) is _END:
                break
    return iterator, controlled
