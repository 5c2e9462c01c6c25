"""RandomPose (the smoothing control): a fixed pseudo-random element per image, uniform over C_n,
independent of batching and of the global RNG, and not invariant (unlike a canonicalizer)."""

from __future__ import annotations

import pytest
import torch

from canonwrap.canonicalizers import DiscreteRotationCanonicalizer, RandomPose, UnitRange
from canonwrap.groups import rotate_images


def _digits(k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(k, 1, 12, 12, generator=gen, dtype=torch.float64)


def test_same_element_in_any_batch_and_no_global_rng():
    images = _digits(40)
    control = RandomPose(8)
    state = torch.get_rng_state()
    whole = control(images)
    assert torch.equal(torch.get_rng_state(), state)  # draws nothing from the global RNG
    parts = torch.cat([control(images[i : i + 7]).element for i in range(0, 40, 7)])
    assert torch.equal(whole.element, parts)
    assert torch.equal(whole.element, RandomPose(8)(images).element)  # stateless
    assert torch.equal(whole.element, control(images.float()).element)  # dtype-independent
    # the canonical image is the input rotated by the inverse of the element
    angles = -whole.element.double() * (2 * torch.pi / 8)
    assert torch.allclose(whole.canonical, rotate_images(images, angles), atol=1e-12)


def test_elements_are_uniform_and_depend_on_the_salt():
    images = _digits(4000, seed=1)
    elements = RandomPose(8)(images).element
    counts = torch.bincount(elements, minlength=8).double()
    chi2 = float(((counts - 500) ** 2 / 500).sum())
    assert chi2 < 24.3  # 7 degrees of freedom, p = 0.001
    other = RandomPose(8, salt=1)(images).element
    agree = float((other == elements).double().mean())
    assert abs(agree - 1 / 8) < 0.03  # a new salt redraws the poses independently
    # negative control of the uniformity check: a constant element fails it
    constant = torch.bincount(torch.zeros(4000, dtype=torch.long), minlength=8).double()
    assert float(((constant - 500) ** 2 / 500).sum()) > 24.3


def test_not_invariant_unlike_a_canonicalizer():
    """Rotating an input by 90 degrees changes its pose under RandomPose (a random pose per
    image), while a C4 canonicalizer maps it to the same canonical image (float64)."""
    images = _digits(64, seed=2) * 0.999  # values off the quantisation grid's edges
    turned = torch.rot90(images, 1, dims=(-2, -1))
    control = RandomPose(4)
    a, b = control(images), control(turned)
    assert not torch.equal(b.element, torch.remainder(a.element + 1, 4))
    assert (
        float((a.canonical - b.canonical).abs().amax(dim=(1, 2, 3)).gt(1e-6).double().mean()) > 0.5
    )
    torch.manual_seed(0)
    canon = DiscreteRotationCanonicalizer(n=4, hidden=2, layers=3, downsample=1).double()
    assert torch.allclose(canon(images).canonical, canon(turned).canonical, atol=1e-10)


def test_background_corners_through_unit_range_and_bad_input():
    blank = -torch.ones(8, 1, 13, 13, dtype=torch.float64)
    out = UnitRange(RandomPose(8))(blank)
    assert torch.allclose(out.canonical, blank)
    with pytest.raises(ValueError, match="positive"):
        RandomPose(0)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        RandomPose(4)(torch.rand(12, 12))
    with pytest.raises(ValueError, match="non-finite"):
        RandomPose(4)(torch.full((1, 1, 4, 4), float("nan")))
