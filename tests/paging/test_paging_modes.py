"""The four paging modes as data, checked against the SDM's descriptions (vol. 3A,
4.3 32-bit paging, 4.4 PAE, 4.5 4-level and 5-level)."""

from __future__ import annotations

import doctest
import subprocess
import sys

import pytest

from ptemu.errors import UsageError
from ptemu.paging import DEFAULT_MAXPHYADDR, Bit7, bit7_role, paging_mode


@pytest.mark.parametrize(("name", "entry_size", "linear_bits", "shape"), [
    # (SDM name, index shift, index bits, large-page size or None), root first.
    ("legacy", 4, 32, [("PDE", 22, 10, 4 << 20), ("PTE", 12, 10, None)]),
    ("pae", 8, 32, [("PDPTE", 30, 2, None), ("PDE", 21, 9, 2 << 20), ("PTE", 12, 9, None)]),
    ("4level", 8, 48, [("PML4E", 39, 9, None), ("PDPTE", 30, 9, 1 << 30),
                       ("PDE", 21, 9, 2 << 20), ("PTE", 12, 9, None)]),
    ("5level", 8, 57, [("PML5E", 48, 9, None), ("PML4E", 39, 9, None),
                       ("PDPTE", 30, 9, 1 << 30), ("PDE", 21, 9, 2 << 20),
                       ("PTE", 12, 9, None)]),
])
def test_mode_shapes(name: str, entry_size: int, linear_bits: int,
                     shape: list[tuple[str, int, int, int | None]]) -> None:
    mode = paging_mode(name)
    assert mode.entry_size == entry_size and mode.linear_address_bits == linear_bits
    assert [(lv.name, lv.shift, lv.index_bits, lv.large_page_size) for lv in mode.levels] == shape
    # Levels count from the leaf; the index bits cover the whole linear address.
    assert [lv.number for lv in mode.levels] == list(range(len(shape), 0, -1))
    assert mode.root.shift + mode.root.index_bits == linear_bits
    assert mode.maxphyaddr == DEFAULT_MAXPHYADDR == 52


def test_bit7_is_decided_per_level() -> None:
    l4 = paging_mode("4level")
    assert [bit7_role(lv) for lv in l4.levels] == [
        Bit7.RESERVED, Bit7.PAGE_SIZE, Bit7.PAGE_SIZE, Bit7.PAT]
    pae = paging_mode("pae")
    assert bit7_role(pae.level(3)) is Bit7.RESERVED
    legacy = paging_mode("legacy")
    assert bit7_role(legacy.level(2)) is Bit7.PAGE_SIZE
    assert bit7_role(legacy.level(2), pse=False) is Bit7.IGNORED


def test_unknown_names_and_widths_raise() -> None:
    with pytest.raises(UsageError, match="unknown paging mode 'ia32e'"):
        paging_mode("ia32e")
    for width in (31, 53):
        with pytest.raises(UsageError, match="maxphyaddr"):
            paging_mode("4level", width)
    with pytest.raises(UsageError, match="no level 4"):
        paging_mode("pae").level(4)
    with pytest.raises(UsageError, match="no level 0"):
        paging_mode("4level").level(0)
    assert paging_mode("4level").level_named("pdpte").number == 3


def test_canonical_addresses() -> None:
    l4, l5 = paging_mode("4level"), paging_mode("5level")
    assert l4.is_canonical(0x0000_7FFF_FFFF_FFFF) and l4.is_canonical(0xFFFF_8000_0000_0000)
    assert not l4.is_canonical(0x0000_8000_0000_0000)
    assert l4.canonical(0x0000_8000_0000_0000) == 0xFFFF_8000_0000_0000
    assert l5.is_canonical(0x00FF_FFFF_FFFF_FFFF) and not l5.is_canonical(0x0100_0000_0000_0000)
    assert l5.is_canonical(0x0000_8000_0000_0000)       # canonical under LA57


def test_root_table_from_cr3() -> None:
    # SDM Tables 4-3 (32-bit: 31:12), 4-7 (PAE: 31:5), 4-12 (4/5-level: M-1:12).
    assert paging_mode("legacy").root_table_gpa(0x1234_5FFF) == 0x1234_5000
    assert paging_mode("pae").root_table_gpa(0x1234_5FFF) == 0x1234_5FE0
    assert paging_mode("4level", 46).root_table_gpa(0x8000_FFFF_FFFF_F018) == 0x3FFF_FFFF_F000
    assert paging_mode("pae").root_table_size == 32


def test_paging_imports_without_capstone_or_unicorn() -> None:
    code = ("import sys; sys.modules['capstone'] = None; sys.modules['unicorn'] = None; "
            "import ptemu.paging, ptemu.paging.walk, ptemu.paging.ranges; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize("module", ["bits", "modes", "entry", "classify", "walk", "ranges",
                                    "__init__"])
def test_docstring_examples(module: str) -> None:
    import importlib

    name = "ptemu.paging" if module == "__init__" else f"ptemu.paging.{module}"
    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0
