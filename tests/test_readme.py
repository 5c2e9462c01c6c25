"""The usage example in README.md runs as written (with fewer training steps)."""

import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_usage_example_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0].replace("range(500)", "range(3)")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    samples = namespace["samples"]
    assert samples.pos.shape == (16 * 5, 3)
    assert torch.isfinite(samples.pos).all()


def _command_after(comment: str) -> str:
    """The command line that follows ``# <comment>`` in the README's install block."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"# {comment}"))
    return next(line for line in lines[start + 1 :] if line and not line.startswith("#"))


def test_readme_names_the_two_commands():
    main_job = _command_after("main job")
    assert main_job.startswith("bash scripts/setup.sh && ")  # no test environment
    assert "examples/qm9.py all --model pca-transformer --quick" in main_job
    assert (
        _command_after("tests") == "bash scripts/setup.sh --tests && .venv/bin/python -m pytest -q"
    )


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _command_after("tests") in ci


def _fake_setup(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    """Run scripts/setup.sh in a copy with stub Pythons; returns the run and the calls."""
    (tmp_path / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    log, bin_dir = tmp_path / "calls.log", tmp_path / "bin"
    bin_dir.mkdir()
    stub = f'#!/usr/bin/env bash\necho "$0 $*" >> {log}\n'
    fake_python = bin_dir / "python3"
    fake_python.write_text(
        stub + 'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; '
        f'cp {bin_dir}/venvpython "$3/bin/python"; fi\n'
    )
    (bin_dir / "venvpython").write_text(stub)
    (bin_dir / "gfortran").write_text("#!/bin/sh\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake_python), PATH=f"{bin_dir}:{os.environ['PATH']}")
    res = subprocess.run(
        ["bash", "scripts/setup.sh", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return res, log.read_text() if log.exists() else ""


def test_setup_builds_the_equiadapt_environment_only_for_tests(tmp_path):
    res, calls = _fake_setup(tmp_path / "main")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "pip install -e .[molecules,images,dev]" in calls
    assert "torchvision" not in calls and not (tmp_path / "main" / ".venv-equiadapt").exists()
    assert "==> torch 2.13.0" in res.stdout and "done in" in res.stdout  # progress lines
    assert "pip install -q" not in (ROOT / "scripts" / "setup.sh").read_text()

    res, calls = _fake_setup(tmp_path / "tests", "--tests")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "torchvision==0.29.1" in calls and "equiadapt==0.1.2" in calls
    assert (tmp_path / "tests" / ".venv-equiadapt" / "bin" / "python").exists()


def _api_rows() -> list[tuple[str, list[str]]]:
    """``(module, names)`` of each row of the README's "Public API" table."""
    section = README.read_text().split("## Public API", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue  # prose, header or separator
        module = cells[0].strip("`")
        names = re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", cells[1])
        rows.append((module, names))
    return rows


#: extras that a row may need; a row whose import fails for want of one of these is skipped
OPTIONAL = {"equiadapt", "torchvision", "escnn", "rdkit", "qm9pack"}


@pytest.mark.parametrize("module,names", _api_rows(), ids=lambda v: str(v))
def test_readme_api_table_imports(module, names):
    assert module.startswith("canonwrap"), module
    assert names, f"row {module!r} lists no names"
    try:
        mod = importlib.import_module(module)
        missing = [name for name in names if not hasattr(mod, name)]
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] in OPTIONAL:
            pytest.skip(f"{module} needs {err.name}")
        raise
    assert not missing, f"README lists names that `{module}` does not export: {missing}"


def test_readme_api_table_is_parsed():
    rows = _api_rows()
    assert len(rows) >= 10
    modules = {m for m, _ in rows}
    assert {"canonwrap", "canonwrap.samplers", "canonwrap.data"} <= modules
    assert "DPMSolverSampler" in dict(rows)["canonwrap.samplers"]
