import pytest
import torch

from canonwrap.groups import SO3, CyclicRotations, Translations
from canonwrap.testing import assert_equivariant, assert_invariant, default_tolerance


def test_default_tolerances():
    assert default_tolerance(torch.float64) <= 1e-9
    assert default_tolerance(torch.float32) <= 1e-4


def test_invariant_function_passes_and_reports_error(gen):
    x = torch.randn(4, 6, 3, dtype=torch.float64, generator=gen)
    err = assert_invariant(lambda p: torch.cdist(p, p), SO3(), x, generator=gen)
    assert 0 <= err <= 1e-12


def test_non_invariant_function_fails_with_largest_error(gen):
    x = torch.randn(4, 6, 3, dtype=torch.float64, generator=gen)
    with pytest.raises(AssertionError, match=r"largest error \d\.\d+e[+-]\d+ > tolerance"):
        assert_invariant(lambda p: p[..., 0], SO3(), x, generator=gen)


def test_equivariant_function_passes(gen):
    x = torch.randn(4, 6, 3, dtype=torch.float64, generator=gen)
    assert_equivariant(lambda p: 2 * p, SO3(), x, generator=gen)
    assert_equivariant(lambda p: p - p.mean(1, keepdim=True) + p.mean(1, keepdim=True),
                       Translations(), x, generator=gen)


def test_non_equivariant_function_fails_negative_control(gen):
    x = torch.randn(4, 6, 3, dtype=torch.float64, generator=gen)
    w = torch.randn(3, 3, dtype=torch.float64, generator=gen)
    with pytest.raises(AssertionError, match="not equivariant"):
        assert_equivariant(lambda p: p @ w, SO3(), x, generator=gen)
    # a tiny symmetry breaking is still caught at the float64 tolerance
    with pytest.raises(AssertionError):
        assert_equivariant(lambda p: p + 1e-6 * p[..., :1], SO3(), x, generator=gen)


def test_float32_tolerance_accepts_rounding_but_not_errors(gen):
    x = torch.randn(4, 6, 3, dtype=torch.float32, generator=gen)
    assert_equivariant(lambda p: 3 * p, SO3(), x, generator=gen)
    with pytest.raises(AssertionError):
        assert_equivariant(lambda p: p + 1e-2 * p[..., :1], SO3(), x, generator=gen)


def test_images_quarter_turn_equivariance(gen):
    x = torch.randn(2, 1, 7, 7, dtype=torch.float64, generator=gen)
    assert_equivariant(lambda im: im * 2, CyclicRotations(4), x, generator=gen)
    with pytest.raises(AssertionError):
        assert_equivariant(lambda im: im.flip(-1), CyclicRotations(4), x, n_trials=8,
                           generator=gen)
