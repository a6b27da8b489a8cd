"""The one bit vocabulary of x86 paging-structure entries.

Every bit position and mask ptemu uses for page-table entries lives here, with
the names the Intel SDM (vol. 3A, ch. 4) and Linux (``pgtable_types.h``) give
them. Table numbers are those of the SDM editions that describe 5-level paging
(2021 and later); each table is also named by its title, which older editions
keep under other numbers.

Bit 7 is the page-size bit (PS) in entries that may map a large page and the
PAT bit in a PTE; which one it is for a level is decided in one place,
`ptemu.paging.modes.bit7_role`. Bit 12 is PAT only in an entry that maps a large
page (SDM 4.9.2); elsewhere it is an address bit.
"""

from __future__ import annotations

from typing import Final


def bit_range(high: int, low: int) -> int:
    """Mask of bits `high`..`low` inclusive (SDM notation ``high:low``).

    An empty range (``high < low``, e.g. ``51:52`` when MAXPHYADDR is 52) is 0.

    >>> hex(bit_range(8, 5))
    '0x1e0'
    """
    if high < low:
        return 0
    return ((1 << (high - low + 1)) - 1) << low


# --- Flags common to every format (SDM 4.3 Tables 4-4..4-6, 4.4.2 Tables 4-8..4-11,
# --- 4.5.4 Tables 4-14..4-20). Where a format lacks one, the table marks it reserved.
P: Final = 1 << 0
"""Present: must be 1 to map a page or reference a table."""
RW: Final = 1 << 1
"""Read/write: 0 forbids writes to the region (depends on CPL and CR0.WP, SDM 4.6)."""
US: Final = 1 << 2
"""User/supervisor: 0 forbids CPL 3 accesses to the region (SDM 4.6)."""
PWT: Final = 1 << 3
"""Page-level write-through (memory type, SDM 4.9)."""
PCD: Final = 1 << 4
"""Page-level cache disable (memory type, SDM 4.9)."""
A: Final = 1 << 5
"""Accessed: set by the CPU when the entry is used for translation (SDM 4.8)."""
D: Final = 1 << 6
"""Dirty: set by the CPU on a write to the page (leaf entries only, SDM 4.8)."""
BIT7: Final = 1 << 7
"""PS in an entry that may map a large page, PAT in a PTE, reserved in a PML4E,
a PML5E and a PAE PDPTE: see `ptemu.paging.modes.bit7_role`."""
PS: Final = BIT7
"""Page size: 1 = this entry maps a large page (when bit 7 has that role)."""
PAT_PTE: Final = BIT7
"""PAT bit of a PTE that maps a 4 KiB page (when bit 7 has that role)."""
G: Final = 1 << 8
"""Global: the translation survives CR3 loads when CR4.PGE=1 (leaf entries only)."""
PAT_LARGE: Final = 1 << 12
"""PAT bit of an entry that maps a 2 MiB, 4 MiB or 1 GiB page (Tables 4-4, 4-9, 4-16, 4-18)."""
NX: Final = 1 << 63
"""Execute-disable (XD) in 64-bit entries when IA32_EFER.NXE=1; reserved otherwise."""

CACHE_BITS_TABLE: Final = PWT | PCD
"""Memory-type bits of an entry that references another table."""

PK_SHIFT: Final = 59
PK_MASK: Final = bit_range(62, 59)
"""Protection key of a 4-/5-level leaf entry (Tables 4-16, 4-18, 4-20); applies
only with CR4.PKE (user pages) or CR4.PKS (supervisor pages), ignored otherwise."""

# --- 32-bit paging (SDM 4.3) ---------------------------------------------------------
LEGACY_ADDRESS_4K: Final = bit_range(31, 12)
"""Address of the page table or 4 KiB page (Tables 4-5, 4-6)."""
LEGACY_ADDRESS_4M_LOW: Final = bit_range(31, 22)
"""Bits 31:22 of a 4 MiB page's physical address (Table 4-4)."""
PSE36_SHIFT: Final = 13
"""PSE-36: PDE bits (M-20):13 hold physical-address bits (M-1):32, M = min(MAXPHYADDR, 40)
(Table 4-4, "Format of a 32-Bit Page-Directory Entry that Maps a 4-MByte Page")."""
PSE36_MAX_ADDRESS_BITS: Final = 40
"""32-bit paging reaches at most 40 physical-address bits (SDM 4.3)."""
LEGACY_4M_RESERVED_HIGH_BIT: Final = 21
"""Table 4-4 reserves PDE bits 21:(M-19) of a 4 MiB mapping."""

# --- Software-available (ignored) bits, SDM 4.3/4.4.2/4.5.4 "Ignored" rows -----------
IGNORED_TABLE_LOW: Final = (1 << 6) | bit_range(11, 8)
"""Bits 6 and 11:8 of an entry that references a table (Tables 4-5, 4-10, 4-14, 4-15,
4-17, 4-19)."""
IGNORED_LEAF_LOW: Final = bit_range(11, 9)
"""Bits 11:9 of an entry that maps a page (Tables 4-4, 4-6, 4-9, 4-11, 4-16, 4-18, 4-20)
and of a PAE PDPTE (Table 4-8)."""
IGNORED_HIGH_TABLE: Final = bit_range(62, 52)
"""Bits 62:52 of a 4-/5-level entry that references a table (Tables 4-14, 4-15, 4-17, 4-19)."""
IGNORED_HIGH_LEAF: Final = bit_range(58, 52)
"""Bits 58:52 of a 4-/5-level entry that maps a page; 62:59 are the protection key."""

# --- Reserved bits that do not depend on MAXPHYADDR -----------------------------------
PAE_PDPTE_RESERVED_LOW: Final = bit_range(2, 1) | bit_range(8, 5)
"""PAE PDPTE bits 2:1 and 8:5 (Table 4-8, "Format of a PAE Page-Directory-Pointer-Table
Entry (PDPTE)"). A real CPU checks them when it loads the PDPTEs (MOV to CR3) and raises
#GP there; the walker reports them as reserved bits of the PDPTE."""
PAE_HIGH_RESERVED_TOP: Final = 62
"""PAE PDEs and PTEs reserve bits 62:M (Tables 4-9..4-11); bit 63 is XD."""
PAE_PDPTE_HIGH_RESERVED_TOP: Final = 63
"""A PAE PDPTE reserves bits 63:M: it has no XD bit (Table 4-8)."""
LONG_HIGH_RESERVED_TOP: Final = 51
"""4-/5-level entries reserve bits 51:M (Tables 4-14..4-20)."""
LARGE_PAGE_RESERVED_LOW: Final = 13
"""A 2 MiB or 1 GiB leaf reserves bits (page shift - 1):13 (Tables 4-9, 4-16, 4-18)."""

PHYSICAL_ADDRESS_BITS_MAX: Final = 52
"""The architectural maximum of MAXPHYADDR (SDM 4.1.4)."""
PAGE_SHIFT_4K: Final = 12

# --- CR3 (SDM 4.3 Table 4-3, 4.4.1 Table 4-7, 4.5.2 Table 4-12) ----------------------
CR3_LEGACY_TABLE: Final = bit_range(31, 12)
"""32-bit paging: CR3 bits 31:12 locate the page directory (Table 4-3)."""
CR3_PAE_TABLE: Final = bit_range(31, 5)
"""PAE paging: CR3 bits 31:5 locate the 32-byte-aligned PDPT (Table 4-7)."""

# --- The seed's filter ---------------------------------------------------------------
SEED_MONITORED_BITS: Final = P | PS | US | RW | bit_range(51, 12)
"""``HOOK_PTS_MONITORED_BITS`` of the seed (introcore ``hook_pts.h``): its swap
callbacks run only when one of these bits changed and the old or the new entry is
present. The seed applies this raw mask at every level, so bit 7 counts as PS even in
a PTE and bit 12 as a frame bit even in a large leaf."""
