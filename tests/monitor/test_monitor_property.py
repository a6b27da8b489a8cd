"""Property: the monitor's view always equals a fresh walk of memory.

Hypothesis builds random hierarchies in two address spaces (sharing tables,
and for PAE sharing one page between two PDPTs) and drives them through random
guest operations: map, unmap, remap, change rights, split a large page into a
table, merge back, replace a table pointer (also by one that points back up its
own path), free a table and reuse its page as data, PAE PDPTE writes, hostile
partial writes to present entries. Each write to a protected page is a real
instruction the handler emulates (`monitor_guest.stores`); any other write is
plain memory with no event. After every step:

- the monitor's translation of every probe address equals what
  `ptemu.paging.walk` finds in memory (an address whose walk visits a table
  page twice must read as unfollowed);
- the protected pages are exactly the table pages those walks read (up to a
  repeated page);
- the reported changes, applied to the previous view, give the new one, and
  every reported change differs at its probes and at its start.

PAE PDPTEs: the test keeps the four PDPTEs of each space as the CPU last loaded
them (at the watch, and at each `cr3_loaded` it draws), and walks every probe
a second time through those (`LoadedPdptes`): what the CPU uses until its next
CR3 load. The protected pages are then the pages both walks read; changes marked
``until_cr3_load``, and every other change where the loaded PDPTE leads where
memory's does, applied to the loaded translations, give that second walk. In
the other modes the loaded walk is the memory walk, and `cr3_loaded` is a no-op.

Every table entry the test ever writes is at an index in the mode's `INDICES`
(plus `EXTRA`), and probes cover every combination of those indices, so the
walks reach every table any watched range reaches. With ``timing="seed"`` the
checks run at the steps where no entry is pending.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monitor_guest import (
    HOWS_64,
    HOWS_LEGACY,
    HOWS_PAE,
    NX,
    PAT_LARGE,
    PCD,
    PS,
    PWT,
    RW,
    US,
    A,
    D,
    Guest,
    P,
)

from ptemu.monitor import MonitorResult, Translation, TranslationState, Unfollowed
from ptemu.paging import walk
from ptemu.values import page_base

POOL = tuple(0x10_000 + k * 0x1000 for k in range(14))
"""Pages that may hold tables (or be reused as data)."""
DATA = 0x100_0000
"""4 KiB frames mapped as data live from here on."""
SELF_REFERENCE = Unfollowed("self-reference")

INDICES = {"4level": (0, 1, 511), "5level": (0, 511), "pae": (0, 1, 511),
           "legacy": (0, 1, 1023)}
EXTRA = 7
"""Probed but only ever written by data reuse: where stray entries show up."""
HOWS = {"4level": HOWS_64, "5level": HOWS_64, "pae": HOWS_PAE, "legacy": HOWS_LEGACY}


class World:
    """The guest, its two spaces, the probes and the test's copy of the view."""

    def __init__(self, paging: str, timing: str) -> None:
        self.guest = Guest(paging, timing=timing)
        self.mode = self.guest.mode
        if paging == "pae":   # two PDPTs in one page
            self.cr3s = (POOL[0] + 0x20, POOL[0] + 0x40)
        else:
            self.cr3s = (POOL[0], POOL[1])
        self.shadow: dict[tuple[int, int], TranslationState] = {}
        self.probes = {cr3: [] for cr3 in self.cr3s}
        self.loaded: dict[int, bytes] = {}
        """cr3 -> its PDPT (PAE: 32 bytes) as the CPU loaded it."""
        self.settled: dict[int, bytes] = {}
        """cr3 -> its PDPT as the monitor's view holds it: memory, except that with the
        seed's timing an entry keeps its last complete value while it is pending."""
        self.loaded_shadow: dict[tuple[int, int], TranslationState] = {}
        """The test's copy of the translations through the loaded PDPTEs."""

    # -- structure -----------------------------------------------------------------

    def indices(self, level_number: int) -> tuple[int, ...]:
        level = self.mode.level(level_number)
        if level.entries == 4:
            return (0, 1, 2, 3)
        return INDICES[self.mode.name]

    def probe_addresses(self) -> list[int]:
        combos = []
        for level in self.mode.levels:
            if level.entries == 4:
                combos.append((0, 1, 2, 3))
            else:
                combos.append((*INDICES[self.mode.name], EXTRA))
        out = []
        for picks in itertools.product(*combos):
            flat = sum(index << level.shift for index, level in zip(picks, self.mode.levels,
                                                                   strict=True))
            out.append(self.mode.canonical(flat))
        return out

    def watch(self) -> None:
        monitor = self.guest.monitor
        a, b = self.cr3s
        monitor.watch_space(a)
        monitor.watch_space(b, ranges="kernel")
        low = self.mode.levels[-2].entry_span * 2      # the first two PDEs' worth
        monitor.watch(b, 0, low)
        probes = self.probe_addresses()
        half = 1 << (self.mode.linear_address_bits - 1)
        self.probes[a] = probes
        self.probes[b] = [p for p in probes
                          if p < low or (p & ((1 << self.mode.linear_address_bits) - 1)) >= half]
        for cr3 in self.cr3s:
            for probe in self.probes[cr3]:
                self.shadow[(cr3, probe)] = monitor.translation(cr3, probe)
            self.load(cr3)

    def load(self, cr3: int) -> None:
        """The CPU loads CR3: from now on it uses the PDPTEs memory holds."""
        if self.mode.name == "pae":
            self.loaded[cr3] = self.settled[cr3] = self.guest.memory.read(cr3, 32)
        for probe in self.probes[cr3]:
            self.loaded_shadow[(cr3, probe)] = self.shadow[(cr3, probe)]

    def cr3_load(self, cr3: int) -> None:
        result = self.guest.monitor.cr3_loaded(cr3)
        assert result.changes == () and result.protected == ()
        self.load(cr3)

    # -- the oracle ----------------------------------------------------------------

    def memory_as_loaded(self, cr3: int) -> LoadedPdptes | None:
        return LoadedPdptes(self.guest.memory, cr3, self.loaded[cr3]) if self.loaded else None

    def settle(self) -> None:
        """Take the PDPTEs that are not pending (seed timing) as the view now has them."""
        pending = set(self.guest.monitor.handler.pending()) \
            if self.guest.monitor.timing == "seed" else set()
        for cr3, settled in self.settled.items():
            now = self.guest.memory.read(cr3, 32)
            self.settled[cr3] = b"".join(
                (settled if cr3 + k in pending else now)[k:k + 8] for k in range(0, 32, 8))

    def walked(self, cr3: int, gla: int, loaded: bool = False,
               ) -> tuple[TranslationState, list[int]]:
        """What the CPU translates `gla` to, and the table pages the walk read (up to
        a page read twice, which the monitor does not follow); with `loaded`, through
        the PDPTEs the CPU loaded rather than memory's."""
        memory = (self.memory_as_loaded(cr3) if loaded else None) or self.guest.memory
        result = walk(self.mode, cr3, gla, memory)
        pages: list[int] = []
        for step in result.steps:
            page = page_base(step.table_gpa)
            if page in pages:
                return SELF_REFERENCE, pages
            pages.append(page)
        if result.gpa is None:
            return None, pages
        leaf = result.steps[-1].entry
        assert result.permissions is not None and result.page_size is not None
        return Translation(
            frame=page_base(result.gpa), page_size=result.page_size,
            writable=result.permissions.writable, user=result.permissions.user,
            executable=result.permissions.executable, protection_key=leaf.protection_key,
            pwt=leaf.pwt, pcd=leaf.pcd, pat=bool(leaf.pat)), pages

    def leads_as_loaded(self, cr3: int, gla: int) -> bool:
        """Whether the loaded PDPTE of `gla` leads to the table the view's leads to
        (so that a change the view reports is one the CPU sees through it)."""
        loaded = self.memory_as_loaded(cr3)
        if loaded is None:
            return True
        view = LoadedPdptes(self.guest.memory, cr3, self.settled[cr3])
        tables = [walk(self.mode, cr3, gla, memory).steps[1:2] for memory in (loaded, view)]
        return [s.table_gpa for s in tables[0]] == [s.table_gpa for s in tables[1]]

    def reached(self) -> list[tuple[int, int]]:
        """(table GPA, level number) of every table the probe walks read."""
        seen: dict[tuple[int, int], None] = {}
        for cr3 in self.cr3s:
            for probe in self.probes[cr3]:
                result = walk(self.mode, cr3, probe, self.guest.memory)
                pages: list[int] = []
                for step in result.steps:
                    if page_base(step.table_gpa) in pages:
                        break
                    pages.append(page_base(step.table_gpa))
                    seen[(step.table_gpa, step.level.number)] = None
        return list(seen)

    # -- checks ----------------------------------------------------------------------

    def apply(self, results: list[MonitorResult]) -> None:
        self.settle()
        for result in results:
            for change in result.changes:
                assert change.old_at(change.start) != change.new_at(change.start)
                assert change.at_cr3_load == all(c.level_name == "PDPTE" and
                                                  self.mode.name == "pae" for c in change.cause)
                assert not (change.at_cr3_load and change.until_cr3_load)
                for probe in self.probes.get(change.cr3, ()):
                    if change.start <= probe < change.end:
                        old, new = change.old_at(probe), change.new_at(probe)
                        key = (change.cr3, probe)
                        assert old != new, hex(probe)
                        if change.until_cr3_load:
                            # In tables the CPU reaches only through a loaded PDPTE.
                            assert not self.leads_as_loaded(change.cr3, probe), hex(probe)
                            assert old == self.loaded_shadow[key], hex(probe)
                            self.loaded_shadow[key] = new
                            continue
                        assert old == self.shadow[key], hex(probe)
                        self.shadow[key] = new
                        if not change.at_cr3_load and self.leads_as_loaded(change.cr3, probe):
                            assert self.loaded_shadow[key] == old, hex(probe)
                            self.loaded_shadow[key] = new

    def check(self) -> None:
        monitor = self.guest.monitor
        if monitor.timing == "seed" and monitor.handler.pending():
            return
        pages: set[int] = set()
        for cr3 in self.cr3s:
            for probe in self.probes[cr3]:
                expected, read = self.walked(cr3, probe)
                pages.update(read)
                assert monitor.translation(cr3, probe) == expected, (hex(cr3), hex(probe))
                assert self.shadow[(cr3, probe)] == expected, (hex(cr3), hex(probe))
                as_loaded, read = self.walked(cr3, probe, loaded=True)
                pages.update(read)
                assert self.loaded_shadow[(cr3, probe)] == as_loaded, (hex(cr3), hex(probe))
        protected = self.guest.protector.protected
        assert protected == pages, (sorted(map(hex, protected - pages)),
                                    sorted(map(hex, pages - protected)))
        assert monitor.protected_pages() == pages


# -- operations ------------------------------------------------------------------------------


class LoadedPdptes:
    """Guest memory as the CPU reads it for one space: its PDPT as loaded."""

    def __init__(self, memory, cr3: int, pdpt: bytes) -> None:
        self.memory, self.cr3, self.pdpt = memory, cr3, pdpt

    def read(self, gpa: int, size: int) -> bytes:
        data = bytearray(self.memory.read(gpa, size))
        low, high = max(gpa, self.cr3), min(gpa + size, self.cr3 + len(self.pdpt))
        if low < high:
            data[low - gpa:high - gpa] = self.pdpt[low - self.cr3:high - self.cr3]
        return bytes(data)


def _rights(draw: st.DrawFn, world: World, level_number: int, leaf: bool) -> int:
    if world.mode.level(level_number).entries == 4:        # PAE PDPTE: P, PWT, PCD only
        return P | draw(st.sampled_from((0, PWT, PCD)))
    flags = P | draw(st.sampled_from((0, RW))) | draw(st.sampled_from((0, US, US)))
    if world.mode.entry_size == 8:
        flags |= draw(st.sampled_from((0, 0, NX)))
    if leaf:
        flags |= draw(st.sampled_from((0, 0, PWT, PCD, A | D)))
        if world.mode.name in ("4level", "5level"):
            flags |= draw(st.sampled_from((0, 0, 3 << 59)))
    return flags


def _leaf(draw: st.DrawFn, world: World, level_number: int, index: int) -> int:
    level = world.mode.level(level_number)
    rights = _rights(draw, world, level_number, True)
    step = draw(st.sampled_from((0, 1, 5)))
    if level_number == 1:
        return (DATA + (step * 64 + index) * 0x1000) | rights
    frame = ((2 + step) * 512 + index) << level.shift
    limit = 32 if world.mode.name == "legacy" else 40
    frame &= (1 << limit) - 1
    frame &= ~((1 << level.shift) - 1)
    return frame | PS | rights | draw(st.sampled_from((0, PAT_LARGE)))


def _write(world: World, gpa: int, value: int, how: str) -> list[MonitorResult]:
    results = world.guest.write(gpa, value, how)
    world.apply(results)
    return results


def operation(draw: st.DrawFn, world: World) -> None:
    guest, mode = world.guest, world.mode
    targets = world.reached()
    if draw(st.integers(0, 9)) < 8:
        table, level_number = draw(st.sampled_from(targets))
    else:
        table = draw(st.sampled_from(POOL))
        level_number = draw(st.sampled_from([level.number for level in mode.levels]))
    indices = world.indices(level_number)
    if mode.level(level_number).entries == 4 and table not in world.cr3s:
        # A page from the pool taken as a PDPT: its start, and only indices that
        # are probed at every level (it may be linked as a PD or PT elsewhere).
        table, indices = page_base(table), (0, 1)
    index = draw(st.sampled_from(indices))
    gpa = table + index * mode.entry_size
    cur = guest.read(gpa)
    level = mode.level(level_number)
    how = draw(st.sampled_from(HOWS[mode.name]))
    kind = draw(st.sampled_from(("map", "unmap", "link", "link", "rights", "split", "merge",
                                 "free", "hostile", "complete")))
    mask = (1 << (8 * mode.entry_size)) - 1
    if kind == "map" and (level.is_leaf_level or level.may_map_large):
        _write(world, gpa, _leaf(draw, world, level_number, index), how)
    elif kind == "unmap":
        _write(world, gpa, draw(st.sampled_from((0, cur & ~P))), how)
    elif kind in ("link", "map"):
        child = draw(st.sampled_from(POOL))
        _write(world, gpa, child | _rights(draw, world, level_number, False), how)
    elif kind == "rights":
        bit = draw(st.sampled_from((RW, US, NX, PWT, PCD, A, D, PAT_LARGE, 1 << 60)))
        _write(world, gpa, (cur ^ bit) & mask, how)
    elif kind == "split" and level.may_map_large and cur & P and cur & PS:
        free = [page for page in POOL if page not in {page_base(t) for t, _ in targets}]
        if not free:
            return
        child = draw(st.sampled_from(free))
        lower = mode.level(level_number - 1)
        frame = cur & ~((1 << level.shift) - 1) & ((1 << 52) - 1) & ~NX
        rights = cur & (RW | US | P | NX)
        for sub in world.indices(level_number - 1):
            sub_value = (frame + (sub << lower.shift)) | rights
            if lower.may_map_large:
                sub_value |= PS
            _write(world, child + sub * mode.entry_size, sub_value & mask, "mov")
        _write(world, gpa, child | rights | (RW | US), how)
    elif kind == "merge" and level.may_map_large and cur & P and not cur & PS:
        _write(world, gpa, _leaf(draw, world, level_number, index), how)
    elif kind == "free" and cur & P:
        old_child = page_base(cur & ((1 << 52) - 1))
        _write(world, gpa, 0, how)
        if old_child in POOL:
            for sub in (*INDICES[mode.name], EXTRA):
                if sub * mode.entry_size < 0x1000:
                    junk = draw(st.sampled_from((0, 0xFFFF_FFFF, 0x1234_5067, DATA | P | RW)))
                    _write(world, old_child + sub * mode.entry_size, junk & mask, "mov")
    elif kind == "hostile" and cur & P:
        bit = draw(st.sampled_from((P, RW, US, 1 << 13, NX)))
        _write(world, gpa, (cur ^ bit) & mask, "high" if bit == NX else "byte")
    elif kind == "complete":
        for pending in guest.monitor.handler.pending():
            _write(world, pending, guest.read(pending), "xchg" if mode.name != "pae"
                   else "cmpxchg8b")


def initial(draw: st.DrawFn, world: World) -> None:
    """A random starting hierarchy, written before anything is watched."""
    guest, mode = world.guest, world.mode
    for cr3 in world.cr3s:
        root = mode.levels[0]
        for index in world.indices(root.number):
            if draw(st.booleans()):
                child = draw(st.sampled_from(POOL[2:]))
                guest.put(cr3 + index * mode.entry_size,
                          child | _rights(draw, world, root.number, False))
    for table in POOL[2:]:
        level_number = draw(st.sampled_from([level.number for level in mode.levels[1:]]))
        for index in world.indices(level_number):
            choice = draw(st.integers(0, 2))
            if choice == 1:
                child = draw(st.sampled_from(POOL[2:]))
                guest.put(table + index * mode.entry_size,
                          child | _rights(draw, world, level_number, False))
            elif choice == 2:
                level = mode.level(level_number)
                if level.is_leaf_level or level.may_map_large:
                    guest.put(table + index * mode.entry_size,
                              _leaf(draw, world, level_number, index))


def run(data: st.DataObject, paging: str, timing: str, steps: int) -> None:
    world = World(paging, timing)
    initial(data.draw, world)
    world.watch()
    world.check()
    for _ in range(steps):
        operation(data.draw, world)
        world.check()
        if not world.guest.monitor.handler.pending():
            for cr3 in world.cr3s:
                if data.draw(st.booleans()):
                    world.cr3_load(cr3)
            world.check()


@pytest.mark.parametrize("paging", ["4level", "pae", "legacy", "5level"])
@settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow,
                                                  HealthCheck.data_too_large])
@given(data=st.data())
def test_view_equals_walk_and_changes_rebuild_the_view(paging, data):
    run(data, paging, "cpu", 12)


@pytest.mark.parametrize("paging", ["4level", "pae"])
@settings(max_examples=12, suppress_health_check=[HealthCheck.too_slow,
                                                  HealthCheck.data_too_large])
@given(data=st.data())
def test_seed_timing_agrees_whenever_nothing_is_pending(paging, data):
    run(data, paging, "seed", 12)
