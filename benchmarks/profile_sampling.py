"""Where the time of one QM9 sampling run goes: denoiser, edges, sampler math, the rest.

Builds a model with ``canonwrap.recipes``, as ``examples/qm9.py`` does (untrained weights:
the cost of a step does not depend on them), samples one batch under ``torch.profiler`` and prints

1. a breakdown by stage, from labelled ranges (``record_function``) put around the
   denoiser's forward pass, the construction of the fully connected edge lists, EGNN's
   edge geometry (differences and distances), the sampler's update, and the noise draws
   and centre-of-mass projections; "rest" is the sampling loop's own work (schedule
   lookups, broadcasting, batch bookkeeping);
2. the ``torch.profiler`` table of the most expensive operators (self time).

``--objective flow`` profiles the same networks sampled by flow matching
(``CanonicalizedFlowMatching``) with the ODE solver of ``--flow-sampler`` (``method:steps``
or ``dopri5``, as in ``bench_qm9.py``). Its stages differ where the samplers differ: in
place of the sampler's update it labels the conversion of the ragged point-cloud state to
the dense tensor that ``flow_matching``'s solvers integrate and back ("pack / unpack"), and
"rest" is then the ODE solver's own arithmetic (``torchdiffeq``) and the loop around it.
The weights are untrained as for diffusion, so the number of calls of ``dopri5`` (which
depends on the velocity field) is not that of a trained model; fixed-step methods make
exactly ``steps`` (Euler) or ``2 * steps`` (midpoint) calls.

The profiler adds overhead per operator, so absolute times are higher than in
``bench_qm9.py``; the shares are what this script is for. On a GPU every labelled range
synchronises the device so that the ranges measure device time.

Examples
--------
::

    python benchmarks/profile_sampling.py --model edm --size quick --num-molecules 20 \
        --sample-steps 50
    python benchmarks/profile_sampling.py --model canon-gdm --size full --device cuda --trace t.json
    python benchmarks/profile_sampling.py --model pca-transformer --objective flow \
        --flow-sampler midpoint:10 --num-molecules 100 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qm9 import (  # noqa: E402
    FLOW_WARMUP,
    MODELS,
    SAMPLERS,
    SIZES,
    CallCounter,
    describe_flow_sampler,
    flow_sampler,
    machine_info,
)

#: labelled stages of a diffusion run, in display order; nested ones are indented under
#: their parent
STAGES: tuple[tuple[str, str], ...] = (
    ("denoiser forward", ""),
    ("edge construction", "denoiser forward"),
    ("edge geometry (EGNN)", "denoiser forward"),
    ("sampler step", ""),
    ("noise + projection", ""),
)
#: the same for flow matching: the dense packing of the ragged state replaces the sampler
#: step (the solver's arithmetic is part of the rest)
FLOW_STAGES: tuple[tuple[str, str], ...] = (
    ("denoiser forward", ""),
    ("edge construction", "denoiser forward"),
    ("edge geometry (EGNN)", "denoiser forward"),
    ("pack / unpack (ragged <-> dense)", ""),
    ("noise + projection", ""),
)


_OPEN: set[str] = set()  # labels whose range is open (a nested call is not counted twice)


def labelled(fn: Callable[..., Any], label: str, device: torch.device) -> Callable[..., Any]:
    """``fn`` wrapped in a profiler range named ``label`` (synchronising a GPU around it)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if label in _OPEN:
            return fn(*args, **kwargs)
        _OPEN.add(label)
        try:
            with record_function(label):
                out = fn(*args, **kwargs)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
        finally:
            _OPEN.discard(label)
        return out

    return wrapper


@contextlib.contextmanager
def instrumented(model: Any, sampler: Any, device: torch.device) -> Iterator[None]:
    """Labelled ranges around the stages of :data:`STAGES` (``sampler=None``, flow
    matching: of :data:`FLOW_STAGES`), removed again on exit.

    The edge functions are patched in the modules that call them, the other stages on
    the model's denoiser, its space and the sampler (instance attributes); flow
    matching's packing on the class that does it (one instance per ``sample`` call).
    """
    import canonwrap.flow as flow
    import canonwrap.nn.egnn as egnn
    import canonwrap.nn.gnn as gnn

    targets = [
        (gnn, "fully_connected_edges", "edge construction"),
        (egnn, "fully_connected_edges", "edge construction"),
        (egnn, "edge_geometry", "edge geometry (EGNN)"),
        (model.denoiser, "forward", "denoiser forward"),
        (model.space, "noise", "noise + projection"),
        (model.space, "project", "noise + projection"),
    ]
    if sampler is not None:
        targets.append((sampler, "step_with_history", "sampler step"))
    else:
        targets += [
            (flow._Packer, "pack", "pack / unpack (ragged <-> dense)"),
            (flow._Packer, "unpack", "pack / unpack (ragged <-> dense)"),
        ]
    missing = object()
    saved = []
    try:
        for obj, name, label in targets:
            saved.append((obj, name, vars(obj).get(name, missing)))
            setattr(obj, name, labelled(getattr(obj, name), label, device))
        yield
    finally:
        for obj, name, old in reversed(saved):
            if old is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


def stage_table(
    prof: Any, wall_s: float, stages: tuple[tuple[str, str], ...] = STAGES
) -> list[tuple[str, int, float, float]]:
    """``(label, calls, total ms, % of wall time)`` per stage, and the rest of the loop."""
    events = {e.key: e for e in prof.key_averages()}
    rows, top_level = [], 0.0
    for label, parent in stages:
        e = events.get(label)
        calls = int(e.count) if e is not None else 0
        ms = e.cpu_time_total / 1000.0 if e is not None else 0.0
        if not parent:
            top_level += ms
        name = ("  of which " if parent else "") + label
        rows.append((name, calls, ms, 100 * ms / 1000 / wall_s))
    rest = max(wall_s * 1000 - top_level, 0.0)
    rows.append(("rest of the loop", 0, rest, 100 * rest / 1000 / wall_s))
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=MODELS, default="edm")
    p.add_argument("--size", choices=SIZES, default="quick")
    p.add_argument("--num-molecules", type=int, default=20)
    p.add_argument(
        "--objective",
        choices=("diffusion", "flow"),
        default="diffusion",
        help="diffusion (--sampler, --sample-steps) or flow matching (--flow-sampler)",
    )
    p.add_argument("--sampler", choices=SAMPLERS, default="ancestral")
    p.add_argument("--sample-steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument(
        "--flow-sampler",
        type=flow_sampler,
        default="euler:50",
        help="flow matching's ODE solver: method:steps or dopri5 (default euler:50)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--row-limit", type=int, default=15, help="operators listed")
    p.add_argument("--trace", default=None, help="also write a Chrome trace to this file")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Profile one sampling run; returns the stage table and the wall time."""
    args = parser().parse_args(argv)
    from canonwrap import NodeCountDistribution
    from canonwrap.data import QM9
    from canonwrap.recipes import SHORTHANDS, make_sampler, preset_config, qm9_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = machine_info(torch.get_num_threads(), str(device))
    torch.manual_seed(args.seed)
    node_counts = NodeCountDistribution(QM9("train", progress=False).node_count_histogram())
    mcfg = preset_config(args.size, *SHORTHANDS[args.model])
    mcfg.objective = args.objective
    model = qm9_model(mcfg, node_counts).to(device).eval()
    gen = torch.Generator().manual_seed(args.seed)
    nodes = node_counts.sample(args.num_molecules, generator=gen)
    if args.objective == "flow":
        sampler, options = None, dict(args.flow_sampler)
        description = f"flow matching ({describe_flow_sampler(options)})"
        warm = FLOW_WARMUP
    else:
        sampler = make_sampler(args.sampler, args.sample_steps)
        options, description = {"sampler": sampler}, repr(sampler)
        warm = {"sampler": make_sampler(args.sampler, 2)}
    model.sample(num_nodes=nodes[:2], device=device, **warm)

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with (
        CallCounter(model.denoiser) as counter,
        instrumented(model, sampler, device),
        profile(activities=activities) as prof,
    ):
        start = time.perf_counter()
        with record_function("sampling run"):
            model.sample(num_nodes=nodes, generator=gen, device=device, **options)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start

    print(
        f"{machine['cpu']}, {machine['threads']} threads, device {device}, torch {machine['torch']}"
    )
    print(
        f"{args.model} ({args.size}: denoiser {mcfg.denoiser} {mcfg.hidden} x {mcfg.layers}), "
        f"{nodes.numel()} molecules ({nodes.sum().item()} atoms), {description}, "
        f"{counter.calls} denoiser calls: {wall:.3f} s under the profiler\n"
    )
    rows = stage_table(prof, wall, FLOW_STAGES if sampler is None else STAGES)
    print(f"{'stage':<34} {'calls':>7} {'total ms':>10} {'% wall':>7}")
    for label, calls, ms, pct in rows:
        print(f"{label:<34} {calls or '':>7} {ms:>10.1f} {pct:>6.1f}%")
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print("\n" + prof.key_averages().table(sort_by=sort_by, row_limit=args.row_limit))
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"trace written to {args.trace}")
    return {"wall_s": wall, "stages": rows, "denoiser_calls": counter.calls}


if __name__ == "__main__":
    main()
