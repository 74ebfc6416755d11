"""The README and the docs pages link only to files that exist, and the README stays one read long.
(`mkdocs build --strict` in CI checks the site's links and anchors; this checks the files as GitHub
shows them, README included, without mkdocs installed.)"""
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
