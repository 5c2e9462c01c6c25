"""Held-out evaluation of image diffusion models, and how a C_n canonicalizer poses images.

- [`denoising_test_loss`][canonwrap.metrics.images.denoising_test_loss]: the per-image test
reconstruction loss (Algorithm 1's loss
  on held-out images) with one seeded draw of ``t`` and noise, so that several models can
  be compared image by image (paired);
- [`loss_by_t`][canonwrap.metrics.images.loss_by_t]: that loss in low, middle and high noise ranges;
- [`orientation_concentration`][canonwrap.metrics.images.orientation_concentration]: how
consistently the canonical images of each class
  are oriented, when the rotation of every input image is known;
- [`exact_pose_mask`][canonwrap.metrics.images.exact_pose_mask] and
[`split_by_exactness`][canonwrap.metrics.images.split_by_exactness]: which canonical poses are exact
  pixel permutations (multiples of 90 degrees) and which were interpolated;
- [`standard_error`][canonwrap.metrics.images.standard_error]: the standard error of a mean.

Only PyTorch is needed (no escnn).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from canonwrap.diffusion import CanonicalizedDiffusion
from canonwrap.spaces import TensorSpace

__all__ = [
    "exact_pose_mask",
    "loss_by_t",
    "orientation_concentration",
    "split_by_exactness",
    "standard_error",
    "denoising_test_loss",
]


def _batches(images: Tensor | Iterable[Any], batch_size: int | None) -> Iterable[Tensor]:
    """Image batches from a tensor ``[N, C, H, W]`` or from a loader of batches."""
    if isinstance(images, Tensor):
        if batch_size is None:
            raise ValueError("batch_size is required when images is a tensor")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
        return
    for batch in images:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def denoising_test_loss(
    model: CanonicalizedDiffusion,
    images: Tensor | Iterable[Any],
    *,
    seed: int,
    batch_size: int | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Per-image test reconstruction loss with a fixed draw of ``t`` and noise.

    For each batch the canonicalizer runs once; the loss is then
    [`CanonicalizedDiffusion.training_loss`][canonwrap.diffusion.CanonicalizedDiffusion.training_loss]
    of the same denoiser on the canonical images with an identity canonicalizer. This is the same
    computation as ``model.training_loss(x, generator)`` batch by batch (a canonicalizer draws no
    random numbers, so ``t`` and the noise come from ``generator`` in the same order), and it also
    returns the group element of every image. Two models evaluated with the same ``seed``, images
    and batches see the same ``t`` and the same noise for every image, so their per-image losses can
    be compared pairwise.

    Parameters
    ----------
    model
        The trained model; put it in eval mode first (``model.eval()``).
    images
        Test images ``[N, C, H, W]`` (then ``batch_size`` is required), or an iterable of
        batches such as a ``DataLoader`` without shuffling; a batch is a tensor or a
        tuple/list whose first item is the image tensor (``(images, labels)``).
    seed
        Seed of the CPU generator of ``t`` and the noise.
    batch_size
        Images per batch when ``images`` is a tensor. The batches must be the same for
        every model compared (the draw of ``t`` and noise follows them).
    progress
        Show a tqdm progress bar.

    Returns
    -------
    dict
        ``loss [N]`` (float64; mean squared error per pixel), ``t [N]`` (integer steps) and
        ``element [N]`` (long; the group element, zeros for the identity canonicalizer).
        Each is on the CPU.
    """
    plain = CanonicalizedDiffusion(model.denoiser, schedule=model.schedule, space=TensorSpace())
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(int(seed))
    losses, steps, elements = [], [], []
    batches = _batches(images, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="test loss", unit="batch", dynamic_ncols=True)
    for x in batches:
        canon = model.canonicalize(x.to(device))
        out = plain.training_loss(canon.canonical, generator=gen)
        losses.append(out.per_sample.double().cpu())
        steps.append(out.t.cpu())
        elements.append(canon.element.reshape(-1).long().cpu())
    if not losses:
        raise ValueError("no test images")
    return {"loss": torch.cat(losses), "t": torch.cat(steps), "element": torch.cat(elements)}


def loss_by_t(loss: Tensor, t: Tensor, timesteps: int) -> dict[str, float]:
    """Mean of ``loss [N]`` in three ranges of ``t [N]``: ``t < T/10``, ``T/10 <= t < T/2``
    and ``t >= T/2`` (low, middle, high noise); ``nan`` for an empty range."""
    bins = {
        "t<0.1T": t < timesteps * 0.1,
        "0.1T<=t<0.5T": (t >= timesteps * 0.1) & (t < timesteps * 0.5),
        "t>=0.5T": t >= timesteps * 0.5,
    }
    return {k: float(loss[m].mean()) if m.any() else float("nan") for k, m in bins.items()}


def standard_error(values: Tensor) -> float:
    """Standard error of the mean of ``values [N]`` (``nan`` when ``N < 2``)."""
    if values.numel() < 2:
        return float("nan")
    return float(values.double().std() / math.sqrt(values.numel()))


def orientation_concentration(
    angles: Tensor | None, elements: Tensor, labels: Tensor, n: int
) -> tuple[float, float] | None:
    """How consistently the canonical images of each class are oriented, in ``[0, 1]``.

    Image ``i`` is an upright image rotated by ``angle_i``; its canonical pose is then the
    upright image rotated by ``r_i = angle_i - 2 pi k_i / n`` (``k_i`` its element of C_n).
    For each class the mean resultant length ``|mean_i exp(1j r_i)|`` is 1 when all its
    canonical images share one orientation and about ``1 / sqrt(count)`` when the
    orientations are uniform; the result is its average over classes weighted by their
    counts.

    Parameters
    ----------
    angles
        Rotation of each input image in radians ``[N]`` (e.g. ``RotatedMNIST.angles``), or
        ``None`` when unknown.
    elements
        Group elements ``[N]`` (integers ``k``, the rotation by ``2 pi k / n``).
    labels
        Class of each image ``[N]``.
    n
        Order of the cyclic group (1 for a model without canonicalizer).

    Returns
    -------
    tuple of float or None
        ``(concentration, chance)``: ``chance`` is the same average of
        ``sqrt(pi / (4 m))``, the expected resultant length of ``m`` uniform angles
        (large-``m`` limit), i.e. the value of a canonicalizer that aligns nothing.
        ``None`` when ``angles`` is ``None``.
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


def exact_pose_mask(element: Tensor, n: int) -> Tensor:
    """Which elements ``k [N]`` of C_n rotate images exactly (a multiple of 90 degrees).

    [`rotate_images`][canonwrap.groups.rotate_images] permutes pixels for multiples of 90 degrees
    and interpolates bilinearly otherwise (which also smooths the image). The rotation by
    ``2 pi k / n`` is a multiple of 90 degrees when ``4 k`` is a multiple of ``n``. Returns a
    boolean ``[N]``.
    """
    return (4 * element) % n == 0


def split_by_exactness(values: Tensor, element: Tensor, n: int) -> dict[str, float]:
    """Mean and standard error of ``values [N]`` on exact and on interpolated poses.

    Use it on paired loss differences (a canonicalized model minus a plain one, image by
    image) to tell a gain from alignment apart from a gain on images smoothed by an
    interpolated canonical pose (see [`exact_pose_mask`][canonwrap.metrics.images.exact_pose_mask]).

    Returns
    -------
    dict
        ``interpolated_fraction``, ``exact``, ``exact_sem``, ``interpolated`` and
        ``interpolated_sem`` (``nan`` for an empty group).
    """
    exact = exact_pose_mask(element, n)
    out = {"interpolated_fraction": float((~exact).double().mean())}
    for key, sel in (("exact", exact), ("interpolated", ~exact)):
        out[key] = float(values[sel].double().mean()) if sel.any() else float("nan")
        out[f"{key}_sem"] = standard_error(values[sel])
    return out
