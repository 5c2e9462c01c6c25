"""``RandomPose``: a control that poses every image by a pseudo-random group element."""

from __future__ import annotations

import torch
from torch import Tensor

from canonwrap.canonicalizers.base import Canonicalizer, CanonOutput
from canonwrap.groups.images import CyclicRotations

__all__ = ["RandomPose"]

#: a prime modulus of the content hash (2^31 - 1)
_PRIME = 2_147_483_647


class RandomPose(Canonicalizer):
    """A control, **not** a canonicalizer: image ``x`` is posed by a pseudo-random element of C_n.

    It returns ``apply_inverse(x, k(x))`` with ``k(x)`` drawn uniformly from ``{0, ..., n-1}``
    by hashing the content of ``x``: the image is quantised to ``levels`` grey levels in
    ``[0, 1]`` and ``k(x) = (sum_i q_i w_i mod p) mod n`` with fixed random integer weights
    ``w`` (seeded by ``salt``) and the prime ``p = 2^31 - 1``. The same image therefore gets
    the same element every time (in any batch, at any step, after any resume), different
    images get independent-looking elements, and no random number generator is touched, so
    a training run with this control draws exactly the same ``t``, noise and data order as
    one without it.

    The element is *not* equivariant (``k(g . x)`` is unrelated to ``g + k(x)``), so the
    "canonical" images are not invariant: they are the inputs rotated once more by a random
    element of C_n. This is the smoothing control of a learned C_n canonicalizer: the same
    group, the same interpolation (rotations that are not multiples of 90 degrees interpolate
    bilinearly and smooth the image once more), and no alignment at all.

    Parameters
    ----------
    n
        Order of the cyclic group of rotations.
    salt
        Seed of the hash weights; a different salt gives a different random pose per image.
    levels
        Grey levels of the quantisation that the hash reads (inputs in ``[0, 1]``; values
        outside are clamped for the hash only).

    Examples
    --------
    >>> import torch
    >>> control = RandomPose(8)
    >>> out = control(torch.rand(4, 1, 28, 28))
    >>> out.canonical.shape, out.element.shape
    (torch.Size([4, 1, 28, 28]), torch.Size([4]))
    """

    def __init__(self, n: int, *, salt: int = 0, levels: int = 256) -> None:
        super().__init__()
        if int(n) < 1:
            raise ValueError(f"n must be a positive integer, got {n}")
        if int(levels) < 2:
            raise ValueError(f"levels must be at least 2, got {levels}")
        self.n = int(n)
        self.group = CyclicRotations(self.n)
        self.salt = int(salt)
        self.levels = int(levels)

    def _weights(self, size: int) -> Tensor:
        gen = torch.Generator().manual_seed(self.salt)
        return torch.randint(1, _PRIME, (size,), generator=gen, dtype=torch.long)

    def element_of(self, images: Tensor) -> Tensor:
        """The pose ``k(x)`` of each image ``[B, C, H, W]``: long ``[B]`` in ``[0, n)``."""
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(
                f"expected images [B, C, H, W]; got {tuple(getattr(images, 'shape', ()))}"
            )
        if not torch.isfinite(images).all():
            raise ValueError("RandomPose got non-finite pixel values")
        flat = images.detach().reshape(images.shape[0], -1).double().clamp(0.0, 1.0)
        q = torch.round(flat * (self.levels - 1)).long().cpu()
        w = self._weights(q.shape[1])
        # q < 2^16 and w < 2^31: each product < 2^47, reduced before summing so the sum fits
        h = torch.remainder(q * w, _PRIME).sum(dim=1)
        return torch.remainder(torch.remainder(h, _PRIME), self.n).to(images.device)

    def forward(self, images: Tensor) -> CanonOutput:
        """Images ``[B, C, H, H]`` rotated by ``-2 pi k(x) / n``, with ``element = k(x)``."""
        element = self.element_of(images)
        return CanonOutput(canonical=self.apply_inverse(images, element), element=element)

    def extra_repr(self) -> str:
        return f"n={self.n}, salt={self.salt}, levels={self.levels}"
