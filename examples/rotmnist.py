"""Rotated MNIST: a denoising UNet vs the same UNet behind a learned C_n canonicalizer.

Configurations (``--configs``), all trained on the same digits with the same budget:

- ``unet``: the UNet alone on rotated digits (no canonicalization);
- ``canon-c8``, ``canon-c16``, ``canon-c32``: the UNet behind a learned
  :class:`~canonwrap.canonicalizers.DiscreteRotationCanonicalizer` (escnn C_n CNN);
- ``canon-c16-frozen``: the C16 canonicalizer at its (seeded) random initialisation, frozen.

Commands::

    python examples/rotmnist.py run    --out runs/rotmnist [--quick] [--configs unet canon-c16]
    python examples/rotmnist.py report --out runs/rotmnist     # re-collect results only

``run`` trains each configuration (checkpoints, exact resume with ``--resume``), then
evaluates the **test reconstruction loss**: the mean squared error between the true and
the predicted noise over the test digits, at random timesteps ``t ~ U{0..T}`` with noise
drawn from one generator seeded with ``--eval-seed``, so that every model sees the same
``t`` and the same noise for every test digit (the comparison is paired). It then draws
samples with a deterministic DDIM sampler (``--sample-steps``, 50 by default, instead of
all ``T`` ancestral steps, to keep CPU time low) and writes figures.

Outputs in ``--out``: per configuration ``<config>/config.json``, ``<config>/checkpoints``
(Trainer checkpoints and ``log.jsonl``), ``<config>/result.json``, ``<config>/test_eval.pt``
(per-digit losses, steps and group elements), ``<config>/samples.png`` and, for
canonicalized configurations, ``<config>/canonical.png`` (upright reference / rotated input
/ canonical digit); and, over every configuration present in ``--out``, ``results.json``,
``results.md`` (measured test losses beside the published ones) and ``loss_curves.png``.
Several ``run`` processes may share one ``--out`` with different ``--configs``; each
rewrites the summary from all configurations done so far.

Schedule: the cosine schedule (Nichol & Dhariwal 2021), ``T = 1000`` by default. It is the
usual choice for image diffusion: EDM's ``polynomial_2`` schedule (``--schedule
polynomial``) was tuned for molecules and keeps the signal-to-noise ratio high for most of
the chain, so that fewer steps carry the coarse image structure. The loss value depends on
the schedule, so compare numbers only at the same schedule.

Data: :class:`~canonwrap.data.rotmnist.RotatedMNIST` with grey levels in ``[-1, 1]``. With
only the 10,000 MNIST test digits (IDX ``t10k`` files) these are rotated by seeded uniform
angles and split 8,000 / 2,000 (``--holdout``); with the official rotated-MNIST ``.amat``
files the benchmark's own train / test split is used.

``--quick`` is a preset for 2 CPU cores (3 minutes per configuration, or
``--train-steps`` training steps: a step count given without ``--max-minutes`` replaces
the preset's time budget, so that all configurations get the same number of steps); the
published sizes (UNet width 64; canonicalizer of 16 regular fields, 5 layers, kernel 5)
are the defaults of ``--preset full``, the default preset. Any preset value can be
overridden by its flag (``--help`` lists both presets' values).

The library pieces used here: :func:`canonwrap.images.image_diffusion` (UNet, optionally
behind a :class:`~canonwrap.canonicalizers.DiscreteRotationCanonicalizer` wrapped in
:class:`~canonwrap.canonicalizers.UnitRange`), :class:`canonwrap.data.RotatedMNIST`,
:class:`canonwrap.training.Trainer` and :func:`canonwrap.metrics.images.denoising_test_loss`
with the pose statistics of :mod:`canonwrap.metrics.images`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from canonwrap import CanonicalizedDiffusion, CosineSchedule, DDIMSampler, PolynomialSchedule
from canonwrap.data import RotatedMNIST
from canonwrap.data.rotmnist import default_mnist_root
from canonwrap.images import image_diffusion
from canonwrap.metrics.images import (
    denoising_test_loss,
    loss_by_t,
    orientation_concentration,
    split_by_exactness,
    standard_error,
)
from canonwrap.training import EMA, Trainer, claim_run_folder, find_latest_checkpoint

#: configuration name -> (group order n, frozen); ``None``: no canonicalizer
CONFIGS: dict[str, tuple[int, bool] | None] = {
    "unet": None,
    "canon-c8": (8, False),
    "canon-c16": (16, False),
    "canon-c32": (32, False),
    "canon-c16-frozen": (16, True),
}
#: published test reconstruction losses (UNet base width 64, canonicalizer 16 x 5 x k5)
PUBLISHED: dict[str, float] = {
    "unet": 0.0312,
    "canon-c32": 0.0264,
    "canon-c16": 0.0255,
    "canon-c8": 0.0264,
    "canon-c16-frozen": 0.0264,
}
PUBLISHED_LABELS: dict[str, str] = {
    "unet": "UNet",
    "canon-c8": "canon(C8)+UNet",
    "canon-c16": "canon(C16)+UNet",
    "canon-c32": "canon(C32)+UNet",
    "canon-c16-frozen": "canon(C16, frozen)+UNet",
}

# Published network sizes; the training budget of "full" is our choice (not published).
# Every key is also a flag of `run` (``--base-width``, ...); PRESET_HELP describes it.
FULL: dict[str, Any] = dict(
    base_width=64,
    channel_mults=[1, 2, 2],
    num_res_blocks=2,
    attention=True,
    canon_hidden=16,
    canon_layers=5,
    canon_kernel=5,
    canon_downsample=2,
    prior_weight=0.0,
    batch_size=64,
    lr=2e-4,
    canon_lr_ratio=0.1,
    grad_clip=1.0,
    ema_decay=0.9999,
    weights="ema",
    train_steps=50_000,
    max_minutes=None,
    train_size=None,
    test_images=None,
    holdout=2000,
    eval_batch=100,
    num_samples=64,
    sample_steps=50,
    timesteps=1000,
    schedule="cosine",
)
PRESETS: dict[str, dict[str, Any]] = {
    "full": FULL,
    # 2 CPU cores: smaller networks, a time budget, raw weights, 500 test digits
    "quick": {
        **FULL,
        **dict(
            base_width=16,
            num_res_blocks=1,
            canon_hidden=4,
            batch_size=32,
            lr=1e-3,
            ema_decay=0.999,
            weights="raw",
            train_steps=None,
            max_minutes=3.0,
            test_images=500,
        ),
    },
}


# ------------------------------------------------------------------------- building
def make_schedule(cfg: dict[str, Any]):
    """The noise schedule named by ``cfg["schedule"]`` with ``cfg["timesteps"]`` steps."""
    if cfg["schedule"] == "cosine":
        return CosineSchedule(cfg["timesteps"])
    if cfg["schedule"] == "polynomial":
        return PolynomialSchedule(cfg["timesteps"], power=2, precision=1e-5)
    raise ValueError(f"unknown schedule {cfg['schedule']!r}")


def build_model(name: str, cfg: dict[str, Any]) -> CanonicalizedDiffusion:
    """The diffusion model of configuration ``name``, built by
    :func:`canonwrap.images.image_diffusion`.

    Digits are in ``[-1, 1]``, so the canonicalizer is wrapped in
    :class:`~canonwrap.canonicalizers.UnitRange` (corners brought in by rotations are
    background). With ``seed=cfg["seed"]`` every configuration starts from the same UNet
    weights and the C16 configurations (learned and frozen) from the same canonicalizer.
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
    n, is_frozen = CONFIGS[name] or (None, False)
    return image_diffusion(
        n,
        base_width=cfg["base_width"],
        channel_mults=cfg["channel_mults"],
        num_res_blocks=cfg["num_res_blocks"],
        attention=bool(cfg["attention"]),
        canon_hidden=cfg["canon_hidden"],
        canon_layers=cfg["canon_layers"],
        canon_kernel=cfg["canon_kernel"],
        canon_downsample=cfg["canon_downsample"],
        prior_weight=cfg["prior_weight"],
        freeze_canonicalizer=is_frozen,
        schedule=make_schedule(cfg),
        seed=cfg["seed"],
    )


def count_parameters(model: CanonicalizedDiffusion) -> dict[str, int]:
    """Parameters of the denoiser and of the canonicalizer (trainable or not)."""
    return {
        "denoiser": sum(p.numel() for p in model.denoiser.parameters()),
        "canonicalizer": sum(p.numel() for p in model.canonicalizer.parameters()),
    }


def make_optimizer(model: CanonicalizedDiffusion, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """Adam; the canonicalizer's parameters at ``lr * canon_lr_ratio``."""
    groups = [{"params": list(model.denoiser.parameters()), "lr": cfg["lr"]}]
    canon_params = [p for p in model.canonicalizer.parameters() if p.requires_grad]
    if canon_params:
        groups.append({"params": canon_params, "lr": cfg["lr"] * cfg["canon_lr_ratio"]})
    return torch.optim.Adam(groups, lr=cfg["lr"])


def load_data(cfg: dict[str, Any]) -> tuple[RotatedMNIST, RotatedMNIST, Tensor]:
    """Training set, test set, and the test images evaluated (``[N, 1, 28, 28]``)."""
    kwargs = dict(root=cfg["data"], symmetric=True, seed=cfg["data_seed"], test_size=cfg["holdout"])
    train = RotatedMNIST(split="train", **kwargs)
    test = RotatedMNIST(split="test", **kwargs)
    n_test = len(test) if cfg["test_images"] is None else min(cfg["test_images"], len(test))
    return train, test, test.images[:n_test]


def train_subset(train: RotatedMNIST, size: int | None):
    """The first ``size`` training digits (all when ``None``)."""
    if size is None or size >= len(train):
        return train
    return Subset(train, range(size))


# ------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _to_unit(images: Tensor) -> Tensor:
    return ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)


def save_image_rows(rows: list[tuple[str, Tensor]], path: Path, title: str) -> None:
    """One row of digits per ``(label, images [K, 1, H, W])`` pair, values in ``[-1, 1]``."""
    plt = _pyplot()
    cols = max(r[1].shape[0] for r in rows)
    fig, axes = plt.subplots(
        len(rows), cols, figsize=(0.7 * cols + 1.2, 0.8 * len(rows) + 0.5), squeeze=False
    )
    for i, (label, imgs) in enumerate(rows):
        imgs = _to_unit(imgs)
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < imgs.shape[0]:
                ax.imshow(imgs[j, 0], cmap="gray", vmin=0, vmax=1)
        axes[i][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_grid(images: Tensor, path: Path, title: str, ncol: int = 8) -> None:
    """A square-ish grid of ``images [K, 1, H, W]`` (values in ``[-1, 1]``)."""
    plt = _pyplot()
    imgs = _to_unit(images)
    k = imgs.shape[0]
    nrow = math.ceil(k / ncol)
    h, w = imgs.shape[-2:]
    canvas = torch.ones(nrow * (h + 2), ncol * (w + 2))
    for idx in range(k):
        r, c = divmod(idx, ncol)
        canvas[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = imgs[
            idx, 0
        ]
    fig, ax = plt.subplots(figsize=(0.45 * ncol + 0.4, 0.45 * nrow + 0.6))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_loss_curves(out: Path, names: list[str]) -> Path | None:
    """Training loss (windowed means from ``log.jsonl``) of every configuration."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    drawn = False
    for name in names:
        log = out / name / "checkpoints" / "log.jsonl"
        if not log.is_file():
            continue
        steps, losses = [], []
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                steps.append(record["step"])
                losses.append(record["terms"].get("denoising", record["loss"]))
        if steps:
            ax.plot(steps, losses, label=name, lw=1)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("training denoising loss (window mean)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------- running
def machine() -> dict[str, Any]:
    """CPU model, core count and versions, recorded next to every result."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """The preset of ``args`` with every flag that was given applied over it."""
    preset = "quick" if args.quick else args.preset
    cfg = dict(PRESETS[preset])
    data = args.data if args.data is not None else default_mnist_root()
    cfg.update(
        preset=preset,
        seed=args.seed,
        data_seed=args.data_seed,
        eval_seed=args.eval_seed,
        data=str(data) if data is not None else None,
    )
    for key in PRESETS["full"]:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    if args.train_steps is not None and args.max_minutes is None:
        cfg["max_minutes"] = None  # an explicit step count replaces the preset's time budget
    if cfg["train_steps"] is None and cfg["max_minutes"] is None:
        raise SystemExit("give --train-steps and/or --max-minutes (the preset sets neither)")
    return cfg


def run_config(name: str, cfg: dict[str, Any], data, args: argparse.Namespace) -> dict[str, Any]:
    """Train, evaluate and sample one configuration; writes ``<out>/<name>/``."""
    folder = Path(args.out) / name
    # one run per folder: refuse another run's folder unless --resume or --overwrite
    with claim_run_folder(folder, resume=args.resume, overwrite=args.overwrite):
        return _run_config(name, cfg, data, args, folder)


def _run_config(
    name: str, cfg: dict[str, Any], data, args: argparse.Namespace, folder: Path
) -> dict[str, Any]:
    train, test, test_images = data
    progress = not args.no_progress
    model = build_model(name, cfg)
    params = count_parameters(model)
    ckpt_dir = folder / "checkpoints"
    (folder / "config.json").write_text(
        json.dumps({"config": name, **cfg, "parameters": params}, indent=2)
    )
    print(
        f"[{name}] parameters {params}; {len(train)} training digits "
        f"(using {len(train_subset(train, cfg['train_size']))}), "
        f"{test_images.shape[0]} test digits",
        flush=True,
    )

    loader = DataLoader(
        train_subset(train, cfg["train_size"]),
        batch_size=cfg["batch_size"],
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(cfg["seed"]),
    )
    optimizer = make_optimizer(model, cfg)
    ema = EMA(model, decay=cfg["ema_decay"])
    torch.manual_seed(cfg["seed"] + 2)  # t and noise of training: the same for every config
    trainer = Trainer(
        model,
        optimizer,
        loader,
        loss_fn=lambda m, batch: m.training_loss(batch[0]),
        ema=ema,
        grad_clip=cfg["grad_clip"],
        checkpoint_dir=ckpt_dir,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=2,
        log_every=args.log_every,
        max_steps=cfg["train_steps"],
        max_seconds=cfg["max_minutes"] * 60 if cfg["max_minutes"] else None,
        progress=progress,
        seed=cfg["seed"],
    )
    if args.resume and find_latest_checkpoint(ckpt_dir) is not None:
        trainer.resume(ckpt_dir)
    state = trainer.fit()

    weights = cfg["weights"]
    model.eval()
    start = time.perf_counter()
    if weights == "ema":
        ema.copy_to(model)
    ev = denoising_test_loss(
        model, test_images, batch_size=cfg["eval_batch"], seed=cfg["eval_seed"], progress=progress
    )
    eval_s = time.perf_counter() - start
    loss = ev["loss"]
    n_test = test_images.shape[0]
    spec = CONFIGS[name]
    labels = test.labels[:n_test]
    angles = test.angles[:n_test] if test.angles is not None else None
    concentration = orientation_concentration(
        angles, ev["element"], labels, spec[0] if spec is not None else 1
    )
    torch.save({**ev, "labels": labels}, folder / "test_eval.pt")

    # samples in canonical pose (DDIM, deterministic after the prior draw)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg["eval_seed"] + 1)
    samples = model.sample(
        cfg["num_samples"],
        shape=(1, 28, 28),
        sampler=DDIMSampler(cfg["sample_steps"]),
        generator=gen,
        progress=progress,
    )
    sample_s = time.perf_counter() - start
    save_grid(
        samples,
        folder / "samples.png",
        f"{name}: {cfg['num_samples']} samples (DDIM, {cfg['sample_steps']} steps)",
    )
    if spec is not None:
        k = min(16, n_test)
        with torch.no_grad():
            canon = model.canonicalize(test_images[:k]).canonical
        rows = [("input", test_images[:k]), ("canonical", canon)]
        if test.angles is not None:
            upright = RotatedMNIST(
                split="test",
                root=cfg["data"],
                symmetric=True,
                rotate=False,
                test_size=cfg["holdout"],
            ).images[:k]
            rows.insert(0, ("upright (ref.)", upright))
        save_image_rows(
            rows, folder / "canonical.png", f"{name}: test digits and their canonical poses"
        )

    result = {
        "config": name,
        "test_loss": float(loss.mean()),
        "test_loss_sem": standard_error(loss),
        "test_loss_by_t": loss_by_t(loss, ev["t"], cfg["timesteps"]),
        "test_images": n_test,
        "orientation_concentration": concentration[0] if concentration else None,
        "orientation_chance": concentration[1] if concentration else None,
        "published": PUBLISHED[name],
        "steps": state.step,
        "stop_reason": state.stop_reason,
        "train_seconds": state.elapsed,
        "eval_seconds": eval_s,
        "sample_seconds": sample_s,
        "weights": weights,
        "parameters": params,
        "machine": machine(),
    }
    (folder / "result.json").write_text(json.dumps(result, indent=2))
    print(
        f"[{name}] test loss {result['test_loss']:.5f} after {state.step} steps "
        f"({state.elapsed:.0f} s training)",
        flush=True,
    )
    return result


# ------------------------------------------------------------------------- summary
def split_by_interpolation(diff: Tensor, element: Tensor, n: int) -> dict[str, Any]:
    """Paired differences ``diff [N]`` (canonicalized minus UNet) on exact and on
    interpolated canonical poses (:func:`canonwrap.metrics.images.split_by_exactness`),
    under the keys of ``result.json``."""
    split = split_by_exactness(diff, element, n)
    out: dict[str, Any] = {"interpolated_fraction": split.pop("interpolated_fraction")}
    out.update({f"diff_vs_unet_{key}": value for key, value in split.items()})
    return out


def collect(out: Path) -> dict[str, Any]:
    """Gather ``<out>/<config>/result.json`` of every configuration; write the summary."""
    results = {}
    for name in CONFIGS:
        path = out / name / "result.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())
    # paired differences against the UNet (same digits, same t, same noise)
    for name, res in results.items():
        path = out / name / "test_eval.pt"
        if path.is_file():
            res["test_loss_sem"] = standard_error(torch.load(path, weights_only=True)["loss"])
    base = out / "unet" / "test_eval.pt"
    if base.is_file():
        ref = torch.load(base, weights_only=True)["loss"]
        for name, res in results.items():
            path = out / name / "test_eval.pt"
            if name == "unet" or not path.is_file():
                continue
            loss = torch.load(path, weights_only=True)["loss"]
            if loss.shape != ref.shape:
                continue
            diff = loss - ref
            res["diff_vs_unet"] = float(diff.mean())
            res["diff_vs_unet_sem"] = standard_error(diff)
            res.update(
                split_by_interpolation(
                    diff, torch.load(path, weights_only=True)["element"], CONFIGS[name][0]
                )
            )
    config = None
    for name in results:
        config = json.loads((out / name / "config.json").read_text())
        break
    summary = {"results": results, "published": PUBLISHED, "config": config}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(markdown_table(results, config))
    save_loss_curves(out, list(results))
    return summary


def markdown_table(results: dict[str, dict[str, Any]], config: dict[str, Any] | None) -> str:
    """The results table in Markdown (measured beside published)."""
    lines = [
        "# Rotated MNIST: test reconstruction loss",
        "",
        "Test loss: mean squared error between true and predicted noise per pixel, over the "
        "test digits at random `t` (the same `t` and noise for every model). "
        "Differences vs UNet are paired (mean ± standard error over test digits). "
        "Orientation concentration: per-class mean resultant length of the canonical "
        "digits' orientations (1: every digit of a class in one pose; chance: no alignment).",
        "",
        "| configuration | test loss (measured) | ± s.e. | Δ vs UNet (paired) | published "
        "| steps | train wall-clock | params UNet / canon. | orientation conc. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        diff = (
            f"{r['diff_vs_unet']:+.5f} ± {r['diff_vs_unet_sem']:.5f}"
            if "diff_vs_unet" in r
            else "—"
        )
        conc = r.get("orientation_concentration")
        chance = r.get("orientation_chance")
        lines.append(
            f"| {PUBLISHED_LABELS[name]} | {r['test_loss']:.5f} | {r['test_loss_sem']:.5f} "
            f"| {diff} | {r['published']:.4f} | {r['steps']} | {r['train_seconds'] / 60:.1f} min "
            f"| {r['parameters']['denoiser']:,} / {r['parameters']['canonicalizer']:,} "
            f"| {'—' if conc is None else f'{conc:.3f} (chance {chance:.3f})'} |"
        )
    split = {k: r for k, r in results.items() if "interpolated_fraction" in r}
    if split:
        lines += [
            "",
            "Paired difference vs UNet split by the canonical pose: exact (a multiple of 90 "
            "degrees, a pixel permutation) or interpolated (bilinear, which also smooths "
            "the digit).",
            "",
            "| configuration | interpolated fraction | Δ on exact poses "
            "| Δ on interpolated poses |",
            "|---|---|---|---|",
        ]
        for name, r in split.items():
            cells = [
                f"{r[f'diff_vs_unet_{key}']:+.5f} ± {r[f'diff_vs_unet_{key}_sem']:.5f}"
                for key in ("exact", "interpolated")
            ]
            lines.append(
                f"| {PUBLISHED_LABELS[name]} | {r['interpolated_fraction']:.2f} "
                f"| {cells[0]} | {cells[1]} |"
            )
    if config is not None:
        keys = (
            "preset",
            "base_width",
            "channel_mults",
            "num_res_blocks",
            "canon_hidden",
            "canon_layers",
            "canon_kernel",
            "batch_size",
            "lr",
            "canon_lr_ratio",
            "schedule",
            "timesteps",
            "weights",
            "test_images",
            "sample_steps",
        )
        lines += ["", "Settings: " + ", ".join(f"{k}={config.get(k)}" for k in keys)]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------- CLI
#: help text of each preset key's flag
PRESET_HELP: dict[str, str] = {
    "base_width": "UNet base width",
    "channel_mults": "UNet channel multiplier per resolution level",
    "num_res_blocks": "UNet residual blocks per level",
    "attention": "UNet self-attention at the lowest resolution (1 or 0)",
    "canon_hidden": "canonicalizer: regular fields per hidden layer",
    "canon_layers": "canonicalizer: steerable convolution layers",
    "canon_kernel": "canonicalizer: kernel size",
    "canon_downsample": "canonicalizer: poolings by 2",
    "prior_weight": "canonicalizer: weight of the prior loss towards the identity",
    "batch_size": "training batch size",
    "lr": "Adam learning rate of the UNet",
    "canon_lr_ratio": "canonicalizer learning rate as a fraction of --lr",
    "grad_clip": "gradient clipping norm",
    "ema_decay": "decay of the exponential moving average of the weights",
    "weights": "weights evaluated and sampled: raw or their EMA",
    "train_steps": "training steps per configuration",
    "max_minutes": "training time budget per configuration, in minutes",
    "train_size": "training digits used (None: all)",
    "test_images": "test digits evaluated (None: all)",
    "holdout": "test digits held out when only the t10k IDX files exist",
    "eval_batch": "test digits per evaluation batch (same for every configuration)",
    "num_samples": "samples drawn per configuration",
    "sample_steps": "DDIM sampling steps",
    "timesteps": "diffusion steps T",
    "schedule": "noise schedule",
}


def parser() -> argparse.ArgumentParser:
    """The command-line parser (``run`` and ``report``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="train, evaluate and sample configurations",
        description="Train, evaluate and sample configurations. Settings come from the preset "
        "(default: full; --quick for 2 CPU cores); each preset value can be overridden by "
        "its flag, whose help lists both presets' values.",
    )
    run.add_argument("--out", required=True, help="output folder (one sub-folder per config)")
    run.add_argument(
        "--configs",
        nargs="+",
        choices=list(CONFIGS),
        default=list(CONFIGS),
        metavar="CONFIG",
        help=f"configurations to run, in this order, from {{{','.join(CONFIGS)}}} (default: all)",
    )
    run.add_argument(
        "--data",
        default=None,
        help="MNIST folder with IDX or rotated-MNIST .amat files (default: $CANONWRAP_MNIST)",
    )
    run.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="full",
        help="settings preset (default: %(default)s, the published sizes)",
    )
    run.add_argument(
        "--quick",
        action="store_true",
        help="use the quick preset: 2 CPU cores, 3 minutes per configuration",
    )
    run.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    run.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the weights, data order and training noise (default: %(default)s)",
    )
    run.add_argument(
        "--data-seed",
        type=int,
        default=0,
        help="seed of the rotation angles of the digits (default: %(default)s)",
    )
    run.add_argument(
        "--eval-seed",
        type=int,
        default=1234,
        help="seed of the test t and noise, and of the samples (default: %(default)s)",
    )
    run.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an earlier run's files in --out/<config> before training it",
    )
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument(
        "--checkpoint-every",
        type=int,
        default=500,
        help="training steps between checkpoints (default: %(default)s)",
    )
    run.add_argument(
        "--log-every",
        type=int,
        default=25,
        help="training steps per logged loss window (default: %(default)s)",
    )
    kinds = {"max_minutes": float, "channel_mults": int, "attention": int}
    for key, value in PRESETS["full"].items():
        kind = kinds.get(key, type(value) if value is not None else int)
        extra: dict[str, Any] = {"nargs": "+"} if key == "channel_mults" else {}
        if key in ("schedule", "weights"):
            extra["choices"] = ["cosine", "polynomial"] if key == "schedule" else ["raw", "ema"]
        run.add_argument(
            "--" + key.replace("_", "-"),
            type=kind,
            default=None,
            dest=key,
            help=f"{PRESET_HELP[key]} (full preset: {value}; quick: {PRESETS['quick'][key]})",
            **extra,
        )

    rep = sub.add_parser("report", help="rewrite results.json/.md from finished configs")
    rep.add_argument("--out", required=True, help="output folder of earlier runs")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the command given by ``argv``; returns the summary (``results.json``)."""
    args = parser().parse_args(argv)
    out = Path(args.out)
    if args.command == "report":
        return collect(out)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = resolve_config(args)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg)
    for name in args.configs:
        run_config(name, cfg, data, args)
        collect(out)
    summary = collect(out)
    print((out / "results.md").read_text(), flush=True)
    return summary


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main(sys.argv[1:])
