"""benchmarks/learning_curves.py on a tiny configuration: runs, reuse, restart, outputs."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_script

TINY = (
    "train_size=48,val_size=16,nll_size=8,hidden=8,layers=1,heads=1,"
    "canon_hidden=8,canon_layers=1,timesteps=20,batch_size=8"
)


def test_parse_config_turns_options_into_flags():
    curves = load_script("benchmarks/learning_curves.py")
    label, flags = curves.parse_config("transformer+egnn:canon_warmup=500,no_progress=true")
    assert flags == [
        "--denoiser", "transformer", "--canonicalizer", "egnn",
        "--canon-warmup", "500", "--no-progress",
    ]
    assert label == "transformer+egnn_canon_warmup-500_no_progress-true"
    assert curves.parse_config("edm")[1] == ["--model", "edm"]
    with pytest.raises(ValueError, match="key=value"):
        curves.parse_config("edm:oops")
    # values may hold commas: only a comma before key= starts the next option
    _, flags = curves.parse_config("transformer+pca:objective=flow,flow_time=beta:2,1,seed=3")
    assert flags[4:] == ["--objective", "flow", "--flow-time", "beta:2,1", "--seed", "3"]
    with pytest.raises(ValueError, match="key=value"):
        curves.parse_config("edm:oops,hidden=8")


@pytest.mark.timeout(600)
def test_learning_curves_tiny_runs_reuse_and_restart(tmp_path):
    curves = load_script("benchmarks/learning_curves.py")
    out = tmp_path / "curves"
    specs = [f"transformer+pca:{TINY}", f"gdm:{TINY}"]
    argv = ["--out", str(out), "--seeds", "0", "--max-steps", "4", "--eval-every", "2",
            "--jobs", "2", "--configs", *specs]
    results = curves.main(argv)
    saved = json.loads((out / "curves.json").read_text())
    assert saved["configs"].keys() == set(specs)
    for spec in specs:
        evals = results["configs"][spec]["runs"]["0"]["evals"]
        assert [e["step"] for e in evals] == [2, 4]
        assert all(e["val_loss"] > 0 and e["elapsed"] > 0 for e in evals)
    table = (out / "table.md").read_text()
    assert table.count("\n") == 2 + len(specs)
    for name in ("loss_vs_steps", "loss_vs_seconds", "nll_vs_steps"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000

    # a finished run is reused as it is; an interrupted one (no train_result.json) is
    # trained again from scratch into its folder, which qm9.py only allows with --overwrite
    label = results["configs"][specs[1]]["label"]
    finished = out / results["configs"][specs[0]]["label"] / "seed0" / "train_result.json"
    stamp = finished.stat().st_mtime_ns
    (out / label / "seed0" / "train_result.json").unlink()
    again = curves.main(argv)
    assert finished.stat().st_mtime_ns == stamp
    assert (out / label / "seed0" / "train_result.json").exists()
    assert [e["step"] for e in again["configs"][specs[1]]["runs"]["0"]["evals"]] == [2, 4]
