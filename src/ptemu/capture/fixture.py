"""Write captured events as a fixture (format version 1) JSON document.

Every address, value and register is a hex string (JSON numbers above 2**53
lose precision in many tools). Registers are listed in one fixed order so
that a rebuilt corpus is byte-for-byte the same. The top-level ``capture``
object records how the fixture was made (unknown keys are ignored by the
loader).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from ptemu.capture.description import CaptureSpec
from ptemu.capture.events import CapturedEvent
from ptemu.capture.machine import UNICORN_VERSION
from ptemu.registers import GENERAL_REGISTERS, SEGMENT_BASES, SELECTORS, XMM_REGISTERS
from ptemu.status import EntryState
from ptemu.values import PAGE_SIZE, hex_int

REGISTER_ORDER: tuple[str, ...] = (
    "rip", "rflags", *GENERAL_REGISTERS, *SELECTORS, *SEGMENT_BASES,
    "cr0", "cr3", "cr4", "efer", *XMM_REGISTERS)
"""The order registers are written in."""

_ALWAYS_LISTED = frozenset({"rip", "rflags", *GENERAL_REGISTERS, *SELECTORS,
                            "cr0", "cr3", "cr4", "efer"})
"""Registers an event lists even when 0 (bases and vector registers only when set)."""

ORACLE_64 = ("Unicorn {version} (QEMU TCG) running the code with paging on: the CPU "
             "walks the capture's own {paging} page tables")
ORACLE_5LEVEL = (" (CR4.LA57=1: QEMU's x86 MMU does the 5-level walk; the capture checks "
                 "that Unicorn keeps CR4.LA57, and the 57-bit addresses used are "
                 "non-canonical with 4-level paging, so they could not be reached "
                 "otherwise)")


def oracle_text(spec: CaptureSpec) -> str:
    """Which engine produced the expectations, in words."""
    text = ORACLE_64.format(version=UNICORN_VERSION, paging=spec.paging)
    if spec.paging == "5level":
        text += ORACLE_5LEVEL
    return text


def fixture_document(spec: CaptureSpec, events: Sequence[CapturedEvent],
                     guest_pages: Mapping[int, bytes] | None = None) -> dict[str, object]:
    """The fixture as a JSON-ready dict; `guest_pages` (the capture's own page
    tables and other pages, GPA -> contents) go into its memory too when given."""
    source = spec.source or f"ptemu capture of {spec.name}"
    if spec.paging == "5level":
        source += (f"; 5-level oracle: Unicorn {UNICORN_VERSION} executing with CR4.LA57=1 "
                   "and walking the guest's 5-level tables itself")
    document: dict[str, object] = {
        "ptemu_fixture": 1,
        "name": spec.name,
        "source": source,
        "paging": spec.paging,
        "code_bits": spec.code_bits,
        "policy": spec.policy.value,
        "memory": _memory_regions(spec, guest_pages or {}),
        "events": [_event(event) for event in events],
        "capture": {
            "tool": "ptemu capture",
            "oracle": oracle_text(spec),
            "coalesce": spec.coalesce,
            "code": [{"gla": hex_int(blob.gla), "size": len(blob.data), "origin": blob.origin,
                      **({"label": blob.label} if blob.label else {})} for blob in spec.code],
        },
    }
    return document


def dump_fixture(document: Mapping[str, object]) -> str:
    """The JSON text ptemu writes for a fixture (stable, one trailing newline)."""
    return json.dumps(document, indent=1) + "\n"


def write_fixture(document: Mapping[str, object], path: str | Path) -> None:
    """Write a fixture file, creating its folder."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(dump_fixture(document), encoding="utf-8")


def _memory_regions(spec: CaptureSpec, guest_pages: Mapping[int, bytes],
                    ) -> list[dict[str, str]]:
    """Non-zero runs of the monitored and data pages (and of `guest_pages`,
    when given), 8-byte granular; the described pages come last, so they win."""
    pages = {gpa: bytes(data) for gpa, data in guest_pages.items()}
    for page in spec.page_tables + spec.data_pages:
        pages[page.gpa] = page.data
    regions: list[dict[str, str]] = []
    for gpa in sorted(pages):
        for start, end in _nonzero_runs(pages[gpa]):
            regions.append({"gpa": hex_int(gpa + start), "data": pages[gpa][start:end].hex()})
    return regions


def _nonzero_runs(data: bytes, grain: int = 8, gap: int = 64) -> list[tuple[int, int]]:
    """[start, end) spans holding every non-zero byte; runs closer than `gap` merge."""
    runs: list[tuple[int, int]] = []
    for start in range(0, PAGE_SIZE, grain):
        if any(data[start:start + grain]):
            if runs and start - runs[-1][1] < gap:
                runs[-1] = (runs[-1][0], start + grain)
            else:
                runs.append((start, start + grain))
    return runs


def _registers(regs: Mapping[str, int], *, all_listed: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in REGISTER_ORDER:
        if name not in regs:
            continue
        if not all_listed or regs[name] or name in _ALWAYS_LISTED:
            out[name] = hex_int(regs[name])
    return out


def _event(event: CapturedEvent) -> dict[str, object]:
    record: dict[str, object] = {
        "gpa": hex_int(event.gpa),
        "gla": hex_int(event.gla),
        "regs": _registers(event.regs, all_listed=True),
        "code": event.code.hex(" "),
    }
    if event.memory:
        record["memory"] = [{"gpa": hex_int(patch.gpa), "data": patch.data.hex()}
                            for patch in event.memory]
    writes = [{"gpa": hex_int(w.gpa), "offset": w.offset, "size": w.size,
               "value": hex_int(w.value), "old": hex_int(w.old)} for w in event.writes]
    entries: list[dict[str, object]] = []
    for entry in event.entries:
        item: dict[str, object] = {"gpa": hex_int(entry.gpa), "state": entry.state.value}
        if entry.state is EntryState.COMPLETE:
            assert entry.old is not None and entry.new is not None
            item["old"] = hex_int(entry.old)
            item["new"] = hex_int(entry.new)
        entries.append(item)
    record["expect"] = {
        "status": "emulated",
        "writes": writes,
        "entries": entries,
        "regs": _registers(event.changed, all_listed=False),
    }
    record["captured"] = {"call": event.call, "instructions": list(event.instructions),
                          **({"redelivered": True} if event.redelivered else {})}
    return record
