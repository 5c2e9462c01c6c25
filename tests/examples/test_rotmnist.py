"""examples/rotmnist.py: a few-step smoke run of its main() on a tiny synthetic IDX file."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.data.test_rotmnist import make_idx

from .conftest import load_example

pytest.importorskip("escnn")
pytest.importorskip("matplotlib")

from torch.utils.data import DataLoader  # noqa: E402

from canonwrap import CosineSchedule  # noqa: E402
from canonwrap.data import RotatedMNIST  # noqa: E402
from canonwrap.images import image_diffusion  # noqa: E402
from canonwrap.metrics.images import denoising_test_loss  # noqa: E402
from canonwrap.training import find_latest_checkpoint  # noqa: E402


def test_rotmnist_smoke(tmp_path):
    data, out = tmp_path / "mnist", tmp_path / "run"
    make_idx(data, 96)  # 64 training digits, a holdout of 32 test digits
    argv = [
        "run",
        "--out",
        str(out),
        "--data",
        str(data),
        "--quick",
        "--no-progress",
        "--configs",
        "unet",
        "canon-c8",
        "--holdout",
        "32",
        "--test-images",
        "32",
        "--eval-batch",
        "16",
        "--base-width",
        "8",
        "--channel-mults",
        "1",
        "2",
        "--num-res-blocks",
        "1",
        "--canon-hidden",
        "1",
        "--canon-layers",
        "2",
        "--canon-downsample",
        "1",
        "--batch-size",
        "16",
        "--train-steps",
        "3",
        "--max-minutes",
        "1",
        "--num-samples",
        "4",
        "--sample-steps",
        "3",
        "--timesteps",
        "50",
    ]
    main = load_example("rotmnist").main
    summary = main(argv)

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

    # the recorded configuration rebuilds the model with the library, and the trained
    # weights load into it; the evaluation is model.training_loss with the same generator
    cfg = json.loads((out / "canon-c8" / "config.json").read_text())
    assert cfg["train_steps"] == 3
    model = image_diffusion(
        8,
        base_width=cfg["base_width"],
        channel_mults=cfg["channel_mults"],
        num_res_blocks=cfg["num_res_blocks"],
        canon_hidden=cfg["canon_hidden"],
        canon_layers=cfg["canon_layers"],
        canon_downsample=cfg["canon_downsample"],
        schedule=CosineSchedule(cfg["timesteps"]),
    )
    ckpt = torch.load(find_latest_checkpoint(out / "canon-c8" / "checkpoints"), weights_only=True)
    model.load_state_dict(ckpt["model"])  # the quick preset evaluates the raw weights
    model.eval()
    test = RotatedMNIST(data, split="test", symmetric=True, test_size=32)
    loader = DataLoader(test, batch_size=cfg["eval_batch"])
    ev = denoising_test_loss(model, loader, seed=cfg["eval_seed"])
    assert float(ev["loss"].mean()) == pytest.approx(results["canon-c8"]["test_loss"], rel=1e-6)
    images = torch.rand(6, 1, 28, 28) * 2 - 1
    ev = denoising_test_loss(model, images, batch_size=6, seed=7)
    with torch.no_grad():
        ref = model.training_loss(images, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(ev["loss"].float(), ref.per_sample, atol=1e-6)
    assert torch.equal(ev["t"], ref.t)

    # `report` rebuilds the same summary from the folders
    again = main(["report", "--out", str(out)])
    assert again["results"]["unet"]["test_loss"] == results["unet"]["test_loss"]


def _tiny_argv(out, data, seed, configs):
    return [
        "run", "--out", str(out), "--data", str(data), "--quick", "--no-progress",
        "--seed", str(seed), "--configs", *configs,
        "--holdout", "32", "--test-images", "32", "--eval-batch", "16",
        "--base-width", "8", "--channel-mults", "1", "2", "--num-res-blocks", "1",
        "--canon-hidden", "1", "--canon-layers", "2", "--canon-downsample", "1",
        "--batch-size", "16", "--train-steps", "2", "--num-samples", "2",
        "--sample-steps", "2", "--timesteps", "50",
    ]  # fmt: skip


def test_rotmnist_controls_same_inputs_and_seeds(tmp_path):
    """The smoothing controls (random C_n pose) and the exact C4 canonicalizer run; the
    same-input scores reproduce each model's own loss, and `seeds` aggregates two seeds."""
    data = tmp_path / "mnist"
    make_idx(data, 96)
    main = load_example("rotmnist").main
    configs = ["unet", "canon-c4", "unet-rot-c4", "canon-c8", "unet-rot-c8"]
    runs = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        results = main(_tiny_argv(out, data, seed, configs))["results"]
        runs.append(out)
        assert set(results) == set(configs)
        # C4 poses are pixel permutations: nothing is interpolated
        assert results["canon-c4"]["interpolated_fraction"] == 0.0
        assert results["unet-rot-c4"]["interpolated_fraction"] == 0.0
        assert 0 < results["unet-rot-c8"]["interpolated_fraction"] < 1
        for name in ("canon-c4", "canon-c8"):
            assert math.isfinite(results[name]["diff_vs_control"])
        assert "diff_vs_control" not in results["unet-rot-c8"]
        summary = main(["same-inputs", "--out", str(out), "--no-progress"])
        cross = summary["cross"]
        assert set(cross) == {"canon-c4", "canon-c8"}
        for name, entry in cross.items():
            # its own denoiser on its own canonical digits is its test loss
            assert entry["loss"][name] == pytest.approx(results[name]["test_loss"], rel=1e-5)
            assert set(entry["loss"]) == {name, "unet", f"unet-rot-c{entry['n']}"}
            diff = entry["loss"][name] - entry["loss"]["unet"]
            assert entry["same_input_diff_vs_unet"] == pytest.approx(diff, abs=1e-9)
        assert "Same inputs" in (out / "results.md").read_text()
    # the control's pose is fixed per digit but changes with the seed (its salt)
    evals = [torch.load(r / "unet-rot-c8" / "test_eval.pt", weights_only=True) for r in runs]
    assert not torch.equal(evals[0]["element"], evals[1]["element"])

    # the sample metric: a (barely trained) digit classifier scores every configuration's samples
    from canonwrap.metrics.digits import save_classifier, train_digit_classifier

    train = RotatedMNIST(data, split="train", symmetric=True, test_size=32)
    classifier, _ = train_digit_classifier(
        train.images, train.labels, steps=2, batch_size=8, width=4, feature_dim=4
    )
    save_classifier(tmp_path / "clf.pt", classifier, {"steps": 2})
    scored = main(
        ["sample-metrics", "--out", str(runs[0]), "--classifier", str(tmp_path / "clf.pt")]
    )
    assert set(scored["rows"]) == set(configs)
    for row in scored["rows"].values():
        assert row["num_samples"] == 2 and row["num_reference"] == 32
        assert math.isfinite(row["frechet"]) and row["frechet"] >= 0
    assert "Fréchet" in (runs[0] / "sample_metrics.md").read_text()
    clf = str(tmp_path / "clf.pt")
    other = main(["sample-metrics", "--out", str(runs[1]), "--classifier", clf])

    table = main(["seeds", "--runs", *map(str, runs), "--out", str(tmp_path / "agg")])
    row = table["canon-c8"]
    assert len(row["diff_vs_unet"]["values"]) == 2
    losses = [
        json.loads((r / "results.json").read_text())["results"]["canon-c8"]["test_loss"]
        for r in runs
    ]
    assert row["test_loss"]["mean"] == pytest.approx(sum(losses) / 2)
    assert "same_input_diff_vs_control" in row
    # the sample metric over seeds, and its paired difference to the UNet within each seed
    fds = [scored["rows"]["canon-c8"]["frechet"], other["rows"]["canon-c8"]["frechet"]]
    assert row["sample_frechet"]["mean"] == pytest.approx(sum(fds) / 2)
    unet_fds = [scored["rows"]["unet"]["frechet"], other["rows"]["unet"]["frechet"]]
    assert row["sample_frechet_vs_unet"]["values"] == pytest.approx(
        [a - b for a, b in zip(fds, unet_fds)]
    )
    assert "sample_frechet_vs_unet" not in table["unet"]
    assert "nan" not in (tmp_path / "agg" / "seeds.md").read_text()  # C4: "— (none)"
    assert (tmp_path / "agg" / "seeds.png").stat().st_size > 0
    assert "Same inputs" in (tmp_path / "agg" / "seeds.md").read_text()
    with pytest.raises(SystemExit, match="results.json"):
        main(["seeds", "--runs", str(tmp_path / "nothing"), "--out", str(tmp_path / "agg2")])

    # `compare`: one configuration under two settings (here: seed 1 against seed 0 and back),
    # paired digit by digit on the same test t and noise
    cmp = main(["compare", "--runs", str(runs[1]), str(runs[0]), "--against", str(runs[0]),
                str(runs[1]), "--configs", "canon-c8", "--out", str(tmp_path / "cmp")])
    per_seed = cmp["rows"]["canon-c8"]["per_seed"]
    assert per_seed[0]["mean"] == pytest.approx(losses[1] - losses[0], rel=1e-5)
    assert per_seed[1]["mean"] == pytest.approx(-per_seed[0]["mean"], rel=1e-9)
    assert cmp["rows"]["canon-c8"]["over_seeds"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert "canon(C8)+UNet" in (tmp_path / "cmp" / "compare.md").read_text()
    with pytest.raises(SystemExit, match="as many"):
        main(["compare", "--runs", str(runs[0]), "--against", str(runs[0]), str(runs[1]),
              "--configs", "canon-c8"])


def test_rotmnist_budget_scores_every_kept_checkpoint(tmp_path):
    """`budget` samples from every kept checkpoint; at the last one it reproduces the run's
    own samples' scores (`sample-metrics`), and earlier weights give other samples."""
    data = tmp_path / "mnist"
    make_idx(data, 96)
    main = load_example("rotmnist").main
    out = tmp_path / "run"
    argv = _tiny_argv(out, data, 0, ["unet", "canon-c8"])
    argv[argv.index("--train-steps") + 1] = "6"
    main([*argv, "--checkpoint-every", "2", "--keep-checkpoints", "0"])
    for name in ("unet", "canon-c8"):
        steps = [p.name for p in sorted((out / name / "checkpoints").glob("ckpt_*.pt"))]
        assert len(steps) == 3, steps  # all kept (the default keeps the newest 2)

    from canonwrap.metrics.digits import save_classifier, train_digit_classifier

    train = RotatedMNIST(data, split="train", symmetric=True, test_size=32)
    classifier, _ = train_digit_classifier(
        train.images, train.labels, steps=2, batch_size=8, width=4, feature_dim=4
    )
    save_classifier(tmp_path / "clf.pt", classifier, {"steps": 2})
    clf = str(tmp_path / "clf.pt")
    scored = main(["sample-metrics", "--out", str(out), "--classifier", clf])
    budget = main(["budget", "--out", str(out), "--classifier", clf, "--no-progress"])
    assert set(budget["rows"]) == {"unet", "canon-c8"}
    for name, entries in budget["rows"].items():
        assert [e["step"] for e in entries] == [2, 4, 6]
        last, first = entries[-1], entries[0]
        assert last["frechet"] == pytest.approx(scored["rows"][name]["frechet"], rel=1e-6)
        assert last["confidence"] == pytest.approx(scored["rows"][name]["confidence"], rel=1e-6)
        assert first["frechet"] != pytest.approx(last["frechet"], rel=1e-6)
        assert (out / f"budget_samples_{name}.png").stat().st_size > 0
    real = budget["real_digits"]
    assert real["num_samples"] == 2 and math.isfinite(real["frechet"])
    assert (out / "budget.png").stat().st_size > 0
    assert "real training digits" in (out / "budget.md").read_text()

    # clipped sampling is the default; unclipped samples are drawn again on request
    for name in ("unet", "canon-c8"):
        assert scored["rows"][name]["clipped"] and not scored["rows"][name]["redrawn"]
        assert budget["rows"][name][-1]["clipped"]
    raw = main(["sample-metrics", "--out", str(out), "--classifier", clf, "--clip-samples", "0"])
    raw_budget = main(["budget", "--out", str(out), "--classifier", clf, "--clip-samples", "0",
                       "--checkpoint-steps", "6"])  # fmt: skip
    for name in ("unet", "canon-c8"):
        row = raw["rows"][name]
        assert row["redrawn"] and not row["clipped"]
        assert row["frechet"] == pytest.approx(raw_budget["rows"][name][0]["frechet"], rel=1e-6)
        assert row["frechet"] != pytest.approx(scored["rows"][name]["frechet"], rel=1e-6)

    only = main(["budget", "--out", str(out), "--classifier", clf, "--checkpoint-steps", "4"])
    assert [e["step"] for e in only["rows"]["unet"]] == [4]
    for key in ("frechet", "confidence"):
        assert only["rows"]["unet"][0][key] == pytest.approx(budget["rows"]["unet"][1][key])
    with pytest.raises(SystemExit, match="no checkpoints"):
        main(["budget", "--out", str(out), "--classifier", clf, "--checkpoint-steps", "3"])
