"""Guest layouts: the page tables the runner builds translate as designed.

Indices are worked out by hand from the SDM's address splits (vol. 3A,
Figures 4-2, 4-5, 4-8, 4-9); the walk is ptemu.paging's.
"""

from __future__ import annotations

import pytest

from ptemu.errors import UsageError
from ptemu.kvm import abi
from ptemu.kvm.layout import A, D, GuestLayout, build_gdt, build_sregs, build_tables
from ptemu.memory import InMemoryGuestMemory
from ptemu.paging.walk import StopReason, walk


def _build(paging: str, bits: int) -> tuple[GuestLayout, InMemoryGuestMemory, int]:
    layout = GuestLayout.create(paging, bits)
    memory = InMemoryGuestMemory()
    build_gdt(layout, memory)
    cr3 = build_tables(layout, memory, code_size=0x1800)
    return layout, memory, cr3


def test_4level_text_walk_indices():
    layout, memory, cr3 = _build("4level", 64)
    result = walk(layout.mode, cr3, 0xFFFFFFFF81001234, memory)
    # 0xffffffff81001234: PML4 511, PDPT 510, PD 8, PT 1, offset 0x234.
    assert [step.index for step in result.steps] == [511, 510, 8, 1]
    assert result.gpa == layout.code_gpa + 0x1234
    assert result.page_size == 0x1000


def test_4level_direct_map_uses_2mib_pages():
    layout, memory, cr3 = _build("4level", 64)
    result = walk(layout.mode, cr3, 0xFFFF888000203FF8, memory)
    # 0xffff888000203ff8: PML4 273, PDPT 0, PD 1 (a 2 MiB page at GPA 0x200000).
    assert [step.index for step in result.steps] == [273, 0, 1]
    assert result.gpa == 0x203FF8
    assert result.page_size == 0x200000


def test_legacy_direct_map_uses_4mib_pse_pages():
    layout, memory, cr3 = _build("legacy", 32)
    result = walk(layout.mode, cr3, 0xC0201004, memory)
    # 0xc0201004: PDE 0x300 maps 4 MiB at GPA 0.
    assert [step.index for step in result.steps] == [0x300]
    assert result.gpa == 0x201004
    assert result.page_size == 0x400000


def test_pae_text_walk():
    layout, memory, cr3 = _build("pae", 32)
    result = walk(layout.mode, cr3, 0xC1000010, memory)
    # 0xc1000010: PDPTE 3, PDE 8, PTE 0.
    assert [step.index for step in result.steps] == [3, 8, 0]
    assert result.gpa == layout.code_gpa + 0x10


@pytest.mark.parametrize(("paging", "bits"), [("legacy", 32), ("pae", 32), ("4level", 64),
                                               ("4level", 32), ("5level", 64)])
def test_window_is_translated_by_the_monitored_pages(paging, bits):
    layout, memory, cr3 = _build(paging, bits)
    for page in range(layout.monitored_pages):
        gla = layout.window + page * layout.mode.level(2).entry_span + 5 * 0x1000
        result = walk(layout.mode, cr3, gla, memory)
        last = result.steps[-1]
        assert last.level.name == "PTE"
        assert last.table_gpa == layout.monitored_gpa + page * 0x1000
        assert last.index == 5
        assert result.stop is StopReason.NOT_PRESENT  # the monitored pages start empty


@pytest.mark.parametrize(("paging", "bits"), [("legacy", 32), ("pae", 32), ("4level", 64),
                                               ("4level", 32), ("5level", 64)])
def test_guest_walks_touch_only_entries_with_accessed_and_dirty_preset(paging, bits):
    layout, memory, cr3 = _build(paging, bits)
    for gla in (layout.text, layout.monitored_gla, layout.gla_of(layout.stack_top_gpa - 8)):
        result = walk(layout.mode, cr3, gla, memory)
        assert result.gpa is not None
        for step in result.steps:
            value = step.entry.value
            assert not layout.is_monitored(step.entry_gpa), "a guest walk reads a monitored page"
            if step.entry.maps_page:
                assert value & (A | D) == A | D
            elif step.level.format.value != "pae-pdpte":
                assert value & A


def test_5level_text_walk_has_a_pml5_level():
    layout, memory, cr3 = _build("5level", 64)
    result = walk(layout.mode, cr3, layout.text, memory)
    assert [step.level.name for step in result.steps] == ["PML5E", "PML4E", "PDPTE", "PDE",
                                                          "PTE"]
    assert result.steps[0].index == 511  # bits 56:48 of 0xffffffff81000000
    assert result.gpa == layout.code_gpa


def test_sregs_per_mode():
    sregs = abi.KvmSregs()
    build_sregs(GuestLayout.create("4level", 64), 0x2000, sregs)
    assert sregs.cr0 & 0x80000001 == 0x80000001          # PG, PE
    assert sregs.cr4 & 0x20 and not sregs.cr4 & 0x1000   # PAE, no LA57
    assert sregs.efer & 0x500 == 0x500                   # LME, LMA
    assert (sregs.cs.l, sregs.cs.db) == (1, 0)
    build_sregs(GuestLayout.create("4level", 32), 0x2000, sregs)
    assert (sregs.cs.l, sregs.cs.db) == (0, 1)           # compatibility mode
    build_sregs(GuestLayout.create("legacy", 32), 0x2000, sregs)
    assert sregs.cr4 & 0x30 == 0x10 and sregs.efer == 0  # PSE, no PAE, no IA-32e
    build_sregs(GuestLayout.create("5level", 64), 0x2000, sregs)
    assert sregs.cr4 & 0x1000                            # LA57
    assert sregs.idt.limit == 0                          # exceptions triple-fault


def test_bad_layout_requests_name_the_problem():
    with pytest.raises(UsageError, match="cannot run 64-bit code"):
        GuestLayout.create("pae", 64)
    with pytest.raises(UsageError, match="unknown paging mode"):
        GuestLayout.create("6level")
    with pytest.raises(UsageError, match="monitored pages"):
        GuestLayout.create("4level", monitored_pages=0)
