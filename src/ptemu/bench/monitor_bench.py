"""`ptemu bench`'s monitor figures: a whole 4-level space watched.

Issue 12 asks that a leaf write through `TranslationMonitor` cost at most
twice the handler alone, whatever the size of the space, and that replacing an
upper-level entry cost in proportion to the subtree it changes. This module
builds a 4-level hierarchy of ``pages`` mapped 4 KiB pages (frames scattered,
so that every page is its own run: the worst case for the monitor's run
lists), watches all of it, and times:

- **leaf writes**: a ``MOV [rdi], rax`` that toggles one PTE between two frames,
  through the monitor and through a bare `PtWriteHandler` over an identical
  copy of the memory, interleaved chunk by chunk in one run (the ratio is the
  figure; absolute times on a shared machine move); and, in the same rounds, a
  *quiet* leaf write through the monitor (a MOV that toggles software bit 9 of
  a PTE: a change of nothing the CPU translates, answered from one mask);
- **upper-level replaces**: an XCHG that swaps a PDE between two page tables
  of 512 mapped pages each, and a PDPTE between two page directories of
  ``pdpte_tables`` such tables, so the cost per page of the subtree shows
  whether the cost follows the subtree.

Every measured event is checked: it must emulate, and each replace must report
the change (a write that silently did nothing would time nothing).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.memory import InMemoryGuestMemory
from ptemu.monitor import InMemoryProtector, TranslationMonitor
from ptemu.status import Status
from ptemu.vcpu import Vcpu

PAGE = 0x1000
TABLE_FLAGS = 0x7
"""P, R/W, U/S: what a table entry grants (restricts nothing)."""
LEAF_FLAGS = 0x7
DATA_BASE = 0x1_0000_0000
"""Frames mapped by the space start here, clear of the tables."""
MOV_STORE = b"\x48\x89\x07"
"""mov [rdi], rax"""
XCHG_STORE = b"\x48\x87\x07"
"""xchg [rdi], rax"""
SOFTWARE_BIT = 1 << 9
"""A PTE bit the CPU ignores (SDM Table 4-20): writing it changes no translation."""
KERNEL_MAP = 0xFFFF_8880_0000_0000
"""Where the guest maps physical memory linearly (what `gla` of an event is)."""


@dataclass
class Space:
    """A 4-level hierarchy in memory: where its tables are."""

    memory: InMemoryGuestMemory
    cr3: int
    pdpt: int
    pds: list[int]
    pts: list[int]
    pages: int
    next_free: int
    """The next unused table page (for spare tables)."""

    def table(self) -> int:
        """A fresh zeroed table page."""
        page = self.next_free
        self.next_free += PAGE
        return page


def _put(memory: InMemoryGuestMemory, gpa: int, value: int) -> None:
    memory.write(gpa, value.to_bytes(8, "little"))


def _scatter(index: int, pages: int) -> int:
    """Frame number of page `index`: a permutation, so no two neighbours are affine."""
    return (index * 7919) % max(pages, 1) if pages % 7919 else index


def build_space(pages: int, memory: InMemoryGuestMemory | None = None) -> Space:
    """A 4-level space mapping `pages` 4 KiB pages from linear 0 (PML4E 0, PDPTE 0..)."""
    memory = memory if memory is not None else InMemoryGuestMemory()
    cr3, pdpt = 0x1000, 0x2000
    _put(memory, cr3, pdpt | TABLE_FLAGS)
    tables = -(-pages // 512)
    directories = -(-tables // 512)
    next_free = 0x3000
    pds = []
    for number in range(directories):
        pds.append(next_free)
        _put(memory, pdpt + 8 * number, next_free | TABLE_FLAGS)
        next_free += PAGE
    pts = []
    for number in range(tables):
        pts.append(next_free)
        _put(memory, pds[number // 512] + 8 * (number % 512), next_free | TABLE_FLAGS)
        entries = bytearray(PAGE)
        for slot in range(min(512, pages - number * 512)):
            frame = DATA_BASE + _scatter(number * 512 + slot, pages) * PAGE
            entries[8 * slot:8 * slot + 8] = (frame | LEAF_FLAGS).to_bytes(8, "little")
        memory.write(next_free, bytes(entries))
        next_free += PAGE
    return Space(memory, cr3, pdpt, pds, pts, pages, next_free)


def _event(gpa: int, value: int, code: bytes) -> WriteEvent:
    gla = KERNEL_MAP + gpa
    return WriteEvent(gpa, gla, {"rip": 0x40_1000, "rdi": gla, "rax": value}, code, 64)


def _timed(vcpu: Vcpu, call: Callable[[], Any]) -> int:
    vcpu.begin_exit()
    start = time.perf_counter_ns()
    call()
    return time.perf_counter_ns() - start


def leaf_write_figures(pages: int, events: int, rounds: int) -> dict[str, Any]:
    """Median cost of a PTE write through the monitor and through the handler alone."""
    watched = build_space(pages)
    bare = build_space(pages)
    monitor = TranslationMonitor(watched.memory, "4level", InMemoryProtector())
    monitor.watch_space(watched.cr3, ranges="all")
    handler = PtWriteHandler(bare.memory, "4level")
    vcpu = Vcpu()
    # PTEs spread over the whole space; each write moves the page to a frame past
    # the mapped ones and the next one moves it back.
    targets = [watched.pts[(k * 37) % len(watched.pts)] + 8 * ((k * 101) % 512)
               for k in range(64)]
    targets = [gpa for gpa in targets
               if int.from_bytes(watched.memory.read(gpa, 8), "little") & 1]
    samples: dict[str, list[int]] = {"monitor": [], "handler": [], "quiet": []}
    spare = DATA_BASE + (pages + 1) * PAGE

    def one(target: int, memory: InMemoryGuestMemory, run: Callable[[WriteEvent], Any],
            bucket: list[int]) -> None:
        current = int.from_bytes(memory.read(target, 8), "little")
        value = (spare | LEAF_FLAGS) if current & ~0xFFF != spare else (
            (current & 0xFFF) | (DATA_BASE + PAGE * 3))
        event = _event(target, value, MOV_STORE)
        bucket.append(_timed(vcpu, lambda: _check(run(event))))

    def quiet(target: int, bucket: list[int]) -> None:
        current = int.from_bytes(watched.memory.read(target, 8), "little")
        event = _event(target, current ^ SOFTWARE_BIT, MOV_STORE)

        def run() -> None:
            result = monitor.handle_ept_write(vcpu, event)
            _check(result)
            if result.changes:
                raise RuntimeError("a write of a software bit reported a change")
        bucket.append(_timed(vcpu, run))

    for k in range(20):   # warm-up: decode caches, first allocations
        target = targets[k % len(targets)]
        one(target, watched.memory, lambda e: monitor.handle_ept_write(vcpu, e), [])
        one(target, bare.memory, lambda e: handler.handle_ept_write(vcpu, e), [])
        quiet(target, [])
    chunk = 25
    for _ in range(rounds):
        for start in range(0, events, chunk):
            for name, memory, run in (
                    ("monitor", watched.memory,
                     lambda e: monitor.handle_ept_write(vcpu, e)),
                    ("handler", bare.memory, lambda e: handler.handle_ept_write(vcpu, e))):
                for k in range(start, min(events, start + chunk)):
                    one(targets[k % len(targets)], memory, run, samples[name])
            for k in range(start, min(events, start + chunk)):
                quiet(targets[k % len(targets)], samples["quiet"])
    monitor_us = statistics.median(samples["monitor"]) / 1e3
    handler_us = statistics.median(samples["handler"]) / 1e3
    quiet_us = statistics.median(samples["quiet"]) / 1e3
    return {"mapped_pages": pages, "protected_pages": len(monitor.protected_pages()),
            "events": len(samples["monitor"]), "monitor_median_us": round(monitor_us, 2),
            "handler_median_us": round(handler_us, 2),
            "ratio": round(monitor_us / handler_us, 2),
            "quiet_median_us": round(quiet_us, 2),
            "quiet_ratio": round(quiet_us / handler_us, 2)}


def _check(result: Any) -> None:
    event = getattr(result, "event", result)
    if event is None or event.status is not Status.EMULATED:
        raise RuntimeError(f"benchmark event was not emulated: {result!r}")


def replace_figures(pages: int, pdpte_tables: int, repeats: int) -> dict[str, Any]:
    """Median cost of swapping a PDE (512 pages) and a PDPTE (`pdpte_tables` x 512 pages)
    between two subtrees, in a watched space of `pages` pages."""
    space = build_space(pages)
    memory = space.memory
    # Spare subtrees: one PT, and one PD of `pdpte_tables` PTs, all fully mapped.
    spare_pt = space.table()
    _fill_table(memory, spare_pt, DATA_BASE + 0x4000_0000)
    spare_pd = space.table()
    for number in range(pdpte_tables):
        table = space.table()
        _fill_table(memory, table, DATA_BASE + 0x8000_0000 + number * 512 * PAGE * 3)
        _put(memory, spare_pd + 8 * number, table | TABLE_FLAGS)
    # The PDPTE that is swapped: one past the space's own, holding an equal PD.
    first_pd = space.table()
    for number in range(pdpte_tables):
        table = space.table()
        _fill_table(memory, table, DATA_BASE + 0xC000_0000 + number * 512 * PAGE * 5)
        _put(memory, first_pd + 8 * number, table | TABLE_FLAGS)
    pdpte = space.pdpt + 8 * len(space.pds)
    _put(memory, pdpte, first_pd | TABLE_FLAGS)
    monitor = TranslationMonitor(memory, "4level", InMemoryProtector())
    monitor.watch_space(space.cr3, ranges="all")
    vcpu = Vcpu()
    pde = space.pds[0]
    figures = []
    for what, entry, tables in (("PDE", pde, (space.pts[0], spare_pt)),
                                ("PDPTE", pdpte, (first_pd, spare_pd))):
        samples = []
        for number in range(repeats * 2):
            value = tables[(number + 1) % 2] | TABLE_FLAGS
            event = _event(entry, value, XCHG_STORE)

            def run(event: WriteEvent = event) -> None:
                result = monitor.handle_ept_write(vcpu, event)
                _check(result)
                if not result.changes:
                    raise RuntimeError("a replaced subtree reported no change")
            samples.append(_timed(vcpu, run))
        subtree = 512 if what == "PDE" else 512 * pdpte_tables
        median_us = statistics.median(samples) / 1e3
        figures.append({"entry": what, "subtree_pages": subtree,
                        "median_us": round(median_us, 1),
                        "us_per_page": round(median_us / subtree, 3)})
    return {"mapped_pages": pages, "replaces": figures}


def _fill_table(memory: InMemoryGuestMemory, table: int, first_frame: int) -> None:
    entries = bytearray(PAGE)
    for slot in range(512):
        frame = first_frame + ((slot * 211) % 512) * PAGE
        entries[8 * slot:8 * slot + 8] = (frame | LEAF_FLAGS).to_bytes(8, "little")
    memory.write(table, bytes(entries))


def run_monitor_benchmark(*, pages: int = 102_400, events: int = 500, rounds: int = 3,
                          pdpte_tables: int = 16, small_pages: int = 1_024,
                          ) -> dict[str, Any]:
    """The monitor's figures for `ptemu bench` (JSON-able)."""
    leaf = leaf_write_figures(pages, events, rounds)
    small = leaf_write_figures(small_pages, events, rounds)
    replace = [replace_figures(small_pages, pdpte_tables, max(3, rounds)),
               replace_figures(pages, pdpte_tables, max(3, rounds))]
    return {"leaf_write": leaf, "leaf_write_small_space": small, "replace": replace}


def render_monitor(report: dict[str, Any]) -> list[str]:
    """Text lines for `render_text`."""
    leaf, small = report["leaf_write"], report["leaf_write_small_space"]
    lines = ["monitor, whole 4-level space watched (leaf write = MOV to a PTE; median us, "
             + "interleaved with the handler alone):"]
    for row in (small, leaf):
        lines.append(f"  {row['mapped_pages']:>7} pages ({row['protected_pages']} tables "
                     f"protected): monitor {row['monitor_median_us']} us, handler alone "
                     f"{row['handler_median_us']} us, ratio {row['ratio']}x; quiet write "
                     f"(software bit) {row['quiet_median_us']} us, {row['quiet_ratio']}x")
    for block in report["replace"]:
        parts = [f"{row['entry']} over {row['subtree_pages']} pages {row['median_us']} us "
                 f"({row['us_per_page']} us/page)" for row in block["replaces"]]
        lines.append(f"  replace in a space of {block['mapped_pages']} pages: "
                     + ", ".join(parts))
    return lines
