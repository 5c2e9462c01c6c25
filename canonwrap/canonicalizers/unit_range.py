"""``UnitRange``: run an image canonicalizer on ``[0, 1]`` images for data in another range."""

from __future__ import annotations

from torch import Tensor

from canonwrap.canonicalizers.base import Canonicalizer, CanonOutput

__all__ = ["UnitRange"]


class UnitRange(Canonicalizer):
    """Canonicalize images in ``[low, high]`` (default ``[-1, 1]``) by rotating them in ``[0, 1]``.

    Rotations by angles other than multiples of 90 degrees bring in corners that
    [`rotate_images`][canonwrap.groups.rotate_images] fills with zeros. For images in ``[-1, 1]``
    (the usual range for image diffusion) a zero is mid-grey, not background, so the canonical
    images would get grey corners that the data never has. This wrapper hands
    ``(x - low) / (high - low)`` to the inner canonicalizer (whose scoring network then sees the
    usual ``[0, 1]`` images) and maps the canonical images back with ``low + (high - low) c``:
    padded corners take the value ``low`` (background). The group element, the prior loss and the
    gradients are those of the inner canonicalizer.

    Parameters
    ----------
    inner
        An image canonicalizer acting on ``[B, C, H, W]`` tensors in ``[0, 1]``, such as
        [`DiscreteRotationCanonicalizer`][canonwrap.canonicalizers.DiscreteRotationCanonicalizer].
    low
        Lower end of the data range: the background value.
    high
        Upper end of the data range.

    Examples
    --------
    >>> from canonwrap.canonicalizers import DiscreteRotationCanonicalizer, UnitRange
    >>> canon = UnitRange(DiscreteRotationCanonicalizer(n=8))  # doctest: +SKIP
    """

    def __init__(self, inner: Canonicalizer, low: float = -1.0, high: float = 1.0) -> None:
        super().__init__()
        if not high > low:
            raise ValueError(f"UnitRange needs high > low, got low={low}, high={high}")
        self.inner = inner
        self.group = inner.group
        self.low, self.high = float(low), float(high)

    def _to_unit(self, images: Tensor) -> Tensor:
        return (images - self.low) / (self.high - self.low)

    def _from_unit(self, images: Tensor) -> Tensor:
        return images * (self.high - self.low) + self.low

    def forward(self, images: Tensor) -> CanonOutput:
        """Canonical images ``[B, C, H, W]`` in ``[low, high]`` with the inner element and prior."""
        out = self.inner(self._to_unit(images))
        return CanonOutput(self._from_unit(out.canonical), out.element, out.prior_loss)

    def apply_inverse(self, data: Tensor, element: Tensor) -> Tensor:
        """``h^-1 . x`` for given elements, padded with background (used by ``frozen``)."""
        return self._from_unit(self.inner.apply_inverse(self._to_unit(data), element))
