"""canonwrap.metrics.digits: the Fréchet distance against closed forms on Gaussians with exact
sample statistics; the digit classifier learns synthetic shapes and recognises them rotated;
exact checkpoint resume; sample_report on toy cases; input errors; save/load."""

from __future__ import annotations

import math

import pytest
import torch

from canonwrap.metrics import digits
from canonwrap.metrics.digits import (
    DigitClassifier,
    classifier_accuracy,
    extract_features,
    frechet_distance,
    load_classifier,
    sample_report,
    save_classifier,
    train_digit_classifier,
)

torch.set_num_threads(1)

SMALL = dict(width=8, feature_dim=16, num_classes=3)


# ---------------------------------------------------------------- Fréchet distance
def _with_statistics(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """``n`` float64 samples whose sample mean is ``mean`` and whose unbiased sample
    covariance is ``cov`` (up to rounding): random draws, centred, whitened, re-coloured."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, mean.numel(), generator=gen, dtype=torch.float64)
    z = z - z.mean(0)
    white = torch.linalg.solve_triangular(torch.linalg.cholesky(torch.cov(z.T)), z.T, upper=False).T
    return white @ torch.linalg.cholesky(cov).T + mean


def _random_spd(d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_exact_statistics_helper():
    mean, cov = torch.arange(4.0, dtype=torch.float64), _random_spd(4, 0)
    x = _with_statistics(50, mean, cov, seed=1)
    assert torch.allclose(x.mean(0), mean, atol=1e-12)
    assert torch.allclose(torch.cov(x.T), cov, atol=1e-12)


def test_frechet_diagonal_closed_form():
    d = 6
    gen = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(2, d, generator=gen, dtype=torch.float64)
    s1, s2 = torch.rand(2, d, generator=gen, dtype=torch.float64) * 3 + 0.2
    a = _with_statistics(40, mu1, torch.diag(s1), seed=1)
    b = _with_statistics(70, mu2, torch.diag(s2), seed=2)
    expected = float((mu1 - mu2).square().sum() + (s1.sqrt() - s2.sqrt()).square().sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-8)


def test_frechet_full_covariance_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    d = 5
    mu1 = torch.linspace(-1, 1, d, dtype=torch.float64)
    mu2 = torch.zeros(d, dtype=torch.float64)
    c1, c2 = _random_spd(d, 3), _random_spd(d, 4)
    a = _with_statistics(60, mu1, c1, seed=5)
    b = _with_statistics(30, mu2, c2, seed=6)
    cross = scipy_linalg.sqrtm(c1.numpy() @ c2.numpy()).real.trace()
    expected = float((mu1 - mu2).square().sum() + c1.trace() + c2.trace()) - 2 * cross
    assert expected > 0.5  # a case where the covariance term matters
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    # float32 arrays are promoted to float64 before any arithmetic
    assert frechet_distance(a.float().numpy(), b.float()) == pytest.approx(expected, rel=1e-5)


def test_frechet_negative_controls():
    x = _with_statistics(100, torch.zeros(8, dtype=torch.float64), _random_spd(8, 7), seed=8)
    assert frechet_distance(x, x) < 1e-9
    direction = torch.randn(8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    values = [frechet_distance(x, x + s * direction) for s in (0.1, 0.5, 2.0)]
    # a pure mean shift changes only the mean term: |shift|^2
    for s, value in zip((0.1, 0.5, 2.0), values):
        assert value == pytest.approx(s**2 * float(direction.square().sum()), rel=1e-8)
    assert values[0] < values[1] < values[2]
    # a change of covariance alone (same mean) is seen too
    assert frechet_distance(x, 2 * x) > 0.1


def test_frechet_rank_deficient_and_one_dimensional():
    gen = torch.Generator().manual_seed(0)
    few = torch.randn(4, 10, generator=gen, dtype=torch.float64)  # N < D: singular covariance
    value = frechet_distance(few, few + 1)
    assert value == pytest.approx(10.0, rel=1e-6)
    a = torch.tensor([[0.0], [2.0]])  # mean 1, variance 2
    b = torch.tensor([[1.0], [5.0]])  # mean 3, variance 8
    assert frechet_distance(a, b) == pytest.approx(4 + (math.sqrt(2) - math.sqrt(8)) ** 2)


@pytest.mark.parametrize(
    "a,b,match",
    [
        (torch.zeros(5), torch.zeros(5, 2), "feats_a must be features \\[N, D\\]"),
        (torch.zeros(1, 3), torch.zeros(5, 3), "feats_a has 1 sample.*at least 2"),
        (torch.zeros(5, 3), torch.zeros(0, 3), "feats_b has 0 sample"),
        (torch.zeros(5, 3), torch.zeros(5, 4), "feature dimensions differ.*3.*4"),
        (
            torch.zeros(5, 3),
            torch.tensor([[0.0] * 3] * 4 + [[0, math.nan, 0]]),
            "non-finite.*row 4",
        ),
        (torch.full((5, 3), math.inf), torch.zeros(5, 3), "feats_a has non-finite"),
    ],
)
def test_frechet_input_errors(a, b, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(a, b)


# ---------------------------------------------------------------- synthetic digits
def shapes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` upright 28x28 shapes in ``[-1, 1]`` (background -1) of three classes: 0 a
    ring, 1 a bar, 2 an L; random sizes and positions. Labels cycle 0, 1, 2."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    images = torch.full((n, 1, 28, 28), -1.0)
    labels = torch.arange(n) % 3
    for i in range(n):
        cy, cx = (13.5 + torch.randn(2, generator=gen) * 1.5).tolist()
        size = 8 + 4 * float(torch.rand(1, generator=gen))
        if labels[i] == 0:
            mask = ((yy - cy).square() + (xx - cx).square()).sqrt().sub(size * 0.8).abs() < 1.3
        elif labels[i] == 1:
            mask = ((yy - cy).abs() < 1.5) & ((xx - cx).abs() < size)
        else:
            top, left = cy - size, cx - size / 2
            mask = ((xx - left).abs() < 1.5) & (yy >= top) & (yy <= cy + size)
            mask |= ((yy - cy - size).abs() < 1.5) & (xx >= left) & (xx <= left + size)
        images[i, 0][mask] = 1.0
    return images, labels


@pytest.fixture(scope="module")
def trained():
    images, labels = shapes(240, seed=0)
    classifier, history = train_digit_classifier(
        images, labels, steps=150, batch_size=32, lr=5e-3, seed=0, **SMALL
    )
    return classifier, history


def test_classifier_shapes_and_modes():
    model = DigitClassifier(width=8, feature_dim=12)
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    assert model.features(x).shape == (5, 12) and model(x).shape == (5, 10)
    assert (model.features(x) >= 0).all()  # ReLU activations
    assert torch.equal(model.head(model.features(x)), model(x))
    assert model.config() == {"width": 8, "feature_dim": 12, "num_classes": 10}
    with pytest.raises(ValueError, match="width must be a positive integer"):
        DigitClassifier(width=0)


@pytest.mark.parametrize(
    "x,error,match",
    [
        (torch.zeros(4, 28, 28), ValueError, r"\[N, 1, 28, 28\].*got shape \(4, 28, 28\)"),
        (torch.zeros(4, 3, 28, 28), ValueError, r"one grey channel"),
        (torch.zeros(2, 1, 32, 32), ValueError, r"got shape \(2, 1, 32, 32\)"),
        (torch.zeros(0, 1, 28, 28), ValueError, "empty"),
        (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), TypeError, "floating point"),
        ([[0.0]], TypeError, "torch.Tensor"),
    ],
)
def test_classifier_input_errors(x, error, match):
    with pytest.raises(error, match=match):
        DigitClassifier(width=4)(x)


def test_classifier_refuses_non_finite_input_naming_the_image():
    x = torch.zeros(3, 1, 28, 28)
    x[2, 0, 5, 5] = math.nan
    with pytest.raises(ValueError, match="non-finite.*1 of 3 images, first at index 2"):
        DigitClassifier(width=4).features(x)


def test_rotation_fills_corners_with_background():
    angles = torch.full((2,), math.pi / 4, dtype=torch.float64)
    background = torch.full((2, 1, 28, 28), -1.0)
    assert torch.equal(digits._rotate_digits(background, angles), background)
    white = digits._rotate_digits(torch.ones(2, 1, 28, 28), angles)
    assert torch.equal(white[:, :, 0, 0], torch.full((2, 1), -1.0))
    assert torch.allclose(white[:, :, 10:18, 10:18], torch.ones(2, 1, 8, 8))
    # a quarter turn is an exact permutation
    x, _ = shapes(3, seed=1)
    quarter = torch.full((3,), math.pi / 2, dtype=torch.float64)
    assert torch.equal(digits._rotate_digits(x, quarter), torch.rot90(x, 1, dims=(-2, -1)))


def test_classifier_learns_shapes_and_recognises_them_rotated(trained):
    classifier, history = trained
    assert len(history["loss"]) == 150 and history["resumed_from"] == 0
    early, late = sum(history["loss"][:10]) / 10, sum(history["loss"][-10:]) / 10
    assert late < 0.5 * early
    test_images, test_labels = shapes(150, seed=123)
    assert classifier_accuracy(classifier, test_images, test_labels) > 0.9
    rotated = classifier_accuracy(classifier, test_images, test_labels, rotate_seed=7)
    assert rotated > 0.9
    # control: the same network untrained is near chance (1/3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        untrained = DigitClassifier(**SMALL)
    assert classifier_accuracy(untrained, test_images, test_labels, rotate_seed=7) < 0.6
    # control: trained on the upright shapes only, it fails on rotated ones
    upright, _ = train_digit_classifier(
        *shapes(240, seed=0), steps=150, batch_size=32, lr=5e-3, seed=0, rotate=False, **SMALL
    )
    assert classifier_accuracy(upright, test_images, test_labels) > 0.9
    assert classifier_accuracy(upright, test_images, test_labels, rotate_seed=7) < 0.75


def test_rotated_accuracy_is_seeded(trained):
    classifier, _ = trained
    images, labels = shapes(60, seed=5)
    first = classifier_accuracy(classifier, images, labels, rotate_seed=3, batch_size=7)
    assert first == classifier_accuracy(classifier, images, labels, rotate_seed=3, batch_size=60)


def test_training_is_seeded_and_leaves_the_global_rng_alone():
    images, labels = shapes(30, seed=2)
    kwargs = dict(steps=4, batch_size=8, width=4, feature_dim=8, num_classes=3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, _ = train_digit_classifier(images, labels, seed=1, **kwargs)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(456)  # another global state: the same weights all the same
    b, _ = train_digit_classifier(images, labels, seed=1, **kwargs)
    c, _ = train_digit_classifier(images, labels, seed=2, **kwargs)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


def test_training_input_errors():
    images, labels = shapes(6, seed=0)
    with pytest.raises(ValueError, match=r"labels must be \[N=6\]"):
        train_digit_classifier(images, labels[:5], steps=1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        train_digit_classifier(images, labels, steps=1, num_classes=2)
    with pytest.raises(TypeError, match="integer tensor"):
        train_digit_classifier(images, labels.float(), steps=1)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        train_digit_classifier(images, labels, steps=0)
    with pytest.raises(ValueError, match="lr must be a positive finite"):
        train_digit_classifier(images, labels, steps=1, lr=math.nan)
    bad = images.clone()
    bad[1] = math.inf
    with pytest.raises(ValueError, match="images has non-finite"):
        train_digit_classifier(bad, labels, steps=1)


def test_checkpoint_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    images, labels = shapes(40, seed=3)
    kwargs = dict(steps=12, batch_size=8, width=4, feature_dim=8, num_classes=3, seed=5)
    reference, ref_history = train_digit_classifier(images, labels, **kwargs)

    path = tmp_path / "train.pt"
    save = digits._save_checkpoint
    saved_steps = []

    def save_then_die(target, state):
        save(target, state)
        saved_steps.append(state["step"])
        raise KeyboardInterrupt  # killed right after the first checkpoint

    monkeypatch.setattr(digits, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_digit_classifier(images, labels, checkpoint=path, checkpoint_every=5, **kwargs)
    monkeypatch.undo()
    assert saved_steps == [5] and path.is_file()
    assert not list(tmp_path.glob("*.tmp"))

    resumed, history = train_digit_classifier(
        images, labels, checkpoint=path, checkpoint_every=5, **kwargs
    )
    assert history["resumed_from"] == 5
    assert history["loss"] == ref_history["loss"]
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key

    # a finished checkpoint is returned as it is; other settings or data are refused
    again, history = train_digit_classifier(images, labels, checkpoint=path, **kwargs)
    assert history["resumed_from"] == 12
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in reference.state_dict().items())
    with pytest.raises(ValueError, match="other settings or data \\(lr differ\\)"):
        train_digit_classifier(images, labels, checkpoint=path, **{**kwargs, "lr": 1e-3})
    with pytest.raises(ValueError, match="\\(data differ\\)"):
        train_digit_classifier(images.flip(0), labels, checkpoint=path, **kwargs)


def test_progress_bar_runs(capsys):
    images, labels = shapes(8, seed=0)
    train_digit_classifier(images, labels, steps=2, batch_size=4, width=4, progress=True)
    assert "digit classifier" in capsys.readouterr().err


# ---------------------------------------------------------------- sample_report
def test_sample_report_on_toy_cases(trained):
    classifier, _ = trained
    reference, _ = shapes(150, seed=10)
    same_kind, _ = shapes(150, seed=11)
    rings = shapes(300, seed=12)[0][::3]  # every third shape is a ring
    noise = torch.randn(150, 1, 28, 28, generator=torch.Generator().manual_seed(0))

    good = sample_report(classifier, same_kind, reference, batch_size=64)
    assert set(good) == {
        "frechet",
        "confidence",
        "reference_confidence",
        "class_fractions",
        "class_entropy",
        "num_samples",
        "num_reference",
    }
    assert good["num_samples"] == 150 and good["num_reference"] == 150
    assert len(good["class_fractions"]) == 3
    assert sum(good["class_fractions"]) == pytest.approx(1.0)
    assert 0.95 * math.log(3) < good["class_entropy"] <= math.log(3)  # balanced classes
    assert 1 / 3 < good["confidence"] <= 1 and 1 / 3 < good["reference_confidence"] <= 1
    assert good["confidence"] == pytest.approx(good["reference_confidence"], abs=0.05)

    single = sample_report(classifier, rings, reference)
    with torch.no_grad():
        for images, value in (
            (rings, single["confidence"]),
            (reference, good["reference_confidence"]),
        ):
            expected = torch.softmax(classifier(images).double(), 1).max(1).values.mean()
            assert value == pytest.approx(float(expected), rel=1e-6)
    assert abs(single["confidence"] - single["reference_confidence"]) > 0.01
    assert single["class_fractions"][0] > 0.9
    assert 0 <= single["class_entropy"] < 0.4
    bad = sample_report(classifier, noise, reference)
    assert 0 <= bad["class_entropy"] <= math.log(3) + 1e-12
    # same distribution: far smaller than one class only or noise
    assert good["frechet"] < 0.05 * min(single["frechet"], bad["frechet"])
    assert sample_report(classifier, reference, reference)["frechet"] < 1e-9
    feats = extract_features(classifier, reference, batch_size=64)
    assert feats.shape == (150, 16) and feats.dtype == torch.float64
    same_feats = extract_features(classifier, same_kind, batch_size=64)
    assert frechet_distance(same_feats, feats) == pytest.approx(good["frechet"], rel=1e-12)


def test_sample_report_input_errors(trained):
    classifier, _ = trained
    reference, _ = shapes(10, seed=0)
    with pytest.raises(ValueError, match=r"samples must be digits \[N, 1, 28, 28\]"):
        sample_report(classifier, torch.zeros(4, 1, 32, 32), reference)
    nan = reference.clone()
    nan[3] = math.nan
    with pytest.raises(ValueError, match="reference has non-finite values.*index 3"):
        sample_report(classifier, reference, nan)
    with pytest.raises(ValueError, match="at least 2"):
        sample_report(classifier, reference[:1], reference)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        sample_report(classifier, reference, reference, batch_size=0)


# ---------------------------------------------------------------- save / load
def test_save_load_round_trip(trained, tmp_path):
    classifier, _ = trained
    meta = {"accuracy": 0.97, "steps": 150, "seed": 0, "data": {"holdout": 2000, "files": ["a"]}}
    path = save_classifier(tmp_path / "sub" / "clf.pt", classifier, meta)
    loaded, loaded_meta = load_classifier(path)
    assert loaded_meta == meta and not loaded.training
    assert loaded.config() == classifier.config() == SMALL
    x, _ = shapes(9, seed=4)
    assert torch.equal(loaded(x), classifier(x))
    assert torch.equal(loaded.features(x), classifier.features(x))


def test_load_refuses_damaged_or_foreign_files(trained, tmp_path):
    classifier, _ = trained
    path = save_classifier(tmp_path / "clf.pt", classifier, {"seed": 0})
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["head.bias"] += 1
    torch.save(payload, tmp_path / "damaged.pt")
    with pytest.raises(ValueError, match="do not match their checksum"):
        load_classifier(tmp_path / "damaged.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a digit classifier"):
        load_classifier(tmp_path / "other.pt")
    with pytest.raises(TypeError, match="meta must hold only.*weights_only"):
        save_classifier(tmp_path / "x.pt", classifier, {"bad": object()})
    assert not (tmp_path / "x.pt").exists()
