"""What a completed entry write changed, in the words of semantics.md section 4.

`classify(mode, level, old, new)` compares the whole entry before and after a
write and names the changes:

- ``map`` / ``unmap``: P went 0 -> 1 / 1 -> 0. The other bits of a
  not-present entry mean nothing to the CPU, so a P change is reported alone.
- both values present: ``remap`` (the page or table address changed),
  ``protect`` (R/W, U/S, XD or the protection key changed), ``cache`` (PWT,
  PCD or PAT changed), ``large`` (PS changed), ``accessed-dirty`` (A/D are
  the only bits that changed), ``other`` (some changed bit is none of these:
  G, software bits, reserved bits). A/D changes that come with another kind
  are part of that change, not ``other``.
- both values not present: ``other``.
- ``old == new``: no kinds at all (an empty set): nothing changed.

**When the level is unknown** (``level=None``; a handler usually knows only
that a page-table page was written) the entry is read in the PTE layout of
the mode (bit 12 is a frame bit, D, G and PAT are meaningful), and a change of
bit 7 is reported as both ``cache`` (PTE.PAT) and ``large`` (PS of a PDE or
PDPTE), because without the level nobody can tell which it is. Pass the level
for an exact answer.

`swap_callbacks` says whether the seed would run its swap callbacks for this
write: a bit of ``HOOK_PTS_MONITORED_BITS`` (P, RW, US, PS and bits 51:12,
applied raw at every level) changed and at least one of the two values is
present. It does not depend on the level.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ptemu.errors import UsageError
from ptemu.paging import bits
from ptemu.paging.entry import DecodedEntry, address_mask, decode_entry
from ptemu.paging.modes import Bit7, Level, PagingMode, bit7_role


class ChangeKind(StrEnum):
    """One kind of change a write made to an entry (semantics.md section 4)."""

    MAP = "map"
    UNMAP = "unmap"
    REMAP = "remap"
    PROTECT = "protect"
    CACHE = "cache"
    LARGE = "large"
    ACCESSED_DIRTY = "accessed-dirty"
    OTHER = "other"


_ORDER: tuple[ChangeKind, ...] = tuple(ChangeKind)


@dataclass(frozen=True, slots=True)
class Classification:
    """The changes one completed entry write made, and the seed's verdict."""

    kinds: frozenset[ChangeKind]
    """Empty when ``old == new``."""
    swap_callbacks: bool
    """Whether the seed's swap callbacks would run (see the module docstring)."""
    old: int
    new: int
    level: str | None
    """SDM name of the level the entry was read at, None when unknown."""

    def ordered_kinds(self) -> tuple[ChangeKind, ...]:
        """`kinds` in the fixed order of `ChangeKind`."""
        return tuple(kind for kind in _ORDER if kind in self.kinds)

    def describe(self) -> str:
        """Short text such as ``"remap, large (seed swap callbacks fire)"``."""
        text = ", ".join(kind.value for kind in self.ordered_kinds()) or "no change"
        if self.level is None:
            text += " [level unknown]"
        if self.swap_callbacks:
            text += " (seed swap callbacks fire)"
        return text


def seed_swap_callbacks(old: int, new: int) -> bool:
    """The seed's test: a monitored bit changed and old or new is present."""
    return bool((old ^ new) & bits.SEED_MONITORED_BITS) and bool((old | new) & bits.P)


def _both(a: bool | int | None, b: bool | int | None) -> bool:
    """Whether a field exists in both readings and differs."""
    return a is not None and b is not None and a != b


def _pat_bit(entry: DecodedEntry) -> int:
    if entry.pat is None:
        return 0
    return bits.PAT_PTE if entry.level.is_leaf_level else bits.PAT_LARGE


def _present_changes(mode: PagingMode, o: DecodedEntry, n: DecodedEntry,
                     pse: bool) -> set[ChangeKind]:
    """Kinds for two present values of the same entry."""
    level = o.level
    changed = o.value ^ n.value
    kinds: set[ChangeKind] = set()
    explained = 0
    if bit7_role(level, pse=pse) is Bit7.PAGE_SIZE:
        explained |= bits.PS
        if o.page_size != n.page_size:
            kinds.add(ChangeKind.LARGE)
    explained |= (address_mask(mode, level, maps_page=o.maps_page)
                  | address_mask(mode, level, maps_page=n.maps_page))
    if o.address != n.address:
        kinds.add(ChangeKind.REMAP)
    protect_bits = bits.RW | bits.US
    if o.nx is not None:
        protect_bits |= bits.NX
    if o.protection_key is not None and n.protection_key is not None:
        protect_bits |= bits.PK_MASK
    if (_both(o.writable, n.writable) or _both(o.user, n.user) or _both(o.nx, n.nx)
            or _both(o.protection_key, n.protection_key)):
        kinds.add(ChangeKind.PROTECT)
    explained |= protect_bits
    cache_bits = bits.PWT | bits.PCD | _pat_bit(o) | _pat_bit(n)
    if o.pwt != n.pwt or o.pcd != n.pcd or _both(o.pat, n.pat):
        kinds.add(ChangeKind.CACHE)
    explained |= cache_bits
    ad_bits = 0 if o.accessed is None else bits.A
    if o.dirty is not None and n.dirty is not None:
        ad_bits |= bits.D
    explained |= ad_bits
    if changed & ~explained:
        kinds.add(ChangeKind.OTHER)
    if not kinds and changed & ad_bits:
        kinds.add(ChangeKind.ACCESSED_DIRTY)
    return kinds


def _resolve_level(mode: PagingMode, level: Level | int | None) -> Level | None:
    if level is None or isinstance(level, Level):
        if level is not None and level not in mode.levels:
            raise UsageError(f"level {level.name} is not a level of paging mode {mode.name}")
        return level
    return mode.level(level)


def classify(mode: PagingMode, level: Level | int | None, old: int, new: int, *,
             nxe: bool = True, pse: bool = True) -> Classification:
    """Name what changed between `old` and `new`, two values of one entry.

    `level` is a `Level` of `mode`, its number (1 = PTE), or None when the
    caller does not know it (read the module docstring for that rule).
    `nxe` and `pse` are IA32_EFER.NXE and CR4.PSE as in `decode_entry`.
    Raises `UsageError` for a value that does not fit an entry of `mode`.
    """
    known = _resolve_level(mode, level)
    reading = known if known is not None else mode.level(1)
    o = decode_entry(mode, reading, old, nxe=nxe, pse=pse)
    n = decode_entry(mode, reading, new, nxe=nxe, pse=pse)
    kinds: set[ChangeKind] = set()
    if old != new:
        if o.present != n.present:
            kinds.add(ChangeKind.MAP if n.present else ChangeKind.UNMAP)
        elif not o.present:
            kinds.add(ChangeKind.OTHER)
        else:
            kinds = _present_changes(mode, o, n, pse)
            if known is None and (old ^ new) & bits.BIT7:
                kinds.add(ChangeKind.LARGE)
    return Classification(
        kinds=frozenset(kinds),
        swap_callbacks=seed_swap_callbacks(old, new),
        old=old,
        new=new,
        level=None if known is None else known.name,
    )
