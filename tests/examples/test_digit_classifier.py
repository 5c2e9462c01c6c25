"""examples/digit_classifier.py: a few-step run of its main() on a tiny synthetic IDX file,
and its --help (every option documented with its default)."""

from __future__ import annotations

import json
import math

import pytest

from canonwrap.data.rotmnist import RotatedMNIST
from canonwrap.metrics.digits import classifier_accuracy, load_classifier
from tests.data.test_rotmnist import make_idx

from . import test_help
from .conftest import load_example


def test_digit_classifier_smoke(tmp_path, capsys):
    data, out = tmp_path / "mnist", tmp_path / "run" / "clf.pt"
    make_idx(data, 96)  # t10k only: 64 training digits and a holdout of 32 test digits
    argv = [
        "--out",
        str(out),
        "--data",
        str(data),
        "--train-steps",
        "6",
        "--batch-size",
        "8",
        "--width",
        "4",
        "--feature-dim",
        "8",
        "--holdout",
        "32",
        "--threads",
        "1",
        "--no-progress",
    ]
    meta = load_example("digit_classifier").main(argv)

    assert "held-out accuracy" in capsys.readouterr().out
    assert 0 <= meta["test_accuracy"] <= 1 and meta["train_steps"] == 6
    assert meta["data"]["num_train"] == 64 and meta["data"]["num_test"] == 32
    assert meta["data"]["source"] == "idx" and meta["data"]["holdout"] == 32
    ref = meta["reference"]
    assert ref["half_size"] == 16 and ref["noise_images"] == 32
    assert 0 <= ref["frechet_test_halves"] and math.isfinite(ref["frechet_test_vs_noise"])

    classifier, saved = load_classifier(out)
    assert saved == meta and classifier.config()["feature_dim"] == 8
    text = out.with_suffix(".json").read_text()
    assert json.loads(text) == json.loads(json.dumps(meta))
    assert str(data) not in text and str(tmp_path) not in text  # no local folders recorded
    assert not out.with_name(out.name + ".train.pt").exists()  # training checkpoint removed
    # the held-out accuracy is that of the saved classifier on the test digits
    test = RotatedMNIST(data, split="test", symmetric=True, seed=0, test_size=32)
    assert classifier_accuracy(classifier, test.images, test.labels) == meta["test_accuracy"]


def test_digit_classifier_without_data_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv("CANONWRAP_MNIST", raising=False)
    with pytest.raises(FileNotFoundError, match="CANONWRAP_MNIST"):
        load_example("digit_classifier").main(["--out", str(tmp_path / "x.pt"), "--no-progress"])


def test_digit_classifier_help(monkeypatch):
    test_help.test_every_option_has_help_and_states_its_default("digit_classifier", monkeypatch)


def test_digit_classifier_help_prints(capsys):
    with pytest.raises(SystemExit) as info:
        load_example("digit_classifier").main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage:") and "--train-steps" in text and "$CANONWRAP_MNIST" in text
