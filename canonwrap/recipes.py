"""Reference QM9 configurations: the models the QM9 example trains and the benchmarks time.

A model is a denoiser (``"gnn"``: GDM's message passing; ``"egnn"``: EDM's equivariant
network; ``"transformer"``: [`TransformerDenoiser`][canonwrap.nn.TransformerDenoiser]) behind
a canonicalizer (``"com"``: centre of mass only; ``"pca"``: principal axes; ``"egnn"``:
learned multi-channel EGNN; ``"egnn-frozen"``: the same network frozen at its random
initialisation; ``"egnn-anchored"``: the learned EGNN with a prior pulling its frames
towards principal axes, see
[`Anchored`][canonwrap.canonicalizers.anchored.Anchored]).
Library classes take typed objects; this module only turns the example's named choices
into them, so that the example, the benchmarks and the tests build identical models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from canonwrap._wrapper import CanonicalizedModel
from canonwrap.canonicalizers import (
    CenterOfMass,
    EGNNCanonicalizer,
    PCACanonicalizer,
    frozen,
)
from canonwrap.canonicalizers.anchored import Anchored
from canonwrap.canonicalizers.base import Canonicalizer
from canonwrap.diffusion import CanonicalizedDiffusion
from canonwrap.schedules import PolynomialSchedule

__all__ = [
    "DENOISERS",
    "CANONICALIZERS",
    "SHORTHANDS",
    "QM9ModelConfig",
    "qm9_model",
    "qm9_optimizer",
    "canonicalizer_warmup",
    "SIZES",
    "OPTIMIZATION",
    "preset_config",
    "make_sampler",
    "DIFFUSION_SAMPLERS",
    "sampling_options",
    "OBJECTIVES",
    "COUPLINGS",
    "FLOW_TIMES",
    "flow_time_distribution",
]

Denoiser = Literal["gnn", "egnn", "transformer"]
CanonName = Literal["com", "pca", "egnn", "egnn-frozen", "egnn-anchored"]
DENOISERS: tuple[str, ...] = ("gnn", "egnn", "transformer")
CANONICALIZERS: tuple[str, ...] = ("com", "pca", "egnn", "egnn-frozen", "egnn-anchored")
OBJECTIVES: tuple[str, ...] = ("diffusion", "flow")
"""Training objectives: ``"diffusion"``
([`CanonicalizedDiffusion`][canonwrap.diffusion.CanonicalizedDiffusion]) or ``"flow"``
([`CanonicalizedFlowMatching`][canonwrap.flow.CanonicalizedFlowMatching])."""
COUPLINGS: tuple[str, ...] = ("independent", "rotation", "assignment", "rotation+assignment")
"""How flow matching pairs noise with data in training (see
[`AlignedPrior`][canonwrap.flow.AlignedPrior]): ``"independent"`` draws them independently;
``"rotation"`` rotates each noise molecule onto its canonical data (Kabsch);
``"assignment"`` re-labels noise atoms to data atoms by optimal assignment within each
atom type; ``"rotation+assignment"`` does both (assignment first)."""
FLOW_TIMES: tuple[str, ...] = ("uniform", "beta:A,B", "logit-normal:M,S")
"""Forms of a flow-matching training-time density, as ``flow_time_distribution`` reads
them: ``"uniform"`` (``U(0, 1)``), ``"beta:A,B"`` (``Beta(A, B)``, e.g. ``beta:2,1``, density
``2 t``, denser near the data) and ``"logit-normal:M,S"`` (``sigmoid`` of ``N(M, S^2)``)."""
SHORTHANDS: dict[str, tuple[str, str]] = {
    "gdm": ("gnn", "com"),
    "edm": ("egnn", "com"),
    "canon-gdm": ("gnn", "egnn"),
    "canon-frozen-gdm": ("gnn", "egnn-frozen"),
    "pca-gdm": ("gnn", "pca"),
    "transformer": ("transformer", "com"),
    "pca-transformer": ("transformer", "pca"),
    "canon-transformer": ("transformer", "egnn-anchored"),
}
"""The paper's model names (and two transformer ones) as (denoiser, canonicalizer) pairs."""


SIZES: dict[str, dict[str, tuple[int, ...]]] = {
    "full": {
        "gnn": (256, 9, 1),
        "egnn": (256, 9, 1),
        "transformer": (256, 8, 8),
        "canonicalizer": (64, 9),
    },
    "quick": {
        "gnn": (64, 4, 1),
        "egnn": (64, 4, 1),
        "transformer": (128, 4, 4),
        "canonicalizer": (32, 3),
    },
}
"""Denoiser sizes ``(hidden, layers, heads)`` and the learned canonicalizer's
``(hidden, layers)`` per preset. ``full``: EDM's published 256 x 9 for the GNN and EGNN and the
paper's 64 x 9 canonicalizer; the transformer's full size is ours (none is published). ``quick``:
sizes a 2-core CPU trains in minutes."""
OPTIMIZATION: dict[str, dict[str, float]] = {
    "full": {"batch_size": 64, "lr": 1e-4, "canon_lr_ratio": 0.01},
    "quick": {"batch_size": 32, "lr": 5e-4, "canon_lr_ratio": 0.01},
}
"""Batch size, learning rate and the canonicalizer's rate ratio per preset."""


@dataclass
class QM9ModelConfig:
    """Sizes of a QM9 model (defaults: the CPU ``quick`` preset of the QM9 example).

    Attributes
    ----------
    denoiser : str
        One of ``DENOISERS``.
    canonicalizer : str
        One of ``CANONICALIZERS``.
    remove_h : bool
        QM9 without hydrogens (atom types C, N, O, F).
    hidden : int
        Width and depth of the denoiser.
    layers : int
        Width and depth of the denoiser.
    heads : int
        Attention heads (transformer only).
    distance_bias : bool
        Pairwise-distance attention bias (transformer only).
    mlp_ratio : float
        Feed-forward width of the transformer's blocks relative to ``hidden``.
    canon_hidden : int
        Width and depth of the learned EGNN canonicalizer.
    canon_layers : int
        Width and depth of the learned EGNN canonicalizer.
    anchor_weight : float
        Weight of the principal-axes prior (``"egnn-anchored"`` only).
    timesteps : int
        Diffusion steps T of the polynomial schedule (unused by flow matching).
    objective : str
        One of ``OBJECTIVES``: ``"diffusion"`` (default) or ``"flow"`` (flow matching with
        the same denoiser, canonicalizer and molecule space, no noise schedule).
    coupling : str
        Flow matching only: one of ``COUPLINGS``, how noise is paired with data in
        training (default ``"independent"``).
    canonical_noise : bool
        Flow matching only: start the flow from canonical poses of the noise, in training
        and sampling (see
        [`CanonicalizedFlowMatching`][canonwrap.flow.CanonicalizedFlowMatching]; such a
        model has no ``nll``).
    flow_time : str
        Flow matching only: the density of the training times, one of the forms of
        ``FLOW_TIMES`` (default ``"uniform"``; see ``flow_time_distribution``).
    flow_prediction : str
        Flow matching only: what the network predicts, one of
        [`PREDICTIONS`][canonwrap.flow.PREDICTIONS] (default ``"velocity"``).
    """

    denoiser: str = "transformer"
    canonicalizer: str = "pca"
    remove_h: bool = False
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    distance_bias: bool = True
    mlp_ratio: float = 4.0
    canon_hidden: int = 32
    canon_layers: int = 3
    anchor_weight: float = 0.1
    timesteps: int = 1000
    objective: str = "diffusion"
    coupling: str = "independent"
    canonical_noise: bool = False
    flow_time: str = "uniform"
    flow_prediction: str = "velocity"


def flow_time_distribution(spec: str) -> torch.distributions.Distribution | None:
    """The training-time density that ``spec`` names (``None`` for ``"uniform"``).

    Parameters
    ----------
    spec : str
        ``"uniform"``, ``"beta:A,B"`` (``A, B > 0``) or ``"logit-normal:M,S"`` (``S > 0``),
        the forms of ``FLOW_TIMES``.

    Returns
    -------
    torch.distributions.Distribution or None
        For ``CanonicalizedFlowMatching(time_distribution=...)``.

    Raises
    ------
    ValueError
        For any other form, or parameters that are not finite numbers in range.
    """
    forms = ", ".join(FLOW_TIMES)
    if not isinstance(spec, str):
        raise ValueError(f"flow time must be a string of one of the forms {forms}; got {spec!r}")
    if spec == "uniform":
        return None
    name, sep, rest = spec.partition(":")
    if not sep or name not in ("beta", "logit-normal"):
        raise ValueError(f"unknown flow time {spec!r}; use one of the forms {forms}")
    try:
        a, b = (float(v) for v in rest.split(","))
    except ValueError:
        raise ValueError(
            f"flow time {spec!r}: give two numbers after the colon, as in beta:2,1 or "
            "logit-normal:0,1"
        ) from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"flow time {spec!r}: its parameters must be finite")
    if name == "beta":
        if a <= 0 or b <= 0:
            raise ValueError(f"flow time {spec!r}: Beta's parameters must both be > 0")
        return torch.distributions.Beta(torch.tensor(a), torch.tensor(b))
    if b <= 0:
        raise ValueError(f"flow time {spec!r}: the logit-normal's scale S must be > 0")
    return torch.distributions.TransformedDistribution(
        torch.distributions.Normal(torch.tensor(a), torch.tensor(b)),
        torch.distributions.transforms.SigmoidTransform(),
    )


def preset_config(
    preset: str, denoiser: str, canonicalizer: str, remove_h: bool = False
) -> QM9ModelConfig:
    """The model description of ``denoiser`` behind ``canonicalizer`` at a preset's sizes."""
    if preset not in SIZES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(SIZES)}")
    if denoiser not in DENOISERS:
        raise ValueError(f"unknown denoiser {denoiser!r}; choose one of {', '.join(DENOISERS)}")
    hidden, layers, heads = SIZES[preset][denoiser]
    canon_hidden, canon_layers = SIZES[preset]["canonicalizer"]
    return QM9ModelConfig(
        denoiser=denoiser,
        canonicalizer=canonicalizer,
        remove_h=remove_h,
        hidden=hidden,
        layers=layers,
        heads=heads,
        canon_hidden=canon_hidden,
        canon_layers=canon_layers,
    )


def make_sampler(name: str, steps: int | None = None):
    """``"ancestral"`` (all T steps unless ``steps``), ``"ddim"`` (50) or ``"dpm"`` (20)."""
    from canonwrap.samplers import AncestralSampler, DDIMSampler, DPMSolverSampler

    if name == "ancestral":
        return AncestralSampler(steps)
    if name == "ddim":
        return DDIMSampler(steps or 50)
    if name == "dpm":
        return DPMSolverSampler(steps or 20)
    raise ValueError(f"unknown sampler {name!r}; choose ancestral, ddim or dpm")


DIFFUSION_SAMPLERS: tuple[str, ...] = ("ancestral", "ddim", "dpm")
"""Samplers of diffusion models, by the names of ``make_sampler``."""


def sampling_options(
    objective: str,
    name: str,
    steps: int | None = None,
    progress: bool = False,
    grid_power: float | None = None,
    noise_scale: float | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``model.sample`` for the sampler ``name`` with ``steps`` steps.

    Parameters
    ----------
    objective : str
        What the model was trained with, one of ``OBJECTIVES``.
    name : str
        Diffusion: a name of ``DIFFUSION_SAMPLERS`` (see ``make_sampler``). Flow matching:
        a fixed-step ODE method of [`FIXED_STEP_METHODS`][canonwrap.flow.FIXED_STEP_METHODS]
        (``steps``, default 100), ``"dopri5"`` (adaptive: no ``steps``) or the SDE sampler
        ``"euler_maruyama"`` (``steps``, default 100).
    steps : int, optional
        Number of steps (each sampler's default when ``None``).
    progress : bool
        Progress bar (diffusion samplers only).
    grid_power : float, optional
        Flow matching with a fixed-step method only: the steps follow
        ``t_i = 1 - (1 - i / steps) ** grid_power`` (see
        [`CanonicalizedFlowMatching.sample`][canonwrap.flow.CanonicalizedFlowMatching.sample]);
        ``None`` (default) leaves the model's equal steps.
    noise_scale : float, optional
        ``"euler_maruyama"`` only: its noise (``noise_scale`` of ``sample``); ``None``
        (default) leaves the sampler's default.

    Returns
    -------
    dict
        Diffusion: ``sampler`` and ``progress``; flow matching: ``method`` and, for
        fixed-step methods, ``steps`` (and ``grid_power`` and ``noise_scale`` when given).

    Raises
    ------
    ValueError
        A sampler of the other objective, an unknown one, ``steps`` for ``dopri5``, or a
        ``grid_power`` that is not finite and positive, or given for diffusion or
        ``dopri5``; a ``noise_scale`` for any other sampler than ``euler_maruyama`` or
        that is not a finite number ``>= 0``. Every message about the grid power names
        ``grid_power``, every one about the noise ``noise_scale``.
    """
    from canonwrap.flow import (
        FIXED_STEP_METHODS,
        STOCHASTIC_METHODS,
        _check_grid_power,
        _check_noise_scale,
    )

    flow_samplers = (*FIXED_STEP_METHODS, "dopri5", *STOCHASTIC_METHODS)
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if objective != "flow":
        if name in flow_samplers:
            raise ValueError(
                f"{name} is a flow-matching ODE solver; a {objective} run samples with "
                f"{', '.join(DIFFUSION_SAMPLERS)}"
            )
        if grid_power is not None:
            raise ValueError(
                "grid_power spaces the steps of a flow-matching ODE solver; a "
                f"{objective} run has no such steps"
            )
        if noise_scale is not None:
            raise ValueError(
                f"noise_scale is the noise of the flow-matching sampler "
                f"{', '.join(STOCHASTIC_METHODS)}; a {objective} run has none"
            )
        return {"sampler": make_sampler(name, steps), "progress": progress}
    if name in DIFFUSION_SAMPLERS:
        raise ValueError(
            f"{name} is a diffusion sampler; a flow-matching run samples with "
            f"{', '.join(flow_samplers)}"
        )
    if name == "dopri5":
        if steps is not None:
            raise ValueError(
                f"{steps} steps do not apply to dopri5 (an adaptive solver chooses its steps)"
            )
        if grid_power is not None:
            raise ValueError("grid_power does not apply to dopri5 (it chooses its steps)")
        _check_noise_scale(noise_scale, name)
        return {"method": name}
    if name not in FIXED_STEP_METHODS + STOCHASTIC_METHODS:
        raise ValueError(f"unknown ODE method {name!r}; choose one of {', '.join(flow_samplers)}")
    options: dict[str, Any] = {"method": name, "steps": steps or 100}
    if grid_power is not None:
        options["grid_power"] = _check_grid_power(grid_power, name)
    if noise_scale is not None:
        options["noise_scale"] = _check_noise_scale(noise_scale, name)
    return options


def _canonicalizer(cfg: QM9ModelConfig, num_features: int) -> Canonicalizer:
    name = cfg.canonicalizer
    if name == "com":
        return CenterOfMass()
    if name == "pca":
        return PCACanonicalizer()
    learned = EGNNCanonicalizer(
        num_features=num_features, hidden=cfg.canon_hidden, layers=cfg.canon_layers
    )
    if name == "egnn":
        return learned
    if name == "egnn-frozen":
        return frozen(learned)
    if name == "egnn-anchored":
        return Anchored(learned, PCACanonicalizer(), weight=cfg.anchor_weight)
    raise ValueError(f"unknown canonicalizer {name!r}; choose one of {', '.join(CANONICALIZERS)}")


def _denoiser(cfg: QM9ModelConfig, num_features: int) -> nn.Module:
    from canonwrap.nn import EGNNDenoiser, GNNDenoiser, TransformerDenoiser

    if cfg.denoiser == "gnn":
        return GNNDenoiser(num_features=num_features, hidden=cfg.hidden, layers=cfg.layers)
    if cfg.denoiser == "egnn":
        return EGNNDenoiser(num_features=num_features, hidden=cfg.hidden, layers=cfg.layers)
    if cfg.denoiser == "transformer":
        return TransformerDenoiser(
            num_features=num_features,
            hidden=cfg.hidden,
            layers=cfg.layers,
            heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            distance_bias=cfg.distance_bias,
        )
    raise ValueError(f"unknown denoiser {cfg.denoiser!r}; choose one of {', '.join(DENOISERS)}")


def qm9_model(cfg: QM9ModelConfig, node_counts=None) -> CanonicalizedModel:
    """The model that ``cfg`` describes, on QM9's molecule space.

    Parameters
    ----------
    cfg : QM9ModelConfig
        Denoiser, canonicalizer, sizes and objective.
    node_counts : NodeCountDistribution, optional
        Distribution of molecule sizes (for sampling without giving sizes, and the
        ``-log p(N)`` term of the likelihood).

    Returns
    -------
    CanonicalizedDiffusion or CanonicalizedFlowMatching
        ``objective="diffusion"``: with EDM's polynomial schedule (power 2, precision 1e-5).
        ``objective="flow"``: flow matching on the CondOT path (the denoiser predicts the
        velocity; no schedule).
    """
    from canonwrap import MoleculeSpace
    from canonwrap.molecules import QM9_ATOM_TYPES, QM9_HEAVY_ATOM_TYPES

    if cfg.objective not in OBJECTIVES:
        raise ValueError(
            f"unknown objective {cfg.objective!r}; choose one of {', '.join(OBJECTIVES)}"
        )
    if cfg.coupling not in COUPLINGS:
        raise ValueError(f"unknown coupling {cfg.coupling!r}; choose one of {', '.join(COUPLINGS)}")
    if cfg.objective != "flow" and (
        cfg.coupling != "independent"
        or cfg.canonical_noise
        or cfg.flow_time != "uniform"
        or cfg.flow_prediction != "velocity"
    ):
        raise ValueError(
            f"coupling={cfg.coupling!r}, canonical_noise={cfg.canonical_noise}, "
            f"flow_time={cfg.flow_time!r} and flow_prediction={cfg.flow_prediction!r} are "
            f"options of flow matching; the objective is {cfg.objective!r}"
        )
    time_distribution = flow_time_distribution(cfg.flow_time)
    atom_types = QM9_HEAVY_ATOM_TYPES if cfg.remove_h else QM9_ATOM_TYPES
    num_features = len(atom_types) + 1
    space = MoleculeSpace(atom_types=atom_types, include_charges=True, node_counts=node_counts)
    denoiser = _denoiser(cfg, num_features)
    canonicalizer = _canonicalizer(cfg, num_features)
    if cfg.objective == "flow":
        from canonwrap.flow import AlignedPrior, CanonicalizedFlowMatching

        coupling = None
        if cfg.coupling != "independent":
            coupling = AlignedPrior(
                rotation="rotation" in cfg.coupling,
                assignment="assignment" in cfg.coupling,
                type_columns=slice(0, len(atom_types)),
            )
        return CanonicalizedFlowMatching(
            denoiser,
            canonicalizer,
            space=space,
            coupling=coupling,
            canonical_noise=cfg.canonical_noise,
            time_distribution=time_distribution,
            prediction=cfg.flow_prediction,
        )
    schedule = PolynomialSchedule(cfg.timesteps, power=2, precision=1e-5)
    return CanonicalizedDiffusion(denoiser, canonicalizer, schedule=schedule, space=space)


def qm9_optimizer(
    model: CanonicalizedModel, lr: float, canon_lr_ratio: float = 0.01
) -> torch.optim.Optimizer:
    """AdamW as EDM (amsgrad, weight decay 1e-12); a learned canonicalizer at a lower rate.

    Parameter group 0 is the denoiser at ``lr``; group 1 (present only when the
    canonicalizer has trainable parameters) is the canonicalizer at ``lr * canon_lr_ratio``.
    """
    groups = [{"params": list(model.denoiser.parameters()), "lr": lr}]
    canon_params = [p for p in model.canonicalizer.parameters() if p.requires_grad]
    if canon_params:
        groups.append({"params": canon_params, "lr": lr * canon_lr_ratio})
    return torch.optim.AdamW(groups, lr=lr, amsgrad=True, weight_decay=1e-12)


def canonicalizer_warmup(
    optimizer: torch.optim.Optimizer, steps: int
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """Hold a learned canonicalizer fixed for ``steps`` steps, then ramp its rate up linearly.

    Multiplies the rate of parameter group 1 (the canonicalizer's, see
    [`qm9_optimizer`][canonwrap.recipes.qm9_optimizer]) by ``0`` for the first ``steps`` steps and
    by ``min(1, (s - steps) / steps)`` afterwards, so that the denoiser learns on a fixed pose
    before the pose may move. Returns ``None`` when ``steps == 0`` or there is no canonicalizer
    group.
    """
    if steps < 0:
        raise ValueError(f"canonicalizer warm-up steps must be >= 0; got {steps}")
    if steps == 0 or len(optimizer.param_groups) < 2:
        return None

    def ramp(step: int) -> float:
        return min(1.0, max(0.0, (step - steps) / steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda _: 1.0, ramp])
