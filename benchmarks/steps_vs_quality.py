"""Molecule quality versus number of sampling steps, from one trained checkpoint.

Samples the same number of molecules (same molecule sizes, same seed) from a run of
``examples/qm9.py`` with several samplers and step counts, evaluates each set with the
molecule metrics (with where the unstable atoms err: the share of atoms above and below
their allowed valence) and records the sampling time per molecule and the number of network
evaluations per batch (counted by a hook on the denoiser, so adaptive solvers are counted
as they ran).

Diffusion runs take the samplers ``ancestral``, ``ddim`` and ``dpm``; flow-matching runs
(``--objective flow``) take the ODE methods ``euler``, ``midpoint`` (fixed steps) and
``dopri5`` (adaptive; no step count, ``dopri5`` alone in the settings). A fixed-step flow
setting may end in ``@POWER``: its steps then follow the grid
``t_i = 1 - (1 - i / steps) ** POWER`` (``grid_power`` of ``CanonicalizedFlowMatching.sample``;
``euler:10@2`` takes steps that shrink towards the data end) instead of equal steps.
``euler_maruyama`` samples an SDE with the flow's marginals (``CanonicalizedFlowMatching.sample``);
a setting of it may end in ``~NOISE``, its ``noise_scale`` (``euler_maruyama:50~0.5``).

With ``--reference SETTING`` (one of the settings, a deterministic one: an ODE method, DDIM
or DPM-Solver), every other deterministic setting is also compared sample by sample with
the reference's samples, which start from the same noise: the RMS distance of atom
positions per molecule (mean ± standard error over molecules) and the fraction of atoms
whose type agrees. For a flow model and an accurate reference (``dopri5``) this is the
end-point error of a few-step solver, small when the learned paths are straight. Ancestral
sampling (and ``euler_maruyama``) draws fresh noise at every step, so it is not compared.

Usage::

    python benchmarks/steps_vs_quality.py --run runs/cpu/canon-gdm --num-molecules 100 \
        --out docs/results/qm9_steps
    python benchmarks/steps_vs_quality.py --run runs/fm/flow \
        --settings euler:10,euler:50,midpoint:10,dopri5 --out docs/results/qm9_flow_steps
    python benchmarks/steps_vs_quality.py --run runs/fm/flow --reference dopri5 \
        --settings euler:10,euler:10@2,midpoint:5,midpoint:5@2,dopri5 --out runs/fm/grid

Writes ``<out>.md`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qm9 import CallCounter  # noqa: E402

DIFFUSION_DEFAULT = "ancestral:1000,ancestral:250,dpm:250,dpm:100,dpm:50,dpm:25,ddim:50,ddim:25"
FLOW_DEFAULT = "euler:10,euler:20,euler:50,euler:100,midpoint:5,midpoint:10,midpoint:25,dopri5"


Setting = tuple[str, "int | None", "float | None", "float | None"]


def _settings(text: str) -> list[Setting]:
    """``(sampler, steps, grid power, noise)`` of each ``sampler[:steps][@power][~noise]``."""
    out = []
    for item in text.split(","):
        rest, tilde, noise = item.strip().partition("~")
        head, at, power = rest.partition("@")
        name, _, steps = head.partition(":")
        try:
            out.append(
                (
                    name,
                    int(steps) if steps else None,
                    float(power) if at else None,
                    float(noise) if tilde else None,
                )
            )
        except ValueError:
            raise ValueError(
                f"setting {item.strip()!r}: use sampler:steps or, for a fixed-step flow "
                "method, sampler:steps@power (e.g. euler:10@2), and for euler_maruyama "
                "sampler:steps~noise (e.g. euler_maruyama:50~0.5)"
            ) from None
    return out


def _label(key: Setting) -> str:
    name, steps, power, noise = key
    return (
        name
        + (f":{steps}" if steps is not None else "")
        + (f"@{power:g}" if power is not None else "")
        + (f"~{noise:g}" if noise is not None else "")
    )


def _distance(molecules: list, reference: list) -> dict[str, float]:
    """Per-molecule RMS distance of positions and the fraction of agreeing atom types."""
    rms, agree, atoms = [], 0, 0
    for (z, pos), (z_ref, pos_ref) in zip(molecules, reference):
        rms.append(float(((pos - pos_ref) ** 2).sum(-1).mean().sqrt()))
        agree += int((z == z_ref).sum())
        atoms += z.numel()
    values = torch.tensor(rms, dtype=torch.float64)
    se = float(values.std() / math.sqrt(len(rms))) if len(rms) > 1 else float("nan")
    return {"rms_distance": float(values.mean()), "rms_distance_se": se,
            "types_agree": agree / atoms}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="training folder of examples/qm9.py")
    parser.add_argument("--num-molecules", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument(
        "--settings",
        default=None,
        help="comma-separated sampler:steps pairs; diffusion runs: ancestral, ddim, dpm "
        f"(default {DIFFUSION_DEFAULT}); flow runs: euler, midpoint, dopri5 (no steps), "
        f"euler_maruyama (steps~noise) (default {FLOW_DEFAULT})",
    )
    parser.add_argument(
        "--reference",
        default=None,
        help="a deterministic setting of --settings (e.g. dopri5) whose samples the others "
        "are compared with, molecule by molecule (same noise)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--weights", choices=["ema", "raw"], default=None)
    parser.add_argument("--out", required=True, help="output path without extension")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from canonwrap.evaluation import load_qm9_run, qm9_reference_smiles
    from canonwrap.flow import DEFAULT_NOISE_SCALE, STOCHASTIC_METHODS, CanonicalizedFlowMatching
    from canonwrap.metrics import evaluate
    from canonwrap.recipes import sampling_options

    model, cfg = load_qm9_run(args.run, args.weights)
    flow = isinstance(model, CanonicalizedFlowMatching)
    settings = args.settings or (FLOW_DEFAULT if flow else DIFFUSION_DEFAULT)
    try:
        parsed = _settings(settings)
        ref_key = _settings(args.reference)[0] if args.reference is not None else None
    except ValueError as err:
        parser.error(str(err))
    objective = "flow" if flow else "diffusion"
    for key in parsed:  # every setting checked before any sampling
        name, steps, power, noise = key
        try:
            sampling_options(objective, name, steps, grid_power=power, noise_scale=noise)
        except ValueError as err:
            parser.error(f"{_label(key)}: {err}")
    stochastic = ("ancestral", *STOCHASTIC_METHODS)  # fresh noise at every step: no reference
    if args.reference is not None:
        if ref_key not in parsed:
            parser.error(f"--reference {args.reference} is not one of --settings {settings}")
        if ref_key[0] in stochastic:
            parser.error(f"--reference must be a deterministic sampler (not {ref_key[0]})")
    node_counts = model.space.node_counts
    reference = qm9_reference_smiles(cfg["remove_h"], progress=not args.no_progress)
    sizes = node_counts.sample(
        args.num_molecules, generator=torch.Generator().manual_seed(args.seed)
    )
    rows = []
    drawn = []  # the molecules of each setting, in order
    for key in parsed:
        name, steps, power, noise = key
        options = sampling_options(
            objective,
            name,
            steps,
            progress=not args.no_progress,
            grid_power=power,
            noise_scale=noise,
        )
        gen = torch.Generator().manual_seed(args.seed + 1)
        molecules = []
        batches = 0
        start = time.perf_counter()
        with CallCounter(model.denoiser) as counter:  # the denoiser calls of this setting
            for i in range(0, args.num_molecules, args.batch_size):
                nodes = sizes[i : i + args.batch_size]
                batch = model.sample(num_nodes=nodes, generator=gen, **options)
                molecules += model.space.decode(batch)
                batches += 1
        seconds = time.perf_counter() - start
        drawn.append(molecules)
        metrics = evaluate(molecules, train_smiles=reference, canonicalize_train=False)
        n = metrics["n_molecules"]
        if flow:
            shown_steps = options.get("steps", "adaptive")
        else:
            shown_steps = len(options["sampler"].steps(model.timesteps)) - 1
        row = {
            "objective": "flow" if flow else "diffusion",
            "sampler": name,
            "steps": shown_steps,
            "grid_power": options.get("grid_power", 1.0) if "steps" in options and flow else None,
            "noise_scale": (
                options.get("noise_scale", DEFAULT_NOISE_SCALE)
                if name in STOCHASTIC_METHODS
                else None
            ),
            "network_calls": counter.calls / batches,
            "s_per_molecule": seconds / n,
            **metrics,
            **{
                f"{key}_se": math.sqrt(metrics[key] * (1 - metrics[key]) / n)
                for key in ("mol_stability", "validity", "connected_validity")
            },
        }
        rows.append(row)
        print(
            f"{_label(key):13s} {row['steps']!s:>8} steps "
            f"({row['network_calls']:.0f} network calls): "
            f"atom stable {metrics['atom_stability']:.3f}, "
            f"mol stable {metrics['mol_stability']:.3f}, valid {metrics['validity']:.3f}, "
            f"{row['s_per_molecule']:.3f} s/molecule",
            flush=True,
        )

    if args.reference is not None:
        first = parsed.index(ref_key)
        for i, (key, molecules, row) in enumerate(zip(parsed, drawn, rows)):
            if key[0] not in stochastic and i != first:
                row["vs_reference"] = _distance(molecules, drawn[first])
                row["vs_reference"]["reference"] = args.reference
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    lines = [
        f"Run `{args.run}` ({cfg['model']}, {cfg.get('preset')} preset), "
        f"{args.num_molecules} molecules per setting, same sizes and seed; "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads.",
        "",
        "| objective | sampler | steps | network calls | atom stable % | mol stable % | "
        "valid % | connected valid % | unique % | atoms over / under valence % | s / molecule |"
        + (
            f" RMS distance to {args.reference} | types as {args.reference} % |"
            if args.reference
            else ""
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.reference else ""),
    ]
    for r in rows:
        extra = ""
        if args.reference:
            d = r.get("vs_reference")
            extra = (
                f" {d['rms_distance']:.3f} ± {d['rms_distance_se']:.3f} |"
                f" {100 * d['types_agree']:.1f} |"
                if d
                else " — | — |"
            )
        shown = (
            f"{r['steps']}"
            + (
                f" (grid power {r['grid_power']:g})"
                if r.get("grid_power") not in (None, 1.0)
                else ""
            )
            + (f" (noise {r['noise_scale']:g})" if r.get("noise_scale") is not None else "")
        )
        lines.append(
            f"| {r['objective']} | {r['sampler']} | {shown} | {r['network_calls']:.0f} | "
            f"{_pm(r, 'atom_stability')} | {_pm(r, 'mol_stability')} | "
            f"{_pm(r, 'validity')} | {_pm(r, 'connected_validity')} | "
            f"{100 * r['uniqueness']:.1f} | "
            f"{100 * r['atom_over_valence']:.1f} / {100 * r['atom_under_valence']:.1f} | "
            f"{r['s_per_molecule']:.3f} |" + extra
        )
    lines += [
        "",
        "± is one standard error: binomial over molecules for the molecule-level rates, "
        "molecules as the unit for atom stability (atoms of one molecule are not "
        "independent).",
        "",
        f"Command: `{command}`",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    print("\n".join(lines))
    return rows


def _pm(row: dict, key: str) -> str:
    """``"52.7 ± 1.1"``: a rate of ``row`` and its standard error, in percent."""
    se = row.get(f"{key}_se")
    return f"{100 * row[key]:.1f}" + ("" if se is None else f" ± {100 * se:.1f}")


if __name__ == "__main__":
    main()
