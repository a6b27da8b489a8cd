"""Translate a linear address the way the CPU walks the paging structures.

`walk(mode, cr3, gla, memory)` reads one entry per level from guest-physical
memory, root first, and stops at the first entry that is not present, has a
reserved bit set, or maps a page (Intel SDM vol. 3A, 4.3-4.5). It records every
entry it read, the final guest-physical address and page size, and the access
rights the levels grant together (SDM 4.6). It never writes: the CPU would set
Accessed/Dirty bits on the way, the walker does not.

Inputs the CPU takes from control registers are parameters, never assumed:
CR0.WP, CR4.PSE (32-bit paging only), CR4.SMEP, CR4.SMAP with RFLAGS.AC, and
IA32_EFER.NXE. Protection keys are reported per entry, not enforced (PKRU is
not an input). 1 GiB pages are taken as supported (CPUID Page1GB).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from ptemu.errors import UsageError
from ptemu.paging.entry import DecodedEntry, decode_entry
from ptemu.paging.modes import Level, PagingMode


class PhysicalReader(Protocol):
    """Anything that reads guest-physical memory (`ptemu.memory.GuestMemory` does)."""

    def read(self, gpa: int, size: int) -> bytes:
        """Return `size` bytes at `gpa`."""
        ...


class StopReason(StrEnum):
    """Why a walk ended without a translation."""

    NOT_PRESENT = "not-present"
    """An entry had P=0: #PF with PFEC.P=0."""
    RESERVED_BIT = "reserved-bit"
    """A present entry had a reserved bit set: #PF with PFEC.RSVD=1 (for a PAE
    PDPTE, #GP when MOV to CR3 loaded it)."""
    NON_CANONICAL = "non-canonical"
    """The 4-/5-level address is not canonical: #GP (#SS for stack accesses),
    no entry is read."""


@dataclass(frozen=True, slots=True)
class WalkStep:
    """One entry a walk read."""

    level: Level
    table_gpa: int
    """Guest-physical address of the table (the PAE PDPT is 32-byte aligned)."""
    table_gla: int
    """Lowest linear address the table maps (canonical), for `entry_ranges`."""
    index: int
    entry_gpa: int
    entry: DecodedEntry
    """The entry's value and its decoding (`entry.value` is the raw value)."""


@dataclass(frozen=True, slots=True)
class Permissions:
    """Access rights of a translation, combined over every level (SDM 4.6).

    `writable`, `user` and `executable` are the page's attributes: R/W=1,
    U/S=1 and XD=0 in every entry that has the bit (a PAE PDPTE has none of
    them). The six access fields apply CR0.WP, SMEP and SMAP to them.
    """

    writable: bool
    user: bool
    """A user-mode address: U/S=1 at every level."""
    executable: bool
    supervisor_read: bool
    supervisor_write: bool
    supervisor_execute: bool
    user_read: bool
    user_write: bool
    user_execute: bool


@dataclass(frozen=True, slots=True)
class Walk:
    """The outcome of translating one linear address."""

    mode: PagingMode
    cr3: int
    gla: int
    steps: tuple[WalkStep, ...]
    """Every entry read, root first."""
    stop: StopReason | None
    """Why no translation was made, None when `gpa` is set."""
    gpa: int | None
    page_size: int | None
    permissions: Permissions | None

    @property
    def fault(self) -> StopReason | None:
        """Alias of `stop`."""
        return self.stop

    @property
    def leaf(self) -> WalkStep | None:
        """The step whose entry mapped the page, if any."""
        return self.steps[-1] if self.gpa is not None else None


def _permissions(entries: list[DecodedEntry], *, cr0_wp: bool, smep: bool, smap: bool,
                 rflags_ac: bool) -> Permissions:
    writable = all(e.writable is not False for e in entries)
    user = all(e.user is not False for e in entries)
    executable = all(e.nx is not True for e in entries)
    smap_blocks = smap and user and not rflags_ac
    return Permissions(
        writable=writable,
        user=user,
        executable=executable,
        supervisor_read=not smap_blocks,
        # SDM 4.6.1: with CR0.WP=0 supervisor writes ignore R/W.
        supervisor_write=not smap_blocks and (writable or not cr0_wp),
        supervisor_execute=executable and not (smep and user),
        user_read=user,
        user_write=user and writable,
        user_execute=user and executable,
    )


def _check_gla(mode: PagingMode, gla: int) -> None:
    if isinstance(gla, bool) or not isinstance(gla, int) or not 0 <= gla < mode.address_limit:
        raise UsageError(
            f"linear address {gla!r} does not fit paging mode {mode.name} "
            f"(0 .. {mode.address_limit - 1:#x})")


def walk(mode: PagingMode, cr3: int, gla: int, memory: PhysicalReader, *, cr0_wp: bool = True,
         nxe: bool = True, pse: bool = True, smep: bool = False, smap: bool = False,
         rflags_ac: bool = False) -> Walk:
    """Translate `gla` through the tree CR3 locates, reading `memory`.

    Raises `UsageError` when `gla` or `cr3` does not fit the mode (a 32-bit
    mode takes addresses below 2**32). A guest-caused stop (not present,
    reserved bit, non-canonical address) is `Walk.stop`, never an exception.
    """
    _check_gla(mode, gla)
    if isinstance(cr3, bool) or not 0 <= cr3 < (1 << 64):
        raise UsageError(f"cr3 {cr3!r} is not a 64-bit value")
    if not mode.is_canonical(gla):
        return Walk(mode=mode, cr3=cr3, gla=gla, steps=(), stop=StopReason.NON_CANONICAL,
                    gpa=None, page_size=None, permissions=None)
    table = mode.root_table_gpa(cr3)
    steps: list[WalkStep] = []
    for level in mode.levels:
        index = level.index_of(gla)
        entry_gpa = table + index * mode.entry_size
        raw = int.from_bytes(memory.read(entry_gpa, mode.entry_size), "little")
        decoded = decode_entry(mode, level, raw, nxe=nxe, pse=pse)
        table_gla = mode.canonical(gla & ~(level.table_span - 1))
        steps.append(WalkStep(level=level, table_gpa=table, table_gla=table_gla, index=index,
                              entry_gpa=entry_gpa, entry=decoded))
        stop: StopReason | None = None
        if not decoded.present:
            stop = StopReason.NOT_PRESENT
        elif decoded.reserved_bits:
            stop = StopReason.RESERVED_BIT
        if stop is not None:
            return Walk(mode=mode, cr3=cr3, gla=gla, steps=tuple(steps), stop=stop, gpa=None,
                        page_size=None, permissions=None)
        if decoded.maps_page:
            size = level.entry_span
            permissions = _permissions([step.entry for step in steps], cr0_wp=cr0_wp,
                                       smep=smep, smap=smap, rflags_ac=rflags_ac)
            return Walk(mode=mode, cr3=cr3, gla=gla, steps=tuple(steps), stop=None,
                        gpa=decoded.address | (gla & (size - 1)), page_size=size,
                        permissions=permissions)
        table = decoded.address
    raise AssertionError("the PTE level always maps a page")  # pragma: no cover
