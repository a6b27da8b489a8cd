"""Save what a KVM run saw as a fixture (format version 1).

Each write the guest made becomes an event: the registers before the
instruction, the bytes at RIP, GPA and GLA, and an expectation taken from
KVM alone (the bytes it wrote, split per entry with each entry's value
before, and the registers the vCPU changed), never from ptemu's handler.
The trace's memory is the monitored pages as they were before the first
write; every later change to them went through an event, so a replay sees
the same pages the guest wrote.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from ptemu.errors import UsageError
from ptemu.fixtures.model import FORMAT_VERSION
from ptemu.fixtures.stream import write_stream
from ptemu.kvm.layout import GuestLayout
from ptemu.kvm.machine import kvm_backend
from ptemu.kvm.runner import ObservedWrite, RunReport
from ptemu.registers import REGISTER_DEFAULTS
from ptemu.values import hex_int


def _event(write: ObservedWrite) -> dict[str, Any]:
    regs = {name: hex_int(value) for name, value in write.regs.items()
            if value != REGISTER_DEFAULTS.get(name, 0) or name == "rip"}
    expect = write.expect
    document: dict[str, Any] = {
        "gpa": hex_int(write.gpa),
        "gla": hex_int(write.gla),
        "regs": regs,
        "code": write.code.hex(" "),
        "expect": {
            "status": str(expect.status),
            "writes": [{"gpa": hex_int(r.gpa), "offset": r.offset, "size": r.size,
                        "value": hex_int(r.value), "old": hex_int(r.old)}
                       for r in expect.writes or ()],
            "regs": {name: hex_int(value) for name, value in (expect.regs or {}).items()},
        },
    }
    return document


def fixture_document(report: RunReport, layout: GuestLayout, *, name: str | None = None,
                     command: str = "") -> dict[str, Any]:
    """The fixture (as JSON-ready data) of a monitored run made with ``capture=True``."""
    if not report.monitored:
        raise UsageError("only a monitored run has writes to save as a fixture")
    backend = kvm_backend() or "unknown backend"
    source = (f"KVM ({backend}, Linux {platform.release()}): guest program {report.program}, "
              f"{report.writes} writes executed by KVM (KVM_EXIT_MMIO on a read-only memslot), "
              "registers before each write from single-stepping")
    if command:
        source += f"; {command}"
    return {
        "ptemu_fixture": FORMAT_VERSION,
        "name": name or f"kvm/{report.program}",
        "source": source,
        "paging": report.paging,
        "code_bits": report.code_bits,
        "policy": "strict",
        "memory": [{"gpa": hex_int(layout.monitored_gpa), "data": report.initial_tables.hex()}],
        "events": [_event(write) for write in report.observed],
    }


def save_fixture(path: str | Path, report: RunReport, layout: GuestLayout, *,
                 name: str | None = None, command: str = "") -> int:
    """Write the fixture of `report` to `path`; returns the number of events.

    A `path` ending in ``.jsonl`` gets the streamed form (JSON Lines)."""
    document = fixture_document(report, layout, name=name, command=command)
    target = Path(path)
    if target.suffix == ".jsonl":
        # The streamed form (JSON Lines): a header line, then one event a line.
        return write_stream(target, document, document["events"])
    try:
        target.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot write fixture {target}: {error.strerror}") from None
    return len(document["events"])
