"""What the monitor needs of an entry, read with masks precomputed per level.

`ptemu.paging.decode_entry` decodes every field the SDM defines (about 20 us
here: it builds a 25-field record and recomputes the masks of the level on
every call). The monitor needs only three questions answered, on every entry
of a subtree it (re)reads and twice per leaf write: does the entry link a
table (and which), what translation does it give as a leaf, and how does it
restrict the rights below it. `LevelCodec` answers them with the masks of its
level computed once, from the same functions `decode_entry` uses
(`reserved_mask`, `address_mask`, `entry_address`, `bit7_role`), so the two
cannot disagree on what is reserved or where the address is; the monitor's
tests check them against `decode_entry` on random values at every level of
every mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from ptemu.monitor.translation import Translation
from ptemu.paging import bits
from ptemu.paging.entry import address_mask, entry_address, reserved_mask, software_mask
from ptemu.paging.modes import Bit7, EntryFormat, Level, PagingMode, bit7_role
from ptemu.paging.translate import AccessRights

_NEW = object.__new__
_PK_MASK, _PK_SHIFT = bits.PK_MASK, bits.PK_SHIFT
_PWT_BIT, _PCD_BIT, _A_BIT, _D_BIT = bits.PWT, bits.PCD, bits.A, bits.D


class LevelCodec:
    """One level of one mode (with IA32_EFER.NXE and CR4.PSE as given), as masks."""

    __slots__ = ("_legacy_large", "_mode", "accessed_dirty", "is_last",
                 "large_bit", "level", "nx_mask", "page_address", "page_bytes",
                 "page_level", "page_reserved", "pat_bit", "pk", "rw_mask", "significant",
                 "table_address", "table_reserved", "us_mask")

    def __init__(self, mode: PagingMode, level: Level, *, nxe: bool, pse: bool,
                 report_accessed_dirty: bool) -> None:
        self._mode = mode
        self.level = level
        self.is_last = level is mode.levels[-1]
        """No entry here links a table (the PTE level)."""
        self.page_level = level.is_leaf_level
        """Every present entry here maps a page (`maps_page` without the PS test)."""
        role7 = bit7_role(level, pse=pse)
        self.large_bit = bits.PS if (role7 is Bit7.PAGE_SIZE and not level.is_leaf_level) else 0
        """PS where a present entry with it set maps a large page (0: no large pages)."""
        self.page_reserved = reserved_mask(mode, level, maps_page=True, nxe=nxe, pse=pse)
        self.table_reserved = reserved_mask(mode, level, maps_page=False, nxe=nxe, pse=pse)
        self.page_address = address_mask(mode, level, maps_page=True)
        self.table_address = address_mask(mode, level, maps_page=False)
        self._legacy_large = level.format is EntryFormat.LEGACY and not level.is_leaf_level
        """A 4 MiB page's address takes PSE-36 bits: `entry_address` computes it."""
        is_pdpte = level.format is EntryFormat.PAE_PDPTE
        self.rw_mask = 0 if is_pdpte else bits.RW
        """R/W where the level has it (a PAE PDPTE restricts nothing)."""
        self.us_mask = 0 if is_pdpte else bits.US
        self.nx_mask = bits.NX if (nxe and level.format in (EntryFormat.PAE, EntryFormat.LONG)) \
            else 0
        self.pat_bit = bits.PAT_PTE if level.is_leaf_level else bits.PAT_LARGE
        self.pk = level.format is EntryFormat.LONG
        self.page_bytes = level.entry_span
        self.accessed_dirty = report_accessed_dirty
        self.significant = _significant(mode, level, large_bit=self.large_bit, nxe=nxe,
                                        pse=pse, report_accessed_dirty=report_accessed_dirty)
        """Bits whose change can change what a present entry of this level gives (see
        `quiet`); every other bit is Accessed, Dirty, Global or ignored by the CPU."""

    def quiet(self, old: int, new: int) -> bool:
        """Whether turning `old` into `new` changes nothing the monitor reports, from
        the raw values alone: both not present, or only bits outside `significant`
        differ (then `link`, `rights`, `maps_page` and `leaf` agree on the two)."""
        return not (old | new) & 1 or not (old ^ new) & self.significant

    def maps_page(self, value: int) -> bool:
        """Whether a present `value` maps a page here (a PTE, or PS=1 where PS exists)."""
        return self.page_level or bool(value & self.large_bit)

    def link(self, value: int) -> int | None:
        """The table a used entry links (`decode_entry(...).address`), or None when the
        entry is not present, has a reserved bit set, or maps a page."""
        if not value & 1 or self.is_last or value & self.large_bit:
            return None
        if value & self.table_reserved:
            return None
        return value & self.table_address

    def rights(self, rights: AccessRights, value: int) -> AccessRights:
        """`combine_rights(rights, decode_entry(value))` without the decode."""
        writable = rights.writable and (not self.rw_mask or bool(value & self.rw_mask))
        user = rights.user and (not self.us_mask or bool(value & self.us_mask))
        executable = rights.executable and not value & self.nx_mask
        if writable is rights.writable and user is rights.user \
                and executable is rights.executable:
            return rights
        return AccessRights(writable=writable, user=user, executable=executable)

    def leaf(self, value: int, rights: AccessRights) -> Translation | None:
        """The translation of a present entry that maps a page with no reserved bit
        set, with `rights` (what the levels above grant) combined with its own;
        None when the entry is not present or has a reserved bit set.

        Only for an entry that maps a page (`maps_page`): a table entry is `link`'s.
        """
        if not value & 1 or value & self.page_reserved:
            return None
        if self._legacy_large and value & self.large_bit:
            frame = entry_address(self._mode, self.level, value, maps_page=True)
        else:
            frame = value & self.page_address
        # Translation is a frozen dataclass; set its slots directly (its __init__
        # goes through object.__setattr__ per field, three times slower). The
        # rights are `self.rights(rights, value)`, inlined (one call per leaf less).
        out = _NEW(Translation)
        _FRAME(out, frame)
        _SIZE(out, self.page_bytes)
        rw, us = self.rw_mask, self.us_mask
        _WRITABLE(out, rights.writable and (not rw or (value & rw) != 0))
        _USER(out, rights.user and (not us or (value & us) != 0))
        _EXECUTABLE(out, rights.executable and not value & self.nx_mask)
        _PK(out, (value & _PK_MASK) >> _PK_SHIFT if self.pk else None)
        _PWT(out, (value & _PWT_BIT) != 0)
        _PCD(out, (value & _PCD_BIT) != 0)
        _PAT(out, (value & self.pat_bit) != 0)
        if self.accessed_dirty:
            _ACCESSED(out, (value & _A_BIT) != 0)
            _DIRTY(out, (value & _D_BIT) != 0)
        else:
            _ACCESSED(out, None)
            _DIRTY(out, None)
        return out


def _significant(mode: PagingMode, level: Level, *, large_bit: int, nxe: bool, pse: bool,
                 report_accessed_dirty: bool) -> int:
    """The entry bits of `level` that can change a translation (`LevelCodec.significant`).

    The complement of what is *insignificant whatever the entry is*: for each
    role an entry of this level can take (a table entry; a page entry where the
    level maps pages), the bits no translation depends on (semantics.md section
    5: Accessed, Dirty, Global and the bits the CPU ignores, `software_mask`;
    the leaf's A and D count when they are reported), minus that role's reserved
    bits (a reserved bit set makes the entry stop translating); the roles'
    sets are intersected, since PS (significant) decides the role. Memory-type
    bits (PWT, PCD, PAT/bit 7) stay significant in every role, also in a table
    entry where they change nothing the CPU translates: conservative, and such a
    change still reports nothing (`View` compares the subtree's link and rights).
    """
    roles = [True] if level.is_leaf_level else [False, True] if large_bit else [False]
    insignificant = (1 << (8 * mode.entry_size)) - 1
    for maps_page in roles:
        free = software_mask(level, maps_page=maps_page, pse=pse) | bits.A
        if maps_page:
            free |= bits.D | bits.G
            if report_accessed_dirty:
                free &= ~(bits.A | bits.D)
        free &= ~reserved_mask(mode, level, maps_page=maps_page, nxe=nxe, pse=pse)
        insignificant &= free
    return ((1 << (8 * mode.entry_size)) - 1) & ~insignificant


def _setter(name: str) -> Callable[[Translation, object], None]:
    """The slot descriptor's setter of field `name` (bypasses the frozen check)."""
    return cast("Callable[[Translation, object], None]", vars(Translation)[name].__set__)


_FRAME = _setter("frame")
_SIZE = _setter("page_size")
_WRITABLE = _setter("writable")
_USER = _setter("user")
_EXECUTABLE = _setter("executable")
_PK = _setter("protection_key")
_PWT = _setter("pwt")
_PCD = _setter("pcd")
_PAT = _setter("pat")
_ACCESSED = _setter("accessed")
_DIRTY = _setter("dirty")


def codecs(mode: PagingMode, *, nxe: bool, pse: bool,
           report_accessed_dirty: bool) -> tuple[LevelCodec, ...]:
    """One codec per level of `mode`, root first (indexed like ``mode.levels``)."""
    return tuple(LevelCodec(mode, level, nxe=nxe, pse=pse,
                            report_accessed_dirty=report_accessed_dirty)
                 for level in mode.levels)
