"""Decode one paging-structure entry into every field the SDM defines for it.

`decode_entry(mode, level, value)` reads a raw entry the way the CPU reads it
at that level (Intel SDM vol. 3A, 4.3 for 32-bit paging, 4.4.2 for PAE, 4.5.4
for 4-/5-level paging): flags, page size, frame or next-table address, memory
type bits, protection key, the bits left to software, and the reserved bits
that are set. A present entry with a reserved bit set makes the CPU raise a
page fault with PFEC.RSVD=1 instead of translating (SDM 4.7); a PAE PDPTE is
checked earlier, when MOV to CR3 loads it, and raises #GP there.

>>> from ptemu.paging.modes import paging_mode
>>> mode = paging_mode("4level")
>>> e = decode_entry(mode, mode.level(2), 0x8000_0000_3fe0_00e3)
>>> e.kind, hex(e.address), e.page_bytes, e.nx
(<EntryKind.PAGE: 'page'>, '0x3fe00000', 2097152, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ptemu.errors import UsageError
from ptemu.paging import bits
from ptemu.paging.modes import Bit7, EntryFormat, Level, ModeName, PagingMode, bit7_role

FieldValue = bool | int | str
"""What one named field of a decoded entry holds."""


class EntryKind(StrEnum):
    """What an entry does for translation."""

    NOT_PRESENT = "not-present"
    """P=0: the CPU ignores every other bit (software may keep anything there)."""
    TABLE = "table"
    """Present and references the next paging structure."""
    PAGE = "page"
    """Present and maps a page: a PTE, or a large page (PS=1) at a higher level."""


@dataclass(frozen=True, slots=True)
class DecodedEntry:
    """Every field the SDM defines for one entry at one level.

    A field the level does not have is None: a PAE PDPTE has no RW, US, A or
    XD; only entries that map a page have D, G, PAT and (4-/5-level) a
    protection key; XD exists only in 64-bit entries and only with
    IA32_EFER.NXE=1 (else bit 63 is reserved). For a not-present entry the
    fields still show what the bits would mean were P set, but the CPU
    ignores them, so `reserved_bits` is 0.
    """

    mode: ModeName
    level: Level
    value: int
    kind: EntryKind
    present: bool
    writable: bool | None
    """R/W (bit 1)."""
    user: bool | None
    """U/S (bit 2)."""
    pwt: bool
    """Page-level write-through (bit 3)."""
    pcd: bool
    """Page-level cache disable (bit 4)."""
    accessed: bool | None
    """A (bit 5)."""
    dirty: bool | None
    """D (bit 6), entries that map a page only."""
    page_size: bool | None
    """PS (bit 7) where bit 7 is the page-size bit (see `bit7_role`)."""
    global_page: bool | None
    """G (bit 8), entries that map a page only."""
    pat: bool | None
    """PAT: bit 7 of a PTE, bit 12 of a large-page entry."""
    nx: bool | None
    """XD / NX (bit 63) when the format has it and IA32_EFER.NXE=1."""
    protection_key: int | None
    """Bits 62:59 of a 4-/5-level entry that maps a page (used with CR4.PKE/PKS)."""
    software_bits: int
    """The bits the CPU ignores here (left to software), in place."""
    software_mask: int
    """Which bits those are at this level, for this kind of entry."""
    address: int
    """Physical address of the mapped page or of the next table."""
    page_bytes: int | None
    """Size of the page the entry maps (`kind` is `PAGE`), else None."""
    reserved_bits: int
    """Reserved bits that are set in a present entry: nonzero means the CPU
    faults with PFEC.RSVD=1 (SDM 4.7) rather than use the entry."""
    reserved_mask: int
    """Every bit reserved at this level for this kind of entry."""

    @property
    def maps_page(self) -> bool:
        """Present and maps a page (rather than referencing a table)."""
        return self.kind is EntryKind.PAGE

    @property
    def points_to_table(self) -> bool:
        """Present and references the next paging structure."""
        return self.kind is EntryKind.TABLE

    @property
    def reserved_fault(self) -> str:
        """What the CPU does when `reserved_bits` is nonzero (SDM 4.7, 4.4.1)."""
        if self.level.format is EntryFormat.PAE_PDPTE:
            return "#GP when MOV to CR3 loads the PDPTEs"
        return "#PF with PFEC.RSVD=1"

    @property
    def large(self) -> bool:
        """Maps a page larger than 4 KiB."""
        return self.maps_page and not self.level.is_leaf_level

    def fields(self) -> tuple[tuple[str, FieldValue], ...]:
        """The fields this level defines, in SDM bit order, for display.

        Fields the level does not have (None) are left out; integers are
        addresses, masks or the protection key.
        """
        named: tuple[tuple[str, FieldValue | None], ...] = (
            ("level", self.level.name),
            ("value", self.value),
            ("kind", self.kind.value),
            ("present", self.present),
            ("writable", self.writable),
            ("user", self.user),
            ("pwt", self.pwt),
            ("pcd", self.pcd),
            ("accessed", self.accessed),
            ("dirty", self.dirty),
            ("page_size", self.page_size),
            ("global", self.global_page),
            ("pat", self.pat),
            ("address", self.address),
            ("page_bytes", self.page_bytes),
            ("protection_key", self.protection_key),
            ("nx", self.nx),
            ("software_bits", self.software_bits),
            ("reserved_bits", self.reserved_bits),
        )
        return tuple((name, value) for name, value in named if value is not None)


def _maps_page(level: Level, value: int, role7: Bit7) -> bool:
    """Whether the entry, if present, maps a page (PTE, or PS=1 where PS exists)."""
    return level.is_leaf_level or (role7 is Bit7.PAGE_SIZE and bool(value & bits.PS))


def reserved_mask(mode: PagingMode, level: Level, *, maps_page: bool, nxe: bool = True,
                  pse: bool = True) -> int:
    """The bits reserved in an entry of `level` that does or does not map a page.

    From the SDM tables: 32-bit paging reserves only PDE bits 21:(M-19) of a
    4 MiB mapping, M = min(MAXPHYADDR, 40) (Table 4-4); a PAE PDPTE reserves
    2:1, 8:5 and 63:M (Table 4-8); PAE PDEs/PTEs reserve 62:M (Tables
    4-9..4-11); 4-/5-level entries reserve 51:M (Tables 4-14..4-20); bit 63 is
    reserved in 64-bit entries when IA32_EFER.NXE=0; bit 7 is reserved in a
    PML5E/PML4E; a large leaf reserves (page shift - 1):13.
    """
    m = mode.maxphyaddr
    large = maps_page and not level.is_leaf_level
    if level.format is EntryFormat.LEGACY:
        if large:
            pse36_bits = min(m, bits.PSE36_MAX_ADDRESS_BITS)
            return bits.bit_range(bits.LEGACY_4M_RESERVED_HIGH_BIT, pse36_bits - 19)
        return 0
    if level.format is EntryFormat.PAE_PDPTE:
        return bits.PAE_PDPTE_RESERVED_LOW | bits.bit_range(bits.PAE_PDPTE_HIGH_RESERVED_TOP, m)
    top = bits.PAE_HIGH_RESERVED_TOP if level.format is EntryFormat.PAE else (
        bits.LONG_HIGH_RESERVED_TOP)
    mask = bits.bit_range(top, m)
    if not nxe:
        mask |= bits.NX
    if bit7_role(level, pse=pse) is Bit7.RESERVED:
        mask |= bits.BIT7
    if large:
        mask |= bits.bit_range(level.shift - 1, bits.LARGE_PAGE_RESERVED_LOW)
    return mask


def software_mask(level: Level, *, maps_page: bool, pse: bool = True) -> int:
    """The bits the CPU ignores in an entry of `level` (SDM "Ignored" rows)."""
    if level.format is EntryFormat.PAE_PDPTE:
        return bits.IGNORED_LEAF_LOW
    if maps_page:
        mask = bits.IGNORED_LEAF_LOW
        if level.format is EntryFormat.LONG:
            mask |= bits.IGNORED_HIGH_LEAF
        return mask
    mask = bits.IGNORED_TABLE_LOW
    if bit7_role(level, pse=pse) is Bit7.IGNORED:
        mask |= bits.BIT7
    if level.format is EntryFormat.LONG:
        mask |= bits.IGNORED_HIGH_TABLE
    return mask


def address_mask(mode: PagingMode, level: Level, *, maps_page: bool) -> int:
    """The entry bits that hold the physical address (see `entry_address`)."""
    large = maps_page and not level.is_leaf_level
    if level.format is EntryFormat.LEGACY:
        if not large:
            return bits.LEGACY_ADDRESS_4K
        pse36_bits = min(mode.maxphyaddr, bits.PSE36_MAX_ADDRESS_BITS) - 32
        return bits.LEGACY_ADDRESS_4M_LOW | bits.bit_range(
            bits.PSE36_SHIFT + pse36_bits - 1, bits.PSE36_SHIFT)
    low_bit = level.shift if large else bits.PAGE_SHIFT_4K
    return bits.bit_range(mode.maxphyaddr - 1, low_bit)


def entry_address(mode: PagingMode, level: Level, value: int, *, maps_page: bool) -> int:
    """Physical address held by the entry: the mapped page, or the next table.

    A 4 MiB 32-bit mapping takes bits 31:22 from the PDE and, with PSE-36,
    physical-address bits (M-1):32 from PDE bits (M-20):13, M = min(MAXPHYADDR,
    40) (Table 4-4). Other entries hold bits (M-1):12, or (M-1):shift for a
    large page (bits below are PAT and reserved).
    """
    held = value & address_mask(mode, level, maps_page=maps_page)
    if level.format is EntryFormat.LEGACY and maps_page and not level.is_leaf_level:
        high = held & ~bits.LEGACY_ADDRESS_4M_LOW
        return (held & bits.LEGACY_ADDRESS_4M_LOW) | (high >> bits.PSE36_SHIFT << 32)
    return held


def _flag(value: int, bit: int) -> bool:
    return bool(value & bit)


def decode_entry(mode: PagingMode, level: Level, value: int, *, nxe: bool = True,
                 pse: bool = True) -> DecodedEntry:
    """Decode `value` as an entry of `level` in `mode`.

    `nxe` is IA32_EFER.NXE (with 0, bit 63 is reserved in 64-bit entries);
    `pse` is CR4.PSE, which only 32-bit paging consults (without it a PDE
    never maps a 4 MiB page). Raises `UsageError` when `value` does not fit in
    an entry or `level` is not one of `mode`'s levels.
    """
    if level not in mode.levels:
        raise UsageError(f"level {level.name} is not a level of paging mode {mode.name}")
    if isinstance(value, bool) or not 0 <= value < (1 << (8 * mode.entry_size)):
        raise UsageError(
            f"entry value {value!r} does not fit in a {mode.entry_size}-byte {mode.name} entry")
    role7 = bit7_role(level, pse=pse)
    maps_page = _maps_page(level, value, role7)
    present = _flag(value, bits.P)
    is_pdpte = level.format is EntryFormat.PAE_PDPTE
    has_nx = level.format in (EntryFormat.PAE, EntryFormat.LONG) and nxe
    large = maps_page and not level.is_leaf_level
    if maps_page:
        pat: bool | None = _flag(value, bits.PAT_LARGE if large else bits.PAT_PTE)
    else:
        pat = None
    soft_mask = software_mask(level, maps_page=maps_page, pse=pse)
    rsvd_mask = reserved_mask(mode, level, maps_page=maps_page, nxe=nxe, pse=pse)
    if not present:
        kind = EntryKind.NOT_PRESENT
    else:
        kind = EntryKind.PAGE if maps_page else EntryKind.TABLE
    return DecodedEntry(
        mode=mode.name,
        level=level,
        value=value,
        kind=kind,
        present=present,
        writable=None if is_pdpte else _flag(value, bits.RW),
        user=None if is_pdpte else _flag(value, bits.US),
        pwt=_flag(value, bits.PWT),
        pcd=_flag(value, bits.PCD),
        accessed=None if is_pdpte else _flag(value, bits.A),
        dirty=_flag(value, bits.D) if maps_page else None,
        page_size=_flag(value, bits.PS) if role7 is Bit7.PAGE_SIZE else None,
        global_page=_flag(value, bits.G) if maps_page else None,
        pat=pat,
        nx=_flag(value, bits.NX) if has_nx else None,
        protection_key=((value & bits.PK_MASK) >> bits.PK_SHIFT
                        if maps_page and level.format is EntryFormat.LONG else None),
        software_bits=value & soft_mask,
        software_mask=soft_mask,
        address=entry_address(mode, level, value, maps_page=maps_page),
        page_bytes=(level.entry_span if maps_page else None) if present else None,
        reserved_bits=(value & rsvd_mask) if present else 0,
        reserved_mask=rsvd_mask,
    )
