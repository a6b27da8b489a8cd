"""Result records the handler returns: one per event, per write, per entry.

Widths are named explicitly: a `WriteRecord` has `old` = the whole entry
before the write but `value` = only the bytes written (the seed's buffer calls
these Old and New; we do not).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ptemu.status import EntryState, Status

if TYPE_CHECKING:
    from ptemu.paging.classify import Classification
    from ptemu.paging.modes import PagingMode


@dataclass(frozen=True, slots=True)
class WriteRecord:
    """The part of one emulated store that landed in one page-table entry."""

    gpa: int
    """Guest-physical address of the entry (entry-aligned)."""
    offset: int
    """Byte offset of the write inside the entry."""
    size: int
    """Bytes written inside this entry."""
    value: int
    """The bytes written, little-endian, as an integer."""
    old: int
    """The whole entry before this write."""

    @property
    def new_entry_bytes_mask(self) -> int:
        """Bit mask of the entry bits this write covered."""
        return ((1 << (8 * self.size)) - 1) << (8 * self.offset)


@dataclass(frozen=True, slots=True)
class EntryResult:
    """Where one entry stands after the write state saw an event's writes."""

    gpa: int
    state: EntryState
    old: int | None = None
    """Entry value before its first pending write (`COMPLETE` only)."""
    new: int | None = None
    """Entry value now (`COMPLETE` only)."""
    mode: PagingMode | None = field(default=None, repr=False, compare=False)
    """The paging mode the entry belongs to (what `change` reads it with)."""
    level: int | None = field(default=None, repr=False, compare=False)
    """The entry's level (1 = PTE) when the handler knows it."""

    @property
    def change(self) -> Classification | None:
        """What the completed write changed (`COMPLETE` only).

        Computed when asked: most callers of a busy handler only need the
        values, and classifying costs more than emulating a MOV.
        """
        if self.state is not EntryState.COMPLETE or self.mode is None \
                or self.old is None or self.new is None:
            return None
        from ptemu.paging.classify import classify

        return classify(self.mode, self.level, self.old, self.new)


@dataclass(frozen=True, slots=True)
class EventResult:
    """The outcome of one EPT write event."""

    status: Status
    writes: tuple[WriteRecord, ...] = ()
    entries: tuple[EntryResult, ...] = ()
    regs: Mapping[str, int] = field(default_factory=dict)
    """Registers whose value the emulation changed, with their new values."""
    undefined_flags: int = 0
    """RFLAGS bits the architecture leaves undefined for the emulated
    instruction(s): compare `regs['rflags']` only outside this mask."""
    instructions: int = 0
    """Instructions emulated: 2 when a PAE second half was coalesced."""
    reason: str = ""
    """Why the event was not emulated (empty when it was)."""
    fault: str | None = None
    """The exception the CPU raises instead (status `FAULT`), e.g. ``"#GP(0)"``."""
