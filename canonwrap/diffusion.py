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

import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from canonwrap.canonicalizers.base import Canonicalizer, CanonOutput
from canonwrap.canonicalizers.basic import Identity
from canonwrap.pointclouds import (
    collate_hint,
    is_point_cloud,
    nodes_per_graph,
    parameter_mismatch,
)
from canonwrap.samplers import AncestralSampler, Sampler
from canonwrap.schedules import NoiseSchedule, PolynomialSchedule
from canonwrap.spaces import PointCloudSpace, Space, State, TensorSpace

__all__ = ["CanonicalizedDiffusion", "LossOutput", "NLLOutput"]


@dataclass
class LossOutput:
    """Result of
    [`CanonicalizedDiffusion.training_loss`][canonwrap.diffusion.CanonicalizedDiffusion.training_loss].

    Attributes
    ----------
    loss
        Scalar to minimise (denoising loss plus the canonicalizer's prior loss).
    denoising
        Scalar mean squared error per dimension, averaged over the batch.
    per_sample
        Mean squared error per dimension of each sample, ``[B]``.
    t
        Integer steps drawn, ``[B]``.
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


def _call_signature_problem(denoiser: Any) -> str | None:
    """Why ``denoiser(z_t, t)`` cannot be called, or ``None`` if its signature allows it."""
    fn = denoiser.forward if isinstance(denoiser, nn.Module) else denoiser
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and some C extensions have no signature
        return None
    try:
        sig.bind(None, None)
    except TypeError as err:
        name = getattr(fn, "__qualname__", type(denoiser).__name__)
        return (
            f"the denoiser is called as denoiser(z_t, t) (noisy data and normalized times "
            f"[B]), but {name}{sig} cannot take these two arguments: {err}"
        )
    return None


def _component_names(space: Space, count: int) -> tuple[str, ...]:
    """How the components of a state are named in messages."""
    if isinstance(space, PointCloudSpace) and count == 2:
        return ("positions", f"features ({space.feature_key})")
    if count == 1:
        return ("values",)
    return tuple(f"component {i}" for i in range(count))


def _all_finite(state: State) -> Tensor:
    """Whether every entry of every component is finite: a 0-dim bool tensor (no sync)."""
    return torch.stack([torch.isfinite(s).all() for s in state]).all()


def _first_indices(mask: Tensor, limit: int = 5) -> str:
    """``[i, j, ...]`` of the first ``limit`` true entries of ``mask [B]`` (and how many)."""
    idx = mask.reshape(-1).nonzero().flatten()
    shown = idx[:limit].tolist()
    return str(shown) + (f" ({idx.numel()} in all)" if idx.numel() > limit else "")


def _scale_note(state: State, always: bool = False) -> str:
    """A sentence on the data's magnitude when it is large enough to overflow (or ``always``).

    Values above the fourth root of the dtype's largest number overflow once squared and
    summed in a few places (losses, distances, covariances): the data should be rescaled.
    """
    parts = [s.detach() for s in state if s.numel()]
    if not parts:
        return ""
    finite = [p[torch.isfinite(p)] for p in parts]
    largest = max((float(p.abs().max()) for p in finite if p.numel()), default=0.0)
    limit = torch.finfo(parts[0].dtype).max
    if not always and largest <= limit**0.25:
        return ""
    return (
        f"; the data's largest |value| is {largest:.3g}, and {parts[0].dtype} overflows above "
        f"{limit:.3g} (squares above {limit**0.5:.3g}): rescale the data (e.g. to unit "
        "variance)"
    )


_GRAPH_PAIR_WIDTH = 256  # values per node pair in sample's memory estimate (EDM's width)


def _device_memory(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes (CPU: physical memory), or ``None`` if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "cpu":
        try:
            return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no value
            return None
    return None


def _check_graph_memory(
    counts: Tensor, dtype: torch.dtype, device: Any, limit: float | None
) -> None:
    """Refuse node counts whose fully connected graphs cannot fit (see ``sample``)."""
    n = counts.double()
    pairs = int((n * (n - 1)).sum())
    per_pair = 16 + _GRAPH_PAIR_WIDTH * torch.empty((), dtype=dtype).element_size()
    need = pairs * per_pair
    where = "max_graph_bytes"
    if limit is None:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        limit = _device_memory(dev)
        if limit is None:
            return
        where = f"the total memory of {dev}"
    if need <= limit:
        return
    raise ValueError(
        f"sample: the fully connected graphs of num_nodes (largest {int(counts.max())} nodes, "
        f"{len(counts)} sample(s), {pairs:,} node pairs) need an estimated {_gib(need)} "
        f"({per_pair} bytes per pair: the edge list and one {_GRAPH_PAIR_WIDTH}-wide {dtype} "
        f"vector), more than {where} ({_gib(limit)}); sample fewer or smaller point clouds "
        "per call, or pass max_graph_bytes=<bytes> (math.inf: no check) to try anyway"
    )


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


class CanonicalizedDiffusion(nn.Module):
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

    def __init__(
        self,
        denoiser: nn.Module,
        canonicalizer: Canonicalizer | None = None,
        schedule: NoiseSchedule | None = None,
        space: Space | None = None,
    ) -> None:
        super().__init__()
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable, got {type(denoiser).__name__}")
        self.denoiser = denoiser
        self.canonicalizer = canonicalizer if canonicalizer is not None else Identity()
        self.schedule = schedule if schedule is not None else PolynomialSchedule()
        self.space = space
        self.point_features: int | None = (
            space.num_features if isinstance(space, PointCloudSpace) else None
        )
        """``F`` of the point clouds this model generates (``None``: not known yet)."""

    # ------------------------------------------------------------------ saved with the weights
    def get_extra_state(self) -> dict[str, Any]:
        return {"point_features": self.point_features}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        f = state.get("point_features")
        declared = self.space.num_features if isinstance(self.space, PointCloudSpace) else None
        if f is not None and declared is not None and int(f) != declared:
            raise ValueError(
                f"the saved model generates point clouds with F={f} node features, but this "
                f"model's space declares num_features={declared}"
            )
        if f is not None:
            self.point_features = int(f)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # weights saved before the feature width was part of the state load as they are
        state_dict.setdefault(prefix + "_extra_state", self.get_extra_state())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ helpers
    @property
    def timesteps(self) -> int:
        return self.schedule.timesteps

    def _checked_space(self, data: Any, record: bool = False) -> Space:
        """The space of ``data`` after checking it once (``record``: keep the feature width)."""
        hint = collate_hint(data)
        if hint:
            raise TypeError(
                "CanonicalizedDiffusion takes one batch (a tensor [B, ...] or a "
                f"torch_geometric Batch); got {type(data).__name__}{hint}"
            )
        if self.space is not None:
            space = self.space
        elif is_point_cloud(data):
            space = PointCloudSpace()
        elif self.point_features is not None:
            raise TypeError(
                f"this model generates point clouds (F={self.point_features} node features); "
                f"got {type(data).__name__}: pass a torch_geometric Batch with pos and x"
            )
        else:
            space = TensorSpace()
        space.check(data)
        self._check_placement(data.pos if is_point_cloud(data) else data, "data")
        if isinstance(space, PointCloudSpace):
            h = getattr(data, space.feature_key, None)
            width = 0 if h is None else int(h.shape[1])
            if self.point_features is None:
                if record:
                    self.point_features = width
            elif width != self.point_features:
                raise ValueError(
                    f"this model generates point clouds with F={self.point_features} node "
                    f"features ({space.feature_key} [N, {self.point_features}]); got data "
                    f"with F={width}"
                )
        return space

    def _check_placement(self, ref: Tensor, what: str) -> None:
        """Raise if ``ref`` (data or samples) and the parameters differ in device or dtype.

        The model's first parameters are compared, and the canonicalizer's as well (a
        learned canonicalizer left in another dtype than the denoiser is named).
        """
        if not isinstance(ref, Tensor):  # a custom space's layout: nothing to compare
            return
        owner, found = "model", parameter_mismatch(self, ref)
        if found is None and isinstance(self.canonicalizer, nn.Module):
            owner, found = "canonicalizer", parameter_mismatch(self.canonicalizer, ref)
        if found is None:
            return
        kind, mine, theirs = found
        if kind == "device":
            raise ValueError(
                f"{what} is on {mine} but the {owner}'s parameters are on {theirs}; "
                "move one of them (model.to(device) or data.to(device))"
            )
        if what == "data":
            fix = (
                f"convert one of them: the model with model.to({mine}), or the data's "
                f"floating-point tensors (of a point-cloud batch: pos and the node features) "
                f"with .to({theirs})"
            )
        else:
            fix = f"leave dtype unset to sample in the model's dtype, or call model.to({mine})"
        raise ValueError(f"{what} is {mine} but the {owner}'s parameters are {theirs}; {fix}")

    def _default_dtype(self) -> torch.dtype:
        p = next((q for q in self.parameters() if q.is_floating_point()), None)
        return p.dtype if p is not None else torch.float32

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

    def _noisy(self, space: Space, x: State, eps: State, steps: Tensor, template: Any) -> State:
        """``z_t = alpha_t x + sigma_t eps`` at integer ``steps [B]``."""
        alpha, sigma = self._alpha_sigma(space, steps, x, template)
        return tuple(a * xi + s * e for a, xi, s, e in zip(alpha, x, sigma, eps))

    def _predict(self, space: Space, z: State, template: Any, steps: Tensor) -> State:
        t = steps.to(z[0].dtype) / self.timesteps
        try:
            out = self.denoiser(space.to_data(z, template), t)
        except TypeError as err:
            problem = _call_signature_problem(self.denoiser)
            if problem is None:  # the TypeError came from inside the denoiser
                raise
            raise TypeError(problem) from err
        return space.parse_output(out, z, template)

    def _require_finite(
        self,
        who: str,
        what: str,
        value: Tensor,
        space: Space,
        data: Any,
        template: Any,
        *,
        canonical: State | None = None,
        eps_hat: State | None = None,
        steps: Tensor | None = None,
        prior: Tensor | None = None,
    ) -> None:
        """Raise ``FloatingPointError`` naming the culprit unless ``value`` is finite.

        ``value`` is a loss or a per-sample term (``[B]`` or a scalar): the check is one
        reduction over ``B`` numbers. Only when it fails are the tensors that produced it
        scanned, in order: the canonicalizer's output (``canonical``, the state of the
        canonical pose) and prior loss, the denoiser's output ``eps_hat`` (at integer
        ``steps [B]``), and otherwise an overflow of the arithmetic is reported, with the
        magnitude of the data.
        """
        if bool(torch.isfinite(value.detach()).all()):
            return
        names = _component_names(space, len(space.state(template)))
        scale = _scale_note(space.state(data))
        if canonical is not None:
            found = [
                (n, int((~torch.isfinite(c.detach())).sum())) for n, c in zip(names, canonical)
            ]
            found = [f"{k} in {n}" for n, k in found if k]
            if found:
                raise FloatingPointError(
                    f"{who}: the canonicalizer ({type(self.canonicalizer).__name__}) returned "
                    f"non-finite (NaN/Inf) canonical data from finite data ({', '.join(found)})"
                    f"{scale}"
                )
        if prior is not None and not bool(torch.isfinite(prior.detach()).all()):
            raise FloatingPointError(
                f"{who}: the canonicalizer's ({type(self.canonicalizer).__name__}) prior loss "
                f"is {prior.detach().flatten()[:5].tolist()}{scale}"
            )
        if eps_hat is not None:
            bad = tuple((~torch.isfinite(e.detach())).to(torch.float64) for e in eps_hat)
            if any(bool(b.any()) for b in bad):
                where = [f"{int(b.sum())} in {n}" for n, b in zip(names, bad) if bool(b.any())]
                per = space.sum_per_sample(bad, template) > 0
                at = ""
                if steps is not None:
                    shown = steps.reshape(-1)[per.to(steps.device)][:5].tolist()
                    at = f" at step(s) t = {shown} of T = {self.timesteps}"
                raise FloatingPointError(
                    f"{who}: the denoiser ({type(self.denoiser).__name__}) returned non-finite "
                    f"(NaN/Inf) noise predictions ({', '.join(where)}) for sample(s) "
                    f"{_first_indices(per)}{at}{scale}"
                )
        flat = value.detach().reshape(-1)
        samples = (
            f" for sample(s) {_first_indices(~torch.isfinite(flat))}" if flat.numel() > 1 else ""
        )
        raise FloatingPointError(
            f"{who}: {what} is {flat[~torch.isfinite(flat)][:5].tolist()}{samples} although the "
            f"data, the canonical pose and the denoiser's output are finite: the arithmetic "
            f"overflowed{_scale_note(space.state(data), always=True)}"
        )

    # ------------------------------------------------------------------ public API
    def canonicalize(self, data: Any) -> CanonOutput:
        """Canonical pose of ``data`` with the group element per sample."""
        return self.canonicalizer(data)

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
        sq = space.sum_per_sample(tuple((e - h) ** 2 for e, h in zip(eps, eps_hat)), template)
        per_sample = sq / space.loss_dims(template).to(sq)
        denoising = per_sample.mean()
        loss = denoising
        terms = {"denoising": denoising.detach()}
        if canon.prior_loss is not None:
            loss = loss + canon.prior_loss
            terms["prior"] = canon.prior_loss.detach()
        self._require_finite(
            "training_loss",
            "the loss",
            loss,
            space,
            data,
            template,
            canonical=x,
            eps_hat=eps_hat,
            steps=steps,
            prior=canon.prior_loss,
        )
        return LossOutput(
            loss=loss,
            denoising=denoising,
            per_sample=per_sample,
            t=steps,
            prior=canon.prior_loss,
            terms=terms,
        )

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

        Returns
        -------
        Tensor or Batch
            Samples in the data layout: a tensor ``[B, ...]`` or a point-cloud ``Batch``
            with ``pos`` and continuous features ``x``.

        Raises
        ------
        ValueError
            When the memory estimate of the graphs exceeds ``max_graph_bytes`` (the message
            shows the estimate).
        FloatingPointError
            When the denoiser returned NaN/Inf at some step (the first such step is named;
            it is tracked on the device, without a synchronisation per step), or the samples
            are not finite although every prediction was.
        """
        if device is None:
            p = next(iter(self.parameters()), None)
            device = p.device if p is not None else torch.device("cpu")
        dtype = dtype if dtype is not None else self._default_dtype()
        sampler = sampler if sampler is not None else AncestralSampler()
        space, template = self._sampling_template(
            num_samples, shape, num_nodes, generator, dtype, device, max_graph_bytes
        )
        b = space.num_samples(template)
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
        if randomize_pose:
            group = self.canonicalizer.group
            if group.is_compact:
                g = group.random(b, generator=generator, dtype=dtype, device=device)
                out = group.act(g, out)
        return out

    def _sampling_template(
        self, num_samples, shape, num_nodes, generator, dtype, device, max_graph_bytes=None
    ):
        """The space to sample in and an all-zero batch of the requested sizes."""
        space = self.space
        if space is None and self.point_features is not None:
            space = PointCloudSpace(num_features=self.point_features)
        if isinstance(space, PointCloudSpace):
            template = space.template(
                self._sizes(space, num_samples, shape, num_nodes, generator),
                dtype=dtype,
                device=device,
                num_features=self.point_features,
            )
            _check_graph_memory(nodes_per_graph(template), dtype, device, max_graph_bytes)
            self._check_placement(template.pos, f"sample(dtype={dtype})")
            return space, template
        if num_nodes is not None:
            raise ValueError(
                "num_nodes is for point clouds, and this model does not know their number of "
                "node features F yet: train it on a batch first, load its weights, or give "
                "CanonicalizedDiffusion(space=PointCloudSpace(num_features=F))"
            )
        if shape is None:
            raise ValueError("give `shape` (tensors) or `num_nodes` (point clouds) to sample")
        space = space if space is not None else TensorSpace()
        if not isinstance(space, TensorSpace):
            raise ValueError(
                f"sample() builds batches for TensorSpace and PointCloudSpace; got "
                f"{type(space).__name__}"
            )
        full = (int(num_samples),) + tuple(shape) if num_samples is not None else tuple(shape)
        if len(full) < 2 or any(int(d) < 1 for d in full):
            raise ValueError(
                f"cannot sample the batch shape {full}: it needs a batch size and at least one "
                "more dimension, all >= 1 (num_samples=B with shape of one sample, or the "
                "batch shape alone)"
            )
        template = space.template(full, dtype=dtype, device=device)
        self._check_placement(template, f"sample(dtype={dtype})")
        return space, template

    @staticmethod
    def _sizes(space: PointCloudSpace, num_samples, shape, num_nodes, generator) -> Any:
        """Number of nodes of each point cloud to sample: given, or drawn from the space."""
        if shape is not None:
            raise ValueError(
                "`shape` is for tensor data; this model generates point clouds: give "
                "num_nodes=[n_1, ..., n_B] or num_samples=B"
            )
        if num_nodes is not None:
            if num_samples is not None and int(num_samples) != len(num_nodes):
                raise ValueError(
                    f"num_samples={num_samples} but num_nodes has {len(num_nodes)} entries"
                )
            return num_nodes
        if num_samples is None or int(num_samples) < 1:
            raise ValueError(
                f"give num_samples=B >= 1 or num_nodes=[n_1, ..., n_B]; got "
                f"num_samples={num_samples}"
            )
        if space.node_counts is None:
            raise ValueError(
                f"sample(num_samples={num_samples}) draws the size of each point cloud from "
                f"the space's node_counts, but this {type(space).__name__} has none: give "
                "num_nodes=[n_1, ..., n_B], or build the space with node_counts="
                "NodeCountDistribution(histogram)"
            )
        return space.node_counts.sample(int(num_samples), generator=generator)
