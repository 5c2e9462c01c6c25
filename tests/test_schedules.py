import numpy as np
import pytest
import torch

from canonwrap.schedules import CosineSchedule, NoiseSchedule, PolynomialSchedule


def _edm_polynomial(T, power, s, clip=0.001):
    """EDM's polynomial schedule written out directly from its definition."""
    out = []
    prev = 1.0
    acc = 1.0
    for t in range(T + 1):
        a2 = (1.0 - (t / T) ** power) ** 2
        ratio = min(max(a2 / prev, clip), 1.0)
        acc *= ratio
        prev = a2
        out.append((1 - 2 * s) * acc + s)
    return np.array(out)


@pytest.mark.parametrize("T,power,s", [(1000, 2, 1e-5), (500, 3, 1e-4), (10, 2, 1e-5)])
def test_polynomial_matches_closed_form_at_every_step(T, power, s):
    sched = PolynomialSchedule(T, power, s)
    expected = _edm_polynomial(T, power, s)
    assert sched.timesteps == T
    np.testing.assert_allclose(sched.alphas2.numpy(), expected, rtol=1e-12, atol=0)
    gamma = np.log(1 - expected) - np.log(expected)
    np.testing.assert_allclose(sched.gammas.numpy(), gamma, rtol=1e-10, atol=1e-12)


def test_clipping_is_active_at_the_end():
    sched = PolynomialSchedule(1000, 2, 1e-5)
    a2 = sched.alphas2.numpy()
    ratios = a2[1:] / a2[:-1]
    raw = (1 - (np.arange(1001) / 1000) ** 2) ** 2
    assert raw[-1] == 0.0  # without clipping the last step would be pure noise
    assert a2[-1] > 1e-5 and (ratios > 0).all()


def test_continuous_lookup_rounds_to_nearest_step():
    sched = PolynomialSchedule(1000)
    t = torch.tensor([0.0, 0.0004, 0.0006, 0.5, 1.0], dtype=torch.float64)
    idx = torch.tensor([0, 0, 1, 500, 1000])
    assert torch.equal(sched.gamma(t), sched.gammas[idx])
    g = sched.gamma(t)
    assert torch.allclose(sched.alpha(g) ** 2 + sched.sigma(g) ** 2, torch.ones_like(g))
    assert torch.allclose(sched.alpha(g) ** 2, sched.alphas2[idx])
    assert sched.gamma(t.float()).dtype == torch.float32


def test_cosine_schedule_is_monotone_and_bounded():
    sched = CosineSchedule(1000)
    a2 = sched.alphas2.numpy()
    assert (np.diff(a2) < 0).all() and a2[0] > 0.99 and a2[-1] < 1e-3
    assert np.isfinite(sched.gammas.numpy()).all()


def test_invalid_arguments():
    with pytest.raises(ValueError):
        PolynomialSchedule(0)
    with pytest.raises(ValueError):
        PolynomialSchedule(10, precision=0.7)
    with pytest.raises(ValueError):
        NoiseSchedule(np.array([1.0, 0.5]))
