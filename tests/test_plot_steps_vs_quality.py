"""The steps-versus-quality figure: which points it draws, and its script's input checks."""

from __future__ import annotations

import json
import math

import pytest

from canonwrap.plots import plot_steps_vs_quality, quality_series
from tests.helpers import load_script

pytest.importorskip("matplotlib")


def _row(sampler, calls, atom, valid, n=512, **extra):
    return {
        "sampler": sampler,
        "network_calls": calls,
        "atom_stability": atom,
        "validity": valid,
        "connected_validity": 0.02,
        "n_molecules": n,
        **extra,
    }


ROWS = [
    _row("midpoint", 50.0, 0.67, 0.25, grid_power=1.0, atom_stability_se=0.005),
    _row("euler", 20.0, 0.64, 0.20, grid_power=1.0),
    _row("midpoint", 20.0, 0.68, 0.28, grid_power=1.0, validity_se=0.01),
    _row("euler", 10.0, 0.58, 0.16, grid_power=2.0),
    _row("euler_maruyama", 50.0, 0.51, 0.16, grid_power=1.0, noise_scale=0.5),
    _row("ancestral", 1001.0, 0.716, 0.219, grid_power=None),
]


def test_series_group_by_sampler_sorted_by_calls_with_their_errors():
    atom = quality_series(ROWS, "atom_stability")
    assert list(atom) == ["midpoint", "euler", "euler@2", "euler_maruyama~0.5", "ancestral"]
    assert [p[2] for p in atom["midpoint"]] == [None, pytest.approx(0.5)]
    assert [p[:2] for p in atom["midpoint"]] == [
        (20.0, pytest.approx(68.0)),
        (50.0, pytest.approx(67.0)),
    ]
    # atom stability without a stored error gets none: its atoms are not independent draws
    assert atom["euler"] == [(20.0, pytest.approx(64.0), None)]
    valid = quality_series(ROWS, "validity")
    # a stored error is used as it is; otherwise binomial over the molecules
    assert valid["midpoint"][0] == pytest.approx((20.0, 28.0, 1.0))
    assert valid["midpoint"][1][2] == pytest.approx(100 * math.sqrt(0.25 * 0.75 / 512))
    assert valid["ancestral"] == [(1001.0, pytest.approx(21.9), pytest.approx(
        100 * math.sqrt(0.219 * 0.781 / 512)))]  # fmt: skip


def test_series_reject_unknown_rates_and_incomplete_rows():
    with pytest.raises(ValueError, match="unknown rate 'stability'"):
        quality_series(ROWS, "stability")
    with pytest.raises(ValueError, match="row 1 has no network_calls"):
        quality_series([ROWS[0], {"sampler": "euler", "validity": 0.2}], "validity")


def test_plot_writes_a_png_and_refuses_nothing_to_draw(tmp_path):
    path = plot_steps_vs_quality(
        {"flow": ROWS[:5], "diffusion": ROWS[5:]}, tmp_path / "a" / "fig.png", title="t"
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="no tables"):
        plot_steps_vs_quality({}, tmp_path / "b.png")
    with pytest.raises(ValueError, match="no rates"):
        plot_steps_vs_quality({"flow": ROWS}, tmp_path / "c.png", metrics=())
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "c.png").exists()


def test_script_draws_tables_and_names_bad_input(tmp_path, capsys):
    script = load_script("benchmarks/plot_steps_vs_quality.py")
    good = tmp_path / "flow.json"
    good.write_text(json.dumps({"command": "x", "rows": ROWS}))
    out = script.main(
        [f"flow={good}", "--metrics", "atom_stability", "--out", str(tmp_path / "f.png")]
    )
    assert out.is_file()
    bad_row = tmp_path / "bad.json"
    bad_row.write_text(json.dumps({"rows": [{"sampler": "euler", "network_calls": 10}]}))
    not_json = tmp_path / "x.json"
    not_json.write_text("{")
    cases = [
        (["flow.json"], "is not LABEL=FILE"),
        ([f"flow={tmp_path / 'missing.json'}"], "flow: no file"),
        ([f"flow={not_json}"], "is not JSON"),
        ([f"d={bad_row}"], "d: row 0 has no atom_stability"),
        ([f"a={good}", f"a={good}"], "label 'a' is given twice"),
        ([f"a={good}", "--metrics", "speed"], "unknown rate 'speed'"),
        ([f"a={good}", "--metrics", ","], "--metrics names no rate"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            script.main([*argv, "--out", str(tmp_path / "no.png")])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "no.png").exists()
