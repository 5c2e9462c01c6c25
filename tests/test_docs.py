"""The documentation site builds with ``mkdocs build --strict`` and documents the public API."""

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _missing_tools() -> list[str]:
    missing = []
    for name in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python"):
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    return missing


def _api_modules() -> list[str]:
    return re.findall(r"^::: (\S+)", (ROOT / "docs" / "api.md").read_text(), flags=re.M)


def _public_names(module: str) -> list[str]:
    """``__all__`` of a canonwrap module, read from its source without importing it."""
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == "__all__" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    return []


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    missing = _missing_tools()
    if missing:
        pytest.skip(
            f"documentation tools not installed ({', '.join(missing)}): pip install -e '.[docs]'"
        )
    out = tmp_path_factory.mktemp("site")
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def test_site_builds_strict(site):
    for page in (
        "index.html",
        "api/index.html",
        "custom_groups/index.html",
        "tutorials/qm9/index.html",
    ):
        assert (site / page).is_file(), page


def test_api_reference_lists_every_public_name(site):
    html = (site / "api" / "index.html").read_text()
    ids = set(re.findall(r'id="(canonwrap[\w.]*)"', html))
    modules = _api_modules()
    missing = [
        f"{m}.{name}"
        for m in modules
        if m != "canonwrap"  # the top level re-exports names documented in their modules
        for name in _public_names(m)
        if f"{m}.{name}" not in ids
    ]
    assert not missing, f"public names without an API entry: {missing}"


def test_api_reference_covers_every_module():
    """Every public module or subpackage of canonwrap has a ``:::`` entry in docs/api.md."""
    package = ROOT / "canonwrap"
    public = {
        f"canonwrap.{p.stem}"
        for p in package.iterdir()
        if not p.name.startswith("_")
        and p.stem != "utils"  # internal helpers
        and (p.suffix == ".py" or (p / "__init__.py").is_file())
    }
    assert not public - set(_api_modules()), sorted(public - set(_api_modules()))
