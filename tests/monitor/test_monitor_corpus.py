"""The translation monitor on the shipped traces in which the guest edits its own
hierarchy (fixtures/4level/monitor-own-hierarchy.json, fixtures/pae/...).

The traces are captured by Unicorn (tools/corpus/ptemu_corpus/own_hierarchy.py).
The expected changes below are worked out by hand from the generator's plan,
not from a run of the monitor: the hierarchy's tables and entries, then what
each instruction does to them. Rights are spelled W/U/X as the CPU combines
them (SDM 4.6): every table link is _PAGE_TABLE (P RW US A D), a data page is
P RW US A D XD ("WU-"), the text page P US A ("-UX").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ptemu.fixtures import load_fixture
from ptemu.handler import WriteEvent
from ptemu.memory import InMemoryGuestMemory
from ptemu.monitor import InMemoryProtector, MonitorStatus, Run, Translation, TranslationMonitor
from ptemu.vcpu import Vcpu

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
K4, M2, G1 = 0x1000, 0x20_0000, 0x4000_0000
DATA, TEXT, READ_ONLY = "WU-", "-UX", "-U-"
FREED_DATA = b"this page was a page table; now it holds data. " * 8
"""What the generator writes into the page table the guest unlinked."""

RunRow = tuple[int, int, int | None, str, int]
"""(start, end, frame or None, rights, page size) of one run."""
ChangeRow = tuple[int, int, int, tuple[RunRow, ...], tuple[RunRow, ...]]
"""(event, start, end, old runs, new runs) of one change."""


def none(start: int, end: int) -> RunRow:
    return (start, end, None, "", 0)


# 4-level: PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000 (linear 0: frame
# 0xa000000 data, 0x1000: 0xa001000 data, 0x2000: 0xb000000 text); PDE 1 a 2 MiB
# data page at 0xc000000 (linear 0x200000). Spare: PT 0x5000 (empty), PT 0x6000
# (filled by the generator with the 2 MiB page's 512 frames, data), PDPT 0x7000
# (entry 0 -> PD 0x3000, entry 1 a 1 GiB data page at 0x40000000).
CHANGES_4LEVEL: list[ChangeRow] = [
    # 0: PDE 2 -> empty PT 0x5000: nothing is mapped yet, no change.
    # 1, 2: PTEs 0, 1 of PT 0x5000 map linear 0x400000, 0x401000.
    (1, 0x40_0000, 0x40_1000, (none(0x40_0000, 0x40_1000),),
     ((0x40_0000, 0x40_1000, 0xD00_0000, DATA, K4),)),
    (2, 0x40_1000, 0x40_2000, (none(0x40_1000, 0x40_2000),),
     ((0x40_1000, 0x40_2000, 0xD00_1000, DATA, K4),)),
    # 3: XCHG PDE 1 -> PT 0x6000 with the same frames and rights: no change.
    # 4: PTE 5 of the split table (linear 0x205000) -> frame 0xe000000.
    (4, 0x20_5000, 0x20_6000, ((0x20_5000, 0x20_6000, 0xC00_5000, DATA, K4),),
     ((0x20_5000, 0x20_6000, 0xE00_0000, DATA, K4),)),
    # 5: LOCK BTR bit 1 of PTE 0 of PT 0x4000: linear 0 loses W.
    (5, 0, 0x1000, ((0, 0x1000, 0xA00_0000, DATA, K4),),
     ((0, 0x1000, 0xA00_0000, READ_ONLY, K4),)),
    # 6: LOCK AND byte 0xfd on PDE 2: both pages of PT 0x5000 lose W (one run).
    (6, 0x40_0000, 0x40_2000, ((0x40_0000, 0x40_2000, 0xD00_0000, DATA, K4),),
     ((0x40_0000, 0x40_2000, 0xD00_0000, READ_ONLY, K4),)),
    # 7: PDE 0 cleared: PT 0x4000's three pages go (one contiguous range).
    (7, 0, 0x3000, ((0, 0x1000, 0xA00_0000, READ_ONLY, K4),
                    (0x1000, 0x2000, 0xA00_1000, DATA, K4),
                    (0x2000, 0x3000, 0xB00_0000, TEXT, K4)),
     (none(0, 0x3000),)),
    # 8: PML4E 0 -> PDPT 0x7000: its entry 0 is the same PD (nothing changes
    # below 1 GiB), its entry 1 maps the 1 GiB page.
    (8, G1, 2 * G1, (none(G1, 2 * G1),), ((G1, 2 * G1, 0x4000_0000, DATA, G1),)),
    # 9: PDPTE 0 of PDPT 0x7000 cleared: every mapped page below 1 GiB goes.
    (9, 0x20_0000, 0x40_2000, ((0x20_0000, 0x20_5000, 0xC00_0000, DATA, K4),
                               (0x20_5000, 0x20_6000, 0xE00_0000, DATA, K4),
                               (0x20_6000, 0x40_0000, 0xC00_6000, DATA, K4),
                               (0x40_0000, 0x40_2000, 0xD00_0000, READ_ONLY, K4)),
     (none(0x20_0000, 0x40_2000),)),
]
PROTECTIONS_4LEVEL = {
    None: ([0x1000, 0x2000, 0x3000, 0x4000], []),     # the watch: the linked tables
    0: ([0x5000], []), 3: ([0x6000], []), 7: ([], [0x4000]),
    8: ([0x7000], [0x2000]), 9: ([], [0x3000, 0x5000, 0x6000]),
}

# PAE: PDPT 0x1000 -> PD 0x2000 -> PT 0x3000 (same three pages); PDE 1 the same
# 2 MiB page. Spare: PT 0x4000 (empty), PT 0x5000 (the split), PD 0x6000 (entry
# 0 a 2 MiB data page at 0xf000000).
CHANGES_PAE: list[ChangeRow] = [
    # 0: PDE 2 -> empty PT 0x4000 (two MOV halves, high first): no change.
    (1, 0x40_0000, 0x40_1000, (none(0x40_0000, 0x40_1000),),
     ((0x40_0000, 0x40_1000, 0xD00_0000, DATA, K4),)),
    # 2: LOCK CMPXCHG8B PDE 1 -> PT 0x5000, same frames: no change.
    (3, 0x20_5000, 0x20_6000, ((0x20_5000, 0x20_6000, 0xC00_5000, DATA, K4),),
     ((0x20_5000, 0x20_6000, 0xE00_0000, DATA, K4),)),
    (4, 0, 0x1000, ((0, 0x1000, 0xA00_0000, DATA, K4),),
     ((0, 0x1000, 0xA00_0000, READ_ONLY, K4),)),
    (5, 0x40_0000, 0x40_1000, ((0x40_0000, 0x40_1000, 0xD00_0000, DATA, K4),),
     ((0x40_0000, 0x40_1000, 0xD00_0000, READ_ONLY, K4),)),
    (6, 0, 0x3000, ((0, 0x1000, 0xA00_0000, READ_ONLY, K4),
                    (0x1000, 0x2000, 0xA00_1000, DATA, K4),
                    (0x2000, 0x3000, 0xB00_0000, TEXT, K4)),
     (none(0, 0x3000),)),
    # 7: PDPTE 0 -> PD 0x6000: below 0x200000 its 2 MiB page appears; above, the
    # split table's pages and PT 0x4000's page go. One contiguous range.
    (7, 0, 0x40_1000, (none(0, 0x20_0000),
                       (0x20_0000, 0x20_5000, 0xC00_0000, DATA, K4),
                       (0x20_5000, 0x20_6000, 0xE00_0000, DATA, K4),
                       (0x20_6000, 0x40_0000, 0xC00_6000, DATA, K4),
                       (0x40_0000, 0x40_1000, 0xD00_0000, READ_ONLY, K4)),
     ((0, 0x20_0000, 0xF00_0000, DATA, M2), none(0x20_0000, 0x40_1000))),
]
PROTECTIONS_PAE = {
    None: ([0x1000, 0x2000, 0x3000], []),
    0: ([0x4000], []), 2: ([0x5000], []), 6: ([], [0x3000]),
    # 7: the CPU walks PD 0x2000 (and PTs 0x4000, 0x5000 under it) through the
    # PDPTE it loaded until the next CR3 load: they stay protected until then.
    7: ([0x6000], []),
}
RELEASED_AT_CR3_LOAD_PAE = [0x2000, 0x4000, 0x5000]

CASES = {
    "4level": (CHANGES_4LEVEL, PROTECTIONS_4LEVEL, 8, 0x4000, {0x1000, 0x7000}),
    "pae": (CHANGES_PAE, PROTECTIONS_PAE, 7, 0x3000,
            {0x1000, 0x6000, *RELEASED_AT_CR3_LOAD_PAE}),
}
"""paging -> (changes, protections per event, event carrying the write into the
freed table, that table, pages protected at the end)."""


def _rights(translation: Translation) -> str:
    return (("W" if translation.writable else "-") + ("U" if translation.user else "S")
            + ("X" if translation.executable else "-"))


def _row(run: Run) -> RunRow:
    state = run.translation
    if state is None:
        return none(run.start, run.end)
    assert isinstance(state, Translation), state
    return (run.start, run.end, state.frame, _rights(state), state.page_size)


def _replay(paging: str):
    """Replay the shipped trace through a monitor watching the user half."""
    fixture = load_fixture(FIXTURES / paging / "monitor-own-hierarchy.json")
    memory = InMemoryGuestMemory(fixture.memory_regions)
    protector = InMemoryProtector()
    monitor = TranslationMonitor(memory, fixture.paging, protector, policy=fixture.policy)
    monitor.watch_space(0x1000, ranges="user")
    at_watch = sorted(protector.protected)
    vcpu = Vcpu()
    steps = []
    for event in fixture.events:
        patched = [gpa for gpa, _ in event.memory]
        protected_before = set(protector.protected)
        for gpa, data in event.memory:
            memory.write(gpa, data)
        vcpu.begin_exit()
        result = monitor.handle_ept_write(vcpu, WriteEvent(
            gpa=event.gpa, gla=event.gla, regs=dict(event.regs), code=event.code,
            code_bits=fixture.code_bits))
        steps.append((event, result, patched, protected_before))
    return fixture, memory, protector, at_watch, steps, monitor


@pytest.mark.parametrize("paging", sorted(CASES))
def test_the_monitor_reports_the_hand_worked_changes(paging: str) -> None:
    changes, _, _, _, _ = CASES[paging]
    _, _, _, _, steps, _ = _replay(paging)
    assert all(result.status is MonitorStatus.HANDLED for _, result, _, _ in steps)
    got = [(event.index, change.start, change.end, tuple(map(_row, change.old)),
            tuple(map(_row, change.new)))
           for event, result, _, _ in steps for change in result.changes]
    assert got == changes


@pytest.mark.parametrize("paging", sorted(CASES))
def test_the_monitor_protects_the_tables_the_guest_links_and_releases_the_rest(
        paging: str) -> None:
    _, protections, _, _, final = CASES[paging]
    _, _, protector, at_watch, steps, _ = _replay(paging)
    assert (at_watch, []) == protections[None]
    for event, result, _, _ in steps:
        expected = protections.get(event.index, ([], []))
        assert (sorted(result.protected), sorted(result.unprotected)) == expected, event.index
    assert protector.protected == final


def test_a_cr3_load_after_the_pae_pdpte_write_releases_the_old_directory() -> None:
    _, _, protector, _, _, monitor = _replay("pae")
    result = monitor.cr3_loaded(0x1000)
    assert sorted(result.unprotected) == RELEASED_AT_CR3_LOAD_PAE
    assert result.changes == () and result.protected == ()
    assert protector.protected == {0x1000, 0x6000}
    assert monitor.cr3_loaded(0x1000).unprotected == ()   # nothing left to release


@pytest.mark.parametrize("paging", sorted(CASES))
def test_the_write_into_the_freed_table_is_no_event_and_lands_unprotected(paging: str) -> None:
    _, _, freed_event, freed_table, _ = CASES[paging]
    fixture, memory, _, _, steps, _ = _replay(paging)
    # The generator's write is the only memory patch besides the split table's fill,
    # and no event's page is the freed table after it was unlinked.
    _, _, patched, protected_before = steps[freed_event]
    assert patched == [freed_table] and freed_table not in protected_before
    assert all(e.gpa // 0x1000 * 0x1000 != freed_table for e in fixture.events[freed_event:])
    assert memory.read(freed_table, len(FREED_DATA)) == FREED_DATA


@pytest.mark.parametrize("paging", sorted(CASES))
def test_every_event_carries_the_hierarchy_root_as_cr3(paging: str) -> None:
    fixture = load_fixture(FIXTURES / paging / "monitor-own-hierarchy.json")
    assert {event.regs["cr3"] for event in fixture.events} == {0x1000}
    # The PAE PDPTE write is reported as taking effect at the next CR3 load.
    _, _, _, _, steps, _ = _replay(paging)
    flagged = [(event.index, change.at_cr3_load) for event, result, _, _ in steps
               for change in result.changes if change.at_cr3_load]
    assert flagged == ([(7, True)] if paging == "pae" else [])
