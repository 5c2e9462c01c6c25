"""Every command line of the docs that runs a repository script parses with that script.

The READMEs, tutorials and results pages give the exact commands behind their numbers; a
renamed or removed flag would leave a command that no longer runs. Each
``python examples/x.py ...`` or ``python benchmarks/y.py ...`` found in a code block or an
inline code span of a markdown file is handed to the script's ``main``, with
``ArgumentParser.parse_args`` stopped right after a successful parse (nothing runs).
Shell loop variables (``for m in a b; do ... $m ...``) are expanded with each value, and
``[--flag]`` (an optional flag, in the tutorials' notation) is tried as given.
"""

from __future__ import annotations

import argparse
import re
import shlex

import pytest

from tests.helpers import ROOT, load_script

DOCS = [
    ROOT / "README.md",
    ROOT / "benchmarks" / "README.md",
    *sorted((ROOT / "docs").rglob("*.md")),
]
SCRIPT = re.compile(r"python\s+((?:benchmarks|examples)/\w+\.py)([^`]*)")
END = re.compile(r"\s(?:&&|\|\|?|;|>|2>|&|#)(?:\s|$)")  # where the shell takes over again
LOOP = re.compile(r"for\s+(\w+)\s+in\s+([^;\n]+);\s*do")


def _expand(line: str, loops: dict[str, list[str]]) -> list[str]:
    """``line`` once per value of each loop variable it uses."""
    lines = [line]
    for var, values in loops.items():
        if re.search(rf"\${var}\b|\${{{var}}}", line):
            lines = [
                re.sub(rf"\${var}\b|\${{{var}}}", value, one) for one in lines for value in values
            ]
    return lines


def doc_commands(text: str) -> list[tuple[str, str]]:
    """``(script, arguments)`` of every script command in a markdown text."""
    lines: list[str] = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S):
        block = re.sub(r"\\\n\s*", " ", block)  # continuation lines
        loops = {var: values.split() for var, values in LOOP.findall(block)}
        for line in block.splitlines():
            lines += _expand(line, loops)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]
    found = []
    for line in lines:
        for match in SCRIPT.finditer(line):
            args = END.split(match.group(2) + " ")[0]
            found.append((match.group(1), " ".join(args.replace("[", "").replace("]", "").split())))
    return found


CASES = [
    pytest.param(script, args, id=f"{doc.relative_to(ROOT)}: {script} {args[:60]}")
    for doc in DOCS
    for script, args in doc_commands(doc.read_text())
]


class _Parsed(Exception):
    """Raised by the patched ``parse_args`` once the command line has parsed."""


@pytest.fixture(scope="module")
def scripts():
    return {}


def test_the_docs_have_script_commands():
    # the extraction finds what is there (a regex that matched nothing would pass the rest)
    scripts = {script for script, _ in (c.values[:2] for c in CASES)}
    assert len(CASES) > 50
    assert {"examples/qm9.py", "examples/rotmnist.py", "benchmarks/bench_qm9.py"} <= scripts
    text = (
        "```bash\nfor m in a b; do\n  python examples/qm9.py train --model $m \\\n"
        "    --out r/$m &\ndone\n```\n"
    )
    assert doc_commands(text) == [
        ("examples/qm9.py", "train --model a --out r/a"),
        ("examples/qm9.py", "train --model b --out r/b"),
    ]


@pytest.mark.parametrize("script,args", CASES)
def test_doc_command_parses(script, args, scripts, monkeypatch):
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        original(self, argv, namespace)
        raise _Parsed

    if script not in scripts:
        scripts[script] = load_script(script)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(_Parsed):
        try:
            scripts[script].main(shlex.split(args))
        except SystemExit as err:
            pytest.fail(f"`python {script} {args}` does not parse (exit {err.code})")


def test_a_wrong_flag_is_caught(scripts, monkeypatch):
    """Negative control: a flag the script lacks fails the check above."""
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        test_doc_command_parses(
            "benchmarks/profile_sampling.py", "--model edm --steps 50", scripts, monkeypatch
        )
