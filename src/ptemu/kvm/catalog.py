"""The guest programs `ptemu kvm run --program` knows, by name."""

from __future__ import annotations

from pathlib import Path

import ptemu
from ptemu.errors import UsageError
from ptemu.kvm.kernel import kernel_program, load_kernel_writers, select_writers
from ptemu.kvm.layout import GuestLayout
from ptemu.kvm.programs import GuestProgram, stress_program

PROGRAM_NAMES: tuple[str, ...] = ("stress", "kernel")
"""``stress``: every instruction family, hand-assembled; ``kernel``: Debian
kernel page-table writers from the corpus records."""

WRITERS_FILE = "kernel_writers.json"


def writer_files() -> list[Path]:
    """Where kernel-writer records are looked for, in order: the packaged corpus,
    then the source tree's tools/corpus (an editable install)."""
    package = Path(ptemu.__file__).resolve().parent
    found = sorted((package / "corpus").rglob("kernel_writers*.json"))
    tree = package.parents[1] / "tools" / "corpus" / WRITERS_FILE
    if tree.is_file():
        found.append(tree)
    return found


def find_writers_file(path: str | None) -> Path:
    """`path`, or the first of `writer_files`; raises `UsageError` when there is none."""
    if path is not None:
        return Path(path)
    files = writer_files()
    if not files:
        raise UsageError(
            f"no {WRITERS_FILE} found in ptemu's corpus or tools/corpus: give --writers PATH "
            "(made by tools/corpus/extract_kernel_writers.py)")
    return files[0]


def build_program(name: str, layout: GuestLayout, *, iterations: int, seed: int = 1,
                  writers: str | None = None) -> GuestProgram:
    """The program called `name` for `layout`; raises `UsageError` for an unknown name."""
    if name == "stress":
        return stress_program(layout, iterations, seed)
    if name == "kernel":
        records = load_kernel_writers(find_writers_file(writers))
        return kernel_program(layout, select_writers(records, layout), iterations, seed)
    raise UsageError(f"unknown guest program {name!r} (expected one of: "
                     f"{', '.join(PROGRAM_NAMES)})")
