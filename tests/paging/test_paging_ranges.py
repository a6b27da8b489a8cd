"""Which linear range each entry of a page-table page controls."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptemu.errors import UsageError
from ptemu.memory import InMemoryGuestMemory
from ptemu.paging import entry_range, entry_ranges, paging_mode, walk, written_ranges

L4, L5 = paging_mode("4level"), paging_mode("5level")
GIB = 1 << 30


def test_pml4_upper_half_is_sign_extended() -> None:
    root = L4.level(4)
    assert entry_range(L4, root, 0, 0).gla == 0
    assert entry_range(L4, root, 0, 255).gla == 0x0000_7F80_0000_0000
    assert entry_range(L4, root, 0, 256).gla == 0xFFFF_8000_0000_0000
    last = entry_range(L4, root, 0, 511)
    assert last.gla == 0xFFFF_FF80_0000_0000 and last.last_gla == (1 << 64) - 1
    assert last.size == 512 * GIB


def test_pml5_upper_half_is_sign_extended() -> None:
    assert entry_range(L5, L5.level(5), 0, 256).gla == 0xFF00_0000_0000_0000
    assert entry_range(L5, L5.level(5), 0, 1).size == 1 << 48


def test_linux_direct_map_pdpt() -> None:
    # The PDPT under PML4 entry 273 maps from 0xffff888000000000 (Linux's page_offset_base).
    ranges = entry_ranges(L4, L4.level(3), 0xFFFF_8880_0000_0000)
    assert len(ranges) == 512
    assert ranges[3].gla == 0xFFFF_8880_C000_0000 and ranges[3].size == GIB


def test_legacy_and_pae_top_levels() -> None:
    legacy = paging_mode("legacy")
    assert entry_range(legacy, legacy.level(2), 0, 768).gla == 0xC000_0000
    assert entry_range(legacy, legacy.level(2), 0, 768).size == 4 << 20
    pae = paging_mode("pae")
    assert [r.gla for r in entry_ranges(pae, pae.level(3), 0)] == [
        0, 0x4000_0000, 0x8000_0000, 0xC000_0000]


def test_a_16_byte_store_touches_two_ptes() -> None:
    pt = L4.level(1)
    touched = written_ranges(L4, pt, 0x5000, 0xFFFF_8880_0020_0000, 0x5FF0, 16)
    assert [(r.index, r.gla) for r in touched] == [
        (510, 0xFFFF_8880_003F_E000), (511, 0xFFFF_8880_003F_F000)]
    pae = paging_mode("pae")
    half = written_ranges(pae, pae.level(1), 0x5000, 0xC000_0000, 0x5FF4, 4)
    assert [r.index for r in half] == [510]


def test_bad_bases_and_writes_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="not aligned"):
        entry_ranges(L4, L4.level(1), 0x1000)
    with pytest.raises(UsageError, match="not canonical"):
        entry_ranges(L4, L4.level(1), 0x0000_8000_0000_0000)
    with pytest.raises(UsageError, match="out of range"):
        entry_range(L4, L4.level(1), 0, 512)
    with pytest.raises(UsageError, match="not inside"):
        written_ranges(L4, L4.level(1), 0x5000, 0, 0x6000)


@settings(max_examples=100)
@given(st.sampled_from(["legacy", "pae", "4level", "5level"]), st.integers(0, (1 << 64) - 1))
def test_each_walk_step_range_holds_the_address(name: str, raw: int) -> None:
    mode = paging_mode(name)
    gla = mode.canonical(raw)
    # A tree of present tables all at distinct pages, ending in a 4 KiB page.
    memory = InMemoryGuestMemory()
    table = 0x10_0000
    for number, level in enumerate(mode.levels):
        target = 0x10_0000 + (number + 1) * 0x1000
        entry = target | (0x1 if level.name == "PDPTE" and name == "pae" else 0x3)
        memory.write(table + level.index_of(gla) * mode.entry_size,
                     entry.to_bytes(mode.entry_size, "little"))
        table = target
    result = walk(mode, 0x10_0000, gla, memory)
    assert result.gpa == (table | (gla & 0xFFF))
    for step in result.steps:
        r = entry_range(mode, step.level, step.table_gla, step.index)
        assert r.gla <= gla <= r.last_gla
