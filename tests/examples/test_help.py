"""``--help`` of the examples: every option has help text, defaults are stated, and a flag
means the same thing in every example (``--train-steps`` trains, ``--sample-steps`` samples)."""

from __future__ import annotations

import argparse

import pytest

from .conftest import load_example

#: example -> argv prefixes whose --help is printed (sub-commands included)
EXAMPLES = {
    "rotmnist": [[], ["run"], ["report"], ["same-inputs"], ["seeds"]],
    "custom_group": [[]],
    "wrap_your_model": [[]],
    "plot_molecules": [[]],
    "qm9": [[], ["train"], ["sample"], ["evaluate"], ["all"]],
    "qm9_report": [[]],
}


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__("parser captured")
        self.parser = parser


def _parser_of(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser that ``main()`` of ``examples/<name>.py`` builds (stopped before parsing)."""

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    module = load_example(name)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Captured) as info:
        module.main([])
    monkeypatch.undo()
    return info.value.parser


def _all_parsers(parser: argparse.ArgumentParser, path: str = ""):
    yield path or "(top level)", parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, f"{path} {name}".strip())


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_option_has_help_and_states_its_default(name, monkeypatch):
    parser = _parser_of(name, monkeypatch)
    problems = []
    for where, p in _all_parsers(parser):
        for action in p._actions:
            label = f"{name} {where}: {'/'.join(action.option_strings) or action.dest}"
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                problems += [f"{label} {cmd}: no help" for cmd, h in helps.items() if not h]
                continue
            if not (action.help or "").strip():
                problems.append(f"{label}: no help")
                continue
            default = action.default
            if default not in (None, False, argparse.SUPPRESS) and "default" not in action.help:
                problems.append(f"{label}: default {default!r} not stated in its help")
            flags = set(action.option_strings)
            if "--steps" in flags:
                problems.append(f"{label}: ambiguous --steps (use --train-steps/--sample-steps)")
            if "--train-steps" in flags and "train" not in action.help:
                problems.append(f"{label}: --train-steps must be about training steps")
            if "--sample-steps" in flags and "sampl" not in action.help:
                problems.append(f"{label}: --sample-steps must be about sampling steps")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "name,prefix", [(n, p) for n, prefixes in sorted(EXAMPLES.items()) for p in prefixes]
)
def test_help_prints_and_exits_cleanly(name, prefix, capsys):
    module = load_example(name)
    with pytest.raises(SystemExit) as info:
        module.main([*prefix, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage:")
    if name == "rotmnist" and prefix == ["run"]:
        # choices, the default preset and both presets' values are listed
        flat = "".join(text.split())  # argparse wraps the list of choices at hyphens
        assert (
            "{unet,canon-c4,canon-c8,canon-c16,canon-c32,canon-c16-frozen,"
            "unet-rot-c4,unet-rot-c8,unet-rot-c16,unet-rot-c32}" in flat
        )
        assert "default: full" in text and "full preset: 64; quick: 16" in text
        assert "--train-steps" in text and "--steps " not in text
