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

``--quick`` is a preset for 2 CPU cores (3 minutes per configuration, or ``--steps`` steps:
a step count given without ``--max-minutes`` replaces the preset's time budget, so that
all configurations get the same number of steps); the published
sizes (UNet width 64; canonicalizer of 16 regular fields, 5 layers, kernel 5) are the
defaults of ``--preset full``. Any preset value can be overridden by its flag.
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

from canonwrap import (
    CanonicalizedDiffusion,
    CosineSchedule,
    DDIMSampler,
    PolynomialSchedule,
    TensorSpace,
    frozen,
)
from canonwrap.canonicalizers import Canonicalizer, CanonOutput, DiscreteRotationCanonicalizer
from canonwrap.data.rotmnist import RotatedMNIST, default_mnist_root
from canonwrap.nn import UNet
from canonwrap.training import EMA, Trainer, find_latest_checkpoint

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
PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(
        base_width=64, channel_mults=[1, 2, 2], num_res_blocks=2, attention=True,
        canon_hidden=16, canon_layers=5, canon_kernel=5, canon_downsample=2, prior_weight=0.0,
        batch_size=64, lr=2e-4, canon_lr_ratio=0.1, grad_clip=1.0, ema_decay=0.9999,
        weights="ema", steps=50_000, max_minutes=None, train_size=None, test_images=None,
        holdout=2000, eval_batch=100, num_samples=64, sample_steps=50, timesteps=1000,
        schedule="cosine",
    ),
    "quick": dict(
        base_width=16, channel_mults=[1, 2, 2], num_res_blocks=1, attention=True,
        canon_hidden=4, canon_layers=5, canon_kernel=5, canon_downsample=2, prior_weight=0.0,
        batch_size=32, lr=1e-3, canon_lr_ratio=0.1, grad_clip=1.0, ema_decay=0.999,
        weights="raw", steps=None, max_minutes=3.0, train_size=None, test_images=500,
        holdout=2000, eval_batch=100, num_samples=64, sample_steps=50, timesteps=1000,
        schedule="cosine",
    ),
}
EVAL_KEYS = ("test_loss", "test_loss_sem")


# ------------------------------------------------------------------------- building
class UnitRange(Canonicalizer):
    """Canonicalize images in ``[-1, 1]`` by rotating them in ``[0, 1]``.

    Rotations by angles other than multiples of 90 degrees bring in corners that
    :func:`~canonwrap.groups.rotate_images` fills with zeros. For digits in ``[-1, 1]`` a
    zero is mid-grey, not background, so the canonical digits would get grey corners that
    the data never has. This wrapper hands ``(x + 1) / 2`` to the inner canonicalizer (whose
    scoring network then sees the usual ``[0, 1]`` digits) and maps the canonical digits
    back with ``2 c - 1``: padded corners are background (-1). The group element, the
    prior loss and the gradients are those of the inner canonicalizer.

    Parameters
    ----------
    inner:
        An image canonicalizer acting on ``[B, C, H, W]`` tensors in ``[0, 1]``.
    """

    def __init__(self, inner: Canonicalizer) -> None:
        super().__init__()
        self.inner = inner
        self.group = inner.group

    def forward(self, images: Tensor) -> CanonOutput:
        """Canonical digits ``[B, C, H, W]`` in ``[-1, 1]`` with the inner element and prior."""
        out = self.inner((images + 1) / 2)
        return CanonOutput(out.canonical * 2 - 1, out.element, out.prior_loss)

    def apply_inverse(self, data: Tensor, element: Tensor) -> Tensor:
        """``h^-1 . x`` for given elements, padded with background (used by ``frozen``)."""
        return self.inner.apply_inverse((data + 1) / 2, element) * 2 - 1


def make_schedule(cfg: dict[str, Any]):
    """The noise schedule named by ``cfg["schedule"]`` with ``cfg["timesteps"]`` steps."""
    if cfg["schedule"] == "cosine":
        return CosineSchedule(cfg["timesteps"])
    if cfg["schedule"] == "polynomial":
        return PolynomialSchedule(cfg["timesteps"], power=2, precision=1e-5)
    raise ValueError(f"unknown schedule {cfg['schedule']!r}")


def build_model(name: str, cfg: dict[str, Any]) -> CanonicalizedDiffusion:
    """The diffusion model of configuration ``name``.

    Digits are in ``[-1, 1]``; the canonicalizer is wrapped in :class:`UnitRange` so that
    corners brought in by rotations are background. The UNet is built right after
    ``torch.manual_seed(seed)`` and the canonicalizer after ``torch.manual_seed(seed + 1)``,
    so every configuration starts from the same UNet weights and the C16 configurations
    (learned and frozen) from the same canonicalizer.
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
    torch.manual_seed(cfg["seed"])
    unet = UNet(
        in_channels=1, base_width=cfg["base_width"], channel_mults=tuple(cfg["channel_mults"]),
        num_res_blocks=cfg["num_res_blocks"], attention=bool(cfg["attention"]),
    )
    canon = None
    spec = CONFIGS[name]
    if spec is not None:
        n, is_frozen = spec
        torch.manual_seed(cfg["seed"] + 1)
        canon = UnitRange(DiscreteRotationCanonicalizer(
            n=n, in_channels=1, hidden=cfg["canon_hidden"], layers=cfg["canon_layers"],
            kernel_size=cfg["canon_kernel"], downsample=cfg["canon_downsample"],
            prior_weight=cfg["prior_weight"],
        ))
        if is_frozen:
            canon = frozen(canon)
    return CanonicalizedDiffusion(unet, canon, schedule=make_schedule(cfg), space=TensorSpace())


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
    kwargs = dict(root=cfg["data"], symmetric=True, seed=cfg["data_seed"],
                  test_size=cfg["holdout"])
    train = RotatedMNIST(split="train", **kwargs)
    test = RotatedMNIST(split="test", **kwargs)
    n_test = len(test) if cfg["test_images"] is None else min(cfg["test_images"], len(test))
    return train, test, test.images[:n_test]


def train_subset(train: RotatedMNIST, size: int | None):
    """The first ``size`` training digits (all when ``None``)."""
    if size is None or size >= len(train):
        return train
    return Subset(train, range(size))


# ------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: CanonicalizedDiffusion,
    images: Tensor,
    *,
    batch_size: int,
    seed: int,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Per-digit test reconstruction loss with a fixed draw of ``t`` and noise.

    For each batch (fixed order and size) the canonicalizer runs once; the loss is then
    :meth:`CanonicalizedDiffusion.training_loss` of the same denoiser on the canonical
    digits with an identity canonicalizer. This is the same computation as
    ``model.training_loss(x, generator)`` (the canonicalizer draws no random numbers, so
    ``t`` and the noise come from ``generator`` in the same order), and it also gives the
    group element of every digit.

    Parameters
    ----------
    model:
        The trained model (put in eval mode by the caller).
    images:
        Test digits ``[N, 1, H, W]``.
    batch_size:
        Digits per batch; must be the same for every model compared.
    seed:
        Seed of the generator of ``t`` and the noise.

    Returns
    -------
    dict
        ``loss [N]`` (mean squared error per pixel), ``t [N]`` (integer steps) and
        ``element [N]`` (long; zeros without canonicalizer).
    """
    plain = CanonicalizedDiffusion(model.denoiser, schedule=model.schedule, space=TensorSpace())
    gen = torch.Generator().manual_seed(int(seed))
    losses, steps, elements = [], [], []
    starts = range(0, images.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="test loss", unit="batch", dynamic_ncols=True)
    for start in starts:
        x = images[start : start + batch_size]
        canon = model.canonicalize(x)
        out = plain.training_loss(canon.canonical, generator=gen)
        losses.append(out.per_sample.double())
        steps.append(out.t)
        elements.append(canon.element.reshape(-1).long())
    return {"loss": torch.cat(losses), "t": torch.cat(steps), "element": torch.cat(elements)}


def orientation_concentration(
    angles: Tensor | None, elements: Tensor, labels: Tensor, n: int
) -> tuple[float, float] | None:
    """How consistently the canonical digits of each class are oriented, in ``[0, 1]``.

    The canonical digit ``i`` is the upright digit rotated by
    ``r_i = angle_i - 2 pi k_i / n`` (``k_i`` its group element). For each class the mean
    resultant length ``|mean_i exp(1j r_i)|`` is 1 when all its canonical digits share one
    orientation and about ``1 / sqrt(count)`` when orientations are uniform; the result
    is its average over classes weighted by their counts.

    Returns
    -------
    tuple of float or None
        ``(concentration, chance)``: ``chance`` is the same average of
        ``sqrt(pi / (4 m))``, the expected resultant length of ``m`` uniform angles
        (large-``m`` limit), i.e. the value of a canonicalizer that aligns nothing.
        ``None`` when the angles are unknown (``.amat`` data).
    """
    if angles is None:
        return None
    r = angles.double() - 2 * math.pi * elements.double() / n
    total, chance, count = 0.0, 0.0, 0
    for c in labels.unique():
        sel = labels == c
        m = int(sel.sum())
        resultant = torch.complex(torch.cos(r[sel]), torch.sin(r[sel])).mean().abs()
        total += float(resultant) * m
        chance += math.sqrt(math.pi / (4 * m)) * m
        count += m
    return total / max(count, 1), chance / max(count, 1)


def loss_by_t(loss: Tensor, t: Tensor, timesteps: int) -> dict[str, float]:
    """Mean loss in three ranges of ``t``: low (< T/10), middle (< T/2), high noise."""
    bins = {
        "t<0.1T": t < timesteps * 0.1,
        "0.1T<=t<0.5T": (t >= timesteps * 0.1) & (t < timesteps * 0.5),
        "t>=0.5T": t >= timesteps * 0.5,
    }
    return {k: float(loss[m].mean()) if m.any() else float("nan") for k, m in bins.items()}


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
    fig, axes = plt.subplots(len(rows), cols, figsize=(0.7 * cols + 1.2, 0.8 * len(rows) + 0.5),
                             squeeze=False)
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
        canvas[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = (
            imgs[idx, 0]
        )
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
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """The preset of ``args`` with every flag that was given applied over it."""
    preset = "quick" if args.quick else args.preset
    cfg = dict(PRESETS[preset])
    data = args.data if args.data is not None else default_mnist_root()
    cfg.update(preset=preset, seed=args.seed, data_seed=args.data_seed, eval_seed=args.eval_seed,
               data=str(data) if data is not None else None)
    for key in PRESETS["full"]:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    if args.steps is not None and args.max_minutes is None:
        cfg["max_minutes"] = None  # an explicit step count replaces the preset's time budget
    if cfg["steps"] is None and cfg["max_minutes"] is None:
        raise SystemExit("give --steps and/or --max-minutes (the preset sets neither)")
    return cfg


def run_config(name: str, cfg: dict[str, Any], data, args: argparse.Namespace) -> dict[str, Any]:
    """Train, evaluate and sample one configuration; writes ``<out>/<name>/``."""
    train, test, test_images = data
    folder = Path(args.out) / name
    folder.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    model = build_model(name, cfg)
    params = count_parameters(model)
    ckpt_dir = folder / "checkpoints"
    if not args.resume and find_latest_checkpoint(ckpt_dir) is not None:
        raise SystemExit(f"{ckpt_dir} holds checkpoints: pass --resume or use a new --out")
    (folder / "config.json").write_text(
        json.dumps({"config": name, **cfg, "parameters": params}, indent=2)
    )
    print(f"[{name}] parameters {params}; {len(train)} training digits "
          f"(using {len(train_subset(train, cfg['train_size']))}), "
          f"{test_images.shape[0]} test digits", flush=True)

    loader = DataLoader(
        train_subset(train, cfg["train_size"]), batch_size=cfg["batch_size"], shuffle=True,
        drop_last=True, generator=torch.Generator().manual_seed(cfg["seed"]),
    )
    optimizer = make_optimizer(model, cfg)
    ema = EMA(model, decay=cfg["ema_decay"])
    torch.manual_seed(cfg["seed"] + 2)  # t and noise of training: the same for every config
    trainer = Trainer(
        model, optimizer, loader,
        loss_fn=lambda m, batch: m.training_loss(batch[0]),
        ema=ema, grad_clip=cfg["grad_clip"], checkpoint_dir=ckpt_dir,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=2, log_every=args.log_every,
        max_steps=cfg["steps"],
        max_seconds=cfg["max_minutes"] * 60 if cfg["max_minutes"] else None,
        progress=progress, seed=cfg["seed"],
    )
    if args.resume and find_latest_checkpoint(ckpt_dir) is not None:
        trainer.resume(ckpt_dir)
    state = trainer.fit()

    weights = cfg["weights"]
    model.eval()
    start = time.perf_counter()
    if weights == "ema":
        ema.copy_to(model)
    ev = evaluate(model, test_images, batch_size=cfg["eval_batch"], seed=cfg["eval_seed"],
                  progress=progress)
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
    samples = model.sample(cfg["num_samples"], shape=(1, 28, 28),
                           sampler=DDIMSampler(cfg["sample_steps"]), generator=gen,
                           progress=progress)
    sample_s = time.perf_counter() - start
    save_grid(samples, folder / "samples.png",
              f"{name}: {cfg['num_samples']} samples (DDIM, {cfg['sample_steps']} steps)")
    if spec is not None:
        k = min(16, n_test)
        with torch.no_grad():
            canon = model.canonicalize(test_images[:k]).canonical
        rows = [("input", test_images[:k]), ("canonical", canon)]
        if test.angles is not None:
            upright = RotatedMNIST(split="test", root=cfg["data"], symmetric=True, rotate=False,
                                   test_size=cfg["holdout"]).images[:k]
            rows.insert(0, ("upright (ref.)", upright))
        save_image_rows(rows, folder / "canonical.png",
                        f"{name}: test digits and their canonical poses")

    result = {
        "config": name,
        "test_loss": float(loss.mean()),
        "test_loss_sem": _sem(loss),
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
    print(f"[{name}] test loss {result['test_loss']:.5f} after {state.step} steps "
          f"({state.elapsed:.0f} s training)", flush=True)
    return result


# ------------------------------------------------------------------------- summary
def _sem(values: Tensor) -> float:
    """Standard error of the mean of ``values [N]`` (nan when ``N < 2``)."""
    if values.numel() < 2:
        return float("nan")
    return float(values.std() / math.sqrt(values.numel()))


def split_by_interpolation(diff: Tensor, element: Tensor, n: int) -> dict[str, Any]:
    """Paired loss differences on digits whose canonical pose was interpolated or exact.

    Element ``k`` of C_n is an exact pixel permutation when ``k`` is a multiple of
    ``n / 4`` (a multiple of 90 degrees) and a bilinear interpolation otherwise, which
    also smooths the digit. Splitting the paired difference ``diff [N]`` (canonicalized
    minus UNet) by this tells a gain from alignment apart from a gain on smoothed digits.
    """
    exact = element % max(n // 4, 1) == 0 if n % 4 == 0 else element == 0
    out: dict[str, Any] = {"interpolated_fraction": float((~exact).double().mean())}
    for key, sel in (("exact", exact), ("interpolated", ~exact)):
        out[f"diff_vs_unet_{key}"] = float(diff[sel].mean()) if sel.any() else float("nan")
        out[f"diff_vs_unet_{key}_sem"] = _sem(diff[sel])
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
            res["test_loss_sem"] = _sem(torch.load(path, weights_only=True)["loss"])
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
            res["diff_vs_unet_sem"] = _sem(diff)
            res.update(split_by_interpolation(diff, torch.load(path, weights_only=True)["element"],
                                              CONFIGS[name][0]))
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
            if "diff_vs_unet" in r else "—"
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
            lines.append(f"| {PUBLISHED_LABELS[name]} | {r['interpolated_fraction']:.2f} "
                         f"| {cells[0]} | {cells[1]} |")
    if config is not None:
        keys = ("preset", "base_width", "channel_mults", "num_res_blocks", "canon_hidden",
                "canon_layers", "canon_kernel", "batch_size", "lr", "canon_lr_ratio",
                "schedule", "timesteps", "weights", "test_images", "sample_steps")
        lines += ["", "Settings: " + ", ".join(f"{k}={config.get(k)}" for k in keys)]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    """The command-line parser (``run`` and ``report``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train, evaluate and sample configurations")
    run.add_argument("--out", required=True, help="output folder")
    run.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    run.add_argument("--data", default=None,
                     help="MNIST folder (default: RotatedMNIST's default root)")
    run.add_argument("--preset", choices=list(PRESETS), default="full")
    run.add_argument("--quick", action="store_true", help="2-CPU preset (a few minutes each)")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    run.add_argument("--seed", type=int, default=0, help="weights, data order, training noise")
    run.add_argument("--data-seed", type=int, default=0, help="rotation angles of the digits")
    run.add_argument("--eval-seed", type=int, default=1234, help="test t and noise; samples")
    run.add_argument("--resume", action="store_true", help="continue from checkpoints")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--checkpoint-every", type=int, default=500)
    run.add_argument("--log-every", type=int, default=25)
    kinds = {"max_minutes": float, "channel_mults": int, "attention": int}
    for key, value in PRESETS["full"].items():
        kind = kinds.get(key, type(value) if value is not None else int)
        extra: dict[str, Any] = {"nargs": "+"} if key == "channel_mults" else {}
        if key in ("schedule", "weights"):
            extra["choices"] = ["cosine", "polynomial"] if key == "schedule" else ["raw", "ema"]
        run.add_argument("--" + key.replace("_", "-"), type=kind, default=None, dest=key,
                         help=f"(full preset: {value}; quick: {PRESETS['quick'][key]})", **extra)

    rep = sub.add_parser("report", help="rewrite results.json/.md from finished configs")
    rep.add_argument("--out", required=True)
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
