"""The guest programs `ptemu kvm run --program` knows, by name."""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from ptemu.errors import UsageError
from ptemu.kvm.kernel import kernel_program, load_kernel_writers, select_writers
from ptemu.kvm.layout import GuestLayout
from ptemu.kvm.programs import GuestProgram, stress_program

PROGRAM_NAMES: tuple[str, ...] = ("stress", "kernel", "monitor")
"""``stress``: every instruction family, hand-assembled; ``kernel``: Debian
kernel page-table writers from the corpus records; ``monitor``: a guest that
edits its own page tables, run with the translation monitor deciding which
pages exit (`ptemu.kvm.monitor_program`, `ptemu.kvm.monitor_run`)."""

WRITERS_FILE = "kernel_writers.json"
"""The Debian kernel-writer records shipped in the package (``ptemu/kvm/data/``),
written there by the corpus tools (tools/corpus/README.md)."""


def packaged_writers() -> Traversable:
    """The kernel-writer records installed with ptemu (``ptemu/kvm/data/``)."""
    return resources.files("ptemu.kvm").joinpath("data", WRITERS_FILE)


def writer_files() -> list[Traversable]:
    """Where kernel-writer records are found: the file installed with the package
    (an empty list only when an installation left it out)."""
    packaged = packaged_writers()
    return [packaged] if packaged.is_file() else []


def find_writers_file(path: str | None) -> Path | Traversable:
    """`path`, or the packaged records; raises `UsageError` when there are none."""
    if path is not None:
        return Path(path)
    files = writer_files()
    if not files:
        raise UsageError(
            f"this ptemu installation has no ptemu/kvm/data/{WRITERS_FILE}: reinstall "
            "ptemu, or give --writers PATH")
    return files[0]


def build_program(name: str, layout: GuestLayout, *, iterations: int, seed: int = 1,
                  writers: str | None = None) -> GuestProgram:
    """The program called `name` for `layout`; raises `UsageError` for an unknown name."""
    if name == "stress":
        return stress_program(layout, iterations, seed)
    if name == "kernel":
        records = load_kernel_writers(find_writers_file(writers))
        return kernel_program(layout, select_writers(records, layout), iterations, seed)
    if name == "monitor":
        raise UsageError("the monitor program runs with the translation monitor "
                         "(ptemu.kvm.monitor_run.run_monitored), not as a plain program")
    raise UsageError(f"unknown guest program {name!r} (expected one of: "
                     f"{', '.join(PROGRAM_NAMES)})")
