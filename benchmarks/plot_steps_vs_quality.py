"""Plot molecule quality against network calls from ``steps_vs_quality.py`` tables.

Each argument is ``LABEL=FILE``: a label for the legend and a JSON file written by
``benchmarks/steps_vs_quality.py`` (one run, several samplers). The figure has one panel
per rate (``--metrics``, default atom stability, validity and connected validity) with the
network calls per molecule on a log axis, one colour per table and one line per sampler,
one-standard-error bars where known (see ``canonwrap.plots.quality_series``). Ancestral
sampling (1,000 steps, the usual reference) is also drawn as a dotted horizontal line.

Usage::

    python benchmarks/plot_steps_vs_quality.py \\
        "flow=runs/long/svq/flow-assignment-ema.json" \\
        "diffusion=runs/long/svq/diffusion-ema.json" --out docs/results/qm9/steps.png

Needs matplotlib (``pip install -e '.[plots]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _table(spec: str) -> tuple[str, list[dict]]:
    """``LABEL=FILE`` -> ``(label, rows)``; ``ValueError`` with the reason otherwise."""
    label, sep, file = spec.partition("=")
    if not sep or not label.strip() or not file:
        raise ValueError(f"{spec!r} is not LABEL=FILE (e.g. 'flow=runs/svq/flow.json')")
    path = Path(file)
    if not path.is_file():
        raise ValueError(f"{label}: no file {file}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{label}: {file} is not JSON ({err})") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{label}: {file} has no rows of steps_vs_quality.py")
    return label.strip(), rows


def main(argv: list[str] | None = None) -> Path:
    from canonwrap.plots import QUALITY_LABELS, plot_steps_vs_quality

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tables", nargs="+", metavar="LABEL=FILE")
    parser.add_argument(
        "--metrics",
        default="atom_stability,validity,connected_validity",
        help=f"comma-separated rates, from {', '.join(QUALITY_LABELS)}",
    )
    parser.add_argument("--title", default=None)
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if not metrics:
        parser.error("--metrics names no rate")
    tables = {}
    try:
        for spec in args.tables:
            label, rows = _table(spec)
            if label in tables:
                raise ValueError(f"label {label!r} is given twice")
            tables[label] = rows
        path = plot_steps_vs_quality(tables, args.out, metrics=metrics, title=args.title)
    except ValueError as err:  # plot_steps_vs_quality checks every table before drawing
        parser.error(str(err))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
