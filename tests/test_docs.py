"""The project's documentation stays true: generated tables equal the code, every internal link
and anchor resolves, and every `make` and `appliance` command it names exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from appliance.cli import metrics_markdown_table
from tests.conftest import REPO_ROOT

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    found: dict[str, int] = {}
    anchors = set()
    for line in _FENCE.sub("", page.read_text()).splitlines():
        if line.startswith("#"):
            slug = _slug(line.lstrip("#"))
            n = found.get(slug, 0)
            found[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_every_internal_link_and_anchor_resolves() -> None:
    assert len(PAGES) >= 7
    broken = []
    for page in PAGES:
        for target in _LINK.findall(_FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_documented_metrics_table_matches_the_catalogue() -> None:
    page = (REPO_ROOT / "docs" / "operations.md").read_text()
    block = page.split("<!-- metrics:start -->\n", 1)[1].split("\n<!-- metrics:end -->", 1)[0]
    assert block == metrics_markdown_table(), (
        "regenerate with `appliance config --metrics-markdown`"
    )


def test_the_readme_is_a_short_front_door_naming_no_missing_file() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert "DESIGN.md" not in readme and "FINDINGS" not in readme
    for page in PAGES:
        assert "../shared" not in page.read_text(), page.name


def test_every_appliance_option_the_docs_name_exists() -> None:
    """`appliance up --x` in the docs: each flag is one `appliance up --help` lists."""
    helps = {}
    for command in ("up", "serve", "ingest", "batch", "compact", "config"):
        helps[command] = subprocess.run(
            [sys.executable, "-m", "appliance", command, "--help"],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO_ROOT,
        ).stdout
    text = "\n".join(p.read_text() for p in PAGES)
    named = re.findall(
        r"appliance (up|serve|ingest|batch|compact|config)((?: \[?--[a-z-]+)+)", text
    )
    assert named
    for command, flags in named:
        for flag in re.findall(r"--[a-z-]+", flags):
            assert flag in helps[command], f"appliance {command} {flag}"
    for flag in re.findall(r"`(--[a-z-]+)[ `]", text.split("## On one machine")[1][:4000]):
        assert flag in helps["up"], flag
