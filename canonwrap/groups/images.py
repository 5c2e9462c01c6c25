"""The cyclic group C_n of planar rotations acting on images ``[B, C, H, W]``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from canonwrap.groups.base import Group


def rotate_images(images: Tensor, angles: Tensor) -> Tensor:
    """Rotate each image ``[B, C, H, W]`` counter-clockwise (as displayed) by ``angles [B]``.

    Rotations by multiples of 90 degrees are exact index permutations (``torch.rot90``);
    other angles use bilinear interpolation about the image centre with zero padding, so
    they are exact only up to interpolation error, and need floating-point images
    (``TypeError`` otherwise). Differentiable in ``images``.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W]; got shape {tuple(images.shape)}")
    if angles.shape != (images.shape[0],):
        raise ValueError(f"angles must be [B={images.shape[0]}]; got {tuple(angles.shape)}")
    quarter = angles.detach().double() / (math.pi / 2)
    k = torch.round(quarter)
    exact = (quarter - k).abs() < 1e-9
    out = torch.empty_like(images)
    if exact.any():
        kk = torch.remainder(k, 4).long()
        for q in range(4):
            sel = exact & (kk == q)
            if sel.any():
                out[sel] = torch.rot90(images[sel], q, dims=(-2, -1))
    if (~exact).any():
        if not images.is_floating_point():
            raise TypeError(
                f"rotating by angles that are not multiples of 90 degrees interpolates, which "
                f"needs floating-point images; got {images.dtype} (convert, e.g. "
                "images.float() / 255)"
            )
        sel = ~exact
        a = angles[sel].to(images.dtype)
        cos, sin = torch.cos(a), torch.sin(a)
        # grid_sample maps output coordinates (x right, y down) to input coordinates.
        # A counter-clockwise rotation as displayed (y axis pointing down) reads the input at
        # R(-a) applied with y flipped, i.e. [[cos, -sin], [sin, cos]] in (x, y_down).
        theta = torch.zeros(a.shape[0], 2, 3, dtype=images.dtype, device=images.device)
        theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
        theta[:, 1, 0], theta[:, 1, 1] = sin, cos
        sub = images[sel]
        grid = F.affine_grid(theta, list(sub.shape), align_corners=True)
        out[sel] = F.grid_sample(
            sub, grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )
    return out


class CyclicRotations(Group):
    """C_n: rotations of square images by multiples of ``2 pi / n``.

    Elements are integers ``k`` in ``[0, n)`` stored as a long tensor ``[B]`` (rotation by
    ``2 pi k / n`` counter-clockwise). Exact on the pixel grid for multiples of 90 degrees;
    for other angles the action interpolates (see
    [`rotate_images`][canonwrap.groups.rotate_images]).
    """

    def __init__(self, n: int) -> None:
        if int(n) < 1:
            raise ValueError(f"n must be a positive integer, got {n}")
        self.n = int(n)
        self.name = f"C{self.n}"

    def angle(self, g: Tensor) -> Tensor:
        """Rotation angle in radians of each element, float64 ``[B]``."""
        return g.double() * (2 * math.pi / self.n)

    def identity(self, batch_size, *, dtype=torch.float32, device=None):
        return torch.zeros(batch_size, dtype=torch.long, device=device)

    def random(self, batch_size, *, generator=None, dtype=torch.float32, device=None):
        return torch.randint(0, self.n, (batch_size,), generator=generator).to(device)

    def compose(self, a, b):
        return torch.remainder(a + b, self.n)

    def inverse(self, g):
        return torch.remainder(-g, self.n)

    def act(self, g, data):
        if not isinstance(data, Tensor) or data.dim() != 4 or data.shape[-1] != data.shape[-2]:
            raise ValueError(
                f"{self.name} acts on square images [B, C, H, H]; got "
                f"{tuple(getattr(data, 'shape', ()))}"
            )
        return rotate_images(data, self.angle(g).to(data.device))

    def distance(self, a, b):
        d = torch.remainder(a - b, self.n)
        return torch.minimum(d, self.n - d).double()

    def __repr__(self) -> str:
        return f"CyclicRotations(n={self.n})"
