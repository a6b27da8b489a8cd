"""The shipped own-hierarchy traces (tools/corpus/ptemu_corpus/own_hierarchy.py):
their events' CR3 really is the hierarchy the code runs under.

The builder captures the code on the capture's own root and then names the
hierarchy's root (0x1000) as every event's CR3, on the ground that the two roots
agree on everything the code touches. Checked here with a walker written out
from the SDM (vol. 3, 4.4.2 and 4.5.4; not `ptemu.paging`) over the fixture's
memory: under CR3 0x1000 every event's GLA translates to the event's GPA, writable, and
every RIP to a present, executable page, and all of them lie in the kernel half,
while the code edits only the user half.
"""

from __future__ import annotations

from typing import Any

import pytest

from ptemu.fixtures import corpus_path, load_fixture
from ptemu.memory import InMemoryGuestMemory

ADDRESS = (1 << 52) - 1 & ~0xFFF
"""Bits 51:12 of an entry: the next table or the page frame."""
LEVELS = {"4level": (39, 30, 21, 12), "pae": (30, 21, 12)}
"""Lowest linear-address bit of each level's index, root first."""
NX = 1 << 63


def _walk(paging: str, memory: InMemoryGuestMemory, cr3: int, gla: int,
          ) -> tuple[int, bool, bool]:
    """(GPA, writable, executable) of `gla` (R/W at every level, XD at none; a
    PAE PDPTE has neither bit); AssertionError when it does not translate."""
    table = cr3 & ~0x1F if paging == "pae" else cr3 & ADDRESS
    writable = executable = True
    for depth, shift in enumerate(LEVELS[paging]):
        bits = 2 if paging == "pae" and depth == 0 else 9
        index = (gla >> shift) & ((1 << bits) - 1)
        entry = int.from_bytes(memory.read(table + 8 * index, 8), "little")
        assert entry & 1, f"{gla:#x}: not present at the level of bit {shift}"
        is_pdpte = paging == "pae" and depth == 0
        if not is_pdpte:
            executable = executable and not entry & NX
            writable = writable and bool(entry & 0x2)
        leaf = shift == 12 or (not is_pdpte and shift in (21, 30) and entry & 0x80)
        if leaf:
            size = 1 << shift
            return (entry & ADDRESS & ~(size - 1)) | (gla & (size - 1)), writable, executable
        table = entry & ADDRESS
    raise AssertionError("unreachable")


@pytest.mark.parametrize(("paging", "kernel_half"), [("4level", 0xFFFF_8000_0000_0000),
                                                     ("pae", 0xC000_0000)])
def test_the_events_translate_through_the_hierarchy_they_name(paging: str,
                                                              kernel_half: int) -> None:
    fixture = load_fixture(corpus_path() / paging / "monitor-own-hierarchy.json")
    memory = InMemoryGuestMemory(fixture.memory_regions)
    assert fixture.events
    for event in fixture.events:
        regs: dict[str, Any] = dict(event.regs)
        assert regs["cr3"] == 0x1000
        assert event.gla >= kernel_half and regs["rip"] >= kernel_half
        gpa, writable, _ = _walk(paging, memory, 0x1000, event.gla)
        assert (gpa, writable) == (event.gpa, True)
        rip_gpa, _, executable = _walk(paging, memory, 0x1000, regs["rip"])
        assert executable and memory.read(rip_gpa, 1) == event.code[:1]
