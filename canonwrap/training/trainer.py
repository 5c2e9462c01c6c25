"""The [`Trainer`][canonwrap.training.Trainer] and its progress,
[`TrainState`][canonwrap.training.TrainState].

How exact resumption and distributed training work is described in
[`canonwrap.training`][canonwrap.training].
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from canonwrap.training.checkpoint import (
    CHECKPOINT_FORMAT,
    _checkpoint_files,
    _checkpoint_name,
    _prune_checkpoints,
    _shape_mismatches,
    _shapes,
    atomic_torch_save,
)
from canonwrap.training.clipping import GradNormQueue, _clip_gradients
from canonwrap.training.data_order import _epoch_batches
from canonwrap.training.distributed import _any_rank, _is_main_process, _unwrap
from canonwrap.training.ema import EMA
from canonwrap.training.integrity import (
    _all_finite,
    _listed,
    _nonfinite_names,
    _read_newest_verified,
    _with_checksum,
    read_checkpoint,
)
from canonwrap.training.logs import (
    _append_record,
    _tensorboard_writer,
    _truncate_log,
    _write_scalars,
)
from canonwrap.training.loss import LossFn, _default_loss_fn, _scalar, _split_loss, _to_device
from canonwrap.training.rng import _derive_seed, _preserved_rng, get_rng_state, set_rng_state
from canonwrap.training.run_folder import RunLock, _open_checkpoint_dir

__all__ = ["TrainState", "Trainer"]


@dataclass
class TrainState:
    """Progress of a [`Trainer`][canonwrap.training.Trainer].

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
        Why the last [`Trainer.fit`][canonwrap.training.Trainer.fit] ended: ``"max_steps"``,
        ``"max_seconds"`` or ``"max_epochs"``.
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
        ``"adaptive"``: [`clip_grad_adaptive`][canonwrap.training.clip_grad_adaptive] with a fresh
        [`GradNormQueue`][canonwrap.training.GradNormQueue] (or the given queue); a float: fixed max
        norm; ``None``: no clipping.
    lr_scheduler
        Object with ``step()``, ``state_dict()``, ``load_state_dict()``; stepped after every
        optimizer step and checkpointed.
    checkpoint_dir : path, optional
        Where ``ckpt_<step>.pt`` files and ``log.jsonl`` go (and ``run.lock`` while ``fit``
        runs). ``None``: neither is written.
    checkpoint_every : int or None, default 1000
        Steps between checkpoints (a final one is always written when ``fit`` ends).
    keep_checkpoints : int or None, default 3
        Newest checkpoints kept; ``None`` keeps all.
    log_every : int or None, default 100
        Steps per logged record (means over the window); ``None`` disables step logging.
    max_steps : int, optional
        Total optimizer steps (counted across resumptions).
    max_seconds : float, optional
        Wall-clock budget of one [`fit`][canonwrap.training.Trainer.fit] call, checked after every
        step.
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
            self._tensorboard = _tensorboard_writer(tensorboard_dir)
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

        Before the first step, the checkpoint folder is checked to be writable, locked
        against other runs (see [`RunLock`][canonwrap.training.RunLock]) and cleared of
        temporary files left by saves that were killed midway.

        Returns
        -------
        TrainState
            The trainer's state; ``history`` holds the logged records.

        Raises
        ------
        FloatingPointError
            If the loss or the gradient norm is not finite (the weights are not updated), or
            the weights or the EMA are not finite after an optimizer step (no checkpoint of
            that step is written; the last good one stays).
        PermissionError
            If the checkpoint folder or its log is not writable (before any step).
        RuntimeError
            If another live process holds the checkpoint folder's lock.
        """
        if self.max_steps is None and self.max_seconds is None and self.max_epochs is None:
            raise ValueError("set at least one of max_steps, max_seconds, max_epochs")
        lock = self._claim_checkpoint_dir()
        try:
            return self._fit()
        finally:
            if lock is not None:
                lock.release()

    def _claim_checkpoint_dir(self) -> RunLock | None:
        """Check, lock and clean the checkpoint folder (rank 0; ``None`` without a folder)."""
        if self.checkpoint_dir is None or not self.is_main_process:
            return None
        lock, removed = _open_checkpoint_dir(self.checkpoint_dir, "log.jsonl")
        try:
            _checkpoint_files(self.checkpoint_dir)  # a non-file under a checkpoint's name
        except BaseException:
            lock.release()
            raise
        if removed:
            warnings.warn(
                f"removed {len(removed)} temporary file(s) left in {self.checkpoint_dir} by "
                f"saves that were interrupted: {', '.join(removed)}",
                stacklevel=3,
            )
        return lock

    def _fit(self) -> TrainState:
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
            # all ranks must stop at the same step
            if _any_rank(time.monotonic() - start >= self.max_seconds):
                return "max_seconds"
        return None

    def _epoch_iterator(self) -> Iterator[Any]:
        iterator, controlled = _epoch_batches(
            self.train_loader, self.seed, self.state.epoch, self.state.batch_in_epoch
        )
        if not controlled and not self._warned_order:
            warnings.warn(
                "the Trainer cannot control the data order of this loader (its sampler has "
                "no 'generator' or 'set_epoch', or the dataset is iterable); resumed runs may "
                "see different batches than an uninterrupted run",
                stacklevel=3,
            )
            self._warned_order = True
        return iterator

    def _train_step(self, batch: Any) -> float:
        """One optimizer step; returns the loss value."""
        if self.device is not None:
            batch = _to_device(batch, self.device)
        step = self.state.step + 1
        try:
            loss, terms = _split_loss(self.loss_fn(self.model, batch))
        except FloatingPointError as err:  # raised inside the model (e.g. a NaN output)
            raise FloatingPointError(
                f"at step {step} (epoch {self.state.epoch}, batch "
                f"{self.state.batch_in_epoch}; the weights were not updated): {err}"
            ) from err
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
        grad_norm = _clip_gradients(params, self.grad_queue, self.grad_clip_norm)
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"non-finite gradient norm ({grad_norm}) at step {step} (epoch "
                f"{self.state.epoch}, batch {self.state.batch_in_epoch}, loss {loss_value:.6g}); "
                "the weights were not updated"
            )
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, step)
        self._check_finite_weights(params, step, loss_value, grad_norm)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.state.step = step
        self.state.batch_in_epoch += 1
        w = self._window
        w["count"] += 1
        w["loss"] += loss_value
        w["grad_norm"] += grad_norm
        for name, value in terms.items():
            w["terms"][name] = w["terms"].get(name, 0.0) + _scalar(value)
        return loss_value

    def _check_finite_weights(
        self, params: list[Tensor], step: int, loss_value: float, grad_norm: float
    ) -> None:
        """Raise ``FloatingPointError`` if an optimizer step made a weight or the EMA non-finite."""
        shadow = list(self.ema.shadow.values()) if self.ema is not None else []
        if _all_finite([*params, *shadow]):
            return
        bad = _nonfinite_names(_unwrap(self.model).named_parameters())
        if self.ema is not None:
            bad += [f"ema {n}" for n in _nonfinite_names(self.ema.shadow.items())]
        last = self.state.last_checkpoint
        raise FloatingPointError(
            f"non-finite weights after the optimizer step of step {step} (epoch "
            f"{self.state.epoch}, batch {self.state.batch_in_epoch}, loss {loss_value:.6g}, "
            f"gradient norm {grad_norm:.6g}): {_listed(bad) or 'optimizer parameters'}. "
            "Training stopped; no checkpoint holds these weights, the last good one is "
            f"{last if last is not None else 'none (none was written)'}. A learning rate too "
            "large for the model is the usual cause"
        )

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
            _write_scalars(self._tensorboard, record)
        if self.log_path is not None and self.is_main_process:
            _append_record(self.log_path, record)

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
        """Everything needed to resume exactly (see the module docstring).

        The file that [`save_checkpoint`][canonwrap.training.Trainer.save_checkpoint]
        writes holds this plus a ``"checksum"`` entry.
        """
        module = _unwrap(self.model)
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.state.step,
            "epoch": self.state.epoch,
            "batch_in_epoch": self.state.batch_in_epoch,
            "elapsed": self.state.elapsed,
            "seed": self.seed,
            "model": module.state_dict(),
            "parameter_names": [name for name, _ in module.named_parameters()],
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

        The file carries a SHA-256 checksum of its contents, verified whenever it is read.

        Parameters
        ----------
        path : path, optional
            Target file; default ``checkpoint_dir / f"ckpt_{step:09d}.pt"``.

        Raises
        ------
        FloatingPointError
            If a parameter or the EMA is not finite (nothing is written).
        """
        if path is None:
            if self.checkpoint_dir is None:
                raise ValueError("no checkpoint_dir given and no path passed")
            path = self.checkpoint_dir / _checkpoint_name(self.state.step)
        path = Path(path)
        if not self.is_main_process:
            return None
        state = self.checkpoint_state()
        bad = _nonfinite_names(_unwrap(self.model).named_parameters())
        if self.ema is not None:
            bad += [f"ema {n}" for n in _nonfinite_names(self.ema.shadow.items())]
        if bad:
            raise FloatingPointError(
                f"checkpoint of step {self.state.step} not written to {path}: non-finite "
                f"weights {_listed(bad)}"
            )
        atomic_torch_save(_with_checksum(state), path)
        self.state.last_checkpoint = path
        self._saved_step = self.state.step
        if self.keep_checkpoints is not None and path.parent == self.checkpoint_dir:
            _prune_checkpoints(path.parent, self.keep_checkpoints, path)
        return path

    def resume(self, path: str | os.PathLike[str] | None = None) -> TrainState:
        """Load a checkpoint: a file, or the newest ``ckpt_<step>.pt`` of a folder that verifies.

        Files are read with ``torch.load(weights_only=True)`` (a crafted file cannot run
        code) and verified: their checksum must match and their weights be finite. From a
        folder, checkpoints that fail are skipped, newest first, with a warning that names
        each and why, and renamed to ``<name>.corrupt``; an entry named like a checkpoint
        that is no regular file is an error (never a silent rollback).

        Model, optimizer, scheduler, EMA, gradient-norm queue, step, epoch, position in the
        epoch and data seed are restored now; the global RNG states are restored now and
        again when [`fit`][canonwrap.training.Trainer.fit] starts (so RNG use in between does not
        matter). Log records after the step actually resumed are dropped from ``log.jsonl``.

        Parameters
        ----------
        path : path, optional
            Checkpoint file or folder; default ``checkpoint_dir``.

        Raises
        ------
        FileNotFoundError
            If no checkpoint is found.
        CheckpointError
            If the file (or every checkpoint of the folder) fails to verify; a
            ``ValueError``.
        ValueError
            If an entry named like a checkpoint is no file, or if the checkpoint does not
            fit the model (names and shapes listed), the EMA or the optimizer. Nothing is
            changed then.
        RuntimeError
            If another live process holds the lock of ``checkpoint_dir``.
        """
        if path is None:
            if self.checkpoint_dir is None:
                raise ValueError("no checkpoint_dir given and no path passed")
            path = self.checkpoint_dir
        main = self.is_main_process
        lock = None
        if main and self.checkpoint_dir is not None and self.checkpoint_dir.is_dir():
            try:  # another live run must not change under our feet (RuntimeError)
                lock = RunLock(self.checkpoint_dir).acquire()
            except OSError:  # a read-only folder: resuming to evaluate is fine
                lock = None
        try:
            return self._resume(Path(path), rename=main)
        finally:
            if lock is not None:
                lock.release()

    def _resume(self, path: Path, rename: bool) -> TrainState:
        if path.is_dir():
            path, ckpt = _read_newest_verified(path, rename=rename)
        else:
            ckpt = read_checkpoint(path)

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
                warnings.warn(f"{path} holds no lr_scheduler state", stacklevel=3)
        if self.ema is not None:
            if ckpt.get("ema") is not None:
                self.ema.load_state_dict(ckpt["ema"])
            else:
                warnings.warn(
                    f"{path} holds no EMA; the EMA restarts from the loaded weights",
                    stacklevel=3,
                )
                self.ema = EMA(self.model, self.ema.decay, self.ema.start_step)
        if self.grad_queue is not None:
            if ckpt.get("grad_clip_queue") is not None:
                self.grad_queue.load_state_dict(ckpt["grad_clip_queue"])
            else:
                warnings.warn(f"{path} holds no gradient-norm queue", stacklevel=3)
        if int(ckpt["seed"]) != self.seed:
            warnings.warn(
                f"using the checkpoint's data seed {ckpt['seed']} instead of {self.seed}",
                stacklevel=3,
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
        if self.log_path is not None and self.is_main_process:
            _truncate_log(self.log_path, self.state.step)
        return self.state
