r"""Speed and memory of GDM, EDM and canonicalized GDM on QM9, side by side in one run.

For each model size (``quick``: the CPU preset of ``examples/qm9.py``; ``full``: the published
sizes, GNN/EGNN 256 x 9 and canonicalizer 64 x 9, transformer 256 x 8), each model (built
by ``canonwrap.recipes``, as the QM9 example builds it) and each objective of
``--objectives`` (``diffusion``, the default, and/or ``flow``: flow matching with the same
denoiser and canonicalizer) it measures

* **sampling**: seconds per molecule when sampling ``--num-molecules`` molecules in one
  batch (sizes drawn from QM9's training histogram); diffusion by default with 1000
  ancestral steps (``--sampler``, ``--sample-steps``), flow matching by integrating the
  ODE with ``--flow-sampler`` (``method:steps``, default ``euler:50``, or the adaptive
  ``dopri5``), whose denoiser calls are counted as they run;
* **training**: optimizer steps per second on batches of real QM9 training molecules
  (loss, backward, EDM's adaptive gradient clipping, AdamW; data loading not timed);
* **peak memory** of each phase above what the process held before it: on the CPU the
  high-water mark of the resident set (``getrusage`` ``ru_maxrss``) minus the resident set
  at the start, in a fresh subprocess per configuration; on a GPU
  ``torch.cuda.max_memory_allocated`` minus the allocation at the start.

Results are printed as a markdown table with ratios against EDM (trained as a diffusion
model) and written, with the machine's description and the exact command, to
``<out>/bench_qm9.md`` and ``<out>/bench_qm9.json``. See ``benchmarks/README.md``.

Examples
--------
::

    python benchmarks/bench_qm9.py --sizes quick --threads 2 --num-molecules 20 --sample-steps 100
    python benchmarks/bench_qm9.py --sizes quick,full --device cuda --num-molecules 500
    python benchmarks/bench_qm9.py --sizes quick --models edm,pca-transformer \
        --objectives diffusion,flow --flow-sampler midpoint:10 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from canonwrap.recipes import (
    OBJECTIVES,
    OPTIMIZATION,
    SHORTHANDS,
    make_sampler,
    preset_config,
    qm9_model,
    qm9_optimizer,
    sampling_options,
)

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("quick", "full")
MODELS = tuple(SHORTHANDS)
PHASES = ("sample", "train")
SAMPLERS = ("ancestral", "ddim", "dpm")
FLOW_WARMUP = {"method": "euler", "steps": 2}
RESULT_MARKER = "BENCH_QM9_RESULT "
MIB = 1024.0 * 1024.0


# ------------------------------------------------------------------------- helpers
def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int, device: str) -> dict[str, Any]:
    """CPU model, core count, threads, library versions and GPU (if used)."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def _current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="utf-8") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


class PeakMemory:
    """Peak memory of a block of work above the memory in use when it starts.

    Parameters
    ----------
    device:
        ``cpu``: resident set size (``ru_maxrss`` after the block minus the resident set at
        its start); only attributable in a process that ran nothing else before, so
        ``enabled=False`` reports ``None``. ``cuda``: ``torch.cuda.max_memory_allocated``.
    enabled:
        Measure at all.
    """

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.device = device
        self.enabled = enabled
        self.start_bytes: int | None = None
        self.start_peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.start_bytes = _current_rss_bytes()
            self.start_peak = _maxrss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def result(self) -> dict[str, Any]:
        """``peak_mib`` (above the start), ``total_peak_mib`` and ``upper_bound``."""
        if not self.enabled or self.start_bytes is None:
            return {"peak_mib": None, "total_peak_mib": None, "upper_bound": False}
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            return {
                "peak_mib": (peak - self.start_bytes) / MIB,
                "total_peak_mib": peak / MIB,
                "upper_bound": False,
            }
        peak = _maxrss_bytes()
        # if the high-water mark did not move, the block's peak is at most this value
        return {
            "peak_mib": (peak - self.start_bytes) / MIB,
            "total_peak_mib": peak / MIB,
            "upper_bound": peak <= self.start_peak,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


# ------------------------------------------------------------------------- measurements
def describe_flow_sampler(options: dict[str, Any]) -> str:
    """``euler, 50 steps`` for the ``model.sample`` options of a flow sampler."""
    steps = options.get("steps")
    return f"{options['method']}, " + ("adaptive steps" if steps is None else f"{steps} steps")


class CallCounter:
    """Counts the forward calls of ``module`` inside a ``with`` block (a forward pre-hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.calls = 0
        self._handle: Any = None

    def _count(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self.calls += 1

    def __enter__(self) -> CallCounter:
        self._handle = self.module.register_forward_pre_hook(self._count)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def _timed_sampling(
    model: Any,
    nodes: torch.Tensor,
    options: dict[str, Any],
    warm: dict[str, Any],
    gen: torch.Generator,
    spec: dict[str, Any],
    device: torch.device,
    counter: CallCounter | None = None,
) -> tuple[list[float], list[int], dict[str, Any]]:
    """Seconds of each timed repeat of ``model.sample(**options)`` after one untimed call
    with ``warm`` (noise from ``gen``), the peak memory of it all, and with a ``counter``
    the denoiser calls of each timed repeat (else an empty list)."""
    times: list[float] = []
    calls: list[int] = []
    with PeakMemory(device, spec["measure_memory"]) as mem:
        model.sample(num_nodes=nodes, generator=gen, device=device, **warm)
        for r in range(spec["repeats"]):
            g = torch.Generator().manual_seed(spec["seed"] + 1 + r)
            if counter is not None:
                counter.calls = 0
            _sync(device)
            start = time.perf_counter()
            model.sample(num_nodes=nodes, generator=g, device=device, **options)
            _sync(device)
            times.append(time.perf_counter() - start)
            if counter is not None:
                calls.append(counter.calls)
    return times, calls, mem.result()


def _bench_sampling(
    model: Any, node_counts: Any, spec: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(spec["seed"])
    nodes = node_counts.sample(spec["num_molecules"], generator=gen)
    model.eval()
    extra: dict[str, Any] = {}
    if spec.get("objective", "diffusion") == "flow":
        options = dict(spec["flow_sampler"])
        description = describe_flow_sampler(options)
        with CallCounter(model.denoiser) as counter:  # one call evaluates the whole batch
            times, calls, memory = _timed_sampling(
                model, nodes, options, FLOW_WARMUP, gen, spec, device, counter
            )
        # fixed-step methods make the same calls in every repeat; dopri5 need not
        evaluations = int(statistics.median_low(calls))
        ms_per_evaluation = _median([1000.0 * t / n for t, n in zip(times, calls)])
        extra["denoiser_evaluations_per_repeat"] = calls
    else:
        sampler = make_sampler(spec["sampler"], spec["steps"])
        description = repr(sampler)
        warm = {"sampler": make_sampler(spec["sampler"], 2)}
        times, _, memory = _timed_sampling(
            model, nodes, {"sampler": sampler}, warm, gen, spec, device
        )
        evaluations = len(sampler.steps(model.timesteps))  # loop steps + the final t = 0 one
        ms_per_evaluation = 1000.0 * _median(times) / evaluations
    return {
        "sampler": description,
        "num_molecules": int(nodes.numel()),
        "mean_atoms": float(nodes.double().mean()),
        "denoiser_evaluations": evaluations,
        **extra,
        "sample_seconds": times,
        "sample_s_per_molecule": _median(times) / nodes.numel(),
        "sample_ms_per_evaluation": ms_per_evaluation,
        "sample_memory": memory,
    }


def _bench_training(
    model: Any, train: Any, cfg: dict[str, Any], spec: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    from torch_geometric.loader import DataLoader

    from canonwrap.training import GradNormQueue, clip_grad_adaptive

    batch_size = spec["batch_size"] or cfg["batch_size"]
    loader = DataLoader(
        train,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(spec["seed"]),
    )
    needed = spec["warmup"] + spec["repeats"] * spec["train_steps"]
    batches, it = [], iter(loader)
    while len(batches) < needed:  # load before timing; cycle if the data run out
        batch = next(it, None)
        if batch is None:
            it = iter(loader)
            continue
        batches.append(batch.to(device))
    optimizer = qm9_optimizer(model, cfg["lr"], cfg["canon_lr_ratio"])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    queue = GradNormQueue()
    model.train()

    def step(batch: Any) -> None:
        loss = model.training_loss(batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_adaptive(params, queue)
        optimizer.step()

    with PeakMemory(device, spec["measure_memory"]) as mem:
        for batch in batches[: spec["warmup"]]:
            step(batch)
        times = []
        for r in range(spec["repeats"]):
            window = batches[spec["warmup"] + r * spec["train_steps"] :][: spec["train_steps"]]
            _sync(device)
            start = time.perf_counter()
            for batch in window:
                step(batch)
            _sync(device)
            times.append(time.perf_counter() - start)
    steps_per_s = spec["train_steps"] / _median(times)
    return {
        "batch_size": batch_size,
        "train_steps": spec["train_steps"],
        "train_seconds": times,
        "train_steps_per_s": steps_per_s,
        "train_molecules_per_s": steps_per_s * batch_size,
        "train_memory": mem.result(),
    }


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration (``size``, ``model``, ``objective``, ``phase``) here; its numbers."""
    from canonwrap import NodeCountDistribution
    from canonwrap.data import QM9

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cfg = dict(OPTIMIZATION[spec["size"]])
    mcfg = preset_config(spec["size"], *SHORTHANDS[spec["model"]])
    if spec.get("mlp_ratio") is not None:
        mcfg.mlp_ratio = spec["mlp_ratio"]
    mcfg.objective = spec.get("objective", "diffusion")
    torch.manual_seed(spec["seed"])
    train = QM9("train", progress=False)
    node_counts = NodeCountDistribution(train.node_count_histogram())
    model = qm9_model(mcfg, node_counts).to(device)
    learned_canon = mcfg.canonicalizer.startswith("egnn")
    row: dict[str, Any] = {
        "size": spec["size"],
        "model": spec["model"],
        "objective": mcfg.objective,
        "phase": spec["phase"],
        "denoiser": f"{mcfg.denoiser} {mcfg.hidden} x {mcfg.layers}",
        "canonicalizer": (
            f"{mcfg.canon_hidden} x {mcfg.canon_layers}" if learned_canon else mcfg.canonicalizer
        ),
        "parameters": {
            "denoiser": sum(p.numel() for p in model.denoiser.parameters()),
            "canonicalizer": sum(p.numel() for p in model.canonicalizer.parameters()),
        },
    }
    if spec["phase"] == "sample":
        row.update(_bench_sampling(model, node_counts, spec, device))
    else:
        row.update(_bench_training(model, train, cfg, spec, device))
    return row


def measure_in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure` in a fresh Python process (so that its peak memory is its own)."""
    env = dict(
        os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"])
    )
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = (proc.stderr or proc.stdout)[-3000:]
    raise RuntimeError(f"worker for {spec['label']} failed (exit code {proc.returncode}):\n{tail}")


# ------------------------------------------------------------------------- report
def config_label(entry: dict[str, Any], show_objective: bool) -> str:
    """``size/model/phase`` of a configuration, ``size/model/objective/phase`` if asked."""
    parts = [entry["size"], entry["model"], entry.get("objective", "diffusion"), entry["phase"]]
    if not show_objective:
        del parts[2]
    return "/".join(parts)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _mem(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key) or {}
    return value.get("peak_mib")


def merge_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (size, model, objective) holding the numbers of all its phases."""
    merged: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["size"], row["model"], row.get("objective", "diffusion"))
        entry = merged.setdefault(key, {})
        entry.update({k: v for k, v in row.items() if k != "phase"})
    return list(merged.values())


def ratios_vs_edm(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size, model and objective: sampling time, training speed and memory divided by
    those of EDM trained as a diffusion model (the reference) at the same size."""
    edm = {
        r["size"]: r
        for r in results
        if r["model"] == "edm" and r.get("objective", "diffusion") == "diffusion"
    }
    out = []
    for r in results:
        ref = edm.get(r["size"])
        if ref is None:
            continue
        out.append(
            {
                "size": r["size"],
                "model": r["model"],
                "objective": r.get("objective", "diffusion"),
                "sample_time": _ratio(
                    r.get("sample_s_per_molecule"), ref.get("sample_s_per_molecule")
                ),
                "train_speed": _ratio(r.get("train_steps_per_s"), ref.get("train_steps_per_s")),
                "sample_memory": _ratio(_mem(r, "sample_memory"), _mem(ref, "sample_memory")),
                "train_memory": _ratio(_mem(r, "train_memory"), _mem(ref, "train_memory")),
            }
        )
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _fmt_mem(row: dict[str, Any], key: str) -> str:
    value = row.get(key) or {}
    if value.get("peak_mib") is None:
        return "n/a"
    return ("<= " if value.get("upper_bound") else "") + format(value["peak_mib"], ".0f")


def _samplers_text(settings: dict[str, Any]) -> str:
    """The samplers of the run's objectives (just ``sampler ...`` for diffusion alone)."""
    objectives = settings.get("objectives", ["diffusion"])
    if objectives == ["diffusion"]:
        return f"sampler {settings['sampler_repr']}"
    parts = []
    if "diffusion" in objectives:
        parts.append(f"diffusion sampler {settings['sampler_repr']}")
    if "flow" in objectives:
        parts.append(f"flow-matching ODE solver {settings['flow_sampler_repr']}")
    return ", ".join(parts)


def to_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: machine, command, one table with ratios against EDM."""
    m = report["machine"]
    s = report["settings"]
    ratios = {
        (r["size"], r["model"], r.get("objective", "diffusion")): r for r in report["ratios_vs_edm"]
    }
    reference = "EDM" if s.get("objectives", ["diffusion"]) == ["diffusion"] else "diffusion EDM"
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    lines = [
        "## QM9: sampling and training cost",
        "",
        f"Machine: {m['cpu']} ({m['logical_cpus']} logical CPUs), {m['threads']} torch "
        f"threads, device {m['device']}{gpu}; torch {m['torch']}, Python {m['python']}.",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Sampling: {s['num_molecules']} molecules per batch, {_samplers_text(s)}. "
        + (f"Transformer feed-forward ratio {s['mlp_ratio']}. " if s.get("mlp_ratio") else "")
        + f"Training: batch size {s['batch_size'] or 'of the preset'}, {s['train_steps']} timed "
        f"steps. Times are medians of {s['repeats']} repeats; memory is the peak above the "
        f"memory in use before the phase (MiB). Ratios divide by {reference} at the same size.",
        "",
        "| size | model | objective | parameters (denoiser + canon.) | sampling s/molecule "
        "| ÷ EDM | ms per denoiser call | training steps/s | ÷ EDM | sampling peak MiB | ÷ EDM "
        "| training peak MiB | ÷ EDM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        objective = r.get("objective", "diffusion")
        q = ratios.get((r["size"], r["model"], objective), {})
        p = r.get("parameters", {})
        params = f"{p.get('denoiser', 0):,} + {p.get('canonicalizer', 0):,}"
        lines.append(
            f"| {r['size']} | {r['model']} | {objective} | {params} "
            f"| {_fmt(r.get('sample_s_per_molecule'), '.4g')} "
            f"| {_fmt(q.get('sample_time'), '.2f')} "
            f"| {_fmt(r.get('sample_ms_per_evaluation'), '.3g')} "
            f"| {_fmt(r.get('train_steps_per_s'), '.3g')} | {_fmt(q.get('train_speed'), '.2f')} "
            f"| {_fmt_mem(r, 'sample_memory')} | {_fmt(q.get('sample_memory'), '.2f')} "
            f"| {_fmt_mem(r, 'train_memory')} | {_fmt(q.get('train_memory'), '.2f')} |"
        )
    if report["errors"]:
        lines += ["", "Failed configurations:", ""]
        show = s.get("objectives", ["diffusion"]) != ["diffusion"]
        lines += [
            f"- {config_label(e, show)}: {e['error'].splitlines()[0]}" for e in report["errors"]
        ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------- CLI
def _choices(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"{what}: {', '.join(bad) or 'none given'}; choose from {', '.join(allowed)}"
        )
    return items


def flow_sampler(value: str) -> dict[str, Any]:
    """``--flow-sampler``: ``method:steps`` or ``dopri5`` as the options of ``model.sample``."""
    name, colon, steps_text = value.strip().partition(":")
    steps: int | None = None
    if colon:
        try:
            steps = int(steps_text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{value!r}: steps {steps_text!r} are not an integer; "
                "use method:steps (e.g. euler:50) or dopri5"
            ) from None
        if steps < 1:
            raise argparse.ArgumentTypeError(f"{value!r}: steps must be >= 1, got {steps}")
    try:
        return sampling_options("flow", name, steps)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{value!r}: {err}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--sizes",
        default="quick,full",
        type=lambda v: _choices(v, SIZES, "--sizes"),
        help="comma-separated: quick (CPU preset), full (published sizes)",
    )
    p.add_argument(
        "--models",
        default="gdm,edm,canon-gdm,pca-transformer,canon-transformer",
        type=lambda v: _choices(v, MODELS, "--models"),
        help="comma-separated",
    )
    p.add_argument(
        "--phases",
        default="sample,train",
        type=lambda v: _choices(v, PHASES, "--phases"),
        help="comma-separated",
    )
    p.add_argument(
        "--objectives",
        default="diffusion",
        type=lambda v: _choices(v, OBJECTIVES, "--objectives"),
        help="comma-separated: diffusion, flow (flow matching, same networks); default diffusion",
    )
    p.add_argument(
        "--num-molecules",
        type=int,
        default=100,
        help="molecules sampled in one batch (default 100)",
    )
    p.add_argument("--sampler", choices=SAMPLERS, default="ancestral", help="diffusion sampler")
    p.add_argument(
        "--sample-steps",
        type=int,
        default=None,
        help="diffusion sampling steps (default: ancestral 1000, ddim 50, dpm 20)",
    )
    p.add_argument(
        "--flow-sampler",
        default="euler:50",
        type=flow_sampler,
        help="flow matching's ODE solver: method:steps with a fixed-step method "
        "(euler: steps denoiser calls, midpoint: 2 x steps, also heun2, heun3, rk4) "
        "or dopri5 (adaptive); default euler:50",
    )
    p.add_argument("--train-steps", type=int, default=20, help="timed training steps per repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="training batch size (default: the preset's, quick 32, full 64)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; medians reported")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<i>")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's default on this machine)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--mlp-ratio",
        type=float,
        default=None,
        help="feed-forward width of the transformer models relative to their width "
        "(default: the presets' 4)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="folder for bench_qm9.json and bench_qm9.md (default benchmarks/results/qm9-<device>)",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run every configuration in this process: faster (smoke tests), but "
        "CPU peak memory is then not attributable and reported as n/a",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the report (also written to ``--out``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.worker is not None:
        row = measure(json.loads(args.worker))
        print(RESULT_MARKER + json.dumps(row), flush=True)
        return row
    for name in ("num_molecules", "train_steps", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise SystemExit("--warmup must be >= 0")
    if args.sample_steps is not None and args.sample_steps < 1:
        raise SystemExit(f"--sample-steps must be >= 1, got {args.sample_steps}")
    try:
        sampler = sampling_options("diffusion", args.sampler, args.sample_steps)["sampler"]
    except ValueError as err:
        raise SystemExit(
            f"--sampler {args.sampler} --sample-steps {args.sample_steps}: {err}"
        ) from None
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    machine = machine_info(threads, str(device))
    print(
        f"[bench] {machine['cpu']} ({machine['logical_cpus']} logical CPUs), {threads} "
        f"threads, device {device}{', ' + machine['gpu'] if 'gpu' in machine else ''}, "
        f"torch {machine['torch']}",
        flush=True,
    )

    isolate = not args.in_process
    show_objective = args.objectives != ["diffusion"]
    rows, errors = [], []
    configurations = [
        (size, model, objective, phase)
        for size in args.sizes
        for model in args.models
        for objective in args.objectives
        for phase in args.phases
    ]
    for size, model, objective, phase in configurations:
        spec = {
            "size": size,
            "model": model,
            "objective": objective,
            "phase": phase,
            "num_molecules": args.num_molecules,
            "sampler": args.sampler,
            "steps": args.sample_steps,
            "flow_sampler": args.flow_sampler,
            "train_steps": args.train_steps,
            "warmup": args.warmup,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "device": str(device),
            "threads": threads,
            "seed": args.seed,
            "mlp_ratio": args.mlp_ratio,
            "measure_memory": isolate or device.type == "cuda",
        }
        spec["label"] = label = config_label(spec, show_objective)
        start = time.perf_counter()
        try:
            row = measure_in_subprocess(spec) if isolate else measure(spec)
        except Exception as exc:  # keep going: report what failed
            errors.append(
                {
                    "size": size,
                    "model": model,
                    "objective": objective,
                    "phase": phase,
                    "error": f"{type(exc).__name__}: {exc}",
                }
            )
            print(f"[bench] {label}: FAILED {exc}", flush=True)
            continue
        rows.append(row)
        key = "sample_s_per_molecule" if phase == "sample" else "train_steps_per_s"
        unit = "s/molecule" if phase == "sample" else "steps/s"
        print(
            f"[bench] {label}: {row[key]:.4g} {unit} ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )

    results = merge_rows(rows)
    report = {
        "benchmark": "qm9",
        "command": "python benchmarks/bench_qm9.py " + shlex.join(argv),
        "machine": machine,
        "settings": {
            "sizes": args.sizes,
            "models": args.models,
            "phases": args.phases,
            "objectives": args.objectives,
            "num_molecules": args.num_molecules,
            "sampler": args.sampler,
            "steps": args.sample_steps,
            "sampler_repr": repr(sampler),
            "flow_sampler": args.flow_sampler,
            "flow_sampler_repr": describe_flow_sampler(args.flow_sampler),
            "train_steps": args.train_steps,
            "warmup": args.warmup,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "seed": args.seed,
            "mlp_ratio": args.mlp_ratio,
            "isolated_processes": isolate,
        },
        "results": results,
        "ratios_vs_edm": ratios_vs_edm(results),
        "errors": errors,
    }
    markdown = to_markdown(report)
    print(markdown, flush=True)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"qm9-{device.type}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_qm9.json").write_text(json.dumps(report, indent=2))
    (out / "bench_qm9.md").write_text(markdown)
    print(f"[bench] wrote {out / 'bench_qm9.md'} and {out / 'bench_qm9.json'}", flush=True)
    return report


if __name__ == "__main__":
    sys.exit(1 if main().get("errors") else 0)
