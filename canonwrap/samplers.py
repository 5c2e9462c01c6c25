"""Reverse-process samplers: one step from ``z_t`` to ``z_s`` (``s < t``) given ``eps_hat``.

Samplers are plain objects passed to
[`CanonicalizedDiffusion.sample`][canonwrap.diffusion.CanonicalizedDiffusion.sample]. Each chooses
the integer steps it visits ([`Sampler.steps`][canonwrap.samplers.Sampler.steps]) and how to move
between them. Formulas follow the variance-preserving parametrisation with
``gamma = log(sigma^2 / alpha^2)`` (Kingma et al. 2021; Hoogeboom et al. 2022, appendix); multistep
solvers work with the half log signal-to-noise ratio ``lambda = -gamma / 2 = log(alpha / sigma)``.

How the sampling loop drives a sampler (one call of ``sample``):

    steps = sampler.steps(T)                        # descending, T ... 0
    history = [sampler.begin(steps) for each state component]
    for t, s in zip(steps[:-1], steps[1:]):
        eps_hat = denoiser(z, t / T)
        z_i = sampler.step_with_history(z_i, eps_hat_i, gamma_t, gamma_s, noise_i, history_i)

``history_i`` is a dict created afresh for every ``sample`` call and owned by the loop, so
nothing carries over between calls. One-step samplers implement
[`Sampler.step`][canonwrap.samplers.Sampler.step] only and never see it; multistep solvers
([`DPMSolverSampler`][canonwrap.samplers.DPMSolverSampler]) keep their earlier predictions there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Sampler", "AncestralSampler", "DDIMSampler", "DPMSolverSampler", "History"]

History = dict[str, Any]
"""Per-call, per-state-component scratch space of a sampler (see
[`Sampler.begin`][canonwrap.samplers.Sampler.begin])."""


def _check_num_steps(num_steps: int | None) -> int | None:
    if num_steps is None:
        return None
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise TypeError(f"num_steps must be an int or None, got {type(num_steps).__name__}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return int(num_steps)


def _even_steps(timesteps: int, num_steps: int | None) -> list[int]:
    if num_steps is None or num_steps >= timesteps:
        return list(range(timesteps, -1, -1))
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    grid = np.round(np.linspace(timesteps, 0, num_steps + 1)).astype(int)
    return sorted(set(grid.tolist()), reverse=True)


class Sampler(ABC):
    """Interface: ``steps(T)`` gives descending integer steps from ``T`` to ``0``.

    Subclasses implement [`step`][canonwrap.samplers.Sampler.step]. Samplers that need more than the
    current model output (multistep solvers) also override
    [`begin`][canonwrap.samplers.Sampler.begin] and
    [`step_with_history`][canonwrap.samplers.Sampler.step_with_history].

    Parameters
    ----------
    num_steps
        Number of steps from ``T`` to ``0`` (evenly spaced integers); ``None`` visits all
        ``T``. Must be ``>= 1``.
    """

    final_noise: bool = False
    """Add the decoder noise ``sigma_0 / alpha_0`` to the final sample (EDM does)."""

    def __init__(self, num_steps: int | None = None) -> None:
        self.num_steps = _check_num_steps(num_steps)

    def steps(self, timesteps: int) -> list[int]:
        """Integer steps visited, descending from ``timesteps`` to ``0`` inclusive."""
        return _even_steps(timesteps, self.num_steps)

    @abstractmethod
    def step(
        self, z_t: Tensor, eps_hat: Tensor, gamma_t: Tensor, gamma_s: Tensor, noise: Tensor | None
    ) -> Tensor:
        """Move one component of the state from step ``t`` to ``s``.

        All arguments broadcast against each other (``gamma_*`` expanded per entry).
        ``noise`` is standard Gaussian noise in the data subspace (stochastic samplers).
        """

    def begin(self, steps: Sequence[int]) -> History:
        """Fresh history for one state component at the start of a sampling run.

        The sampling loop calls this once per state component in every ``sample`` call,
        with the steps it is about to visit, and passes the returned dict to each
        [`step_with_history`][canonwrap.samplers.Sampler.step_with_history] of that component. The
        default is an empty dict.
        """
        return {}

    def step_with_history(
        self,
        z_t: Tensor,
        eps_hat: Tensor,
        gamma_t: Tensor,
        gamma_s: Tensor,
        noise: Tensor | None,
        history: History,
    ) -> Tensor:
        """[`step`][canonwrap.samplers.Sampler.step] with access to this component's ``history``
        (read and updated).

        The sampling loop always calls this method; the default ignores ``history`` and
        returns ``self.step(z_t, eps_hat, gamma_t, gamma_s, noise)``.
        """
        return self.step(z_t, eps_hat, gamma_t, gamma_s, noise)

    stochastic: bool = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_steps={self.num_steps})"


class AncestralSampler(Sampler):
    """Ancestral sampling from ``p(z_s | z_t)`` (DDPM; EDM's ``sample_p_zs_given_zt``).

    With ``alpha_{t|s} = alpha_t / alpha_s`` and ``sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2
    sigma_s^2``:

        mu    = z_t / alpha_{t|s} - sigma_{t|s}^2 / (alpha_{t|s} sigma_t) * eps_hat
        sigma = sigma_{t|s} sigma_s / sigma_t
        z_s   = mu + sigma * noise

    ``num_steps=None`` visits all ``T`` steps; fewer steps skip evenly (the same formulas hold
    for any ``s < t``).
    """

    stochastic = True
    final_noise = True

    def step(self, z_t, eps_hat, gamma_t, gamma_s, noise):
        # sigma_{t|s}^2 = -expm1(softplus(gamma_s) - softplus(gamma_t)), computed stably
        sigma2_ts = -torch.expm1(F.softplus(gamma_s) - F.softplus(gamma_t))
        log_alpha2_ts = F.logsigmoid(-gamma_t) - F.logsigmoid(-gamma_s)
        alpha_ts = torch.exp(0.5 * log_alpha2_ts)
        sigma_t = torch.sqrt(torch.sigmoid(gamma_t))
        sigma_s = torch.sqrt(torch.sigmoid(gamma_s))
        mu = z_t / alpha_ts - (sigma2_ts / alpha_ts / sigma_t) * eps_hat
        std = torch.sqrt(sigma2_ts) * sigma_s / sigma_t
        return mu + std * noise


class DDIMSampler(Sampler):
    """Deterministic DDIM step (Song et al. 2021, eta = 0):

        x_hat = (z_t - sigma_t eps_hat) / alpha_t
        z_s   = alpha_s x_hat + sigma_s eps_hat
    """

    def __init__(self, num_steps: int | None = 50) -> None:
        super().__init__(num_steps)

    def step(self, z_t, eps_hat, gamma_t, gamma_s, noise):
        alpha_t, sigma_t = torch.sqrt(torch.sigmoid(-gamma_t)), torch.sqrt(torch.sigmoid(gamma_t))
        alpha_s, sigma_s = torch.sqrt(torch.sigmoid(-gamma_s)), torch.sqrt(torch.sigmoid(gamma_s))
        x_hat = (z_t - sigma_t * eps_hat) / alpha_t
        return alpha_s * x_hat + sigma_s * eps_hat


class DPMSolverSampler(Sampler):
    """DPM-Solver++(2M): a deterministic multistep solver of the probability-flow ODE.

    Lu et al. (2022), "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", Algorithm 2, in the data-prediction form. With
    ``lambda = -gamma / 2 = log(alpha / sigma)``, ``h = lambda_s - lambda_t > 0`` and the
    data prediction ``x_hat_t = (z_t - sigma_t eps_hat) / alpha_t``, one step is:

        z_s = (sigma_s / sigma_t) z_t - alpha_s expm1(-h) D

    with ``D = x_hat_t`` for a first-order step (this is exactly DDIM) and, for a
    second-order step that reuses the prediction ``x_hat_p`` made at the previous step
    ``p`` (``h_p = lambda_t - lambda_p``, ``r = h_p / h``):

        D = (1 + 1 / (2 r)) x_hat_t - 1 / (2 r) x_hat_p

    Each step costs one denoiser evaluation, as DDIM, but the global error falls as
    ``O(h^2)`` instead of ``O(h)``. The first step has no earlier prediction and is first
    order; so is the last one when ``lower_order_final`` (on an even time grid the final
    step to ``t = 0`` is by far the longest in ``lambda``, and extrapolating over it is
    unstable). Predictions are kept in the per-call history (see
    [`Sampler.begin`][canonwrap.samplers.Sampler.begin]), never on the sampler, so separate
    ``sample`` calls do not interact.

    Parameters
    ----------
    num_steps
        Solver steps from ``T`` to ``0`` on an even integer grid (``None``: all ``T``).
    order
        ``2`` (DPM-Solver++(2M)) or ``1`` (first order, the same update as DDIM).
    lower_order_final
        Take the last step with the first-order update.

    Examples
    --------
    >>> sampler = DPMSolverSampler(num_steps=20)
    >>> sampler.steps(1000)[:3]
    [1000, 950, 900]
    """

    def __init__(
        self, num_steps: int | None = 20, order: int = 2, lower_order_final: bool = True
    ) -> None:
        super().__init__(num_steps)
        if isinstance(order, bool) or order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order!r}")
        self.order = int(order)
        self.lower_order_final = bool(lower_order_final)

    def begin(self, steps: Sequence[int]) -> History:
        """History holding the number of steps left (``len(steps) - 1``)."""
        return {"remaining": len(steps) - 1}

    def step(self, z_t, eps_hat, gamma_t, gamma_s, noise):
        """A first-order step (no earlier prediction available)."""
        return self.step_with_history(z_t, eps_hat, gamma_t, gamma_s, noise, {})

    def step_with_history(self, z_t, eps_hat, gamma_t, gamma_s, noise, history):
        """One solver step; reads and stores the previous data prediction in ``history``.

        ``history`` keys: ``"x_hat"`` and ``"lambda"`` (prediction and ``lambda`` of the
        previous step, absent before the first step) and ``"remaining"`` (steps left
        including this one; set by [`begin`][canonwrap.samplers.DPMSolverSampler.begin], absent if
        unknown).
        """
        alpha_t, sigma_t = torch.sqrt(torch.sigmoid(-gamma_t)), torch.sqrt(torch.sigmoid(gamma_t))
        alpha_s = torch.sqrt(torch.sigmoid(-gamma_s))
        # sigma_s / sigma_t computed in log space
        sigma_ratio = torch.exp(0.5 * (F.logsigmoid(gamma_s) - F.logsigmoid(gamma_t)))
        lambda_t, lambda_s = -0.5 * gamma_t, -0.5 * gamma_s
        h = lambda_s - lambda_t
        x_hat = (z_t - sigma_t * eps_hat) / alpha_t
        remaining = history.get("remaining")
        last = remaining is not None and remaining <= 1
        d = x_hat
        if self.order == 2 and "x_hat" in history and not (self.lower_order_final and last):
            r = (lambda_t - history["lambda"]) / h
            d = x_hat + (x_hat - history["x_hat"]) / (2.0 * r)
        history["x_hat"], history["lambda"] = x_hat, lambda_t
        if remaining is not None:
            history["remaining"] = remaining - 1
        return sigma_ratio * z_t - alpha_s * torch.expm1(-h) * d

    def __repr__(self) -> str:
        return (
            f"DPMSolverSampler(num_steps={self.num_steps}, order={self.order}, "
            f"lower_order_final={self.lower_order_final})"
        )
