"""Figures for training runs and molecules (needs matplotlib: the ``plots`` extra).

- [`draw_molecule`][canonwrap.plots.draw_molecule]: one molecule as a 3D ball-and-stick
  plot, bonds from EDM's bond-length tables.
- [`plot_training_curves`][canonwrap.plots.plot_training_curves]: held-out loss against
  training minutes and steps, and the validation NLL bound against minutes, for one or
  several runs.
- [`qm9_run_figure`][canonwrap.plots.qm9_run_figure]: the summary figure of a run of the
  QM9 example: its curves and a row of its generated molecules.
- [`plot_steps_vs_quality`][canonwrap.plots.plot_steps_vs_quality]: molecule quality
  against network calls per sampler, for the tables of ``benchmarks/steps_vs_quality.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "draw_molecule",
    "plot_training_curves",
    "qm9_run_figure",
    "generated_molecules",
    "plot_steps_vs_quality",
    "quality_series",
]

#: rates of ``benchmarks/steps_vs_quality.py`` rows counted per molecule (a binomial
#: standard error applies when a row has none stored)
MOLECULE_RATES = ("mol_stability", "validity", "connected_validity", "uniqueness", "novelty")
#: every rate ``plot_steps_vs_quality`` can draw, with its axis label
QUALITY_LABELS = {
    "atom_stability": "atom stable %",
    "mol_stability": "molecule stable %",
    "validity": "valid %",
    "connected_validity": "connected valid %",
    "uniqueness": "unique %",
    "novelty": "novel %",
}

#: CPK-like colours and marker sizes by atomic number
COLOURS = {1: "#dddddd", 6: "#404040", 7: "#3050f8", 8: "#ff0d0d", 9: "#90e050"}
SIZES = {1: 30, 6: 70, 7: 70, 8: 70, 9: 70}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("figures need matplotlib: pip install 'canonwrap[plots]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_molecule(ax: Any, z: Sequence[int] | torch.Tensor, pos: torch.Tensor, title: str) -> None:
    """Draw atoms ``z`` (atomic numbers) at ``pos [n, 3]`` on a 3D axis, bonds as lines.

    Bond orders come from ``canonwrap.metrics.molecules.bond_order_matrix`` (EDM's
    tables); the axes are labelled as the frame the positions are in (e1, e2, e3).
    """
    from canonwrap.metrics.molecules import bond_order_matrix

    z = [int(a) for a in z]
    p = pos.detach().cpu().double().numpy()
    orders = bond_order_matrix(z, p)
    for i in range(len(z)):
        for j in range(i + 1, len(z)):
            if orders[i, j] > 0:
                ax.plot(*p[[i, j]].T, color="#888888", linewidth=0.8 * orders[i, j])
    ax.scatter(
        *p.T,
        c=[COLOURS.get(a, "#aa00aa") for a in z],
        s=[SIZES.get(a, 50) for a in z],
        edgecolors="black",
        linewidths=0.3,
        depthshade=False,
    )
    lim = max(2.5, float(abs(p).max()) + 0.3) if len(z) else 2.5
    for setter in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
        setter(-lim, lim)
    ax.set_xlabel("e1", fontsize=6, labelpad=-12)
    ax.set_ylabel("e2", fontsize=6, labelpad=-12)
    ax.set_zlabel("e3", fontsize=6, labelpad=-12)
    ax.tick_params(labelsize=0, length=0)
    ax.view_init(elev=20, azim=-60)
    ax.set_title(title, fontsize=7)


def generated_molecules(
    samples: Mapping[str, torch.Tensor], remove_h: bool, count: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` molecules of a ``samples.pt`` of the QM9 example as
    ``(atomic numbers, positions)`` pairs (atom types by arg-max of the one-hot part)."""
    from canonwrap.molecules import QM9_ATOM_TYPES, QM9_HEAVY_ATOM_TYPES

    types = torch.tensor(QM9_HEAVY_ATOM_TYPES if remove_h else QM9_ATOM_TYPES)
    sizes = samples["num_nodes"].tolist()
    out, start = [], 0
    for n in sizes[:count]:
        x = samples["x"][start : start + n, : len(types)]
        out.append((types[x.argmax(-1)], samples["pos"][start : start + n]))
        start += n
    return out


def _curve_axes(axes: Sequence[Any], curves: Mapping[str, list[dict[str, Any]]]) -> None:
    for label, evals in curves.items():
        minutes = [(e.get("elapsed") or 0.0) / 60 for e in evals]
        axes[0].plot(minutes, [e["val_loss"] for e in evals], marker="o", label=label)
        axes[1].plot(
            [e["step"] for e in evals], [e["val_loss"] for e in evals], marker="o", label=label
        )
        with_nll = [e for e in evals if "val_nll" in e]
        axes[2].plot(
            [(e.get("elapsed") or 0.0) / 60 for e in with_nll],
            [e["val_nll"] for e in with_nll],
            marker="o",
            label=label,
        )
    for ax, xl, yl in zip(
        axes,
        ("training minutes", "training steps", "training minutes"),
        ("held-out denoising loss", "held-out denoising loss", "validation NLL bound (nats)"),
    ):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def plot_training_curves(curves: Mapping[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """Write a PNG with three panels: held-out loss against minutes and against steps, and
    the validation NLL bound against minutes.

    Parameters
    ----------
    curves : Mapping
        Label -> evaluation records, as
        [`read_evaluations`][canonwrap.training.read_evaluations] returns them.
    path : str or Path
        The PNG to write (folders are created).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    _curve_axes(axes, curves)
    return _save(plt, fig, path)


def qm9_run_figure(run: str | Path, path: str | Path, count: int = 6) -> Path:
    """The summary figure of an ``examples/qm9.py`` run folder: its training curves (from
    ``checkpoints/log.jsonl``) above ``count`` of its generated molecules (from
    ``samples.pt``, in the canonical pose they are generated in), with the run's molecule
    metrics in the title when ``metrics.json`` exists."""
    import json

    from canonwrap.training.logs import read_evaluations

    run = Path(run)
    cfg = json.loads((run / "config.json").read_text())
    label = cfg.get("model") or f"{cfg.get('denoiser')}+{cfg.get('canonicalizer')}"
    evals = read_evaluations(run / "checkpoints" / "log.jsonl")
    samples_path = run / "samples.pt"
    mols = []
    if samples_path.exists():
        samples = torch.load(samples_path, map_location="cpu", weights_only=True)
        mols = generated_molecules(samples, bool(cfg.get("remove_h")), count)
    plt = _pyplot()
    fig = plt.figure(figsize=(15, 7.6 if mols else 4.4))
    rows = 2 if mols else 1
    axes = [fig.add_subplot(rows, 3, i + 1) for i in range(3)]
    _curve_axes(axes, {label: evals})
    for i, (z, pos) in enumerate(mols):
        ax = fig.add_subplot(rows, len(mols), len(mols) + i + 1, projection="3d")
        draw_molecule(ax, z, pos, f"generated {i + 1} ({len(z)} atoms)")
    title = f"{run}: {label}"
    metrics_path = run / "metrics.json"
    if metrics_path.exists():
        m = json.loads(metrics_path.read_text())
        mol = m.get("molecules", {})
        title += (
            f" | atom stable {100 * mol.get('atom_stability', float('nan')):.1f} %,"
            f" valid {100 * mol.get('validity', float('nan')):.1f} %,"
            f" connected valid {100 * mol.get('connected_validity', float('nan')):.1f} %"
            f" of {mol.get('n_molecules', '?')} samples"
        )
    fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def _series_name(row: Mapping[str, Any]) -> str:
    name = str(row["sampler"])
    power = row.get("grid_power")
    if power is not None and float(power) != 1.0:
        name += f"@{power:g}"
    noise = row.get("noise_scale")
    if noise is not None:
        name += f"~{noise:g}"
    return name


def quality_series(
    rows: Sequence[Mapping[str, Any]], metric: str
) -> dict[str, list[tuple[float, float, float | None]]]:
    """The points ``plot_steps_vs_quality`` draws for one table and one rate.

    Parameters
    ----------
    rows : sequence of mappings
        Rows of one ``steps_vs_quality.py`` table (its JSON's ``"rows"``).
    metric : str
        A key of ``QUALITY_LABELS``.

    Returns
    -------
    dict
        Sampler (with ``@P`` for a grid power other than 1 and ``~S`` for a noise scale, as
        the script's settings name them) -> ``(network calls, rate %, standard error %)``
        sorted by calls. The standard error is the row's stored ``<metric>_se``; without one
        it is binomial over ``n_molecules`` for the molecule-level rates, and ``None`` for
        atom stability, whose atoms are not independent draws.

    Raises
    ------
    ValueError
        For an unknown ``metric`` or a row without ``sampler``, ``network_calls`` or the
        rate.
    """
    if metric not in QUALITY_LABELS:
        raise ValueError(f"unknown rate {metric!r}; choose from {', '.join(QUALITY_LABELS)}")
    series: dict[str, list[tuple[float, float, float | None]]] = {}
    for i, row in enumerate(rows):
        missing = [k for k in ("sampler", "network_calls", metric) if row.get(k) is None]
        if missing:
            raise ValueError(f"row {i} has no {', '.join(missing)}")
        value = float(row[metric])
        se = row.get(f"{metric}_se")
        if se is None and metric in MOLECULE_RATES and row.get("n_molecules"):
            se = math.sqrt(value * (1.0 - value) / int(row["n_molecules"]))
        point = (float(row["network_calls"]), 100.0 * value, None if se is None else 100.0 * se)
        series.setdefault(_series_name(row), []).append(point)
    return {name: sorted(points) for name, points in series.items()}


def plot_steps_vs_quality(
    tables: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    metrics: Sequence[str] = ("atom_stability", "validity", "connected_validity"),
    title: str | None = None,
    levels: Sequence[str] = ("ancestral",),
) -> Path:
    """Write a PNG with one panel per rate: each sampler's rate against its network calls
    (log axis), one colour per table and one marker per sampler, with one-standard-error
    bars where known.

    The samplers named in ``levels`` (default: 1,000-step ancestral sampling, the usual
    reference) are also drawn as dotted horizontal lines across the panel, so that the
    few-step samplers of the other tables can be read against them.

    Parameters
    ----------
    tables : Mapping
        Label -> rows of a ``benchmarks/steps_vs_quality.py`` table (its JSON's ``"rows"``).
    path : str or Path
        The PNG to write (folders are created).
    metrics : sequence of str
        Rates to draw, keys of ``QUALITY_LABELS``.
    title : str, optional
        A title above the panels.
    levels : sequence of str
        Samplers (as ``quality_series`` names them) also drawn as horizontal lines.

    Raises
    ------
    ValueError
        Without tables or rates, or as [`quality_series`][canonwrap.plots.quality_series]
        (the message then starts with the table's label); nothing is written then.
    """
    if not tables:
        raise ValueError("no tables to plot")
    if not metrics:
        raise ValueError("no rates to plot")
    drawn = {}  # every table and rate checked before anything is drawn
    for label, rows in tables.items():
        try:
            drawn[label] = {m: quality_series(rows, m) for m in metrics}
        except ValueError as err:
            raise ValueError(f"{label}: {err}") from None
    samplers: list[str] = []  # one marker and line style per sampler, the same in every table
    for per_metric in drawn.values():
        for name in per_metric[metrics[0]]:
            if name not in samplers:
                samplers.append(name)
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(
        1, len(metrics), figsize=(5.2 * len(metrics) + 2.4, 4.4), squeeze=False
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", "-.", (0, (1, 1))]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    for ax, metric in zip(axes[0], metrics):
        for t, (label, per_metric) in enumerate(drawn.items()):
            colour = colours[t % len(colours)]
            for name, points in per_metric[metric].items():
                k = samplers.index(name)
                calls = [p[0] for p in points]
                values = [p[1] for p in points]
                errors = [0.0 if p[2] is None else p[2] for p in points]
                ax.errorbar(
                    calls,
                    values,
                    yerr=errors if any(p[2] is not None for p in points) else None,
                    color=colour,
                    linestyle=styles[k % len(styles)] if len(points) > 1 else "none",
                    marker=markers[k % len(markers)],
                    capsize=3,
                    label=f"{label}: {name}",
                )
                if name in levels:
                    for value in values:
                        ax.axhline(value, color=colour, linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.set_xlabel("network calls per molecule")
        ax.set_ylabel(QUALITY_LABELS[metric])
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)
