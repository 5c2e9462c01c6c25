"""Training loop with EMA, EDM-style adaptive gradient clipping and exact resumption.

The :class:`Trainer` drives any ``nn.Module`` whose loss is computed by a ``loss_fn(model,
batch)`` (by default ``model.training_loss(batch)``, as in
:class:`~canonwrap.diffusion.CanonicalizedDiffusion`). The loss function may return a
scalar tensor, a mapping with a ``"loss"`` entry or any object with a ``.loss`` attribute
(and optionally ``.terms``, a dict of scalar terms that are logged).

Exact resumption
----------------
A run interrupted after ``k`` steps and resumed from its checkpoint ends with exactly the
same weights, optimizer state and EMA as an uninterrupted run. This rests on three rules:

1. **The trainer owns the data order.** At the start of every epoch ``e`` the trainer gives
   the loader's sampler (``RandomSampler``, ``SubsetRandomSampler``,
   ``WeightedRandomSampler``, ... anything with a ``generator`` attribute, also the sampler
   inside a ``BatchSampler``) a fresh ``torch.Generator`` seeded from ``(seed, e)``, calls
   ``set_epoch(e)`` on samplers that have it (``DistributedSampler``), and gives the
   ``DataLoader`` itself a seeded generator for its worker base seed. The order of epoch
   ``e`` is therefore a pure function of ``(seed, e)`` and never touches the global RNGs.
   Any generator the loader was built with is replaced.
2. **Consumed batches are skipped by index.** A checkpoint records the epoch and the number
   of batches already consumed in it. On resume, the index batches of that epoch are
   regenerated and the consumed ones dropped *without loading them*; the rest are read by a
   temporary ``DataLoader`` with the same dataset, collate function and worker settings.
   (For an ``IterableDataset`` or a plain iterable the consumed batches are read and
   discarded while the global RNG states are preserved.)
3. **All RNG states are checkpointed** (torch CPU and CUDA, NumPy, Python ``random``)
   together with model, optimizer, learning-rate scheduler, EMA and the gradient-norm queue,
   and restored at the start of :meth:`Trainer.fit`. Evaluation runs inside a saved/restored
   RNG context, so it never perturbs training randomness.

Exactness additionally requires that the dataset itself is deterministic per index when
``num_workers > 0`` (random augmentation inside workers is re-seeded per epoch but the
assignment of batches to workers changes after a skip), and deterministic kernels on GPU.

Distributed training
--------------------
If ``torch.distributed`` is initialised, only rank 0 writes checkpoints and logs and shows
the progress bar; stopping on ``max_seconds`` is agreed between ranks. Wrapped models
(``DistributedDataParallel``/``DataParallel``) are unwrapped for checkpoints and the EMA.
With DDP, pass a ``loss_fn`` that goes through the wrapper's ``forward`` so that gradients are
synchronised. :func:`distributed_sampler_loader` builds a loader with a
``DistributedSampler``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    SequentialSampler,
)

__all__ = [
    "EMA",
    "GradNormQueue",
    "clip_grad_adaptive",
    "TrainState",
    "Trainer",
    "atomic_torch_save",
    "find_latest_checkpoint",
    "distributed_sampler_loader",
    "get_rng_state",
    "set_rng_state",
]

CHECKPOINT_FORMAT = "canonwrap.trainer/1"
_CKPT_RE = re.compile(r"^ckpt_(\d+)\.pt$")
LossFn = Callable[[nn.Module, Any], Any]
_END = object()  # sentinel for next(iterator, _END)


# ---------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel``/``DataParallel`` wrapper."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_main_process() -> bool:
    return not _is_distributed() or dist.get_rank() == 0


def _shape_mismatches(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    *,
    expected_name: str = "model",
    found_name: str = "checkpoint",
    limit: int = 20,
) -> list[str]:
    """Human-readable lines describing how two ``name -> shape`` tables differ."""

    def fmt(names: list[str], table: Mapping[str, tuple[int, ...]]) -> str:
        shown = ", ".join(f"{n} {list(table[n])}" for n in names[:limit])
        more = f", ... and {len(names) - limit} more" if len(names) > limit else ""
        return shown + more

    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    shapes = [n for n in expected if n in found and tuple(expected[n]) != tuple(found[n])]
    lines = []
    if missing:
        lines.append(f"missing in {found_name} ({len(missing)}): {fmt(missing, expected)}")
    if unexpected:
        lines.append(f"unexpected in {found_name} ({len(unexpected)}): {fmt(unexpected, found)}")
    if shapes:
        shown = ", ".join(
            f"{n}: {found_name} {list(found[n])} vs {expected_name} {list(expected[n])}"
            for n in shapes[:limit]
        )
        more = f", ... and {len(shapes) - limit} more" if len(shapes) > limit else ""
        lines.append(f"shape mismatch ({len(shapes)}): {shown}{more}")
    return lines


def _shapes(tensors: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) if isinstance(v, Tensor) else () for k, v in tensors.items()}


def _to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors (also inside mappings, lists, tuples, objects with ``.to``) to ``device``."""
    if isinstance(batch, Tensor) or (hasattr(batch, "to") and callable(batch.to)):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _scalar(value: Any) -> float:
    if isinstance(value, Tensor):
        return float(value.detach().float().mean()) if value.numel() != 1 else float(value)
    return float(value)


def _split_loss(out: Any) -> tuple[Tensor, dict[str, Any]]:
    """``(loss, terms)`` from a tensor, a mapping with ``"loss"`` or an object with ``.loss``."""
    if isinstance(out, Tensor):
        loss, terms = out, {}
    elif isinstance(out, Mapping):
        if "loss" not in out:
            raise TypeError("loss_fn returned a mapping without a 'loss' entry")
        loss = out["loss"]
        terms = dict(out.get("terms") or {k: v for k, v in out.items() if k != "loss"})
    elif hasattr(out, "loss"):
        loss, terms = out.loss, dict(getattr(out, "terms", None) or {})
    else:
        raise TypeError(
            "loss_fn must return a scalar tensor, a mapping with 'loss' or an object with a "
            f"'.loss' attribute, got {type(out).__name__}"
        )
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"the loss must be a scalar tensor, got {shape}")
    return loss.reshape(()), terms


def _grad_norm(params: Iterable[Tensor]) -> float:
    """Total 2-norm of the gradients of ``params`` (0 when none has a gradient)."""
    norms = [torch.linalg.vector_norm(p.grad.detach(), 2.0) for p in params if p.grad is not None]
    if not norms:
        return 0.0
    if len({n.device for n in norms}) > 1:
        norms = [n.cpu() for n in norms]
    return float(torch.linalg.vector_norm(torch.stack(norms), 2.0))


def _derive_seed(seed: int, epoch: int, stream: int) -> int:
    """A well-mixed 63-bit seed for ``(seed, epoch, stream)``."""
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _generator(seed: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


# ---------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------


def get_rng_state() -> dict[str, Any]:
    """Global RNG states of torch (CPU, CUDA), NumPy and Python, in a ``weights_only`` form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": list(py_state), "gauss_next": gauss_next},
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states captured by :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            npy["keys"].cpu().numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            warnings.warn(
                f"checkpoint holds CUDA RNG states for {len(cuda)} devices but "
                f"{torch.cuda.device_count()} are visible; CUDA RNG states not restored",
                stacklevel=2,
            )


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """Run a block without changing the global RNG states seen afterwards."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


# ---------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's parameters.

    ``shadow <- decay * shadow + (1 - decay) * param`` at every :meth:`update` from step
    ``start_step`` on; before that the shadow simply copies the weights (a late-started EMA
    suits short runs, whose early weights are far from the final ones). Floating-point
    parameters are kept in at least float32 (float64 stays float64); buffers (e.g.
    batch-norm statistics) are copied, not averaged.

    Parameters
    ----------
    model : nn.Module
        Model whose parameters are tracked (a DDP/DataParallel wrapper is unwrapped).
    decay : float, default 0.999
        Weight of the old average, in ``[0, 1]``.
    start_step : int, default 0
        Updates with ``step < start_step`` copy the weights instead of averaging.

    Examples
    --------
    >>> ema = EMA(model, decay=0.999)
    >>> ema.update(model, step)              # after each optimizer step
    >>> with ema.average_parameters(model):  # evaluate with the averaged weights
    ...     evaluate(model)
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, start_step: int = 0) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.num_updates = 0
        module = _unwrap(model)
        self.shadow: dict[str, Tensor] = {
            name: self._float_copy(p) for name, p in module.named_parameters()
        }
        self.buffers: dict[str, Tensor] = {
            name: b.detach().clone() for name, b in module.named_buffers()
        }

    @staticmethod
    def _float_copy(p: Tensor) -> Tensor:
        p = p.detach()
        if p.is_floating_point():
            return p.to(dtype=torch.promote_types(p.dtype, torch.float32), copy=True)
        return p.clone()

    def _check_model(self, module: nn.Module) -> None:
        lines = _shape_mismatches(
            _shapes(self.shadow),
            _shapes(dict(module.named_parameters())),
            expected_name="EMA",
            found_name="model",
        )
        if lines:
            raise ValueError("model does not match the EMA:\n  " + "\n  ".join(lines))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Fold the current weights of ``model`` into the average.

        Parameters
        ----------
        model : nn.Module
            The trained model.
        step : int, optional
            Optimizer steps completed so far; when ``step < start_step`` the weights are
            copied. ``None`` counts the calls to :meth:`update` instead.
        """
        module = _unwrap(model)
        params = dict(module.named_parameters())
        if params.keys() != self.shadow.keys() or any(
            p.shape != self.shadow[n].shape for n, p in params.items()
        ):
            self._check_model(module)
        step = self.num_updates + 1 if step is None else step
        copy = step < self.start_step
        for name, p in params.items():
            avg = self.shadow[name]
            value = p.detach().to(device=avg.device, dtype=avg.dtype)
            if copy or not avg.is_floating_point():
                avg.copy_(value)
            else:
                avg.mul_(self.decay).add_(value, alpha=1.0 - self.decay)
        for name, b in module.named_buffers():
            if name in self.buffers:
                self.buffers[name].copy_(b.detach())
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged parameters (and the copied buffers) into ``model``."""
        module = _unwrap(model)
        self._check_model(module)
        for name, p in module.named_parameters():
            p.copy_(self.shadow[name])
        for name, b in module.named_buffers():
            if name in self.buffers:
                b.copy_(self.buffers[name])

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[nn.Module]:
        """Context manager: swap the EMA weights into ``model``, restore the raw ones after."""
        module = _unwrap(model)
        self._check_model(module)
        with torch.no_grad():
            backup_p = {n: p.detach().clone() for n, p in module.named_parameters()}
            backup_b = {n: b.detach().clone() for n, b in module.named_buffers()}
        self.copy_to(module)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in module.named_parameters():
                    p.copy_(backup_p[name])
                for name, b in module.named_buffers():
                    b.copy_(backup_b[name])

    def state_dict(self) -> dict[str, Any]:
        """Averages, buffers and settings (tensors are references, not copies)."""
        return {
            "decay": self.decay,
            "start_step": self.start_step,
            "num_updates": self.num_updates,
            "shadow": dict(self.shadow),
            "buffers": dict(self.buffers),
        }

    def _check_state(self, state: Mapping[str, Any]) -> None:
        for key in ("shadow", "buffers"):
            if key not in state:
                raise ValueError(f"EMA state has no '{key}' entry")
        lines = _shape_mismatches(
            _shapes(self.shadow),
            _shapes(state["shadow"]),
            expected_name="EMA",
            found_name="EMA state",
        )
        if lines:
            raise ValueError("EMA state does not match the model:\n  " + "\n  ".join(lines))

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict`; raises ``ValueError`` on mismatched names or shapes."""
        self._check_state(state)
        self.decay = float(state.get("decay", self.decay))
        self.start_step = int(state.get("start_step", self.start_step))
        self.num_updates = int(state.get("num_updates", 0))
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
        for name, value in state["buffers"].items():
            if name in self.buffers and self.buffers[name].shape == value.shape:
                self.buffers[name].copy_(value)


# ---------------------------------------------------------------------------------------
# adaptive gradient clipping (EDM, Hoogeboom et al. 2022)
# ---------------------------------------------------------------------------------------


class GradNormQueue:
    """The last ``max_len`` gradient norms, for :func:`clip_grad_adaptive`.

    Parameters
    ----------
    max_len : int, default 50
        Window length.
    initial : float or None, default 3000.0
        Value the queue starts with (EDM starts with 3000, i.e. effectively no clipping
        until real norms have been recorded). ``None`` starts empty.
    """

    def __init__(self, max_len: int = 50, initial: float | None = 3000.0) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.max_len = int(max_len)
        self.items: deque[float] = deque(maxlen=self.max_len)
        if initial is not None:
            self.add(initial)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, value: float) -> None:
        """Append a norm, dropping the oldest once ``max_len`` are held."""
        self.items.append(float(value))

    def mean(self) -> float:
        """Mean of the held norms."""
        return float(np.mean(list(self.items)))

    def std(self) -> float:
        """Population standard deviation (``ddof=0``, as ``np.std``) of the held norms."""
        return float(np.std(list(self.items)))

    def max_norm(self) -> float:
        """Clipping threshold ``1.5 * mean + 2 * std``."""
        if not self.items:
            raise ValueError("GradNormQueue is empty; give it an initial value")
        return 1.5 * self.mean() + 2.0 * self.std()

    def state_dict(self) -> dict[str, Any]:
        """``{"max_len": int, "items": list[float]}`` (oldest first)."""
        return {"max_len": self.max_len, "items": list(self.items)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.max_len = int(state["max_len"])
        self.items = deque((float(v) for v in state["items"]), maxlen=self.max_len)


@torch.no_grad()
def clip_grad_adaptive(params: Iterable[Tensor], history: GradNormQueue) -> float:
    """EDM-style adaptive gradient clipping.

    The threshold is ``1.5 * mean + 2 * std`` of the recent norms in ``history``; gradients
    are scaled down (``torch.nn.utils.clip_grad_norm_``) to that norm if they exceed it, and
    the norm actually kept -- the threshold when clipping, the raw norm otherwise -- is
    pushed into ``history``. A non-finite norm is *not* pushed (it would poison the
    statistics for the next 50 steps); the caller should skip the step.

    Parameters
    ----------
    params : iterable of Tensor
        Parameters whose ``.grad`` is clipped in place.
    history : GradNormQueue
        Recent norms, updated in place.

    Returns
    -------
    float
        The total gradient norm *before* clipping.
    """
    params = [p for p in params if p.grad is not None]
    max_norm = history.max_norm()
    if not params:
        return 0.0
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm, norm_type=2.0))
    if math.isfinite(norm):
        history.add(max_norm if norm > max_norm else norm)
    return norm


# ---------------------------------------------------------------------------------------
# checkpoint files
# ---------------------------------------------------------------------------------------


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary file in the target folder, fsync, then ``os.replace``.

    A crash or exception during the write leaves neither a partial ``path`` nor the
    temporary file behind; an existing ``path`` is replaced only by a complete file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def _checkpoint_files(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _CKPT_RE.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def find_latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The ``ckpt_<step>.pt`` file with the highest step in ``directory`` (``None`` if none)."""
    files = _checkpoint_files(Path(directory))
    return files[-1][1] if files else None


# ---------------------------------------------------------------------------------------
# data order
# ---------------------------------------------------------------------------------------


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
    The :class:`Trainer` calls ``sampler.set_epoch(epoch)`` every epoch.

    Parameters
    ----------
    dataset : Dataset
        Map-style dataset.
    batch_size : int
        Batch size per rank.
    shuffle, seed, drop_last : optional
        Passed to ``DistributedSampler``.
    num_replicas, rank : int, optional
        Defaults come from ``torch.distributed`` (1 and 0 when it is not initialised).
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


# ---------------------------------------------------------------------------------------
# trainer
# ---------------------------------------------------------------------------------------


def _flat_scalars(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(name, value)`` for every numeric leaf of a log record, nested keys joined by ``/``."""
    for key, value in record.items():
        if key in ("step", "epoch"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flat_scalars(value, name + "/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield name, float(value)


@dataclass
class TrainState:
    """Progress of a :class:`Trainer`.

    Attributes
    ----------
    step : int
        Optimizer steps completed (across resumptions).
    epoch : int
        Current epoch (0-based).
    batch_in_epoch : int
        Batches of the current epoch already consumed.
    elapsed : float
        Training wall-clock seconds, summed over resumptions.
    history : list of dict
        Records logged by this trainer object (training windows and evaluations).
    stop_reason : str or None
        Why the last :meth:`Trainer.fit` ended: ``"max_steps"``, ``"max_seconds"`` or
        ``"max_epochs"``.
    last_checkpoint : Path or None
        Most recent checkpoint written or loaded.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    elapsed: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None
    last_checkpoint: Path | None = None


def _default_loss_fn(model: nn.Module, batch: Any) -> Any:
    """``model.training_loss(batch)``."""
    if not hasattr(model, "training_loss"):
        raise AttributeError(
            f"{type(model).__name__} has no training_loss(); pass loss_fn=... to the Trainer"
        )
    return model.training_loss(batch)


class Trainer:
    """Train a model for a number of steps or a wall-clock budget, with exact resumption.

    Parameters
    ----------
    model : nn.Module
        The model (possibly DDP-wrapped).
    optimizer : torch.optim.Optimizer
        Optimizer over the model's parameters.
    train_loader : DataLoader or iterable
        Yields batches; iterated epoch after epoch. See the module docstring for how its
        order is controlled (its sampler's generator is replaced every epoch).
    loss_fn : callable, optional
        ``loss_fn(model, batch)`` returning a scalar tensor, a mapping with ``"loss"`` or an
        object with ``.loss`` (and optional ``.terms``). Default ``model.training_loss(batch)``.
    ema : EMA, optional
        Updated after every optimizer step with the number of completed steps.
    grad_clip : "adaptive", float, GradNormQueue or None, default "adaptive"
        ``"adaptive"``: :func:`clip_grad_adaptive` with a fresh :class:`GradNormQueue`
        (or the given queue); a float: fixed max norm; ``None``: no clipping.
    lr_scheduler : optional
        Object with ``step()``, ``state_dict()``, ``load_state_dict()``; stepped after every
        optimizer step and checkpointed.
    checkpoint_dir : path, optional
        Where ``ckpt_<step>.pt`` files and ``log.jsonl`` go. ``None``: neither is written.
    checkpoint_every : int or None, default 1000
        Steps between checkpoints (a final one is always written when ``fit`` ends).
    keep_checkpoints : int or None, default 3
        Newest checkpoints kept; ``None`` keeps all.
    log_every : int or None, default 100
        Steps per logged record (means over the window); ``None`` disables step logging.
    max_steps : int, optional
        Total optimizer steps (counted across resumptions).
    max_seconds : float, optional
        Wall-clock budget of one :meth:`fit` call, checked after every step.
    max_epochs : int, optional
        Total epochs.
    eval_fn : callable, optional
        ``eval_fn(model) -> mapping of floats`` (or ``None``), called in eval mode, with the
        EMA weights swapped in when ``ema`` is given and ``eval_with_ema`` is true, under
        saved/restored global RNG states. Runs every ``eval_every`` steps and when ``fit``
        ends.
    eval_every : int, optional
        Steps between evaluations (``None``: only at the end).
    eval_with_ema : bool, default True
        Evaluate with the EMA weights.
    device : torch.device or str, optional
        Move each batch there (tensors, containers, objects with ``.to``); ``None``: as is.
    progress : bool, default True
        Show a tqdm progress bar (rank 0 only).
    seed : int, default 0
        Seed of the data order (see the module docstring). Global RNGs are not seeded.
    tensorboard_dir : path, optional
        Also write every logged record (loss, terms, gradient norm, learning rate, and the
        values returned by ``eval_fn``) as TensorBoard scalars there (rank 0 only). Needs the
        ``tensorboard`` package.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: Iterable[Any],
        *,
        loss_fn: LossFn | None = None,
        ema: EMA | None = None,
        grad_clip: str | float | GradNormQueue | None = "adaptive",
        lr_scheduler: Any | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: int | None = 1000,
        keep_checkpoints: int | None = 3,
        log_every: int | None = 100,
        max_steps: int | None = None,
        max_seconds: float | None = None,
        max_epochs: int | None = None,
        eval_fn: Callable[[nn.Module], Mapping[str, Any] | None] | None = None,
        eval_every: int | None = None,
        eval_with_ema: bool = True,
        device: torch.device | str | None = None,
        progress: bool = True,
        seed: int = 0,
        tensorboard_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        for name, value in (
            ("checkpoint_every", checkpoint_every),
            ("keep_checkpoints", keep_checkpoints),
            ("log_every", log_every),
            ("max_epochs", max_epochs),
            ("eval_every", eval_every),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if max_steps is not None and max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {max_steps}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.model = model
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else _default_loss_fn
        self.ema = ema
        self.grad_queue: GradNormQueue | None = None
        self.grad_clip_norm: float | None = None
        if isinstance(grad_clip, GradNormQueue):
            self.grad_queue = grad_clip
        elif isinstance(grad_clip, str):
            if grad_clip != "adaptive":
                raise ValueError(f"grad_clip must be 'adaptive', a float or None: {grad_clip!r}")
            self.grad_queue = GradNormQueue()
        elif grad_clip is not None:
            if not float(grad_clip) > 0:
                raise ValueError(f"a fixed grad_clip must be > 0, got {grad_clip}")
            self.grad_clip_norm = float(grad_clip)
        self.lr_scheduler = lr_scheduler
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.keep_checkpoints = keep_checkpoints
        self.log_every = log_every
        self.max_steps = max_steps
        self.max_seconds = max_seconds
        self.max_epochs = max_epochs
        self.eval_fn = eval_fn
        self.eval_every = eval_every
        self.eval_with_ema = eval_with_ema
        self.device = torch.device(device) if device is not None else None
        self.progress = progress
        self._tensorboard = None
        if tensorboard_dir is not None and self.is_main_process:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError(
                    "tensorboard_dir needs the tensorboard package: pip install tensorboard"
                ) from err
            self._tensorboard = SummaryWriter(str(tensorboard_dir))
        self.seed = int(seed)
        self.state = TrainState()
        self._pending_rng: dict[str, Any] | None = None
        self._saved_step: int | None = None
        self._warned_order = False
        self._window: dict[str, Any] = {}
        self._reset_window()

    # -- properties -----------------------------------------------------------------------

    @property
    def is_main_process(self) -> bool:
        """``True`` unless running distributed on a rank other than 0."""
        return _is_main_process()

    @property
    def log_path(self) -> Path | None:
        """``checkpoint_dir / "log.jsonl"`` (``None`` without a checkpoint folder)."""
        return self.checkpoint_dir / "log.jsonl" if self.checkpoint_dir is not None else None

    # -- main loop ------------------------------------------------------------------------

    def fit(self) -> TrainState:
        """Train until ``max_steps``, ``max_seconds`` or ``max_epochs`` is reached.

        Returns
        -------
        TrainState
            The trainer's state; ``history`` holds the logged records.

        Raises
        ------
        FloatingPointError
            If the loss or the gradient norm is not finite (the weights are not updated).
        """
        if self.max_steps is None and self.max_seconds is None and self.max_epochs is None:
            raise ValueError("set at least one of max_steps, max_seconds, max_epochs")
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None
        self.model.train()
        self.state.stop_reason = None
        start = time.monotonic()
        base_elapsed = self.state.elapsed
        last_eval_step = -1
        first_step = self.state.step
        pbar = self._progress_bar()
        try:
            stop = self._check_stop(start)
            while stop is None:
                if self.max_epochs is not None and self.state.epoch >= self.max_epochs:
                    stop = "max_epochs"
                    break
                produced = False
                for batch in self._epoch_iterator():
                    produced = True
                    loss_value = self._train_step(batch)
                    self.state.elapsed = base_elapsed + time.monotonic() - start
                    if pbar is not None:
                        pbar.update(1)
                        pbar.set_postfix(loss=f"{loss_value:.4g}", refresh=False)
                    step = self.state.step
                    if self.log_every is not None and step % self.log_every == 0:
                        self._log_window()
                    if self.eval_every is not None and step % self.eval_every == 0:
                        self._evaluate()
                        last_eval_step = step
                    if self.checkpoint_every is not None and step % self.checkpoint_every == 0:
                        self.save_checkpoint()
                    stop = self._check_stop(start)
                    if stop is not None:
                        break
                else:
                    if not produced and self.state.batch_in_epoch == 0:
                        raise ValueError(
                            f"train_loader yielded no batch in epoch {self.state.epoch}"
                        )
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0
            self.state.stop_reason = stop
            self.state.elapsed = base_elapsed + time.monotonic() - start
            if self._window["count"]:
                self._log_window()
            if self.eval_fn is not None and self.state.step not in (last_eval_step, first_step):
                self._evaluate()
            if self.checkpoint_dir is not None and self._saved_step != self.state.step:
                self.save_checkpoint()
        finally:
            if pbar is not None:
                pbar.close()
        return self.state

    def _progress_bar(self) -> Any:
        if not self.progress or not self.is_main_process:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.max_steps, initial=self.state.step, desc="train", dynamic_ncols=True)

    def _check_stop(self, start: float) -> str | None:
        if self.max_steps is not None and self.state.step >= self.max_steps:
            return "max_steps"
        if self.max_seconds is not None:
            over = time.monotonic() - start >= self.max_seconds
            if _is_distributed():  # all ranks must stop at the same step
                backend = dist.get_backend()
                dev = (
                    torch.device("cuda", torch.cuda.current_device())
                    if backend == "nccl"
                    else torch.device("cpu")
                )
                flag = torch.tensor([1.0 if over else 0.0], device=dev)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                over = bool(flag.item() > 0)
            if over:
                return "max_seconds"
        return None

    def _epoch_iterator(self) -> Iterator[Any]:
        loader = self.train_loader
        epoch, skip = self.state.epoch, self.state.batch_in_epoch
        controlled = _seed_data_order(loader, self.seed, epoch)
        if not controlled and not self._warned_order:
            warnings.warn(
                "the Trainer cannot control the data order of this loader (its sampler has "
                "no 'generator' or 'set_epoch', or the dataset is iterable); resumed runs may "
                "see different batches than an uninterrupted run",
                stacklevel=3,
            )
            self._warned_order = True
        if skip == 0:
            return iter(loader)
        if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
            return iter(_skipping_loader(loader, skip))
        iterator = iter(loader)
        with _preserved_rng():  # reading the skipped batches must not shift training RNG
            for _ in range(skip):
                if next(iterator, _END) is _END:
                    break
        return iterator

    def _train_step(self, batch: Any) -> float:
        """One optimizer step; returns the loss value."""
        if self.device is not None:
            batch = _to_device(batch, self.device)
        step = self.state.step + 1
        loss, terms = _split_loss(self.loss_fn(self.model, batch))
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"non-finite loss ({loss_value}) at step {step} (epoch {self.state.epoch}, "
                f"batch {self.state.batch_in_epoch}); the weights were not updated"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.grad_queue is not None:
            grad_norm = clip_grad_adaptive(params, self.grad_queue)
        elif self.grad_clip_norm is not None:
            grads = [p for p in params if p.grad is not None]
            grad_norm = (
                float(torch.nn.utils.clip_grad_norm_(grads, self.grad_clip_norm)) if grads else 0.0
            )
        else:
            grad_norm = _grad_norm(params)
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"non-finite gradient norm ({grad_norm}) at step {step} (epoch "
                f"{self.state.epoch}, batch {self.state.batch_in_epoch}, loss {loss_value:.6g}); "
                "the weights were not updated"
            )
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.state.step = step
        self.state.batch_in_epoch += 1
        if self.ema is not None:
            self.ema.update(self.model, step)
        w = self._window
        w["count"] += 1
        w["loss"] += loss_value
        w["grad_norm"] += grad_norm
        for name, value in terms.items():
            w["terms"][name] = w["terms"].get(name, 0.0) + _scalar(value)
        return loss_value

    # -- logging and evaluation -----------------------------------------------------------

    def _reset_window(self) -> None:
        self._window = {"count": 0, "loss": 0.0, "grad_norm": 0.0, "terms": {}}

    def _log_window(self) -> None:
        w = self._window
        n = max(w["count"], 1)
        record = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "loss": w["loss"] / n,
            "terms": {k: v / n for k, v in w["terms"].items()},
            "grad_norm": w["grad_norm"] / n,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "elapsed": self.state.elapsed,
            "steps_averaged": w["count"],
        }
        self._reset_window()
        self._record(record)

    def _record(self, record: dict[str, Any]) -> None:
        self.state.history.append(record)
        if self._tensorboard is not None:
            for key, value in _flat_scalars(record):
                self._tensorboard.add_scalar(key, value, record["step"])
            self._tensorboard.flush()
        path = self.log_path
        if path is not None and self.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate(self) -> dict[str, Any] | None:
        """Run ``eval_fn`` now (as during training) and return its results."""
        if self.eval_fn is None:
            return None
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with _preserved_rng():
                if self.ema is not None and self.eval_with_ema:
                    with self.ema.average_parameters(model):
                        result = self.eval_fn(model)
                else:
                    result = self.eval_fn(model)
        finally:
            model.train(was_training)
        return dict(result) if result is not None else None

    def _evaluate(self) -> None:
        result = self.evaluate()
        if result is not None:
            values = {
                k: _scalar(v) if isinstance(v, (Tensor, float, int)) else v
                for k, v in result.items()
            }
            self._record(
                {
                    "step": self.state.step,
                    "epoch": self.state.epoch,
                    "eval": values,
                    "elapsed": self.state.elapsed,
                }
            )

    # -- checkpoints ----------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to resume exactly (see the module docstring)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.state.step,
            "epoch": self.state.epoch,
            "batch_in_epoch": self.state.batch_in_epoch,
            "elapsed": self.state.elapsed,
            "seed": self.seed,
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": (
                self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None
            ),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "grad_clip_queue": (
                self.grad_queue.state_dict() if self.grad_queue is not None else None
            ),
            "rng": get_rng_state(),
            # the sampler/loader generators of an epoch are re-created from these
            "data": {
                "seed": self.seed,
                "epoch": self.state.epoch,
                "batch_in_epoch": self.state.batch_in_epoch,
                "sampler_seed": _derive_seed(self.seed, self.state.epoch, 10),
            },
        }

    def save_checkpoint(self, path: str | os.PathLike[str] | None = None) -> Path | None:
        """Write a checkpoint atomically; returns its path (``None`` on ranks other than 0).

        Parameters
        ----------
        path : path, optional
            Target file; default ``checkpoint_dir / f"ckpt_{step:09d}.pt"``.
        """
        if path is None:
            if self.checkpoint_dir is None:
                raise ValueError("no checkpoint_dir given and no path passed")
            path = self.checkpoint_dir / f"ckpt_{self.state.step:09d}.pt"
        path = Path(path)
        if not self.is_main_process:
            return None
        atomic_torch_save(self.checkpoint_state(), path)
        self.state.last_checkpoint = path
        self._saved_step = self.state.step
        if self.keep_checkpoints is not None and path.parent == self.checkpoint_dir:
            files = _checkpoint_files(path.parent)
            for _, old in files[: max(len(files) - self.keep_checkpoints, 0)]:
                if old != path:
                    with contextlib.suppress(OSError):
                        old.unlink()
        return path

    def resume(
        self, path: str | os.PathLike[str] | None = None, *, weights_only: bool = True
    ) -> TrainState:
        """Load a checkpoint (a file, or the latest ``ckpt_<step>.pt`` of a folder).

        Model, optimizer, scheduler, EMA, gradient-norm queue, step, epoch, position in the
        epoch and data seed are restored now; the global RNG states are restored now and
        again when :meth:`fit` starts (so RNG use in between does not matter). Log records
        after the resumed step are dropped from ``log.jsonl``.

        Parameters
        ----------
        path : path, optional
            Checkpoint file or folder; default ``checkpoint_dir``.
        weights_only : bool, default True
            Passed to ``torch.load`` (set ``False`` only for trusted files whose scheduler
            state holds arbitrary objects).

        Raises
        ------
        FileNotFoundError
            If no checkpoint is found.
        ValueError
            If the file cannot be read (truncated, corrupt) or is no Trainer checkpoint, or
            if the checkpoint does not fit the model (names and shapes listed), the EMA or
            the optimizer. Nothing is changed then.
        """
        if path is None:
            if self.checkpoint_dir is None:
                raise ValueError("no checkpoint_dir given and no path passed")
            path = self.checkpoint_dir
        path = Path(path)
        if path.is_dir():
            latest = find_latest_checkpoint(path)
            if latest is None:
                raise FileNotFoundError(f"no ckpt_<step>.pt checkpoint in {path}")
            path = latest
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=weights_only)
        except Exception as err:  # truncated or corrupt files fail deep inside torch.load
            raise ValueError(
                f"cannot read checkpoint {path} ({path.stat().st_size} bytes; truncated or "
                f"corrupt?): {type(err).__name__}: {err}"
            ) from err
        if not isinstance(ckpt, Mapping) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a canonwrap Trainer checkpoint")

        # validate everything before changing anything
        module = _unwrap(self.model)
        lines = _shape_mismatches(_shapes(module.state_dict()), _shapes(ckpt["model"]))
        if lines:
            raise ValueError(
                f"checkpoint {path} is incompatible with the model "
                f"({type(module).__name__}):\n  " + "\n  ".join(lines)
            )
        if self.ema is not None and ckpt.get("ema") is not None:
            try:
                self.ema._check_state(ckpt["ema"])
            except ValueError as err:
                raise ValueError(f"checkpoint {path}: {err}") from err
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as err:
            raise ValueError(f"checkpoint {path}: optimizer state does not fit: {err}") from err

        module.load_state_dict(ckpt["model"])
        if self.lr_scheduler is not None:
            if ckpt.get("lr_scheduler") is not None:
                self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
            else:
                warnings.warn(f"{path} holds no lr_scheduler state", stacklevel=2)
        if self.ema is not None:
            if ckpt.get("ema") is not None:
                self.ema.load_state_dict(ckpt["ema"])
            else:
                warnings.warn(
                    f"{path} holds no EMA; the EMA restarts from the loaded weights",
                    stacklevel=2,
                )
                self.ema = EMA(self.model, self.ema.decay, self.ema.start_step)
        if self.grad_queue is not None:
            if ckpt.get("grad_clip_queue") is not None:
                self.grad_queue.load_state_dict(ckpt["grad_clip_queue"])
            else:
                warnings.warn(f"{path} holds no gradient-norm queue", stacklevel=2)
        if int(ckpt["seed"]) != self.seed:
            warnings.warn(
                f"using the checkpoint's data seed {ckpt['seed']} instead of {self.seed}",
                stacklevel=2,
            )
            self.seed = int(ckpt["seed"])
        self.state.step = int(ckpt["step"])
        self.state.epoch = int(ckpt["epoch"])
        self.state.batch_in_epoch = int(ckpt["batch_in_epoch"])
        self.state.elapsed = float(ckpt["elapsed"])
        self.state.last_checkpoint = path
        self._saved_step = self.state.step
        self._reset_window()
        set_rng_state(ckpt["rng"])
        self._pending_rng = ckpt["rng"]
        self._truncate_log(self.state.step)
        return self.state

    def _truncate_log(self, step: int) -> None:
        path = self.log_path
        if path is None or not path.is_file() or not self.is_main_process:
            return
        kept = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    if int(json.loads(line).get("step", 0)) > step:
                        continue
                except (ValueError, AttributeError):
                    pass
                kept.append(line)
        fd, tmp = tempfile.mkstemp(prefix=".log.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
