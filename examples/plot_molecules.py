"""Figures of molecules in canonical pose: training molecules through a run's
canonicalizer, and the run's generated molecules (which come out in canonical pose).

Usage::

    python examples/plot_molecules.py --run runs/cpu/canon-gdm --png docs/results/qm9/canon-gdm.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from canonwrap.plots import draw_molecule, generated_molecules


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
        samples = torch.load(samples_path, weights_only=True)
        mols = generated_molecules(samples, cfg["remove_h"], args.count)
        rows.append(("generated (canonical pose)", mols))
    fig = plt.figure(figsize=(1.9 * args.count, 2.0 * len(rows)))
    for r, (label, mols) in enumerate(rows):
        for c, (z, pos) in enumerate(mols):
            ax = fig.add_subplot(len(rows), args.count, r * args.count + c + 1, projection="3d")
            draw_molecule(ax, z, pos, f"{label} {c + 1}" if c == 0 else f"{c + 1}")
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
