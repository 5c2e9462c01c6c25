"""Collect the ``metrics.json`` of several ``examples/qm9.py`` runs into one markdown table.

Usage::

    python examples/qm9_report.py runs/cpu/gdm runs/cpu/edm runs/cpu/canon-gdm \
        runs/cpu/canon-frozen-gdm --out docs/results/qm9_cpu.md --json docs/results/qm9_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from canonwrap.training.logs import read_evaluations

# Published figures (QM9 with hydrogens, 10,000 samples); EDM's uniqueness is "valid and
# unique" in its paper.
PUBLISHED = {
    "gdm": dict(nll=-105.8, mol=70.6, atom=97.5, valid=88.6, unique=99.8, s_per_sample=0.55),
    "edm": dict(nll=-110.7, mol=82.0, atom=98.7, valid=91.9, unique=90.7, s_per_sample=1.16),
    "canon-frozen-gdm": dict(
        nll=-104.1, mol=82.1, atom=97.8, valid=92.9, unique=99.5, s_per_sample=0.55
    ),
    "canon-gdm": dict(nll=-117.4, mol=84.6, atom=98.4, valid=94.4, unique=99.7, s_per_sample=0.55),
}
LABELS = {
    "gdm": "GDM",
    "edm": "EDM",
    "canon-frozen-gdm": "canon(frozen)+GDM",
    "canon-gdm": "canon+GDM",
    "pca-gdm": "PCA+GDM",
    "transformer": "transformer (centre of mass)",
    "pca-transformer": "PCA+transformer",
    "canon-transformer": "canon(anchored)+transformer",
}


def _binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def row(metrics: dict) -> dict:
    mol = metrics["molecules"]
    n = mol["n_molecules"]
    out = {
        "model": metrics["model"],
        "steps": metrics.get("train_result", {}).get("steps"),
        "train_minutes": metrics.get("train_result", {}).get("elapsed_s", float("nan")) / 60,
        "val_loss_initial": metrics.get("initial", {}).get("val_loss"),
        "val_loss": metrics["val_loss"],
        "nll": metrics["test_nll"]["nll"],
        "nll_se": metrics["test_nll"].get("nll_se"),  # absent in runs evaluated before it
        "n_samples": n,
        "s_per_sample": metrics.get("sampling", {}).get("s_per_sample"),
    }
    for key in (
        "atom_stability",
        "mol_stability",
        "validity",
        "connected_validity",
        "uniqueness",
        "novelty",
    ):
        value = mol.get(key)
        out[key] = value
    out["mol_stability_se"] = _binomial_se(mol["mol_stability"], n)
    out["validity_se"] = _binomial_se(mol["validity"], n)
    out["connected_validity_se"] = _binomial_se(mol.get("connected_validity") or 0.0, n)
    return out


def _nll(r: dict) -> str:
    se = r.get("nll_se")
    if r["nll"] is None:  # a model without a density (flow from canonical noise)
        return "—"
    return f"{r['nll']:.1f}" if se is None else f"{r['nll']:.1f} ± {se:.1f}"


def markdown(rows: list[dict]) -> str:
    head = (
        "| model | steps | train min | held-out loss (start → end) | NLL (nats) | "
        "mol stable % | atom stable % | valid % | connected valid % | unique % | "
        "s/sample (1000 steps) |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
        lines.append(
            f"| {LABELS.get(r['model'], r['model'])} | {r['steps']} | {r['train_minutes']:.1f} | "
            f"{r['val_loss_initial']:.3f} → {r['val_loss']:.3f} | {_nll(r)} | "
            f"{pct(r['mol_stability'])} ± {100 * r['mol_stability_se']:.1f} | "
            f"{pct(r['atom_stability'])} | {pct(r['validity'])} ± {100 * r['validity_se']:.1f} | "
            f"{pct(r['connected_validity'])} ± {100 * r['connected_validity_se']:.1f} | "
            f"{pct(r['uniqueness'])} | "
            f"{r['s_per_sample']:.2f} |"
        )
    lines += [
        "",
        "Published (full scale, 10,000 samples):",
        "",
        "| model | NLL | mol stable % | atom stable % | valid % | unique % | s/sample |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in ("gdm", "edm", "canon-frozen-gdm", "canon-gdm"):
        p = PUBLISHED[key]
        lines.append(
            f"| {LABELS[key]} | {p['nll']} | {p['mol']} | {p['atom']} | {p['valid']} | "
            f"{p['unique']} | {p['s_per_sample']} |"
        )
    return "\n".join(lines) + "\n"


def evaluations(run: str | Path) -> list[dict]:
    """The evaluation records of a run's ``checkpoints/log.jsonl``: step, seconds, values."""
    return read_evaluations(Path(run) / "checkpoints" / "log.jsonl")


def plot_curves(runs: list[str], path: Path) -> None:
    """Held-out loss against minutes and steps, and validation NLL against minutes."""
    from canonwrap.plots import plot_training_curves

    curves = {}
    for run in runs:
        cfg_path = Path(run) / "config.json"
        label = json.loads(cfg_path.read_text()).get("model") if cfg_path.exists() else None
        curves[LABELS.get(label, label) or Path(run).name] = evaluations(run)
    plot_training_curves(curves, path)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders holding metrics.json")
    parser.add_argument(
        "--out", default=None, help="markdown file to write (default: print the table only)"
    )
    parser.add_argument(
        "--json", default=None, help="JSON file of the rows to write (default: none)"
    )
    parser.add_argument(
        "--plot",
        default=None,
        help="PNG to write: held-out loss and validation NLL of every run against training "
        "seconds and steps (read from each run's checkpoints/log.jsonl)",
    )
    args = parser.parse_args(argv)
    rows = []
    for run in args.runs:
        path = Path(run) / "metrics.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `examples/qm9.py evaluate` first")
        rows.append(row(json.loads(path.read_text())))
    text = markdown(rows)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.plot:
        plot_curves(args.runs, Path(args.plot))
        print(f"[report] wrote {args.plot}")
    print(text)
    return text


if __name__ == "__main__":
    main()
