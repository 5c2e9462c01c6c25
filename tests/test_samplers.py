"""Samplers against closed forms: Gaussian data with the exact optimal denoiser.

For ``x ~ N(0, diag(v))`` the optimal noise prediction is
``eps_hat = sigma_t (alpha_t^2 v + sigma_t^2)^-1 z_t`` and the probability-flow ODE is linear,
so a deterministic sampler maps ``z_T`` to ``gain * z_T`` per dimension and an exact solver
returns samples of variance ``v``. The discretisation error of each sampler is then its
error in ``gain^2``, independent of the noise drawn.
"""

import math

import pytest
import torch

from canonwrap import CanonicalizedDiffusion, DPMSolverSampler
from canonwrap.nn import GNNDenoiser
from canonwrap.samplers import AncestralSampler, DDIMSampler, Sampler
from canonwrap.schedules import PolynomialSchedule
from canonwrap.spaces import PointCloudSpace, TensorSpace
from tests.helpers import VAR, OptimalGaussianDenoiser


@pytest.fixture(scope="module")
def gaussian_model():
    sched = PolynomialSchedule(1000)
    return CanonicalizedDiffusion(OptimalGaussianDenoiser(sched), schedule=sched)


def _variance(model, sampler, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = model.sample(n, shape=(3,), sampler=sampler, generator=gen, dtype=torch.float64)
    return x.var(0)


def _rel_err(var, ref=VAR):
    return (var / ref - 1).abs().max().item()


def test_ddim_50_and_dpm_solver_20_reproduce_gaussian_variance(gaussian_model):
    # 1e5 samples: Monte Carlo error of each variance about 0.45 %. On EDM's polynomial
    # schedule DDIM's own bias at 50 even steps is about 5.5 %, DPM-Solver's at 20 below 4 %.
    ddim = _variance(gaussian_model, DDIMSampler(50), 100_000)
    dpm = _variance(gaussian_model, DPMSolverSampler(20), 100_000)
    assert _rel_err(ddim) < 0.07, ddim
    assert _rel_err(dpm) < 0.05, dpm


def test_dpm_solver_beats_ddim_at_ten_steps(gaussian_model):
    ddim = _rel_err(_variance(gaussian_model, DDIMSampler(10), 20_000))
    dpm = _rel_err(_variance(gaussian_model, DPMSolverSampler(10), 20_000))
    # observed: DDIM about 25 %, DPM-Solver++(2M) about 11 %
    assert dpm < 0.6 * ddim, (dpm, ddim)


def test_dpm_solver_converges_at_second_order(gaussian_model):
    """Observed order ``log2(err(n) / err(2n))`` against a converged reference.

    Every sampler here is a linear map of the same ``z_T``, so ratios of sample variances
    are ratios of squared gains: exact, whatever noise was drawn.
    """
    ref = _variance(gaussian_model, DPMSolverSampler(None), 64)

    def order(cls):
        e10, e20, e40 = (_rel_err(_variance(gaussian_model, cls(k), 64), ref) for k in (10, 20, 40))
        assert e10 > e20 > e40
        return math.log2(e20 / e40)

    assert order(DPMSolverSampler) > 1.4  # observed 1.65, tending to 2
    assert order(DDIMSampler) < 1.1  # observed 0.95: first order


def test_ancestral_full_T_reproduces_gaussian_variance(gaussian_model):
    # 4000 samples: Monte Carlo error about 2.2 % per dimension
    var = _variance(gaussian_model, AncestralSampler(), 4000)
    assert _rel_err(var) < 0.08, var


def test_dpm_order_one_is_ddim(gaussian_model):
    a = _variance(gaussian_model, DPMSolverSampler(15, order=1), 256)
    b = _variance(gaussian_model, DDIMSampler(15), 256)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=0)
    # a single step without history is the first-order (DDIM) update
    z, eps = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    g_t, g_s = torch.tensor(2.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    torch.testing.assert_close(
        DPMSolverSampler().step(z, eps, g_t, g_s, None), DDIMSampler().step(z, eps, g_t, g_s, None)
    )


def _molecule_model(timesteps=100):
    torch.manual_seed(0)
    return CanonicalizedDiffusion(
        GNNDenoiser(num_features=2, hidden=16, layers=2),
        schedule=PolynomialSchedule(timesteps),
        space=PointCloudSpace(num_features=2),
    )


def test_dpm_solver_is_seeded_and_keeps_no_state_between_calls():
    model = _molecule_model()
    sampler = DPMSolverSampler(8)

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return model.sample(num_nodes=[3, 5], sampler=sampler, generator=gen)

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a.pos, b.pos) and torch.equal(a.x, b.x)
    assert not torch.equal(a.pos, c.pos)
    assert torch.isfinite(a.pos).all() and torch.isfinite(a.x).all()
    com = torch.zeros(2, 3).index_add_(0, a.batch, a.pos)
    assert com.abs().max() < 1e-5 * a.pos.abs().max().clamp_min(1.0)
    assert vars(sampler) == vars(DPMSolverSampler(8))  # nothing stored on the sampler


def test_loop_passes_fresh_histories_per_call_and_component():
    seen = []

    class Recording(DDIMSampler):
        def begin(self, steps):
            history = {"steps": list(steps), "calls": 0}
            seen.append(history)
            return history

        def step_with_history(self, z_t, eps_hat, gamma_t, gamma_s, noise, history):
            history["calls"] += 1
            return super().step_with_history(z_t, eps_hat, gamma_t, gamma_s, noise, history)

    model = _molecule_model()
    for _ in range(2):
        model.sample(num_nodes=[3, 4], sampler=Recording(5))
    assert len(seen) == 4  # two calls x two state components (pos, x)
    assert len({id(h) for h in seen}) == 4
    steps = Recording(5).steps(100)
    assert all(h["steps"] == steps and h["calls"] == len(steps) - 1 for h in seen)


def _reference_sample(model, template, space, sampler, generator, dtype=torch.float32):
    """The sampling loop as it was before samplers had a history (``sampler.step`` only)."""
    b = space.num_samples(template)
    z = space.noise(space.state(template), template, generator)
    steps = sampler.steps(model.timesteps)
    for t_int, s_int in zip(steps[:-1], steps[1:]):
        t_vec = torch.full((b,), t_int, dtype=torch.long)
        s_vec = torch.full((b,), s_int, dtype=torch.long)
        eps_hat = model._predict(space, z, template, t_vec)
        g_t = space.expand(model._gamma(t_vec, dtype), z, template)
        g_s = space.expand(model._gamma(s_vec, dtype), z, template)
        noise = space.noise(z, template, generator) if sampler.stochastic else z
        z = tuple(
            sampler.step(zi, ei, gt, gs, ni if sampler.stochastic else None)
            for zi, ei, gt, gs, ni in zip(z, eps_hat, g_t, g_s, noise)
        )
        z = space.project(z, template)
    steps_0 = torch.zeros(b, dtype=torch.long)
    g_0 = model._gamma(steps_0, dtype)
    eps_hat = model._predict(space, z, template, steps_0)
    a0 = space.expand(model.schedule.alpha(g_0), z, template)
    s0 = space.expand(model.schedule.sigma(g_0), z, template)
    x = tuple((zi - si * ei) / ai for zi, ei, ai, si in zip(z, eps_hat, a0, s0))
    if sampler.final_noise:
        noise = space.noise(z, template, generator)
        x = tuple(xi + (si / ai) * ni for xi, ni, ai, si in zip(x, noise, a0, s0))
    return space.project(x, template)


@pytest.mark.parametrize("sampler", [AncestralSampler(), AncestralSampler(7), DDIMSampler(9)])
def test_one_step_samplers_are_bit_identical_to_the_old_loop(sampler):
    model = _molecule_model(timesteps=40)
    space = model.space
    template = space.template([3, 5, 4])
    want = _reference_sample(model, template, space, sampler, torch.Generator().manual_seed(3))
    got = model.sample(num_nodes=[3, 5, 4], sampler=sampler,
                       generator=torch.Generator().manual_seed(3))
    assert torch.equal(got.pos, want[0]) and torch.equal(got.x, want[1])

    tensor_model = CanonicalizedDiffusion(
        OptimalGaussianDenoiser(PolynomialSchedule(40)), schedule=PolynomialSchedule(40)
    )
    template = torch.zeros(6, 3, dtype=torch.float64)
    want = _reference_sample(tensor_model, template, TensorSpace(), sampler,
                             torch.Generator().manual_seed(4), torch.float64)
    got = tensor_model.sample(6, shape=(3,), sampler=sampler, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(4))
    assert torch.equal(got, want[0])


@pytest.mark.parametrize("cls", [AncestralSampler, DDIMSampler, DPMSolverSampler])
def test_num_steps_validation(cls):
    for bad in (0, -3):
        with pytest.raises(ValueError, match="num_steps must be >= 1"):
            cls(bad)
    for bad in (2.5, "10", True):
        with pytest.raises(TypeError, match="num_steps must be an int"):
            cls(bad)
    assert cls(None).steps(10) == list(range(10, -1, -1))
    assert cls(1).steps(10) == [10, 0]
    assert cls(4).steps(1000) == [1000, 750, 500, 250, 0]
    assert cls(5000).steps(10) == list(range(10, -1, -1))  # capped at T


def test_dpm_solver_arguments():
    for bad in (0, 3, True):
        with pytest.raises(ValueError, match="order must be 1 or 2"):
            DPMSolverSampler(10, order=bad)
    s = DPMSolverSampler()
    assert (s.num_steps, s.order, s.lower_order_final) == (20, 2, True)
    assert not s.stochastic and not s.final_noise
    assert repr(s) == "DPMSolverSampler(num_steps=20, order=2, lower_order_final=True)"
    assert isinstance(s, Sampler)


class _PointMass(torch.nn.Module):
    """Exact noise prediction for data at the point ``x_star``: ``(z - alpha_t x*) / sigma_t``."""

    def __init__(self, schedule, x_star):
        super().__init__()
        self.schedule = schedule
        self.register_buffer("x_star", x_star)

    def forward(self, z, t):
        g = self.schedule.gamma(t)
        a, s = torch.sigmoid(-g).sqrt()[:, None], torch.sigmoid(g).sqrt()[:, None]
        return (z - a * self.x_star) / s


def _point_mass_samples(x_star, sampler, clip, n=64):
    sched = PolynomialSchedule(1000)
    model = CanonicalizedDiffusion(_PointMass(sched, x_star), schedule=sched, space=TensorSpace())
    gen = torch.Generator().manual_seed(3)
    return model.sample(
        n, shape=(x_star.numel(),), sampler=sampler, generator=gen, dtype=torch.float64,
        clip_denoised=clip,
    )  # fmt: skip


@pytest.mark.parametrize("sampler", [DDIMSampler(50), AncestralSampler(), DPMSolverSampler(20)])
def test_clip_denoised_changes_nothing_when_predictions_are_in_range(sampler):
    x_star = torch.tensor([-0.9, -0.3, 0.0, 0.4, 0.85], dtype=torch.float64)
    clipped = _point_mass_samples(x_star, sampler, (-1.0, 1.0))
    plain = _point_mass_samples(x_star, sampler, None)
    torch.testing.assert_close(clipped, plain, rtol=0, atol=1e-10)
    if not sampler.stochastic:  # deterministic samplers land on the point exactly
        torch.testing.assert_close(clipped, x_star.expand_as(clipped), rtol=0, atol=1e-9)


def test_clip_denoised_bounds_the_clean_prediction_at_every_step():
    # negative control: data outside the range is reproduced without clipping ...
    x_star = torch.tensor([1.5, -0.2, -3.0], dtype=torch.float64)
    plain = _point_mass_samples(x_star, DDIMSampler(50), None)
    torch.testing.assert_close(plain, x_star.expand_as(plain), rtol=0, atol=1e-9)
    # ... and with clipping every prediction, hence the sample, is the range's nearest point
    clipped = _point_mass_samples(x_star, DDIMSampler(50), (-1.0, 1.0))
    expect = torch.tensor([1.0, -0.2, -1.0], dtype=torch.float64).expand_as(clipped)
    torch.testing.assert_close(clipped, expect, rtol=0, atol=1e-9)
    # a denoiser predicting no noise at all: x_hat = z / alpha_t explodes near t = T
    sched = PolynomialSchedule(1000)

    class NoNoise(torch.nn.Module):
        def forward(self, z, t):
            return torch.zeros_like(z)

    model = CanonicalizedDiffusion(NoNoise(), schedule=sched, space=TensorSpace())
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    wild = model.sample(32, shape=(4,), sampler=DDIMSampler(50), generator=gen())
    tame = model.sample(
        32, shape=(4,), sampler=DDIMSampler(50), generator=gen(), clip_denoised=(-1, 1)
    )
    assert wild.abs().max() > 10
    assert tame.abs().max() <= 1


def test_clip_denoised_arguments():
    sched = PolynomialSchedule(100)
    model = CanonicalizedDiffusion(_PointMass(sched, torch.zeros(2)), schedule=sched)
    for bad in [(1.0, -1.0), (0.0, float("nan")), (0.0,), "ab", 3.0]:
        with pytest.raises(ValueError, match="clip_denoised"):
            model.sample(2, shape=(2,), sampler=DDIMSampler(2), clip_denoised=bad)
    with pytest.raises(ValueError, match="not bounded"):
        _molecule_model().sample(num_nodes=[3], sampler=DDIMSampler(2), clip_denoised=(-1, 1))
