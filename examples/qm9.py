"""QM9: GDM vs EDM vs canonicalized GDM (train, sample, evaluate) from one command line.

Models (``--model``):

- ``gdm``: non-equivariant graph denoiser on centred molecules (translations only);
- ``edm``: E(n)-equivariant EGNN denoiser (EDM);
- ``canon-gdm``: GDM behind a learned multi-channel EGNN canonicalizer (SO(3));
- ``canon-frozen-gdm``: the same canonicalizer at its random initialisation, frozen;
- ``pca-gdm``, ``transformer``, ``pca-transformer``, ``canon-transformer``: see
  ``canonwrap.recipes.SHORTHANDS``. ``--denoiser`` (gnn, egnn, transformer) and
  ``--canonicalizer`` (com, pca, egnn, egnn-frozen, egnn-anchored) compose freely; with
  neither, the default is the transformer behind PCA.

Subcommands::

    python examples/qm9.py train    --model canon-gdm --out runs/canon-gdm [--quick]
    python examples/qm9.py sample   --out runs/canon-gdm --num-samples 1000
    python examples/qm9.py evaluate --out runs/canon-gdm
    python examples/qm9.py all      --model canon-gdm --out runs/canon-gdm --quick

``--objective flow`` trains the same denoiser and canonicalizer by flow matching
(``CanonicalizedFlowMatching``) instead of diffusion; ``sample --sampler`` then takes the
ODE solvers ``euler``, ``midpoint`` or ``dopri5``.

``train`` also runs data-parallel on several CPU processes when started by ``torchrun``
(``torchrun --nproc_per_node 4 examples/qm9.py train ...``; gloo backend, ``--batch-size``
per process, rank 0 writes all outputs).

``train`` writes ``config.json``, checkpoints (exact resume with ``--resume``) and
``log.jsonl`` into ``--out``; ``sample`` writes ``samples.xyz``, ``samples.sdf`` and
``samples.pt``; ``evaluate`` writes ``metrics.json`` (molecule metrics, test NLL, held-out
denoising loss, sampling time). ``--quick`` is a preset for 2 CPU cores (about 10
minutes for ``all``); the published sizes are the defaults of ``--preset full``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from canonwrap import NodeCountDistribution
from canonwrap.data import QM9
from canonwrap.evaluation import (
    FrameDrift,
    heldout_loss,
    heldout_nll,
    load_qm9_run,
    qm9_reference_smiles,
)
from canonwrap.flow import PREDICTIONS
from canonwrap.recipes import (
    CANONICALIZERS,
    COUPLINGS,
    DENOISERS,
    DIFFUSION_SAMPLERS,
    OBJECTIVES,
    OPTIMIZATION,
    SHORTHANDS,
    SIZES,
    QM9ModelConfig,
    canonicalizer_warmup,
    flow_time_distribution,
    qm9_model,
    qm9_optimizer,
    sampling_options,
)
from canonwrap.training import EMA, Trainer, claim_run_folder, distributed_sampler_loader

MODELS = tuple(SHORTHANDS)
#: The ODE solvers that --sampler offers for flow runs (diffusion's: DIFFUSION_SAMPLERS).
FLOW_SAMPLERS = ("euler", "midpoint", "dopri5", "euler_maruyama")
#: Flow runs: the validation NLL logged during training integrates the ODE with this fixed
#: number of midpoint steps (cheap, approximate: a monitor); ``evaluate``'s test NLL uses the
#: library's adaptive default (dopri5, atol = rtol = 1e-5).
FLOW_VAL_NLL = {"method": "midpoint", "steps": 10}
#: What runs when neither --model nor --denoiser/--canonicalizer is given.
DEFAULT_MODEL = ("transformer", "pca")

# Published settings (EDM / canonicalization paper) and a CPU preset. Model sizes and the
# optimizer's settings come from canonwrap.recipes (``hidden``/``layers``/``heads`` of None:
# the chosen denoiser's size there).
PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(
        hidden=None,
        layers=None,
        heads=None,
        mlp_ratio=4.0,
        canon_hidden=SIZES["full"]["canonicalizer"][0],
        canon_layers=SIZES["full"]["canonicalizer"][1],
        **OPTIMIZATION["full"],
        canon_warmup=0,
        anchor_weight=0.1,
        ema_decay=0.9999,
        ema_start=0,
        timesteps=1000,
        max_steps=None,
        max_minutes=None,
        epochs=3000,
        train_size=None,
        val_size=2000,
        nll_size=2000,
        num_samples=10000,
        sample_batch=500,
        weights="ema",
        eval_every=5000,
    ),
    "quick": dict(
        hidden=None,
        layers=None,
        heads=None,
        mlp_ratio=4.0,
        canon_hidden=SIZES["quick"]["canonicalizer"][0],
        canon_layers=SIZES["quick"]["canonicalizer"][1],
        **OPTIMIZATION["quick"],
        canon_warmup=0,
        anchor_weight=0.1,
        ema_decay=0.999,
        ema_start=0,
        timesteps=1000,
        max_steps=None,
        max_minutes=7.0,
        epochs=None,
        train_size=None,
        val_size=256,
        nll_size=128,
        num_samples=64,
        sample_batch=64,
        weights="raw",
        eval_every=250,
    ),
}


# ------------------------------------------------------------------------- building
def model_config(cfg: dict[str, Any]) -> QM9ModelConfig:
    """The typed model description of a run configuration."""
    return QM9ModelConfig(
        denoiser=cfg["denoiser"],
        canonicalizer=cfg["canonicalizer"],
        remove_h=cfg["remove_h"],
        hidden=cfg["hidden"],
        layers=cfg["layers"],
        heads=cfg["heads"],
        distance_bias=cfg.get("distance_bias", True),
        mlp_ratio=cfg.get("mlp_ratio", 4.0),  # runs written before the flag: 4
        canon_hidden=cfg["canon_hidden"],
        canon_layers=cfg["canon_layers"],
        anchor_weight=cfg["anchor_weight"],
        timesteps=cfg["timesteps"],
        objective=cfg.get("objective", "diffusion"),  # runs written before the flag: diffusion
        coupling=cfg.get("coupling", "independent"),  # runs written before the flags
        canonical_noise=cfg.get("canonical_noise", False),
        flow_time=cfg.get("flow_time", "uniform"),
        flow_prediction=cfg.get("flow_prediction", "velocity"),
    )


def subset(ds: QM9, size: int | None) -> QM9:
    """A fixed, seeded subset of ``size`` molecules (all of them when ``size`` is None), so
    that every model sees the same molecules."""
    return ds.seeded_subset(size)


def load_split(split: str, cfg: dict[str, Any], size: int | None, progress: bool = True) -> QM9:
    return subset(QM9(split, remove_h=cfg["remove_h"], progress=progress), size)


def node_counts_of(train: QM9) -> NodeCountDistribution:
    return NodeCountDistribution(train.node_count_histogram())


def _loader(ds, batch_size: int, shuffle: bool, seed: int = 0):
    from torch_geometric.loader import DataLoader

    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=False)


# ------------------------------------------------------------------------- commands
def init_distributed() -> bool:
    """Join the process group when started by ``torchrun`` (it sets ``LOCAL_RANK``).

    Training here runs on the CPU, so the ranks talk over gloo.
    """
    if "LOCAL_RANK" not in os.environ:
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _forward_loss(model: torch.nn.Module, batch) -> Any:
    """Loss through ``model(batch)``, so that DDP averages the gradients."""
    return model(batch)


def check_objective_flags(args: argparse.Namespace) -> None:
    """``ValueError`` for flow-matching flags on a diffusion run or a malformed --flow-time."""
    if args.objective != "flow" and (
        args.coupling != "independent"
        or args.canonical_noise
        or args.flow_time != "uniform"
        or args.flow_prediction != "velocity"
    ):
        raise ValueError(
            "--coupling, --canonical-noise, --flow-time and --flow-prediction are options of "
            f"--objective flow; the objective is {args.objective}"
        )
    try:
        flow_time_distribution(args.flow_time)
    except ValueError as err:
        raise ValueError(f"--flow-time: {err}") from None


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """Preset values, then the model choice, then every flag given on the command line."""
    check_objective_flags(args)
    preset = "quick" if args.quick else args.preset
    cfg = dict(PRESETS[preset])
    denoiser, canonicalizer = SHORTHANDS[args.model] if args.model else DEFAULT_MODEL
    denoiser = args.denoiser or denoiser
    canonicalizer = args.canonicalizer or canonicalizer
    name = (
        args.model
        if args.model and (denoiser, canonicalizer) == SHORTHANDS[args.model]
        else (f"{denoiser}+{canonicalizer}")
    )
    cfg.update(
        preset=preset,
        model=name,
        denoiser=denoiser,
        canonicalizer=canonicalizer,
        remove_h=args.remove_h,
        seed=args.seed,
        distance_bias=not args.no_distance_bias,
        objective=args.objective,
        coupling=args.coupling,
        canonical_noise=args.canonical_noise,
        flow_time=args.flow_time,
        flow_prediction=args.flow_prediction,
    )
    for key in PRESETS["full"]:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    hidden, layers, heads = SIZES[preset][denoiser][:3]
    for key, value in (("hidden", hidden), ("layers", layers), ("heads", heads)):
        if cfg[key] is None:
            cfg[key] = value
    return cfg


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    distributed = init_distributed()
    rank = dist.get_rank() if distributed else 0
    out = Path(args.out)
    if not args.resume:
        check_objective_flags(args)  # before the run folder is claimed
    # one run per folder: refuse another run's folder unless --resume or --overwrite
    claim = claim_run_folder if rank == 0 else lambda *a, **k: contextlib.nullcontext()
    with claim(out, resume=args.resume, overwrite=args.overwrite):
        return _train(args, distributed, rank, out)


def _train(args: argparse.Namespace, distributed: bool, rank: int, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    if args.resume and cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        for key in ("max_steps", "max_minutes", "epochs"):
            if getattr(args, key, None) is not None:
                cfg[key] = getattr(args, key)
    else:
        cfg = resolve_config(args)
    torch.manual_seed(cfg["seed"] + rank)  # own noise per rank; DDP copies rank 0's weights
    progress = not args.no_progress
    full_train = QM9("train", remove_h=cfg["remove_h"], progress=progress)
    train = subset(full_train, cfg["train_size"])
    valid = load_split("valid", cfg, cfg["val_size"], progress)
    node_counts = node_counts_of(full_train)
    model = qm9_model(model_config(cfg), node_counts)
    device = args_device(args.device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    model.to(device)
    cfg["model_config"] = asdict(model_config(cfg))
    cfg["parameters"] = {
        "denoiser": sum(p.numel() for p in model.denoiser.parameters()),
        "canonicalizer": sum(p.numel() for p in model.canonicalizer.parameters()),
    }
    if distributed:
        dist.barrier()  # every rank has read config.json before rank 0 rewrites it
    if rank == 0:
        cfg_path.write_text(json.dumps(cfg, indent=2))
        print(
            f"[train] {cfg['model']}: {cfg['parameters']} parameters, {len(train)} training "
            f"molecules, preset {cfg['preset']}",
            flush=True,
        )

    val_loader = _loader(valid, 64, shuffle=False)
    nll_loader = _loader(subset(valid, cfg["nll_size"]), 64, shuffle=False)
    val_nll_options = FLOW_VAL_NLL if model_config(cfg).objective == "flow" else {}
    with_density = has_density(model)
    optimizer = qm9_optimizer(model, cfg["lr"], cfg["canon_lr_ratio"])
    scheduler = canonicalizer_warmup(optimizer, cfg["canon_warmup"])
    ema = EMA(model, decay=cfg["ema_decay"], start_step=cfg["ema_start"])
    # frame drift of a learned canonicalizer on 64 fixed validation molecules
    learned = any(p.requires_grad for p in model.canonicalizer.parameters())
    drift = FrameDrift(next(iter(_loader(subset(valid, 64), 64, shuffle=False))))
    if learned:
        drift(model.canonicalizer)  # the frames before training

    def held_out(m):
        m = getattr(m, "module", m)  # unwrap DDP
        result = {"val_loss": heldout_loss(m, val_loader)}
        if with_density:  # --canonical-noise: no density on the data's subspace
            result["val_nll"] = heldout_nll(m, nll_loader, **val_nll_options)["nll"]
        return result

    def eval_fn(m):
        result = held_out(m)
        if learned:
            result.update(drift(getattr(m, "module", m).canonicalizer))
        return result

    if distributed:
        from torch_geometric.loader import DataLoader

        train_loader = distributed_sampler_loader(
            train, cfg["batch_size"], seed=cfg["seed"], loader_cls=DataLoader
        )
        ids = [device.index] if device.type == "cuda" else None
        trained, loss_fn = DistributedDataParallel(model, device_ids=ids), _forward_loss
    else:
        train_loader = _loader(train, cfg["batch_size"], shuffle=True, seed=cfg["seed"])
        trained, loss_fn = model, None
    trainer = Trainer(
        trained,
        optimizer,
        train_loader,
        loss_fn=loss_fn,
        lr_scheduler=scheduler,
        ema=ema,
        grad_clip="adaptive",
        checkpoint_dir=out / "checkpoints",
        checkpoint_every=500,
        log_every=50,
        max_steps=cfg["max_steps"],
        max_seconds=cfg["max_minutes"] * 60 if cfg["max_minutes"] else None,
        max_epochs=cfg["epochs"],
        eval_fn=eval_fn,
        eval_every=cfg["eval_every"],
        eval_with_ema=cfg["weights"] == "ema",
        progress=progress,
        seed=cfg["seed"],
        device=device,
        tensorboard_dir=out / "tensorboard" if getattr(args, "tensorboard", False) else None,
    )
    if args.resume:
        trainer.resume(out / "checkpoints")
    elif rank == 0:
        model.eval()
        initial = heldout_loss(model, val_loader)
        (out / "initial.json").write_text(json.dumps({"val_loss": initial}))
        print(f"[train] held-out denoising loss before training: {initial:.4f}", flush=True)
        model.train()
    state = trainer.fit()
    model.eval()
    final = held_out(model) if cfg["weights"] == "raw" else trainer.evaluate()
    result = {"steps": state.step, "elapsed_s": state.elapsed, **(final or {})}
    if distributed:
        result["world_size"] = dist.get_world_size()
        dist.destroy_process_group()
    if rank == 0:
        (out / "train_result.json").write_text(json.dumps(result, indent=2))
        print(f"[train] done: {result}", flush=True)
    return result


def args_device(name: str) -> torch.device:
    """The device named on the command line, with a clear error when it is not there."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def load_trained(out: Path, weights: str | None = None, device: str = "cpu"):
    """Model, config and node-count distribution from a training folder (weights only)."""
    model, cfg = load_qm9_run(out, weights)
    model.to(args_device(device))
    return model, cfg, model.space.node_counts


def cmd_sample(args: argparse.Namespace) -> dict[str, Any]:
    from canonwrap.metrics.io import write_sdf, write_xyz

    out = Path(args.out)
    model, cfg, node_counts = load_trained(out, args.weights, args.device)
    n_total = args.num_samples or cfg["num_samples"]
    batch_size = args.sample_batch or cfg["sample_batch"]
    draw = sampling_function(model, model_config(cfg).objective, args)
    gen = torch.Generator().manual_seed(args.seed)
    molecules, positions, features, sizes = [], [], [], []
    start = time.perf_counter()
    done = 0
    while done < n_total:
        b = min(batch_size, n_total - done)
        nodes = node_counts.sample(b, generator=gen)
        batch = draw(nodes, gen)
        molecules += model.space.decode(batch)
        positions.append(batch.pos)
        features.append(batch.x)
        sizes.append(nodes)
        done += b
    elapsed = time.perf_counter() - start
    torch.save(
        {"pos": torch.cat(positions), "x": torch.cat(features), "num_nodes": torch.cat(sizes)},
        out / "samples.pt",
    )
    write_xyz(out / "samples.xyz", molecules)
    write_sdf(out / "samples.sdf", molecules)
    timing = {
        "num_samples": n_total,
        "seconds": elapsed,
        "s_per_sample": elapsed / n_total,
        "sampler": repr(draw),
        "threads": torch.get_num_threads(),
    }
    (out / "sampling.json").write_text(json.dumps(timing, indent=2))
    print(
        f"[sample] {n_total} molecules in {elapsed:.1f} s ({elapsed / n_total:.3f} s per molecule)",
        flush=True,
    )
    return timing


class _Draw:
    """One sampling call of a run's model; its ``repr`` names the sampler for sampling.json."""

    def __init__(self, model, name: str, options: dict[str, Any]) -> None:
        self.model, self.name, self.options = model, name, options

    def __call__(self, nodes, gen):
        return self.model.sample(num_nodes=nodes, generator=gen, **self.options)

    def __repr__(self) -> str:
        if "sampler" in self.options:
            return repr(self.options["sampler"])
        steps = self.options.get("steps")
        power = self.options.get("grid_power")
        noise = self.options.get("noise_scale")
        return (
            f"{'SDE' if self.name == 'euler_maruyama' else 'ODE'}({self.name}"
            + (f", steps={steps}" if steps else "")
            + (f", grid_power={power:g}" if power is not None else "")
            + (f", noise_scale={noise:g}" if noise is not None else "")
            + ")"
        )


def sampler_name(objective: str, sampler: str | None) -> str:
    """``--sampler`` (or the objective's default), refused when the objective has no such one."""
    if objective == "flow":
        if sampler in DIFFUSION_SAMPLERS:
            raise ValueError(
                f"--sampler {sampler} is a diffusion sampler, but this run was trained with "
                f"--objective flow: choose one of {', '.join(FLOW_SAMPLERS)}"
            )
        return sampler or "euler"
    if sampler in FLOW_SAMPLERS:
        raise ValueError(
            f"--sampler {sampler} is a flow-matching ODE solver, but this run was trained with "
            f"--objective {objective}: choose one of {', '.join(DIFFUSION_SAMPLERS)}"
        )
    return sampler or "ancestral"


def sampling_function(model, objective: str, args: argparse.Namespace) -> _Draw:
    """The sampler that ``--sampler``/``--sample-steps`` name, checked against the objective."""
    name = sampler_name(objective, args.sampler)
    if name == "dopri5" and args.sample_steps is not None:
        raise ValueError("--sample-steps does not apply to dopri5 (it chooses its steps)")
    power = getattr(args, "grid_power", None)
    noise = getattr(args, "noise_scale", None)
    try:
        options = sampling_options(
            objective,
            name,
            args.sample_steps,
            not args.no_progress,
            grid_power=power,
            noise_scale=noise,
        )
    except ValueError as err:
        for flag, key, value in (("--grid-power", "grid_power", power),
                                 ("--noise-scale", "noise_scale", noise)):  # fmt: skip
            if key in str(err):
                raise ValueError(
                    f"{flag} {value:g}: {err} (this run: --objective {objective}, --sampler {name})"
                ) from None
        raise
    return _Draw(model, name, options)


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from canonwrap.metrics import evaluate
    from canonwrap.metrics.io import read_xyz

    out = Path(args.out)
    model, cfg, _ = load_trained(out, args.weights, args.device)
    if not (out / "samples.xyz").exists():
        raise FileNotFoundError(f"{out / 'samples.xyz'} not found: run `sample` first")
    molecules = read_xyz(out / "samples.xyz")
    progress = not args.no_progress
    train_smiles = qm9_reference_smiles(cfg["remove_h"], progress=progress)
    metrics = evaluate(
        molecules,
        train_smiles=train_smiles,
        canonicalize_train=False,
        progress=progress,
    )
    if has_density(model):
        test = load_split("test", cfg, args.nll_size or cfg["nll_size"], progress)
        nll = heldout_nll(model, _loader(test, 64, shuffle=False))
    else:
        nll = {"nll": None, "unavailable": NO_DENSITY}
    valid = load_split("valid", cfg, cfg["val_size"], progress)
    result = {
        "model": cfg["model"],
        "molecules": metrics,
        "test_nll": nll,
        "val_loss": heldout_loss(model, _loader(valid, 64, shuffle=False)),
    }
    for name in ("sampling.json", "train_result.json", "initial.json"):
        if (out / name).exists():
            result[name.removesuffix(".json")] = json.loads((out / name).read_text())
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2), flush=True)
    figure = _summary_figure(out)
    print(summary_lines(result, figure), flush=True)
    return result


NO_DENSITY = (
    "trained with --canonical-noise: the flow starts from canonical poses of the noise, "
    "which have no density on the data's subspace"
)


def has_density(model) -> bool:
    """Whether ``model.nll`` exists: not for flow matching from canonical noise."""
    return not getattr(model, "canonical_noise", False)


def _summary_figure(out: Path) -> Path | None:
    """``out/summary.png`` (curves and generated molecules), or None without matplotlib."""
    from canonwrap.plots import qm9_run_figure

    if not (out / "checkpoints" / "log.jsonl").exists():
        return None  # evaluated without a training log (e.g. copied checkpoints)
    try:
        return qm9_run_figure(out, out / "summary.png")
    except ImportError as err:
        print(f"[evaluate] no figure: {err}", flush=True)
        return None


def summary_lines(result: dict[str, Any], figure: Path | None) -> str:
    """The few numbers a reader wants first, and where the figure is."""
    mol = result["molecules"]
    nll = result["test_nll"]
    train = result.get("train_result", {})
    sampling = result.get("sampling", {})
    pct = lambda key: f"{100 * mol[key]:.1f} %"  # noqa: E731
    lines = [
        "",
        f"== {result['model']}: summary",
        f"   training: {train.get('steps', '?')} steps in "
        f"{train.get('elapsed_s', float('nan')) / 60:.1f} min; held-out denoising loss "
        f"{result.get('initial', {}).get('val_loss', float('nan')):.3f} -> "
        f"{result['val_loss']:.3f}",
        (
            f"   test NLL bound: {nll['nll']:.1f} ± {nll.get('nll_se', float('nan')):.1f} nats"
            if nll["nll"] is not None
            else f"   test NLL: none ({nll.get('unavailable', NO_DENSITY)})"
        ),
        f"   {mol['n_molecules']} samples: atom stable {pct('atom_stability')}, molecule "
        f"stable {pct('mol_stability')}, valid {pct('validity')}, connected valid "
        f"{pct('connected_validity')}, unique {pct('uniqueness')}",
    ]
    if sampling:
        lines.append(f"   sampling: {sampling['s_per_sample']:.3f} s per molecule")
    if figure is not None:
        lines.append(f"   figure: {figure}")
    return "\n".join(lines)


def cmd_all(args: argparse.Namespace) -> dict[str, Any]:
    if not args.resume:  # sampler options the objective has not: refused before training
        sampling_function(None, args.objective, args)
    cmd_train(args)
    cmd_sample(args)
    return cmd_evaluate(args)


# ------------------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--out", required=True, help="output folder of this run")
        sp.add_argument("--no-progress", action="store_true", help="hide progress bars")
        sp.add_argument(
            "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
        )
        sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
        sp.add_argument(
            "--seed",
            type=int,
            default=0,
            help="seed of weights and data order (train) or of sampling (default: 0)",
        )
        sp.add_argument(
            "--weights",
            choices=["ema", "raw"],
            default=None,
            help="weights used to evaluate and sample (default: the preset's: "
            f"full {PRESETS['full']['weights']}, quick {PRESETS['quick']['weights']})",
        )

    flag_help = {
        "hidden": "denoiser width (default: per denoiser, see SIZES)",
        "layers": "denoiser depth (default: per denoiser)",
        "heads": "transformer attention heads (default: per preset)",
        "mlp_ratio": "feed-forward width of the transformer relative to --hidden",
        "canon_hidden": "width of the learned EGNN canonicalizer",
        "canon_layers": "depth of the learned EGNN canonicalizer",
        "batch_size": "molecules per training batch (per process under torchrun)",
        "lr": "learning rate of the denoiser (AdamW, amsgrad)",
        "canon_lr_ratio": "canonicalizer learning rate as a fraction of --lr",
        "canon_warmup": "steps the canonicalizer stays fixed, then as many to ramp its rate up",
        "anchor_weight": "weight of the principal-axes prior of --canonicalizer egnn-anchored",
        "ema_decay": "decay of the exponential moving average of the weights",
        "ema_start": "step at which the moving average starts",
        "timesteps": "diffusion steps T (unused with --objective flow)",
        "max_steps": "stop after this many training steps",
        "max_minutes": "stop after this many minutes of training",
        "epochs": "stop after this many epochs",
        "train_size": "train on a fixed subset of this many molecules (default: all)",
        "val_size": "validation molecules for the held-out loss",
        "nll_size": "molecules for the NLL: validation during training, test in evaluate",
        "eval_every": "evaluate (held-out loss, NLL, frame drift) every this many steps",
    }

    def train_args(sp):
        sp.add_argument(
            "--model",
            choices=MODELS,
            default=None,
            help="shorthand for a denoiser + canonicalizer pair: "
            + ", ".join(f"{k} = {d}+{c}" for k, (d, c) in SHORTHANDS.items())
            + f" (default: {DEFAULT_MODEL[0]}+{DEFAULT_MODEL[1]})",
        )
        sp.add_argument(
            "--denoiser",
            choices=DENOISERS,
            default=None,
            help="the network that predicts the noise (overrides --model's)",
        )
        sp.add_argument(
            "--canonicalizer",
            choices=CANONICALIZERS,
            default=None,
            help="how each molecule is put in canonical pose (overrides --model's)",
        )
        sp.add_argument(
            "--objective",
            choices=OBJECTIVES,
            default="diffusion",
            help="training objective: diffusion (CanonicalizedDiffusion) or flow (flow "
            "matching, CanonicalizedFlowMatching; its validation NLL during training uses "
            f"{FLOW_VAL_NLL['steps']} {FLOW_VAL_NLL['method']} steps) (default: diffusion)",
        )
        sp.add_argument(
            "--coupling",
            choices=COUPLINGS,
            default="independent",
            help="--objective flow only: how noise is paired with canonical data in training "
            "(rotation: Kabsch; assignment: atoms matched within each type) "
            "(default: independent)",
        )
        sp.add_argument(
            "--canonical-noise",
            action="store_true",
            help="--objective flow only: the flow starts from canonical poses of the noise, "
            "in training and sampling (no likelihood then: no NLL is reported)",
        )
        sp.add_argument(
            "--flow-time",
            default="uniform",
            metavar="DENSITY",
            help="--objective flow only: density of the training times (0: noise, 1: data): "
            "uniform, beta:A,B (e.g. beta:2,1, denser near the data) or logit-normal:M,S "
            "(default: uniform)",
        )
        sp.add_argument(
            "--flow-prediction",
            choices=PREDICTIONS,
            default="velocity",
            help="--objective flow only: what the network predicts, the path's velocity or "
            "the clean data (its velocity is derived; the held-out loss is then not "
            "comparable with a velocity run's) (default: velocity)",
        )
        sp.add_argument(
            "--no-distance-bias",
            action="store_true",
            help="transformer without the pairwise-distance attention bias",
        )
        sp.add_argument(
            "--preset",
            choices=list(PRESETS),
            default="full",
            help="size and budget preset (default: full, the published sizes)",
        )
        sp.add_argument(
            "--quick",
            action="store_true",
            help="same as --preset quick: the 2-CPU preset (~10 minutes for all)",
        )
        sp.add_argument("--remove-h", action="store_true", help="QM9 without hydrogens")
        sp.add_argument("--resume", action="store_true", help="continue from checkpoints")
        sp.add_argument(
            "--overwrite",
            action="store_true",
            help="delete what --out holds (another run's files) before training",
        )
        sp.add_argument(
            "--tensorboard",
            action="store_true",
            help="also log losses and evaluations to <out>/tensorboard",
        )
        for key, value in PRESETS["full"].items():
            if key in ("weights", "num_samples", "sample_batch"):
                continue  # sampling/evaluation flags, defined with those commands
            quick = PRESETS["quick"][key]
            kind = float if isinstance(value, float) or key == "max_minutes" else int
            sp.add_argument(
                "--" + key.replace("_", "-"),
                type=kind,
                default=None,
                dest=key,
                help=f"{flag_help[key]} (full: {value}, quick: {quick})",
            )

    def sample_args(sp):
        sp.add_argument(
            "--num-samples",
            type=int,
            default=None,
            help="molecules to sample (full: {}, quick: {})".format(
                PRESETS["full"]["num_samples"], PRESETS["quick"]["num_samples"]
            ),
        )
        sp.add_argument(
            "--sample-batch",
            type=int,
            default=None,
            help="molecules sampled at once (full: {}, quick: {})".format(
                PRESETS["full"]["sample_batch"], PRESETS["quick"]["sample_batch"]
            ),
        )
        sp.add_argument(
            "--sampler",
            choices=[*DIFFUSION_SAMPLERS, *FLOW_SAMPLERS],
            default=None,
            help="diffusion runs: reverse-process sampler ancestral, ddim or dpm; flow runs: "
            "ODE solver euler, midpoint or dopri5 (adaptive), or the SDE sampler "
            "euler_maruyama (default: ancestral for diffusion, euler for flow)",
        )
        sp.add_argument(
            "--sample-steps",
            type=int,
            default=None,
            help="sampling steps (default: T for ancestral, 50 ddim, 20 dpm, 100 euler, "
            "midpoint or euler_maruyama; dopri5 chooses its own)",
        )
        sp.add_argument(
            "--grid-power",
            type=float,
            default=None,
            help="flow runs, euler/midpoint: the steps follow t_i = 1 - (1 - i/steps)^P, "
            "shrinking towards the data end for P > 1 (default: equal steps)",
        )
        sp.add_argument(
            "--noise-scale",
            type=float,
            default=None,
            help="flow runs, euler_maruyama: the SDE's noise, g_t^2 = 2 * S * sigma_t "
            "(0: the Euler ODE) (default: 1)",
        )

    def eval_args(sp):
        sp.add_argument(
            "--nll-size",
            type=int,
            default=None,
            help="test molecules for the NLL (full: {}, quick: {})".format(
                PRESETS["full"]["nll_size"], PRESETS["quick"]["nll_size"]
            ),
        )

    sp = sub.add_parser("train", help="train a model")
    common(sp)
    train_args(sp)
    sp = sub.add_parser("sample", help="sample molecules from a trained model")
    common(sp)
    sample_args(sp)
    sp = sub.add_parser("evaluate", help="molecule metrics, NLL and held-out loss")
    common(sp)
    eval_args(sp)
    sp = sub.add_parser("all", help="train, sample and evaluate")
    common(sp)
    train_args(sp)  # includes --nll-size
    sample_args(sp)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if "LOCAL_RANK" in os.environ and args.command != "train":
        raise SystemExit("under torchrun only `train` runs (sample and evaluate on one process)")
    if args.threads:
        torch.set_num_threads(args.threads)
    commands = {"train": cmd_train, "sample": cmd_sample, "evaluate": cmd_evaluate, "all": cmd_all}
    return commands[args.command](args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main(sys.argv[1:])
