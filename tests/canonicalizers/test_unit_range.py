"""UnitRange: the shared contract on C4 for images in [-1, 1], background corners after an
interpolated rotation, and the inner canonicalizer's element and prior passed through."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("escnn")

from canonwrap.canonicalizers import DiscreteRotationCanonicalizer, UnitRange, frozen  # noqa: E402

from .common import CanonicalizerContract  # noqa: E402

SMALL = dict(hidden=2, layers=3, kernel_size=5, downsample=1)


class TestUnitRangeC4(CanonicalizerContract):
    """C4 on a 12x12 grid in [-1, 1]: every element is an exact pixel permutation."""

    def make_canonicalizer(self, dtype):
        return UnitRange(DiscreteRotationCanonicalizer(n=4, prior_weight=0.1, **SMALL)).to(dtype)

    def make_data(self, dtype, generator):
        images = torch.rand(4, 1, 12, 12, generator=generator, dtype=torch.float64)
        return (images * 2 - 1).to(dtype)


def test_same_element_and_prior_as_inner_and_background_corners():
    torch.manual_seed(0)
    inner = DiscreteRotationCanonicalizer(n=8, prior_weight=0.1, **SMALL).double()
    wrapped = UnitRange(inner)
    images = torch.rand(6, 1, 13, 13, dtype=torch.float64) * 2 - 1
    out, ref = wrapped(images), inner((images + 1) / 2)
    assert torch.equal(out.element, ref.element)
    assert torch.allclose(out.prior_loss, ref.prior_loss)
    assert torch.allclose(out.canonical, ref.canonical * 2 - 1)
    assert wrapped.group is inner.group
    # an all-background image stays background under every element, interpolated or not
    blank = -torch.ones(8, 1, 13, 13, dtype=torch.float64)
    turned = wrapped.apply_inverse(blank, torch.arange(8))
    assert torch.allclose(turned, blank)
    # the plain canonicalizer pads the corners of a 45-degree rotation with 0 (mid-grey)
    assert inner.apply_inverse(blank, torch.tensor([1] * 8)).max() > -0.5
    # frozen() keeps the range mapping
    assert torch.allclose(frozen(wrapped).apply_inverse(blank, torch.arange(8)), blank)


def test_custom_range_and_rejects_empty_range():
    torch.manual_seed(0)
    inner = DiscreteRotationCanonicalizer(n=4, **SMALL).double()
    images = torch.rand(3, 1, 12, 12, dtype=torch.float64) * 255
    out = UnitRange(inner, low=0.0, high=255.0)(images)
    assert torch.allclose(out.canonical, inner(images / 255).canonical * 255)
    with pytest.raises(ValueError, match="high > low"):
        UnitRange(inner, low=1.0, high=1.0)
    assert math.isfinite(float(out.canonical.detach().sum()))
