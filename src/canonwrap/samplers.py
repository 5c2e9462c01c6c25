"""Reverse-process samplers: one step from ``z_t`` to ``z_s`` (``s < t``) given ``eps_hat``.

Samplers are plain objects passed to :meth:`CanonicalizedDiffusion.sample`. Each chooses
the integer steps it visits (:meth:`Sampler.steps`) and how to move between them.
Formulas follow the variance-preserving parametrisation with ``gamma = log(sigma^2 /
alpha^2)`` (Kingma et al. 2021; Hoogeboom et al. 2022, appendix).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Sampler", "AncestralSampler", "DDIMSampler"]


def _even_steps(timesteps: int, num_steps: int | None) -> list[int]:
    if num_steps is None or num_steps >= timesteps:
        return list(range(timesteps, -1, -1))
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    grid = np.round(np.linspace(timesteps, 0, num_steps + 1)).astype(int)
    return sorted(set(grid.tolist()), reverse=True)


class Sampler(ABC):
    """Interface: ``steps(T)`` gives descending integer steps from ``T`` to ``0``."""

    #: add the decoder noise ``sigma_0 / alpha_0`` to the final sample (EDM does)
    final_noise: bool = False

    def __init__(self, num_steps: int | None = None) -> None:
        self.num_steps = num_steps

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

    stochastic: bool = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_steps={self.num_steps})"


class AncestralSampler(Sampler):
    """Ancestral sampling from ``p(z_s | z_t)`` (DDPM; EDM's ``sample_p_zs_given_zt``).

    With ``alpha_{t|s} = alpha_t / alpha_s`` and ``sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2
    sigma_s^2``::

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
    """Deterministic DDIM step (Song et al. 2021, eta = 0)::

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
