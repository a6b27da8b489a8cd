"""Unicorn (QEMU's TCG) as an independent oracle for address translation.

The walker under test is compared with what a real x86 MMU model does: the
page-table tree is placed in Unicorn's physical memory, paging is switched on
(CR0.PG, CR4.PAE/PSE/LA57/SMEP/SMAP, IA32_EFER.LME/NXE), and one access at the
linear address is executed: a load, a store or an instruction fetch. The result
is what the CPU did: the value loaded, or the exception vector and CR2.
Unicorn reports exceptions to an interrupt hook instead of delivering them
through an IDT, so the page-fault error code is not visible: callers tell a
reserved-bit fault from a not-present one by clearing the bit and seeing the
fault go away.

The oracle maps its own code page in a root-table slot the caller leaves free
(`system_slot`), with supervisor, writable, executable 4 KiB pages, at
physical addresses from `SYSTEM_PHYS`. It knows the four modes' shapes by
itself (index widths and entry sizes from the SDM), not from ptemu.

Known differences between QEMU 5.0 TCG (Unicorn 2.1) and the SDM, which the
callers keep out of their trees:
- MAXPHYADDR is 40 (TCG_PHYS_ADDR_BITS), whatever the CPU model says.
- The reserved bits 2:1 and 8:5 of a PAE PDPTE are not checked (a real CPU
  raises #GP when MOV to CR3 loads such a PDPTE).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from unicorn import (
    UC_ARCH_X86,
    UC_HOOK_CODE,
    UC_HOOK_INTR,
    UC_MODE_32,
    UC_MODE_64,
    Uc,
    UcError,
)
from unicorn import x86_const as X

QEMU_MAXPHYADDR = 40
SYSTEM_PHYS = 0xF000_0000
"""Physical pages of the oracle's own tables and pages (below 4 GiB for 32-bit paging)."""
SYSTEM_PAGES = 16
PAGE = 0x1000

EFER_MSR = 0xC000_0080
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21


# (entry size, [(shift, index bits)] root first, root slot count) per mode, SDM 4.3-4.5.
SHAPES: dict[str, tuple[int, tuple[tuple[int, int], ...]]] = {
    "legacy": (4, ((22, 10), (12, 10))),
    "pae": (8, ((30, 2), (21, 9), (12, 9))),
    "4level": (8, ((39, 9), (30, 9), (21, 9), (12, 9))),
    "5level": (8, ((48, 9), (39, 9), (30, 9), (21, 9), (12, 9))),
}


class Access(Enum):
    READ = "read"
    WRITE = "write"
    FETCH = "fetch"


class Outcome(Enum):
    OK = "ok"
    PAGE_FAULT = "#PF"
    GENERAL_PROTECTION = "#GP"
    OTHER = "other"


@dataclass(frozen=True)
class CpuState:
    mode: str
    nxe: bool = True
    wp: bool = True
    pse: bool = True
    smep: bool = False
    smap: bool = False


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    value: int | None = None
    """The value a READ loaded (4 bytes in 32-bit modes, 8 otherwise)."""
    cr2: int | None = None
    vector: int | None = None


def _canonical(mode: str, linear: int) -> int:
    width = {"4level": 48, "5level": 57}.get(mode)
    if width is None:
        return linear & 0xFFFF_FFFF
    linear &= (1 << width) - 1
    if linear >> (width - 1):
        linear |= ((1 << 64) - 1) ^ ((1 << width) - 1)
    return linear


def root_index(mode: str, gla: int) -> int:
    """Index of the root-table entry that translates `gla`."""
    shift, index_bits = SHAPES[mode][1][0]
    return (gla >> shift) & ((1 << index_bits) - 1)


def system_slot(mode: str, gla: int) -> int:
    """The root slot the oracle uses: the one after the target's."""
    _, index_bits = SHAPES[mode][1][0]
    return (root_index(mode, gla) + 1) % (1 << index_bits)


def _root_table(mode: str, cr3: int) -> int:
    if mode == "legacy":
        return cr3 & 0xFFFF_F000
    if mode == "pae":
        return cr3 & 0xFFFF_FFE0
    return cr3 & ((1 << QEMU_MAXPHYADDR) - PAGE)


class _Image:
    """Physical memory as 4 KiB pages, copied into Unicorn at the end."""

    def __init__(self, pages: dict[int, bytes]) -> None:
        self.pages = {gpa: bytearray(data) for gpa, data in pages.items()}

    def write(self, gpa: int, data: bytes) -> None:
        page = self.pages.setdefault(gpa & ~(PAGE - 1), bytearray(PAGE))
        offset = gpa & (PAGE - 1)
        page[offset:offset + len(data)] = data

    def read(self, gpa: int, size: int) -> bytes:
        page = self.pages.get(gpa & ~(PAGE - 1), bytearray(PAGE))
        offset = gpa & (PAGE - 1)
        return bytes(page[offset:offset + size])


def run_access(state: CpuState, pages: dict[int, bytes], cr3: int, gla: int,
               access: Access) -> Result:
    """Execute one supervisor access at `gla` with the given physical memory.

    `pages` maps page-aligned physical addresses to 4 KiB of content. The
    root-table slot `system_slot(mode, gla)` must be empty.
    """
    mode = state.mode
    long_mode = mode in ("4level", "5level")
    entry_size, shape = SHAPES[mode]
    image = _Image(pages)
    pack = "<I" if entry_size == 4 else "<Q"

    # The oracle's own mapping: one table per level below the root, then the code page.
    slot = system_slot(mode, gla)
    code_gla = _canonical(mode, slot << shape[0][0])
    next_phys = SYSTEM_PHYS
    table = _root_table(mode, cr3)
    index = slot
    for level in range(len(shape)):
        target = next_phys
        next_phys += PAGE
        flags = 0x1 if (mode == "pae" and level == 0) else 0x3   # PAE PDPTE: 2:1 reserved
        image.write(table + index * entry_size, struct.pack(pack, target | flags))
        table, index = target, 0
    code_phys = table
    assert next_phys <= SYSTEM_PHYS + SYSTEM_PAGES * PAGE

    if long_mode:
        code = {Access.READ: b"\x48\xa1", Access.WRITE: b"\x48\xa3"}.get(access, b"")
        code += struct.pack("<Q", gla) if code else b""
    else:
        code = {Access.READ: b"\xa1", Access.WRITE: b"\xa3"}.get(access, b"")
        code += struct.pack("<I", gla) if code else b""
    image.write(code_phys, code)

    uc = Uc(UC_ARCH_X86, UC_MODE_64 if long_mode else UC_MODE_32)
    uc.ctl_set_cpu_model(X.UC_CPU_X86_BROADWELL)    # has SMEP and SMAP
    for gpa, data in sorted(image.pages.items()):
        uc.mem_map(gpa, PAGE)
        uc.mem_write(gpa, bytes(data))
    cr4 = (CR4_PSE if state.pse else 0) | (CR4_SMEP if state.smep else 0) | (
        CR4_SMAP if state.smap else 0)
    if mode != "legacy":
        cr4 |= CR4_PAE
    if mode == "5level":
        cr4 |= CR4_LA57
    uc.reg_write(X.UC_X86_REG_CR3, cr3)
    uc.reg_write(X.UC_X86_REG_CR4, cr4)
    efer = EFER_NXE if state.nxe else 0
    if long_mode:
        efer |= EFER_LME | EFER_LMA
    uc.msr_write(EFER_MSR, efer)
    uc.reg_write(X.UC_X86_REG_CR0, CR0_PG | CR0_PE | CR0_ET | (CR0_WP if state.wp else 0))
    uc.reg_write(X.UC_X86_REG_RAX if long_mode else X.UC_X86_REG_EAX, 0x1122_3344)
    uc.reg_write(X.UC_X86_REG_EFLAGS, 0x2)    # AC=0: SMAP applies to explicit accesses

    seen: dict[str, int] = {}

    def on_interrupt(uc: Uc, vector: int, user: object) -> None:
        seen["vector"] = vector
        seen["cr2"] = uc.reg_read(X.UC_X86_REG_CR2)
        uc.emu_stop()

    def on_target(uc: Uc, address: int, size: int, user: object) -> None:
        seen["fetched"] = address
        uc.emu_stop()

    uc.hook_add(UC_HOOK_INTR, on_interrupt)
    start = code_gla
    if access is Access.FETCH:
        uc.hook_add(UC_HOOK_CODE, on_target, begin=gla, end=gla)
        start = gla
    try:
        uc.emu_start(start, code_gla + len(code), count=1)
    except UcError as error:
        raise AssertionError(f"Unicorn stopped with {error} ({access.value} at {gla:#x})") from None

    if "vector" in seen:
        vector = seen["vector"]
        outcome = {14: Outcome.PAGE_FAULT, 13: Outcome.GENERAL_PROTECTION}.get(
            vector, Outcome.OTHER)
        return Result(outcome, cr2=seen["cr2"], vector=vector)
    if access is Access.FETCH:
        assert seen.get("fetched") == gla, f"fetch at {gla:#x} neither ran nor faulted"
        return Result(Outcome.OK)
    value = None
    if access is Access.READ:
        value = uc.reg_read(X.UC_X86_REG_RAX if long_mode else X.UC_X86_REG_EAX)
    return Result(Outcome.OK, value=value)
