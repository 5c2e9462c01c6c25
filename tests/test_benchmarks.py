"""Smoke tests of the benchmark scripts at a tiny size (quick models, a few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from canonwrap.data import qm9 as qm9mod
from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


def _have_qm9_data() -> bool:
    try:
        qm9mod._qm9pack_csv_paths()
        return True
    except FileNotFoundError:
        return qm9mod._cache_file(qm9mod.default_cache_dir(), None).is_file()


pytestmark = pytest.mark.skipif(not _have_qm9_data(), reason="QM9 data (qm9pack) not available")


def _load(name: str):
    return load_script(f"benchmarks/{name}.py")


TINY = [
    "--sizes", "quick", "--num-molecules", "2", "--sample-steps", "2", "--train-steps", "1",
    "--warmup", "0", "--repeats", "1", "--threads", "1",
]  # fmt: skip


def test_bench_qm9_tiny_in_process(tmp_path, capsys):
    bench = _load("bench_qm9")
    report = bench.main([*TINY, "--models", "gdm,edm", "--in-process", "--out", str(tmp_path)])
    assert report["errors"] == []
    assert [r["model"] for r in report["results"]] == ["gdm", "edm"]
    for r in report["results"]:
        assert r["objective"] == "diffusion"
        assert r["sample_s_per_molecule"] > 0 and r["train_steps_per_s"] > 0
        assert r["denoiser_evaluations"] == 3  # steps 1000, 0 and the final t = 0 call
        assert r["sample_memory"]["peak_mib"] is None  # not attributable in-process on CPU
    ratios = {r["model"]: r for r in report["ratios_vs_edm"]}
    assert ratios["edm"]["sample_time"] == 1.0 and ratios["edm"]["train_speed"] == 1.0
    assert ratios["gdm"]["sample_time"] > 0
    saved = json.loads((tmp_path / "bench_qm9.json").read_text())
    assert saved["machine"]["threads"] == 1 and saved["machine"]["cpu"]
    assert saved["command"].startswith("python benchmarks/bench_qm9.py --sizes quick")
    markdown = (tmp_path / "bench_qm9.md").read_text()
    assert "| quick | gdm |" in markdown and "| quick | edm |" in markdown
    assert "sampler AncestralSampler(num_steps=2)" in markdown and "flow" not in markdown
    assert "QM9: sampling and training cost" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_qm9_subprocess_measures_memory(tmp_path):
    bench = _load("bench_qm9")
    report = bench.main([*TINY, "--models", "gdm", "--phases", "train", "--out", str(tmp_path)])
    assert report["errors"] == []
    (row,) = report["results"]
    assert row["train_memory"]["peak_mib"] is not None
    assert row["train_memory"]["total_peak_mib"] > 0
    assert report["ratios_vs_edm"] == []  # no EDM in this run


def test_bench_qm9_rejects_unknown_names():
    bench = _load("bench_qm9")
    with pytest.raises(SystemExit):
        bench.main(["--models", "gdm,nope"])
    with pytest.raises(SystemExit):
        bench.main(["--objectives", "diffusion,nope"])


def test_bench_qm9_flow_beside_diffusion(tmp_path):
    bench = _load("bench_qm9")
    report = bench.main([*TINY, "--models", "edm", "--objectives", "diffusion,flow", "--in-process",
                         "--flow-sampler", "euler:3", "--out", str(tmp_path)])  # fmt: skip
    assert report["errors"] == []
    assert [r["objective"] for r in report["results"]] == ["diffusion", "flow"]
    diffusion, flow = report["results"]
    assert diffusion["denoiser_evaluations"] == 3  # unchanged: the ancestral sampler's steps
    assert diffusion["sampler"] == "AncestralSampler(num_steps=2)"
    assert flow["denoiser_evaluations"] == 3 and flow["denoiser_evaluations_per_repeat"] == [3]
    assert flow["sampler"] == "euler, 3 steps"
    seconds = flow["sample_s_per_molecule"] * flow["num_molecules"]
    assert flow["sample_ms_per_evaluation"] == pytest.approx(1000.0 * seconds / 3)
    assert flow["train_steps_per_s"] > 0 and flow["parameters"] == diffusion["parameters"]
    # both objectives are compared with EDM trained as a diffusion model
    ratios = {r["objective"]: r for r in report["ratios_vs_edm"]}
    assert ratios["diffusion"]["sample_time"] == 1.0
    assert ratios["flow"]["sample_time"] == pytest.approx(
        flow["sample_s_per_molecule"] / diffusion["sample_s_per_molecule"]
    )
    saved = json.loads((tmp_path / "bench_qm9.json").read_text())
    assert saved["settings"]["objectives"] == ["diffusion", "flow"]
    assert saved["settings"]["flow_sampler"] == {"method": "euler", "steps": 3}
    assert [r["objective"] for r in saved["results"]] == ["diffusion", "flow"]
    markdown = (tmp_path / "bench_qm9.md").read_text()
    assert "| quick | edm | diffusion |" in markdown and "| quick | edm | flow |" in markdown
    assert "diffusion sampler AncestralSampler(num_steps=2)" in markdown
    assert "flow-matching ODE solver euler, 3 steps" in markdown


def test_bench_qm9_counts_midpoint_evaluations(tmp_path):
    bench = _load("bench_qm9")
    report = bench.main([*TINY, "--models", "edm", "--objectives", "flow", "--phases", "sample",
                         "--flow-sampler", "midpoint:2", "--repeats", "2", "--in-process",
                         "--out", str(tmp_path)])  # fmt: skip
    assert report["errors"] == []
    (row,) = report["results"]
    assert row["objective"] == "flow" and row["sampler"] == "midpoint, 2 steps"
    assert row["denoiser_evaluations"] == 4 and row["denoiser_evaluations_per_repeat"] == [4, 4]
    assert report["ratios_vs_edm"] == []  # no EDM diffusion row to compare with


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ddim:5", "ddim is a diffusion sampler"),
        ("euler:0", "steps must be >= 1"),
        ("euler:many", "not an integer"),
        ("dopri5:10", "do not apply to dopri5"),
    ],
)
def test_bench_qm9_rejects_bad_flow_sampler(value, message, capsys):
    bench = _load("bench_qm9")
    with pytest.raises(SystemExit):
        bench.main(["--objectives", "diffusion,flow", "--flow-sampler", value])
    err = capsys.readouterr().err
    assert "--flow-sampler" in err and message in err


def test_bench_qm9_rejects_bad_sample_steps():
    bench = _load("bench_qm9")
    with pytest.raises(SystemExit, match="--sample-steps must be >= 1"):
        bench.main(["--sample-steps", "0"])


def test_profile_sampling_tiny(capsys):
    prof = _load("profile_sampling")
    out = prof.main(["--model", "gdm", "--num-molecules", "2", "--sample-steps", "2",
                     "--threads", "1", "--sampler", "dpm", "--row-limit", "3"])  # fmt: skip
    import canonwrap.nn.gnn as gnn
    from canonwrap.nn.graph import fully_connected_edges

    assert gnn.fully_connected_edges is fully_connected_edges  # instrumentation removed
    stages = {label.strip(): ms for label, _, ms, _ in out["stages"]}
    assert stages["denoiser forward"] > 0 and stages["of which edge construction"] > 0
    assert stages["sampler step"] > 0
    assert "denoiser forward" in capsys.readouterr().out


def test_profile_sampling_flow(capsys):
    import canonwrap.flow as flow

    pack, unpack = flow._Packer.pack, flow._Packer.unpack
    prof = _load("profile_sampling")
    out = prof.main(["--model", "gdm", "--objective", "flow", "--flow-sampler", "midpoint:2",
                     "--num-molecules", "2", "--threads", "1", "--row-limit", "3"])  # fmt: skip
    assert flow._Packer.pack is pack and flow._Packer.unpack is unpack  # patches removed
    assert "pack" not in vars(flow._Packer) or vars(flow._Packer)["pack"] is pack
    assert out["denoiser_calls"] == 4  # midpoint: two calls per step
    stages = {label.strip(): (calls, ms) for label, calls, ms, _ in out["stages"]}
    assert stages["denoiser forward"][0] == 4 and stages["denoiser forward"][1] > 0
    assert stages["of which edge construction"][1] > 0
    # the ragged state is packed for the solver and unpacked for every velocity call
    assert stages["pack / unpack (ragged <-> dense)"][0] >= 4
    assert "sampler step" not in stages  # a diffusion-only stage
    printed = capsys.readouterr().out
    assert "flow matching (midpoint, 2 steps), 4 denoiser calls" in printed
    with pytest.raises(SystemExit):  # a diffusion sampler is no ODE method
        prof.main(["--objective", "flow", "--flow-sampler", "ancestral:10"])


def test_paired_nll_pairs_the_draws(tmp_path):
    from tests.examples.test_qm9 import TRAIN

    qm9 = load_script("examples/qm9.py")
    runs = []
    for model in ("gdm", "pca-transformer"):
        out = tmp_path / model
        qm9.main(["train", "--model", model, "--out", str(out), "--max-steps", "2", *TRAIN])
        runs.append(str(out))
    paired = _load("paired_nll")
    res = paired.main([*runs, runs[0], "--nll-size", "8", "--threads", "1",
                       "--out", str(tmp_path / "paired.json")])  # fmt: skip
    # a run against itself: the same draws give a difference of exactly zero
    assert res["paired_difference_to_first"][runs[0]] == {
        "mean": 0.0, "se": 0.0, "draws_shared": True
    }  # fmt: skip
    # two different models: a real difference, equal to the gap between their means
    diff = res["paired_difference_to_first"][runs[1]]
    assert diff["mean"] != 0.0 and 0 < diff["se"] and diff["draws_shared"]
    mean_gap = res["runs"][runs[1]]["mean"] - res["runs"][runs[0]]["mean"]
    assert diff["mean"] == pytest.approx(mean_gap, rel=1e-9, abs=1e-9)
    assert json.loads((tmp_path / "paired.json").read_text())["nll_size"] == 8

    # flow matching against diffusion: paired by molecule only (other draws)
    flow = tmp_path / "flow"
    qm9.main(["train", "--model", "pca-transformer", "--objective", "flow", "--out", str(flow),
              "--max-steps", "2", *TRAIN])  # fmt: skip
    mixed = paired.main([runs[1], str(flow), "--nll-size", "8", "--threads", "1",
                         "--flow-method", "midpoint", "--flow-steps", "4"])  # fmt: skip
    assert mixed["objectives"] == {runs[1]: "diffusion", str(flow): "flow"}
    d = mixed["paired_difference_to_first"][str(flow)]
    assert d["draws_shared"] is False and 0 < d["se"]
    gap = mixed["runs"][str(flow)]["mean"] - mixed["runs"][runs[1]]["mean"]
    assert d["mean"] == pytest.approx(gap, rel=1e-9, abs=1e-9)
    # each run's terms, which sum to its NLL
    terms = mixed["terms"]
    assert set(terms[str(flow)]) == {"flow", "dequantization", "reconstruction", "size"}
    assert set(terms[runs[1]]) == {"kl_prior", "diffusion", "reconstruction", "size"}
    for run in (runs[1], str(flow)):
        total = sum(v["mean"] for v in terms[run].values())
        assert total == pytest.approx(mixed["runs"][run]["mean"], rel=1e-6, abs=1e-6)
    # the solver options reach the flow model's nll (and only the flow model's)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        paired.main([runs[1], str(flow), "--nll-size", "8", "--flow-method", "midpoint",
                     "--flow-steps", "0"])  # fmt: skip
    # fmt: off
    assert paired.main([runs[0], runs[1], "--nll-size", "8", "--flow-method", "midpoint",
                        "--flow-steps", "0"])["paired_difference_to_first"][runs[1]]["se"] > 0
    # fmt: on
    with pytest.raises(SystemExit):
        paired.main([runs[0]])  # one run: nothing to compare
