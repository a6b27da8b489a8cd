"""What a hostile guest controls in a walk: tables that point at themselves,
at each other in loops, at one page from every level, entries with reserved
bits set and addresses past MAXPHYADDR. The walk must end (one entry a level
at most), never raise, never write, read only the entries the SDM's walk
reads, and say why it stopped; the handler that walks these tables for REP
MOVS must answer with a status."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.memory import InMemoryGuestMemory
from ptemu.paging import StopReason, paging_mode, walk
from ptemu.status import Status
from ptemu.vcpu import Vcpu

PAGES = (0x1000, 0x2000, 0x3000, 0x4000)
"""The guest's paging-structure pages: every entry points to one of them (or
past MAXPHYADDR), so the tree folds onto itself at every level."""
MODES = ("legacy", "pae", "4level", "5level")


class _RecordingMemory(InMemoryGuestMemory):
    """Guest memory that remembers every read and refuses every write."""

    __slots__ = ("reads",)

    def __init__(self, regions: list[tuple[int, bytes]]) -> None:
        super().__init__(regions)
        self.reads: list[tuple[int, int]] = []

    def read(self, gpa: int, size: int) -> bytes:
        self.reads.append((gpa, size))
        return super().read(gpa, size)


@st.composite
def hostile_entry(draw: st.DrawFn, entry_bytes: int) -> int:
    """An entry pointing at one of PAGES, or at a random (often too high)
    address, with any flag bits: P, PS, reserved and NX bits included."""
    if draw(st.booleans()):
        target = draw(st.sampled_from(PAGES))
    else:
        target = draw(st.integers(0, (1 << (8 * entry_bytes)) - 1)) & ~0xFFF
    flags = draw(st.integers(0, 0xFFF))
    high = 0 if entry_bytes == 4 else draw(st.sampled_from((0, 1 << 63, 0xFFF << 52)))
    return (target | flags | high | 1) & ((1 << (8 * entry_bytes)) - 1) \
        if draw(st.integers(0, 9)) else flags & ~1  # mostly present


@st.composite
def hostile_guest(draw: st.DrawFn) -> tuple[str, list[tuple[int, bytes]], int, int]:
    mode_name = draw(st.sampled_from(MODES))
    mode = paging_mode(mode_name)
    size = mode.entry_size
    regions = []
    for page in PAGES:
        # A few random slots per page, plus the slot every walk of `gla` would
        # use (filled by the index drawn below through the generic slots).
        for slot in draw(st.lists(st.integers(0, 4096 // size - 1), max_size=6)):
            regions.append((page + slot * size, draw(hostile_entry(size)).to_bytes(size, "little")))
    gla = draw(st.integers(0, mode.address_limit - 1))
    # Make the walk of `gla` hit programmed entries at every level: every
    # page's slot for each level's index points somewhere hostile.
    for level in mode.levels:
        for page in PAGES:
            regions.append((page + level.index_of(gla) * size,
                            draw(hostile_entry(size)).to_bytes(size, "little")))
    cr3 = draw(st.sampled_from(PAGES)) | draw(st.integers(0, 0xFFF)) & ~0x1F
    return mode_name, regions, mode.canonical(gla) if mode.canonical_sign_bit else gla, cr3


@given(hostile_guest())
def test_a_walk_of_hostile_tables_ends_reads_only_its_entries_and_says_why(
        guest: tuple[str, list[tuple[int, bytes]], int, int]) -> None:
    mode_name, regions, gla, cr3 = guest
    mode = paging_mode(mode_name)
    memory = _RecordingMemory(regions)
    before = memory.copy()
    result = walk(mode, cr3, gla, memory)
    assert memory == before                                  # never writes
    assert len(result.steps) <= len(mode.levels)             # one entry a level
    assert memory.reads == [(step.entry_gpa, mode.entry_size) for step in result.steps]
    if result.stop is StopReason.NON_CANONICAL:
        assert result.steps == ()
    elif result.gpa is None:
        last = result.steps[-1].entry
        assert result.stop in (StopReason.NOT_PRESENT, StopReason.RESERVED_BIT)
        assert (result.stop is StopReason.NOT_PRESENT) == (not last.present)
    else:
        assert result.page_size is not None and result.leaf is not None
        assert result.leaf.entry.maps_page and not result.leaf.entry.reserved_bits
        assert result.gpa < 1 << mode.maxphyaddr             # past MAXPHYADDR is reserved
    for upper, lower in zip(result.steps, result.steps[1:]):
        assert upper.entry.present and not upper.entry.maps_page
        assert lower.table_gpa == upper.entry.address         # where the CPU reads next


@given(hostile_guest(), st.integers(0, 0xFFF))
def test_rep_movs_through_hostile_tables_answers_with_a_status(
        guest: tuple[str, list[tuple[int, bytes]], int, int], source_offset: int) -> None:
    """The handler walks the guest's tables to find a MOVS source: whatever
    they hold, the answer is a status and a refused event changes nothing."""
    mode_name, regions, source_gla, cr3 = guest
    mode = paging_mode(mode_name)
    memory = InMemoryGuestMemory(regions)
    handler = PtWriteHandler(memory, mode)
    before = memory.copy()
    code_bits = 64 if mode_name in ("4level", "5level") else 32
    destination_gla = 0x7000 if code_bits == 32 else 0xFFFF_8880_0000_7000
    code = bytes.fromhex("f3 48 a5" if code_bits == 64 else "f3 a5")  # rep movs{q,d}
    regs = {"rip": 0x40_0000, "rsi": (source_gla & ~0xFFF) | (source_offset & ~7),
            "rdi": destination_gla, "rcx": 4, "cr3": cr3}
    result = handler.handle_ept_write(Vcpu(), WriteEvent(
        gpa=0x7000, gla=destination_gla, regs=regs, code=code, code_bits=code_bits))
    assert isinstance(result.status, Status)
    if result.status is not Status.EMULATED:
        assert memory == before and handler.pending() == ()
