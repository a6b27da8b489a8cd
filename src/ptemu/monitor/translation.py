"""What the translation monitor reports: translations, runs and changes.

A **translation** is what the CPU would use for a linear page (semantics.md
section 5): the guest-physical frame, the rights the levels grant together,
the protection key and the memory-type bits of the leaf. The page size is
shown but is not part of its identity, so splitting a 2 MiB page into 512 PTEs
that map the same frames with the same rights changes no translation.

A **run** is a range of linear addresses over which the translation is affine
(gpa = frame + offset from the run's start) with constant attributes: a large
page, or any number of consecutive pages that map consecutive frames the same
way, is one run. A range that does not translate is one run with translation
``None``; a range the monitor does not follow (see `Unfollowed`) is one run
with an `Unfollowed` value.

A **change** is one contiguous range of linear addresses whose translation
changed, clipped to the watched ranges, with its old and new translations as
runs and the entry write(s) that caused it. Dropping a PML4E is one change
(its old side may hold many runs); a write that changes nothing the CPU uses
(A/D alone, a software bit, a not-present entry staying not present) reports
none.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True, slots=True)
class Translation:
    """How the first page of a run translates (every further page: frame + offset)."""

    frame: int
    """Guest-physical address that the run's first linear address translates to
    (4 KiB aligned; the page base when the run starts at a page boundary)."""
    page_size: int = field(compare=False)
    """Size of the page(s) mapping the run: 4 KiB, 2 MiB, 4 MiB or 1 GiB. Shown, but
    not part of the identity (a split into same-frame PTEs is no change)."""
    writable: bool
    """R/W=1 at every level (SDM 4.6)."""
    user: bool
    """U/S=1 at every level."""
    executable: bool
    """XD=0 at every level (with IA32_EFER.NXE=0, always true)."""
    protection_key: int | None
    """Bits 62:59 of a 4-/5-level leaf; None in 32-bit and PAE paging."""
    pwt: bool
    """Page-level write-through of the leaf."""
    pcd: bool
    """Page-level cache disable of the leaf."""
    pat: bool
    """PAT bit of the leaf (bit 7 of a PTE, bit 12 of a large leaf)."""
    accessed: bool | None = None
    """A of the leaf, only when the monitor reports accessed/dirty changes."""
    dirty: bool | None = None
    """D of the leaf, only when the monitor reports accessed/dirty changes."""

    def shifted(self, offset: int) -> Translation:
        """The same translation seen from `offset` bytes further into the run."""
        return self if offset == 0 else replace(self, frame=self.frame + offset)

    def attributes(self) -> tuple[object, ...]:
        """Everything but the frame and the page size: what must be constant in a run."""
        return (self.writable, self.user, self.executable, self.protection_key, self.pwt,
                self.pcd, self.pat, self.accessed, self.dirty)


@dataclass(frozen=True, slots=True)
class Unfollowed:
    """A range the monitor does not follow, and why.

    ``self-reference``: the entry points to a table already on its own path
    from CR3 (Windows' self-map entry, or a loop a guest builds); the monitor
    neither descends into it nor reports changes under it. ``table budget``:
    following it would exceed the monitor's `max_tables`. Either way the CPU
    does translate these addresses: `TranslationMonitor.translation` says
    which ranges are unfollowed, and a walk of memory gives their translation.
    """

    reason: str


TranslationState = Translation | Unfollowed | None
"""What one range translates to: a translation, unfollowed, or nothing (no translation)."""


@dataclass(frozen=True, slots=True)
class Run:
    """Linear range ``[start, end)`` with one affine translation (or none)."""

    start: int
    end: int
    """One past the last byte (2**64 for the top of a 4-/5-level space)."""
    translation: TranslationState

    def translation_at(self, gla: int) -> TranslationState:
        """The translation of the page at `gla` (which must lie in the run)."""
        if isinstance(self.translation, Translation):
            return self.translation.shifted(gla - self.start)
        return self.translation


@dataclass(frozen=True, slots=True)
class EntryWrite:
    """One paging-structure entry whose write caused a change."""

    gpa: int
    """Guest-physical address of the entry."""
    level: int
    """The level the entry was read at for this change (1 = PTE .. 5 = PML5E)."""
    level_name: str
    """The SDM name of that level: PTE, PDE, PDPTE, PML4E, PML5E."""
    old: int
    """The entry as the monitor last saw it."""
    new: int
    """The entry as memory holds it now."""
    partial: bool
    """The entry's write state is partial: some of its bytes are still to be written."""


@dataclass(frozen=True, slots=True)
class TranslationChange:
    """One contiguous linear range of one address space whose translation changed."""

    cr3: int
    """The address space: the guest-physical address of its root table (CR3 without
    PCID and control bits; for PAE, the 32-byte aligned PDPT)."""
    start: int
    end: int
    """``[start, end)``, canonical; never crosses the 4-/5-level canonical hole."""
    old: tuple[Run, ...]
    """The translation before, as runs covering ``[start, end)``."""
    new: tuple[Run, ...]
    """The translation now, as runs covering ``[start, end)``."""
    cause: tuple[EntryWrite, ...]
    """The entry write(s) that caused the change."""
    partial: bool
    """Some causing entry is still partially written (reported at once, semantics.md
    section 5; never true with the seed's timing)."""
    at_cr3_load: bool
    """The cause is a PAE PDPTE: the CPU loads PDPTEs at MOV to CR3, so the change
    takes effect at the next CR3 load, not at the write."""
    until_cr3_load: bool = False
    """The change is in tables that the CPU still walks through PAE PDPTEs it loaded
    before a later PDPTE write: it holds until the next CR3 load, and the monitor's
    view (which follows memory) does not show it (`TranslationMonitor.cr3_loaded`)."""

    @property
    def size(self) -> int:
        """Bytes in the range."""
        return self.end - self.start

    def old_at(self, gla: int) -> TranslationState:
        """The old translation of the page at `gla` (inside the change)."""
        return _state_at(self.old, gla)

    def new_at(self, gla: int) -> TranslationState:
        """The new translation of the page at `gla` (inside the change)."""
        return _state_at(self.new, gla)


def _state_at(runs: tuple[Run, ...], gla: int) -> TranslationState:
    for run in runs:
        if run.start <= gla < run.end:
            return run.translation_at(gla)
    raise ValueError(f"{gla:#x} is outside the runs")
