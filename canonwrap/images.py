"""Image diffusion in one call: a UNet, alone or behind a learned C_n canonicalizer.

[`image_diffusion`][canonwrap.images.image_diffusion] assembles the pieces of the rotated-MNIST
example (``examples/rotmnist.py``): a [`UNet`][canonwrap.nn.UNet] denoiser, optionally behind a
[`DiscreteRotationCanonicalizer`][canonwrap.canonicalizers.DiscreteRotationCanonicalizer] (wrapped
in [`UnitRange`][canonwrap.canonicalizers.UnitRange] so that corners brought in by rotations are
background), a noise schedule and a [`TensorSpace`][canonwrap.spaces.TensorSpace]. The canonicalizer
needs the ``images`` extra (escnn). Evaluation helpers are in
[`canonwrap.metrics.images`][canonwrap.metrics.images].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from canonwrap.canonicalizers import DiscreteRotationCanonicalizer, RandomPose, UnitRange, frozen
from canonwrap.diffusion import CanonicalizedDiffusion
from canonwrap.nn.unet import UNet
from canonwrap.schedules import CosineSchedule, NoiseSchedule
from canonwrap.spaces import TensorSpace

__all__ = ["image_diffusion"]


def image_diffusion(
    n: int | None = None,
    *,
    in_channels: int = 1,
    base_width: int = 64,
    channel_mults: Sequence[int] = (1, 2, 2),
    num_res_blocks: int = 2,
    attention: bool = True,
    canon_hidden: int = 16,
    canon_layers: int = 5,
    canon_kernel: int = 5,
    canon_downsample: int = 2,
    prior_weight: float = 0.0,
    freeze_canonicalizer: bool = False,
    random_pose: bool = False,
    value_range: tuple[float, float] | None = (-1.0, 1.0),
    schedule: NoiseSchedule | None = None,
    seed: int | None = None,
) -> CanonicalizedDiffusion:
    """A diffusion model of images: a UNet, behind a C_n canonicalizer when ``n`` is given.

    The defaults are the published sizes of the rotated-MNIST comparison (UNet base width
    64; canonicalizer of 16 regular fields, 5 layers, kernel 5).

    Parameters
    ----------
    n
        Order of the cyclic group of rotations; ``None`` builds the UNet alone (identity
        canonicalizer).
    in_channels
        Image channels.
    base_width
        The [`UNet`][canonwrap.nn.UNet]'s sizes.
    channel_mults
        The [`UNet`][canonwrap.nn.UNet]'s sizes.
    num_res_blocks
        The [`UNet`][canonwrap.nn.UNet]'s sizes.
    attention
        The [`UNet`][canonwrap.nn.UNet]'s sizes.
    canon_hidden
        The canonicalizer's ``hidden``, ``layers``, ``kernel_size``, ``downsample`` and
        ``prior_weight`` (see
        [`DiscreteRotationCanonicalizer`][canonwrap.canonicalizers.DiscreteRotationCanonicalizer]).
    canon_layers
        The canonicalizer's ``hidden``, ``layers``, ``kernel_size``, ``downsample`` and
        ``prior_weight`` (see
        [`DiscreteRotationCanonicalizer`][canonwrap.canonicalizers.DiscreteRotationCanonicalizer]).
    canon_kernel
        The canonicalizer's ``hidden``, ``layers``, ``kernel_size``, ``downsample`` and
        ``prior_weight`` (see
        [`DiscreteRotationCanonicalizer`][canonwrap.canonicalizers.DiscreteRotationCanonicalizer]).
    canon_downsample
        The canonicalizer's ``hidden``, ``layers``, ``kernel_size``, ``downsample`` and
        ``prior_weight`` (see
        [`DiscreteRotationCanonicalizer`][canonwrap.canonicalizers.DiscreteRotationCanonicalizer]).
    prior_weight
        The canonicalizer's ``hidden``, ``layers``, ``kernel_size``, ``downsample`` and
        ``prior_weight`` (see
        [`DiscreteRotationCanonicalizer`][canonwrap.canonicalizers.DiscreteRotationCanonicalizer]).
    freeze_canonicalizer
        Keep the canonicalizer at its initial weights ([`frozen`][canonwrap.canonicalizers.frozen]).
    random_pose
        Replace the learned canonicalizer by the control
        [`RandomPose`][canonwrap.canonicalizers.RandomPose]: every image is rotated by a
        pseudo-random element of C_n, fixed per image (the same interpolation as a C_n
        canonicalizer, without alignment). Needs ``n``; ``salt`` is ``seed`` (0 without one).
    value_range
        Range ``(low, high)`` of the images; the canonicalizer is wrapped in
        [`UnitRange`][canonwrap.canonicalizers.UnitRange] with it. ``None`` for images already
        in ``[0, 1]`` (no wrapper).
    schedule
        Noise schedule; default ``CosineSchedule(1000)``, the usual choice for images.
    seed
        When given, the UNet is built right after ``torch.manual_seed(seed)`` and the
        canonicalizer after ``torch.manual_seed(seed + 1)``, so that models with and
        without canonicalizer start from the same UNet weights, and models with the same
        ``n`` (learned or frozen) from the same canonicalizer.

    Returns
    -------
    CanonicalizedDiffusion
        ``model.training_loss(images)`` trains it on ``[B, C, H, W]`` batches and
        ``model.sample(k, shape=(C, H, W))`` samples canonical images.
    """
    if seed is not None:
        torch.manual_seed(seed)
    unet = UNet(
        in_channels=in_channels,
        base_width=base_width,
        channel_mults=tuple(channel_mults),
        num_res_blocks=num_res_blocks,
        attention=bool(attention),
    )
    canon = None
    if random_pose:
        if n is None:
            raise ValueError("random_pose=True needs the group order n")
        if freeze_canonicalizer:
            raise ValueError("random_pose has no parameters to freeze")
        canon = RandomPose(n, salt=seed if seed is not None else 0)
        if value_range is not None:
            canon = UnitRange(canon, *value_range)
    elif n is not None:
        if seed is not None:
            torch.manual_seed(seed + 1)
        canon = DiscreteRotationCanonicalizer(
            n=n,
            in_channels=in_channels,
            hidden=canon_hidden,
            layers=canon_layers,
            kernel_size=canon_kernel,
            downsample=canon_downsample,
            prior_weight=prior_weight,
        )
        if value_range is not None:
            canon = UnitRange(canon, *value_range)
        if freeze_canonicalizer:
            canon = frozen(canon)
    schedule = schedule if schedule is not None else CosineSchedule(1000)
    return CanonicalizedDiffusion(unet, canon, schedule=schedule, space=TensorSpace())
