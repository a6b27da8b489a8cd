"""Where everything lives in a KVM guest, and the page tables, GDT and
segment state that bring it up directly in a paged protected or long mode.

No boot code runs: the runner writes the GDT and page tables into guest
memory and loads CR0/CR3/CR4/EFER and the segment registers with
KVM_SET_SREGS, so the first instruction the vCPU executes is the guest
program's, already paged.

Guest-physical memory::

    0x000000  RAM memslot (writable): GDT, TSS, the guest's own page tables,
              code, data, stack
    0x200000  monitored memslot: the page-table pages whose writes ptemu
              handles (read-only in a monitored run, writable otherwise)

Guest-linear memory (the same in spirit as Linux's):

    direct map   every GPA at ``direct_map + gpa`` (large pages: 4 MiB PSE in
                 legacy paging, 2 MiB otherwise); data, stack and the
                 monitored pages are reached through it
    text         the code at ``text`` through 4 KiB pages
    window       linear addresses whose page tables ARE the monitored pages:
                 those tables are live, but nothing ever accesses the window,
                 so the CPU's page walker never reads or A/D-updates them

Every entry of the guest's own tables has A (and D in leaves) preset, and
those tables live in the writable RAM memslot anyway.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from ptemu.errors import UsageError
from ptemu.kvm import abi
from ptemu.memory import InMemoryGuestMemory
from ptemu.paging.modes import EntryFormat, Level, ModeName, PagingMode, paging_mode

PAGE = 0x1000

# Page-table entry bits (SDM vol. 3A, 4.3-4.5): named here for the tables the
# runner builds; ptemu.paging owns the full vocabulary.
P, RW, US, PWT, PCD, A, D, PS, G = (1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 6,
                                    1 << 7, 1 << 8)

ADDRESS_MASK = 0x000FFFFFFFFFF000
"""Bits 51:12 of a table pointer (the guest's tables sit far below 4 GiB)."""

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 31
CR4_PSE, CR4_PAE, CR4_LA57 = 1 << 4, 1 << 5, 1 << 12
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11


LONG_MODES = (ModeName.LEVEL4, ModeName.LEVEL5)


def code_bits_allowed(mode: PagingMode) -> tuple[int, ...]:
    """Operating sizes a guest of `mode` can run its writer in.

    Legacy and PAE paging run 32-bit code; 4-/5-level paging runs 64-bit code
    or, in compatibility mode, 32-bit code (SDM vol. 3A, 2.2).
    """
    return (64, 32) if mode.name in LONG_MODES else (32,)


@dataclass(frozen=True, slots=True)
class GuestLayout:
    """Addresses of one guest (see the module docstring)."""

    mode: PagingMode
    code_bits: int
    monitored_pages: int = 4
    ram_size: int = 0x200000
    monitored_gpa: int = 0x200000
    gdt_gpa: int = 0x1000
    tss_gpa: int = 0x1800
    tables_gpa: int = 0x2000
    tables_end: int = 0x10000
    code_gpa: int = 0x10000
    code_end: int = 0x20000
    data_gpa: int = 0x20000
    stack_top_gpa: int = 0x40000
    heap_gpa: int = 0x40000
    pages_gpa: int = 0x1C0000
    """Backing of a program's extra pages (code and data at their own GLAs)."""

    @classmethod
    def create(cls, mode: PagingMode | str, code_bits: int | None = None,
               monitored_pages: int = 4) -> GuestLayout:
        """The layout for `mode`; `code_bits` defaults to the mode's native size.

        Raises `UsageError` for a code size the mode cannot run or a monitored
        page count outside 1..64.
        """
        paging = mode if isinstance(mode, PagingMode) else paging_mode(mode)
        allowed = code_bits_allowed(paging)
        bits = allowed[0] if code_bits is None else code_bits
        if bits not in allowed:
            raise UsageError(f"paging mode {paging.name} cannot run {bits}-bit code "
                             f"(allowed: {', '.join(map(str, allowed))})")
        if not 1 <= monitored_pages <= 64:
            raise UsageError(f"monitored pages: {monitored_pages} is not in 1..64")
        return cls(mode=paging, code_bits=bits, monitored_pages=monitored_pages)

    @property
    def long_mode(self) -> bool:
        """IA-32e mode (4-/5-level paging), whatever the code size."""
        return self.mode.name in LONG_MODES

    @property
    def direct_map(self) -> int:
        """GLA of GPA 0 (Linux's PAGE_OFFSET on 32-bit, the x86-64 direct map).

        32-bit code (also in compatibility mode) can only form 32-bit linear
        addresses, so it gets the 32-bit layout.
        """
        return 0xC0000000 if self.code_bits == 32 else 0xFFFF888000000000

    @property
    def text(self) -> int:
        """GLA of the first code byte (where Linux puts its kernel text)."""
        return 0xC1000000 if self.code_bits == 32 else 0xFFFFFFFF81000000

    @property
    def window(self) -> int:
        """First GLA mapped through the monitored tables (never accessed)."""
        return 0xE0000000 if self.code_bits == 32 else 0xFFFFC90000000000

    @property
    def monitored_size(self) -> int:
        return self.monitored_pages * PAGE

    @property
    def monitored_gla(self) -> int:
        """Where the guest writes the monitored pages: their direct-map alias."""
        return self.direct_map + self.monitored_gpa

    def gla_of(self, gpa: int) -> int:
        """The direct-map GLA of `gpa`."""
        return self.direct_map + gpa

    def is_monitored(self, gpa: int, size: int = 1) -> bool:
        """Whether ``[gpa, gpa + size)`` lies in the monitored pages."""
        return self.monitored_gpa <= gpa and gpa + size <= self.monitored_gpa + self.monitored_size

    def monitored_gla_of(self, gpa: int) -> int | None:
        """The one GLA through which the guest writes monitored `gpa`, if monitored.

        The runner builds the guest so that the direct map is the only alias of
        a monitored page (the window maps *through* them, never *to* them); a
        hypervisor would take the GLA from the exit qualification instead.
        """
        return self.gla_of(gpa) if self.is_monitored(gpa) else None


class TableBuilder:
    """Allocates the guest's own page-table pages and writes their entries."""

    def __init__(self, layout: GuestLayout, memory: InMemoryGuestMemory) -> None:
        self.layout = layout
        self.mode = layout.mode
        self.memory = memory
        self._next = layout.tables_gpa
        self.root = self._allocate()

    def _allocate(self) -> int:
        if self._next >= self.layout.tables_end:
            raise RuntimeError("guest page-table area is full")
        gpa = self._next
        self._next += PAGE
        self.memory.write(gpa, bytes(PAGE))
        return gpa

    def _entry_address(self, table: int, level: Level, gla: int) -> int:
        return table + level.index_of(gla) * self.mode.entry_size

    def _read(self, address: int) -> int:
        return int.from_bytes(self.memory.read(address, self.mode.entry_size), "little")

    def _write(self, address: int, value: int) -> None:
        self.memory.write(address, value.to_bytes(self.mode.entry_size, "little"))

    def _pointer_flags(self, level: Level) -> int:
        # A PAE PDPTE has no RW/US/A bits: they are reserved (SDM 4.4.1, Table 4-8).
        if level.format is EntryFormat.PAE_PDPTE:
            return P
        return P | RW | A

    def _table_at(self, depth: int, gla: int) -> int:
        """The table at `depth` (0 = root) on the path of `gla`, creating tables."""
        table = self.root
        for upper in self.mode.levels[:depth]:
            address = self._entry_address(table, upper, gla)
            entry = self._read(address)
            if entry & P:
                table = entry & ADDRESS_MASK
                continue
            table = self._allocate()
            self._write(address, table | self._pointer_flags(upper))
        return table

    def map_page(self, gla: int, gpa: int, *, level_number: int = 1) -> None:
        """Map `gla` to `gpa` with a leaf at level `level_number` (1 = PTE, 4 KiB).

        A leaf above the PTE level is a large page (PS set) of that level's
        entry span. A and D are preset so the CPU never has to write them.
        """
        level = self.mode.level(level_number)
        depth = self.mode.levels.index(level)
        table = self._table_at(depth, gla)
        flags = P | RW | A | D | (PS if level_number > 1 else 0)
        self._write(self._entry_address(table, level, gla), gpa | flags)

    def link_table(self, gla: int, table_gpa: int) -> None:
        """Make `table_gpa` the PT (last-level table) for the region of `gla`."""
        pde = self.mode.level(2)
        depth = self.mode.levels.index(pde)
        parent = self._table_at(depth, gla)
        self._write(self._entry_address(parent, pde, gla), table_gpa | P | RW | A)


def _descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    """An 8-byte segment descriptor (SDM vol. 3A, 3.4.5)."""
    value = (limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | access << 40
    value |= ((limit >> 16) & 0xF) << 48 | flags << 52 | ((base >> 24) & 0xFF) << 56
    return struct.pack("<Q", value)


SELECTOR_CODE32, SELECTOR_DATA, SELECTOR_CODE64, SELECTOR_TSS = 0x08, 0x10, 0x18, 0x20
TSS_LIMIT = 0x67


def build_gdt(layout: GuestLayout, memory: InMemoryGuestMemory) -> None:
    """Null, 32-bit code, data, 64-bit code and a busy TSS (accessed bits preset)."""
    tss_base = layout.gla_of(layout.tss_gpa)
    gdt = bytes(8)
    gdt += _descriptor(0, 0xFFFFF, 0x9B, 0xC)   # code, exec/read, accessed; G=1 D=1
    gdt += _descriptor(0, 0xFFFFF, 0x93, 0xC)   # data, read/write, accessed
    gdt += _descriptor(0, 0xFFFFF, 0x9B, 0xA)   # 64-bit code: G=1 L=1
    gdt += _descriptor(tss_base & 0xFFFFFFFF, TSS_LIMIT, 0x8B, 0x0)  # busy TSS
    gdt += struct.pack("<Q", tss_base >> 32)  # upper half of a 16-byte (IA-32e) TSS descriptor
    memory.write(layout.gdt_gpa, gdt)
    memory.write(layout.tss_gpa, bytes(TSS_LIMIT + 1))


GDT_LIMIT = 6 * 8 - 1


def build_tables(layout: GuestLayout, memory: InMemoryGuestMemory, code_size: int,
                 extra_pages: Mapping[int, int] | None = None) -> int:
    """Write the guest's page tables; return CR3.

    The direct map covers RAM and the monitored memslot with large pages (PDE
    level: 4 MiB with PSE, else 2 MiB), the text maps `code_size` bytes with
    4 KiB pages, `extra_pages` maps each GLA page to its GPA page, and the
    monitored pages are linked as the PTs of the window.
    """
    tables = TableBuilder(layout, memory)
    pde = layout.mode.level(2)
    end = layout.monitored_gpa + layout.monitored_size
    for gpa in range(0, end, pde.entry_span):
        tables.map_page(layout.gla_of(gpa), gpa, level_number=2)
    if code_size > layout.code_end - layout.code_gpa:
        raise UsageError(f"guest code of {code_size} bytes does not fit the code area")
    for offset in range(0, max(code_size, 1), PAGE):
        tables.map_page(layout.text + offset, layout.code_gpa + offset)
    text_end = layout.text + max(code_size, 1)
    for gla, gpa in (extra_pages or {}).items():
        if layout.text - PAGE < gla < text_end:
            raise UsageError(f"extra page {gla:#x} overlaps the program's text")
        tables.map_page(gla, gpa)
    for index in range(layout.monitored_pages):
        tables.link_table(layout.window + index * pde.entry_span,
                          layout.monitored_gpa + index * PAGE)
    return tables.root


def _segment(segment: abi.KvmSegment, *, selector: int, code: bool, code64: bool) -> None:
    segment.base = 0
    segment.limit = 0xFFFFFFFF
    segment.selector = selector
    segment.type = 0xB if code else 0x3
    segment.present = 1
    segment.dpl = 0
    segment.s = 1
    segment.l = 1 if (code and code64) else 0
    segment.db = 0 if (code and code64) else 1
    segment.g = 1
    segment.avl = 0
    segment.unusable = 0


CR4_BY_MODE: dict[ModeName, int] = {
    ModeName.LEGACY: CR4_PSE,
    ModeName.PAE: CR4_PAE,
    ModeName.LEVEL4: CR4_PAE,
    ModeName.LEVEL5: CR4_PAE | CR4_LA57,
}
"""CR4 paging bits per mode (SDM vol. 3A, Table 4-1)."""

EFER_BY_MODE: dict[ModeName, int] = {
    ModeName.LEGACY: 0,
    ModeName.PAE: EFER_NXE,
    ModeName.LEVEL4: EFER_LME | EFER_LMA | EFER_NXE,
    ModeName.LEVEL5: EFER_LME | EFER_LMA | EFER_NXE,
}
"""IA32_EFER per mode: IA-32e mode for 4-/5-level, NX enabled where it exists."""

GUEST_CR0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG


def build_sregs(layout: GuestLayout, cr3: int, sregs: abi.KvmSregs) -> None:
    """Fill `sregs` (from KVM_GET_SREGS) for a flat ring-0 guest of `layout`.

    The IDT is empty (limit 0): any exception the guest raises escalates to a
    triple fault, which KVM reports as KVM_EXIT_SHUTDOWN.
    """
    code64 = layout.code_bits == 64
    _segment(sregs.cs, selector=SELECTOR_CODE64 if code64 else SELECTOR_CODE32,
             code=True, code64=code64)
    for name in ("ds", "es", "fs", "gs", "ss"):
        _segment(getattr(sregs, name), selector=SELECTOR_DATA, code=False, code64=code64)
    sregs.tr.base = layout.gla_of(layout.tss_gpa)
    sregs.tr.limit = TSS_LIMIT
    sregs.tr.selector = SELECTOR_TSS
    sregs.tr.type = 0xB
    sregs.tr.present, sregs.tr.s, sregs.tr.g, sregs.tr.unusable = 1, 0, 0, 0
    sregs.ldt.selector, sregs.ldt.type, sregs.ldt.present, sregs.ldt.unusable = 0, 2, 0, 1
    sregs.gdt.base = layout.gla_of(layout.gdt_gpa)
    sregs.gdt.limit = GDT_LIMIT
    sregs.idt.base = 0
    sregs.idt.limit = 0
    sregs.cr0 = GUEST_CR0
    sregs.cr2 = 0
    sregs.cr3 = cr3
    sregs.cr4 = CR4_BY_MODE[layout.mode.name]
    sregs.efer = EFER_BY_MODE[layout.mode.name]
