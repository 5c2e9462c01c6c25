import json
import math

import pytest
import torch

from tests.helpers import load_script

TRAIN = ["--quick", "--train-size", "48", "--val-size", "16",
         "--hidden", "8", "--layers", "1", "--canon-hidden", "8", "--canon-layers", "1",
         "--timesteps", "20", "--batch-size", "8", "--threads", "1", "--no-progress",
         "--nll-size", "8", "--eval-every", "2"]
TINY = TRAIN + ["--num-samples", "3"]


@pytest.mark.parametrize(
    "model", ["gdm", "edm", "canon-gdm", "canon-frozen-gdm", "pca-transformer", "canon-transformer"]
)
def test_qm9_all_smoke(example, tmp_path, model, capsys):
    qm9 = example("qm9")
    out = tmp_path / model
    result = qm9.main(["all", "--model", model, "--out", str(out), "--max-steps", "3", *TINY])
    assert result["model"] == model
    mol = result["molecules"]
    assert mol["n_molecules"] == 3 and 0 <= mol["validity"] <= 1
    assert result["test_nll"]["nll"] == result["test_nll"]["nll"]  # not NaN
    assert result["train_result"]["steps"] == 3
    names = ("config.json", "metrics.json", "samples.xyz", "samples.sdf", "samples.pt")
    for name in (*names, "summary.png"):
        assert (out / name).exists(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["val_loss"] == pytest.approx(result["val_loss"])
    # the run ends with its summary and the figure's path
    tail = capsys.readouterr().out.rstrip().splitlines()[-6:]
    assert tail[0] == f"== {model}: summary" and tail[-1] == f"   figure: {out / 'summary.png'}"


def test_qm9_resume_and_ddim_sampling_and_figure(example, tmp_path):
    qm9 = example("qm9")
    out = tmp_path / "run"
    qm9.main(["train", "--model", "canon-gdm", "--out", str(out), "--max-steps", "2", *TRAIN])
    res = qm9.main(["train", "--model", "canon-gdm", "--out", str(out), "--resume",
                    "--max-steps", "4", "--no-progress"])
    assert res["steps"] == 4
    timing = qm9.main(["sample", "--out", str(out), "--num-samples", "2", "--sampler", "ddim",
                       "--sample-steps", "5", "--no-progress"])
    assert timing["num_samples"] == 2
    svq = load_script("benchmarks/steps_vs_quality.py")
    rows = svq.main(["--run", str(out), "--num-molecules", "2", "--settings",
                     "ancestral:5,dpm:3,ddim:3", "--out", str(tmp_path / "svq"), "--no-progress"])
    assert [r["steps"] for r in rows] == [5, 3, 3]
    assert all(r["objective"] == "diffusion" for r in rows)
    assert rows[0]["network_calls"] == 6  # 5 ancestral steps, then the decoding at t = 0
    with pytest.raises(SystemExit):  # a grid power is for flow-matching runs
        svq.main(["--run", str(out), "--settings", "ddim:3@2", "--out", str(tmp_path / "bad"),
                  "--no-progress"])  # fmt: skip
    assert (tmp_path / "svq.md").exists()
    plot = example("plot_molecules")
    png = plot.main(["--run", str(out), "--png", str(tmp_path / "fig.png"), "--count", "2"])
    assert png.exists() and png.stat().st_size > 1000


def test_qm9_rejects_missing_checkpoint(example, tmp_path):
    qm9 = example("qm9")
    (tmp_path / "config.json").write_text(json.dumps({"remove_h": False, "model": "gdm"}))
    with pytest.raises((FileNotFoundError, ValueError), match="model_config|checkpoint"):
        qm9.main(["sample", "--out", str(tmp_path), "--no-progress"])


def test_qm9_composed_model_logs_frame_drift(example, tmp_path):
    """--denoiser/--canonicalizer compose freely; a learned canonicalizer's drift is logged."""
    qm9 = example("qm9")
    out = tmp_path / "composed"
    res = qm9.main(["train", "--denoiser", "transformer", "--canonicalizer", "egnn-anchored",
                    "--canon-warmup", "1", "--out", str(out), "--max-steps", "4", *TRAIN])
    assert res["steps"] == 4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "transformer+egnn-anchored"
    assert cfg["model_config"]["canonicalizer"] == "egnn-anchored"
    evals = [json.loads(line)["eval"] for line in
             (out / "checkpoints" / "log.jsonl").read_text().splitlines() if '"eval"' in line]
    assert len(evals) == 2
    for ev in evals:
        assert ev["frame_drift_deg"] >= 0 and ev["frame_drift_total_deg"] >= 0
        assert ev["val_nll"] > 0 and ev["val_loss"] > 0
    # the anchor's prior is part of the training loss and is logged as a term
    records = [json.loads(line) for line in
               (out / "checkpoints" / "log.jsonl").read_text().splitlines()]
    assert any("prior" in r.get("terms", {}) for r in records)


def test_sampling_skips_a_newer_checkpoint_that_fails_verification(example, tmp_path):
    """sample/evaluate load the newest checkpoint that verifies (as --resume does), warn
    about the one skipped and leave the folder as it is."""
    import warnings

    import torch

    from canonwrap.evaluation import load_qm9_run
    from canonwrap.training import find_latest_checkpoint

    qm9 = example("qm9")
    out = tmp_path / "run"
    qm9.main(["train", "--model", "gdm", "--out", str(out), "--max-steps", "2", *TRAIN])
    qm9.main(["train", "--out", str(out), "--resume", "--max-steps", "4", "--no-progress"])
    newest = find_latest_checkpoint(out / "checkpoints")
    older = sorted((out / "checkpoints").glob("ckpt_*.pt"))[-2]
    assert newest != older
    reference, _ = load_qm9_run(out)  # newest, intact
    data = bytearray(newest.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # damage inside the file
    newest.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load_qm9_run(out)
    msg = "\n".join(str(w.message) for w in caught)
    assert f"loading {older.name}" in msg and newest.name in msg
    assert newest.exists() and not newest.with_name(newest.name + ".corrupt").exists()
    # the weights are the older checkpoint's, not the damaged newest one's
    state = torch.load(older, weights_only=True)["model"]
    key = next(k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point())
    assert torch.equal(model.state_dict()[key], state[key])
    assert not all(
        torch.equal(model.state_dict()[k], v)
        for k, v in reference.state_dict().items()
        if torch.is_tensor(v)
    )


def test_mlp_ratio_reaches_the_transformer_and_survives_reloading(example, tmp_path):
    from canonwrap.evaluation import load_qm9_run

    qm9 = example("qm9")
    out = tmp_path / "run"
    qm9.main(["train", "--model", "pca-transformer", "--out", str(out), "--max-steps", "1",
              "--mlp-ratio", "2", *TRAIN])
    model, cfg = load_qm9_run(out)
    assert cfg["mlp_ratio"] == 2.0 and cfg["model_config"]["mlp_ratio"] == 2.0
    widths = {block.mlp[0].out_features for block in model.denoiser.blocks}
    assert widths == {2 * 8}  # --hidden 8 in TRAIN; the default ratio 4 would give 32


FLOW_SAMPLING = ["--sampler", "euler", "--sample-steps", "5"]


@pytest.mark.parametrize("model", ["pca-transformer", "gdm"])
def test_qm9_all_with_flow_matching(example, tmp_path, model):
    """--objective flow trains CanonicalizedFlowMatching, samples by an ODE solver and
    evaluates its ODE likelihood; periodic evaluation logs the held-out loss and val NLL."""
    from canonwrap import CanonicalizedFlowMatching
    from canonwrap.evaluation import load_qm9_run

    qm9 = example("qm9")
    out = tmp_path / model
    result = qm9.main(["all", "--model", model, "--objective", "flow", "--out", str(out),
                       "--max-steps", "3", *TINY, *FLOW_SAMPLING])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["objective"] == "flow" and cfg["model_config"]["objective"] == "flow"
    loaded, _ = load_qm9_run(out)
    assert isinstance(loaded, CanonicalizedFlowMatching)
    assert result["molecules"]["n_molecules"] == 3
    nll = result["test_nll"]
    assert all(math.isfinite(nll[k]) for k in ("nll", "flow", "reconstruction", "size"))
    terms = nll["flow"] + nll["dequantization"] + nll["reconstruction"] + nll["size"]
    assert nll["nll"] == pytest.approx(terms, rel=1e-5, abs=1e-3)
    assert "kl_prior" not in nll and math.isfinite(result["val_loss"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test_nll"]["nll"] == pytest.approx(nll["nll"])
    for name in ("samples.xyz", "samples.sdf", "samples.pt"):
        assert (out / name).exists(), name
    assert "euler" in json.loads((out / "sampling.json").read_text())["sampler"]
    evals = [json.loads(line)["eval"] for line in
             (out / "checkpoints" / "log.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals and all(math.isfinite(ev["val_nll"]) and ev["val_loss"] > 0 for ev in evals)


def test_qm9_flow_couplings_and_canonical_noise_reach_the_model(example, tmp_path, capsys):
    """--coupling builds the AlignedPrior it names (atom types as the assignment's classes)
    and --canonical-noise the canonical start; both are saved, reloaded and refused for
    diffusion. A canonical-noise run has no density: training logs no val NLL and evaluate
    says why instead of a number."""
    from canonwrap.evaluation import load_qm9_run
    from canonwrap.molecules import QM9_ATOM_TYPES

    qm9 = example("qm9")
    out = tmp_path / "both"
    qm9.main(["train", "--model", "pca-transformer", "--objective", "flow", "--coupling",
              "rotation+assignment", "--out", str(out), "--max-steps", "2", *TRAIN])
    model, cfg = load_qm9_run(out)
    assert cfg["model_config"]["coupling"] == "rotation+assignment"
    prior = model.coupling
    assert prior.rotation and prior.assignment
    assert prior.type_columns == slice(0, len(QM9_ATOM_TYPES)) and not model.canonical_noise
    for name, rotation, assignment in (("rotation", True, False), ("assignment", False, True)):
        built = qm9.qm9_model(qm9.QM9ModelConfig(objective="flow", coupling=name))
        assert (built.coupling.rotation, built.coupling.assignment) == (rotation, assignment)
    assert qm9.qm9_model(qm9.QM9ModelConfig(objective="flow")).coupling is None  # control

    out = tmp_path / "canonical"
    result = qm9.main(["all", "--model", "pca-transformer", "--objective", "flow",
                       "--canonical-noise", "--out", str(out), "--max-steps", "2", *TINY,
                       *FLOW_SAMPLING])
    model, cfg = load_qm9_run(out)
    assert model.canonical_noise and model.coupling is None
    assert result["test_nll"]["nll"] is None and "canonical-noise" in result["test_nll"][
        "unavailable"]
    assert "test NLL: none (trained with --canonical-noise" in capsys.readouterr().out
    evals = [json.loads(line)["eval"] for line in
             (out / "checkpoints" / "log.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals and all("val_nll" not in ev and ev["val_loss"] > 0 for ev in evals)
    assert result["molecules"]["n_molecules"] == 3

    for flags in (["--coupling", "rotation"], ["--canonical-noise"]):
        with pytest.raises(ValueError, match="options of --objective flow"):
            qm9.main(["train", "--model", "gdm", *flags, "--out", str(tmp_path / "d"), *TRAIN])
    with pytest.raises(ValueError, match="options of flow matching"):
        qm9.qm9_model(qm9.QM9ModelConfig(coupling="rotation"))
    with pytest.raises(ValueError, match="unknown coupling 'ot'"):
        qm9.qm9_model(qm9.QM9ModelConfig(objective="flow", coupling="ot"))


def test_qm9_sampler_must_match_the_objective(example, tmp_path):
    qm9 = example("qm9")
    flow, diffusion = tmp_path / "flow", tmp_path / "diffusion"
    qm9.main(["train", "--model", "gdm", "--objective", "flow", "--out", str(flow),
              "--max-steps", "1", *TRAIN])
    qm9.main(["train", "--model", "gdm", "--out", str(diffusion), "--max-steps", "1", *TRAIN])
    for sampler in ("ancestral", "ddim", "dpm"):
        with pytest.raises(ValueError, match="--objective flow: choose one of euler, midpoint"):
            qm9.main(["sample", "--out", str(flow), "--sampler", sampler, "--no-progress"])
    for sampler in ("euler", "midpoint", "dopri5"):
        with pytest.raises(ValueError, match="--objective diffusion: choose one of ancestral"):
            qm9.main(["sample", "--out", str(diffusion), "--sampler", sampler, "--no-progress"])
    with pytest.raises(ValueError, match="dopri5"):
        qm9.main(["sample", "--out", str(flow), "--sampler", "dopri5", "--sample-steps", "4",
                  "--no-progress"])
    with pytest.raises(ValueError, match="diffusion sampler"):  # before any training
        qm9.main(["all", "--objective", "flow", "--sampler", "ddim", "--out",
                  str(tmp_path / "never"), *TINY])
    assert not (tmp_path / "never").exists()
    timing = qm9.main(["sample", "--out", str(flow), "--sampler", "midpoint", "--sample-steps",
                       "2", "--num-samples", "2", "--no-progress"])
    assert timing["num_samples"] == 2 and "midpoint" in timing["sampler"]
    # --grid-power: flow runs with a fixed-step solver only; it reaches the solver
    samples = {}
    for extra in ([], ["--grid-power", "3"]):
        timing = qm9.main(["sample", "--out", str(flow), "--sampler", "euler", "--sample-steps",
                           "3", "--num-samples", "2", "--no-progress", *extra])  # fmt: skip
        samples[bool(extra)] = torch.load(flow / "samples.pt")["pos"]
    assert timing["sampler"] == "ODE(euler, steps=3, grid_power=3)"
    assert (samples[True] - samples[False]).abs().max() > 1e-4  # same noise, other grid
    for out, extra, message in [
        (diffusion, [], "--objective diffusion"),
        (flow, ["--sampler", "dopri5"], "does not apply to dopri5"),
    ]:
        with pytest.raises(ValueError, match=message):
            qm9.main(["sample", "--out", str(out), "--grid-power", "2", "--no-progress", *extra])
    with pytest.raises(ValueError, match="--grid-power 2: grid_power spaces"):  # before training
        qm9.main(["all", "--grid-power", "2", "--out", str(tmp_path / "never"), *TINY])
    assert not (tmp_path / "never").exists()
    # --sampler euler_maruyama with --noise-scale reaches the SDE sampler; the noise is
    # refused for an ODE solver and for diffusion runs
    timing = qm9.main(["sample", "--out", str(flow), "--sampler", "euler_maruyama",
                       "--sample-steps", "3", "--noise-scale", "0.5", "--num-samples", "2",
                       "--no-progress"])
    assert timing["sampler"] == "SDE(euler_maruyama, steps=3, noise_scale=0.5)"
    for out, extra, message in [
        (diffusion, [], "--noise-scale 0.5: noise_scale is the noise of the flow-matching"),
        (flow, ["--sampler", "midpoint"], "--noise-scale 0.5: .* the ODE method 'midpoint'"),
    ]:
        with pytest.raises(ValueError, match=message):
            qm9.main(["sample", "--out", str(out), "--noise-scale", "0.5", "--no-progress",
                      *extra])


def test_qm9_run_without_objective_loads_as_diffusion(example, tmp_path):
    """config.json of runs written before --objective has no such key: diffusion."""
    from canonwrap import CanonicalizedDiffusion
    from canonwrap.evaluation import load_qm9_run

    qm9 = example("qm9")
    out = tmp_path / "old"
    qm9.main(["train", "--model", "gdm", "--out", str(out), "--max-steps", "1", *TRAIN])
    cfg = json.loads((out / "config.json").read_text())
    del cfg["objective"], cfg["model_config"]["objective"]
    (out / "config.json").write_text(json.dumps(cfg))
    model, _ = load_qm9_run(out)
    assert isinstance(model, CanonicalizedDiffusion)
    assert qm9.model_config(cfg).objective == "diffusion"
    res = qm9.main(["train", "--out", str(out), "--resume", "--max-steps", "2", "--no-progress"])
    assert res["steps"] == 2
    assert json.loads((out / "config.json").read_text())["model_config"]["objective"] == "diffusion"


def test_qm9_model_rejects_an_unknown_objective():
    from canonwrap.recipes import QM9ModelConfig, qm9_model

    with pytest.raises(ValueError, match="objective 'score'; choose one of diffusion, flow"):
        qm9_model(QM9ModelConfig(objective="score"))


def test_steps_vs_quality_on_a_flow_run_counts_network_calls(example, tmp_path, capsys):
    qm9 = example("qm9")
    out = tmp_path / "flow"
    qm9.main(["train", "--model", "gdm", "--objective", "flow", "--out", str(out),
              "--max-steps", "2", *TRAIN])
    svq = load_script("benchmarks/steps_vs_quality.py")
    rows = svq.main(["--run", str(out), "--num-molecules", "2", "--settings",
                     "euler:3,midpoint:2,dopri5", "--out", str(tmp_path / "svq"),
                     "--no-progress"])
    assert [(r["objective"], r["sampler"], r["steps"]) for r in rows] == [
        ("flow", "euler", 3), ("flow", "midpoint", 2), ("flow", "dopri5", "adaptive")
    ]
    assert [r["network_calls"] for r in rows[:2]] == [3, 4]  # midpoint: two per step
    assert rows[2]["network_calls"] > 0
    assert "| flow | dopri5 | adaptive |" in (tmp_path / "svq.md").read_text()
    for r in rows:  # where the unstable atoms err: over + under <= unstable
        assert r["n_over_valence"] + r["n_under_valence"] <= r["n_atoms"] - r["n_stable_atoms"]
    assert "atoms over / under valence %" in (tmp_path / "svq.md").read_text()
    for r in rows:  # standard errors: binomial over the 2 molecules; atoms by molecule
        v = r["validity"]
        assert r["validity_se"] == pytest.approx((v * (1 - v) / 2) ** 0.5)
        assert r["atom_stability_se"] is not None and r["atom_stability_se"] >= 0
    assert "molecules as the unit for atom stability" in (tmp_path / "svq.md").read_text()
    # compared with a reference from the same noise: the same setting again is identical
    # (distance exactly 0, every type agrees), another solver is not
    rows = svq.main(["--run", str(out), "--num-molecules", "3", "--settings",
                     "midpoint:4,euler:1,midpoint:4", "--reference", "midpoint:4",
                     "--out", str(tmp_path / "ref"), "--no-progress"])
    assert "vs_reference" not in rows[0]
    assert rows[2]["vs_reference"]["rms_distance"] == 0.0
    assert rows[2]["vs_reference"]["types_agree"] == 1.0
    assert rows[1]["vs_reference"]["rms_distance"] > 1e-3
    assert "RMS distance to midpoint:4" in (tmp_path / "ref.md").read_text()
    with pytest.raises(SystemExit):
        svq.main(["--run", str(out), "--settings", "euler:3", "--reference", "dopri5",
                  "--out", str(tmp_path / "bad"), "--no-progress"])
    with pytest.raises(SystemExit):  # refused with the library's reason before any sampling
        svq.main(["--run", str(out), "--num-molecules", "2", "--settings", "ancestral:5",
                  "--out", str(tmp_path / "bad"), "--no-progress"])
    assert "ancestral:5: ancestral is a diffusion sampler; a flow-matching run" in (
        capsys.readouterr().err)
    assert not (tmp_path / "bad").exists()
    # a grid power reaches the solver: other samples than equal steps from the same noise,
    # recorded per row; power 1 is equal steps exactly
    rows = svq.main(["--run", str(out), "--num-molecules", "3", "--settings",
                     "euler:3,euler:3@1,euler:3@2,dopri5", "--reference", "euler:3",
                     "--out", str(tmp_path / "grid"), "--no-progress"])  # fmt: skip
    assert [r["grid_power"] for r in rows] == [1.0, 1.0, 2.0, None]
    assert rows[1]["vs_reference"]["rms_distance"] == 0.0
    assert rows[2]["vs_reference"]["rms_distance"] > 1e-3
    assert "| flow | euler | 3 (grid power 2) | 3 |" in (tmp_path / "grid.md").read_text()
    # the SDE sampler: its noise per row and in the table; never a reference
    rows = svq.main(["--run", str(out), "--num-molecules", "2", "--settings",
                     "euler_maruyama:3~0.5,euler_maruyama:3", "--out", str(tmp_path / "sde"),
                     "--no-progress"])
    assert [(r["sampler"], r["noise_scale"]) for r in rows] == [
        ("euler_maruyama", 0.5), ("euler_maruyama", 1.0)]
    assert "| flow | euler_maruyama | 3 (noise 0.5) | 3 |" in (tmp_path / "sde.md").read_text()
    for bad in ["euler:3@0", "dopri5@2", "euler:3@x", "euler:3~1", "euler_maruyama:3~-1"]:
        with pytest.raises(SystemExit):
            svq.main(["--run", str(out), "--settings", bad, "--out", str(tmp_path / "bad"),
                      "--no-progress"])  # fmt: skip


def test_sampling_options_per_objective():
    from canonwrap.recipes import sampling_options

    assert sampling_options("flow", "midpoint", 10) == {"method": "midpoint", "steps": 10}
    assert sampling_options("flow", "euler") == {"method": "euler", "steps": 100}
    assert sampling_options("flow", "dopri5") == {"method": "dopri5"}
    opts = sampling_options("diffusion", "ddim", 25, progress=True)
    assert type(opts["sampler"]).__name__ == "DDIMSampler" and opts["progress"] is True
    for args, message in [
        (("flow", "dpm", 20), "diffusion sampler; a flow-matching run"),
        (("diffusion", "euler", 20), "ODE solver; a diffusion run"),
        (("flow", "dopri5", 20), "do not apply to dopri5"),
        (("flow", "leapfrog", 20), "unknown ODE method"),
        (("both", "euler", 20), "unknown objective"),
    ]:
        with pytest.raises(ValueError, match=message):
            sampling_options(*args)
    # the grid power: checked once here for every caller (the CLI and steps_vs_quality)
    assert sampling_options("flow", "euler", 10, grid_power=2) == {
        "method": "euler", "steps": 10, "grid_power": 2.0}
    assert "grid_power" not in sampling_options("flow", "euler", 10)  # control
    for args, power, message in [
        (("diffusion", "ddim", 20), 2.0, "grid_power spaces the steps"),
        (("flow", "dopri5"), 2.0, "grid_power does not apply to dopri5"),
        (("flow", "euler", 10), 0.0, "grid_power must be finite and > 0"),
        (("flow", "euler", 10), float("inf"), "grid_power must be finite and > 0"),
        (("flow", "midpoint", 10), "x", "grid_power must be a positive number"),
    ]:
        with pytest.raises(ValueError, match=message):
            sampling_options(*args, grid_power=power)
    # the SDE sampler's noise: for euler_maruyama only, finite and >= 0
    assert sampling_options("flow", "euler_maruyama", 50, noise_scale=0.5) == {
        "method": "euler_maruyama", "steps": 50, "noise_scale": 0.5}
    assert sampling_options("flow", "euler_maruyama") == {"method": "euler_maruyama", "steps": 100}
    for args, noise, message in [
        (("diffusion", "ancestral", 20), 1.0, "a diffusion run has none"),
        (("flow", "euler", 10), 1.0, "the ODE method 'euler' adds none"),
        (("flow", "dopri5"), 1.0, "the ODE method 'dopri5' adds none"),
        (("flow", "euler_maruyama", 10), -1.0, "noise_scale must be finite and >= 0"),
        (("flow", "euler_maruyama", 10), float("nan"), "noise_scale must be finite and >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            sampling_options(*args, noise_scale=noise)


def test_qm9_flow_time_and_prediction_reach_the_model_and_are_checked(example, tmp_path):
    """--flow-time beta:2,1 trains with Beta(2, 1) times and --flow-prediction data with a
    clean-data network; both are saved and rebuilt on reload; they are refused for
    diffusion, and --flow-time in forms that name no density."""
    import torch

    from canonwrap.evaluation import load_qm9_run
    from canonwrap.recipes import flow_time_distribution

    qm9 = example("qm9")
    out = tmp_path / "beta"
    qm9.main(["train", "--model", "pca-transformer", "--objective", "flow", "--flow-time",
              "beta:2,1", "--flow-prediction", "data", "--out", str(out), "--max-steps", "2",
              *TRAIN])
    model, cfg = load_qm9_run(out)
    assert cfg["model_config"]["flow_time"] == "beta:2,1"
    assert cfg["model_config"]["flow_prediction"] == "data" and model.prediction == "data"
    assert qm9.qm9_model(qm9.QM9ModelConfig(objective="flow")).prediction == "velocity"
    dist = model.time_distribution
    assert isinstance(dist, torch.distributions.Beta)
    assert (float(dist.concentration1), float(dist.concentration0)) == (2.0, 1.0)
    assert qm9.qm9_model(qm9.QM9ModelConfig(objective="flow")).time_distribution is None
    ln = flow_time_distribution("logit-normal:0.5,2")
    assert (float(ln.base_dist.loc), float(ln.base_dist.scale)) == (0.5, 2.0)

    with pytest.raises(ValueError, match="options of --objective flow"):
        qm9.main(["train", "--model", "gdm", "--flow-time", "beta:2,1", "--out",
                  str(tmp_path / "d"), *TRAIN])
    with pytest.raises(ValueError, match="options of flow matching"):
        qm9.qm9_model(qm9.QM9ModelConfig(flow_time="beta:2,1"))
    with pytest.raises(ValueError, match="options of --objective flow"):
        qm9.main(["train", "--model", "gdm", "--flow-prediction", "data", "--out",
                  str(tmp_path / "d"), *TRAIN])
    with pytest.raises(ValueError, match="flow_prediction='data' are options of flow"):
        qm9.qm9_model(qm9.QM9ModelConfig(flow_prediction="data"))
    with pytest.raises(SystemExit):  # argparse names the choices
        qm9.main(["train", "--model", "pca-transformer", "--objective", "flow",
                  "--flow-prediction", "x1", "--out", str(tmp_path / "d"), *TRAIN])
    assert not (tmp_path / "d").exists()
    for spec, message in (("gamma:1,1", "unknown flow time"), ("beta:2", "two numbers"),
                          ("beta:0,1", "both be > 0"), ("logit-normal:0,0", "must be > 0"),
                          ("beta:nan,1", "finite")):
        with pytest.raises(ValueError, match=f"--flow-time: .*{message}"):
            qm9.main(["train", "--model", "pca-transformer", "--objective", "flow",
                      "--flow-time", spec, "--out", str(tmp_path / "x"), *TRAIN])
        assert not (tmp_path / "x").exists()
