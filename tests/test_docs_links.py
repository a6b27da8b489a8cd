"""The project carries its own contract: every relative link in its Markdown
resolves inside the repository, and nothing points outside it (a clone has
nothing beside it)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _tracked(pattern: str) -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", pattern], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        listed = [str(path.relative_to(ROOT)) for path in ROOT.rglob(pattern)]
    return [ROOT / name for name in listed if (ROOT / name).is_file()]


MARKDOWN = [path for path in _tracked("*.md")]


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(page: Path) -> None:
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor on the same page
        resolved = (page.parent / target.split("#", 1)[0]).resolve()
        assert resolved.is_relative_to(ROOT), f"{page.name} links outside the repository: {target}"
        assert resolved.exists(), f"{page.name} links to a missing file: {target}"


def test_nothing_in_the_project_names_the_shared_folder() -> None:
    offenders = [str(path.relative_to(ROOT))
                 for path in _tracked("*.md") + _tracked("*.py") + _tracked("*.json")
                 if "../shared" in path.read_text(encoding="utf-8", errors="replace")
                 and path.name != "test_docs_links.py"]
    assert offenders == []


def test_the_readme_links_the_project_semantics() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/semantics.md)" in readme
    assert (ROOT / "docs" / "semantics.md").is_file()
