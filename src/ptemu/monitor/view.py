"""The monitor's own view of the watched paging structures.

Per address space (one root table, found from CR3) the view is a tree of
**positions**: a position is one table as that space reaches it by one path,
with the linear base it maps, the level it is read at and the rights the
entries above it grant. A position exists for every table that a watched
range reaches, at every level; entries outside the watched ranges are not
followed. The same page may hold several positions: a table shared by several
spaces (the kernel half of every process), a table linked twice, or a page read
at two levels.

Pages are reference-counted by positions: a page is protected (through the
`PageProtector`) when its first position appears, *before* its contents are
read, and unprotected when its last position goes. The view keeps a copy of
every protected page as it last saw it (`cache`): that copy is the "before" of
the next write, since by the time the monitor hears of a write, memory already
holds the "after".

**Self-reference.** An entry whose table is already on its own path (Windows'
self-map PML4E, or a loop a guest builds) is not descended: it is recorded
as unfollowed and its range reads as `Unfollowed("self-reference")`. Since
every walk has one entry per level, the tree is finite anyway; the rule keeps
the view from holding a second copy of the hierarchy per self-map and the
hierarchy from growing when a guest points many entries back up. The page is
protected already (it is on the path). **Budget.** Beyond `max_tables`
positions, a further table is unfollowed with reason ``table budget``: a guest
that links one table from every entry of every level could otherwise make the
tree 512**levels positions large.

**Loaded PAE PDPTEs.** The CPU reads the four PDPTEs at CR3 load and keeps
using them until the next one, so after a PDPTE write the directory the old
PDPTE linked is still walked by the CPU. With `retain_loaded_pdptes`, the
first write to a PDPTE since the last CR3 load keeps the subtree under the
old value as a *retained* position (per space and PDPTE index, so at most
four per space): its pages stay protected, its writes are followed and
reported (marked by `Position.retained`), and it is not part of the view,
which follows memory. `release_loaded` (the hypervisor saw a CR3 load) drops
them; so does a PDPTE written back to what the CPU loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from ptemu.errors import UsageError
from ptemu.memory import GuestMemory
from ptemu.monitor.codec import LevelCodec, codecs
from ptemu.monitor.protection import PageProtector
from ptemu.monitor.runs import RawRun, append_run, intersect, overlaps
from ptemu.monitor.translation import Translation, TranslationState, Unfollowed
from ptemu.paging.modes import EntryFormat, PagingMode
from ptemu.paging.translate import ALL_RIGHTS, AccessRights
from ptemu.values import PAGE_OFFSET_MASK, PAGE_SIZE

SELF_REFERENCE = Unfollowed("self-reference")
TABLE_BUDGET = Unfollowed("table budget")
DEFAULT_MAX_TABLES = 1 << 18
"""Positions the view holds at most (a whole 4-level space with 10**5 pages needs ~300)."""


class Position:
    """One table as one address space reaches it by one path."""

    __slots__ = ("base", "children", "level_index", "path", "retained", "rights", "space",
                 "table_gpa", "unfollowed")

    def __init__(self, space: Space, level_index: int, table_gpa: int, base: int,
                 rights: AccessRights, path: tuple[int, ...]) -> None:
        self.space = space
        """The address space this position belongs to."""
        self.level_index = level_index
        """Index into the mode's levels (0 = the root)."""
        self.table_gpa = table_gpa
        """Where the table starts (the PAE PDPT is 32-byte aligned, not page-aligned)."""
        self.base = base
        """Lowest flat linear address the table maps."""
        self.rights = rights
        """What the entries above this table grant together."""
        self.path = path
        """Page GPAs of the tables from the root down to this one."""
        self.children: dict[int, Position] = {}
        """Entry index -> the table that entry links (followed entries only)."""
        self.unfollowed: dict[int, Unfollowed] = {}
        """Entry index -> why the table that entry links is not followed."""
        self.retained = False
        """Reached through a PAE PDPTE the CPU loaded and memory no longer holds."""


@dataclass(slots=True)
class Space:
    """One address space: its root table, its watched ranges and its tree."""

    root_gpa: int
    intervals: list[tuple[int, int]]
    """Watched flat linear ranges, sorted and disjoint."""
    root: Position | None = None
    loaded: dict[int, int] = field(default_factory=dict)
    """PAE PDPTE index -> the value the CPU loaded at the last CR3 load, for the
    entries written since (the others: memory holds what the CPU loaded)."""
    retained: dict[int, Position] = field(default_factory=dict)
    """PAE PDPTE index -> the subtree under its `loaded` value (when it links a
    table the monitor follows)."""


_new_tuple = tuple.__new__
"""What a named tuple's own ``__new__`` calls (one Python frame less per build)."""


class EntryDifference(NamedTuple):
    """How one entry write changed the translation at one position (internal; a
    named tuple because one is built per changed entry, on the hot path)."""

    space: Space
    position: Position
    entry_index: int
    """Which entry of the position's table (`index` is tuple's own method)."""
    old: list[RawRun]
    new: list[RawRun]


LevelsChanged = Callable[[int, int | None], None]
"""Told ``(page gpa, level number or None)`` when the level a page is read at changes
(None: no longer a table, or read at several levels)."""
PageReleased = Callable[[int], None]
"""Called with a page's GPA once it is unprotected (its writes no longer exit)."""


class View:
    """Every watched space's tree of positions, the page references and the page copies."""

    def __init__(self, mode: PagingMode, memory: GuestMemory, protector: PageProtector, *,
                 nxe: bool = True, pse: bool = True, report_accessed_dirty: bool = False,
                 max_tables: int = DEFAULT_MAX_TABLES, retain_loaded_pdptes: bool = True,
                 levels_changed: LevelsChanged | None = None,
                 page_released: PageReleased | None = None) -> None:
        self.mode = mode
        self.memory = memory
        self.protector = protector
        self.nxe = nxe
        self.pse = pse
        self.report_accessed_dirty = report_accessed_dirty
        self.max_tables = max_tables
        self.retain_pdptes = retain_loaded_pdptes and any(
            level.format is EntryFormat.PAE_PDPTE for level in mode.levels)
        self.levels_changed = levels_changed
        self.page_released = page_released
        self.entry_size = mode.entry_size
        self.codecs: tuple[LevelCodec, ...] = codecs(
            mode, nxe=nxe, pse=pse, report_accessed_dirty=report_accessed_dirty)
        """Per level (indexed like ``mode.levels``): the entry masks, computed once."""
        self._table_bytes = tuple(level.entries * self.entry_size for level in mode.levels)
        self._shifts = tuple(level.shift for level in mode.levels)
        self._spans = tuple(level.entry_span for level in mode.levels)
        self.spaces: dict[int, Space] = {}
        self.pages: dict[int, list[Position]] = {}
        """Page GPA -> the positions on it: the reference count is the length."""
        self.cache: dict[int, bytearray] = {}
        """Page GPA -> its contents as the view last saw them."""
        self.tables = 0
        """Positions held now (what `max_tables` bounds)."""
        self.events: list[tuple[str, int]] = []
        """``("protect" | "unprotect", page)`` since the caller last cleared it."""

    # -- pages ----------------------------------------------------------------

    def _attach(self, position: Position) -> None:
        page = position.table_gpa & ~PAGE_OFFSET_MASK
        holders = self.pages.get(page)
        if holders is None:
            self.protector.protect(page)          # protect first ...
            self.events.append(("protect", page))
            self.cache[page] = bytearray(self.memory.read(page, PAGE_SIZE))  # ... then read
            self.pages[page] = holders = []
        holders.append(position)
        self.tables += 1
        self._levels_of(page, holders)

    def _detach(self, position: Position) -> None:
        """Remove `position` and everything below it."""
        for child in position.children.values():
            self._detach(child)
        page = position.table_gpa & ~PAGE_OFFSET_MASK
        holders = self.pages[page]
        holders.remove(position)
        self.tables -= 1
        if not holders:
            del self.pages[page]
            del self.cache[page]
            self.protector.unprotect(page)
            self.events.append(("unprotect", page))
            if self.page_released is not None:
                self.page_released(page)
        self._levels_of(page, holders)

    def _levels_of(self, page: int, holders: list[Position]) -> None:
        if self.levels_changed is None:
            return
        numbers = {self.mode.levels[p.level_index].number for p in holders}
        self.levels_changed(page, numbers.pop() if len(numbers) == 1 else None)

    def entry_value(self, position: Position, index: int) -> int:
        """Entry `index` of the table at `position`, as the view last saw it."""
        gpa = position.table_gpa + index * self.entry_size
        offset = gpa & PAGE_OFFSET_MASK
        data = self.cache[gpa & ~PAGE_OFFSET_MASK]
        return int.from_bytes(data[offset:offset + self.entry_size], "little")

    # -- building ---------------------------------------------------------------

    def build_space(self, space: Space) -> None:
        """(Re)build `space`'s tree over its intervals; pages still reached stay protected."""
        old = space.root
        old_retained = list(space.retained.values())
        space.root = None
        space.retained = {}
        if space.intervals:
            root = Position(space, 0, space.root_gpa, 0, ALL_RIGHTS,
                            (space.root_gpa & ~PAGE_OFFSET_MASK,))
            self._attach(root)
            self._follow_table(space, root)
            space.root = root
            for index, value in space.loaded.items():
                self._retain(space, root, index, value)
        else:
            space.loaded.clear()
        if old is not None:
            self._detach(old)
        for position in old_retained:
            self._detach(position)

    def release_loaded(self, space: Space) -> None:
        """The CPU loaded CR3 anew: what it uses is memory's PDPTEs; drop the retained."""
        retained = list(space.retained.values())
        space.loaded.clear()
        space.retained.clear()
        for position in retained:
            self._detach(position)

    def _retain(self, space: Space, root: Position, index: int, value: int) -> None:
        """Follow the subtree that PDPTE `index` holding `value` links, as retained."""
        codec = self.codecs[0]
        address = codec.link(value)
        if address is None:
            return
        start = root.base + (index << codec.level.shift)
        if not intersect(space.intervals, start, start + codec.level.entry_span):
            return
        page = address & ~PAGE_OFFSET_MASK
        if page in root.path or self.tables >= self.max_tables:
            return  # not followed, as in the view (self-reference, budget)
        child = Position(space, 1, address, start, codec.rights(root.rights, value),
                         (*root.path, page))
        child.retained = True
        self._attach(child)
        self._follow_table(space, child)
        space.retained[index] = child

    def _keep_loaded(self, space: Space, index: int, old_value: int, new_value: int,
                     child: Position | None, released: list[Position]) -> None:
        """PDPTE `index` of `space` changed from `old_value` to `new_value`; `child` is
        the subtree under the old value. Keep it as retained when the old value is the
        one the CPU loaded; release what the CPU no longer reaches."""
        if index not in space.loaded:
            space.loaded[index] = old_value
            if child is not None:
                space.retained[index] = child
                _mark_retained(child)
        elif child is not None:
            released.append(child)   # linked and dropped since the load: never loaded
        codec = self.codecs[0]
        if codec.link(new_value) == codec.link(space.loaded[index]):
            # Memory holds again what the CPU loaded: the view covers it.
            del space.loaded[index]
            kept = space.retained.pop(index, None)
            if kept is not None:
                released.append(kept)

    def _follow_table(self, space: Space, position: Position) -> None:
        level = self.mode.levels[position.level_index]
        end = position.base + level.table_span
        for low, high in intersect(space.intervals, position.base, end):
            first = (low - position.base) >> level.shift
            last = (high - 1 - position.base) >> level.shift
            for index in range(first, last + 1):
                if index not in position.children and index not in position.unfollowed:
                    self._follow(space, position, index)

    def _follow(self, space: Space, position: Position, index: int) -> None:
        """Link the table entry `index` references, if it references one."""
        value = self.entry_value(position, index)
        codec = self.codecs[position.level_index]
        address = codec.link(value)
        if address is None:
            return
        child_page = address & ~PAGE_OFFSET_MASK
        if child_page in position.path:
            position.unfollowed[index] = SELF_REFERENCE
            return
        if self.tables >= self.max_tables:
            position.unfollowed[index] = TABLE_BUDGET
            return
        level = self.mode.levels[position.level_index]
        child = Position(space, position.level_index + 1, address,
                         position.base + (index << level.shift),
                         codec.rights(position.rights, value), (*position.path, child_page))
        child.retained = position.retained
        self._attach(child)
        position.children[index] = child
        self._follow_table(space, child)

    # -- translations -------------------------------------------------------------

    def entry_runs(self, space: Space, position: Position, index: int) -> list[RawRun]:
        """Runs of entry `index` of `position`, clipped to the watched ranges."""
        level = self.mode.levels[position.level_index]
        start = position.base + (index << level.shift)
        runs: list[RawRun] = []
        for low, high in intersect(space.intervals, start, start + level.entry_span):
            self._runs_in(position, index, low, high, runs)
        return runs

    def space_runs(self, space: Space) -> list[RawRun]:
        """Runs of every watched range of `space`."""
        runs: list[RawRun] = []
        if space.root is not None:
            for low, high in space.intervals:
                self._table_runs(space.root, low, high, runs)
        return runs

    def _table_runs(self, position: Position, low: int, high: int, runs: list[RawRun]) -> None:
        level = self.mode.levels[position.level_index]
        first = (low - position.base) >> level.shift
        last = (high - 1 - position.base) >> level.shift
        for index in range(first, last + 1):
            start = position.base + (index << level.shift)
            self._runs_in(position, index, max(low, start), min(high, start + level.entry_span),
                          runs)

    def _runs_in(self, position: Position, index: int, low: int, high: int,
                 runs: list[RawRun]) -> None:
        """Append the runs of ``[low, high)``, inside the range of entry `index`."""
        value = self.entry_value(position, index)
        if not value & 1:
            append_run(runs, low, high, None)
            return
        codec = self.codecs[position.level_index]
        if codec.maps_page(value):
            translation = codec.leaf(value, position.rights)
            if translation is not None:
                start = position.base + (index << codec.level.shift)
                translation = translation.shifted(low - start)
            append_run(runs, low, high, translation)
        elif value & codec.table_reserved:
            append_run(runs, low, high, None)
        else:
            child = position.children.get(index)
            if child is None:
                append_run(runs, low, high, position.unfollowed[index])
            else:
                self._table_runs(child, low, high, runs)

    def translation(self, space: Space, gla: int) -> TranslationState:
        """What the view says the page at flat `gla` translates to."""
        position = space.root
        if position is None or not intersect(space.intervals, gla, gla + 1):
            raise UsageError(f"linear address {gla:#x} is not watched in space "
                             f"{space.root_gpa:#x}")
        while True:
            level = self.mode.levels[position.level_index]
            index = (gla - position.base) >> level.shift
            child = position.children.get(index)
            if child is None:
                runs: list[RawRun] = []
                self._runs_in(position, index, gla, gla + 1, runs)
                return runs[0][2]
            position = child

    # -- writes -----------------------------------------------------------------

    def holders(self, entry_gpa: int) -> list[tuple[Position, int]]:
        """Every (position, index) whose table holds the entry at `entry_gpa` and
        whose range a watch of that position's space covers."""
        found = []
        for position in self.pages.get(entry_gpa & ~PAGE_OFFSET_MASK, ()):
            offset = entry_gpa - position.table_gpa
            level_index = position.level_index
            if 0 <= offset < self._table_bytes[level_index]:
                index = offset // self.entry_size
                start = position.base + (index << self._shifts[level_index])
                end = start + self._spans[level_index]
                intervals = position.space.intervals
                # An entry outside the space's watched ranges is not followed.
                if (len(intervals) == 1 and intervals[0][0] < end and start < intervals[0][1]) \
                        or overlaps(intervals, start, end):
                    found.append((position, index))
        return found

    def is_pdpte(self, position: Position) -> bool:
        """Whether `position` is a PAE PDPT (its entries take effect at CR3 load)."""
        return self.mode.levels[position.level_index].format is EntryFormat.PAE_PDPTE

    def apply_entry(self, entry_gpa: int, new_value: int) -> tuple[int, list[EntryDifference]]:
        """Take entry `entry_gpa` as now holding `new_value`; return its old value and
        what changed at every position that reads it.

        Old runs come from the view before the update; the cache is updated once;
        then every position's subtree under the entry is rebuilt (new tables are
        protected before they are read) and the tables no longer reached are
        released last, so a table that moves stays protected throughout.
        """
        page = entry_gpa & ~PAGE_OFFSET_MASK
        offset = entry_gpa & PAGE_OFFSET_MASK
        end = offset + self.entry_size
        data = self.cache[page]
        old_value = int.from_bytes(data[offset:end], "little")
        codecs = self.codecs
        present = (old_value | new_value) & 1
        changed = old_value ^ new_value
        for position in self.pages[page]:
            # `LevelCodec.quiet`, inlined: one mask per level, no translation built.
            if present and changed & codecs[position.level_index].significant:
                break
        else:
            # Unchanged, or only A/D/G/ignored bits, or not present before and after,
            # for every reader of the page: nothing translates differently.
            data[offset:end] = new_value.to_bytes(self.entry_size, "little")
            return old_value, []
        found = self.holders(entry_gpa)
        links = False
        for position, _index in found:
            codec = codecs[position.level_index]
            if not codec.is_last and (codec.link(old_value) is not None
                                      or codec.link(new_value) is not None):
                links = True
                break
        if not links:
            # No table before or after (a leaf, or an entry that stays unused): no
            # subtree to rebuild, the entry's own translation is all that changes.
            data[offset:end] = new_value.to_bytes(self.entry_size, "little")
            return old_value, self._leaf_differences(found, old_value, new_value)
        holders = [(p.space, p, i) for p, i in found]
        before = []
        for space, position, index in holders:
            if self._same_subtree(position, old_value, new_value):
                continue
            before.append((space, position, index, self.entry_runs(space, position, index)))
        data[offset:end] = new_value.to_bytes(self.entry_size, "little")
        released: list[Position] = []
        for space, position, index, _old in before:
            child = position.children.pop(index, None)
            position.unfollowed.pop(index, None)
            if self.retain_pdptes and position.level_index == 0:
                # (the PAE root is the PDPT; a retained position is never a root)
                self._keep_loaded(space, index, old_value, new_value, child, released)
            elif child is not None:
                released.append(child)
            self._follow(space, position, index)
        for child in released:
            self._detach(child)
        differences = []
        for space, position, index, old in before:
            new = self.entry_runs(space, position, index)
            differences.append(EntryDifference(space, position, index, old, new))
        return old_value, differences

    def _leaf_differences(self, found: list[tuple[Position, int]], old_value: int,
                          new_value: int) -> list[EntryDifference]:
        """What an entry that links no table before or after changed at each holder:
        its own translation, computed from the two values (O(1) per holder)."""
        differences = []
        codecs = self.codecs
        shifts = self._shifts
        for position, index in found:
            level_index = position.level_index
            codec = codecs[level_index]
            # The translation each value gives as an entry that links no table (`link`
            # gave None): not present, or a table entry with a reserved bit set -> None.
            rights = position.rights
            old = codec.leaf(old_value, rights) if old_value & 1 and (
                codec.page_level or old_value & codec.large_bit) else None
            new = codec.leaf(new_value, rights) if new_value & 1 and (
                codec.page_level or new_value & codec.large_bit) else None
            # A different frame is a change: compare the rest only when the frames agree.
            if (old is None or new is None or old.frame == new.frame) and old == new:
                continue  # same frame and attributes (page size is not identity)
            space = position.space
            start = position.base + (index << shifts[level_index])
            end = start + codec.page_bytes
            intervals = space.intervals
            if len(intervals) == 1 and intervals[0][0] <= start and end <= intervals[0][1]:
                # Watched whole (one interval covers the entry): no clipping.
                differences.append(_new_tuple(EntryDifference, (
                    space, position, index, [(start, end, old)], [(start, end, new)])))
                continue
            parts = intersect(intervals, start, end)
            differences.append(EntryDifference(
                space, position, index,
                [(low, high, _shifted(old, low - start)) for low, high in parts],
                [(low, high, _shifted(new, low - start)) for low, high in parts]))
        return differences

    def _same_subtree(self, position: Position, old: int, new: int) -> bool:
        """Whether both values link the same table with the same rights (so nothing
        under the entry changed: A, PWT/PCD of a table entry or software bits did)."""
        codec = self.codecs[position.level_index]
        before = codec.link(old)
        return (before is not None and before == codec.link(new)
                and codec.rights(position.rights, old) == codec.rights(position.rights, new))


def _mark_retained(position: Position) -> None:
    position.retained = True
    for child in position.children.values():
        _mark_retained(child)


def _shifted(state: Translation | None, offset: int) -> Translation | None:
    return state if state is None else state.shifted(offset)
