"""Figures of molecules in canonical pose: training molecules through a run's
canonicalizer, and the run's generated molecules (which come out in canonical pose).

Usage::

    python examples/plot_molecules.py --run runs/cpu/canon-gdm --png docs/results/qm9/canon-gdm.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from canonwrap.molecules import QM9_ATOM_TYPES, QM9_HEAVY_ATOM_TYPES

COLOURS = {1: "#dddddd", 6: "#404040", 7: "#3050f8", 8: "#ff0d0d", 9: "#90e050"}
SIZES = {1: 30, 6: 70, 7: 70, 8: 70, 9: 70}


def _draw(ax, z, pos, title):
    from canonwrap.metrics.molecules import bond_order_matrix

    z = z.tolist()
    p = pos.numpy()
    orders = bond_order_matrix(z, p)
    n = len(z)
    for i in range(n):
        for j in range(i + 1, n):
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
    lim = max(2.5, float(abs(p).max()) + 0.3)
    for setter in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
        setter(-lim, lim)
    ax.set_xlabel("e1", fontsize=6, labelpad=-12)
    ax.set_ylabel("e2", fontsize=6, labelpad=-12)
    ax.set_zlabel("e3", fontsize=6, labelpad=-12)
    ax.tick_params(labelsize=0, length=0)
    ax.view_init(elev=20, azim=-60)
    ax.set_title(title, fontsize=7)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--run", required=True, help="training folder of examples/qm9.py (its --out)"
    )
    parser.add_argument("--png", required=True, help="figure (PNG) to write")
    parser.add_argument(
        "--count", type=int, default=6, help="molecules per row (default: %(default)s)"
    )
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from canonwrap.data import QM9
    from canonwrap.evaluation import load_qm9_run

    run = Path(args.run)
    model, cfg = load_qm9_run(run)
    from torch_geometric.data import Batch

    test = QM9("test", remove_h=cfg["remove_h"], progress=False)
    picks = [test[i] for i in range(args.count)]
    with torch.no_grad():
        canon = model.canonicalize(Batch.from_data_list(picks)).canonical
    rows = [
        ("data, canonical pose", [(d.z, canon.pos[canon.batch == i]) for i, d in enumerate(picks)])
    ]
    samples_path = run / "samples.pt"
    if samples_path.exists():
        s = torch.load(samples_path, weights_only=True)
        sizes = s["num_nodes"].tolist()[: args.count]
        offsets = [0]
        for n in s["num_nodes"].tolist():
            offsets.append(offsets[-1] + n)
        types = torch.tensor(QM9_HEAVY_ATOM_TYPES if cfg["remove_h"] else QM9_ATOM_TYPES)
        k = len(types)
        mols = []
        for i, n in enumerate(sizes):
            sl = slice(offsets[i], offsets[i] + n)
            mols.append((types[s["x"][sl, :k].argmax(-1)], s["pos"][sl]))
        rows.append(("generated (canonical pose)", mols))
    fig = plt.figure(figsize=(1.9 * args.count, 2.0 * len(rows)))
    for r, (label, mols) in enumerate(rows):
        for c, (z, pos) in enumerate(mols):
            ax = fig.add_subplot(len(rows), args.count, r * args.count + c + 1, projection="3d")
            _draw(ax, z, pos, f"{label} {c + 1}" if c == 0 else f"{c + 1}")
    fig.suptitle(f"{cfg['model']}: axes are the canonical frame (e1, e2, e3)", fontsize=9)
    fig.tight_layout()
    out = Path(args.png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
