"""``CanonicalizedDiffusion``: a plain denoiser trained on canonical poses.

Training follows Algorithm 1 of the canonicalization paper:

    t ~ U{0..T}, eps ~ N(0, I)
    z_t  = alpha_t c(x) + sigma_t eps
    loss = || eps - phi(z_t, t / T) ||^2 / dim(x)    # gradients reach phi and h

Sampling runs the reverse process of ``phi`` alone and yields canonical poses; a
Haar-random group element applied afterwards (``randomize_pose=True``) gives samples of
the invariant distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from canonwrap._wrapper import (  # noqa: F401  (_device_memory: re-exported for tests)
    CanonicalizedModel,
    _all_finite,
    _device_memory,
)
from canonwrap.canonicalizers.base import Canonicalizer
from canonwrap.pointclouds import is_point_cloud, nodes_per_graph
from canonwrap.samplers import AncestralSampler, Sampler
from canonwrap.schedules import NoiseSchedule, PolynomialSchedule
from canonwrap.spaces import Space, State

__all__ = ["CanonicalizedDiffusion", "LossOutput", "NLLOutput"]


@dataclass
class LossOutput:
    """Result of
    [`CanonicalizedDiffusion.training_loss`][canonwrap.diffusion.CanonicalizedDiffusion.training_loss]
    and of
    [`CanonicalizedFlowMatching.training_loss`][canonwrap.flow.CanonicalizedFlowMatching.training_loss].

    Attributes
    ----------
    loss
        Scalar to minimise (denoising loss plus the canonicalizer's prior loss).
    denoising
        Scalar mean squared error per dimension, averaged over the batch.
    per_sample
        Mean squared error per dimension of each sample, ``[B]``.
    t
        Times drawn, ``[B]``: integer steps for diffusion, flow times in ``[0, 1]`` for
        [`CanonicalizedFlowMatching`][canonwrap.flow.CanonicalizedFlowMatching].
    prior
        The canonicalizer's prior loss (``None`` if it has none).
    terms
        Scalar terms for logging.
    """

    loss: Tensor
    denoising: Tensor
    per_sample: Tensor
    t: Tensor
    prior: Tensor | None = None
    terms: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class NLLOutput:
    """Variational bound on ``-log p(x)`` per sample, in nats (``[B]`` each).

    ``nll = kl_prior + diffusion + reconstruction + size`` (``size``: ``-log p(N)`` for
    molecules, zero for data of fixed size). For canonicalized models all terms
    are computed on the canonical pose (see
    [`CanonicalizedDiffusion.nll`][canonwrap.diffusion.CanonicalizedDiffusion.nll]).
    """

    nll: Tensor
    kl_prior: Tensor
    diffusion: Tensor
    reconstruction: Tensor
    size: Tensor
    dims: Tensor


class CanonicalizedDiffusion(CanonicalizedModel):
    """Wrap any denoiser ``phi(z_t, t)`` with a canonicalizer.

    Parameters
    ----------
    denoiser
        Any module called as ``denoiser(z_t, t)`` with ``z_t`` in the data's layout and
        ``t [B]`` normalized times in ``[0, 1]``; returns the predicted noise in the same
        layout (point clouds: one tensor ``[N, 3 + F]`` or a pair ``(eps_pos, eps_x)``).
    canonicalizer
        A [`Canonicalizer`][canonwrap.canonicalizers.Canonicalizer]; ``None`` means no
        canonicalization (point clouds are still centred).
    schedule
        Noise schedule; default ``PolynomialSchedule(1000, 2, 1e-5)`` as EDM.
    space
        How the data is laid out; default chosen from the data (point cloud or tensor).

    Notes
    -----
    Point clouds: the number of node features ``F`` comes from ``space`` when it fixes
    it, or else from the first training batch; the model keeps it in its ``state_dict``
    (extra state), so a trained or loaded model samples without declaring the space
    again. With a space that has ``node_counts`` (such as a
    [`MoleculeSpace`][canonwrap.molecules.MoleculeSpace] built from the training
    histogram), ``sample(num_samples=B)`` draws the sizes too.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from canonwrap import CanonicalizedDiffusion
    >>> class MLP(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = nn.Linear(5, 4)
    ...     def forward(self, z, t):
    ...         return self.net(torch.cat([z, t[:, None]], -1))
    >>> model = CanonicalizedDiffusion(MLP())
    >>> out = model.training_loss(torch.randn(8, 4))
    >>> out.loss.shape
    torch.Size([])
    """

    _prediction = "noise predictions"

    def __init__(
        self,
        denoiser: nn.Module,
        canonicalizer: Canonicalizer | None = None,
        schedule: NoiseSchedule | None = None,
        space: Space | None = None,
    ) -> None:
        super().__init__(denoiser, canonicalizer, space)
        self.schedule = schedule if schedule is not None else PolynomialSchedule()

    # ------------------------------------------------------------------ helpers
    @property
    def timesteps(self) -> int:
        return self.schedule.timesteps

    def _gamma(self, steps: Tensor, dtype: torch.dtype) -> Tensor:
        return self.schedule.gammas.to(steps.device)[steps].to(dtype)

    def _alpha_sigma(
        self, space: Space, steps: Tensor, x: State, template: Any
    ) -> tuple[State, State]:
        """``alpha_t`` and ``sigma_t`` at integer ``steps [B]``, broadcast like ``x``."""
        gamma = self._gamma(steps, x[0].dtype)
        alpha = space.expand(self.schedule.alpha(gamma), x, template)
        sigma = space.expand(self.schedule.sigma(gamma), x, template)
        return alpha, sigma

    def _clipped_eps(
        self,
        space: Space,
        z: State,
        eps_hat: State,
        steps: Tensor,
        template: Any,
        clip: tuple[float, float],
    ) -> State:
        """``eps_hat`` recomputed from the clean-data prediction clamped to ``clip``."""
        alpha, sigma = self._alpha_sigma(space, steps, z, template)
        out = []
        for zi, ei, a, s in zip(z, eps_hat, alpha, sigma):
            x_hat = ((zi - s * ei) / a).clamp(*clip)
            out.append((zi - a * x_hat) / s)
        return tuple(out)

    def _noisy(self, space: Space, x: State, eps: State, steps: Tensor, template: Any) -> State:
        """``z_t = alpha_t x + sigma_t eps`` at integer ``steps [B]``."""
        alpha, sigma = self._alpha_sigma(space, steps, x, template)
        return tuple(a * xi + s * e for a, xi, s, e in zip(alpha, x, sigma, eps))

    def _predict(self, space: Space, z: State, template: Any, steps: Tensor) -> State:
        return self._call_denoiser(space, z, template, steps.to(z[0].dtype) / self.timesteps)

    def _at_times(self, shown: list) -> str:
        return f" at step(s) t = {shown} of T = {self.timesteps}"

    # ------------------------------------------------------------------ public API
    def training_loss(self, data: Any, generator: torch.Generator | None = None) -> LossOutput:
        """Algorithm 1: denoising loss on the canonical pose (gradients reach both networks).

        Parameters
        ----------
        data
            A batch (tensor ``[B, ...]`` or point-cloud ``Batch``).
        generator
            Optional generator for ``t`` and ``eps`` (on the data's device or CPU).

        Raises
        ------
        FloatingPointError
            When the loss is not finite (one check of a scalar per call). The message names
            the culprit: the canonicalizer (non-finite canonical pose or prior loss), the
            denoiser (NaN/Inf predictions, with the samples and steps ``t``), or an overflow
            of the arithmetic, with the data's largest magnitude (e.g. positions of 1e20 in
            float32).
        """
        space = self._checked_space(data, record=True)  # before the canonicalizer sees it
        canon = self.canonicalizer(data)
        x = space.state(canon.canonical)
        template = canon.canonical
        b = space.num_samples(template)
        device = x[0].device
        steps = torch.randint(0, self.timesteps + 1, (b,), generator=generator).to(device)
        eps = space.noise(x, template, generator)
        z = self._noisy(space, x, eps, steps, template)
        eps_hat = self._predict(space, z, template, steps)
        return self._regression_loss(data, space, canon, x, eps, eps_hat, steps)

    def forward(self, data: Any, generator: torch.Generator | None = None) -> LossOutput:
        """The training loss: the same as
        [`training_loss`][canonwrap.diffusion.CanonicalizedDiffusion.training_loss].

        Calling the module computes its loss so that wrappers which act on ``forward``
        see the computation: ``DistributedDataParallel`` synchronises gradients only for
        losses computed through ``ddp(batch)``, e.g.
        ``Trainer(ddp_model, optimizer, loader, loss_fn=lambda m, batch: m(batch))``.
        """
        return self.training_loss(data, generator)

    def nll(
        self,
        data: Any,
        *,
        num_t_samples: int = 1,
        exact: bool = False,
        generator: torch.Generator | None = None,
    ) -> NLLOutput:
        """Variational upper bound on ``-log p(x)`` in nats per sample (EDM's bound).

        ``nll = KL(q(z_T | x) || N(0, I)) + sum_{t=1}^T L_t + (-log p(x | z_0))`` with
        ``L_t = 0.5 (SNR(s) / SNR(t) - 1) ||eps - eps_hat(z_t, t)||^2``, ``s = t - 1``, on
        the data's subspace (for point clouds ``(n - 1) * 3 + n * F`` dimensions: the
        zero centre-of-mass positions and the features). The diffusion sum is estimated
        by ``T`` times the mean over ``num_t_samples`` uniform draws of ``t``, or computed
        over all ``T`` steps when ``exact=True``.

        For a canonicalized model the bound is on the density of canonical poses
        ``c(x)``, which lives on the quotient space: it is not the likelihood of an
        invariant model on ``x`` (that would add the log-volume of the orbit).

        Parameters
        ----------
        data
            A batch (tensor ``[B, ...]`` or point-cloud ``Batch``).
        num_t_samples
            Number of uniform draws of ``t`` per sample for the diffusion term.
        exact
            Sum the diffusion term over all ``T`` steps instead.
        generator
            Optional generator for ``t`` and the noise.

        Raises
        ------
        ValueError
            When the space has ``node_counts`` and a sample's size has probability zero
            under it (the size term would be infinite); the samples and sizes are named.
        FloatingPointError
            When a term is not finite, naming the culprit as
            [`training_loss`][canonwrap.diffusion.CanonicalizedDiffusion.training_loss] does.
        """
        space = self._checked_space(data)
        counts = getattr(space, "node_counts", None)
        if counts is not None and is_point_cloud(data):
            counts.check_support(nodes_per_graph(data), "nll")
        with torch.no_grad():
            canon = self.canonicalizer(data)
            x = space.state(canon.canonical)
            template = canon.canonical
            b = space.num_samples(template)
            dtype, device = x[0].dtype, x[0].device
            dims = space.dims(template).to(device=device, dtype=dtype)

            # prior term at t = T
            steps_T = torch.full((b,), self.timesteps, dtype=torch.long, device=device)
            g_T = self._gamma(steps_T, dtype)
            a_T, s_T = self.schedule.alpha(g_T), self.schedule.sigma(g_T)
            mu2 = space.sum_per_sample(tuple(v**2 for v in x), template) * a_T**2
            kl_prior = dims * (-torch.log(s_T)) + 0.5 * (dims * s_T**2 + mu2) - 0.5 * dims

            def require(what: str, value: Tensor, **found: Any) -> None:
                self._require_finite("nll", what, value, space, data, template, **found)

            require("the prior term KL(q(z_T | x) || N(0, I))", kl_prior, canonical=x)

            def term(steps: Tensor) -> Tensor:
                g_t = self._gamma(steps, dtype)
                g_s = self._gamma(steps - 1, dtype)
                eps = space.noise(x, template, generator)
                z = self._noisy(space, x, eps, steps, template)
                eps_hat = self._predict(space, z, template, steps)
                sq = space.sum_per_sample(
                    tuple((e - h) ** 2 for e, h in zip(eps, eps_hat)), template
                )
                value = 0.5 * torch.expm1(g_t - g_s) * sq
                require("the diffusion term", value, eps_hat=eps_hat, steps=steps)
                return value

            if exact:
                diffusion = torch.zeros(b, dtype=dtype, device=device)
                for k in range(1, self.timesteps + 1):
                    diffusion = diffusion + term(torch.full_like(steps_T, k))
            else:
                if num_t_samples < 1:
                    raise ValueError("num_t_samples must be >= 1")
                acc = torch.zeros(b, dtype=dtype, device=device)
                for _ in range(num_t_samples):
                    steps = torch.randint(1, self.timesteps + 1, (b,), generator=generator)
                    acc = acc + term(steps.to(device))
                diffusion = self.timesteps * acc / num_t_samples

            # reconstruction term at t = 0
            steps_0 = torch.zeros(b, dtype=torch.long, device=device)
            g_0 = self._gamma(steps_0, dtype)
            eps = space.noise(x, template, generator)
            z0 = self._noisy(space, x, eps, steps_0, template)
            eps_hat = self._predict(space, z0, template, steps_0)
            recon = space.reconstruction_nll(x, eps, eps_hat, g_0, template)
            require(
                "the reconstruction term -log p(x | z_0)", recon, eps_hat=eps_hat, steps=steps_0
            )
            size = space.size_nll(template).to(device=device, dtype=dtype)
        return NLLOutput(
            nll=kl_prior + diffusion + recon + size,
            kl_prior=kl_prior,
            diffusion=diffusion,
            reconstruction=recon,
            size=size,
            dims=dims,
        )

    @torch.no_grad()
    def sample(
        self,
        num_samples: int | None = None,
        *,
        shape: tuple[int, ...] | None = None,
        num_nodes: Any = None,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
        randomize_pose: bool = False,
        progress: bool = False,
        dtype: torch.dtype | None = None,
        device: Any = None,
        max_graph_bytes: float | None = None,
        clip_denoised: tuple[float, float] | None = None,
    ) -> Any:
        """Draw samples by running the reverse process of the denoiser alone.

        Parameters
        ----------
        num_samples
            Number of samples ``B``. For point clouds whose space has ``node_counts``, the
            size of each sample is drawn from it (``num_nodes`` not needed).
        shape
            For tensors: ``shape`` of one sample (``num_samples`` of them) or of the batch.
        num_nodes
            For point clouds: number of nodes of each sample (sequence or tensor ``[B]``).
            The number of node features is the model's (see the class notes).
        sampler
            Default [`AncestralSampler`][canonwrap.samplers.AncestralSampler] over all ``T`` steps.
            Each call gives the sampler fresh histories
            ([`begin`][canonwrap.samplers.Sampler.begin]), so one sampler object can serve any
            number of calls.
        generator
            Seeds the prior noise and every stochastic step.
        randomize_pose
            Apply a Haar-random group element of the canonicalizer's group to each sample,
            giving samples of the invariant distribution. Without it, samples come in the
            canonical pose. Non-compact groups (translations, see
            [`Group.is_compact`][canonwrap.groups.Group]) have no Haar measure: they are
            represented by centring and left as they are.
        progress
            Show a progress bar over steps.
        dtype
            Floating-point type of the samples; default the model parameters' type
            (float32 for a model without parameters).
        device
            Default the device of the model's parameters (CPU without parameters).
        max_graph_bytes
            Point clouds: the largest memory estimate of the fully connected graphs of one
            call that is allowed, in bytes. The estimate is ``E * (16 + 256 * s)`` bytes for
            ``E = sum_b n_b (n_b - 1)`` node pairs and ``s`` bytes per value of ``dtype``:
            the edge list and one 256-wide vector per pair, the width of the messages of
            EDM's networks (the provided GNN, EGNN and transformer denoisers hold several such
            tensors at once, so this is a lower bound for them at that width). Default
            ``None``: the device's total memory (CPU: physical memory; no check where it
            cannot be read). Pass a larger number, or ``math.inf``, to sample anyway, e.g.
            with a denoiser that builds no graph.
        clip_denoised
            ``(low, high)``: the range of bounded tensor data (images in ``[-1, 1]``: pass
            ``(-1.0, 1.0)``). At every step the predicted clean data
            ``x_hat = (z_t - sigma_t eps_hat) / alpha_t`` is clamped to it and ``eps_hat``
            recomputed from the clamped ``x_hat`` before the sampler moves (clipped sampling,
            Ho et al. 2020), and the final samples are clamped. Near ``t = T``, ``alpha_t``
            is small and an unclipped ``x_hat`` multiplies the prediction's error by
            ``1 / alpha_t``; samples of bounded data then often leave its range for good.
            Default ``None``: no clipping (required for point clouds, whose positions are
            not bounded).

        Returns
        -------
        Tensor or Batch
            Samples in the data layout: a tensor ``[B, ...]`` or a point-cloud ``Batch``
            with ``pos`` and continuous features ``x``.

        Raises
        ------
        ValueError
            When the memory estimate of the graphs exceeds ``max_graph_bytes`` (the message
            shows the estimate), or ``clip_denoised`` is no finite ``(low, high)`` with
            ``low < high`` or is given for data other than tensors.
        FloatingPointError
            When the denoiser returned NaN/Inf at some step (the first such step is named;
            it is tracked on the device, without a synchronisation per step), or the samples
            are not finite although every prediction was.
        """
        device = self._sample_device(device)
        dtype = dtype if dtype is not None else self._default_dtype()
        sampler = sampler if sampler is not None else AncestralSampler()
        space, template = self._sampling_template(
            num_samples, shape, num_nodes, generator, dtype, device, max_graph_bytes
        )
        b = space.num_samples(template)
        clip = _check_clip(clip_denoised, space)
        x_like = space.state(template)
        z = space.noise(x_like, template, generator)
        steps = sampler.steps(self.timesteps)
        # per-call sampler history, one per state component (multistep solvers use it)
        histories = [sampler.begin(steps) for _ in z]
        iterator = zip(steps[:-1], steps[1:])
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(steps), desc="sampling", unit="step")
        # first step at which the denoiser returned NaN/Inf, tracked on the device (no sync)
        first_bad = torch.full((), -1, dtype=torch.long, device=device)
        for t_int, s_int in iterator:
            t_vec = torch.full((b,), t_int, dtype=torch.long, device=device)
            s_vec = torch.full((b,), s_int, dtype=torch.long, device=device)
            eps_hat = self._predict(space, z, template, t_vec)
            first_bad = torch.where((first_bad < 0) & ~_all_finite(eps_hat), int(t_int), first_bad)
            if clip is not None:
                eps_hat = self._clipped_eps(space, z, eps_hat, t_vec, template, clip)
            g_t = space.expand(self._gamma(t_vec, dtype), z, template)
            g_s = space.expand(self._gamma(s_vec, dtype), z, template)
            noise = space.noise(z, template, generator) if sampler.stochastic else (None,) * len(z)
            z = tuple(
                sampler.step_with_history(zi, ei, gt, gs, ni, hi)
                for zi, ei, gt, gs, ni, hi in zip(z, eps_hat, g_t, g_s, noise, histories)
            )
            z = space.project(z, template)
            if bar is not None:
                bar.update(1)
        # final step: x ~ p(x | z_0)
        steps_0 = torch.zeros(b, dtype=torch.long, device=device)
        eps_hat = self._predict(space, z, template, steps_0)
        first_bad = torch.where((first_bad < 0) & ~_all_finite(eps_hat), 0, first_bad)
        a0, s0 = self._alpha_sigma(space, steps_0, z, template)
        x = tuple((zi - si * ei) / ai for zi, ei, ai, si in zip(z, eps_hat, a0, s0))
        if sampler.final_noise:
            noise = space.noise(z, template, generator)
            x = tuple(xi + (si / ai) * ni for xi, ni, ai, si in zip(x, noise, a0, s0))
        x = space.project(x, template)
        if clip is not None:
            x = tuple(xi.clamp(*clip) for xi in x)
        if bar is not None:
            bar.update(1)
            bar.close()
        if int(first_bad) >= 0:
            raise FloatingPointError(
                f"sample: the denoiser ({type(self.denoiser).__name__}) returned non-finite "
                f"(NaN/Inf) noise predictions, first at step t = {int(first_bad)} of "
                f"T = {self.timesteps}"
            )
        if not bool(_all_finite(x)):
            raise FloatingPointError(
                f"sample: the samples contain NaN/Inf although the denoiser's predictions were "
                f"finite at every step: the update of {sampler!r} overflowed {dtype} (the "
                "noise predictions are too large for this schedule)"
            )
        out = space.to_data(x, template)
        return self._posed(out, b, randomize_pose, generator, dtype, device)


def _check_clip(clip: Any, space: Space) -> tuple[float, float] | None:
    """``clip_denoised`` of ``sample`` as ``(low, high)`` floats, or ``None``."""
    if clip is None:
        return None
    from canonwrap.spaces import TensorSpace

    try:
        low, high = (float(v) for v in clip)
    except (TypeError, ValueError):
        raise ValueError(f"clip_denoised must be a pair (low, high); got {clip!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"clip_denoised must be finite with low < high; got {clip!r}")
    if not isinstance(space, TensorSpace):
        raise ValueError(
            f"clip_denoised bounds tensor data such as images; this model's data space is "
            f"{type(space).__name__}, whose states are not bounded (pass None)"
        )
    return low, high
