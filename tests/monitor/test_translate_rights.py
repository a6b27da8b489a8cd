"""`ptemu.paging.translate`: rights combined over levels, hand-checked against SDM 4.6."""

from __future__ import annotations

import pytest

from ptemu.paging import decode_entry, paging_mode
from ptemu.paging.translate import ALL_RIGHTS, AccessRights, combine_rights, translates

P, RW, US, NX = 1, 2, 4, 1 << 63


def _combine(mode_name: str, values: list[int], *, nxe: bool = True) -> AccessRights:
    mode = paging_mode(mode_name)
    rights = ALL_RIGHTS
    for level, value in zip(mode.levels, values, strict=False):
        rights = combine_rights(rights, decode_entry(mode, level, value, nxe=nxe))
    return rights


@pytest.mark.parametrize(("values", "expected"), [
    # writable = RW at every level; user = US at every level; executable = no NX anywhere.
    ([P | RW | US] * 4, (True, True, True)),
    ([P | RW | US, P | US, P | RW | US, P | RW | US], (False, True, True)),
    ([P | RW | US, P | RW | US, P | RW, P | RW | US], (True, False, True)),
    ([P | RW | US | NX, P | RW | US, P | RW | US, P | RW | US], (True, True, False)),
    ([P | RW | US, P | RW | US, P | RW | US, P | NX], (False, False, False)),
])
def test_4level_rights_are_the_and_of_every_level(values, expected):
    rights = _combine("4level", values)
    assert (rights.writable, rights.user, rights.executable) == expected


def test_without_nxe_bit_63_grants_execution_it_is_reserved_not_xd():
    rights = _combine("4level", [P | RW | US] * 3 + [P | RW | US | NX], nxe=False)
    assert rights.executable is True


def test_pae_pdpte_has_no_rw_us_nx_so_it_restricts_nothing():
    # A PDPTE with P only; PDE and PTE grant everything: the page is writable and user.
    rights = _combine("pae", [P, P | RW | US, P | RW | US])
    assert rights == AccessRights(True, True, True)


def test_legacy_entries_have_no_xd():
    rights = _combine("legacy", [P | RW | US, P | RW | US])
    assert rights.executable is True


def test_an_entry_that_restricts_nothing_new_returns_the_same_object():
    mode = paging_mode("4level")
    rights = AccessRights(False, True, True)
    same = combine_rights(rights, decode_entry(mode, mode.level(4), P | US))
    assert same is rights


def test_translates_needs_present_and_no_reserved_bit():
    mode = paging_mode("4level", 40)
    level = mode.level(1)
    assert translates(decode_entry(mode, level, 0x1000 | P))
    assert not translates(decode_entry(mode, level, 0x1000))
    # Bit 45 is an address bit beyond MAXPHYADDR 40: reserved (SDM Table 4-20).
    assert not translates(decode_entry(mode, level, (1 << 45) | 0x1000 | P))
