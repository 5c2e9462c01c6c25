"""Learning curves on QM9: held-out loss and NLL against steps and seconds, over seeds.

Trains each configuration for each seed with ``examples/qm9.py train`` (run as a separate
process, one CPU thread each, at most ``--jobs`` at once: one per core), reads the
evaluations that the trainer writes to ``log.jsonl`` (held-out denoising loss on a fixed
validation draw, Monte-Carlo NLL bound, and the frame drift of learned canonicalizers),
and writes ``curves.json``, a Markdown table (mean ± sd over seeds at the last
evaluation) and plots (loss vs steps, loss vs seconds, NLL vs steps, frame drift).

A configuration is ``NAME`` or ``NAME:key=value,key=value`` where NAME is a model
shorthand of the QM9 example (``gdm``, ``edm``, ``canon-gdm``, ...) or
``DENOISER+CANONICALIZER`` (``transformer+pca``), and each key is a training flag of the
example without its dashes (``canon_lr_ratio=0.001``, ``canon_warmup=500``); a value may
hold commas (``transformer+pca:objective=flow,flow_time=beta:2,1``).

Example (the command behind docs/results/qm9.md's learning curves)::

    python benchmarks/learning_curves.py --out runs/curves --seeds 0 1 2 \\
        --max-steps 1500 --eval-every 250 --jobs 2 \\
        --configs gdm edm canon-gdm canon-frozen-gdm pca-gdm \\
                  transformer+com transformer+pca transformer+egnn
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from canonwrap.training.logs import read_evaluations

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "qm9.py"


def parse_config(spec: str) -> tuple[str, list[str]]:
    """``NAME[:k=v,...]`` -> (label, flags for ``qm9.py train``)."""
    name, _, extra = spec.partition(":")
    if "+" in name:
        denoiser, _, canon = name.partition("+")
        flags = ["--denoiser", denoiser, "--canonicalizer", canon]
    else:
        flags = ["--model", name]
    # a comma starts a new option only before ``key=``: values may hold commas
    # (``flow_time=beta:2,1``)
    for item in filter(None, re.split(r",(?=\s*[A-Za-z_][A-Za-z0-9_]*=)", extra)):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad option {item!r} in {spec!r}: expected key=value")
        flag = "--" + key.strip().replace("_", "-")
        flags += [flag] if value.strip().lower() == "true" else [flag, value.strip()]
    return spec.replace(":", "_").replace(",", "_").replace("=", "-"), flags


class LoadRecorder:
    """Samples the 1-minute load average every ``period`` seconds in a thread."""

    def __init__(self, period: float = 15.0) -> None:
        self.period = period
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _stdout_path(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}.stdout.txt"


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for spec in args.configs:
        label, flags = parse_config(spec)
        for seed in args.seeds:
            run_dir = out / label / f"seed{seed}"
            cmd = [
                sys.executable,
                str(EXAMPLE),
                "train",
                "--quick",
                "--threads",
                "1",
                "--no-progress",
                "--seed",
                str(seed),
                "--max-steps",
                str(args.max_steps),
                "--eval-every",
                str(args.eval_every),
                "--out",
                str(run_dir),
                *flags,
            ]
            if args.max_minutes is not None:
                cmd += ["--max-minutes", str(args.max_minutes)]
            if (run_dir / "train_result.json").exists():
                cmd = None  # finished earlier: reuse (delete the folder to rerun)
            elif run_dir.exists():
                # an unfinished run (interrupted): start it again from scratch, so that
                # its seconds are one uninterrupted clock; qm9.py refuses an occupied
                # folder without --overwrite
                cmd.append("--overwrite")
            jobs.append((spec, label, seed, run_dir, cmd))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    running: list[tuple[Any, subprocess.Popen]] = []
    pending = [j for j in jobs if j[4] is not None]
    print(f"[curves] {len(jobs)} runs, {len(pending)} to train, {args.jobs} at a time", flush=True)
    start = time.monotonic()
    with LoadRecorder() as load:
        while pending or running:
            while pending and len(running) < args.jobs:
                job = pending.pop(0)
                # the console output sits beside the run folder: qm9.py claims the
                # folder itself and refuses one that holds files it did not write
                job[3].parent.mkdir(parents=True, exist_ok=True)
                log = open(_stdout_path(job[3]), "w")
                proc = subprocess.Popen(job[4], stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append((job, proc))
                print(f"[curves] start {job[1]} seed {job[2]}", flush=True)
            time.sleep(2)
            for item in list(running):
                job, proc = item
                if proc.poll() is not None:
                    running.remove(item)
                    status = "done" if proc.returncode == 0 else f"FAILED rc={proc.returncode}"
                    print(
                        f"[curves] {status} {job[1]} seed {job[2]} "
                        f"({time.monotonic() - start:.0f} s since start)",
                        flush=True,
                    )
                    if proc.returncode != 0:
                        raise SystemExit(f"run failed; see {_stdout_path(job[3])}")
    results: dict[str, Any] = {
        "configs": {},
        "command": " ".join(sys.argv),
        "load_average_samples": load.samples,
        "max_steps": args.max_steps,
        "jobs": args.jobs,
    }
    for spec, label, seed, run_dir, _ in jobs:
        entry = results["configs"].setdefault(spec, {"label": label, "runs": {}})
        cfg = json.loads((run_dir / "config.json").read_text())
        entry["parameters"] = cfg.get("parameters")
        entry["runs"][str(seed)] = {
            "initial": json.loads((run_dir / "initial.json").read_text())["val_loss"],
            "evals": read_evaluations(run_dir / "checkpoints" / "log.jsonl"),
        }
    (out / "curves.json").write_text(json.dumps(results, indent=2))
    return results


def _stats(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{mean(values):.4g} ± {stdev(values):.2g}"


def summarise(results: dict[str, Any]) -> str:
    """Markdown table: last evaluation of each configuration, mean ± sd over seeds."""
    lines = [
        "| configuration | parameters (denoiser / canonicalizer) | seeds | steps | "
        "held-out loss | val NLL (nats) | seconds | s per 1k steps | frame drift, "
        "last interval (°) | total drift (°) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for spec, entry in results["configs"].items():
        lasts = [r["evals"][-1] for r in entry["runs"].values() if r["evals"]]
        params = entry.get("parameters") or {}
        drift = [e["frame_drift_deg"] for e in lasts if "frame_drift_deg" in e]
        total = [e["frame_drift_total_deg"] for e in lasts if "frame_drift_total_deg" in e]
        rate = [1000 * e["elapsed"] / e["step"] for e in lasts if e["step"]]
        lines.append(
            f"| {spec} | {params.get('denoiser', '?'):,} / {params.get('canonicalizer', 0):,} | "
            f"{len(lasts)} | {lasts[0]['step'] if lasts else '-'} | "
            f"{_stats([e['val_loss'] for e in lasts])} | "
            f"{_stats([e['val_nll'] for e in lasts if 'val_nll' in e])} | "
            f"{_stats([e['elapsed'] for e in lasts])} | {_stats(rate)} | "
            f"{_stats(drift) if drift else '-'} | {_stats(total) if total else '-'} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], folder: Path) -> list[Path]:
    """Loss vs steps, loss vs seconds, NLL vs steps and frame drift vs steps (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    panels = [
        ("val_loss", "step", "held-out denoising loss", "training step", "loss_vs_steps"),
        (
            "val_loss",
            "elapsed",
            "held-out denoising loss",
            "seconds (one core each)",
            "loss_vs_seconds",
        ),
        ("val_nll", "step", "validation NLL bound (nats)", "training step", "nll_vs_steps"),
        (
            "frame_drift_deg",
            "step",
            "median frame change since last eval (°)",
            "training step",
            "frame_drift",
        ),
    ]
    paths = []
    for key, xkey, ylabel, xlabel, name in panels:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = False
        for spec, entry in results["configs"].items():
            runs = [r["evals"] for r in entry["runs"].values()]
            n = min((len(r) for r in runs), default=0)
            if n == 0 or key not in runs[0][-1]:
                continue
            ys = np.array([[e.get(key, np.nan) for e in r[:n]] for r in runs], dtype=float)
            xs = np.array([[e[xkey] for e in r[:n]] for r in runs], dtype=float).mean(0)
            m, s = np.nanmean(ys, 0), np.nanstd(ys, 0)
            ax.plot(xs, m, marker="o", ms=3, label=spec)
            ax.fill_between(xs, m - s, m + s, alpha=0.2)
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        if key == "val_nll":
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"QM9, quick sizes, mean ± sd over seeds ({name.replace('_', ' ')})")
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the runs and curves.json")
    p.add_argument(
        "--configs",
        nargs="+",
        required=True,
        help="configurations: NAME or DENOISER+CANONICALIZER, optionally :k=v,...",
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default: 0 1 2)"
    )
    p.add_argument(
        "--max-steps", type=int, default=1500, help="training steps per run (default: 1500)"
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="also stop each run after this many minutes (default: no limit)",
    )
    p.add_argument(
        "--eval-every", type=int, default=250, help="steps between evaluations (default: 250)"
    )
    p.add_argument(
        "--jobs", type=int, default=2, help="runs at once; keep at most one per core (default: 2)"
    )
    p.add_argument("--plots", default=None, help="folder for the PNG plots (default: <out>/plots)")
    args = p.parse_args(argv)
    results = run_all(args)
    table = summarise(results)
    (Path(args.out) / "table.md").write_text(table + "\n")
    print(table, flush=True)
    for path in plot(results, Path(args.plots or Path(args.out) / "plots")):
        print(f"[curves] wrote {path}", flush=True)
    return results


if __name__ == "__main__":
    main()
