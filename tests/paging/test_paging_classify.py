"""`classify` over entry transitions real kernels make, with values worked out by hand.

Linux x86-64 PTE flags used below (arch/x86/include/asm/pgtable_types.h):
_PAGE_PRESENT 0x1, _PAGE_RW 0x2, _PAGE_USER 0x4, _PAGE_PWT 0x8, _PAGE_PCD 0x10,
_PAGE_ACCESSED 0x20, _PAGE_DIRTY 0x40, _PAGE_PSE/_PAGE_PAT 0x80, _PAGE_GLOBAL 0x100,
_PAGE_NX bit 63. The seed's swap-callback filter is introcore's
HOOK_PTS_MONITORED_BITS = P | PS | US | RW | 0x000FFFFFFFFFF000.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ptemu.paging import ChangeKind, classify, paging_mode

MAP, UNMAP, REMAP = ChangeKind.MAP, ChangeKind.UNMAP, ChangeKind.REMAP
PROTECT, CACHE, LARGE = ChangeKind.PROTECT, ChangeKind.CACHE, ChangeKind.LARGE
AD, OTHER = ChangeKind.ACCESSED_DIRTY, ChangeKind.OTHER

L4 = paging_mode("4level")
PAE = paging_mode("pae")
LEGACY = paging_mode("legacy")

USER_PAGE = 0x8000_0001_2345_6067      # NX | frame | D A U/S R/W P (an anonymous page)


def test_map_a_page() -> None:
    c = classify(L4, 1, 0, USER_PAGE)
    assert c.kinds == {MAP} and c.swap_callbacks and c.level == "PTE"
    assert c.describe() == "map (seed swap callbacks fire)"


def test_unmap_a_page() -> None:
    c = classify(L4, 1, USER_PAGE, 0)
    assert c.kinds == {UNMAP} and c.swap_callbacks


def test_unmap_leaving_a_swap_entry() -> None:
    # P cleared, the rest rewritten as a swap entry: still just an unmap.
    assert classify(L4, 1, USER_PAGE, 0x0000_0000_0012_3400).kinds == {UNMAP}


def test_cow_write_protect_clears_rw() -> None:
    # fork(): ptep_set_wrprotect clears _PAGE_RW (a `lock btr` on bit 1).
    c = classify(L4, 1, USER_PAGE, USER_PAGE & ~0x2)
    assert c.kinds == {PROTECT}
    assert c.swap_callbacks     # RW is one of the seed's monitored bits


def test_cow_break_maps_a_new_frame_writable() -> None:
    old = USER_PAGE & ~0x2
    new = 0x8000_0001_5555_5067
    assert classify(L4, 1, old, new).kinds == {REMAP, PROTECT}


def test_cpu_style_set_dirty_is_accessed_dirty_only() -> None:
    c = classify(L4, 1, 0x8000_0001_2345_6025, 0x8000_0001_2345_6065)
    assert c.kinds == {AD} and not c.swap_callbacks


def test_clear_accessed_for_page_aging() -> None:
    # ptep_test_and_clear_young: `lock btr` on bit 5.
    assert classify(L4, 1, USER_PAGE, USER_PAGE & ~0x20).kinds == {AD}


def test_split_2m_page_into_page_table() -> None:
    # A kernel 2 MiB mapping (NX | frame 0x4020_0000 | PS D A R/W P) becomes a PDE
    # that points to a page table at 0x1234_5000 with _KERNPG_TABLE (D A R/W P); NX
    # moves down into the new PTEs, so the PDE loses it.
    old = 0x8000_0000_4020_00E3
    new = 0x0000_0000_1234_5063
    c = classify(L4, 2, old, new)
    assert c.kinds == {LARGE, REMAP, PROTECT}
    assert c.swap_callbacks


def test_split_keeping_nx_off() -> None:
    assert classify(L4, 2, 0x0000_0000_4020_00E3, 0x0000_0000_1234_5063).kinds == {LARGE, REMAP}


def test_change_pat_bit_of_a_pte() -> None:
    # set_memory_wc: PTE bit 7 is PAT.
    c = classify(L4, 1, USER_PAGE, USER_PAGE | 0x80)
    assert c.kinds == {CACHE}
    assert c.swap_callbacks      # the seed reads bit 7 as PS at every level


def test_change_pcd_pwt_of_a_pte() -> None:
    # set_memory_uc: _PAGE_PCD | _PAGE_PWT.
    c = classify(L4, 1, USER_PAGE, USER_PAGE | 0x18)
    assert c.kinds == {CACHE} and not c.swap_callbacks


def test_change_pat_bit_of_a_2m_page() -> None:
    # In a large leaf PAT is bit 12, not a frame bit.
    c = classify(L4, 2, 0x0000_0000_4020_00E3, 0x0000_0000_4020_10E3)
    assert c.kinds == {CACHE}


def test_unknown_level_reports_bit7_both_ways() -> None:
    c = classify(L4, None, USER_PAGE, USER_PAGE | 0x80)
    assert c.kinds == {CACHE, LARGE} and c.level is None
    assert "level unknown" in c.describe()


def test_unknown_level_reads_pte_layout_otherwise() -> None:
    for old, new in ((0, USER_PAGE), (USER_PAGE, USER_PAGE & ~0x2),
                     (0x8000_0001_2345_6025, 0x8000_0001_2345_6065)):
        assert classify(L4, None, old, new).kinds == classify(L4, 1, old, new).kinds


def test_no_change_has_no_kinds() -> None:
    c = classify(L4, 1, USER_PAGE, USER_PAGE)
    assert c.kinds == frozenset() and not c.swap_callbacks
    assert c.describe() == "no change"


def test_not_present_to_not_present_is_other() -> None:
    c = classify(L4, 1, 0x0000_0000_0012_3400, 0x0000_0000_0045_6700)
    assert c.kinds == {OTHER} and not c.swap_callbacks


def test_global_or_software_bit_change_is_other() -> None:
    assert classify(L4, 1, USER_PAGE, USER_PAGE | 0x100).kinds == {OTHER}
    assert classify(L4, 1, USER_PAGE, USER_PAGE | (1 << 58)).kinds == {OTHER}


def test_protection_key_change_is_protect() -> None:
    assert classify(L4, 1, USER_PAGE, USER_PAGE | (0x3 << 59)).kinds == {PROTECT}


def test_accessed_with_another_change_is_not_reported_alone() -> None:
    assert classify(L4, 1, USER_PAGE & ~0x20, (USER_PAGE & ~0x22)).kinds == {PROTECT}
    assert classify(L4, 1, USER_PAGE & ~0x20, USER_PAGE | 0x100).kinds == {OTHER}


def test_pae_two_halves_of_a_map() -> None:
    # native_set_pte on PAE writes the high half, then the low half with P.
    assert classify(PAE, 1, 0, 0x8000_0000_1234_5067).kinds == {MAP}


def test_legacy_32bit_remap() -> None:
    c = classify(LEGACY, 1, 0x1234_5067, 0x5678_9067)
    assert c.kinds == {REMAP} and c.swap_callbacks


def test_legacy_4m_pse36_high_bits_are_frame() -> None:
    # PDE bits 20:13 are PA bits 39:32 of a 4 MiB page (SDM Table 4-4).
    c = classify(LEGACY, 2, 0x0040_0083, 0x0040_2083)
    assert c.kinds == {REMAP}


entries = st.integers(0, (1 << 64) - 1)


@settings(max_examples=200)
@given(entries, entries)
def test_map_and_unmap_mirror_each_other(old: int, new: int) -> None:
    forward = classify(L4, 1, old, new).kinds
    backward = classify(L4, 1, new, old).kinds
    swap = {MAP: UNMAP, UNMAP: MAP}
    assert {swap.get(kind, kind) for kind in forward} == backward


@settings(max_examples=200)
@given(entries, entries)
def test_kinds_empty_exactly_when_nothing_changed(old: int, new: int) -> None:
    assert (classify(L4, None, old, new).kinds == frozenset()) == (old == new)
    assert (classify(L4, 2, old, old).kinds == frozenset())


@settings(max_examples=200)
@given(entries, st.integers(0, 63))
def test_swap_callbacks_follow_the_seed_mask(old: int, bit: int) -> None:
    new = old ^ (1 << bit)
    monitored = bit in (0, 1, 2, 7) or 12 <= bit <= 51
    either_present = bool((old | new) & 1)
    assert classify(L4, 1, old, new).swap_callbacks == (monitored and either_present)
