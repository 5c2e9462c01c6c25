"""Paired test NLL of several QM9 runs: the same molecules and the same draws of t and noise.

``examples/qm9.py evaluate`` estimates each model's NLL bound with one random ``t`` per test
molecule, so the standard error of one model's mean is large (tens of nats on 1,000
molecules at the CPU preset). Two models scored on the same molecules with the same seed
draw the same ``t`` and noise for each molecule (checked: the generator must end in the
same state for every run), so the per-molecule difference cancels much of that spread.
This script reports each run's mean ± standard error, the mean of each term of its NLL,
and, for every run after the first, the paired difference to the first with its standard
error.

Runs of different objectives (``--objective flow`` beside diffusion) are compared too: the
flow model's exact ODE likelihood and the diffusion model's bound are both nats per molecule
on the same subspace with the same discrete-feature and size terms, but they consume the
random draws differently, so their difference is paired by molecule only
(``draws_shared: false`` in the output).

Example (the head-to-head of docs/results/qm9.md)::

    python benchmarks/paired_nll.py runs/h2h/pca-transformer runs/h2h/edm --nll-size 1000 \\
        --weights ema --threads 1 --out docs/results/qm9/h2h/paired_nll.json
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import torch


def _mean_se(x: torch.Tensor) -> tuple[float, float]:
    return float(x.mean()), float(x.std() / math.sqrt(x.numel()))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders of examples/qm9.py (two or more)")
    p.add_argument("--nll-size", type=int, default=1000, help="test molecules (default 1000)")
    p.add_argument(
        "--weights",
        choices=("ema", "raw"),
        default=None,
        help="weights to score (default: each run's setting)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the t and noise draws")
    p.add_argument(
        "--flow-method",
        default="dopri5",
        help="ODE method of a flow model's likelihood (default: %(default)s, adaptive)",
    )
    p.add_argument(
        "--flow-steps",
        type=int,
        default=100,
        help="steps of a fixed-step --flow-method such as midpoint (default: %(default)s)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="JSON file for the results (default: none)")
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        p.error("give at least two runs to compare")
    if args.threads:
        torch.set_num_threads(args.threads)

    from torch_geometric.loader import DataLoader

    from canonwrap.data.qm9 import QM9
    from canonwrap.evaluation import load_qm9_run, per_sample_nll

    per, per_terms, states, configs, objectives = {}, {}, [], [], []
    flow_options = {"method": args.flow_method, "steps": args.flow_steps}
    for run in args.runs:
        model, cfg = load_qm9_run(run, args.weights)
        configs.append(cfg)
        objectives.append(cfg.get("objective", "diffusion"))  # older runs: diffusion
        test = QM9("test", remove_h=cfg["remove_h"], progress=False).seeded_subset(args.nll_size)
        loader = DataLoader(test, batch_size=64, shuffle=False)
        options = flow_options if objectives[-1] == "flow" else {}
        terms, state = per_sample_nll(model, loader, args.seed, **options)
        per[run] = terms["nll"]
        per_terms[run] = {k: v for k, v in terms.items() if k != "nll"}
        states.append(state)
        mean, se = _mean_se(per[run])
        print(f"[paired_nll] {run}: {mean:.2f} ± {se:.2f} nats ({per[run].numel()} molecules)")
    if len({cfg["remove_h"] for cfg in configs}) > 1:
        raise ValueError("the runs differ in remove_h: they were trained on different data")
    first = args.runs[0]
    differences = {}
    for run, state in zip(args.runs[1:], states[1:]):
        mean, se = _mean_se(per[run] - per[first])
        # a flow model's ODE likelihood (or a model that consumes the generator otherwise)
        # draws other noise than the first run: the difference is then paired by molecule
        # only, still an unbiased estimate with a valid standard error, just a wider one
        differences[run] = {"mean": mean, "se": se, "draws_shared": torch.equal(states[0], state)}
    result = {
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "nll_size": args.nll_size,
        "seed": args.seed,
        "objectives": dict(zip(args.runs, objectives)),
        "runs": {run: dict(zip(("mean", "se"), _mean_se(v))) for run, v in per.items()},
        # the terms whose sum is each run's NLL (diffusion: kl_prior, diffusion,
        # reconstruction, size; flow: flow, dequantization, reconstruction, size)
        "terms": {
            run: {k: dict(zip(("mean", "se"), _mean_se(v))) for k, v in t.items()}
            for run, t in per_terms.items()
        },
        "paired_difference_to_first": differences,
    }
    for run, t in result["terms"].items():
        shown = ", ".join(f"{k} {v['mean']:.2f} ± {v['se']:.2f}" for k, v in t.items())
        print(f"[paired_nll] {run} terms: {shown}")
    for run, d in differences.items():
        how = "same molecules, t and noise" if d["draws_shared"] else "same molecules only"
        print(
            f"[paired_nll] {run} - {first}: {d['mean']:+.2f} ± {d['se']:.2f} nats (paired: {how})"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
