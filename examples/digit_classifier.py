"""Train the rotation-robust digit classifier used to score generated rotated-MNIST digits.

Usage::

    python examples/digit_classifier.py --out runs/digit_classifier.pt [--data MNIST_FOLDER]

Data: the digits of ``examples/rotmnist.py`` (same loading, same defaults): ``RotatedMNIST``
with grey levels in ``[-1, 1]``, rotated by seeded uniform angles (``--data-seed``); with only
the 10,000 MNIST test digits (IDX ``t10k`` files) these are split into training digits and
``--holdout`` held-out test digits, the same test digits that ``examples/rotmnist.py``
evaluates the diffusion models on. ``--data`` defaults to ``$CANONWRAP_MNIST``.

Training: ``canonwrap.metrics.digits.train_digit_classifier`` on the training digits, each
rotated again by a fresh uniform angle at every batch. The training state is checkpointed
beside ``--out`` (``<out>.train.pt``), so that an interrupted run started again with the same
arguments continues where it stopped; the checkpoint is deleted once the classifier is written.

Outputs: ``--out`` (the classifier and its metadata, read with ``load_classifier``) and the
same metadata as JSON beside it (``.json``): the accuracy on the held-out test digits as given
(already rotated), training steps and seconds, seeds, data settings, and two reference values
of the Fréchet distance on the classifier's features: between two disjoint halves of the test
digits (what two samples of real digits score at that size: a floor) and between the test
digits and as many images of standard Gaussian noise (a ceiling). Compare the Fréchet distance
of generated digits only with values of the same classifier file and the same numbers of images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from canonwrap.data.rotmnist import RotatedMNIST, default_mnist_root
from canonwrap.metrics.digits import (
    classifier_accuracy,
    extract_features,
    frechet_distance,
    save_classifier,
    train_digit_classifier,
)


def parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="file of the trained classifier (.pt)")
    p.add_argument(
        "--data",
        default=None,
        help="MNIST folder with IDX or rotated-MNIST .amat files (default: $CANONWRAP_MNIST)",
    )
    p.add_argument(
        "--train-steps",
        type=int,
        default=3000,
        help="training steps of the classifier (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size", type=int, default=64, help="digits per training step (default: %(default)s)"
    )
    p.add_argument(
        "--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)"
    )
    p.add_argument(
        "--width",
        type=int,
        default=32,
        help="channels of the first convolutions (default: %(default)s)",
    )
    p.add_argument(
        "--feature-dim",
        type=int,
        default=64,
        help="width of the feature layer used by the Fréchet distance (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the weights, batches and training rotations (default: %(default)s)",
    )
    p.add_argument(
        "--data-seed",
        type=int,
        default=0,
        help="seed of the rotation angles of the digits (default: %(default)s)",
    )
    p.add_argument(
        "--holdout",
        type=int,
        default=2000,
        help="held-out test digits taken from the t10k digits when only those exist "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--eval-seed",
        type=int,
        default=1234,
        help="seed of the test-digit halves and of the noise images (default: %(default)s)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def load_data(args: argparse.Namespace) -> tuple[RotatedMNIST, RotatedMNIST]:
    """Training and test digits, loaded as ``examples/rotmnist.py`` loads them."""
    root = args.data if args.data is not None else default_mnist_root()
    kwargs = dict(root=root, symmetric=True, seed=args.data_seed, test_size=args.holdout)
    return RotatedMNIST(split="train", **kwargs), RotatedMNIST(split="test", **kwargs)


def reference_distances(classifier, test_images: torch.Tensor, seed: int) -> dict[str, Any]:
    """Fréchet distances between two random disjoint halves of the test digits (floor) and
    between the test digits and as many standard Gaussian noise images (ceiling)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(test_images.shape[0], generator=gen)
    half = test_images.shape[0] // 2
    feats = extract_features(classifier, test_images)
    noise = torch.randn(test_images.shape, generator=gen)
    return {
        "frechet_test_halves": frechet_distance(feats[perm[:half]], feats[perm[half : 2 * half]]),
        "frechet_test_vs_noise": frechet_distance(feats, extract_features(classifier, noise)),
        "half_size": half,
        "noise_images": test_images.shape[0],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate and save the classifier; returns the metadata written to the JSON."""
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    train, test = load_data(args)
    print(f"training digits: {len(train)}, held-out test digits: {len(test)} ({train.source})")

    checkpoint = out.with_name(out.name + ".train.pt")
    start = time.perf_counter()
    classifier, history = train_digit_classifier(
        train.images,
        train.labels,
        steps=args.train_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        width=args.width,
        feature_dim=args.feature_dim,
        progress=not args.no_progress,
        checkpoint=checkpoint,
    )
    seconds = time.perf_counter() - start
    accuracy = classifier_accuracy(classifier, test.images, test.labels)
    train_accuracy = classifier_accuracy(classifier, train.images, train.labels)
    losses = history["loss"]
    meta: dict[str, Any] = {
        "test_accuracy": accuracy,
        "train_accuracy": train_accuracy,
        "train_steps": args.train_steps,
        "seconds": seconds,
        "resumed_from": history["resumed_from"],
        "final_loss": sum(losses[-100:]) / len(losses[-100:]),
        "seed": args.seed,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "threads": torch.get_num_threads(),
        "data": {
            "source": train.source,
            "files": [Path(f).name for f in train.files],  # names only, not local folders
            "data_seed": args.data_seed,
            "holdout": args.holdout,
            "num_train": len(train),
            "num_test": len(test),
        },
        "reference": reference_distances(classifier, test.images, args.eval_seed),
        "eval_seed": args.eval_seed,
        "torch": torch.__version__,
        "python": platform.python_version(),
        # the settings, without the local data folder and output file
        "arguments": {k: v for k, v in vars(args).items() if k not in ("data", "out")},
    }
    save_classifier(out, classifier, meta)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    checkpoint.unlink(missing_ok=True)
    ref = meta["reference"]
    print(
        f"held-out accuracy (rotated test digits): {accuracy:.4f}  "
        f"(train {train_accuracy:.4f}; {args.train_steps} steps in {seconds:.0f} s)\n"
        f"Fréchet distance: test halves ({ref['half_size']} vs {ref['half_size']}) "
        f"{ref['frechet_test_halves']:.4f}; test vs noise {ref['frechet_test_vs_noise']:.2f}\n"
        f"wrote {out} and {out.with_suffix('.json')}",
        flush=True,
    )
    return meta


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main(sys.argv[1:])
