"""examples/qm9_report.py: the table's standard errors and the curves figure."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_script


def _fake_run(folder, model, nll_se=None):
    (folder / "checkpoints").mkdir(parents=True)
    test_nll = {"nll": 12.5}
    if nll_se is not None:
        test_nll["nll_se"] = nll_se
    metrics = {
        "model": model,
        "val_loss": 0.2,
        "initial": {"val_loss": 1.0},
        "train_result": {"steps": 40, "elapsed_s": 60.0},
        "sampling": {"s_per_sample": 1.5},
        "test_nll": test_nll,
        "molecules": {
            "n_molecules": 100,
            "atom_stability": 0.5,
            "mol_stability": 0.0,
            "validity": 0.25,
            "connected_validity": 0.09,
            "uniqueness": 1.0,
            "novelty": 1.0,
        },
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "config.json").write_text(json.dumps({"model": model}))
    records = [{"step": s, "loss": 0.5} for s in (10, 20)]
    records += [{"step": 20, "elapsed": 30.0, "eval": {"val_loss": 0.3, "val_nll": 80.0}}]
    records += [{"step": 40, "elapsed": 60.0, "eval": {"val_loss": 0.2, "val_nll": 50.0}}]
    (folder / "checkpoints" / "log.jsonl").write_text(
        "\n".join(json.dumps(r) for r in records) + "\n"
    )
    return folder


def test_report_table_and_curves_figure(tmp_path):
    report = load_script("examples/qm9_report.py")
    a = _fake_run(tmp_path / "a", "pca-transformer", nll_se=1.25)
    b = _fake_run(tmp_path / "b", "edm")  # evaluated before nll_se existed
    png = tmp_path / "fig" / "curves.png"
    text = report.main([str(a), str(b), "--plot", str(png)])
    lines: dict[str, str] = {}
    for line in text.split("Published")[0].splitlines():  # our rows, not the paper's
        if "|" in line:
            lines[line.split("|")[1].strip()] = line
    assert "12.5 ± 1.2" in lines["PCA+transformer"]  # NLL ± its standard error
    assert "| 12.5 |" in lines["EDM"]  # no standard error recorded: none shown
    # connected validity 9 % of 100 molecules: binomial SE sqrt(0.09 * 0.91 / 100) = 2.9 %
    assert "9.0 ± 2.9" in lines["EDM"]
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert [e["step"] for e in report.evaluations(a)] == [20, 40]


def test_report_names_a_run_without_training_log(tmp_path):
    report = load_script("examples/qm9_report.py")
    with pytest.raises(FileNotFoundError, match="log.jsonl"):
        report.evaluations(tmp_path)
