"""Noise schedules of the variance-preserving diffusion (EDM's parametrisation).

A schedule owns ``T + 1`` noise levels ``alpha_t^2`` for integer steps ``t = 0..T`` with
``sigma_t^2 = 1 - alpha_t^2`` and ``gamma_t = log sigma_t^2 - log alpha_t^2`` (minus the log
signal-to-noise ratio). Continuous times ``t in [0, 1]`` are looked up at ``round(t * T)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["NoiseSchedule", "PolynomialSchedule", "CosineSchedule", "clip_alphas2"]

_T_TOL = 1e-6  # normalized times this far outside [0, 1] count as rounding and are clamped


def clip_alphas2(alphas2: np.ndarray, clip_value: float = 0.001) -> np.ndarray:
    """Clip the step ratios ``alpha_t^2 / alpha_{t-1}^2`` to ``[clip_value, 1]``, re-accumulate.

    ``alphas2`` holds ``alpha^2`` at steps ``0..T``; a leading 1 is prepended so the first
    ratio is ``alpha_0^2 / 1``. This keeps the reverse process stable near ``t = T``.
    """
    full = np.concatenate([np.ones(1), alphas2])
    steps = np.clip(full[1:] / full[:-1], clip_value, 1.0)
    return np.cumprod(steps)


class NoiseSchedule:
    """A schedule defined by a table ``alphas2 [T + 1]`` of ``alpha_t^2`` at steps ``0..T``.

    Parameters
    ----------
    alphas2
        ``alpha_t^2`` for ``t = 0..T`` (float64), strictly inside ``(0, 1)``.
    """

    def __init__(self, alphas2: np.ndarray | Tensor) -> None:
        a2 = torch.as_tensor(np.asarray(alphas2, dtype=np.float64))
        if a2.dim() != 1 or a2.numel() < 2:
            raise ValueError("alphas2 must be a 1-D table with at least two steps")
        if not ((a2 > 0) & (a2 < 1)).all():
            raise ValueError("alphas2 must lie strictly inside (0, 1)")
        self.alphas2 = a2
        self.sigmas2 = 1.0 - a2
        self.gammas = torch.log(self.sigmas2) - torch.log(a2)

    @property
    def timesteps(self) -> int:
        """Number of diffusion steps ``T``."""
        return self.alphas2.numel() - 1

    def step_index(self, t: Tensor) -> Tensor:
        """Integer step ``round(t * T)`` of normalized times ``t`` in ``[0, 1]``.

        Times within ``1e-6`` outside ``[0, 1]`` (rounding) are clamped to it.

        Raises
        ------
        ValueError
            If some ``t`` is NaN or lies further outside ``[0, 1]`` (a time in steps
            ``0..T`` passed where a normalized time is expected, for instance).
        """
        td = torch.as_tensor(t).double()
        bad = torch.isnan(td) | (td < -_T_TOL) | (td > 1.0 + _T_TOL)
        if bad.any():
            shown = td[bad].flatten()[:5].tolist()
            raise ValueError(
                f"normalized times t must lie in [0, 1]; got {int(bad.sum())} value(s) outside it "
                f"or NaN, e.g. {shown} (pass t / T for integer steps t = 0..T)"
            )
        return torch.round(td * self.timesteps).long().clamp(0, self.timesteps)

    def gamma(self, t: Tensor) -> Tensor:
        """``gamma(t)`` for normalized times ``t`` in ``[0, 1]``; same shape and dtype as ``t``.

        Raises ``ValueError`` for times outside ``[0, 1]`` (see
        [`step_index`][canonwrap.schedules.NoiseSchedule.step_index]).
        """
        dtype = t.dtype if torch.is_floating_point(t) else torch.float64
        table = self.gammas.to(t.device)
        return table[self.step_index(t).to(t.device)].to(dtype)

    @staticmethod
    def alpha(gamma: Tensor) -> Tensor:
        """``alpha = sqrt(sigmoid(-gamma))``."""
        return torch.sqrt(torch.sigmoid(-gamma))

    @staticmethod
    def sigma(gamma: Tensor) -> Tensor:
        """``sigma = sqrt(sigmoid(gamma))``."""
        return torch.sqrt(torch.sigmoid(gamma))

    @staticmethod
    def snr(gamma: Tensor) -> Tensor:
        """Signal-to-noise ratio ``alpha^2 / sigma^2 = exp(-gamma)``."""
        return torch.exp(-gamma)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(timesteps={self.timesteps})"


class PolynomialSchedule(NoiseSchedule):
    """EDM's ``polynomial_<power>`` schedule (Hoogeboom et al. 2022, appendix B).

    ``alpha_t^2 = (1 - (t / T)^power)^2`` for ``t = 0..T``, step ratios clipped to
    ``[0.001, 1]`` and re-accumulated ([`clip_alphas2`][canonwrap.schedules.clip_alphas2]), then
    ``alpha_t^2 <- (1 - 2 s) alpha_t^2 + s`` with ``s = precision``. EDM's QM9 models use
    ``power=2``, ``T=1000``, ``precision=1e-5``.
    """

    def __init__(self, timesteps: int = 1000, power: float = 2.0, precision: float = 1e-5) -> None:
        if int(timesteps) < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        if not 0 < precision < 0.5:
            raise ValueError(f"precision must lie in (0, 0.5), got {precision}")
        self.power, self.precision = float(power), float(precision)
        t = np.arange(int(timesteps) + 1, dtype=np.float64) / int(timesteps)
        alphas2 = clip_alphas2((1.0 - t**self.power) ** 2)
        super().__init__((1.0 - 2.0 * self.precision) * alphas2 + self.precision)

    def __repr__(self) -> str:
        return (
            f"PolynomialSchedule(timesteps={self.timesteps}, power={self.power}, "
            f"precision={self.precision})"
        )


class CosineSchedule(NoiseSchedule):
    """Cosine schedule (Nichol & Dhariwal 2021) in the same discrete form.

    ``alpha_t^2 = f(t) / f(0)`` with ``f(t) = cos^2(((t / T + s) / (1 + s)) pi / 2)``, step
    ratios clipped to ``[0.001, 1]`` and the same ``precision`` floor as
    [`PolynomialSchedule`][canonwrap.schedules.PolynomialSchedule].
    """

    def __init__(self, timesteps: int = 1000, s: float = 0.008, precision: float = 1e-5) -> None:
        if int(timesteps) < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        self.s, self.precision = float(s), float(precision)
        t = np.arange(int(timesteps) + 1, dtype=np.float64) / int(timesteps)
        f = np.cos((t + self.s) / (1 + self.s) * math.pi / 2) ** 2
        alphas2 = clip_alphas2(f / f[0])
        super().__init__((1.0 - 2.0 * self.precision) * alphas2 + self.precision)
