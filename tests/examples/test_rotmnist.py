"""examples/rotmnist.py: a few-step smoke run on a tiny synthetic IDX file."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.data.test_rotmnist import make_idx

from .conftest import load_example

pytest.importorskip("escnn")
pytest.importorskip("matplotlib")

rotmnist = load_example("rotmnist")


def test_rotmnist_smoke(tmp_path):
    data, out = tmp_path / "mnist", tmp_path / "run"
    make_idx(data, 96)  # 64 training digits, a holdout of 32 test digits
    argv = [
        "run", "--out", str(out), "--data", str(data), "--quick", "--no-progress",
        "--configs", "unet", "canon-c8",
        "--holdout", "32", "--test-images", "32", "--eval-batch", "16",
        "--base-width", "8", "--channel-mults", "1", "2", "--num-res-blocks", "1",
        "--canon-hidden", "1", "--canon-layers", "2", "--canon-downsample", "1",
        "--batch-size", "16", "--steps", "3", "--max-minutes", "1",
        "--num-samples", "4", "--sample-steps", "3", "--timesteps", "50",
    ]
    summary = rotmnist.main(argv)

    results = summary["results"]
    assert set(results) == {"unet", "canon-c8"}
    for name, res in results.items():
        assert res["steps"] == 3
        assert math.isfinite(res["test_loss"]) and res["test_loss"] > 0
        assert res["test_images"] == 32
        assert (out / name / "samples.png").stat().st_size > 0
        assert (out / name / "checkpoints").is_dir()
    assert (out / "canon-c8" / "canonical.png").stat().st_size > 0
    assert not (out / "unet" / "canonical.png").exists()
    assert math.isfinite(results["canon-c8"]["diff_vs_unet"])
    assert 0 <= results["canon-c8"]["orientation_concentration"] <= 1
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["results"]["canon-c8"]["test_loss"] == results["canon-c8"]["test_loss"]
    table = (out / "results.md").read_text()
    assert "canon(C8)+UNet" in table and "0.0312" in table
    assert (out / "loss_curves.png").is_file()

    # the evaluation is model.training_loss with the same generator, digit by digit
    cfg = json.loads((out / "canon-c8" / "config.json").read_text())
    model = rotmnist.build_model("canon-c8", cfg).eval()
    images = torch.rand(6, 1, 28, 28) * 2 - 1
    ev = rotmnist.evaluate(model, images, batch_size=6, seed=7)
    with torch.no_grad():
        ref = model.training_loss(images, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(ev["loss"].float(), ref.per_sample, atol=1e-6)
    assert torch.equal(ev["t"], ref.t)

    # `report` rebuilds the same summary from the folders
    again = rotmnist.main(["report", "--out", str(out)])
    assert again["results"]["unet"]["test_loss"] == results["unet"]["test_loss"]
