"""The four x86 paging modes as data: levels, widths and entry formats.

One walk and one decoder serve every mode; what differs between modes is in
these values. 5-level paging is 4-level paging with a PML5 in front, and the
PAE PDPT is an ordinary level with 2 index bits and its own entry format.

Levels are numbered from the leaf, as the CLI's ``--level N`` takes them:
1 = PTE, 2 = PDE, 3 = PDPTE, 4 = PML4E, 5 = PML5E. A mode's ``levels`` tuple is
ordered root first (the order of a walk).

>>> mode = paging_mode("4level")
>>> [level.name for level in mode.levels]
['PML4E', 'PDPTE', 'PDE', 'PTE']
>>> mode.level(2).large_page_size
2097152
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ptemu.errors import UsageError
from ptemu.paging import bits


class ModeName(StrEnum):
    """The paging modes ptemu knows, with their fixture/CLI spellings."""

    LEGACY = "legacy"
    """32-bit paging (CR4.PAE=0), 4-byte entries, 4 MiB pages with CR4.PSE (SDM 4.3)."""
    PAE = "pae"
    """PAE paging (CR4.PAE=1, IA32_EFER.LME=0), 8-byte entries (SDM 4.4)."""
    LEVEL4 = "4level"
    """4-level paging (IA32_EFER.LME=1, CR4.LA57=0), 48-bit linear addresses (SDM 4.5)."""
    LEVEL5 = "5level"
    """5-level paging (CR4.LA57=1), 57-bit linear addresses (SDM 4.5)."""


class EntryFormat(StrEnum):
    """Which family of SDM tables describes an entry's bits."""

    LEGACY = "32-bit"
    """4-byte entries of 32-bit paging (Tables 4-4, 4-5, 4-6)."""
    PAE_PDPTE = "pae-pdpte"
    """The four PDPTEs of PAE paging (Table 4-8): no RW, US, A or XD."""
    PAE = "pae"
    """8-byte PAE PDEs and PTEs (Tables 4-9, 4-10, 4-11): bits 62:M reserved."""
    LONG = "4/5-level"
    """8-byte 4-/5-level entries (Tables 4-14..4-20): bits 62:52 ignored or PK."""


class Bit7(StrEnum):
    """What bit 7 of an entry means at a given level."""

    PAGE_SIZE = "PS"
    """Page size: 1 = the entry maps a large page."""
    PAT = "PAT"
    """PTE memory-type bit."""
    RESERVED = "reserved"
    """Must be 0 (PML5E, PML4E, PAE PDPTE): 1 is a reserved-bit fault."""
    IGNORED = "ignored"
    """32-bit PDE with CR4.PSE=0: bit 7 has no meaning (Table 4-5)."""


@dataclass(frozen=True, slots=True)
class Level:
    """One level of a paging hierarchy.

    An entry at this level is selected by linear-address bits
    ``shift + index_bits - 1 : shift`` and controls a region of ``1 << shift``
    bytes; when `may_map_large` the entry can map that whole region as one page.
    """

    name: str
    """The SDM's name of an entry at this level: PML5E, PML4E, PDPTE, PDE, PTE."""
    number: int
    """Position counted from the leaf: 1 = PTE, 2 = PDE, 3 = PDPTE, 4 = PML4E, 5 = PML5E."""
    shift: int
    """Lowest linear-address bit of this level's index."""
    index_bits: int
    """Width of the index: 10 (32-bit paging), 9, or 2 (PAE PDPT)."""
    may_map_large: bool
    """Whether an entry here may map a page of ``1 << shift`` bytes (PS=1)."""
    format: EntryFormat
    """The SDM table family of this level's entries."""

    @property
    def entries(self) -> int:
        """Number of entries in one table of this level."""
        return 1 << self.index_bits

    @property
    def entry_span(self) -> int:
        """Bytes of linear-address space one entry controls."""
        return 1 << self.shift

    @property
    def table_span(self) -> int:
        """Bytes of linear-address space one whole table of this level controls."""
        return 1 << (self.shift + self.index_bits)

    @property
    def is_leaf_level(self) -> bool:
        """True for the PTE level, where every present entry maps a 4 KiB page."""
        return self.number == 1

    @property
    def large_page_size(self) -> int | None:
        """Size of the page a PS=1 entry maps here, or None if none may."""
        return self.entry_span if self.may_map_large else None

    def index_of(self, gla: int) -> int:
        """The index of the entry that translates linear address `gla`."""
        return (gla >> self.shift) & (self.entries - 1)


def bit7_role(level: Level, *, pse: bool = True) -> Bit7:
    """What bit 7 means in an entry of `level`: the one place that decides it.

    PAT in a PTE (Tables 4-6, 4-11, 4-20); PS where a large page may be mapped
    (Tables 4-4/4-5, 4-9/4-10, 4-16..4-19), except in a 32-bit PDE with
    CR4.PSE=0, where it is ignored (Table 4-5); reserved in a PML5E or PML4E
    (Tables 4-14, 4-15) and in a PAE PDPTE (Table 4-8, bits 8:5).
    """
    if level.is_leaf_level:
        return Bit7.PAT
    if level.may_map_large:
        if level.format is EntryFormat.LEGACY and not pse:
            return Bit7.IGNORED
        return Bit7.PAGE_SIZE
    return Bit7.RESERVED


DEFAULT_MAXPHYADDR = bits.PHYSICAL_ADDRESS_BITS_MAX
"""MAXPHYADDR when none is given: 52, the architectural maximum (SDM 4.1.4).

The largest value never reports as reserved an address bit that some CPU
accepts; give the CPU's own value (CPUID.80000008H:EAX[7:0], e.g. 39 or 46 on
Intel client parts) to check reserved bits exactly."""

MIN_MAXPHYADDR = 32
"""Smallest MAXPHYADDR accepted: every CPU with paging reaches 4 GiB."""


@dataclass(frozen=True, slots=True)
class PagingMode:
    """One paging mode: entry size, address widths and its levels, root first."""

    name: ModeName
    entry_size: int
    """Bytes per entry: 4 for 32-bit paging, 8 otherwise."""
    linear_address_bits: int
    """32, 32, 48 or 57. 4-/5-level addresses must be canonical (sign-extended)."""
    levels: tuple[Level, ...]
    """Root first: the order in which a walk reads them."""
    maxphyaddr: int
    """Physical-address width M (SDM 4.1.4): entry bits M and above are reserved."""

    @property
    def root(self) -> Level:
        """The level CR3 points to."""
        return self.levels[0]

    @property
    def canonical_sign_bit(self) -> int | None:
        """Bit whose value bits 63 and up must copy, or None in 32-bit modes."""
        if self.name in (ModeName.LEVEL4, ModeName.LEVEL5):
            return self.linear_address_bits - 1
        return None

    @property
    def address_limit(self) -> int:
        """One past the largest linear address a caller may pass (2**32 or 2**64)."""
        return 1 << (32 if self.canonical_sign_bit is None else 64)

    def level(self, number: int) -> Level:
        """The level numbered `number` from the leaf (1 = PTE). Raises `UsageError`."""
        for level in self.levels:
            if level.number == number:
                return level
        raise UsageError(
            f"paging mode {self.name}: no level {number} "
            f"(levels are 1 = PTE .. {len(self.levels)} = {self.root.name})"
        )

    def level_named(self, name: str) -> Level:
        """The level whose entries the SDM calls `name` (``"PDE"``). Raises `UsageError`."""
        for level in self.levels:
            if level.name == name.upper():
                return level
        names = ", ".join(level.name for level in self.levels)
        raise UsageError(f"paging mode {self.name}: no level {name!r} (levels: {names})")

    def is_canonical(self, gla: int) -> bool:
        """Whether `gla` is canonical: bits 63:N-1 all equal (4-/5-level only, SDM 3.3.7.1)."""
        sign_bit = self.canonical_sign_bit
        if sign_bit is None:
            return 0 <= gla < (1 << 32)
        top = gla >> sign_bit
        return top in (0, (1 << (64 - sign_bit)) - 1)

    def canonical(self, linear: int) -> int:
        """Sign-extend the low `linear_address_bits` of `linear` (identity in 32-bit modes)."""
        width = self.linear_address_bits
        linear &= (1 << width) - 1
        if self.canonical_sign_bit is not None and linear >> (width - 1):
            linear |= ((1 << 64) - 1) ^ ((1 << width) - 1)
        return linear

    def root_table_gpa(self, cr3: int) -> int:
        """Guest-physical address of the root table that CR3 locates.

        32-bit paging: bits 31:12 (Table 4-3). PAE: bits 31:5, the 32-byte
        aligned PDPT (Table 4-7). 4-/5-level: bits M-1:12 (Table 4-12); bits 11:0
        (PCID or PWT/PCD) and 63:M (control bits such as no-flush) are not address.
        """
        if self.name is ModeName.LEGACY:
            return cr3 & bits.CR3_LEGACY_TABLE
        if self.name is ModeName.PAE:
            return cr3 & bits.CR3_PAE_TABLE
        return cr3 & bits.bit_range(self.maxphyaddr - 1, bits.PAGE_SHIFT_4K)

    @property
    def root_table_size(self) -> int:
        """Bytes of the root table (32 for the PAE PDPT, 4096 otherwise)."""
        return self.root.entries * self.entry_size


def _level(name: str, number: int, shift: int, index_bits: int, large: bool,
           entry_format: EntryFormat) -> Level:
    return Level(name=name, number=number, shift=shift, index_bits=index_bits,
                 may_map_large=large, format=entry_format)


_LONG = EntryFormat.LONG
_LONG_LEVELS: tuple[Level, ...] = (
    _level("PML4E", 4, 39, 9, False, _LONG),
    _level("PDPTE", 3, 30, 9, True, _LONG),   # 1 GiB pages (CPUID Page1GB assumed)
    _level("PDE", 2, 21, 9, True, _LONG),     # 2 MiB pages
    _level("PTE", 1, 12, 9, False, _LONG),
)

_MODE_SHAPES: dict[ModeName, tuple[int, int, tuple[Level, ...]]] = {
    ModeName.LEGACY: (4, 32, (
        _level("PDE", 2, 22, 10, True, EntryFormat.LEGACY),   # 4 MiB pages with CR4.PSE
        _level("PTE", 1, 12, 10, False, EntryFormat.LEGACY),
    )),
    ModeName.PAE: (8, 32, (
        _level("PDPTE", 3, 30, 2, False, EntryFormat.PAE_PDPTE),
        _level("PDE", 2, 21, 9, True, EntryFormat.PAE),       # 2 MiB pages
        _level("PTE", 1, 12, 9, False, EntryFormat.PAE),
    )),
    ModeName.LEVEL4: (8, 48, _LONG_LEVELS),
    ModeName.LEVEL5: (8, 57, (_level("PML5E", 5, 48, 9, False, _LONG), *_LONG_LEVELS)),
}

MODE_NAMES: tuple[str, ...] = tuple(name.value for name in ModeName)


def paging_mode(name: str, maxphyaddr: int | None = None) -> PagingMode:
    """The paging mode called `name` with physical-address width `maxphyaddr`.

    `maxphyaddr` defaults to `DEFAULT_MAXPHYADDR` and must lie in 32..52.
    Raises `UsageError` for an unknown name or an out-of-range width.
    """
    try:
        mode_name = ModeName(name)
    except ValueError:
        raise UsageError(
            f"unknown paging mode {name!r} (expected one of: {', '.join(MODE_NAMES)})"
        ) from None
    width = DEFAULT_MAXPHYADDR if maxphyaddr is None else maxphyaddr
    if isinstance(width, bool) or not isinstance(width, int) or not (
            MIN_MAXPHYADDR <= width <= bits.PHYSICAL_ADDRESS_BITS_MAX):
        raise UsageError(
            f"maxphyaddr {width!r} out of range "
            f"({MIN_MAXPHYADDR}..{bits.PHYSICAL_ADDRESS_BITS_MAX})"
        )
    entry_size, linear_bits, levels = _MODE_SHAPES[mode_name]
    return PagingMode(name=mode_name, entry_size=entry_size, linear_address_bits=linear_bits,
                      levels=levels, maxphyaddr=width)
