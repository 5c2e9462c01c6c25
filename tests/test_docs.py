"""The documentation site builds with ``mkdocs build --strict`` and documents the public API."""

import ast
import importlib.util
import re
import subprocess
import sys
from html.parser import HTMLParser
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


class _APIPage(HTMLParser):
    """Collects, from the generated API page, the text outside code and every item of the
    parameter / attribute / return tables with the object it belongs to."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.prose: list[str] = []  # text outside <code> and <pre>
        self.items: list[tuple[str, str, str]] = []  # (object id, item name, description)
        self._code = 0
        self._object = ""
        self._name: list[str] | None = None
        self._item_name = ""
        self._desc: list[str] | None = None
        self._desc_depth = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("code", "pre"):
            self._code += 1
        if (attrs.get("id") or "").startswith("canonwrap") and "doc-heading" in (
            attrs.get("class") or ""
        ):
            self._object = attrs["id"]
        if tag == "li":
            self._name, self._item_name = [], ""
        if self._desc is not None and tag == "div":
            self._desc_depth += 1
        elif tag == "div" and "doc-md-description" in (attrs.get("class") or "").split():
            self._item_name = " ".join("".join(self._name or []).split())
            self._name = None
            self._desc, self._desc_depth = [], 1

    def handle_endtag(self, tag):
        if tag in ("code", "pre"):
            self._code -= 1
        if self._desc is not None and tag == "div":
            self._desc_depth -= 1
            if self._desc_depth == 0:
                self.items.append((self._object, self._item_name, "".join(self._desc).strip()))
                self._desc = None

    def handle_data(self, data):
        if self._name is not None:
            self._name.append(data)
        if self._desc is not None:
            self._desc.append(data)
        self.text.append(data)
        if not self._code:
            self.prose.append(data)


@pytest.fixture(scope="module")
def api_page(site):
    parser = _APIPage()
    parser.feed((site / "api" / "index.html").read_text())
    return parser


def test_api_page_has_no_literal_sphinx_markup(api_page):
    """Docstrings use Markdown and mkdocstrings cross-references, not reST roles or ``::``."""
    roles = re.findall(
        r".{0,40}:(?:meth|class|func|attr|mod|data|obj|exc):`?\w.{0,40}", "".join(api_page.text)
    )
    assert not roles, "reST roles printed literally (use [`Name`][canonwrap.module.Name]):\n" + (
        "\n".join(roles)
    )
    text = "".join(api_page.prose)
    literal = re.findall(r".{0,60}\S::\s*$", text, flags=re.M)
    assert not literal, "reST '::' printed literally:\n" + "\n".join(literal)
    links = re.findall(r".{0,40}\]\[canonwrap[\w.]*\].{0,20}", "".join(api_page.text))
    assert not links, "cross-references left as text (inside a code block?):\n" + "\n".join(links)
    doctest = re.findall(r"^\s*>>>.{0,60}", text, flags=re.M)
    assert not doctest, "doctest lines rendered as text (put them in an Examples section):\n" + (
        "\n".join(doctest)
    )


def test_api_page_has_no_indented_paragraph_lines(site):
    """A reST definition list ("Term" + indented text) is one run-on paragraph in Markdown:
    write "Term" then ":   definition" (def_list) instead."""
    html = (site / "api" / "index.html").read_text()
    runs = re.findall(r"<p>([^<\n]{0,60})\n {4,}\S", html)
    assert not runs, f"paragraphs with indented continuation lines: {runs}"


def test_api_page_parameters_have_descriptions(api_page):
    """Every parameter, attribute, return value and exception listed has its description."""
    assert len(api_page.items) > 100, "no parameter tables found: has the page layout changed?"
    empty = [f"{obj}: {name}" for obj, name, desc in api_page.items if not desc]
    assert not empty, "items rendered without a description (check the numpy sections):\n" + (
        "\n".join(empty)
    )


def test_docstring_sections_name_one_parameter_per_entry():
    """``a, b : int`` entries make griffe show the first name's default for every name."""
    bad = []
    for path in sorted((ROOT / "canonwrap").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            doc = ast.get_docstring(node) or ""
            lines = doc.splitlines()
            section = None
            for i, line in enumerate(lines):
                if i + 1 < len(lines) and re.fullmatch(r"-{3,}", lines[i + 1].strip()):
                    section = line.strip()
                elif section in ("Parameters", "Other Parameters", "Attributes") and re.match(
                    r"\**\w+\s*,\s*\**\w+", line
                ):
                    bad.append(f"{path.relative_to(ROOT)}:{node.name}: {line.strip()}")
    assert not bad, "one entry per parameter, please:\n" + "\n".join(bad)
