"""QM9: GDM vs EDM vs canonicalized GDM (train, sample, evaluate) from one command line.

Models (``--model``):

- ``gdm``: non-equivariant graph denoiser on centred molecules (translations only);
- ``edm``: E(n)-equivariant EGNN denoiser (EDM);
- ``canon-gdm``: GDM behind a learned multi-channel EGNN canonicalizer (SO(3));
- ``canon-frozen-gdm``: the same canonicalizer at its random initialisation, frozen.

Subcommands::

    python examples/qm9.py train    --model canon-gdm --out runs/canon-gdm [--quick]
    python examples/qm9.py sample   --out runs/canon-gdm --num-samples 1000
    python examples/qm9.py evaluate --out runs/canon-gdm
    python examples/qm9.py all      --model canon-gdm --out runs/canon-gdm --quick

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
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from canonwrap import (
    AncestralSampler,
    CanonicalizedDiffusion,
    CenterOfMass,
    DDIMSampler,
    DPMSolverSampler,
    MoleculeSpace,
    NodeCountDistribution,
    PolynomialSchedule,
    frozen,
)
from canonwrap.canonicalizers import EGNNCanonicalizer
from canonwrap.data import QM9
from canonwrap.nn import EGNNDenoiser, GNNDenoiser
from canonwrap.training import EMA, Trainer, distributed_sampler_loader

MODELS = ("gdm", "edm", "canon-gdm", "canon-frozen-gdm")

# Published settings (EDM / canonicalization paper) and a CPU preset.
PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(
        hidden=256, layers=9, canon_hidden=64, canon_layers=9, batch_size=64, lr=1e-4,
        canon_lr_ratio=0.01, ema_decay=0.9999, ema_start=0, timesteps=1000, max_steps=None,
        max_minutes=None, epochs=3000, train_size=None, val_size=2000, nll_size=2000,
        num_samples=10000, sample_batch=500, weights="ema", eval_every=5000,
    ),
    "quick": dict(
        hidden=64, layers=4, canon_hidden=32, canon_layers=3, batch_size=32, lr=5e-4,
        canon_lr_ratio=0.01, ema_decay=0.999, ema_start=0, timesteps=1000, max_steps=None,
        max_minutes=7.0, epochs=None, train_size=None, val_size=256, nll_size=128,
        num_samples=64, sample_batch=64, weights="raw", eval_every=200,
    ),
}


# ------------------------------------------------------------------------- building
def build_model(cfg: dict[str, Any], node_counts: NodeCountDistribution) -> CanonicalizedDiffusion:
    """The diffusion model named by ``cfg["model"]`` at the configured sizes."""
    model = cfg["model"]
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    atom_types = (6, 7, 8, 9) if cfg["remove_h"] else (1, 6, 7, 8, 9)
    nf = len(atom_types) + 1
    if model == "edm":
        denoiser = EGNNDenoiser(num_features=nf, hidden=cfg["hidden"], layers=cfg["layers"])
    else:
        denoiser = GNNDenoiser(num_features=nf, hidden=cfg["hidden"], layers=cfg["layers"])
    if model in ("canon-gdm", "canon-frozen-gdm"):
        canon = EGNNCanonicalizer(
            num_features=nf, hidden=cfg["canon_hidden"], layers=cfg["canon_layers"]
        )
        if model == "canon-frozen-gdm":
            canon = frozen(canon)
    else:
        canon = CenterOfMass()
    space = MoleculeSpace(atom_types=atom_types, include_charges=True, node_counts=node_counts)
    schedule = PolynomialSchedule(cfg["timesteps"], power=2, precision=1e-5)
    return CanonicalizedDiffusion(denoiser, canon, schedule=schedule, space=space)


def make_optimizer(model: CanonicalizedDiffusion, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW as EDM (amsgrad, tiny weight decay); the canonicalizer at a lower rate."""
    groups = [{"params": list(model.denoiser.parameters()), "lr": cfg["lr"]}]
    canon_params = [p for p in model.canonicalizer.parameters() if p.requires_grad]
    if canon_params:
        groups.append({"params": canon_params, "lr": cfg["lr"] * cfg["canon_lr_ratio"]})
    return torch.optim.AdamW(groups, lr=cfg["lr"], amsgrad=True, weight_decay=1e-12)


def load_split(split: str, cfg: dict[str, Any], size: int | None) -> QM9:
    return subset(QM9(split, remove_h=cfg["remove_h"], progress=True), size)


def subset(ds: QM9, size: int | None) -> QM9:
    """A fixed, seeded subset of ``size`` molecules (all of them when ``size`` is None)."""
    if size is not None and size < len(ds):
        # a fixed, seeded subset so every model sees the same molecules
        gen = torch.Generator().manual_seed(12345)
        idx = torch.randperm(len(ds), generator=gen)[:size].sort().values
        ds = ds[idx]
    return ds


def node_counts_of(train: QM9) -> NodeCountDistribution:
    return NodeCountDistribution(train.node_count_histogram())


def _loader(ds, batch_size: int, shuffle: bool, seed: int = 0):
    from torch_geometric.loader import DataLoader

    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=False)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def heldout_loss(model: CanonicalizedDiffusion, loader, seed: int = 0) -> float:
    """Mean denoising loss on held-out molecules with a fixed draw of t and noise."""
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    device = _device_of(model)
    for batch in loader:
        out = model.training_loss(batch.to(device), generator=gen)
        total += out.per_sample.sum().item()
        count += out.per_sample.numel()
    return total / max(count, 1)


@torch.no_grad()
def heldout_nll(model: CanonicalizedDiffusion, loader, seed: int = 0) -> dict[str, float]:
    """Mean variational bound (nats per molecule) and its terms on held-out molecules."""
    gen = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    count = 0
    device = _device_of(model)
    for batch in loader:
        out = model.nll(batch.to(device), generator=gen)
        for key in ("nll", "kl_prior", "diffusion", "reconstruction", "size"):
            sums[key] = sums.get(key, 0.0) + getattr(out, key).sum().item()
        count += out.nll.numel()
    return {k: v / count for k, v in sums.items()}


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


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    preset = "quick" if args.quick else args.preset
    cfg = dict(PRESETS[preset])
    cfg.update(preset=preset, model=args.model, remove_h=args.remove_h, seed=args.seed)
    for key in PRESETS["full"]:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    return cfg


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    distributed = init_distributed()
    rank = dist.get_rank() if distributed else 0
    out = Path(args.out)
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
    full_train = QM9("train", remove_h=cfg["remove_h"], progress=True)
    train = subset(full_train, cfg["train_size"])
    valid = load_split("valid", cfg, cfg["val_size"])
    node_counts = node_counts_of(full_train)
    model = build_model(cfg, node_counts)
    device = args_device(args.device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    model.to(device)
    cfg["parameters"] = {
        "denoiser": sum(p.numel() for p in model.denoiser.parameters()),
        "canonicalizer": sum(p.numel() for p in model.canonicalizer.parameters()),
    }
    if distributed:
        dist.barrier()  # every rank has read config.json before rank 0 rewrites it
    if rank == 0:
        cfg_path.write_text(json.dumps(cfg, indent=2))
        print(f"[train] {cfg['model']}: {cfg['parameters']} parameters, {len(train)} training "
              f"molecules, preset {cfg['preset']}", flush=True)

    val_loader = _loader(valid, 64, shuffle=False)
    optimizer = make_optimizer(model, cfg)
    ema = EMA(model, decay=cfg["ema_decay"], start_step=cfg["ema_start"])

    def eval_fn(m):
        return {"val_loss": heldout_loss(getattr(m, "module", m), val_loader)}  # unwrap DDP

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
        progress=not args.no_progress,
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
    state = trainer.fit()
    model.eval()
    final = eval_fn(model) if cfg["weights"] == "raw" else trainer.evaluate()
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
    """Model, config and node-count distribution from a training folder."""
    from canonwrap.training import find_latest_checkpoint

    cfg = json.loads((out / "config.json").read_text())
    node_counts = node_counts_of(QM9("train", remove_h=cfg["remove_h"], progress=False))
    model = build_model(cfg, node_counts)
    ckpt_path = find_latest_checkpoint(out / "checkpoints")
    if ckpt_path is None:
        raise FileNotFoundError(f"no checkpoint in {out / 'checkpoints'}: run `train` first")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["model"])
    which = weights or cfg["weights"]
    if which == "ema" and ckpt.get("ema") is not None:
        ema = EMA(model, decay=cfg["ema_decay"])
        ema.load_state_dict(ckpt["ema"])
        ema.copy_to(model)
    model.to(args_device(device))
    model.eval()
    return model, cfg, node_counts


def make_sampler(name: str, steps: int | None):
    if name == "ancestral":
        return AncestralSampler(steps)
    if name == "ddim":
        return DDIMSampler(steps or 50)
    if name == "dpm":
        return DPMSolverSampler(steps or 20)
    raise ValueError(f"unknown sampler {name!r}")


def cmd_sample(args: argparse.Namespace) -> dict[str, Any]:
    from canonwrap.metrics.io import write_sdf, write_xyz

    out = Path(args.out)
    model, cfg, node_counts = load_trained(out, args.weights, args.device)
    n_total = args.num_samples or cfg["num_samples"]
    batch_size = args.sample_batch or cfg["sample_batch"]
    sampler = make_sampler(args.sampler, args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    molecules, positions, features, sizes = [], [], [], []
    start = time.perf_counter()
    done = 0
    while done < n_total:
        b = min(batch_size, n_total - done)
        nodes = node_counts.sample(b, generator=gen)
        batch = model.sample(num_nodes=nodes, sampler=sampler, generator=gen,
                             progress=not args.no_progress)
        molecules += model.space.decode(batch)
        positions.append(batch.pos)
        features.append(batch.x)
        sizes.append(nodes)
        done += b
    elapsed = time.perf_counter() - start
    torch.save({"pos": torch.cat(positions), "x": torch.cat(features),
                "num_nodes": torch.cat(sizes)}, out / "samples.pt")
    write_xyz(out / "samples.xyz", molecules)
    write_sdf(out / "samples.sdf", molecules)
    timing = {"num_samples": n_total, "seconds": elapsed, "s_per_sample": elapsed / n_total,
              "sampler": repr(sampler), "threads": torch.get_num_threads()}
    (out / "sampling.json").write_text(json.dumps(timing, indent=2))
    print(f"[sample] {n_total} molecules in {elapsed:.1f} s "
          f"({elapsed / n_total:.3f} s per molecule)", flush=True)
    return timing


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from canonwrap.metrics import evaluate
    from canonwrap.metrics.io import read_xyz

    out = Path(args.out)
    model, cfg, _ = load_trained(out, args.weights, args.device)
    if not (out / "samples.xyz").exists():
        raise FileNotFoundError(f"{out / 'samples.xyz'} not found: run `sample` first")
    molecules = read_xyz(out / "samples.xyz")
    train_smiles = reference_smiles(cfg["remove_h"], progress=not args.no_progress)
    metrics = evaluate(molecules, train_smiles=train_smiles, canonicalize_train=False,
                       progress=not args.no_progress)
    test = load_split("test", cfg, args.nll_size or cfg["nll_size"])
    nll = heldout_nll(model, _loader(test, 64, shuffle=False))
    valid = load_split("valid", cfg, cfg["val_size"])
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
    return result


def reference_smiles(remove_h: bool, progress: bool = True) -> list[str]:
    """Training SMILES rewritten in the metric's convention (for novelty), cached on disk.

    Rewriting 100,000 SMILES with RDKit takes about a minute, so the result is stored next
    to the QM9 cache and reused.
    """
    from canonwrap.data.qm9 import default_cache_dir
    from canonwrap.metrics.molecules import canonicalize_smiles

    path = default_cache_dir() / f"train_smiles_metric_v1{'_noh' if remove_h else ''}.txt"
    if path.exists():
        return path.read_text().splitlines()
    raw = QM9("train", remove_h=remove_h, progress=False).smiles()
    if progress:
        from tqdm.auto import tqdm

        raw = tqdm(raw, desc="training SMILES for novelty", unit="mol")
    out = [c for c in (canonicalize_smiles(s) for s in raw) if c is not None]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("\n".join(out))
    os.replace(tmp, path)
    return out


def cmd_all(args: argparse.Namespace) -> dict[str, Any]:
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
        sp.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--weights", choices=["ema", "raw"], default=None,
                        help="weights used to evaluate and sample (default: the preset's)")

    def train_args(sp):
        sp.add_argument("--model", choices=MODELS, required=True)
        sp.add_argument("--preset", choices=list(PRESETS), default="full")
        sp.add_argument("--quick", action="store_true", help="2-CPU preset (~10 minutes)")
        sp.add_argument("--remove-h", action="store_true", help="QM9 without hydrogens")
        sp.add_argument("--resume", action="store_true", help="continue from checkpoints")
        sp.add_argument("--tensorboard", action="store_true",
                        help="also log losses and evaluations to <out>/tensorboard")
        for key, value in PRESETS["full"].items():
            if key in ("weights", "num_samples", "sample_batch", "nll_size"):
                continue  # sampling/evaluation flags, defined with those commands
            kind = float if isinstance(value, float) or key == "max_minutes" else int
            if isinstance(value, str):
                kind = str
            sp.add_argument("--" + key.replace("_", "-"), type=kind, default=None,
                            dest=key, help=f"(full preset: {value})")

    def sample_args(sp):
        sp.add_argument("--num-samples", type=int, default=None)
        sp.add_argument("--sample-batch", type=int, default=None)
        sp.add_argument("--sampler", choices=["ancestral", "ddim", "dpm"], default="ancestral")
        sp.add_argument("--steps", type=int, default=None, help="sampling steps (default T)")

    def eval_args(sp):
        sp.add_argument("--nll-size", type=int, default=None, help="test molecules for NLL")

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
    train_args(sp)
    sample_args(sp)
    eval_args(sp)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if "LOCAL_RANK" in os.environ and args.command != "train":
        raise SystemExit("under torchrun only `train` runs (sample and evaluate on one process)")
    if args.threads:
        torch.set_num_threads(args.threads)
    commands = {"train": cmd_train, "sample": cmd_sample, "evaluate": cmd_evaluate,
                "all": cmd_all}
    return commands[args.command](args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main(sys.argv[1:])
