"""Where the corpus tools read and write, relative to the repository root."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
"""The repository root (tools/corpus/ptemu_corpus/ is three levels below it)."""

CORPUS = ROOT / "src" / "ptemu" / "corpus"
"""The shipped corpus (the repository's ``fixtures/`` is a link to it)."""

KERNEL_WRITERS = ROOT / "src" / "ptemu" / "kvm" / "data" / "kernel_writers.json"
"""The extracted kernel functions: the corpus builder's input, and package data
of ``ptemu kvm run --program kernel``."""

DEFAULT_WORK_DIR = Path("/tmp/kernel-work")
"""Scratch folder for the Debian packages and kernel images (never in a repository)."""


def inside_git_repository(path: Path) -> bool:
    """True when `path` or one of its parents holds a ``.git``."""
    return any((parent / ".git").exists() for parent in (path, *path.parents))
