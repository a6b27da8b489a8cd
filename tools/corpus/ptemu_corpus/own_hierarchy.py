"""Traces in which the guest edits the page-table hierarchy its own CR3 roots:
the shipped input of ``ptemu monitor`` (docs/monitor.md's worked example).

Every other trace writes to page-table pages that no CR3 of the trace reaches,
so the translation monitor has nothing to watch in them. Here every monitored
page is one table of a hierarchy rooted at the fixture's CR3 (GPA 0x1000), and
the code edits that hierarchy's user half, a linear range it never accesses:
it links a new page table and maps pages in it, splits a 2 MiB page into a
table of 512 PTEs with the same frames and rights and then changes one of
them, clears R/W with a locked BTR and a locked AND, unlinks a page table
(whose page then receives data), replaces a PML4E (4-level) or a PDPTE (PAE),
and drops a PDPTE. Addresses and values are fixed and nothing is drawn from a
generator: tests/monitor/test_monitor_corpus.py works the expected translation
changes out by hand from the plan written here.

How the capture stays the oracle. `ptemu.capture` runs the code on page
tables of its own, root R, whose user half is empty (every page it maps is in
the kernel half: the direct map, the kernel text, its stack). The hierarchy's
root M copies R's kernel-half entries (with Accessed already set, as Linux's
kernel entries are, so a CPU walking M writes nothing into it), and its user
half is the guest's. The code never touches the user half, so it runs exactly
the same under CR3 = M as under CR3 = R: `finish` checks those two facts on the
layout the capture used, then sets every event's ``cr3`` to M, the one change
made to the captured fixture. A write the guest makes to a page that is no
longer a table (the freed page table) is given as the next call's memory patch:
it would cause no exit on real hardware, so the trace has no event for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ptemu.capture import parse_description
from ptemu.capture.layout import build_layout

from .entries import NX, PS, RW, US, A, D, P, direct, h
from .guest import Guest, Json, Trace

SOURCE = ("synthetic guest written for the corpus (tools/corpus/ptemu_corpus/own_hierarchy.py), "
          "captured with ptemu capture; the events carry CR3 = the hierarchy they edit, whose "
          "kernel half is the capture's own (see the module docstring)")

TABLE = P | RW | US | A | D
"""Linux's _PAGE_TABLE: a user page-table link."""
DATA = P | RW | US | A | D | NX
"""A user data page: read, write, no execute."""
TEXT_PAGE = P | US | A
"""A user text page: read-only, executable."""
PDPTE = P
"""A PAE PDPTE has P, PWT and PCD only (SDM Table 4-8)."""

ROOT = 0x1000
"""The hierarchy's root (CR3) in both traces."""

FREED_DATA = b"this page was a page table; now it holds data. " * 8
"""What the guest writes into the page table it unlinked (no exit: not a table any more)."""


def _split_table(frame: int, flags: int) -> bytes:
    """512 PTEs mapping the 2 MiB page at `frame` with `flags`: the same
    translation as the large page (PS dropped, PAT stays 0)."""
    return b"".join((frame + i * 0x1000 | flags).to_bytes(8, "little") for i in range(512))


def _pages(paging: str, tables: dict[int, dict[int, int]]) -> list[Json]:
    return [{"gpa": h(gpa), "gla": h(direct(paging, gpa)),
             "entries": {str(i): h(v) for i, v in sorted(entries.items())}}
            for gpa, entries in sorted(tables.items()) if gpa != ROOT]


def _with_kernel_half(g: Guest, kernel: range) -> Callable[[Json], Json]:
    """Copy the capture's kernel-half root entries into the root (Accessed set,
    except in PDPTEs, which have no A bit) and return the fixture rewrite."""
    layout = build_layout(parse_description(g.description()))
    capture_root = layout.control.cr3
    size = g.entry_size
    root_page = layout.pages[capture_root]
    values = [int.from_bytes(root_page[i * size:(i + 1) * size], "little")
              for i in range(4096 // size)]
    user = [i for i in range(len(values)) if i not in kernel]
    if any(values[i] for i in user):
        raise SystemExit(f"build_corpus: {g.name}: the capture maps something in the user half")
    accessed = 0 if g.paging == "pae" else A
    for i in kernel:
        if values[i]:
            g.entries[i] = values[i] | accessed

    def finish(fixture: Json) -> Json:
        for event in fixture["events"]:
            regs: dict[str, Any] = event["regs"]
            if int(regs["cr3"], 16) != capture_root:
                raise SystemExit(f"build_corpus: {g.name}: the capture ran on another root")
            regs["cr3"] = h(g.table_gpa)
        return fixture

    return finish


def own_hierarchy_4level() -> Trace:
    """The 4-level trace: docs/monitor.md's worked example."""
    paging = "4level"
    g = Guest(name=f"{paging}/monitor-own-hierarchy", paging=paging, code_bits=64,
              source=SOURCE + ": 4-level, the worked example of docs/monitor.md",
              table_gpa=ROOT)
    # PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000 (linear 0-0x3000);
    # PDE 1 is a 2 MiB page (linear 0x200000). Spare: 0x5000 an empty PT,
    # 0x6000 the PT the 2 MiB page is split into, 0x7000 another PDPT whose
    # entry 0 shares PD 0x3000 and entry 1 maps a 1 GiB page.
    tables = {
        ROOT: {0: 0x2000 | TABLE},
        0x2000: {0: 0x3000 | TABLE},
        0x3000: {0: 0x4000 | TABLE, 1: 0x0C00_0000 | PS | DATA},
        0x4000: {0: 0x0A00_0000 | DATA, 1: 0x0A00_1000 | DATA, 2: 0x0B00_0000 | TEXT_PAGE},
        0x5000: {},
        0x6000: {},
        0x7000: {0: 0x3000 | TABLE, 1: 0x4000_0000 | PS | DATA},
    }
    g.entries = dict(tables[ROOT])
    g.extra_pages = _pages(paging, tables)
    g.blob("set", "48 89 37 c3")                   # mov [rdi], rsi
    g.blob("xchg", "48 87 37 c3")                  # xchg [rdi], rsi
    g.blob("btr1", "f0 48 0f ba 37 01 c3")         # lock btr qword [rdi], 1
    g.blob("andb", "f0 80 27 fd c3")               # lock and byte [rdi], 0xfd
    g.blob("clear", "48 c7 07 00 00 00 00 c3")     # mov qword [rdi], 0

    def entry(table: int, index: int) -> int:
        return direct(paging, table + 8 * index)

    g.call("set", rdi=entry(0x3000, 2), rsi=0x5000 | TABLE)          # 0 link an empty PT
    g.call("set", rdi=entry(0x5000, 0), rsi=0x0D00_0000 | DATA)      # 1 map 0x400000
    g.call("set", rdi=entry(0x5000, 1), rsi=0x0D00_1000 | DATA)      # 2 map 0x401000
    g.call("xchg", rdi=entry(0x3000, 1), rsi=0x6000 | TABLE,         # 3 split the 2 MiB page
           memory=[{"gpa": h(0x6000), "data": _split_table(0x0C00_0000, DATA).hex()}])
    g.call("set", rdi=entry(0x6000, 5), rsi=0x0E00_0000 | DATA)      # 4 remap 0x205000
    g.call("btr1", rdi=entry(0x4000, 0))                             # 5 R/W off: linear 0
    g.call("andb", rdi=entry(0x3000, 2))                             # 6 R/W off: PDE 2
    g.call("clear", rdi=entry(0x3000, 0))                            # 7 unlink PT 0x4000
    g.call("set", rdi=entry(ROOT, 0), rsi=0x7000 | TABLE,            # 8 replace PML4E 0
           memory=[{"gpa": h(0x4000), "data": FREED_DATA.hex()}])
    g.call("clear", rdi=entry(0x7000, 0))                            # 9 drop PDPTE 0
    finish = _with_kernel_half(g, range(256, 512))
    return Trace(g.name, description=g.description(), finish=finish)


def own_hierarchy_pae() -> Trace:
    """The PAE trace: 32-bit code, 8-byte entries written by halves and CMPXCHG8B."""
    paging = "pae"
    g = Guest(name=f"{paging}/monitor-own-hierarchy", paging=paging, code_bits=32,
              source=SOURCE + ": PAE", table_gpa=ROOT)
    # PDPT 0x1000 -> PD 0x2000 -> PT 0x3000 (linear 0-0x3000); PDE 1 is a 2 MiB
    # page (linear 0x200000). Spare: 0x4000 an empty PT, 0x5000 the PT the
    # 2 MiB page is split into, 0x6000 another PD (one 2 MiB page) for PDPTE 0.
    tables = {
        ROOT: {0: 0x2000 | PDPTE},
        0x2000: {0: 0x3000 | TABLE, 1: 0x0C00_0000 | PS | DATA},
        0x3000: {0: 0x0A00_0000 | DATA, 1: 0x0A00_1000 | DATA, 2: 0x0B00_0000 | TEXT_PAGE},
        0x4000: {},
        0x5000: {},
        0x6000: {0: 0x0F00_0000 | PS | DATA},
    }
    g.entries = dict(tables[ROOT])
    g.extra_pages = _pages(paging, tables)
    g.blob("set", "89 48 04 89 10 c3")             # mov [eax+4], ecx; mov [eax], edx
    g.blob("cmpxchg8b", "f0 0f c7 0e c3")          # lock cmpxchg8b [esi]
    g.blob("btr1", "f0 0f ba 30 01 c3")            # lock btr dword [eax], 1
    g.blob("andb", "f0 80 20 fd c3")               # lock and byte [eax], 0xfd

    def entry(table: int, index: int) -> int:
        return direct(paging, table + 8 * index)

    def set64(gla: int, value: int) -> dict[str, int]:
        return {"rax": gla, "rcx": value >> 32, "rdx": value & 0xFFFF_FFFF}

    def cmpxchg8b(gla: int, old: int, new: int) -> dict[str, int]:
        return {"rsi": gla, "rdx": old >> 32, "rax": old & 0xFFFF_FFFF,
                "rcx": new >> 32, "rbx": new & 0xFFFF_FFFF}

    def call(label: str, regs: dict[str, int], memory: list[Json] | None = None) -> None:
        g.call(label, memory, None, None, **regs)

    call("set", set64(entry(0x2000, 2), 0x4000 | TABLE))                        # 0 link PT
    call("set", set64(entry(0x4000, 0), 0x0D00_0000 | DATA))                    # 1 map
    call("cmpxchg8b", cmpxchg8b(entry(0x2000, 1), 0x0C00_0000 | PS | DATA,      # 2 split
                                0x5000 | TABLE),
         [{"gpa": h(0x5000), "data": _split_table(0x0C00_0000, DATA).hex()}])
    call("set", set64(entry(0x5000, 5), 0x0E00_0000 | DATA))                    # 3 remap
    call("btr1", {"rax": entry(0x3000, 0)})                                     # 4 R/W off
    call("andb", {"rax": entry(0x2000, 2)})                                     # 5 R/W off
    call("cmpxchg8b", cmpxchg8b(entry(0x2000, 0), 0x3000 | TABLE, 0))           # 6 unlink
    call("cmpxchg8b", cmpxchg8b(entry(ROOT, 0), 0x2000 | PDPTE,                 # 7 PDPTE 0
                                0x6000 | PDPTE),
         [{"gpa": h(0x3000), "data": FREED_DATA.hex()}])
    finish = _with_kernel_half(g, range(3, 4))
    return Trace(g.name, description=g.description(), finish=finish)


def own_hierarchy() -> Iterator[Trace]:
    """Both traces, 4-level first."""
    yield own_hierarchy_4level()
    yield own_hierarchy_pae()

