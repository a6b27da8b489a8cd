"""Synthetic traces of any length, for end-to-end and scale benchmarks.

`synthetic_trace(count)` builds a 4-level trace of `count` events that spread
over `entries` page-table entries (64-bit code, kernel addresses, `strict`
policy). Each event is one of four kernel-like writes, chosen with a fixed
seed:

- ``mov [rdi], rax`` (``set_pte``),
- ``xchg [rdi], rax`` (``ptep_get_and_clear``),
- ``lock or qword [rdi], 0x20`` (setting the Accessed bit),
- ``lock cmpxchg [rdi], rcx`` with RAX equal to the entry (a successful
  ``try_cmpxchg`` loop).

The expectation of every event is worked out here by hand from the SDM's
definition of the instruction (the generator keeps its own copy of the
entries), not by running ptemu, so a replay of the trace is also a check.
Events are yielded one at a time, so a trace of 10^6 events never has to be
held in memory by the generator.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ptemu.fixtures.stream import write_stream

TABLE_GPA = 0x10_0000
"""GPA of the first page-table page; the entries fill consecutive pages."""
TABLE_GLA = 0xFFFF_8880_0000_0000 + TABLE_GPA
"""Where the kernel's direct map shows that page (GLA and GPA share offsets)."""
CODE_RIP = 0xFFFF_FFFF_8100_0000

_RFLAGS_BEFORE = 0x2
_ZF, _PF, _SF = 1 << 6, 1 << 2, 1 << 7
_U64 = (1 << 64) - 1

_MOV = bytes.fromhex("48 89 07")             # mov [rdi], rax
_XCHG = bytes.fromhex("48 87 07")            # xchg [rdi], rax
_LOCK_OR = bytes.fromhex("f0 48 83 0f 20")   # lock or qword [rdi], 0x20
_LOCK_CMPXCHG = bytes.fromhex("f0 48 0f b1 0f")  # lock cmpxchg [rdi], rcx

KINDS = ("mov", "xchg", "lock-or", "lock-cmpxchg")


def _hex(value: int) -> str:
    return f"{value:#x}"


def _logic_flags(result: int) -> int:
    """RFLAGS after OR/AND/XOR on 64 bits: CF = OF = 0, SF, ZF and PF from the
    result (PF: even parity of its low byte); AF is undefined (not compared)."""
    flags = _RFLAGS_BEFORE
    if result == 0:
        flags |= _ZF
    if result >> 63:
        flags |= _SF
    if (result & 0xFF).bit_count() % 2 == 0:
        flags |= _PF
    return flags


def _pte(rng: random.Random) -> int:
    """A present, writable 4 KiB mapping of a random frame, NX set at random."""
    frame = rng.randrange(1, 1 << 24) << 12
    return frame | 0x63 | (rng.getrandbits(1) << 63)


def synthetic_header(entries: int = 4096, name: str = "synthetic/4level-kernel-mix",
                     ) -> dict[str, Any]:
    """The fixture's top level (everything before ``events``): all entries
    start at zero, which memory never given reads as anyway."""
    if entries < 1:
        raise ValueError("entries must be at least 1")
    return {
        "ptemu_fixture": 1,
        "name": name,
        "source": f"ptemu.bench.trace: {entries} entries, expectations from the SDM by hand",
        "paging": "4level",
        "code_bits": 64,
        "policy": "strict",
        "memory": [{"gpa": _hex(TABLE_GPA), "data": "00" * 8}],
    }


def synthetic_events(count: int, entries: int = 4096, seed: int = 0,
                     ) -> Iterator[dict[str, Any]]:
    """`count` events in fixture form (JSON-ready), each with its expectation."""
    rng = random.Random(seed)
    values = [0] * entries
    for number in range(count):
        index = rng.randrange(entries)
        old = values[index]
        offset = index * 8
        gpa = TABLE_GPA + offset
        # RBX counts events, as a live guest's registers differ from one exit to
        # the next: no event is the exact repeat that `strict` calls a duplicate.
        regs: dict[str, int] = {"rip": CODE_RIP, "rdi": TABLE_GLA + offset,
                                "rbx": number, "rflags": _RFLAGS_BEFORE}
        kind = KINDS[rng.randrange(len(KINDS))]
        changed: dict[str, int] = {}
        if kind == "mov":
            code, new = _MOV, _pte(rng)
            regs["rax"] = new
        elif kind == "xchg":
            code, new = _XCHG, _pte(rng) if rng.getrandbits(1) else 0
            regs["rax"] = new
            if old != new:
                changed["rax"] = old
        elif kind == "lock-or":
            code, new = _LOCK_OR, old | 0x20
            flags = _logic_flags(new)
            if flags != _RFLAGS_BEFORE:
                changed["rflags"] = flags
        else:
            code, new = _LOCK_CMPXCHG, _pte(rng)
            regs["rax"], regs["rcx"] = old, new
            changed["rflags"] = _RFLAGS_BEFORE | _ZF | _PF  # the compare's result is 0
        changed["rip"] = CODE_RIP + len(code)
        values[index] = new
        yield {
            "gpa": _hex(gpa),
            "gla": _hex(regs["rdi"]),
            "regs": {name: _hex(value) for name, value in regs.items()},
            "code": code.hex(),
            "expect": {
                "status": "emulated",
                "writes": [{"gpa": _hex(gpa), "offset": 0, "size": 8,
                            "value": _hex(new), "old": _hex(old)}],
                "entries": [{"gpa": _hex(gpa), "state": "complete",
                             "old": _hex(old), "new": _hex(new)}],
                "regs": {name: _hex(value & _U64) for name, value in changed.items()},
            },
        }


def write_synthetic_trace(path: str | Path, count: int, entries: int = 4096,
                          seed: int = 0) -> None:
    """Write `synthetic_trace` to `path` one event at a time: JSON Lines (the
    streamed form) for a ``*.jsonl`` path, one JSON document otherwise."""
    target = Path(path)
    header = synthetic_header(entries)
    events = synthetic_events(count, entries, seed)
    if target.suffix == ".jsonl":
        write_stream(target, header, events)
        return
    with target.open("w", encoding="utf-8") as out:
        out.write(json.dumps(header)[:-1] + ', "events": [')
        for number, event in enumerate(events):
            out.write((", " if number else "") + json.dumps(event))
        out.write("]}\n")


def synthetic_trace(count: int, entries: int = 4096, seed: int = 0) -> dict[str, Any]:
    """A whole fixture (header and events) as one JSON-ready dict."""
    return {**synthetic_header(entries), "events": list(synthetic_events(count, entries, seed))}
