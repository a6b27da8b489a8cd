"""`TranslationMonitor` on hand-built hierarchies, expectations computed by hand.

Layout used by most tests (4-level): CR3 = 0x1000 (PML4), PDPT 0x2000, PD
0x3000, PT 0x4000, so linear 0 walks PML4[0] -> PDPT[0] -> PD[0] -> PT[0].
"""

from __future__ import annotations

import pytest
from monitor_guest import NX, PAT_LARGE, PS, RW, US, A, D, Guest, P

from ptemu.errors import UsageError
from ptemu.handler import WriteEvent
from ptemu.memory import InMemoryGuestMemory
from ptemu.monitor import (
    InMemoryProtector,
    MonitorStatus,
    Translation,
    TranslationMonitor,
    Unfollowed,
)
from ptemu.monitor.runs import append_run, diff, union
from ptemu.vcpu import Vcpu

KiB4, MiB2, GiB1, GiB512 = 1 << 12, 1 << 21, 1 << 30, 1 << 39
TABLE = P | RW | US


def t(frame: int, size: int = KiB4, *, writable: bool = True, user: bool = True,
      executable: bool = True, pk: int | None = 0, pat: bool = False) -> Translation:
    return Translation(frame=frame, page_size=size, writable=writable, user=user,
                       executable=executable, protection_key=pk, pwt=False, pcd=False,
                       pat=pat)


def four_level(**options: object) -> Guest:
    guest = Guest("4level", **options)
    guest.put(0x1000, 0x2000 | TABLE)
    guest.put(0x2000, 0x3000 | TABLE)
    guest.put(0x3000, 0x4000 | TABLE)
    guest.put(0x4000, 0x10_0000 | TABLE)          # linear 0 -> gpa 0x100000
    return guest


# -- runs ---------------------------------------------------------------------------


def test_append_run_merges_affine_runs_of_the_same_size_only():
    runs = []
    append_run(runs, 0, 0x1000, t(0x5000))
    append_run(runs, 0x1000, 0x2000, t(0x6000))        # frame continues: merged
    append_run(runs, 0x2000, 0x3000, t(0x9000))        # jumps: new run
    append_run(runs, 0x3000, 0x4000, None)
    append_run(runs, 0x4000, 0x5000, None)             # nothing continues nothing
    assert runs == [(0, 0x2000, t(0x5000)), (0x2000, 0x3000, t(0x9000)),
                    (0x3000, 0x5000, None)]


def test_diff_ignores_page_size_and_finds_maximal_changed_ranges():
    old = [(0, MiB2, t(0x20_0000, MiB2))]
    new = [(0, 0x1000, t(0x20_0000)), (0x1000, 0x2000, t(0x77_0000)),
           (0x2000, MiB2, t(0x20_2000))]
    assert diff(old, new) == [(0x1000, 0x2000, [(0x1000, 0x2000, t(0x20_1000, MiB2))],
                               [(0x1000, 0x2000, t(0x77_0000))])]


def test_union_merges_overlapping_and_touching_intervals():
    assert union([(5, 9), (0, 2), (2, 3), (8, 12), (20, 20)]) == [(0, 3), (5, 12)]


# -- protection --------------------------------------------------------------------


def test_in_memory_protector_refuses_double_protect_and_stray_unprotect():
    protector = InMemoryProtector()
    protector.protect(0x1000)
    with pytest.raises(UsageError, match="already protected"):
        protector.protect(0x1000)
    with pytest.raises(UsageError, match="not protected"):
        protector.unprotect(0x2000)
    with pytest.raises(UsageError, match="page-aligned"):
        protector.protect(0x1008)
    assert protector.log == [("protect", 0x1000)]


# -- watching and protecting ----------------------------------------------------------


def test_a_watch_protects_exactly_the_tables_its_range_reaches():
    guest = four_level()
    guest.put(0x1000 + 8 * 5, 0x9000 | TABLE)        # PML4[5]: outside the watch
    guest.monitor.watch(0x1000, 0, KiB4)
    assert guest.protector.protected == {0x1000, 0x2000, 0x3000, 0x4000}
    assert guest.monitor.translation(0x1000, 0) == t(0x10_0000)
    assert guest.monitor.table_levels == {0x1000: 4, 0x2000: 3, 0x3000: 2, 0x4000: 1}


def test_cr3_control_bits_do_not_change_the_space():
    guest = four_level()
    handle = guest.monitor.watch(0x1000 | 0x18 | (1 << 63), 0, KiB4)   # PWT|PCD, no-flush
    assert handle.cr3 == 0x1000


def test_leaf_write_reports_one_4k_change_with_its_cause():
    guest = four_level()
    guest.monitor.watch_space(0x1000, ranges="user")
    [result] = guest.write(0x4000 + 8, 0x55_5000 | P | US)           # PT[1], read-only
    [change] = result.changes
    assert (change.cr3, change.start, change.end) == (0x1000, 0x1000, 0x2000)
    assert change.old_at(0x1000) is None
    assert change.new_at(0x1000) == t(0x55_5000, writable=False)
    assert [(c.gpa, c.level, c.level_name, c.old, c.new) for c in change.cause] == [
        (0x4008, 1, "PTE", 0, 0x55_5000 | P | US)]
    assert not change.partial and not change.at_cr3_load
    assert result.event is not None and result.event.entries[0].level == 1


def test_unwatch_unprotects_what_no_other_watch_reaches():
    guest = four_level()
    first = guest.monitor.watch(0x1000, 0, KiB4)
    second = guest.monitor.watch(0x1000, 0x1000, KiB4)
    guest.monitor.unwatch(first)
    assert guest.protector.protected == {0x1000, 0x2000, 0x3000, 0x4000}
    guest.monitor.unwatch(second)
    assert guest.protector.protected == set()
    with pytest.raises(UsageError, match="not active"):
        guest.monitor.unwatch(second)


def test_event_on_a_page_the_monitor_does_not_protect_changes_nothing():
    guest = four_level()
    guest.monitor.watch(0x1000, 0, KiB4)
    event = WriteEvent(gpa=0x8000, gla=0xFFFF_8880_0000_8000,
                       regs={"rip": 0x1000, "rdi": 0xFFFF_8880_0000_8000, "rax": 7},
                       code=b"\x48\x89\x07", code_bits=64)
    before = guest.memory.copy()
    result = guest.monitor.handle_ept_write(Vcpu(), event)
    assert result.status is MonitorStatus.NOT_PROTECTED and result.event is None
    assert guest.memory == before


# -- upper levels, large pages, splits ------------------------------------------------


def test_dropping_a_pml4e_that_maps_512_gib_in_one_run_is_one_change():
    guest = Guest("4level")
    guest.put(0x1000, 0x2000 | TABLE)
    for i in range(512):                              # 512 x 1 GiB, frames consecutive
        guest.put(0x2000 + 8 * i, (GiB512 + i * GiB1) | PS | TABLE)
    guest.monitor.watch_space(0x1000, ranges="user")
    [result] = guest.write(0x1000, 0, "xchg")
    [change] = result.changes
    assert (change.start, change.end) == (0, GiB512)
    assert [(r.start, r.end) for r in change.old] == [(0, GiB512)]
    assert change.old[0].translation == t(GiB512, GiB1)
    assert [(r.start, r.end, r.translation) for r in change.new] == [(0, GiB512, None)]
    assert result.unprotected == (0x2000,)


def test_dropping_a_sparse_pml4e_reports_each_changed_range_and_releases_its_subtree():
    guest = four_level()
    guest.put(0x4000 + 8 * 9, 0x70_0000 | TABLE)     # a second, non-contiguous page
    guest.monitor.watch_space(0x1000, ranges="user")
    [result] = guest.write(0x1000, 0, "xchg")
    # Pages 1..8 translate to nothing before and after: not a change.
    assert [(c.start, c.end) for c in result.changes] == [(0, 0x1000), (0x9000, 0xA000)]
    assert result.changes[0].old_at(0) == t(0x10_0000)
    assert result.changes[1].old_at(0x9000) == t(0x70_0000)
    assert all(c.new_at(c.start) is None for c in result.changes)
    assert set(result.unprotected) == {0x2000, 0x3000, 0x4000}
    assert guest.protector.protected == {0x1000}


def test_splitting_a_2mib_page_into_same_frame_ptes_reports_nothing():
    guest = Guest("4level")
    guest.put(0x1000, 0x2000 | TABLE)
    guest.put(0x2000, 0x3000 | TABLE)
    guest.put(0x3000, 0x4000_0000 | PS | TABLE | NX)          # PD[0]: 2 MiB, no execute
    for i in range(512):                                      # the new PT, built unprotected
        guest.put(0x5000 + 8 * i, (0x4000_0000 + i * KiB4) | TABLE | NX)
    guest.monitor.watch_space(0x1000, ranges="user")
    [split] = guest.write(0x3000, 0x5000 | TABLE, "cmpxchg")   # PDE -> PT
    assert split.changes == () and split.protected == (0x5000,)
    assert guest.monitor.translation(0x1000, 0x1F_F000) == t(0x401F_F000, executable=False)
    [merge] = guest.write(0x3000, 0x4000_0000 | PS | TABLE | NX, "xchg")
    assert merge.changes == () and merge.unprotected == (0x5000,)


def test_split_with_one_pte_different_reports_only_that_page():
    guest = Guest("4level")
    guest.put(0x1000, 0x2000 | TABLE)
    guest.put(0x2000, 0x4000_0000 | PS | TABLE)               # PDPT[0]: 1 GiB page
    for i in range(512):
        guest.put(0x5000 + 8 * i, (0x4000_0000 + i * MiB2) | PS | TABLE)
    guest.put(0x5000 + 8 * 3, (0x4000_0000 + 3 * MiB2) | PS | P | US)   # read-only
    guest.monitor.watch_space(0x1000)
    [result] = guest.write(0x2000, 0x5000 | TABLE)
    [change] = result.changes
    assert (change.start, change.end) == (3 * MiB2, 4 * MiB2)
    assert change.old_at(3 * MiB2) == t(0x4000_0000 + 3 * MiB2, GiB1)
    assert change.new_at(3 * MiB2) == t(0x4000_0000 + 3 * MiB2, MiB2, writable=False)


def test_large_page_attributes_pat_is_bit_12_and_rights_combine_over_levels():
    guest = Guest("4level")
    guest.put(0x1000, 0x2000 | P | US)                        # PML4E read-only
    guest.put(0x2000, 0x3000 | TABLE)
    guest.put(0x3000, 0x8000_0000 | PS | PAT_LARGE | TABLE | (5 << 59))
    guest.monitor.watch(0x1000, 0, MiB2)
    assert guest.monitor.translation(0x1000, 0x1234) == Translation(
        frame=0x8000_0000 + 0x1000, page_size=MiB2, writable=False, user=True,
        executable=True, protection_key=5, pwt=False, pcd=False, pat=True)


def test_replacing_an_upper_entry_with_the_same_table_and_rights_costs_no_walk():
    guest = four_level()
    guest.monitor.watch_space(0x1000, ranges="user")
    [result] = guest.write(0x2000, 0x3000 | TABLE | A, "bts")   # only A set
    assert result.changes == () and result.protected == () and result.unprotected == ()


# -- sharing and self-reference -------------------------------------------------------


def test_a_kernel_table_shared_by_two_spaces_is_protected_once_and_reported_per_space():
    guest = four_level()
    guest.put(0x1000 + 8 * 511, 0x6000 | TABLE)       # kernel PDPT shared by both PML4s
    guest.put(0x9000 + 8 * 511, 0x6000 | TABLE)
    guest.put(0x6000, 0x4000_0000 | PS | P | RW)      # 1 GiB kernel page
    seen: list[tuple[int, int]] = []
    first = guest.monitor.watch_space(0x1000, lambda c: seen.append((c.cr3, c.start)),
                                      ranges="kernel")
    guest.monitor.watch_space(0x9000, lambda c: seen.append((c.cr3, c.start)),
                              ranges="kernel")
    assert guest.protector.protected == {0x1000, 0x9000, 0x6000}
    [result] = guest.write(0x6000, 0)
    kernel = 0xFFFF_FF80_0000_0000
    assert sorted((c.cr3, c.start, c.end) for c in result.changes) == [
        (0x1000, kernel, kernel + GiB1), (0x9000, kernel, kernel + GiB1)]
    assert sorted(seen) == [(0x1000, kernel), (0x9000, kernel)]
    guest.monitor.unwatch(first)
    assert guest.protector.protected == {0x9000, 0x6000}


def test_a_table_linked_twice_stays_protected_until_both_links_go():
    guest = four_level()
    guest.put(0x3000 + 8, 0x4000 | TABLE)              # PD[1] -> the same PT
    guest.monitor.watch_space(0x1000, ranges="user")
    [result] = guest.write(0x4000, 0x20_0000 | TABLE)
    assert sorted((c.start, c.end) for c in result.changes) == [(0, KiB4), (MiB2, MiB2 + KiB4)]
    guest.write(0x3000, 0)
    assert 0x4000 in guest.protector.protected
    [last] = guest.write(0x3000 + 8, 0)
    assert last.unprotected == (0x4000,)


def test_self_map_entry_is_not_followed_and_does_not_loop():
    guest = four_level()
    guest.put(0x1000 + 8 * 0x1ED, 0x1000 | P | RW)    # Windows' self-map PML4E
    guest.monitor.watch_space(0x1000)
    selfmap = 0xFFFF_F680_0000_0000
    assert guest.monitor.translation(0x1000, selfmap) == Unfollowed("self-reference")
    assert guest.monitor.translation(0x1000, 0) == t(0x10_0000)
    assert guest.protector.protected == {0x1000, 0x2000, 0x3000, 0x4000}
    assert guest.monitor.table_levels[0x1000] == 4
    [result] = guest.write(0x1000 + 8 * 0x1ED, 0)      # drop the self-map
    [change] = result.changes
    assert (change.start, change.end) == (selfmap, selfmap + GiB512)
    assert change.old_at(selfmap) == Unfollowed("self-reference")
    assert change.new_at(selfmap) is None


def test_table_budget_leaves_further_tables_unfollowed():
    guest = four_level(max_tables=3)
    guest.monitor.watch(0x1000, 0, KiB4)
    assert guest.protector.protected == {0x1000, 0x2000, 0x3000}
    assert guest.monitor.translation(0x1000, 0) == Unfollowed("table budget")


# -- timing: partial writes --------------------------------------------------------------


def test_a_lone_high_half_clearing_nx_on_a_present_pae_entry_is_reported_at_once():
    for timing, expected in (("cpu", 1), ("seed", 0)):
        guest = Guest("pae", timing=timing)
        guest.put(0x1020, 0x2000 | P)                         # PDPT at CR3 0x1020
        guest.put(0x2000, 0x3000 | TABLE)
        guest.put(0x3000, 0x12_3000 | TABLE | NX)
        guest.monitor.watch(0x1020, 0, KiB4)
        assert guest.protector.protected == {0x1000, 0x2000, 0x3000}
        [high] = guest.write(0x3000, 0x12_3000 | TABLE, "high")  # a lone 4-byte store
        assert len(high.changes) == expected
        if expected:
            [change] = high.changes
            assert change.partial and change.cause[0].partial
            assert change.new_at(0) == t(0x12_3000, pk=None)
            assert change.old_at(0) == t(0x12_3000, pk=None, executable=False)
        assert guest.monitor.handler.pending() == (0x3000,)


def test_a_one_byte_store_setting_rw_on_a_present_entry_reports_at_once_partial():
    guest = four_level()
    guest.put(0x4000, 0x10_0000 | P | US)
    guest.monitor.watch(0x1000, 0, KiB4)
    [result] = guest.write(0x4000, 0x10_0000 | P | US | RW, "byte")
    [change] = result.changes
    assert change.partial
    assert change.old_at(0) == t(0x10_0000, writable=False)
    assert change.new_at(0) == t(0x10_0000)


def test_seed_timing_reports_the_one_byte_store_only_when_the_entry_completes():
    guest = four_level(timing="seed")
    guest.put(0x4000, 0x10_0000 | P | US)
    guest.monitor.watch(0x1000, 0, KiB4)
    [result] = guest.write(0x4000, 0x10_0000 | P | US | RW, "byte")
    assert result.changes == ()
    assert guest.monitor.translation(0x1000, 0) == t(0x10_0000, writable=False)
    flushed = guest.monitor.flush(0x4000)
    [change] = flushed.changes
    assert not change.partial and change.new_at(0) == t(0x10_0000)


def test_a_partial_write_to_an_entry_that_stays_not_present_reports_nothing():
    guest = four_level()
    guest.monitor.watch_space(0x1000, ranges="user")
    results = guest.write(0x4000 + 8, 0x77_7000 | RW, "byte")   # 3 one-byte stores, P stays 0
    assert len(results) == 3
    assert all(result.changes == () for result in results)
    assert guest.monitor.handler.pending() == (0x4008,)


def test_a_table_linked_by_a_partial_write_is_protected_at_once_under_cpu_timing():
    for timing, protected in (("cpu", (0x8000,)), ("seed", ())):
        guest = Guest("pae", timing=timing)
        guest.put(0x1000, 0x2000 | P)
        guest.put(0x2000, 0x3000 | TABLE)
        guest.put(0x2000 + 8, 0x9000 | TABLE | NX)      # PDE 1, replaced low half first
        guest.monitor.watch(0x1000, 0, 2 * MiB2)
        assert guest.protector.protected == {0x1000, 0x2000, 0x3000, 0x9000}
        low, _high = guest.write(0x2000 + 8, 0x8000 | TABLE, "halves")
        assert low.protected == protected
        assert low.unprotected == tuple(0x9000 for _ in protected)
        assert guest.protector.protected == {0x1000, 0x2000, 0x3000, 0x8000}


# -- PAE PDPTEs, legacy, 5-level ------------------------------------------------------------


def test_pae_pdpte_write_is_reported_as_taking_effect_at_cr3_load():
    guest = Guest("pae")
    guest.put(0x1020, 0x2000 | P)
    guest.put(0x1020 + 8, 0)
    guest.put(0x4000, 0x20_0000 | PS | TABLE)         # PD for PDPTE 1, not linked yet
    guest.monitor.watch_space(0x1020)
    [result] = guest.write(0x1028, 0x4000 | P, "cmpxchg8b")
    [change] = result.changes
    assert change.at_cr3_load
    assert (change.start, change.end) == (GiB1, GiB1 + MiB2)
    assert change.new_at(GiB1) == t(0x20_0000, MiB2, pk=None)
    assert result.protected == (0x4000,)
    assert guest.monitor.table_levels[0x1000] == 3


def pae_with_two_directories(**options: object) -> Guest:
    """PAE: PDPT 0x1000, PDPTE 0 -> PD 0x2000 -> PT 0x3000 (linear 0 -> 0x100000);
    PD 0x4000 (entry 0 a 2 MiB page at 0x400000) is not linked yet."""
    guest = Guest("pae", **options)
    guest.put(0x1000, 0x2000 | P)
    guest.put(0x2000, 0x3000 | TABLE)
    guest.put(0x3000, 0x10_0000 | TABLE)
    guest.put(0x4000, 0x40_0000 | PS | TABLE)
    guest.monitor.watch_space(0x1000)
    assert guest.protector.protected == {0x1000, 0x2000, 0x3000}
    return guest


def test_pae_tables_under_the_loaded_pdpte_stay_protected_until_cr3_load():
    guest = pae_with_two_directories()
    [result] = guest.write(0x1000, 0x4000 | P, "cmpxchg8b")
    [change] = result.changes
    assert change.at_cr3_load and not change.until_cr3_load
    assert change.old_at(0) == t(0x10_0000, pk=None) and change.new_at(0) == t(
        0x40_0000, MiB2, pk=None)
    # The CPU still walks PD 0x2000 and PT 0x3000 through the PDPTE it loaded.
    assert result.protected == (0x4000,) and result.unprotected == ()
    assert guest.protector.protected == {0x1000, 0x2000, 0x3000, 0x4000}
    assert guest.monitor.translation(0x1000, 0) == t(0x40_0000, MiB2, pk=None)  # memory
    # A write there exits, and is reported as holding until the next CR3 load.
    [result] = guest.write(0x3000, 0x20_0000 | TABLE, "cmpxchg8b")
    [change] = result.changes
    assert change.until_cr3_load and not change.at_cr3_load
    assert (change.start, change.end) == (0, KiB4)
    assert change.old_at(0) == t(0x10_0000, pk=None)
    assert change.new_at(0) == t(0x20_0000, pk=None)
    assert guest.monitor.translation(0x1000, 0) == t(0x40_0000, MiB2, pk=None)  # unchanged
    # The CR3 load: the CPU uses memory's PDPTEs; no translation changes.
    result = guest.monitor.cr3_loaded(0x1000 | 0x18)      # CR3's low bits are ignored
    assert result.changes == () and sorted(result.unprotected) == [0x2000, 0x3000]
    assert guest.protector.protected == {0x1000, 0x4000}
    assert guest.write(0x3000, 0, "cmpxchg8b") == []      # no longer exits
    assert guest.monitor.cr3_loaded(0x1000).unprotected == ()


def test_pae_pdpte_written_back_to_what_the_cpu_loaded_releases_nothing_twice():
    guest = pae_with_two_directories()
    guest.write(0x1000, 0x4000 | P, "cmpxchg8b")
    # Back to PD 0x2000: the view and the loaded PDPTE agree again; PD 0x4000 was
    # never loaded, so it goes at once.
    [result] = guest.write(0x1000, 0x2000 | P, "cmpxchg8b")
    assert result.unprotected == (0x4000,)
    assert guest.protector.protected == {0x1000, 0x2000, 0x3000}
    [result] = guest.write(0x3000, 0x20_0000 | TABLE, "cmpxchg8b")
    [change] = result.changes
    assert not change.until_cr3_load                       # one report, the view's
    assert guest.monitor.cr3_loaded(0x1000).unprotected == ()


def test_pae_only_the_loaded_directory_is_retained_not_one_linked_in_between():
    guest = pae_with_two_directories()
    guest.put(0x5000, 0)                                   # a third, empty PD
    guest.write(0x1000, 0x4000 | P, "cmpxchg8b")
    [result] = guest.write(0x1000, 0x5000 | P, "cmpxchg8b")
    assert result.protected == (0x5000,) and result.unprotected == (0x4000,)
    assert guest.protector.protected == {0x1000, 0x2000, 0x3000, 0x5000}


def test_pae_retention_off_unprotects_at_the_pdpte_write():
    guest = pae_with_two_directories(retain_loaded_pdptes=False)
    [result] = guest.write(0x1000, 0x4000 | P, "cmpxchg8b")
    assert sorted(result.unprotected) == [0x2000, 0x3000]
    assert guest.write(0x3000, 0, "cmpxchg8b") == []


def test_pae_retained_tables_follow_watch_changes_and_go_with_the_last_watch():
    guest = pae_with_two_directories()
    monitor = guest.monitor
    [first] = monitor.watched()[0x1000]
    guest.write(0x1000, 0x4000 | P, "cmpxchg8b")
    second = monitor.watch(0x1000, 0, KiB4)                # rebuilds the space
    assert guest.protector.protected == {0x1000, 0x2000, 0x3000, 0x4000}
    monitor.unwatch(first)                                 # only linear page 0 now
    assert guest.protector.protected == {0x1000, 0x2000, 0x3000, 0x4000}
    [result] = guest.write(0x3000, 0x20_0000 | TABLE, "cmpxchg8b")
    assert [c.until_cr3_load for c in result.changes] == [True]
    monitor.unwatch(second)
    assert guest.protector.protected == set()


def test_cr3_loaded_outside_pae_or_for_an_unwatched_space_does_nothing():
    guest = four_level()
    guest.monitor.watch_space(0x1000)
    before = set(guest.protector.protected)
    result = guest.monitor.cr3_loaded(0x1000)
    assert result.changes == () and result.unprotected == () and result.protected == ()
    assert guest.monitor.cr3_loaded(0x9000).unprotected == ()
    assert guest.protector.protected == before
    for bad in (-1, 1 << 64, "0x1000", True):
        with pytest.raises(UsageError, match="64-bit"):
            guest.monitor.cr3_loaded(bad)


def test_pae_pdpte_with_rw_set_is_reserved_and_translates_nothing():
    guest = Guest("pae")
    guest.put(0x1000, 0x2000 | P | RW)                # RW is reserved in a PDPTE
    guest.put(0x2000, 0x20_0000 | PS | TABLE)
    guest.monitor.watch(0x1000, 0, KiB4)
    assert guest.protector.protected == {0x1000}
    assert guest.monitor.translation(0x1000, 0) is None


def test_legacy_4mib_page_with_pse():
    guest = Guest("legacy")
    guest.put(0x1000 + 4 * 3, 0x0080_0000 | PS | TABLE)
    guest.monitor.watch(0x1000, 3 << 22, 1 << 22)
    assert guest.monitor.translation(0x1000, (3 << 22) + 0x5000) == t(
        0x0080_5000, 1 << 22, pk=None)
    [result] = guest.write(0x1000 + 4 * 3, 0x0080_0000 | PS | P | US, "btr")
    [change] = result.changes
    assert (change.start, change.end) == (3 << 22, 4 << 22)


def test_legacy_without_pse_reads_bit_7_as_ignored_and_follows_a_table():
    guest = Guest("legacy", pse=False)
    guest.put(0x1000, 0x5000 | PS | TABLE)
    guest.put(0x5000, 0x9000 | TABLE)
    guest.monitor.watch(0x1000, 0, KiB4)
    assert guest.protector.protected == {0x1000, 0x5000}
    assert guest.monitor.translation(0x1000, 0) == t(0x9000, pk=None)


def test_5level_watch_reaches_five_tables():
    guest = Guest("5level")
    for table, child in ((0x1000, 0x2000), (0x2000, 0x3000), (0x3000, 0x4000),
                         (0x4000, 0x5000), (0x5000, 0xAB_C000)):
        guest.put(table, child | TABLE)
    guest.monitor.watch(0x1000, 0, KiB4)
    assert guest.protector.protected == {0x1000, 0x2000, 0x3000, 0x4000, 0x5000}
    assert guest.monitor.table_levels[0x1000] == 5
    assert guest.monitor.translation(0x1000, 0) == t(0xAB_C000)


# -- accessed/dirty, free-and-reuse, callbacks, usage errors --------------------------------


def test_accessed_dirty_alone_report_nothing_unless_asked():
    for report, expected in ((False, 0), (True, 1)):
        guest = four_level(report_accessed_dirty=report)
        guest.monitor.watch(0x1000, 0, KiB4)
        [result] = guest.write(0x4000, 0x10_0000 | TABLE | A | D, "or")
        assert len(result.changes) == expected


def test_a_freed_table_reused_as_data_no_longer_exits():
    guest = four_level()
    guest.monitor.watch_space(0x1000, ranges="user")
    [unlink] = guest.write(0x3000, 0)
    assert unlink.unprotected == (0x4000,)
    assert guest.write(0x4000, 0xDEAD_BEEF) == []     # plain memory write, no event
    assert guest.monitor.translation(0x1000, 0) is None


def test_callbacks_get_changes_clipped_to_their_own_range():
    guest = four_level()
    guest.put(0x3000, 0x4000_0000 | PS | TABLE)        # PD[0]: 2 MiB page
    got: list[tuple[int, int]] = []
    guest.monitor.watch(0x1000, 0x3000, 0x2000, lambda c: got.append((c.start, c.end)))
    guest.monitor.watch(0x1000, 0x10_0000, 0x1000)
    [result] = guest.write(0x3000, 0)
    assert got == [(0x3000, 0x5000)]
    assert [(c.start, c.end) for c in result.changes] == [(0x3000, 0x5000),
                                                          (0x10_0000, 0x10_1000)]


def test_usage_errors_name_the_problem():
    memory = InMemoryGuestMemory()
    with pytest.raises(UsageError, match="timing"):
        TranslationMonitor(memory, "4level", InMemoryProtector(), timing="late")
    monitor = TranslationMonitor(memory, "4level", InMemoryProtector())
    with pytest.raises(UsageError, match="canonical"):
        monitor.watch(0x1000, 0x0000_8000_0000_0000, 0x1000)
    with pytest.raises(UsageError, match="crosses"):
        monitor.watch(0x1000, 0x0000_7FFF_FFFF_F000, 0x2000)
    with pytest.raises(UsageError, match="empty"):
        monitor.watch(0x1000, 0, 0)
    with pytest.raises(UsageError, match="no watch"):
        monitor.translation(0x5000, 0)
    with pytest.raises(UsageError, match="space range"):
        monitor.watch_space(0x1000, ranges="half")


# -- writes that change nothing the CPU translates (one mask per level) --------------------


def _insignificant(paging: str, level_index: int, **options: bool) -> int:
    from ptemu.monitor.codec import codecs
    from ptemu.paging import paging_mode
    mode = paging_mode(paging)
    codec = codecs(mode, nxe=options.get("nxe", True), pse=options.get("pse", True),
                   report_accessed_dirty=options.get("ad", False))[level_index]
    return ((1 << (8 * mode.entry_size)) - 1) & ~codec.significant


def test_insignificant_bits_per_level_by_hand_from_the_sdm_tables():
    # 4-level PTE (Table 4-20): A 5, D 6, G 8, ignored 11:9 and 58:52 -> 0x07F0...0F60;
    # bit 7 is PAT, 62:59 the protection key, 63 XD: all significant.
    assert _insignificant("4level", 3) == 0x07F0_0000_0000_0F60
    # With A/D reported, the leaf's A and D count.
    assert _insignificant("4level", 3, ad=True) == 0x07F0_0000_0000_0F00
    # PDE: a 2 MiB leaf (Table 4-18: same as the PTE's, bit 7 PS) or a table entry
    # (Table 4-19: A, ignored 6, 11:8, 62:52): what is free in both.
    assert _insignificant("4level", 2) == 0x07F0_0000_0000_0F60
    assert _insignificant("4level", 2, ad=True) == 0x07F0_0000_0000_0F00
    # PML4E (Table 4-15, tables only): A, ignored 6, 11:8, 62:52; a table entry's A is
    # never the leaf's, so reporting A/D changes nothing here.
    assert _insignificant("4level", 0) == 0x7FF0_0000_0000_0F60
    assert _insignificant("4level", 0, ad=True) == 0x7FF0_0000_0000_0F60
    # PAE PDPTE (Table 4-8): 2:1 and 8:5 reserved, only 11:9 ignored.
    assert _insignificant("pae", 0) == 0xE00
    # PAE PTE (Table 4-11): 62:52 reserved with MAXPHYADDR 52, no high ignored bits.
    assert _insignificant("pae", 2) == 0xF60
    # 32-bit PDE with CR4.PSE=0 (Table 4-5): bit 7 is ignored, so free as well.
    assert _insignificant("legacy", 0, pse=False) == 0xFE0
    assert _insignificant("legacy", 0, pse=True) == 0xF60
    # IA32_EFER.NXE=0: bit 63 is reserved, never free (it was not free anyway).
    assert _insignificant("4level", 3, nxe=False) == 0x07F0_0000_0000_0F60


@pytest.mark.parametrize(("bits", "how"), [
    (A | D, "or"), (1 << 8, "bts"), (0xE00, "or"), (1 << 52, "bts"), (1 << 58, "bts")])
def test_a_leaf_write_of_insignificant_bits_reports_nothing(bits, how):
    guest = four_level()
    guest.monitor.watch(0x1000, 0, KiB4)
    [result] = guest.write(0x4000, 0x10_0000 | TABLE | bits, how)
    assert result.changes == () and result.protected == () and result.unprotected == ()
    assert guest.monitor.translation(0x1000, 0) == t(0x10_0000)
    # The view took the new value: the next change's cause starts from it.
    [moved] = guest.write(0x4000, 0x20_0000 | TABLE | bits)
    [change] = moved.changes
    assert change.cause[0].old == 0x10_0000 | TABLE | bits
    assert change.new_at(0) == t(0x20_0000)


def test_a_change_of_significant_leaf_bits_is_reported():
    guest = four_level()
    guest.monitor.watch(0x1000, 0, KiB4)
    [pat] = guest.write(0x4000, 0x10_0000 | TABLE | PS, "bts")         # bit 7 = PAT in a PTE
    assert [c.new_at(0) for c in pat.changes] == [t(0x10_0000, pat=True)]
    [key] = guest.write(0x4000, 0x10_0000 | TABLE | PS | (5 << 59), "or")   # protection key
    assert [c.new_at(0) for c in key.changes] == [t(0x10_0000, pat=True, pk=5)]


def test_a_not_present_entry_that_stays_not_present_reports_nothing():
    guest = four_level()
    guest.put(0x4000 + 8, 0x30_0000 | RW)                  # PT[1]: P=0
    guest.monitor.watch(0x1000, 0x1000, KiB4)
    [result] = guest.write(0x4000 + 8, 0x7_7777_7000 | RW | US | (1 << 7))
    assert result.changes == ()
    assert guest.monitor.translation(0x1000, 0x1000) is None


def test_with_accessed_dirty_reported_the_leafs_a_counts_but_a_tables_a_does_not():
    guest = four_level(report_accessed_dirty=True)
    guest.monitor.watch(0x1000, 0, KiB4)
    [leaf] = guest.write(0x4000, 0x10_0000 | TABLE | A, "bts")
    [change] = leaf.changes
    assert change.new_at(0).accessed is True and change.old_at(0).accessed is False
    [table] = guest.write(0x3000, 0x4000 | TABLE | A, "bts")          # PDE -> PT, its A
    assert table.changes == ()


def test_a_reserved_bit_makes_the_entry_stop_translating_and_that_is_a_change():
    guest = four_level()
    guest.monitor.watch(0x1000, 0, KiB4)
    [result] = guest.write(0x1000, 0x2000 | TABLE | PS, "bts")        # bit 7: reserved in a PML4E
    [change] = result.changes
    assert (change.start, change.end) == (0, KiB4)
    assert change.old_at(0) == t(0x10_0000) and change.new_at(0) is None
    assert sorted(result.unprotected) == [0x2000, 0x3000, 0x4000]
    no_nx = four_level(nxe=False)
    no_nx.monitor.watch(0x1000, 0, KiB4)
    [result] = no_nx.write(0x4000, 0x10_0000 | TABLE | NX, "bts")     # XD reserved, NXE=0
    assert [c.new_at(0) for c in result.changes] == [None]


def test_memory_type_bits_of_a_table_entry_change_no_translation():
    guest = four_level()
    guest.monitor.watch(0x1000, 0, KiB4)
    [result] = guest.write(0x3000, 0x4000 | TABLE | 0x18, "or")       # PDE -> PT: PWT|PCD
    assert result.changes == () and result.protected == () and result.unprotected == ()


# -- the leaf-write path's callbacks and records -----------------------------------------


def test_a_large_leaf_write_gives_a_partial_watch_its_clipped_part():
    guest = four_level()
    guest.put(0x3000, 0x4000_0000 | PS | TABLE)                        # PD[0]: 2 MiB page
    got = []
    guest.monitor.watch(0x1000, 0x3000, 0x2000, got.append)
    guest.monitor.watch(0x1000, 0, MiB2)
    [result] = guest.write(0x3000, 0x8000_0000 | PS | TABLE)
    [whole] = result.changes
    assert (whole.start, whole.end) == (0, MiB2)
    assert [(c.start, c.end, c.old_at(0x3000), c.new_at(0x3000)) for c in got] == [
        (0x3000, 0x5000, t(0x4000_3000, MiB2), t(0x8000_3000, MiB2))]


def test_a_callback_that_unwatches_during_a_leaf_write_reports_the_pages_it_released():
    guest = four_level()
    handles = []

    def stop(change: object) -> None:
        guest.monitor.unwatch(handles[0])

    handles.append(guest.monitor.watch(0x1000, 0, KiB4, stop))
    [result] = guest.write(0x4000, 0x20_0000 | TABLE)
    assert len(result.changes) == 1
    assert sorted(result.unprotected) == [0x1000, 0x2000, 0x3000, 0x4000]
    assert guest.protector.protected == set()


def test_the_cheap_record_builders_equal_the_constructors():
    from ptemu.monitor import EntryWrite, MonitorResult, Run, TranslationChange
    from ptemu.monitor import monitor as module
    run = Run(1, 2, t(0x3000))
    assert module._run(1, 2, t(0x3000)) == run
    cause = EntryWrite(8, 1, "PTE", 3, 4, True)
    assert module._entry_write(8, 1, "PTE", 3, 4, True) == cause
    change = TranslationChange(5, 6, 7, (run,), (), (cause,), True, False, True)
    assert module._translation_change(5, 6, 7, (run,), (), (cause,), True, False,
                                      True) == change
    assert module._result(MonitorStatus.HANDLED, None, (change,), (9,), (10,)) == \
        MonitorResult(MonitorStatus.HANDLED, None, (change,), (9,), (10,))


def test_handler_set_table_level_is_checked_and_drives_bit_7():
    from ptemu.handler import PtWriteHandler
    handler = PtWriteHandler(InMemoryGuestMemory(), "4level")
    with pytest.raises(UsageError, match="page-aligned"):
        handler.set_table_level(0x1008, 1)
    with pytest.raises(UsageError, match="level 5"):
        handler.set_table_level(0x1000, 5)                # 4-level: levels 1 to 4
    memory = handler.memory
    memory.write(0x1000, (MiB2 | P | RW).to_bytes(8, "little"))   # 2 MiB aligned: no remap

    def set_bit_7() -> set[str]:
        gla = 0xFFFF_8880_0000_1000
        vcpu = Vcpu()
        vcpu.begin_exit()
        value = int.from_bytes(memory.read(0x1000, 8), "little") ^ PS
        result = handler.handle_ept_write(vcpu, WriteEvent(
            0x1000, gla, {"rip": 0x40_1000, "rdi": gla, "rax": value}, b"\x48\x89\x07", 64))
        change = result.entries[0].change
        assert change is not None
        return {str(kind) for kind in change.kinds}

    handler.set_table_level(0x1000, 2)
    assert handler.table_levels == {0x1000: 2}
    assert set_bit_7() == {"large"}                        # a PDE: bit 7 is PS
    handler.set_table_level(0x1000, 1)
    assert set_bit_7() == {"cache"}                        # a PTE: bit 7 is PAT
    handler.set_table_level(0x1000, None)
    handler.set_table_level(0x2000, None)                 # forgetting an unknown page is fine
    assert handler.table_levels == {}
