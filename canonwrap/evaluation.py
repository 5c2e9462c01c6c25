"""Evaluating trained models over data: held-out loss, likelihood, frame drift, weights.

What the examples, benchmarks and tests share when they measure a model: each function
takes a model and a loader (any iterable of batches) and returns plain numbers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from canonwrap.canonicalizers.anchored import rotation_angle
from canonwrap.canonicalizers.base import Canonicalizer

__all__ = [
    "heldout_loss",
    "heldout_nll",
    "per_sample_nll",
    "FrameDrift",
    "load_weights",
    "qm9_reference_smiles",
    "load_qm9_run",
]


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def heldout_loss(model: Any, loader: Iterable[Any], seed: int = 0) -> float:
    """Mean denoising loss per dimension over ``loader`` with a fixed draw of t and noise.

    The same ``seed`` gives the same times and noise for the same data, so two models
    (or two checkpoints of one model) are compared on identical noisy inputs.

    Parameters
    ----------
    model : CanonicalizedDiffusion
        The model (its ``training_loss`` is evaluated, in whatever mode it is in).
    loader : iterable
        Batches of held-out data.
    seed : int
        Seed of the generator that draws t and the noise.

    Returns
    -------
    float
        Mean of ``training_loss(batch).per_sample`` over all samples.
    """
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    device = _device_of(model)
    for batch in loader:
        out = model.training_loss(batch.to(device), generator=gen)
        total += out.per_sample.sum().item()
        count += out.per_sample.numel()
    if count == 0:
        raise ValueError("heldout_loss: the loader yielded no samples")
    return total / count


#: The terms of the NLL outputs that ``per_sample_nll`` collects, when the output has them:
#: ``NLLOutput`` (diffusion) and ``FlowNLLOutput`` (flow matching).
_NLL_TERMS = ("nll", "kl_prior", "diffusion", "flow", "dequantization", "reconstruction", "size")


def per_sample_nll(
    model: Any, loader: Iterable[Any], seed: int = 0, **nll_options: Any
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``-log p(x)`` or its bound (nats) of every sample of ``loader``, with its terms.

    Diffusion models: the model's Monte-Carlo estimate (one t per sample, fixed by
    ``seed``). Flow-matching models: the ODE likelihood, whose noise (``generator``) and
    Hutchinson probe (torch's global RNG) are both fixed by ``seed``; the global RNG is
    forked for the call, so a training run's random stream is left as it was. Two models
    scored with the same ``seed`` on the same batches draw the same ``t`` and noise when
    they consume the generator alike, which the returned end state lets a caller check.

    Parameters
    ----------
    model : CanonicalizedDiffusion or CanonicalizedFlowMatching
        The model (its ``nll`` is evaluated).
    loader : iterable
        Batches of held-out data.
    seed : int
        Seed of the draws.
    **nll_options
        Passed to ``model.nll`` (flow matching: ``method``, ``steps``, ``atol``, ``rtol``).

    Returns
    -------
    tuple
        ``(terms, state)``: ``terms`` maps ``nll`` and the terms of the model's output
        (diffusion: ``kl_prior``, ``diffusion``, ``reconstruction``, ``size``; flow
        matching: ``flow``, ``dequantization``, ``reconstruction``, ``size``) to float64
        CPU tensors ``[M]`` in loader order; ``state`` is the generator's state after the
        last batch.
    """
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {}
    device = _device_of(model)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for batch in loader:
            with torch.no_grad():
                out = model.nll(batch.to(device), generator=gen, **nll_options)
            for key in _NLL_TERMS:
                if hasattr(out, key):
                    parts.setdefault(key, []).append(getattr(out, key).detach().double().cpu())
    if not parts:
        raise ValueError("per_sample_nll: the loader yielded no samples")
    return {k: torch.cat(v) for k, v in parts.items()}, gen.get_state()


def heldout_nll(
    model: Any, loader: Iterable[Any], seed: int = 0, **nll_options: Any
) -> dict[str, float]:
    """Mean ``-log p(x)`` or its bound (nats per sample) and its terms.

    The means of [`per_sample_nll`][canonwrap.evaluation.per_sample_nll] (same draws).

    Parameters
    ----------
    model : CanonicalizedDiffusion or CanonicalizedFlowMatching
        The model (its ``nll`` is evaluated).
    loader : iterable
        Batches of held-out data.
    seed : int
        Seed of the draws.
    **nll_options
        Passed to ``model.nll`` (flow matching: ``method``, ``steps``, ``atol``, ``rtol``).

    Returns
    -------
    dict
        ``nll`` and the terms of the model's output (diffusion: ``kl_prior``, ``diffusion``,
        ``reconstruction``, ``size``; flow matching: ``flow``, ``dequantization``,
        ``reconstruction``, ``size``), each the mean over all samples of ``loader``, and
        ``nll_se``: the standard error of that mean over samples (sample standard deviation
        / sqrt(n); it contains the spread of the one-draw estimate as well as the spread
        between molecules, so it is what a difference between two models' ``nll`` should
        be compared with).
    """
    terms, _ = per_sample_nll(model, loader, seed, **nll_options)
    result = {k: float(v.mean()) for k, v in terms.items()}
    every = terms["nll"]
    count = every.numel()
    result["nll_se"] = float(every.std() / count**0.5) if count > 1 else float("nan")
    return result


class FrameDrift:
    """How far a learned canonicalizer's frames move between two evaluations.

    Holds a fixed probe batch; each call computes the canonicalizer's rotation for every
    probe sample and returns the median angle (degrees) of ``R_prev^T R_now`` against the
    previous call (``None`` on the first call), plus the median angle to the frames of the
    first call. A monitor for training logs, not part of any model.

    Parameters
    ----------
    probe : Batch
        A fixed batch of point clouds (e.g. 64 validation molecules).
    """

    def __init__(self, probe: Any) -> None:
        self.probe = probe
        self._first: torch.Tensor | None = None
        self._last: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, canonicalizer: Canonicalizer) -> dict[str, float]:
        was_training = canonicalizer.training
        canonicalizer.eval()
        try:
            device = _device_of(canonicalizer)
            rot = canonicalizer(self.probe.to(device)).element.double().cpu()
        finally:
            canonicalizer.train(was_training)
        if rot.dim() != 3 or rot.shape[-2:] != (3, 3):
            raise ValueError("FrameDrift needs a canonicalizer whose elements are [B, 3, 3]")
        out: dict[str, float] = {}
        if self._last is not None:
            out["frame_drift_deg"] = rotation_angle(self._last, rot).median().item()
            out["frame_drift_total_deg"] = rotation_angle(self._first, rot).median().item()
        else:
            self._first = rot
        self._last = rot
        return out


def load_weights(model: nn.Module, path: str | os.PathLike[str], weights: str = "raw") -> nn.Module:
    """Load raw or EMA weights from a checkpoint written by ``training.Trainer`` (in place).

    The file is read with ``torch.load(weights_only=True)``, which refuses pickled code
    (a crafted checkpoint cannot run anything), and verified with
    [`read_checkpoint`][canonwrap.training.read_checkpoint]: a Trainer checkpoint's checksum
    must match and the weights must be finite. A plain ``{"model": state_dict}`` file
    (no checksum) is accepted when its weights are finite.

    Parameters
    ----------
    model : nn.Module
        A model of the same architecture as the one that was trained.
    path : path
        A ``ckpt_<step>.pt`` file.
    weights : Literal['raw', 'ema']
        ``'ema'`` loads the exponential moving average of the weights (an error if the
        checkpoint holds none).

    Returns
    -------
    nn.Module
        ``model``, in eval mode.

    Raises
    ------
    CheckpointError
        A ``ValueError`` naming the file and why it cannot be trusted (unreadable, refused
        pickled objects, checksum mismatch, non-finite weights).
    """
    from canonwrap.training import CheckpointError, read_checkpoint

    _check_weights_name(weights)
    path = Path(path)
    try:
        ckpt = read_checkpoint(path, trainer_only=False)
    except CheckpointError as err:
        raise CheckpointError(f"cannot load checkpoint: {err}") from err
    return _apply_weights(model, ckpt, path, weights)


def _check_weights_name(weights: str) -> None:
    if weights not in ("raw", "ema"):
        raise ValueError(f"weights must be 'raw' or 'ema'; got {weights!r}")


def _apply_weights(model: nn.Module, ckpt: dict[str, Any], path: Path, weights: str) -> nn.Module:
    """Load the raw or EMA weights of a checkpoint already read and verified from ``path``."""
    model.load_state_dict(ckpt["model"])
    if weights == "ema":
        ema_state = ckpt.get("ema")
        if ema_state is None:
            raise ValueError(f"{path} holds no EMA weights; use weights='raw'")
        from canonwrap.training import EMA

        ema = EMA(model)
        ema.load_state_dict(ema_state)
        ema.copy_to(model)
    model.eval()
    return model


_SMILES_CACHE_HEADER = "# canonwrap novelty SMILES v2"


def _smiles_digest(lines: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogatepass")).hexdigest()


def _read_smiles_cache(path: Path, source: str) -> list[str]:
    """The SMILES of a novelty cache file; ``ValueError`` saying why it does not verify."""
    lines = path.read_text(encoding="utf-8").split("\n")
    fields = dict(f.split("=", 1) for f in lines[0].split()[5:] if "=" in f)
    if not lines[0].startswith(_SMILES_CACHE_HEADER) or not {"count", "sha256", "source"} <= set(
        fields
    ):
        raise ValueError("no valid header line")
    body = lines[1:]
    if fields["source"] != source:
        raise ValueError("it was built from other training SMILES")
    if str(len(body)) != fields["count"]:
        raise ValueError(f"it holds {len(body)} SMILES, its header says {fields['count']}")
    if _smiles_digest(body) != fields["sha256"]:
        raise ValueError("checksum mismatch: the file was altered or damaged")
    return body


def qm9_reference_smiles(remove_h: bool = False, progress: bool = True) -> list[str]:
    """QM9's training SMILES in the molecule metrics' convention (the novelty reference).

    Rewriting 100,000 SMILES with RDKit takes about a minute, so the list is cached next
    to the QM9 cache (``$CANONWRAP_CACHE`` or ``~/.cache/canonwrap/qm9``) and reused. The
    file is written atomically; its header records the number of SMILES, their SHA-256 and
    a digest of the training SMILES they were made from, and a cache that does not match
    all three is rebuilt with a warning that says why.

    Parameters
    ----------
    remove_h : bool
        The hydrogen-free variant of QM9.
    progress : bool
        Show a progress bar while rewriting.

    Returns
    -------
    list of str
        One canonical SMILES per training molecule that RDKit can read.
    """
    import warnings

    from canonwrap._io import atomic_open
    from canonwrap.data.qm9 import QM9, default_cache_dir
    from canonwrap.metrics.molecules import canonicalize_smiles

    path = default_cache_dir() / f"train_smiles_metric_v2{'_noh' if remove_h else ''}.txt"
    raw = QM9("train", remove_h=remove_h, progress=False).smiles()
    source = _smiles_digest(raw)
    if path.exists():
        try:
            return _read_smiles_cache(path, source)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            warnings.warn(f"novelty SMILES cache {path} is rebuilt: {err}", stacklevel=2)
    items: Iterable[str] = raw
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(raw, desc="training SMILES for novelty", unit="mol")
    out = [c for c in (canonicalize_smiles(s) for s in items) if c is not None]
    header = f"{_SMILES_CACHE_HEADER} count={len(out)} sha256={_smiles_digest(out)} source={source}"
    try:
        with atomic_open(path, "w", permissions=0o644) as f:
            f.write("\n".join([header, *out]))
    except OSError as err:
        warnings.warn(f"could not write the novelty SMILES cache {path}: {err}", stacklevel=2)
    return out


def load_qm9_run(
    folder: str | os.PathLike[str], weights: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """The trained model of a QM9 example run folder, with the run's configuration.

    Reads ``config.json`` (its ``model_config`` entry describes the model, see
    [`QM9ModelConfig`][canonwrap.recipes.QM9ModelConfig]), builds the model with QM9's
    training-set size distribution, and loads the newest checkpoint of
    ``checkpoints/`` that verifies (weights only): a newer one whose checksum fails or
    whose weights are not finite is skipped with a warning naming it and why, and left in
    place (``train --resume`` renames such files to ``.corrupt``).

    Parameters
    ----------
    folder : path
        The ``--out`` folder of ``examples/qm9.py train``.
    weights : Literal['raw', 'ema'], optional
        Which weights to load (default: the run's ``weights`` setting).

    Returns
    -------
    tuple
        ``(model, config)``: the model in eval mode on the CPU, and ``config.json`` as a dict.
    """
    import json

    from canonwrap.data.qm9 import QM9
    from canonwrap.recipes import QM9ModelConfig, qm9_model
    from canonwrap.training.integrity import _read_newest_verified

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: is {folder} a QM9 training folder?")
    cfg = json.loads(cfg_path.read_text())
    if "model_config" not in cfg:
        raise ValueError(f"{cfg_path} has no model_config entry (written by an older version)")
    from canonwrap import NodeCountDistribution

    train = QM9("train", remove_h=cfg["model_config"]["remove_h"], progress=False)
    node_counts = NodeCountDistribution(train.node_count_histogram())
    model = qm9_model(QM9ModelConfig(**cfg["model_config"]), node_counts)
    weights = weights or cfg.get("weights", "raw")
    _check_weights_name(weights)
    # the newest checkpoint that verifies, as resume takes it; the files are left as they
    # are (sampling and evaluating only read the folder), with a warning naming any skipped
    try:
        path, ckpt = _read_newest_verified(folder / "checkpoints", rename=False, action="loading")
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint in {folder / 'checkpoints'}: train first") from None
    _apply_weights(model, ckpt, path, weights)
    return model, cfg
