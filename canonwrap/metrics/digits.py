"""Sample quality of generated digits: a rotation-robust classifier and a Fréchet distance.

Image diffusion models trained on rotated MNIST are compared by their samples in the way
FID compares natural-image models, with a small digit classifier in place of Inception:

- [`DigitClassifier`][canonwrap.metrics.digits.DigitClassifier]: a small CNN on digits
  ``[N, 1, 28, 28]`` in ``[-1, 1]`` (background ``-1``) with a feature layer;
- [`train_digit_classifier`][canonwrap.metrics.digits.train_digit_classifier]: trains it on
  digits rotated by a fresh uniform angle at every batch, seeded, with resumable checkpoints;
- [`classifier_accuracy`][canonwrap.metrics.digits.classifier_accuracy] and
  [`extract_features`][canonwrap.metrics.digits.extract_features];
- [`frechet_distance`][canonwrap.metrics.digits.frechet_distance]: the Fréchet distance
  between Gaussians fitted to two feature sets;
- [`sample_report`][canonwrap.metrics.digits.sample_report]: that distance between samples
  and reference digits, with the classifier's confidence and the spread of predicted classes;
- [`save_classifier`][canonwrap.metrics.digits.save_classifier] and
  [`load_classifier`][canonwrap.metrics.digits.load_classifier].

The Fréchet distance depends on the classifier (its weights, hence its seed and training)
and, through the bias of the covariance estimates, on the numbers of images: compare values
only from the same classifier file and the same numbers of samples and reference digits.
Only PyTorch is needed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from canonwrap._io import atomic_torch_save, tree_digest
from canonwrap.groups.images import rotate_images

__all__ = [
    "DigitClassifier",
    "classifier_accuracy",
    "extract_features",
    "frechet_distance",
    "load_classifier",
    "sample_report",
    "save_classifier",
    "train_digit_classifier",
]

_FILE_FORMAT = "canonwrap.digit_classifier/1"
_CHECKPOINT_FORMAT = "canonwrap.digit_classifier.training/1"


def _check_images(images: Any, name: str = "images") -> Tensor:
    """Refuse anything but finite floating-point digits ``[N, 1, 28, 28]`` with ``N >= 1``."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [N, 1, 28, 28]; got {type(images)}")
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(
            f"{name} must be digits [N, 1, 28, 28] (one grey channel, 28x28 pixels); "
            f"got shape {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0)")
    if not images.is_floating_point():
        raise TypeError(
            f"{name} must be floating point with values in [-1, 1]; got {images.dtype} "
            "(convert, e.g. images.float() / 127.5 - 1)"
        )
    bad = ~torch.isfinite(images.detach()).flatten(1).all(1)
    if bad.any():
        idx = bad.nonzero().flatten()
        raise ValueError(
            f"{name} has non-finite values (NaN or Inf) in {idx.numel()} of {images.shape[0]} "
            f"images, first at index {int(idx[0])}"
        )
    return images


def _check_labels(labels: Any, n: int, num_classes: int) -> Tensor:
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.is_complex():
        raise TypeError(
            f"labels must be an integer tensor [N]; got {getattr(labels, 'dtype', labels)}"
        )
    if labels.shape != (n,):
        raise ValueError(f"labels must be [N={n}] (one per image); got {tuple(labels.shape)}")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}); got values from {int(labels.min())} "
            f"to {int(labels.max())}"
        )
    return labels.long()


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class DigitClassifier(nn.Module):
    """A small CNN for digits ``[N, 1, 28, 28]``, with a feature layer for Fréchet distances.

    Four 3x3 convolutions (``width``, ``width``, ``2 width``, ``2 width`` channels), each
    followed by GroupNorm and ReLU, with 2x2 max pooling after the second and the third
    (28 -> 14 -> 7 pixels); a linear feature layer with ReLU (``feature_dim``) on the
    flattened ``2 width x 7 x 7`` map; a linear head to ``num_classes`` logits. GroupNorm
    keeps no running statistics, so training and evaluation mode compute the same function.

    The feature layer reads the whole map rather than its global average, which discards
    where strokes lie relative to each other: with global average pooling the same network
    learned rotated MNIST several times more slowly.

    Parameters
    ----------
    width
        Channels of the first two convolutions (the last two have twice as many).
    feature_dim
        Width of the feature layer, the penultimate activations returned by
        [`features`][canonwrap.metrics.digits.DigitClassifier.features].
    num_classes
        Number of classes (logits).
    """

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.width = _positive_int(width, "width")
        self.feature_dim = _positive_int(feature_dim, "feature_dim")
        self.num_classes = _positive_int(num_classes, "num_classes")
        chans = [1, self.width, self.width, 2 * self.width, 2 * self.width]
        layers: list[nn.Module] = []
        for i in range(4):
            c = chans[i + 1]
            layers += [
                nn.Conv2d(chans[i], c, 3, padding=1),
                nn.GroupNorm(math.gcd(8, c), c),
                nn.ReLU(),
            ]
            if i in (1, 2):
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.feature = nn.Linear(chans[-1] * 7 * 7, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    def config(self) -> dict[str, int]:
        """The constructor's arguments (``width``, ``feature_dim``, ``num_classes``)."""
        return {
            "width": self.width,
            "feature_dim": self.feature_dim,
            "num_classes": self.num_classes,
        }

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``[N, feature_dim]`` of digits ``x [N, 1, 28, 28]``.

        Raises ``ValueError`` / ``TypeError`` for another shape, non-floating or non-finite
        input.
        """
        _check_images(x, "x")
        return F.relu(self.feature(self.body(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[N, num_classes]`` of digits ``x [N, 1, 28, 28]``."""
        return self.head(self.features(x))


def _rotate_digits(images: Tensor, angles: Tensor) -> Tensor:
    """Rotate digits ``[N, 1, H, W]`` in ``[-1, 1]`` by ``angles [N]``; corners get ``-1``.

    [`rotate_images`][canonwrap.groups.rotate_images] pads with zeros, so the digits are
    mapped to ``[0, 1]`` (background 0) for the rotation and back afterwards.
    """
    unit = (images + 1) / 2
    return rotate_images(unit, angles.to(images.device)) * 2 - 1


def _random_angles(n: int, generator: torch.Generator) -> Tensor:
    """``n`` angles uniform in ``[0, 2 pi)`` (float64) from ``generator``."""
    return 2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)


def _learning_rate(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over the first ``min(100, steps // 10)`` steps, then cosine decay to 0."""
    warmup = min(100, steps // 10)
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_torch_save(state, path)


def train_digit_classifier(
    images: Tensor,
    labels: Tensor,
    *,
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    rotate: bool = True,
    width: int = 32,
    feature_dim: int = 64,
    num_classes: int = 10,
    progress: bool = False,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 250,
) -> tuple[DigitClassifier, dict[str, Any]]:
    """Train a [`DigitClassifier`][canonwrap.metrics.digits.DigitClassifier] on rotated digits.

    Every step draws ``batch_size`` digits uniformly with replacement and, with ``rotate``,
    rotates each by its own angle uniform in ``[0, 2 pi)`` (bilinear, corners filled with the
    background ``-1``), then takes one AdamW step on the cross-entropy (learning rate: linear
    warm-up over ``min(100, steps // 10)`` steps, then cosine decay to 0). The digit indices
    and the angles come from one ``torch.Generator`` seeded with ``seed``; the initial weights
    are drawn with the global RNG seeded with ``seed`` inside ``torch.random.fork_rng``, so the
    global RNG state is left as it was. With one CPU thread, equal inputs and ``seed`` give
    bitwise equal weights.

    Parameters
    ----------
    images
        Training digits ``[N, 1, 28, 28]``, float in ``[-1, 1]`` with background ``-1``
        (``RotatedMNIST(..., symmetric=True).images``). The classifier is trained on their
        device.
    labels
        Classes ``[N]``, integers in ``[0, num_classes)``.
    steps
        Number of optimizer steps.
    batch_size
        Digits per step.
    lr
        Peak learning rate.
    weight_decay
        AdamW weight decay.
    seed
        Seed of the initial weights, the batches and the angles.
    rotate
        Rotate every training digit by a random angle (``False``: use them as given).
    width
        See [`DigitClassifier`][canonwrap.metrics.digits.DigitClassifier].
    feature_dim
        See [`DigitClassifier`][canonwrap.metrics.digits.DigitClassifier].
    num_classes
        See [`DigitClassifier`][canonwrap.metrics.digits.DigitClassifier].
    progress
        Show a tqdm progress bar.
    checkpoint
        File of the training state (weights, optimizer, generator state, losses so far). It
        is written atomically every ``checkpoint_every`` steps and at the end; when it exists,
        training resumes from it and ends with the same weights as an uninterrupted run.
        A checkpoint of other settings or other data is refused (``ValueError``).
    checkpoint_every
        Steps between checkpoints.

    Returns
    -------
    tuple
        ``(classifier, history)``: the trained classifier in eval mode, and a dict with
        ``loss`` (the training loss of every step, a list of ``steps`` floats) and
        ``resumed_from`` (the step the run started from: 0, or the checkpoint's step).
    """
    images = _check_images(images)
    steps = _positive_int(steps, "steps")
    batch_size = _positive_int(batch_size, "batch_size")
    checkpoint_every = _positive_int(checkpoint_every, "checkpoint_every")
    num_classes = _positive_int(num_classes, "num_classes")
    labels = _check_labels(labels, images.shape[0], num_classes)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a non-negative finite number, got {weight_decay!r}")
    device = images.device
    labels = labels.to(device)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = DigitClassifier(width, feature_dim, num_classes)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(int(seed))
    settings = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "seed": int(seed),
        "rotate": bool(rotate),
        **model.config(),
        "data": tree_digest([images.detach().cpu(), labels.cpu()]),
    }
    losses: list[float] = []
    start = 0
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        state = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a digit-classifier training checkpoint")
        differ = sorted(k for k in settings if state["settings"].get(k) != settings[k])
        if differ:
            raise ValueError(
                f"checkpoint {path} was written with other settings or data ({', '.join(differ)} "
                "differ); delete it to start afresh, or pass the same arguments"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        losses = [float(v) for v in state["loss"]]
        start = int(state["step"])

    def save(step: int) -> None:
        _save_checkpoint(
            path,
            {
                "format": _CHECKPOINT_FORMAT,
                "settings": settings,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "loss": torch.tensor(losses, dtype=torch.float64),
            },
        )

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc="digit classifier", unit="step")
    model.train()
    n = images.shape[0]
    try:
        for step in range(start, steps):
            idx = torch.randint(n, (batch_size,), generator=generator)
            x = images[idx.to(device)]
            if rotate:
                x = _rotate_digits(x, _random_angles(batch_size, generator))
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, steps, lr)
            loss = F.cross_entropy(model(x), labels[idx.to(device)])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss is {float(loss)} at step {step}; lower lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                if (step + 1) % 25 == 0:
                    bar.set_postfix(loss=f"{sum(losses[-25:]) / 25:.4f}")
            if path is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                save(step + 1)
    finally:
        if bar is not None:
            bar.close()
    return model.eval(), {"loss": losses, "resumed_from": start}


def _batches(images: Tensor, batch_size: int):
    batch_size = _positive_int(batch_size, "batch_size")
    for begin in range(0, images.shape[0], batch_size):
        yield images[begin : begin + batch_size]


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def _features_and_probs(
    classifier: DigitClassifier, images: Tensor, batch_size: int
) -> tuple[Tensor, Tensor]:
    """Features ``[N, D]`` (float64) and class probabilities ``[N, K]`` (float64), on the CPU."""
    device = _device_of(classifier)
    feats, probs = [], []
    for x in _batches(images, batch_size):
        f = classifier.features(x.to(device))
        feats.append(f.double().cpu())
        probs.append(torch.softmax(classifier.head(f).double(), dim=1).cpu())
    return torch.cat(feats), torch.cat(probs)


def extract_features(
    classifier: DigitClassifier, images: Tensor, *, batch_size: int = 256
) -> Tensor:
    """Features of digits for [`frechet_distance`][canonwrap.metrics.digits.frechet_distance].

    Parameters
    ----------
    classifier
        A trained [`DigitClassifier`][canonwrap.metrics.digits.DigitClassifier].
    images
        Digits ``[N, 1, 28, 28]`` in ``[-1, 1]`` (moved to the classifier's device by batch).
    batch_size
        Digits per forward pass.

    Returns
    -------
    Tensor
        ``[N, feature_dim]`` float64 on the CPU.
    """
    images = _check_images(images)
    return _features_and_probs(classifier, images, batch_size)[0]


@torch.no_grad()
def classifier_accuracy(
    classifier: DigitClassifier,
    images: Tensor,
    labels: Tensor,
    *,
    rotate_seed: int | None = None,
    batch_size: int = 256,
) -> float:
    """Fraction of digits classified correctly, optionally after random rotations.

    Parameters
    ----------
    classifier
        A trained [`DigitClassifier`][canonwrap.metrics.digits.DigitClassifier].
    images
        Digits ``[N, 1, 28, 28]`` in ``[-1, 1]``.
    labels
        Classes ``[N]``.
    rotate_seed
        When given, rotate digit ``i`` by angle ``i`` drawn uniformly from ``[0, 2 pi)`` by
        ``torch.Generator().manual_seed(rotate_seed)`` (corners filled with ``-1``) first.
        ``None`` classifies the digits as given.
    batch_size
        Digits per forward pass.

    Returns
    -------
    float
        Accuracy in ``[0, 1]``.
    """
    images = _check_images(images)
    labels = _check_labels(labels, images.shape[0], classifier.num_classes)
    if rotate_seed is not None:
        angles = _random_angles(images.shape[0], torch.Generator().manual_seed(int(rotate_seed)))
        images = torch.cat(
            [
                _rotate_digits(x, a)
                for x, a in zip(_batches(images, batch_size), angles.split(batch_size))
            ]
        )
    probs = _features_and_probs(classifier, images, batch_size)[1]
    return float((probs.argmax(1) == labels.cpu()).double().mean())


def _check_features(feats: Any, name: str) -> Tensor:
    feats = torch.as_tensor(feats)
    if feats.dim() != 2:
        raise ValueError(f"{name} must be features [N, D]; got shape {tuple(feats.shape)}")
    if feats.shape[0] < 2:
        raise ValueError(
            f"{name} has {feats.shape[0]} sample(s); a covariance needs at least 2 (and the "
            "estimate is only reliable with many more samples than feature dimensions)"
        )
    if feats.shape[1] < 1:
        raise ValueError(f"{name} has no feature dimensions (shape {tuple(feats.shape)})")
    feats = feats.detach().to("cpu", torch.float64)
    bad = ~torch.isfinite(feats).all(1)
    if bad.any():
        raise ValueError(
            f"{name} has non-finite values in {int(bad.sum())} of {feats.shape[0]} rows, first "
            f"at row {int(bad.nonzero()[0, 0])}"
        )
    return feats


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clamped at 0)."""
    vals, vecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets.

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^{1/2} S_b S_a^{1/2})^{1/2})`` with the
    sample means ``mu`` and the unbiased sample covariances ``S`` (divisor ``N - 1``, as
    ``numpy.cov``), in float64. The square roots use the symmetric eigendecomposition
    (``torch.linalg.eigh``) with tiny negative eigenvalues from rounding clamped to 0; the
    trace term equals ``tr((S_a S_b)^{1/2})`` of the usual FID formula. The value is biased
    upwards for finite samples (more so with fewer samples per feature dimension), so only
    values from equal sample sizes are comparable.

    Parameters
    ----------
    feats_a
        Features ``[N, D]`` (tensor or array), ``N >= 2``.
    feats_b
        Features ``[M, D]``, ``M >= 2``.

    Returns
    -------
    float
        The squared Fréchet distance (``>= 0``; like FID, not its square root).

    Raises
    ------
    ValueError
        For inputs that are not 2-D, fewer than 2 samples, different ``D`` or non-finite
        values.
    """
    a = _check_features(feats_a, "feats_a")
    b = _check_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"feature dimensions differ: feats_a is [N, {a.shape[1]}], feats_b is [M, {b.shape[1]}]"
        )
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = torch.cov(a.T).reshape(a.shape[1], a.shape[1])
    cov_b = torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    root_a = _psd_sqrt(cov_a)
    inner = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(float(value), 0.0)


def sample_report(
    classifier: DigitClassifier,
    samples: Tensor,
    reference: Tensor,
    *,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Fréchet distance, confidence and class balance of generated digits.

    Parameters
    ----------
    classifier
        A trained [`DigitClassifier`][canonwrap.metrics.digits.DigitClassifier].
    samples
        Generated digits ``[N, 1, 28, 28]`` in ``[-1, 1]``, ``N >= 2``.
    reference
        Real digits ``[M, 1, 28, 28]``, ``M >= 2`` (e.g. held-out test digits).
    batch_size
        Digits per forward pass.

    Returns
    -------
    dict
        ``frechet``
        :   [`frechet_distance`][canonwrap.metrics.digits.frechet_distance] between the
            features of ``samples`` and ``reference`` (lower is better).

        ``confidence``
        :   Mean largest softmax probability on the samples (higher: more clearly a digit).

        ``reference_confidence``
        :   The same on the reference digits, for scale.

        ``class_fractions``
        :   List of ``num_classes`` fractions of samples per predicted class (sum 1).

        ``class_entropy``
        :   Entropy of ``class_fractions`` in nats: 0 when every sample gets one class,
            ``log(num_classes)`` (2.303 for 10) when the classes are balanced.

        ``num_samples``
        :   ``N``.

        ``num_reference``
        :   ``M``.
    """
    samples = _check_images(samples, "samples")
    reference = _check_images(reference, "reference")
    feats_s, probs_s = _features_and_probs(classifier, samples, batch_size)
    feats_r, probs_r = _features_and_probs(classifier, reference, batch_size)
    counts = torch.bincount(probs_s.argmax(1), minlength=classifier.num_classes).double()
    fractions = counts / counts.sum()
    nonzero = fractions[fractions > 0]
    return {
        "frechet": frechet_distance(feats_s, feats_r),
        "confidence": float(probs_s.max(1).values.mean()),
        "reference_confidence": float(probs_r.max(1).values.mean()),
        "class_fractions": [float(v) for v in fractions],
        "class_entropy": max(0.0, float(-(nonzero * nonzero.log()).sum())),
        "num_samples": int(samples.shape[0]),
        "num_reference": int(reference.shape[0]),
    }


def _plain(obj: Any) -> Any:
    """``obj`` with subclasses of ``str``, ``int`` and ``float`` (e.g. ``torch.__version__``)
    made plain, so that ``torch.load(weights_only=True)`` reads them back."""
    if isinstance(obj, Mapping):
        return {_plain(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_plain(v) for v in obj]
        return tuple(items) if isinstance(obj, tuple) else items
    for kind in (bool, str, int, float):
        if isinstance(obj, kind):
            return kind(obj)
    return obj


def save_classifier(
    path: str | Path, classifier: DigitClassifier, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write a classifier, its constructor sizes and metadata to one file (atomically).

    Parameters
    ----------
    path
        Target file (missing folders are created).
    classifier
        The classifier to save.
    meta
        Metadata to keep with it, e.g. accuracy, training steps, seeds and data settings:
        numbers, strings, ``None``, tensors and lists / dicts of them (what
        ``torch.load(weights_only=True)`` reads back); anything else raises ``TypeError``.

    Returns
    -------
    Path
        ``path``.
    """
    meta = _plain(dict(meta or {}))
    try:  # refuse, before writing, what torch.load(weights_only=True) cannot read back
        buffer = io.BytesIO()
        torch.save(meta, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception as err:
        raise TypeError(
            "meta must hold only numbers, strings, None, tensors and lists / dicts of them, "
            f"which torch.load(weights_only=True) reads back; it failed with: {err}"
        ) from None
    state = {k: v.detach().cpu() for k, v in classifier.state_dict().items()}
    payload = {
        "format": _FILE_FORMAT,
        "config": classifier.config(),
        "state_dict": state,
        "meta": meta,
        "sha256": tree_digest([classifier.config(), state]),
    }
    return atomic_torch_save(payload, path)


def load_classifier(
    path: str | Path, *, map_location: str | torch.device = "cpu"
) -> tuple[DigitClassifier, dict[str, Any]]:
    """Read a classifier written by [`save_classifier`][canonwrap.metrics.digits.save_classifier].

    The file is read with ``torch.load(weights_only=True)`` (a file cannot run code) and its
    weights are checked against the SHA-256 stored with them.

    Parameters
    ----------
    path
        The file.
    map_location
        Device of the loaded weights.

    Returns
    -------
    tuple
        ``(classifier, meta)``: the classifier in eval mode and the metadata dict.

    Raises
    ------
    ValueError
        When the file is not a saved digit classifier or its weights do not match their
        checksum.
    """
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _FILE_FORMAT:
        raise ValueError(f"{path} is not a digit classifier written by save_classifier")
    if tree_digest([payload["config"], payload["state_dict"]]) != payload["sha256"]:
        raise ValueError(f"{path}: the weights do not match their checksum (damaged file)")
    classifier = DigitClassifier(**payload["config"])
    classifier.load_state_dict(payload["state_dict"])
    return classifier.to(map_location).eval(), dict(payload["meta"])
