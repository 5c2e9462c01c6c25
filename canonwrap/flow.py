"""``CanonicalizedFlowMatching``: a plain network trained by flow matching on canonical poses.

The same contract as [`CanonicalizedDiffusion`][canonwrap.diffusion.CanonicalizedDiffusion]
(denoiser, canonicalizer, space; ``canonicalize``, ``training_loss``, ``sample``, a
likelihood), with a flow-matching objective (Lipman et al. 2023) built on Meta's
``flow_matching`` package:

    x_1 = c(x), x_0 ~ N(0, I) on the data's subspace, t ~ U(0, 1) (or time_distribution)
    x_t = alpha_t x_1 + sigma_t x_0          # CondOT: alpha_t = t, sigma_t = 1 - t
    loss = || v(x_t, t) - (d alpha_t x_1 + d sigma_t x_0) ||^2 / dim(x)

**Time.** ``flow_matching`` runs from noise at ``t = 0`` to data at ``t = 1``. The
denoiser is called as for diffusion, ``denoiser(z_t, 1 - t)``: its time input is ``1`` at
pure noise and ``0`` at clean data, so the networks of [`canonwrap.nn`][canonwrap.nn] and
their time embeddings serve both objectives unchanged.

**Prediction target: the velocity by default.** The network's output is ``v(x_t, t)``,
the velocity of the probability path. Its regression target ``x_1 - x_0`` (CondOT) has the
same scale at every ``t``, so the loss needs no weighting; the ODE uses the output as it
is; and the exact likelihood is the divergence of the network itself.
``prediction="data"`` is the alternative that several molecule flows use (the network
predicts the clean data ``x_1``, the loss is ``|| x_1_hat - x_1 ||^2 / dim(x)``, and the
ODE's velocity is ``path.target_to_velocity(x_1_hat, x_t, t)``, for CondOT
``(x_1_hat - x_t) / (1 - t)``). Its price is that division: the velocity is undefined at
the data end ``t = 1``, so the conversion holds ``t`` at ``1 - DATA_END_GAP`` or less
(fixed-step solvers never evaluate there; adaptive ones do, at their last stage), and
``nll`` needs ``decode_at > 0`` (its default then, for every space). On QM9 (two seeds,
6,687 steps) it made the molecules much worse than velocity prediction (atom stability
27-29 % against 41-53 %; see the QM9 results page): its loss weighs the times near the data
``(1 - t)^2`` less, and that is where a few-step solver takes the prediction as the sample.

**Zero centre of mass.** For point clouds the noise is drawn on the zero-CoM subspace of
each graph (Gaussian noise minus its per-graph mean), and the network's output is projected
onto it, as is the state inside the velocity function; the flow never leaves the subspace
of ``(n - 1) * 3 + n * F`` dimensions that the likelihood counts.

**What is used from ``flow_matching`` and where it does not fit.**
``flow_matching.path.AffineProbPath`` (default ``CondOTProbPath``; any
``flow_matching.path.scheduler`` schedule can be passed) gives ``x_t`` and its velocity.
Its ``sample`` wants one time per row, so for a ragged point-cloud batch it is called per
state component with each node's graph time (rows ``[N, k]``, times ``[N]``).
``flow_matching.solver.ODESolver`` integrates the ODE (``sample``) and the ODE with the
divergence (``compute_likelihood``). Its solvers (``torchdiffeq``) act on one dense tensor
whose first dimension is the sample: the ragged ``Batch`` (``pos [N, 3]``, ``x [N, F]``) is
packed into ``[B, n_max * (3 + F)]`` with zero padding, and rebuilt inside the velocity
function (the template batch, with ``batch`` and ``ptr``, is kept aside). The padding
entries have zero velocity and do not enter the network, so they add nothing to the
divergence; the state is projected to zero centre of mass before the network sees it,
so the divergence in the packed coordinates is the divergence on the subspace.
``compute_likelihood`` draws its Hutchinson probe with the global RNG (no generator: seed
``torch.manual_seed`` for a reproducible estimate) and in torch's default dtype (so float64
data runs with float64 as the default for the call); it always integrates from time 1,
so the density at an earlier flow time ``T`` (the molecule bound below) runs the solver on
a rescaled clock ``t = T s``.

**Likelihood of discrete features.** A deterministic flow has no decoding step of its own,
so for spaces with discrete parts ([`MoleculeSpace`][canonwrap.molecules.MoleculeSpace]:
one-hot atom types and integer charges, relaxed to continuous features) ``nll`` is the
variational bound of VDM/EDM with the diffusion part replaced by the flow's exact density:
the data is noised by the path's own conditional to ``z`` at flow time ``1 - decode_at``,
``z`` is scored exactly by the ODE, and the same decoder as
[`CanonicalizedDiffusion.nll`][canonwrap.diffusion.CanonicalizedDiffusion.nll]'s
reconstruction term (EDM's discretized likelihood for types and charges, a Gaussian for
positions) scores the data given ``z``, plus ``-log p(N)``; the two NLLs then count the same
subspace, features and size. Continuous tensors and point clouds get the exact density.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from flow_matching.path import AffineProbPath, CondOTProbPath
from flow_matching.solver import ODESolver
from torch import Tensor, nn

from canonwrap._couplings import AlignedPrior
from canonwrap._wrapper import CanonicalizedModel, _all_finite
from canonwrap.canonicalizers.base import Canonicalizer
from canonwrap.diffusion import LossOutput, _check_clip
from canonwrap.pointclouds import graph_index, is_point_cloud, nodes_per_graph
from canonwrap.spaces import PointCloudSpace, Space, State, TensorSpace

__all__ = [
    "CanonicalizedFlowMatching",
    "FlowNLLOutput",
    "AlignedPrior",
    "FIXED_STEP_METHODS",
    "STOCHASTIC_METHODS",
    "PREDICTIONS",
    "DATA_END_GAP",
]

PREDICTIONS = ("velocity", "data")
"""What the network of a [`CanonicalizedFlowMatching`][canonwrap.flow.CanonicalizedFlowMatching]
predicts: the path's velocity (default) or the clean data ``x_1``."""

DATA_END_GAP = 1e-3
"""With ``prediction="data"``, the velocity ``(x_1_hat - x_t) / (1 - t)`` (CondOT) is
computed with ``t`` held at ``1 - DATA_END_GAP`` or less; the network still sees the true
``t``."""

FIXED_STEP_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4")
"""``torchdiffeq`` methods run on a grid of ``steps`` equal steps; the others (``dopri5``,
``dopri8``, ``bosh3``, ``adaptive_heun``, ``fehlberg2``) choose their steps from ``atol`` and
``rtol``."""

STOCHASTIC_METHODS = ("euler_maruyama",)
"""Samplers of an SDE with the flow's marginals (canonwrap's own, not ``torchdiffeq``), run on
a grid of ``steps`` steps like the fixed-step ODE methods; see ``noise_scale`` of
[`CanonicalizedFlowMatching.sample`][canonwrap.flow.CanonicalizedFlowMatching.sample]. On QM9
(two seeds, 6,687 training steps) it gave worse molecules than the ODE at every noise scale
tried (0.1-1; see the QM9 results page)."""

DEFAULT_NOISE_SCALE = 1.0
"""``noise_scale`` of a stochastic method when none is given."""

_STEPPED = FIXED_STEP_METHODS + STOCHASTIC_METHODS


@dataclass
class FlowNLLOutput:
    """Exact ``-log p(x)`` per sample through the ODE, in nats (``[B]`` each).

    ``nll = flow + dequantization + reconstruction + size``. Continuous data: ``flow =
    -log p_1(c(x))``, the exact density of the canonical pose's state on its subspace (change
    of variables along the ODE), the next two terms zero. Spaces with discrete parts (see
    [`CanonicalizedFlowMatching.nll`][canonwrap.flow.CanonicalizedFlowMatching.nll]):
    ``flow = -log p_T(z)`` at ``T = 1 - decode_at``, ``dequantization = log q(z | x)`` (its
    expectation) and ``reconstruction = -log p(x | z)``, a bound. ``size = -log p(N)`` (zero
    without ``node_counts``); ``dims`` is the subspace dimension.
    """

    nll: Tensor
    flow: Tensor
    dequantization: Tensor
    reconstruction: Tensor
    size: Tensor
    dims: Tensor


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Run with ``dtype`` as torch's default floating-point type, then restore it.

    ``flow_matching`` 1.0.10's ``compute_likelihood`` builds its Hutchinson probe and the
    initial log-determinant in the default type: without this, float64 data fails there.
    """
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _check_grid_power(power: Any, method: str) -> float:
    """``grid_power`` of ``sample`` as a float (finite, positive; 1 for adaptive methods)."""
    try:
        value = float(power)
    except (TypeError, ValueError):
        raise ValueError(f"grid_power must be a positive number; got {power!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"grid_power must be finite and > 0; got {power!r}")
    if value != 1.0 and method not in _STEPPED:
        raise ValueError(
            f"grid_power={power!r} spaces the steps of a fixed-step method "
            f"({', '.join(_STEPPED)}); the adaptive {method!r} chooses its own steps"
        )
    return value


def _check_noise_scale(noise_scale: Any, method: str) -> float:
    """``noise_scale`` of ``sample``: ``0`` for ODE methods, finite and ``>= 0`` for SDE ones."""
    if method not in STOCHASTIC_METHODS:
        if noise_scale is not None:
            raise ValueError(
                f"noise_scale={noise_scale!r} is the noise of a stochastic sampler "
                f"({', '.join(STOCHASTIC_METHODS)}); the ODE method {method!r} adds none"
            )
        return 0.0
    if noise_scale is None:
        return DEFAULT_NOISE_SCALE
    try:
        value = float(noise_scale)
    except (TypeError, ValueError):
        raise ValueError(f"noise_scale must be a number >= 0; got {noise_scale!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"noise_scale must be finite and >= 0; got {noise_scale!r}")
    return value


def _draw_times(dist: torch.distributions.Distribution, b: int, generator) -> Tensor:
    """``b`` draws of ``dist``; reproducible from ``generator`` when one is given.

    ``torch.distributions`` take no generator, so with one the draw runs under a forked
    RNG seeded from the generator (the global RNG is left as it was).
    """
    if generator is None:
        return dist.sample((b,))
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return dist.sample((b,))


def _check_times(t: Tensor, dist: torch.distributions.Distribution) -> None:
    """``ValueError`` unless every training time is finite and in ``[0, 1]``."""
    bad = ~(torch.isfinite(t) & (t >= 0) & (t <= 1))
    if bool(bad.any()):
        raise ValueError(
            f"time_distribution {dist!r} drew training times outside [0, 1] "
            f"(e.g. {float(t[bad][0]):.4g}); flow times run from 0 (noise) to 1 (data)"
        )


def _check_time_distribution(dist: Any) -> torch.distributions.Distribution | None:
    """The checked ``time_distribution``: ``None`` or a scalar distribution on ``[0, 1]``."""
    if dist is None:
        return None
    if not isinstance(dist, torch.distributions.Distribution):
        raise TypeError(
            "time_distribution must be None (uniform) or a torch.distributions.Distribution; "
            f"got {type(dist).__name__}"
        )
    if tuple(dist.batch_shape) != () or tuple(dist.event_shape) != ():
        raise ValueError(
            "time_distribution must draw one scalar time per sample; got batch_shape "
            f"{tuple(dist.batch_shape)} and event_shape {tuple(dist.event_shape)}"
        )
    with torch.random.fork_rng(devices=[]):  # a trial draw that leaves the RNG alone
        torch.manual_seed(0)
        _check_times(dist.sample((1024,)), dist)
    return dist


class _Packer:
    """A state of a batch as one dense tensor ``[B, D_max]`` for the ODE solvers, and back.

    Tensors: ``x.reshape(B, -1)``. Point clouds: the rows ``[pos, x]`` of each graph, zero
    padded to the largest graph (``n_max * (3 + F)`` per sample).
    """

    def __init__(self, space: Space, template: Any, like: State) -> None:
        self.widths = [int(c.shape[-1]) for c in like]
        self.b = space.num_samples(template)
        if isinstance(space, TensorSpace):
            self.shape = like[0].shape
            self.rows = None
        elif isinstance(space, PointCloudSpace):
            batch = graph_index(template)
            counts = nodes_per_graph(template).to(batch.device)
            start = torch.cumsum(counts, 0) - counts
            self.rows = (batch, torch.arange(batch.numel(), device=batch.device) - start[batch])
            self.n_max = int(counts.max())
        else:
            raise NotImplementedError(
                f"CanonicalizedFlowMatching integrates TensorSpace and PointCloudSpace states; "
                f"got {type(space).__name__}"
            )

    def pack(self, state: State) -> Tensor:
        if self.rows is None:
            return state[0].reshape(self.b, -1)
        rows = torch.cat(state, -1)
        dense = rows.new_zeros(self.b, self.n_max, rows.shape[-1])
        dense = dense.index_put(self.rows, rows)
        return dense.reshape(self.b, -1)

    def unpack(self, flat: Tensor) -> State:
        if self.rows is None:
            return (flat.reshape(self.shape),)
        rows = flat.reshape(self.b, self.n_max, -1)[self.rows]
        return tuple(torch.split(rows, self.widths, -1))


class CanonicalizedFlowMatching(CanonicalizedModel):
    """Wrap any network ``v(z_t, t)`` with a canonicalizer and train it by flow matching.

    See the module notes for the time convention, why the network predicts the velocity,
    and how the ragged point-cloud state meets ``flow_matching``'s solvers.

    Parameters
    ----------
    denoiser
        Any module called as ``denoiser(z_t, s)`` with ``z_t`` in the data's layout and
        ``s = 1 - t [B]`` (``1``: noise, ``0``: data, as for diffusion); returns the
        velocity ``dx_t/dt`` (or, with ``prediction="data"``, the clean data ``x_1``) in the
        same layout (point clouds: one tensor ``[N, 3 + F]`` or a pair ``(v_pos, v_x)``).
    canonicalizer
        A [`Canonicalizer`][canonwrap.canonicalizers.Canonicalizer]; ``None`` means no
        canonicalization (point clouds are still centred).
    path
        A ``flow_matching.path.AffineProbPath``; default ``CondOTProbPath()``
        (``x_t = t x_1 + (1 - t) x_0``). Other schedules:
        ``AffineProbPath(scheduler=CosineScheduler())`` and the like.
    space
        How the data is laid out; default chosen from the data (point cloud or tensor).
    coupling
        How noise is paired with data in training: ``None`` draws them independently; an
        [`AlignedPrior`][canonwrap.flow.AlignedPrior] (or any callable
        ``coupling(x0, x1, space, template) -> x0``, states of ``space``) moves each noise
        sample towards its canonical data before interpolating (no gradient flows through
        the pairing). Sampling always starts from ``N(0, I)``.
    canonical_noise
        Put every noise sample in its canonical pose with the model's canonicalizer
        (without gradient), in training and in sampling alike: the flow then runs between
        canonical noise and canonical data, and the start distribution stays the one the
        sampler draws from (unlike a data-dependent ``coupling``). The density of such a
        model lives on the canonical poses only, so ``nll`` refuses it.
    time_distribution
        The density of the training times ``t`` (0: noise, 1: data): ``None`` (default)
        for ``U(0, 1)``, or any scalar ``torch.distributions.Distribution`` whose samples lie
        in ``[0, 1]``, e.g. ``Beta(2.0, 1.0)`` (density ``2 t``: twice as many draws near
        the data as near the noise) or a logit-normal
        (``TransformedDistribution(Normal(0.0, 1.0), SigmoidTransform())``). It changes
        which times the regression sees most, not the path, the sampler or the likelihood.
        With a ``generator``, draws are reproducible (the distribution samples under a
        forked RNG seeded from it); without one they come from torch's global RNG.
    prediction
        What the network predicts, one of [`PREDICTIONS`][canonwrap.flow.PREDICTIONS]:
        ``"velocity"`` (default; the loss is the velocity's squared error) or ``"data"``
        (the clean data ``x_1``; the loss is its squared error, on the CondOT path the
        velocity's squared error times ``(1 - t)^2``, so times near the data weigh less;
        the velocity is derived from it, see the module notes). The held-out losses of the
        two are not comparable; their likelihoods are.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from canonwrap import CanonicalizedFlowMatching
    >>> class MLP(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = nn.Linear(5, 4)
    ...     def forward(self, z, t):
    ...         return self.net(torch.cat([z, t[:, None]], -1))
    >>> model = CanonicalizedFlowMatching(MLP())
    >>> model.training_loss(torch.randn(8, 4)).loss.shape
    torch.Size([])
    >>> model.sample(2, shape=(4,), steps=5).shape
    torch.Size([2, 4])
    """

    _prediction = "velocity predictions"

    def __init__(
        self,
        denoiser: nn.Module,
        canonicalizer: Canonicalizer | None = None,
        path: AffineProbPath | None = None,
        space: Space | None = None,
        coupling: AlignedPrior | None = None,
        canonical_noise: bool = False,
        time_distribution: torch.distributions.Distribution | None = None,
        prediction: str = "velocity",
    ) -> None:
        super().__init__(denoiser, canonicalizer, space)
        if prediction not in PREDICTIONS:
            raise ValueError(
                f"prediction must be one of {', '.join(map(repr, PREDICTIONS))}; got {prediction!r}"
            )
        self.prediction = prediction
        self._prediction = f"{'velocity' if prediction == 'velocity' else 'clean-data'} predictions"
        self.path = path if path is not None else CondOTProbPath()
        self.coupling = coupling
        self.canonical_noise = bool(canonical_noise)
        if not isinstance(self.path, AffineProbPath):
            raise TypeError(
                f"path must be a flow_matching.path.AffineProbPath; got {type(self.path).__name__}"
            )
        self.time_distribution = _check_time_distribution(time_distribution)

    # ------------------------------------------------------------------ helpers
    def _at_times(self, shown: list) -> str:
        return f" at flow time(s) t = {shown} (0: noise, 1: data)"

    def _predict(self, space: Space, z: State, template: Any, t: Tensor) -> tuple[State, State]:
        """``(z, output)``: the state on the subspace and the network's raw output at ``t``."""
        z = space.project(z, template)
        return z, self._call_denoiser(space, z, template, 1 - t.to(z[0].dtype))

    def _to_velocity(self, space: Space, z: State, x1_hat: State, t: Tensor, template: Any):
        """The path's velocity at ``z`` for a clean-data prediction (``t`` held off 1)."""
        x1_hat = space.project(x1_hat, template)
        held = t.to(z[0].dtype).clamp(max=1.0 - DATA_END_GAP)
        rows = space.expand(held, z, template)
        return tuple(self.path.target_to_velocity(a, b, r) for a, b, r in zip(x1_hat, z, rows))

    def _velocity(self, space: Space, z: State, template: Any, t: Tensor) -> State:
        """The network's velocity at flow times ``t [B]`` on the data's subspace."""
        z, out = self._predict(space, z, template, t)
        if self.prediction == "velocity":
            return out
        return self._to_velocity(space, z, out, t, template)

    def _noise(self, space: Space, like: State, template: Any, generator) -> State:
        """Gaussian noise on the subspace, in canonical pose if ``canonical_noise``."""
        x0 = space.noise(like, template, generator)
        if not self.canonical_noise:
            return x0
        with torch.no_grad():
            canon = self.canonicalizer(space.to_data(x0, template)).canonical
        return tuple(c.detach() for c in space.state(canon))

    def _training_times(self, b: int, generator, like: Tensor) -> Tensor:
        """``b`` training times from ``time_distribution`` (``U(0, 1)`` without one)."""
        if self.time_distribution is None:
            return torch.rand(b, generator=generator, dtype=like.dtype).to(like.device)
        t = _draw_times(self.time_distribution, b, generator)
        _check_times(t, self.time_distribution)
        return t.to(dtype=like.dtype, device=like.device)

    def _interpolate(self, space: Space, x0: State, x1: State, t: Tensor, template: Any):
        """``x_t`` and its velocity ``dx_t`` by the path, one time per row of each component."""
        per_row = space.expand(t, x1, template)
        xt, dxt = [], []
        for a, b, r in zip(x0, x1, per_row):
            out = self.path.sample(x_0=a, x_1=b, t=r.reshape(r.shape[0]))
            xt.append(out.x_t)
            dxt.append(out.dx_t)
        return tuple(xt), tuple(dxt)

    def _solver(
        self,
        space: Space,
        template: Any,
        packer: _Packer,
        bad: list,
        end: float = 1.0,
        clip: tuple[float, float] | None = None,
    ) -> ODESolver:
        """An ``ODESolver`` over packed states; ``bad[0]`` keeps the first non-finite time.

        ``end < 1``: the solver's time ``s`` in ``[0, 1]`` is flow time ``end * s``
        (the velocity is scaled by ``end``), so that ``compute_likelihood``, which
        integrates from ``s = 1``, gives the density at flow time ``end``.

        ``torchdiffeq``'s adaptive methods (``dopri5``, ...) step past the end of the
        interval and interpolate back, so the solver's time is clamped to ``[0, 1]``: the
        network is never called outside its path's times (the networks of
        [`canonwrap.nn`][canonwrap.nn] refuse times outside ``[0, 1]``); past an end the
        velocity field is continued by its value at that end.

        ``clip = (low, high)``: the data predicted from each velocity,
        ``x_1 = path.velocity_to_target(v, x_t, t)``, is clamped to the range and the
        velocity recomputed from it (where the path's ``sigma_t > 0``; at ``t = 1`` the
        velocity is left as predicted).
        """
        return ODESolver(
            velocity_model=self._packed_velocity(space, template, packer, bad, end, clip)
        )

    def _packed_velocity(self, space, template, packer: _Packer, bad: list, end=1.0, clip=None):
        """The velocity as a function of the packed state and the solver's time (see
        ``_solver``), recording the first flow time of a non-finite velocity in ``bad``."""
        b = packer.b

        def velocity(x: Tensor, t: Tensor) -> Tensor:  # t: the solver's time
            flow_t = end * t.to(x).clamp(0.0, 1.0)
            state = packer.unpack(x)
            v = self._velocity(space, state, template, flow_t.expand(b))
            found = (bad[0] < 0) & ~_all_finite(v)
            bad[0] = torch.where(found, flow_t.to(bad[0]), bad[0])
            if clip is not None:
                v = self._clipped_velocity(space, state, v, flow_t, template, clip)
            return end * packer.pack(v)

        return velocity

    def _euler_maruyama(
        self, velocity, x: Tensor, grid: Tensor, noise_scale: float, draw_noise
    ) -> Tensor:
        """Euler-Maruyama on ``dx = (v - noise_scale * eps_hat) dt + sqrt(2 noise_scale
        sigma_t) dW`` over ``grid``, the last step without noise (see ``sample``)."""
        last = len(grid) - 2
        for i in range(last + 1):
            t, h = grid[i], grid[i + 1] - grid[i]
            v = velocity(x, t)
            if i == last or noise_scale == 0.0:
                x = x + h * v
                continue
            eps_hat = self.path.velocity_to_epsilon(v, x, t)
            sigma = self.path.scheduler(t).sigma_t
            x = x + h * (v - noise_scale * eps_hat)
            x = x + torch.sqrt(2.0 * noise_scale * sigma * h) * draw_noise()
        return x

    def _clipped_velocity(
        self, space: Space, x: State, v: State, t: Tensor, template: Any, clip
    ) -> State:
        """The velocity whose predicted data ``x_1`` lies in ``clip`` (tensor data)."""
        low, high = clip
        t = t.expand(space.num_samples(template))
        if self.prediction == "data":  # the times its velocity came from: x_1 is the network's
            t = t.clamp(max=1.0 - DATA_END_GAP)
        sigma = self.path.scheduler(t).sigma_t
        out = []
        for xi, vi, ti, si in zip(
            x, v, space.expand(t, x, template), space.expand(sigma, x, template)
        ):
            target = self.path.velocity_to_target(vi, xi, ti).clamp(low, high)
            clipped = self.path.target_to_velocity(target, xi, ti.clamp(max=1.0 - 1e-12))
            out.append(torch.where(si > 0, clipped, vi))
        return tuple(out)

    def _raise_if_denoiser_failed(self, who: str, bad: list, cause: Exception | None = None):
        """``FloatingPointError`` naming the first flow time of a non-finite velocity, if any."""
        if float(bad[0]) < 0:
            return
        raise FloatingPointError(
            f"{who}: the denoiser ({type(self.denoiser).__name__}) returned non-finite "
            f"(NaN/Inf) velocity predictions, first at flow time t = {float(bad[0]):.4g} "
            "(0: noise, 1: data)"
        ) from cause

    @staticmethod
    def _grid(method: str, steps: int, start: float, end: float, like: Tensor, power: float = 1.0):
        """``(step_size, time_grid)`` for ``ODESolver``: ``steps`` steps or adaptive.

        Fixed steps: ``t_i = start + (end - start) * (1 - (1 - i / steps) ** power)``,
        equal steps for ``power = 1``, steps that shrink towards ``end`` for ``power > 1``.
        """
        if method in _STEPPED:
            if int(steps) < 1:
                raise ValueError(f"steps must be >= 1 for method={method!r}; got {steps}")
            u = torch.linspace(0.0, 1.0, int(steps) + 1, dtype=torch.float64)
            u = 1.0 - (1.0 - u) ** power if power != 1.0 else u
            grid = (start + (end - start) * u).to(like.dtype)
        else:
            grid = torch.tensor([start, end], dtype=like.dtype)
        return None, grid.to(like.device)

    # ------------------------------------------------------------------ public API
    def training_loss(self, data: Any, generator: torch.Generator | None = None) -> LossOutput:
        """Conditional flow matching on the canonical pose (gradients reach both networks).

        ``t ~ U(0, 1)`` (or the model's ``time_distribution``), ``x_0`` Gaussian noise on
        the data's subspace (re-paired by ``coupling`` if the model has one), ``x_t`` and
        the target velocity from ``path``; the loss is the squared error per dimension of the
        predicted velocity (of the predicted clean data ``x_1`` with ``prediction="data"``;
        ``per_sample``, averaged as ``denoising``) plus the canonicalizer's prior loss.

        Parameters
        ----------
        data
            A batch (tensor ``[B, ...]`` or point-cloud ``Batch``).
        generator
            Optional generator for ``t`` and ``x_0`` (on the data's device or CPU).

        Returns
        -------
        LossOutput
            As for diffusion; ``t`` holds the flow times ``[B]`` (0: noise, 1: data).

        Raises
        ------
        FloatingPointError
            When the loss is not finite; the message names the canonicalizer, the
            denoiser (with the samples and flow times) or an overflow, as
            [`CanonicalizedDiffusion.training_loss`][canonwrap.diffusion.CanonicalizedDiffusion.training_loss]
            does.
        """
        space = self._checked_space(data, record=True)  # before the canonicalizer sees it
        canon = self.canonicalizer(data)
        x1 = space.state(canon.canonical)
        template = canon.canonical
        b = space.num_samples(template)
        t = self._training_times(b, generator, x1[0])
        x0 = self._noise(space, x1, template, generator)
        if self.coupling is not None:
            with torch.no_grad():
                x0 = self.coupling(x0, tuple(c.detach() for c in x1), space, template)
        xt, target = self._interpolate(space, x0, x1, t, template)
        if self.prediction == "data":
            _, x1_hat = self._predict(space, xt, template, t)
            x1_hat = space.project(x1_hat, template)
            return self._regression_loss(data, space, canon, x1, x1, x1_hat, t)
        v_hat = self._velocity(space, xt, template, t)
        return self._regression_loss(data, space, canon, x1, target, v_hat, t)

    def forward(self, data: Any, generator: torch.Generator | None = None) -> LossOutput:
        """The training loss: the same as
        [`training_loss`][canonwrap.flow.CanonicalizedFlowMatching.training_loss]
        (so that ``DistributedDataParallel`` sees the computation through ``ddp(batch)``).
        """
        return self.training_loss(data, generator)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int | None = None,
        *,
        shape: tuple[int, ...] | None = None,
        num_nodes: Any = None,
        method: str = "euler",
        steps: int = 100,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        generator: torch.Generator | None = None,
        randomize_pose: bool = False,
        dtype: torch.dtype | None = None,
        device: Any = None,
        max_graph_bytes: float | None = None,
        clip_denoised: tuple[float, float] | None = None,
        grid_power: float = 1.0,
        noise_scale: float | None = None,
    ) -> Any:
        """Draw samples by integrating the learned velocity from noise (``t = 0``) to data.

        The ODE ``dx = v dt`` by ``flow_matching``'s solver, or, with
        ``method="euler_maruyama"``, an SDE with the same marginals: with the path's
        ``x_t = alpha_t x_1 + sigma_t x_0``, the score is ``-eps_hat / sigma_t`` where
        ``eps_hat = E[x_0 | x_t]`` follows from the velocity (``path.velocity_to_epsilon``),
        and for any ``g_t`` the SDE ``dx = (v + g_t^2 / 2 * score) dt + g_t dW`` keeps the
        marginals of the ODE. canonwrap takes ``g_t^2 = 2 * noise_scale * sigma_t``, so the
        drift is ``v - noise_scale * eps_hat`` and the noise vanishes at the data end; the
        last step adds no noise. Fresh noise (on the data's subspace) re-randomises the state
        at every step, which can correct the errors of earlier steps when the score is
        accurate (ancestral sampling's argument for diffusion); ``noise_scale = 0`` is the
        Euler ODE.

        Parameters
        ----------
        num_samples
            Number of samples ``B``. For point clouds whose space has ``node_counts``, the
            size of each sample is drawn from it (``num_nodes`` not needed).
        shape
            For tensors: ``shape`` of one sample (``num_samples`` of them) or of the batch.
        num_nodes
            For point clouds: number of nodes of each sample (sequence or tensor ``[B]``).
        method
            A ``torchdiffeq`` method run by ``flow_matching``'s ``ODESolver``: one of
            [`FIXED_STEP_METHODS`][canonwrap.flow.FIXED_STEP_METHODS] (``steps`` equal
            steps) or an adaptive one such as ``"dopri5"``; or ``"euler_maruyama"`` (the
            SDE above, ``steps`` network calls).
        steps
            Number of steps of a fixed-step method (Euler: ``steps`` network calls,
            midpoint: ``2 * steps``).
        atol
            Absolute tolerance of an adaptive method.
        rtol
            Relative tolerance of an adaptive method.
        generator
            Seeds the noise (and the random pose).
        randomize_pose
            Apply a Haar-random element of the canonicalizer's group to each sample (see
            [`CanonicalizedDiffusion.sample`][canonwrap.diffusion.CanonicalizedDiffusion.sample]).
        dtype
            Floating-point type of the samples; default the model parameters' type.
        device
            Default the device of the model's parameters (CPU without parameters).
        max_graph_bytes
            Point clouds: the memory limit of the fully connected graphs of one call, as
            for diffusion's ``sample``.
        clip_denoised
            Tensor data in a known range (images in ``[-1, 1]``): ``(low, high)``. At every
            network call the data predicted from the velocity
            (``x_1 = x_t + (1 - t) v`` on the CondOT path) is clamped to the range and the
            velocity recomputed from it, and the samples are clamped at the end (as
            ``clip_denoised`` of
            [`CanonicalizedDiffusion.sample`][canonwrap.diffusion.CanonicalizedDiffusion.sample]).
            ``None`` (default): no clipping. Point clouds are refused.
        grid_power
            Spacing of a fixed-step method's grid: the times are
            ``t_i = 1 - (1 - i / steps) ** grid_power``. ``1`` (default): equal steps;
            ``> 1``: steps that shrink towards the data end (``grid_power = 2`` with 10
            steps: the first step is 0.19 long, the last 0.01), where the CondOT velocity of
            a finely structured distribution changes fastest; ``< 1``: the reverse. Adaptive
            methods choose their own steps and refuse any other value than 1.
        noise_scale
            ``method="euler_maruyama"`` only: the noise ``g_t^2 = 2 * noise_scale * sigma_t``
            of the SDE (default 1; 0 gives the Euler ODE). Larger values re-randomise more
            per step and need more steps to keep the discretisation error small.

        Returns
        -------
        Tensor or Batch
            Samples in the data layout (point clouds: zero centre of mass per graph).

        Raises
        ------
        ValueError
            For sizes or shapes that cannot be sampled, graphs beyond ``max_graph_bytes``,
            or a ``clip_denoised`` that is no finite ``(low, high)`` with ``low < high`` (or
            is given for point clouds), or a ``grid_power`` that is not a finite positive
            number (or is not 1 for an adaptive method), or a ``noise_scale`` that is not a
            finite number ``>= 0``, given for an ODE method, or asked of a model with
            ``canonical_noise=True`` (its noise is no Gaussian, so the score identity does
            not hold).
        FloatingPointError
            When the network returned NaN/Inf (the first flow time is named) or the
            solver's state overflowed although every prediction was finite.
        """
        device = self._sample_device(device)
        dtype = dtype if dtype is not None else self._default_dtype()
        space, template = self._sampling_template(
            num_samples, shape, num_nodes, generator, dtype, device, max_graph_bytes
        )
        clip = _check_clip(clip_denoised, space)
        power = _check_grid_power(grid_power, method)
        noise = _check_noise_scale(noise_scale, method)
        if method in STOCHASTIC_METHODS and self.canonical_noise:
            raise ValueError(
                f"method={method!r} needs the score of a Gaussian start; a model with "
                "canonical_noise=True starts from canonical poses of the noise: use an ODE method"
            )
        b = space.num_samples(template)
        like = space.state(template)
        packer = _Packer(space, template, like)
        x0 = packer.pack(self._noise(space, like, template, generator))
        bad = [torch.full((), -1.0, dtype=dtype, device=device)]
        step_size, grid = self._grid(method, steps, 0.0, 1.0, x0, power)
        try:
            if method in STOCHASTIC_METHODS:
                velocity = self._packed_velocity(space, template, packer, bad, clip=clip)
                x1 = self._euler_maruyama(
                    velocity,
                    x0,
                    grid,
                    noise,
                    lambda: packer.pack(space.noise(like, template, generator)),
                )
            else:
                x1 = self._solver(space, template, packer, bad, clip=clip).sample(
                    x_init=x0,
                    step_size=step_size,
                    method=method,
                    atol=atol,
                    rtol=rtol,
                    time_grid=grid,
                )
        except AssertionError as err:  # an adaptive step shrank to nothing on NaN/Inf
            self._raise_if_denoiser_failed("sample", bad, err)
            raise
        self._raise_if_denoiser_failed("sample", bad)
        x = space.project(packer.unpack(x1), template)
        if clip is not None:
            x = tuple(xi.clamp(*clip) for xi in x)
        if not bool(_all_finite(x)):
            raise FloatingPointError(
                f"sample: the samples contain NaN/Inf although the denoiser's predictions were "
                f"finite at every step: the {method!r} solver overflowed {dtype}"
            )
        out = space.to_data(x, template)
        return self._posed(out, b, randomize_pose, generator, dtype, device)

    def nll(
        self,
        data: Any,
        *,
        method: str = "dopri5",
        steps: int = 100,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        exact_divergence: bool | None = None,
        decode_at: float | None = None,
        generator: torch.Generator | None = None,
    ) -> FlowNLLOutput:
        """``-log p(x)`` in nats per sample by the instantaneous change of variables.

        The canonical pose ``x_1 = c(x)`` is carried back to noise by the ODE while
        ``int div v(x_t, t) dt`` is accumulated (``flow_matching``'s
        ``ODESolver.compute_likelihood``); then
        ``log p_1(x_1) = log N(x_0; 0, I) - int_0^1 div v dt``, on the data's subspace
        (point clouds: ``(n - 1) * 3 + n * F`` dimensions, the same count as
        [`CanonicalizedDiffusion.nll`][canonwrap.diffusion.CanonicalizedDiffusion.nll]).
        As for diffusion, a canonicalized model's density is that of canonical poses.

        Spaces with discrete parts ([`MoleculeSpace`][canonwrap.molecules.MoleculeSpace])
        get a variational bound with the diffusion NLL's decoder instead: at flow time
        ``T = 1 - decode_at``, ``z = alpha_T x_1 + sigma_T eps`` (the path's own
        conditional), and
        ``nll = -log p_T(z) + log q(z | x) - log p(x | z) - log p(N)``, where ``p_T`` is
        the flow's exact density at ``T`` (ODE from ``T`` to 0), ``E log q(z | x) =
        -d/2 (1 + log 2 pi sigma_T^2)`` and ``p(x | z)`` is the space's decoder
        (``reconstruction_nll``, EDM's discretized one for atom types and charges) at
        ``gamma_0 = log(sigma_T^2 / alpha_T^2)``, with the noise predicted from the
        network's velocity. One draw of ``eps`` per sample.

        Parameters
        ----------
        data
            A batch (tensor ``[B, ...]`` or point-cloud ``Batch``).
        method
            ``torchdiffeq`` method (adaptive ``"dopri5"`` by default).
        steps
            Number of steps of a fixed-step method.
        atol
            Absolute tolerance of an adaptive method.
        rtol
            Relative tolerance of an adaptive method.
        exact_divergence
            ``True``: the divergence by one backward pass per dimension (exact);
            ``False``: Hutchinson's estimator with one Rademacher probe (unbiased, drawn
            from the global RNG); ``None``: exact up to 64 packed dimensions per sample.
        decode_at
            Flow-time distance ``1 - T`` from the data at which the decoder takes over;
            default ``1e-3`` for spaces with discrete parts and ``0`` (the exact density of
            continuous data, no decoder) otherwise. A model with ``prediction="data"``
            needs ``decode_at > 0`` for every space (its velocity is undefined at ``T = 1``)
            and defaults to ``1e-3``: for continuous data the result is then the bound
            with the Gaussian decoder.
        generator
            Optional generator for ``eps`` (``decode_at > 0`` only).

        Returns
        -------
        FlowNLLOutput
            ``nll = flow + dequantization + reconstruction + size`` per sample.

        Raises
        ------
        ValueError
            When the space has ``node_counts`` and a sample's size has probability zero, or
            ``decode_at`` is outside ``[0, 1)`` (or zero for a space with discrete parts or
            a model with ``prediction="data"``).
        NotImplementedError
            For a model with ``canonical_noise=True`` (see the class parameters).
        FloatingPointError
            When the result is not finite, naming the culprit.
        """
        space = self._checked_space(data)
        if self.canonical_noise:
            raise NotImplementedError(
                "CanonicalizedFlowMatching.nll: with canonical_noise=True the flow starts from "
                "canonical poses of the noise, whose density lives on the canonical poses only "
                "(not on the data's subspace); train with canonical_noise=False for a likelihood"
            )
        discrete = type(space).reconstruction_nll is not Space.reconstruction_nll
        needs_gap = discrete or self.prediction == "data"
        gap = (1e-3 if needs_gap else 0.0) if decode_at is None else float(decode_at)
        if not 0.0 <= gap < 1.0 or (needs_gap and gap == 0.0):
            why = (
                f"{type(space).__name__}, whose discrete parts need the decoder"
                if discrete
                else "prediction='data', whose velocity is undefined at the data end"
            )
            raise ValueError(f"decode_at must be in [0, 1) (and > 0 for {why}); got {decode_at}")
        counts = getattr(space, "node_counts", None)
        if counts is not None and is_point_cloud(data):
            counts.check_support(nodes_per_graph(data), "nll")
        with torch.no_grad():
            canon = self.canonicalizer(data)
        template = canon.canonical
        x1 = space.state(template)
        dtype, device = x1[0].dtype, x1[0].device
        dims = space.dims(template).to(device=device, dtype=dtype)
        # a non-finite canonical pose is named before the solver trips over it
        total = space.sum_per_sample(x1, template)
        self._require_finite("nll", "the state", total, space, data, template, canonical=x1)
        zero = torch.zeros_like(dims)
        dequantization, reconstruction, z = zero, zero, x1
        if gap > 0:
            t_end = torch.full((space.num_samples(template),), 1.0 - gap, dtype=dtype)
            out = self.path.scheduler(t_end.to(device))
            alpha, sigma = out.alpha_t, out.sigma_t
            eps = space.noise(x1, template, generator)
            a_rows = space.expand(alpha, x1, template)
            s_rows = space.expand(sigma, x1, template)
            z = tuple(a * x + s * e for a, x, s, e in zip(a_rows, x1, s_rows, eps))
        flow = self._ode_nll(
            space, data, template, z, dims, 1.0 - gap, method, steps, atol, rtol, exact_divergence
        )
        if gap > 0:
            dequantization = -0.5 * dims * (1 + torch.log(2 * math.pi * sigma**2))
            with torch.no_grad():
                v = self._velocity(space, z, template, t_end.to(device))
            t_rows = space.expand(t_end.to(device), z, template)
            eps_hat = tuple(
                self.path.velocity_to_epsilon(vi, zi, ti) for vi, zi, ti in zip(v, z, t_rows)
            )
            gamma0 = torch.log(sigma**2 / alpha**2)
            reconstruction = space.reconstruction_nll(x1, eps, eps_hat, gamma0, template)
            self._require_finite(
                "nll",
                "the decoder term -log p(x | z)",
                reconstruction,
                space,
                data,
                template,
                eps_hat=v,
                steps=t_end,
            )
        size = space.size_nll(template).to(device=device, dtype=dtype)
        return FlowNLLOutput(
            nll=flow + dequantization + reconstruction + size,
            flow=flow,
            dequantization=dequantization,
            reconstruction=reconstruction,
            size=size,
            dims=dims,
        )

    def _ode_nll(
        self, space, data, template, z, dims, end, method, steps, atol, rtol, exact_divergence
    ) -> Tensor:
        """``-log p_end(z)`` per sample: the flow's density at flow time ``end``."""
        dtype, device = z[0].dtype, z[0].device
        packer = _Packer(space, template, z)
        packed = packer.pack(z)
        if exact_divergence is None:
            exact_divergence = packed.shape[1] <= 64

        def log_p0(x: Tensor) -> Tensor:
            return -0.5 * (x**2).sum(1) - 0.5 * dims * math.log(2 * math.pi)

        bad = [torch.full((), -1.0, dtype=dtype, device=device)]
        step_size, grid = self._grid(method, steps, 1.0, 0.0, packed)
        try:
            with _default_dtype(dtype):
                _, log_p = self._solver(space, template, packer, bad, end).compute_likelihood(
                    x_1=packed,
                    log_p0=log_p0,
                    step_size=step_size,
                    method=method,
                    atol=atol,
                    rtol=rtol,
                    time_grid=grid,
                    exact_divergence=exact_divergence,
                )
        except AssertionError as err:  # an adaptive step shrank to nothing on NaN/Inf
            self._raise_if_denoiser_failed("nll", bad, err)
            raise
        flow = -log_p.to(dtype)
        self._raise_if_denoiser_failed("nll", bad)
        self._require_finite("nll", "-log p(x)", flow, space, data, template, canonical=z)
        return flow
