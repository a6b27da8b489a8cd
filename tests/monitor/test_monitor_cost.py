"""The monitor's work per event: constant for a leaf write, proportional to the
subtree for an upper-level replace, never growing with the watched space.

Work is counted, not timed: bytes read from guest memory (an instrumented
memory), entries turned into translations (`LevelCodec.leaf`) and entries
checked for a table link (`LevelCodec.link`). Spaces of 1,024 and 102,400
mapped pages (`ptemu.bench.monitor_bench.build_space`, the benchmark's own
space) must cost exactly the same for the same write. Also: the per-level codec
agrees with `decode_entry` (the full SDM decode it replaces on the hot path).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptemu.bench import monitor_bench as bench
from ptemu.handler import WriteEvent
from ptemu.memory import InMemoryGuestMemory
from ptemu.monitor import InMemoryProtector, Translation, TranslationMonitor
from ptemu.monitor.codec import LevelCodec
from ptemu.paging import decode_entry, paging_mode
from ptemu.paging.translate import AccessRights, combine_rights, translates
from ptemu.vcpu import Vcpu

SMALL, LARGE = 1_024, 102_400


class CountingMemory(InMemoryGuestMemory):
    """Guest memory that counts the bytes read from it."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes_read = 0

    def read(self, gpa: int, size: int) -> bytes:
        self.bytes_read += size
        return super().read(gpa, size)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counts = {"leaf": 0, "link": 0}
    leaf, link = LevelCodec.leaf, LevelCodec.link

    def counting_leaf(self: LevelCodec, value: int, rights: AccessRights) -> Translation | None:
        counts["leaf"] += 1
        return leaf(self, value, rights)

    def counting_link(self: LevelCodec, value: int) -> int | None:
        counts["link"] += 1
        return link(self, value)

    monkeypatch.setattr(LevelCodec, "leaf", counting_leaf)
    monkeypatch.setattr(LevelCodec, "link", counting_link)
    return counts


def _watched(pages: int) -> tuple[bench.Space, CountingMemory, TranslationMonitor]:
    memory = CountingMemory()
    space = bench.build_space(pages, memory)
    monitor = TranslationMonitor(memory, "4level", InMemoryProtector())
    monitor.watch_space(space.cr3, ranges="all")
    return space, memory, monitor


def _write(monitor: TranslationMonitor, gpa: int, value: int, code: bytes = bench.MOV_STORE):
    vcpu = Vcpu()
    vcpu.begin_exit()
    gla = bench.KERNEL_MAP + gpa
    return monitor.handle_ept_write(vcpu, WriteEvent(
        gpa, gla, {"rip": 0x40_1000, "rdi": gla, "rax": value}, code, 64))


def _work(pages: int, counts: dict[str, int], act) -> tuple[int, int, int]:
    space, memory, monitor = _watched(pages)
    memory.bytes_read = 0
    counts["leaf"] = counts["link"] = 0
    act(space, monitor)
    return memory.bytes_read, counts["leaf"], counts["link"]


def test_a_leaf_write_costs_the_same_in_a_space_of_1k_and_100k_pages(counted):
    new_frame = 0x7_7777_7000

    def leaf_write(space: bench.Space, monitor: TranslationMonitor) -> None:
        pte = space.pts[0] + 8 * 5                      # maps linear 0x5000
        result = _write(monitor, pte, new_frame | 0x7)
        (change,) = result.changes
        assert (change.start, change.end) == (0x5000, 0x6000)
        assert change.new[0].translation == Translation(
            frame=new_frame, page_size=0x1000, writable=True, user=True, executable=True,
            protection_key=0, pwt=False, pcd=False, pat=False)

    small = _work(SMALL, counted, leaf_write)
    large = _work(LARGE, counted, leaf_write)
    assert small == large
    _bytes, leaves, links = large
    assert leaves == 2          # the entry's old and new translation, nothing else
    assert links <= 2


def test_replacing_a_pde_reads_the_new_table_only_whatever_the_space(counted):
    def replace_pde(space: bench.Space, monitor: TranslationMonitor) -> None:
        table = space.table()
        bench._fill_table(space.memory, table, 0x2_0000_0000)
        result = _write(monitor, space.pds[0] + 8 * 1, table | 0x7, bench.XCHG_STORE)
        assert result.protected == (table,)
        assert result.unprotected == (space.pts[1],)
        assert result.changes[0].start == 0x20_0000 and result.changes[-1].end == 0x40_0000

    small = _work(SMALL, counted, replace_pde)
    large = _work(LARGE, counted, replace_pde)
    assert small == large
    bytes_read, leaves, _links = large
    assert leaves == 2 * 512    # the old PT's 512 translations and the new PT's 512
    assert bytes_read < 2 * 4096


def test_replacing_a_pdpte_costs_in_proportion_to_its_subtree(counted):
    def replace_pdpte(tables: int):
        def act(space: bench.Space, monitor: TranslationMonitor) -> None:
            directory = space.table()
            for number in range(tables):
                table = space.table()
                bench._fill_table(space.memory, table, 0x3_0000_0000 + number * 0x20_0000)
                space.memory.write(directory + 8 * number,
                                   (table | 0x7).to_bytes(8, "little"))
            result = _write(monitor, space.pdpt, directory | 0x7, bench.XCHG_STORE)
            assert len(result.protected) == 1 + tables
        return act

    one = _work(SMALL, counted, replace_pdpte(1))
    four = _work(SMALL, counted, replace_pdpte(4))
    four_large = _work(LARGE, counted, replace_pdpte(4))
    # The old side is the space's own first PD: 2 PTs (1,024 pages) in the small
    # space; the large space's first PD holds 200 PTs, so compare new-side reads.
    assert four[0] - one[0] == 3 * 4096          # three more tables read, once each
    assert four_large[0] == four[0]
    assert four[1] - one[1] == 3 * 512           # three more tables' translations
    assert four_large[1] - four[1] == (LARGE - SMALL)   # the bigger old subtree


@settings(max_examples=400, deadline=None)
@given(mode_name=st.sampled_from(["legacy", "pae", "4level", "5level"]),
       level_index=st.integers(0, 4), value=st.integers(0, (1 << 64) - 1),
       nxe=st.booleans(), pse=st.booleans(), rights=st.tuples(st.booleans(), st.booleans(),
                                                              st.booleans()))
def test_level_codec_agrees_with_decode_entry(mode_name, level_index, value, nxe, pse,
                                              rights):
    mode = paging_mode(mode_name)
    level = mode.levels[level_index % len(mode.levels)]
    value &= (1 << (8 * mode.entry_size)) - 1
    above = AccessRights(*rights)
    codec = LevelCodec(mode, level, nxe=nxe, pse=pse, report_accessed_dirty=True)
    entry = decode_entry(mode, level, value, nxe=nxe, pse=pse)
    used = translates(entry)
    expected_link = entry.address if used and entry.points_to_table else None
    if level is mode.levels[-1]:
        expected_link = None
    assert codec.link(value) == expected_link
    assert codec.rights(above, value) == combine_rights(above, entry)
    if entry.present and entry.maps_page:
        assert codec.maps_page(value)
        leaf = codec.leaf(value, above)
        if not used:
            assert leaf is None
        else:
            combined = combine_rights(above, entry)
            assert leaf == Translation(
                frame=entry.address, page_size=entry.page_bytes or 0,
                writable=combined.writable, user=combined.user,
                executable=combined.executable, protection_key=entry.protection_key,
                pwt=entry.pwt, pcd=entry.pcd, pat=bool(entry.pat), accessed=entry.accessed,
                dirty=entry.dirty)
            assert leaf is not None and leaf.page_size == entry.page_bytes
    elif entry.present:
        assert not codec.maps_page(value)


def _what_translates(mode, level, value: int, *, nxe: bool, pse: bool,
                     report_accessed_dirty: bool) -> tuple[object, ...]:
    """What the CPU takes from one entry, from the full SDM decode (`decode_entry`):
    whether it is used, table or page, the address, the rights it grants, and for a
    page the leaf's key, memory-type bits (and A/D when reported)."""
    entry = decode_entry(mode, level, value, nxe=nxe, pse=pse)
    if not translates(entry):
        return ("unused",)
    rights = combine_rights(AccessRights(True, True, True), entry)
    if not entry.maps_page:
        return ("table", entry.address, rights)
    return ("page", entry.address, entry.page_bytes, rights, entry.protection_key, entry.pwt,
            entry.pcd, entry.pat,
            (entry.accessed, entry.dirty) if report_accessed_dirty else None)


@settings(max_examples=600, deadline=None)
@given(mode_name=st.sampled_from(["legacy", "pae", "4level", "5level"]),
       level_index=st.integers(0, 4), value=st.integers(0, (1 << 64) - 1),
       flips=st.integers(0, (1 << 64) - 1), nxe=st.booleans(), pse=st.booleans(),
       report=st.booleans())
def test_a_quiet_change_leaves_what_the_entry_translates_unchanged(
        mode_name, level_index, value, flips, nxe, pse, report):
    """`LevelCodec.quiet(old, new)` => the full SDM decode of both gives the same
    translation (the mask may be conservative, never the other way round)."""
    mode = paging_mode(mode_name)
    level = mode.levels[level_index % len(mode.levels)]
    width = (1 << (8 * mode.entry_size)) - 1
    value &= width
    codec = LevelCodec(mode, level, nxe=nxe, pse=pse, report_accessed_dirty=report)
    # A flip inside the insignificant bits, or a not-present entry staying not present.
    new = value ^ (flips & ~codec.significant & width)
    also = (value & ~1) ^ (flips & width & ~1)
    for old, changed in ((value, new), (value & ~1, also)):
        assert codec.quiet(old, changed)
        options = {"nxe": nxe, "pse": pse, "report_accessed_dirty": report}
        assert _what_translates(mode, level, old, **options) == _what_translates(
            mode, level, changed, **options)


def test_a_quiet_leaf_write_builds_no_translation(counted):
    def quiet_writes(space: bench.Space, monitor: TranslationMonitor) -> None:
        pte = space.pts[0] + 8 * 5
        value = int.from_bytes(space.memory.read(pte, 8), "little")
        for bits in (1 << 9, 1 << 5 | 1 << 6, 1 << 8, 1 << 52):    # software, A|D, G, 52
            result = _write(monitor, pte, value | bits)
            assert result.changes == () and result.protected == () == result.unprotected
        result = _write(monitor, pte, 0x7_7777_7000 | 0x7)          # and then a real one
        assert [c.cause[0].old for c in result.changes] == [value | 1 << 52]

    _bytes, leaves, links = _work(LARGE, counted, quiet_writes)
    assert leaves == 2 and links == 0     # only the last write built translations
