"""The README and docs/ stand alone: every relative link resolves to a file of this
repository, and nothing points outside it (a clone has no ``../shared``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) and ![alt](target); the target ends at whitespace or ')'.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(doc: Path) -> None:
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_mention_of_paths_outside_the_repository(doc: Path) -> None:
    assert re.findall(r"\.\./shared\b[^\s`)]*", doc.read_text()) == []


def test_the_link_check_sees_a_broken_link(tmp_path: Path) -> None:
    """The pattern finds both link forms (so the checks above can fail)."""
    text = "see [plan](../shared/DESIGN.md) and ![shot](docs/x.png)"
    assert LINK.findall(text) == ["../shared/DESIGN.md", "docs/x.png"]
