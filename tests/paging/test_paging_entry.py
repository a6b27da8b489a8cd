"""Entry decoding against values worked out by hand from the Intel SDM, vol. 3A ch. 4.

Table numbers are those of the editions with 5-level paging: 32-bit paging
Tables 4-4 (PDE, 4 MiB page), 4-5 (PDE, page table), 4-6 (PTE); PAE Tables 4-8
(PDPTE), 4-9 (PDE, 2 MiB), 4-10 (PDE, page table), 4-11 (PTE); 4-/5-level
Tables 4-14 (PML5E), 4-15 (PML4E), 4-16 (PDPTE, 1 GiB), 4-17 (PDPTE, page
directory), 4-18 (PDE, 2 MiB), 4-19 (PDE, page table), 4-20 (PTE).
"""

from __future__ import annotations

import pytest

from ptemu.errors import UsageError
from ptemu.paging import DecodedEntry, EntryKind, decode_entry, paging_mode

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


def decode(mode_name: str, number: int, value: int, *, maxphyaddr: int | None = None,
           nxe: bool = True, pse: bool = True) -> DecodedEntry:
    mode = paging_mode(mode_name, maxphyaddr)
    return decode_entry(mode, mode.level(number), value, nxe=nxe, pse=pse)


# --- 32-bit paging ---------------------------------------------------------------------

def test_legacy_pte_maps_4k_page_table_4_6() -> None:
    # 0x067 = P(0) R/W(1) U/S(2) A(5) D(6); bits 31:12 are the frame.
    e = decode("legacy", 1, 0x1234_5067)
    assert e.level.name == "PTE" and e.kind is EntryKind.PAGE
    assert (e.present, e.writable, e.user, e.pwt, e.pcd, e.accessed, e.dirty) == (
        True, True, True, False, False, True, True)
    assert (e.pat, e.global_page, e.page_size) == (False, False, None)
    assert e.address == 0x1234_5000 and e.page_bytes == 4 * KIB
    assert e.nx is None and e.protection_key is None
    assert e.reserved_bits == 0 and e.reserved_mask == 0


def test_legacy_pte_pat_global_and_software_bits_table_4_6() -> None:
    # 0xF81: P, bit 7 = PAT, bit 8 = G, bits 11:9 ignored (software).
    e = decode("legacy", 1, 0xABCD_EF81)
    assert (e.pat, e.global_page, e.writable) == (True, True, False)
    assert e.software_bits == 0xE00 and e.software_mask == 0xE00
    assert e.address == 0xABCD_E000


def test_legacy_pde_to_page_table_table_4_5() -> None:
    # 0x63 = P R/W A + bit 6 (ignored here), bits 11:8 ignored; PS = 0.
    e = decode("legacy", 2, 0x0040_1F63)
    assert e.kind is EntryKind.TABLE and e.page_size is False
    assert e.dirty is None and e.global_page is None and e.pat is None
    assert e.software_bits == 0xF40 and e.software_mask == 0xF40
    assert e.address == 0x0040_1000 and e.page_bytes is None


def test_legacy_pde_4m_page_with_pse36_table_4_4() -> None:
    # Bits 31:22 = 0x3FF (PA 31:22), bits 20:13 = 0xAB (PA 39:32), bit 12 = PAT,
    # 0x183 = P R/W PS G.
    value = 0xFFC0_0000 | (0xAB << 13) | (1 << 12) | 0x183
    assert value == 0xFFD5_7183
    e = decode("legacy", 2, value)
    assert e.kind is EntryKind.PAGE and e.large and e.page_bytes == 4 * MIB
    assert e.address == 0xAB_FFC0_0000
    assert (e.pat, e.global_page, e.page_size) == (True, True, True)
    assert e.reserved_mask == 1 << 21          # 21:(M-19) with M = min(52, 40) = 40
    assert e.reserved_bits == 0


def test_legacy_pde_4m_maxphyaddr_36_table_4_4() -> None:
    # M = 36: bits 16:13 hold PA 35:32, bits 21:17 are reserved. 0xAB << 13 sets
    # bits 13, 14, 16, 18, 20: PA bits 35:32 = 0xB, reserved bits 18 and 20 set.
    e = decode("legacy", 2, 0xFFD5_7183, maxphyaddr=36)
    assert e.address == 0xB_FFC0_0000
    assert e.reserved_mask == 0x3E_0000
    assert e.reserved_bits == (1 << 18) | (1 << 20)


def test_legacy_pde_4m_bit_21_reserved_table_4_4() -> None:
    e = decode("legacy", 2, 0x0020_0083)
    assert e.reserved_bits == 0x20_0000
    assert e.reserved_fault == "#PF with PFEC.RSVD=1"


def test_legacy_pde_bit7_ignored_without_pse_table_4_5() -> None:
    e = decode("legacy", 2, 0x0040_1083, pse=False)
    assert e.kind is EntryKind.TABLE and e.page_size is None
    assert e.software_mask & 0x80 and e.address == 0x0040_1000


def test_legacy_value_must_fit_4_bytes() -> None:
    with pytest.raises(UsageError, match="4-byte"):
        decode("legacy", 1, 1 << 32)


# --- PAE paging ------------------------------------------------------------------------

def test_pae_pdpte_has_no_rw_us_a_nx_table_4_8() -> None:
    e = decode("pae", 3, 0x0000_0000_1234_5019)        # P, PWT, PCD
    assert e.level.name == "PDPTE" and e.kind is EntryKind.TABLE
    assert (e.writable, e.user, e.accessed, e.nx, e.page_size) == (None, None, None, None, None)
    assert (e.pwt, e.pcd) == (True, True)
    assert e.address == 0x1234_5000 and e.reserved_bits == 0


def test_pae_pdpte_reserved_bits_table_4_8() -> None:
    # R/W (1), A (5) and XD (63) positions are reserved in a PAE PDPTE.
    e = decode("pae", 3, 0x8000_0000_0000_1023)
    assert e.reserved_bits == 0x8000_0000_0000_0022
    assert e.reserved_fault == "#GP when MOV to CR3 loads the PDPTEs"
    assert e.reserved_mask == 0xFFF0_0000_0000_01E6   # 63:52, 8:5, 2:1 with M = 52
    assert decode("pae", 3, (1 << 36) | 1, maxphyaddr=36).reserved_bits == 1 << 36


def test_pae_pde_2m_page_table_4_9() -> None:
    # Frame 0x1_2340_0000 (2 MiB aligned), bit 12 PAT, 0xE3 = P R/W A D PS, XD.
    e = decode("pae", 2, 0x8000_0001_2340_10E3)
    assert e.kind is EntryKind.PAGE and e.page_bytes == 2 * MIB
    assert e.address == 0x1_2340_0000
    assert (e.pat, e.dirty, e.nx, e.page_size) == (True, True, True, True)
    assert e.protection_key is None        # PAE entries have no protection key
    assert e.reserved_bits == 0
    assert e.reserved_mask == 0x7FF0_0000_001F_E000  # 62:52 and 20:13


def test_pae_pde_2m_bit_13_reserved_table_4_9() -> None:
    assert decode("pae", 2, 0x0000_0000_4020_2083).reserved_bits == 0x2000


def test_pae_xd_is_reserved_without_nxe_table_4_11() -> None:
    e = decode("pae", 1, 0x8000_0000_1234_5003, nxe=False)
    assert e.nx is None and e.reserved_bits == 1 << 63


def test_pae_bits_62_52_reserved_but_ignored_in_4level_tables_4_11_4_20() -> None:
    assert decode("pae", 1, (1 << 52) | 0x1003).reserved_bits == 1 << 52
    e = decode("4level", 1, (1 << 52) | 0x1003)
    assert e.reserved_bits == 0 and e.software_bits == 1 << 52


# --- 4-level and 5-level paging --------------------------------------------------------

def test_pml4e_table_4_15() -> None:
    e = decode("4level", 4, 0x0000_0001_2345_6027)    # P R/W U/S A
    assert e.level.name == "PML4E" and e.kind is EntryKind.TABLE
    assert e.page_size is None and e.address == 0x1_2345_6000
    assert e.reserved_mask & 0x80                      # PS must be 0 (bit 7 reserved)
    assert decode("4level", 4, 0x1083).reserved_bits == 0x80


def test_pml5e_has_the_pml4e_format_table_4_14() -> None:
    e = decode("5level", 5, 0x8000_0000_0000_1083)
    assert e.level.name == "PML5E" and e.reserved_bits == 0x80 and e.nx is True


def test_pdpte_1g_page_with_protection_key_table_4_16() -> None:
    # Frame 0x40_0000_0000, PK = 0b1010 (bits 62:59), bits 58:52 ignored,
    # bit 12 PAT, 0x1E3 = P R/W A D PS G.
    value = (0xA << 59) | (0x7F << 52) | 0x40_0000_0000 | (1 << 12) | 0x1E3
    assert value == 0x57F0_0040_0000_11E3
    e = decode("4level", 3, value)
    assert e.kind is EntryKind.PAGE and e.page_bytes == 1 * GIB
    assert e.address == 0x40_0000_0000
    assert e.protection_key == 0xA
    assert e.software_bits == 0x07F0_0000_0000_0000
    assert (e.pat, e.global_page, e.dirty, e.nx) == (True, True, True, False)
    assert e.reserved_bits == 0


def test_pdpte_1g_bits_29_13_reserved_table_4_16() -> None:
    e = decode("4level", 3, 0x4000_0000 | (1 << 29) | (1 << 13) | 0x83)
    assert e.reserved_bits == (1 << 29) | (1 << 13)
    assert e.address == 0x4000_0000


def test_pdpte_to_page_directory_ignores_62_52_table_4_17() -> None:
    e = decode("4level", 3, 0x7FF0_0000_0000_1003)
    assert e.kind is EntryKind.TABLE and e.protection_key is None
    assert e.software_bits == 0x7FF0_0000_0000_0000 and e.reserved_bits == 0
    assert e.address == 0x1000


def test_pde_2m_and_pte_tables_4_18_4_20() -> None:
    pde = decode("4level", 2, 0x8000_0000_3FE0_00E3)
    assert pde.kind is EntryKind.PAGE and pde.address == 0x3FE0_0000
    assert pde.page_bytes == 2 * MIB and pde.pat is False
    pte = decode("4level", 1, 0x8000_0001_2345_6163)   # P R/W A D G, XD
    assert pte.kind is EntryKind.PAGE and pte.address == 0x1_2345_6000
    assert (pte.global_page, pte.pat, pte.nx, pte.protection_key) == (True, False, True, 0)


def test_pde_to_page_table_table_4_19() -> None:
    e = decode("4level", 2, 0x0000_0000_0123_4067)   # bit 6 ignored in a table entry
    assert e.kind is EntryKind.TABLE and e.dirty is None
    assert e.software_bits == 0x40


def test_maxphyaddr_bounds_the_address_tables_4_15_4_20() -> None:
    e = decode("4level", 1, (1 << 46) | (1 << 45) | 0x1003, maxphyaddr=46)
    assert e.reserved_bits == 1 << 46 and e.reserved_mask & ((1 << 52) - 1) == (
        ((1 << 52) - 1) ^ ((1 << 46) - 1))
    assert e.address == (1 << 45) | 0x1000


def test_not_present_entry_has_no_reserved_bits() -> None:
    # A swap entry: P = 0, everything else is the OS's (SDM 4.7: P = 0 ignores the rest).
    e = decode("pae", 1, 0x7FF0_0000_1234_5000)
    assert e.kind is EntryKind.NOT_PRESENT and not e.present
    assert e.reserved_bits == 0 and not e.maps_page and not e.points_to_table


def test_fields_lists_only_what_the_level_defines() -> None:
    names = [name for name, _ in decode("pae", 3, 0x1001).fields()]
    assert "writable" not in names and "nx" not in names and "dirty" not in names
    assert names[:3] == ["level", "value", "kind"]
