"""Training loop with EMA, EDM-style adaptive gradient clipping and exact resumption.

The [`Trainer`][canonwrap.training.Trainer] drives any ``nn.Module`` whose loss is computed by a
``loss_fn(model, batch)`` (by default ``model.training_loss(batch)``, as in
[`CanonicalizedDiffusion`][canonwrap.diffusion.CanonicalizedDiffusion]). The loss function may
return a scalar tensor, a mapping with a ``"loss"`` entry or any object with a ``.loss`` attribute
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
   and restored at the start of [`Trainer.fit`][canonwrap.training.Trainer.fit]. Evaluation runs
   inside a saved/restored RNG context, so it never perturbs training randomness.

Exactness additionally requires that the dataset itself is deterministic per index when
``num_workers > 0`` (random augmentation inside workers is re-seeded per epoch but the
assignment of batches to workers changes after a skip), and deterministic kernels on GPU.

Distributed training
--------------------
If ``torch.distributed`` is initialised, only rank 0 writes checkpoints and logs and shows
the progress bar; stopping on ``max_seconds`` is agreed between ranks. Wrapped models
(``DistributedDataParallel``/``DataParallel``) are unwrapped for checkpoints and the EMA.
With DDP, pass a ``loss_fn`` that goes through the wrapper's ``forward`` so that gradients are
synchronised. [`distributed_sampler_loader`][canonwrap.training.distributed_sampler_loader] builds a
loader with a ``DistributedSampler``.

Reliability
-----------
Every checkpoint carries a SHA-256 checksum of its contents; files are read with
``torch.load(weights_only=True)`` and verified (checksum, finite weights) by
[`read_checkpoint`][canonwrap.training.read_checkpoint], and
[`Trainer.resume`][canonwrap.training.Trainer.resume] takes the newest checkpoint of a folder
that verifies, naming the ones it skipped. After every optimizer step the weights and the
EMA are checked to be finite: a step that breaks them stops training with an error that
names the step, and no checkpoint ever holds non-finite weights. Before the first step,
[`Trainer.fit`][canonwrap.training.Trainer.fit] checks that the checkpoint folder is
writable, takes its [`RunLock`][canonwrap.training.RunLock] and removes temporary files of
interrupted saves. [`claim_run_folder`][canonwrap.training.claim_run_folder] gives a whole
output folder to one run (the examples' ``--resume``/``--overwrite``).

Layout
------
``trainer`` ([`Trainer`][canonwrap.training.Trainer],
[`TrainState`][canonwrap.training.TrainState]), ``ema``, ``clipping``, ``checkpoint`` (files,
atomic writes), ``integrity`` (checksums, reading and verifying), ``run_folder`` (locks, one
run per folder, checks before training), ``rng`` (global RNG states), ``data_order`` (rules 1
and 2), ``distributed``, ``loss`` (calling ``loss_fn``) and ``logs`` (``log.jsonl``,
TensorBoard). Everything public is importable from ``canonwrap.training``.
"""

from canonwrap.training.checkpoint import (
    CHECKPOINT_FORMAT,
    atomic_torch_save,
    find_latest_checkpoint,
    list_checkpoints,
)
from canonwrap.training.clipping import GradNormQueue, clip_grad_adaptive
from canonwrap.training.distributed import distributed_sampler_loader
from canonwrap.training.ema import EMA
from canonwrap.training.integrity import CheckpointError, read_checkpoint
from canonwrap.training.logs import read_evaluations
from canonwrap.training.loss import LossFn
from canonwrap.training.rng import get_rng_state, set_rng_state
from canonwrap.training.run_folder import RunLock, claim_run_folder
from canonwrap.training.trainer import Trainer, TrainState

__all__ = [
    "EMA",
    "GradNormQueue",
    "clip_grad_adaptive",
    "TrainState",
    "Trainer",
    "atomic_torch_save",
    "find_latest_checkpoint",
    "list_checkpoints",
    "distributed_sampler_loader",
    "get_rng_state",
    "set_rng_state",
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "LossFn",
    "RunLock",
    "claim_run_folder",
    "read_checkpoint",
    "read_evaluations",
]
