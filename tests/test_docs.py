"""The README and the docs pages link only to files that exist, name only modules and names that
exist, and the README stays one read long. (`mkdocs build --strict` in CI checks the site's links and
anchors; this checks the files as GitHub shows them, README included, without mkdocs installed.)"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", ROOT / "configs" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^(`{3,}|~{3,}).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMG_SRC = re.compile(r"<img\s[^>]*src=\"([^\"]+)\"")


def prose(text: str) -> str:
    """The text without code blocks and code spans, where a `[x](y)` is an example, not a link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def relative_links(text: str) -> list[str]:
    targets = LINK.findall(prose(text)) + IMG_SRC.findall(prose(text))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: ...


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_link_parser_finds_links_and_skips_code():
    text = "see [a](docs/a.md#x) and ![p](img.png) <img src=\"b.png\">\n```\n[no](c.md)\n```\n`[no](d.md)` [w](https://e)"
    assert relative_links(text) == ["docs/a.md#x", "img.png", "b.png"]
    assert github_slug("Run the tests (one command)") == "run-the-tests-one-command"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file(page):
    text = page.read_text()
    headings = {github_slug(h) for h in re.findall(r"^#+ (.+)$", prose(text), re.M)}
    missing = []
    for target in relative_links(text):
        path, _, anchor = target.partition("#")
        if not path:  # an anchor in this page
            if page.name == "README.md" and anchor not in headings:
                missing.append(target)
            continue
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} links to missing files or anchors: {missing}"


def test_readme_stays_within_one_read():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (limit {README_MAX_LINES})"


SNNET = ROOT / "snnet"
IMPORT = re.compile(r"^\s*from (snnet(?:\.\w+)*) import ([\w, ]+)$", re.M)
DOTTED = re.compile(r"`(snnet(?:\.\w+)+)[`(]")
SOURCE_PATH = re.compile(r"`(snnet/[\w/]+(?:\.py)?)`")


def module_file(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def top_level_names(path: Path) -> set[str]:
    """What `from module import name` can find without running the module: its definitions, imports,
    `__all__`, the string keys of its tables if it serves names lazily (a module `__getattr__`, as
    `snnet/__init__.py` does) and, for a package, its submodules."""
    names: set[str] = set()
    body = ast.parse(path.read_text()).body
    if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in body):
        names |= {k.value for n in body if isinstance(n, (ast.Assign, ast.AnnAssign)) and isinstance(n.value, ast.Dict)
                  for k in n.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
                names |= {c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    if path.name == "__init__.py":
        names |= {p.stem for p in path.parent.glob("*.py")} | {p.name for p in path.parent.iterdir() if (p / "__init__.py").exists()}
    return names


def unresolved(dotted: str, names: list[str]) -> list[str]:
    """`names` that `dotted` (a module, or a module followed by attributes) does not define."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        path = module_file(".".join(parts[:cut]))
        if path is not None:
            wanted = parts[cut:cut + 1] + names
            return [n for n in wanted if n not in top_level_names(path)]
    return [dotted]


def test_reference_checker_tells_real_names_from_made_up_ones():
    assert unresolved("snnet.errors", []) == [] and unresolved("snnet.nonexistent", []) == ["nonexistent"]
    defined = sorted(top_level_names(SNNET / "errors.py") - {"__all__"})[0]
    assert unresolved("snnet.errors", [defined, "made_up_name"]) == ["made_up_name"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_snnet_module_and_name_the_page_mentions_exists(page):
    text = page.read_text()
    missing = []
    for module, names in IMPORT.findall(text):
        missing += [f"from {module} import {n}" for n in unresolved(module, [n.strip() for n in names.split(",") if n.strip()])]
    for dotted in DOTTED.findall(text):
        missing += [f"{dotted} ({n})" for n in unresolved(dotted, [])]
    missing += [p for p in SOURCE_PATH.findall(text) if not (ROOT / p).exists()]
    assert not missing, f"{page.relative_to(ROOT)} names what snnet/ does not have: {missing}"


def test_the_api_page_lists_exactly_the_public_api():
    """docs/api/index.md's table of `snnet`'s public names is the `PUBLIC` table of snnet/__init__.py."""
    init = ast.parse((SNNET / "__init__.py").read_text())
    public = next(n.value for n in init.body if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "PUBLIC")
    expected = {(k.value, f"{v.value}.{k.value}") for k, v in zip(public.keys, public.values)}
    listed = set(re.findall(r"^\| `(\w+)` \| `([\w.]+)` \|$", (ROOT / "docs" / "api" / "index.md").read_text(), re.M))
    assert listed == expected, f"docs/api/index.md lists {sorted(listed - expected)} but not {sorted(expected - listed)}"


def test_configs_readme_covers_every_config():
    """configs/README.md has a row for every ready config: what it trains, its figures or "not measured"."""
    readme = (ROOT / "configs" / "README.md").read_text()
    rows = set(re.findall(r"^\| `([\w.-]+\.yaml)` \|", readme, re.M))
    assert rows == {p.name for p in (ROOT / "configs").glob("*.yaml")}
    sections = " ".join(re.findall(r"^## (.+)$", readme, re.M))
    assert all(f"`{name}`" in sections for name in rows), sections
