"""x86 paging structures as data: modes, entry decoding, changes, walks, ranges.

Everything here follows the Intel SDM vol. 3A, chapter 4, and imports neither
Capstone nor Unicorn. Levels are numbered from the leaf: 1 = PTE, 2 = PDE,
3 = PDPTE, 4 = PML4E, 5 = PML5E.

>>> from ptemu.paging import paging_mode, decode_entry, classify
>>> mode = paging_mode("pae")
>>> decode_entry(mode, mode.level(1), 0x1234_5067).address == 0x1234_5000
True
>>> classify(mode, 1, 0x1234_5067, 0x1234_5065).describe()
'protect (seed swap callbacks fire)'
"""

from ptemu.paging.classify import ChangeKind, Classification, classify, seed_swap_callbacks
from ptemu.paging.entry import (
    DecodedEntry,
    EntryKind,
    address_mask,
    decode_entry,
    entry_address,
    reserved_mask,
    software_mask,
)
from ptemu.paging.modes import (
    DEFAULT_MAXPHYADDR,
    MODE_NAMES,
    Bit7,
    EntryFormat,
    Level,
    ModeName,
    PagingMode,
    bit7_role,
    paging_mode,
)
from ptemu.paging.ranges import EntryRange, entry_range, entry_ranges, written_ranges
from ptemu.paging.walk import (
    Permissions,
    PhysicalReader,
    StopReason,
    Walk,
    WalkStep,
    walk,
)

__all__ = [
    "DEFAULT_MAXPHYADDR",
    "MODE_NAMES",
    "Bit7",
    "ChangeKind",
    "Classification",
    "DecodedEntry",
    "EntryFormat",
    "EntryKind",
    "EntryRange",
    "Level",
    "ModeName",
    "PagingMode",
    "Permissions",
    "PhysicalReader",
    "StopReason",
    "Walk",
    "WalkStep",
    "address_mask",
    "bit7_role",
    "classify",
    "decode_entry",
    "entry_address",
    "entry_range",
    "entry_ranges",
    "paging_mode",
    "reserved_mask",
    "seed_swap_callbacks",
    "software_mask",
    "walk",
    "written_ranges",
]
