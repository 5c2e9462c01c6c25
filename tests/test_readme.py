"""The usage example in README.md runs as written (with fewer training steps)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


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


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "examples/qm9.py all --model canon-gdm --quick" in text
    assert ".venv/bin/python -m pytest -q" in text
