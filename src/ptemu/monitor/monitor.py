"""`TranslationMonitor`: EPT write protection and translation changes over the handler.

An introspection engine asks to be told when the translation of chosen linear
ranges changes (`watch`, the seed's ``hook_pts``) or of a whole address space
or one half of it (`watch_space`, the seed's VAS monitor). The monitor walks
the hierarchy from CR3, protects every paging-structure page a watched range
reaches (through a `PageProtector`), and is what the hypervisor's EPT write
violation exit calls (`handle_ept_write`). It has the write emulated by its
`PtWriteHandler` and then, from memory as it now is, recomputes the
translation under every written entry and reports what changed
(semantics.md section 5).

**Timing.** ``timing="cpu"`` (the default) reports after every emulated
write, complete or partial, because the CPU uses an entry as memory holds it
even half-written; a change caused by a partially written entry is marked
``partial``, and a table a partial write links is protected at once.
``timing="seed"`` reports only when the handler completes an entry, as the
seed does; a partially written entry keeps its old value in the view until
then.

**PAE PDPTEs.** The CPU loads them at CR3 load: a PDPTE write is reported at
the write marked ``at_cr3_load``, and the tables the old PDPTE linked, which
the CPU walks until then, stay protected and report ``until_cr3_load``
changes until the hypervisor calls `cr3_loaded`.

Addresses: the API takes and reports canonical linear addresses; internally an
address space is one flat interval (4-/5-level addresses truncated to 48 or 57
bits). Watched ranges are widened to whole 4 KiB pages.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, TypeVar

from ptemu.engines import DEFAULT_ENGINE, Engine
from ptemu.errors import UsageError
from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.memory import GuestMemory
from ptemu.monitor.protection import PageProtector
from ptemu.monitor.runs import RawRun, append_run, clip, diff, intersect, union
from ptemu.monitor.translation import (
    EntryWrite,
    Run,
    Translation,
    TranslationChange,
    TranslationState,
)
from ptemu.monitor.view import DEFAULT_MAX_TABLES, EntryDifference, Space, View
from ptemu.paging.modes import EntryFormat, PagingMode, paging_mode
from ptemu.results import EntryResult, EventResult
from ptemu.status import EntryState, Policy, Status
from ptemu.values import PAGE_OFFSET_MASK, PAGE_SIZE
from ptemu.vcpu import Vcpu

Timing = Literal["cpu", "seed"]
TIMINGS: tuple[str, ...] = ("cpu", "seed")
SpaceRanges = Literal["all", "user", "kernel"] | Sequence[tuple[int, int]]
"""What `watch_space` watches: a half, the whole space, or explicit ``(gla, size)`` pairs."""
ChangeCallback = Callable[[TranslationChange], None]
"""Called once per change, clipped to the watch's own ranges."""


class MonitorStatus(StrEnum):
    """What the monitor did with one EPT write event."""

    HANDLED = "handled"
    """The page is protected: the handler ran (see `MonitorResult.event` for its status)."""
    NOT_PROTECTED = "not-protected"
    """The page is not protected by this monitor: nothing was emulated or changed.

    A real CPU does not exit for such a page; an event can still arrive when
    another vCPU's exit races with the monitor unprotecting the page. Resume
    the guest: it re-executes the instruction, now without an exit."""


@dataclass(frozen=True, slots=True)
class MonitorResult:
    """The outcome of one event (or `flush`) at the monitor."""

    status: MonitorStatus
    event: EventResult | None = None
    """The handler's result (None when the handler was not called)."""
    changes: tuple[TranslationChange, ...] = ()
    """Every change, per address space, clipped to the union of its watches."""
    protected: tuple[int, ...] = ()
    """Pages newly protected while handling it, in order."""
    unprotected: tuple[int, ...] = ()
    """Pages no longer protected afterwards, in order."""


@dataclass(frozen=True, slots=True, eq=False)
class WatchHandle:
    """One watch: give it back to `TranslationMonitor.unwatch`."""

    number: int
    cr3: int
    """The root table's guest-physical address (the space's identity)."""
    ranges: tuple[tuple[int, int], ...]
    """Watched canonical ``(start, end)`` ranges, page-aligned."""
    callback: ChangeCallback | None = field(repr=False)
    flat: tuple[tuple[int, int], ...] = field(repr=False)


@dataclass(slots=True)
class _Change:
    """A change on flat addresses, before it is made public."""

    space: Space
    start: int
    end: int
    old: list[RawRun]
    new: list[RawRun]
    cause: list[EntryWrite]
    partial: bool
    at_cr3_load: bool
    until_cr3_load: bool


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _locked(method: _Method) -> _Method:
    """Run `method` under the monitor's lock."""

    @functools.wraps(method)
    def run(self: TranslationMonitor, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


class TranslationMonitor:
    """Watches linear ranges of guest address spaces and reports translation changes.

    One monitor serves one guest (its memory, its paging mode) and owns its
    handler's write state. It is thread-safe: one reentrant lock per monitor
    serialises its public methods (a callback may call back into the monitor,
    to unwatch say), for the reasons the handler has one
    (docs/concurrency.md); the handler's own lock is then never contended.
    """

    def __init__(self, memory: GuestMemory, paging: str | PagingMode, protector: PageProtector,
                 *, handler: PtWriteHandler | None = None, timing: Timing | str = "cpu",
                 report_accessed_dirty: bool = False, nxe: bool = True, pse: bool = True,
                 policy: Policy | str = Policy.STRICT, engine: Engine | str = DEFAULT_ENGINE,
                 max_tables: int = DEFAULT_MAX_TABLES,
                 retain_loaded_pdptes: bool = True) -> None:
        """`handler` defaults to a new `PtWriteHandler` over `memory` (with `policy`
        and `engine`); a given one must use the same memory and paging mode. `nxe`
        (IA32_EFER.NXE) and `pse` (CR4.PSE, 32-bit paging only) are how the guest's
        entries are read. `report_accessed_dirty` makes a change of the leaf's A or D
        bit a change of translation. `retain_loaded_pdptes` (PAE) keeps the tables
        the CPU still reaches through the PDPTEs it loaded protected until
        `cr3_loaded` (see there); False unprotects them at the PDPTE write."""
        self._lock = threading.RLock()
        self.mode = paging if isinstance(paging, PagingMode) else paging_mode(paging)
        if timing not in TIMINGS:
            raise UsageError(f"unknown timing {timing!r}: expected one of {TIMINGS}")
        if isinstance(max_tables, bool) or not isinstance(max_tables, int) or max_tables < 1:
            raise UsageError(f"max_tables must be a positive integer, got {max_tables!r}")
        if handler is None:
            handler = PtWriteHandler(memory, self.mode, policy=policy, engine=engine)
        elif handler.memory is not memory or handler.mode.name != self.mode.name:
            raise UsageError("the handler given to the monitor must use the same guest "
                             "memory and paging mode")
        self.handler = handler
        self.memory = memory
        self.protector = protector
        self.timing: Timing = "cpu" if timing == "cpu" else "seed"
        self._seed = self.timing == "seed"
        self._view = View(self.mode, memory, protector, nxe=nxe, pse=pse,
                          report_accessed_dirty=report_accessed_dirty, max_tables=max_tables,
                          retain_loaded_pdptes=retain_loaded_pdptes,
                          levels_changed=self._level_changed,
                          page_released=self._page_released)
        self._watches: dict[int, list[WatchHandle]] = {}
        self._numbers = itertools.count(1)
        self._width = self.mode.linear_address_bits
        self._half = 1 << (self._width - 1)
        self._top = 1 << self._width
        self._has_hole = self.mode.canonical_sign_bit is not None
        self._sign_extension = (((1 << 64) - 1) ^ (self._top - 1)) if self._has_hole else 0
        """What `_canonical` ORs into a flat address in the upper half (4-/5-level)."""
        self._entry_size = self.mode.entry_size
        levels = self.mode.levels
        self._level_numbers = tuple(level.number for level in levels)
        self._level_names = tuple(level.name for level in levels)
        self._at_cr3_load = tuple(level.format is EntryFormat.PAE_PDPTE for level in levels)
        """Per level index: PAE PDPTEs take effect at the next CR3 load."""

    # -- watches ------------------------------------------------------------------

    @_locked
    def watch(self, cr3: int, gla: int, size: int,
              callback: ChangeCallback | None = None) -> WatchHandle:
        """Watch the translation of ``[gla, gla + size)`` in the space of `cr3`.

        Protects every paging-structure page the range reaches. Raises
        `UsageError` for a range that is empty, not canonical, or crosses the
        4-/5-level canonical hole.
        """
        return self._add(cr3, [self._flat_range(gla, size)], callback)

    @_locked
    def watch_space(self, cr3: int, callback: ChangeCallback | None = None,
                    ranges: SpaceRanges = "all", *, kernel_base: int | None = None,
                    ) -> WatchHandle:
        """Watch a whole address space (``"all"``), its user or kernel half, or
        explicit ``(gla, size)`` ranges of it.

        The halves split at `kernel_base`: by default the canonical hole in
        4-/5-level paging and 0x80000000 in 32-bit paging (pass 0xC0000000 for a
        Linux 3G/1G split).
        """
        top = 1 << self._width
        split = self._half if kernel_base is None else self._flat_range(kernel_base, 1)[0]
        if ranges == "all":
            flat = [(0, top)]
        elif ranges == "user":
            flat = [(0, split)]
        elif ranges == "kernel":
            flat = [(split, top)]
        elif isinstance(ranges, str):
            raise UsageError(f"unknown space range {ranges!r}: expected all, user, kernel "
                             "or (gla, size) pairs")
        else:
            flat = [self._flat_range(gla, size) for gla, size in ranges]
        return self._add(cr3, flat, callback)

    @_locked
    def unwatch(self, handle: WatchHandle) -> None:
        """Stop a watch; pages no other watch reaches are unprotected."""
        watches = self._watches.get(handle.cr3, [])
        if handle not in watches:
            raise UsageError(f"watch {handle.number} is not active")
        watches.remove(handle)
        space = self._view.spaces[handle.cr3]
        space.intervals = union([r for w in watches for r in w.flat])
        self._view.build_space(space)
        if not watches:
            del self._watches[handle.cr3]
            del self._view.spaces[handle.cr3]

    def _add(self, cr3: int, flat: list[tuple[int, int]],
             callback: ChangeCallback | None) -> WatchHandle:
        _check_cr3(cr3)
        if not flat:
            raise UsageError("a watch needs at least one range")
        root = self.mode.root_table_gpa(cr3)
        handle = WatchHandle(next(self._numbers), root,
                             tuple(self._canonical_ranges(union(flat))), callback,
                             tuple(union(flat)))
        watches = self._watches.setdefault(root, [])
        watches.append(handle)
        space = self._view.spaces.get(root)
        if space is None:
            space = self._view.spaces[root] = Space(root, [])
        space.intervals = union([r for w in watches for r in w.flat])
        self._view.build_space(space)
        return handle

    # -- events -------------------------------------------------------------------

    def handle_ept_write(self, vcpu: Vcpu, event: WriteEvent) -> MonitorResult:
        """Emulate one EPT write violation and report the translation changes.

        An event for a page this monitor does not protect returns
        `MonitorStatus.NOT_PROTECTED` and changes nothing (see there).
        """
        with self._lock:  # `_locked`, inlined: this is the hot path
            view = self._view
            if (event.gpa & ~PAGE_OFFSET_MASK) not in view.pages:
                return _result(MonitorStatus.NOT_PROTECTED, None, (), (), ())
            view.events.clear()
            result = self.handler.handle_ept_write(vcpu, event)
            if result.status is not Status.EMULATED:
                return _result(MonitorStatus.HANDLED, result, (), (), ())
            writes = result.writes
            # One entry written (a MOV to one entry): no de-duplication to do.
            written = (writes[0].gpa,) if len(writes) == 1 else tuple(
                dict.fromkeys(record.gpa for record in writes))
            seed = self._seed
            states = {entry.gpa: entry.state for entry in result.entries} if seed else None
            # Per written entry, not `handler.pending()` (which sorts every pending entry).
            write_state = self.handler.write_state
            changes: list[_Change] = []
            for entry_gpa in written:
                if states is not None and states.get(entry_gpa) is not EntryState.COMPLETE:
                    continue
                if (entry_gpa & ~PAGE_OFFSET_MASK) not in view.pages:
                    continue  # an earlier entry of the same event released this page
                # `_apply`, inlined.
                kept = write_state.get(entry_gpa)
                partial = kept is not None and kept.is_pending
                new_value = int.from_bytes(self.memory.read(entry_gpa, self._entry_size),
                                           "little")
                old_value, differences = view.apply_entry(entry_gpa, new_value)
                if len(differences) == 1 and len(written) == 1 and not view.events:
                    done = self._one_run_change(result, differences[0], entry_gpa, old_value,
                                                new_value, partial)
                    if done is not None:
                        return done
                for difference in differences:
                    self._collect(difference, entry_gpa, old_value, new_value, partial,
                                  changes)
            return self._finish(result, changes)

    def _one_run_change(self, result: EventResult, difference: EntryDifference,
                        entry_gpa: int, old_value: int, new_value: int, partial: bool,
                        ) -> MonitorResult | None:
        """`_collect` then `_finish` for the commonest event, a leaf write: one entry
        written, one changed run on each side over the same range, no page protected
        or unprotected. The same result, built without the general machinery;
        None when the event is not that case."""
        space, position, _index, old_runs, new_runs = difference
        if len(old_runs) != 1 or len(new_runs) != 1:
            return None
        (low, high, old_state), (new_low, new_high, new_state) = old_runs[0], new_runs[0]
        if low != new_low or high != new_high or (self._has_hole and low < self._half < high):
            return None
        if not (isinstance(old_state, Translation) and isinstance(new_state, Translation)
                and old_state.frame != new_state.frame) and old_state == new_state:
            return None  # (a different frame is a change: no full compare needed)
        level_index = position.level_index
        cause = _entry_write(entry_gpa, self._level_numbers[level_index],
                             self._level_names[level_index], old_value, new_value, partial)
        at_load = self._at_cr3_load[level_index]
        if high <= self._half or not self._has_hole:
            start, end = low, high   # `_canonical(low)`, `_end(high)` in the lower half
        else:
            start, end = self._canonical(low), self._end(high)
        change = _translation_change(space.root_gpa, start, end, (_run(start, end, old_state),),
                                     (_run(start, end, new_state),), (cause,), partial, at_load,
                                     position.retained)
        for handle in list(self._watches.get(space.root_gpa, ())):
            if handle.callback is None:
                continue
            for part_low, part_high in intersect(list(handle.flat), low, high):
                if part_low == low and part_high == high:
                    handle.callback(change)
                    continue
                general = _Change(space, low, high, list(old_runs), list(new_runs), [cause],
                                  partial, at_load, position.retained)
                for clipped in self._public(general, part_low, part_high):
                    handle.callback(clipped)
        if self._view.events:   # a callback called back in (unwatch): report its pages
            return self._with_events(result, [change])
        return _result(MonitorStatus.HANDLED, result, (change,), (), ())

    @_locked
    def flush(self, entry_gpa: int) -> MonitorResult:
        """Complete a pending entry in the handler (`PtWriteHandler.flush`) and report."""
        self._view.events.clear()
        outcome: EntryResult | None = self.handler.flush(entry_gpa)
        changes: list[_Change] = []
        if outcome is not None and (outcome.gpa & ~PAGE_OFFSET_MASK) in self._view.pages:
            self._apply(outcome.gpa, False, changes)
        return self._finish(None, changes)

    @_locked
    def cr3_loaded(self, cr3: int) -> MonitorResult:
        """Tell the monitor that the CPU now uses the PDPTEs memory holds for `cr3`.

        PAE only (elsewhere, and for a space not watched, nothing happens). The
        CPU loads the four PDPTEs at MOV to CR3 (and when CR0/CR4 paging bits
        change, and from the VMCS at VM entry with EPT), and walks the tables the
        loaded PDPTEs link until the next load. After a PDPTE write the monitor
        therefore keeps the tables under the old PDPTE protected (`retain_loaded_pdptes`)
        and reports their changes with ``until_cr3_load``. Call this when no vCPU
        holds PDPTEs of this space loaded before its last PDPTE write: after a CR3
        load on every vCPU that runs the space, or at once for a space no vCPU
        runs. It unprotects the tables no longer reached (`MonitorResult.unprotected`)
        and reports no change: the view already follows memory.
        """
        _check_cr3(cr3)
        self._view.events.clear()
        space = self._view.spaces.get(self.mode.root_table_gpa(cr3))
        if space is not None and space.loaded:
            self._view.release_loaded(space)
        return self._with_events(None, [])

    def _apply(self, entry_gpa: int, partial: bool, changes: list[_Change]) -> None:
        view = self._view
        if (entry_gpa & ~PAGE_OFFSET_MASK) not in view.pages:
            return  # an earlier entry of the same event released this page
        new_value = int.from_bytes(self.memory.read(entry_gpa, self._entry_size), "little")
        old_value, differences = view.apply_entry(entry_gpa, new_value)
        for difference in differences:
            self._collect(difference, entry_gpa, old_value, new_value, partial, changes)

    def _collect(self, difference: EntryDifference, entry_gpa: int, old_value: int,
                 new_value: int, partial: bool, changes: list[_Change]) -> None:
        level_index = difference.position.level_index
        cause = _entry_write(entry_gpa, self._level_numbers[level_index],
                             self._level_names[level_index], old_value, new_value, partial)
        at_load = self._at_cr3_load[level_index]
        until_load = difference.position.retained
        old_runs, new_runs = difference.old, difference.new
        if (len(old_runs) == 1 and len(new_runs) == 1 and old_runs[0][:2] == new_runs[0][:2]
                and old_runs[0][2] != new_runs[0][2]):
            # One entry's own translation (a leaf write): one range, changed throughout
            # (an affine run differs at every page or at none).
            differences = [(old_runs[0][0], old_runs[0][1], old_runs, new_runs)]
        else:
            differences = diff(old_runs, new_runs)
        for start, end, old, new in differences:
            last = changes[-1] if changes else None
            if (last is not None and last.space is difference.space and last.end == start
                    and last.partial == partial and last.at_cr3_load == at_load
                    and last.until_cr3_load == until_load):
                # One instruction writing consecutive entries: one contiguous change.
                for run in old:
                    append_run(last.old, *run)
                for run in new:
                    append_run(last.new, *run)
                last.end = end
                if cause not in last.cause:
                    last.cause.append(cause)
                continue
            changes.append(_Change(difference.space, start, end, old, new, [cause], partial,
                                   at_load, until_load))

    def _finish(self, result: EventResult | None, changes: list[_Change]) -> MonitorResult:
        public: list[TranslationChange] = []
        for change in changes:
            whole = self._public(change, change.start, change.end)
            public.extend(whole)
            for handle in list(self._watches.get(change.space.root_gpa, ())):
                if handle.callback is None:
                    continue
                for low, high in intersect(list(handle.flat), change.start, change.end):
                    # A watch that covers the whole change gets the same (frozen) records.
                    clipped = whole if low == change.start and high == change.end else (
                        self._public(change, low, high))
                    for one in clipped:
                        handle.callback(one)
        return self._with_events(result, public)

    def _with_events(self, result: EventResult | None,
                     public: list[TranslationChange]) -> MonitorResult:
        """The result of an event: its changes and the pages (un)protected meanwhile."""
        events = self._view.events
        if not events:
            return _result(MonitorStatus.HANDLED, result, tuple(public), (), ())
        return _result(
            MonitorStatus.HANDLED, result, tuple(public),
            tuple(page for op, page in events if op == "protect"),
            tuple(page for op, page in events if op == "unprotect"))

    # -- queries ------------------------------------------------------------------

    @_locked
    def translation(self, cr3: int, gla: int) -> TranslationState:
        """What the monitor's view says the page at `gla` translates to.

        Taken from the view (the entries as the monitor last saw them), not from
        memory: with ``timing="seed"`` it lags a pending partial write. Raises
        `UsageError` when `gla` is not watched in that space.
        """
        space = self._space(cr3)
        start, _end = self._flat_range(gla, 1)
        return self._view.translation(space, start)

    @_locked
    def runs(self, cr3: int) -> tuple[Run, ...]:
        """The view's translation of every watched range of the space, as runs."""
        space = self._space(cr3)
        runs = self._view.space_runs(space)
        return tuple(self._public_runs(runs, 0, 1 << self._width))

    @_locked
    def protected_pages(self) -> frozenset[int]:
        """Pages the monitor holds protected now."""
        return frozenset(self._view.pages)

    @_locked
    def watched(self) -> dict[int, tuple[WatchHandle, ...]]:
        """Active watches per space (root table GPA)."""
        return {root: tuple(watches) for root, watches in self._watches.items()}

    @property
    def table_levels(self) -> dict[int, int]:
        """Page GPA -> level, for every protected page read at a single level
        (what the handler is given to read bit 7 as PS or PAT)."""
        return dict(self.handler.table_levels)

    @property
    def tables(self) -> int:
        """Positions in the view (tables counted once per path that reaches them)."""
        return self._view.tables

    def _space(self, cr3: int) -> Space:
        space = self._view.spaces.get(self.mode.root_table_gpa(cr3))
        if space is None:
            raise UsageError(f"no watch on the address space of cr3 {cr3:#x}")
        return space

    def _level_changed(self, page: int, level: int | None) -> None:
        # The handler reads the level when it classifies a completed entry.
        self.handler.set_table_level(page, level)

    def _page_released(self, page: int) -> None:
        # Writes to the page no longer reach the handler: its write state there
        # would be stale when the page is a table again (a freed table reused).
        self.handler.forget_page(page)

    # -- addresses ----------------------------------------------------------------

    def _flat_range(self, gla: int, size: int) -> tuple[int, int]:
        """Page-aligned flat ``[start, end)`` of canonical ``[gla, gla + size)``."""
        mode = self.mode
        for value, what in ((gla, "linear address"), (size, "size")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(f"{what} {value!r} is not a non-negative integer")
        if size == 0:
            raise UsageError(f"watched range at {gla:#x} is empty")
        if gla >= mode.address_limit or not mode.is_canonical(gla):
            raise UsageError(f"linear address {gla:#x} is not canonical in {mode.name} paging")
        end = gla + size
        upper = mode.canonical_sign_bit is not None and gla >= self._half
        limit = mode.address_limit if upper or mode.canonical_sign_bit is None else self._half
        if end > limit:
            raise UsageError(f"range {gla:#x}+{size:#x} crosses the end of the "
                             f"{'canonical half' if limit == self._half else 'address space'}")
        flat = gla & ((1 << self._width) - 1)
        start = flat & ~PAGE_OFFSET_MASK
        stop = -(-(flat + size) // PAGE_SIZE) * PAGE_SIZE
        return start, stop

    def _canonical(self, flat: int) -> int:
        """`PagingMode.canonical` of a flat address (the top of the space: 2**64)."""
        if flat < self._half or not self._has_hole:
            return flat if flat < self._top else 1 << 64
        return flat | self._sign_extension if flat < self._top else 1 << 64

    def _canonical_ranges(self, flat: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out = []
        for low, high in flat:
            for part_low, part_high in self._split(low, high):
                out.append((self._canonical(part_low), self._end(part_high)))
        return out

    def _split(self, low: int, high: int) -> list[tuple[int, int]]:
        """``[low, high)`` cut at the canonical hole (4-/5-level paging)."""
        if not self._has_hole or not low < self._half < high:
            return [(low, high)]
        return [(low, self._half), (self._half, high)]

    def _end(self, flat_end: int) -> int:
        """Canonical form of an exclusive end."""
        return self._canonical(flat_end - 1) + 1

    def _public_runs(self, runs: list[RawRun], low: int, high: int) -> list[Run]:
        out = []
        if len(runs) == 1 and runs[0][0] == low and runs[0][1] == high and (
                not self._has_hole or not low < self._half < high):
            return [_run(self._canonical(low), self._end(high), runs[0][2])]
        for start, end, state in clip(runs, low, high):
            for part_low, part_high in self._split(start, end):
                part: TranslationState = state
                if isinstance(state, Translation):
                    part = state.shifted(part_low - start)
                out.append(Run(self._canonical(part_low), self._end(part_high), part))
        return out

    def _public(self, change: _Change, low: int, high: int) -> list[TranslationChange]:
        old, new = change.old, change.new
        if (len(old) == 1 and len(new) == 1 and old[0][0] == low == new[0][0]
                and old[0][1] == high == new[0][1]
                and (not self._has_hole or not low < self._half < high)):
            # One run each side covering exactly the range (a leaf write): what the
            # general path below gives, without clipping or splitting.
            start, end = self._canonical(low), self._end(high)
            return [_translation_change(
                change.space.root_gpa, start, end, (_run(start, end, old[0][2]),),
                (_run(start, end, new[0][2]),), tuple(change.cause), change.partial,
                change.at_cr3_load, change.until_cr3_load)]
        out = []
        for part_low, part_high in self._split(low, high):
            out.append(_translation_change(
                change.space.root_gpa, self._canonical(part_low), self._end(part_high),
                tuple(self._public_runs(change.old, part_low, part_high)),
                tuple(self._public_runs(change.new, part_low, part_high)),
                tuple(change.cause), change.partial, change.at_cr3_load,
                change.until_cr3_load))
        return out


def _check_cr3(cr3: object) -> None:
    if isinstance(cr3, bool) or not isinstance(cr3, int) or not 0 <= cr3 < (1 << 64):
        raise UsageError(f"cr3 {cr3!r} is not a 64-bit value")


# -- cheap construction of the public frozen records ------------------------------------
#
# A frozen dataclass's __init__ sets each field through object.__setattr__ (a
# type lookup and the frozen check per field); on the leaf-write path the
# monitor builds five such records per event. These build the same objects
# through the slot descriptors' setters: same class, same fields, same
# equality (tests/monitor/test_monitor_units.py compares each with the
# ordinary constructor). Keep each in step with its class's fields.

_NEW = object.__new__


def _slot(cls: type, name: str) -> Callable[[object, object], None]:
    setter: Callable[[object, object], None] = vars(cls)[name].__set__
    return setter


_R_STATUS, _R_EVENT, _R_CHANGES, _R_PROTECTED, _R_UNPROTECTED = (
    _slot(MonitorResult, name)
    for name in ("status", "event", "changes", "protected", "unprotected"))


def _result(status: MonitorStatus, event: EventResult | None,
            changes: tuple[TranslationChange, ...], protected: tuple[int, ...],
            unprotected: tuple[int, ...]) -> MonitorResult:
    """`MonitorResult(status, event, changes, protected, unprotected)`, built cheaply."""
    out = _NEW(MonitorResult)
    _R_STATUS(out, status)
    _R_EVENT(out, event)
    _R_CHANGES(out, changes)
    _R_PROTECTED(out, protected)
    _R_UNPROTECTED(out, unprotected)
    return out


_RUN_START, _RUN_END, _RUN_TRANSLATION = (_slot(Run, name)
                                          for name in ("start", "end", "translation"))


def _run(start: int, end: int, translation: TranslationState) -> Run:
    """`Run(start, end, translation)`, built cheaply."""
    out = _NEW(Run)
    _RUN_START(out, start)
    _RUN_END(out, end)
    _RUN_TRANSLATION(out, translation)
    return out


_C_CR3, _C_START, _C_END, _C_OLD, _C_NEW, _C_CAUSE, _C_PARTIAL, _C_AT_LOAD, _C_UNTIL_LOAD = (
    _slot(TranslationChange, name)
    for name in ("cr3", "start", "end", "old", "new", "cause", "partial", "at_cr3_load",
                 "until_cr3_load"))


def _translation_change(cr3: int, start: int, end: int, old: tuple[Run, ...],
                        new: tuple[Run, ...], cause: tuple[EntryWrite, ...], partial: bool,
                        at_cr3_load: bool, until_cr3_load: bool) -> TranslationChange:
    """`TranslationChange(...)` with the fields in declaration order, built cheaply."""
    out = _NEW(TranslationChange)
    _C_CR3(out, cr3)
    _C_START(out, start)
    _C_END(out, end)
    _C_OLD(out, old)
    _C_NEW(out, new)
    _C_CAUSE(out, cause)
    _C_PARTIAL(out, partial)
    _C_AT_LOAD(out, at_cr3_load)
    _C_UNTIL_LOAD(out, until_cr3_load)
    return out


_W_GPA, _W_LEVEL, _W_NAME, _W_OLD, _W_NEW, _W_PARTIAL = (
    _slot(EntryWrite, name) for name in ("gpa", "level", "level_name", "old", "new", "partial"))


def _entry_write(gpa: int, level: int, level_name: str, old: int, new: int,
                 partial: bool) -> EntryWrite:
    """`EntryWrite(gpa, level, level_name, old, new, partial)`, built cheaply."""
    out = _NEW(EntryWrite)
    _W_GPA(out, gpa)
    _W_LEVEL(out, level)
    _W_NAME(out, level_name)
    _W_OLD(out, old)
    _W_NEW(out, new)
    _W_PARTIAL(out, partial)
    return out
