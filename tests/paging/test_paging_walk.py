"""Walks over small hand-built trees: rights combined across levels (SDM 4.6),
the PAE CR3, stops and their steps, and where each step's table sits."""

from __future__ import annotations

import pytest

from ptemu.errors import UsageError
from ptemu.memory import InMemoryGuestMemory
from ptemu.paging import StopReason, paging_mode, walk

L4 = paging_mode("4level")


def tree_4level(gla: int, flags: tuple[int, int, int, int], frame: int = 0x9_0000_0000
                ) -> InMemoryGuestMemory:
    """PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000 -> `frame`."""
    memory = InMemoryGuestMemory()
    tables = (0x1000, 0x2000, 0x3000, 0x4000)
    targets = (0x2000, 0x3000, 0x4000, frame)
    for table, target, shift, flag in zip(tables, targets, (39, 30, 21, 12), flags):
        memory.write(table + ((gla >> shift) & 511) * 8, (target | flag).to_bytes(8, "little"))
    return memory


GLA = 0x0000_7F12_3456_7ABC


def test_translation_and_steps() -> None:
    result = walk(L4, 0x1000, GLA, tree_4level(GLA, (0x7, 0x7, 0x7, 0x7)))
    assert result.stop is None and result.gpa == 0x9_0000_0ABC and result.page_size == 4096
    assert [s.level.name for s in result.steps] == ["PML4E", "PDPTE", "PDE", "PTE"]
    assert [s.table_gpa for s in result.steps] == [0x1000, 0x2000, 0x3000, 0x4000]
    assert [s.index for s in result.steps] == [
        (GLA >> 39) & 511, (GLA >> 30) & 511, (GLA >> 21) & 511, (GLA >> 12) & 511]
    assert result.steps[0].entry_gpa == 0x1000 + ((GLA >> 39) & 511) * 8
    # Each table maps the region of its level that holds the address.
    assert [s.table_gla for s in result.steps] == [
        0, GLA & ~((1 << 39) - 1), GLA & ~((1 << 30) - 1), GLA & ~((1 << 21) - 1)]
    assert result.leaf is result.steps[-1]


def test_rw_and_us_must_be_set_at_every_level() -> None:
    # PML4E without R/W, everything else R/W U/S (SDM 4.6.1: the AND of all levels).
    result = walk(L4, 0x1000, GLA, tree_4level(GLA, (0x5, 0x7, 0x7, 0x7)))
    p = result.permissions
    assert p is not None
    assert (p.writable, p.user, p.executable) == (False, True, True)
    assert (p.user_read, p.user_write, p.user_execute) == (True, False, True)
    assert p.supervisor_write is False                        # CR0.WP = 1
    no_wp = walk(L4, 0x1000, GLA, tree_4level(GLA, (0x5, 0x7, 0x7, 0x7)), cr0_wp=False)
    assert no_wp.permissions is not None and no_wp.permissions.supervisor_write is True


def test_supervisor_page_denies_user_accesses() -> None:
    result = walk(L4, 0x1000, GLA, tree_4level(GLA, (0x7, 0x3, 0x7, 0x7)))
    p = result.permissions
    assert p is not None and p.user is False
    assert (p.user_read, p.user_write, p.user_execute) == (False, False, False)
    assert (p.supervisor_read, p.supervisor_write) == (True, True)


def test_xd_at_any_level_forbids_fetches() -> None:
    result = walk(L4, 0x1000, GLA, tree_4level(GLA, (0x7, 0x7, 0x7 | 1 << 63, 0x7)))
    assert result.permissions is not None and result.permissions.executable is False
    # With IA32_EFER.NXE = 0 that bit is reserved instead.
    no_nxe = walk(L4, 0x1000, GLA, tree_4level(GLA, (0x7, 0x7, 0x7 | 1 << 63, 0x7)), nxe=False)
    assert no_nxe.stop is StopReason.RESERVED_BIT and len(no_nxe.steps) == 3


def test_smep_and_smap_apply_to_user_pages_only() -> None:
    user = tree_4level(GLA, (0x7, 0x7, 0x7, 0x7))
    p = walk(L4, 0x1000, GLA, user, smep=True, smap=True).permissions
    assert p is not None
    assert (p.supervisor_read, p.supervisor_write, p.supervisor_execute) == (False, False, False)
    p_ac = walk(L4, 0x1000, GLA, user, smap=True, rflags_ac=True).permissions
    assert p_ac is not None and p_ac.supervisor_read and p_ac.supervisor_write
    kernel = tree_4level(GLA, (0x3, 0x3, 0x3, 0x3))
    pk = walk(L4, 0x1000, GLA, kernel, smep=True, smap=True).permissions
    assert pk is not None and pk.supervisor_read and pk.supervisor_execute


def test_not_present_stops_and_keeps_the_steps() -> None:
    result = walk(L4, 0x1000, GLA, tree_4level(GLA, (0x7, 0x7, 0x6, 0x7)))
    assert result.stop is StopReason.NOT_PRESENT and result.fault is StopReason.NOT_PRESENT
    assert len(result.steps) == 3 and result.gpa is None and result.permissions is None
    assert result.leaf is None


def test_non_canonical_reads_nothing() -> None:
    result = walk(L4, 0x1000, 0x0000_8000_0000_0000, InMemoryGuestMemory())
    assert result.stop is StopReason.NON_CANONICAL and result.steps == ()


def test_cr3_flag_bits_are_not_address() -> None:
    # CR3 bits 3 and 4 (PWT, PCD) and bit 63 (no-flush with PCIDE) do not locate the PML4.
    result = walk(L4, 0x8000_0000_0000_1018, GLA, tree_4level(GLA, (0x7, 0x7, 0x7, 0x7)))
    assert result.gpa == 0x9_0000_0ABC


def test_pae_cr3_bits_31_5_locate_the_pdpt() -> None:
    mode = paging_mode("pae")
    gla = 0xC012_3456
    memory = InMemoryGuestMemory()
    pdpt = 0x5060           # 32-byte aligned, not page aligned (SDM Table 4-7)
    memory.write(pdpt + 3 * 8, (0x7000 | 0x1).to_bytes(8, "little"))
    memory.write(0x7000 + ((gla >> 21) & 511) * 8, (0x8000 | 0x7).to_bytes(8, "little"))
    memory.write(0x8000 + ((gla >> 12) & 511) * 8, (0x1_2345_6000 | 0x7).to_bytes(8, "little"))
    result = walk(mode, pdpt | 0x1F, gla, memory)
    assert result.gpa == 0x1_2345_6456
    assert result.steps[0].table_gpa == pdpt and result.steps[0].index == 3
    # The PDPTE has no R/W or U/S: the PDE and PTE decide alone.
    assert result.permissions is not None and result.permissions.user


def test_legacy_4m_page_through_pse36() -> None:
    mode = paging_mode("legacy")
    gla = 0x8123_4567
    memory = InMemoryGuestMemory()
    pde = 0x8000_0000 | (0x12 << 13) | 0x87        # PA 39:32 = 0x12, PS U/S R/W P
    memory.write(0x3000 + (gla >> 22) * 4, pde.to_bytes(4, "little"))
    result = walk(mode, 0x3000, gla, memory)
    assert result.gpa == 0x12_8000_0000 | (gla & 0x3F_FFFF) and result.page_size == 4 << 20
    assert result.permissions is not None and result.permissions.executable  # no XD in 32-bit
    # Without CR4.PSE bit 7 is ignored: the PDE points to a page table at bits 31:12.
    no_pse = walk(mode, 0x3000, gla, memory, pse=False)
    assert no_pse.stop is StopReason.NOT_PRESENT
    assert [s.table_gpa for s in no_pse.steps] == [0x3000, 0x8002_4000]


def test_addresses_out_of_range_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="does not fit"):
        walk(paging_mode("pae"), 0x1000, 1 << 32, InMemoryGuestMemory())
    with pytest.raises(UsageError, match="does not fit"):
        walk(L4, 0x1000, -1, InMemoryGuestMemory())
