"""Lay out the guest a capture runs in: physical pages, its own page tables, a GDT.

The capture's CPU runs with paging on, so every linear address the code uses
(its own, the stack, the monitored page-table pages, data pages, the GDT) is
translated through page tables built here, in guest-physical memory, for the
description's paging mode. These translation tables are the capture's own and
live on pages the description does not name: the monitored pages are data to
the CPU, so the Accessed/Dirty bits the CPU sets while it walks never land in
them (a description simulates such updates with a call's ``memory`` patch).

The table shapes are written out here from the SDM (vol. 3, 4.3-4.5), not taken
from `ptemu.paging`, so that the capture stays an independent oracle.

Segments follow Linux's kernel GDT: 64-bit code runs with CS 0x10 and data
0x18, FS and GS null with their bases in the MSRs; 16/32-bit code with CS
0x60 (0x70 for the 16-bit code segment, D=0), data 0x68 (ES 0x78 and SS 0x80
when their bases differ from DS), FS 0xd8 and GS 0xe0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ptemu.capture.description import CaptureSpec
from ptemu.errors import UsageError
from ptemu.values import PAGE_OFFSET_MASK, PAGE_SIZE

PRESENT = 1 << 0
WRITABLE = 1 << 1
"""Entry bits the capture's own tables use (SDM Tables 4-5..4-20)."""

_LEVELS: Mapping[str, tuple[tuple[int, int], ...]] = MappingProxyType({
    # (lowest linear-address bit of the index, index bits), root first.
    "legacy": ((22, 10), (12, 10)),
    "pae": ((30, 2), (21, 9), (12, 9)),
    "4level": ((39, 9), (30, 9), (21, 9), (12, 9)),
    "5level": ((48, 9), (39, 9), (30, 9), (21, 9), (12, 9)),
})

FIRST_ALLOCATED_GPA = 0x0010_0000
"""Where the capture starts taking pages for its own tables, code and stack."""

SYSTEM_AREA_64 = 0xFFFF_FE00_0000_0000
"""Linear base of the capture's own pages for 64-bit code (sentinel, GDT, stack);
Linux keeps its cpu_entry_area there, so no description uses it."""
SYSTEM_AREA_32 = 0xFFFF_C000
"""The same for 16/32-bit code, at the top of the 4 GiB linear space."""
STACK_PAGES = 2

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
CR4_LA57 = 1 << 12
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11


@dataclass(frozen=True, slots=True)
class Segment:
    """A segment register's selector and the base its descriptor holds."""

    selector: int
    base: int


@dataclass(frozen=True, slots=True)
class ControlRegisters:
    """CR0, CR3, CR4 and IA32_EFER as the capture sets them."""

    cr0: int
    cr3: int
    cr4: int
    efer: int


@dataclass(frozen=True, slots=True)
class GuestLayout:
    """Everything the machine needs to build the guest, as plain data."""

    pages: Mapping[int, bytes]
    """Every guest-physical page to map (GPA -> 4096 bytes)."""
    linear_to_physical: Mapping[int, int]
    """Page GLA -> page GPA for every page the capture's tables map."""
    control: ControlRegisters
    gdt_gla: int
    gdt_limit: int
    segments: Mapping[str, Segment]
    """``cs ds es fs gs ss`` -> selector and base."""
    sentinel_gla: int
    """Linear address the code returns to; reaching it ends a call."""
    sentinel_rip: int
    """The same as the value RIP holds (``sentinel_gla - cs_base``)."""
    stack_top_gla: int
    monitored: Mapping[int, int]
    """Monitored page GPA -> its GLA."""
    data_pages: Mapping[int, int]
    """Data page GPA -> its GLA."""

    def translate(self, gla: int) -> int:
        """GPA of linear address `gla` (raises `KeyError` when it is unmapped)."""
        return self.linear_to_physical[gla & ~PAGE_OFFSET_MASK] | (gla & PAGE_OFFSET_MASK)

    def rip_of(self, gla: int) -> int:
        """The RIP value that executes linear address `gla`."""
        return gla - self.segments["cs"].base


def segment_descriptor(base: int, limit: int, access: int, flags: int) -> int:
    """An 8-byte GDT descriptor (SDM vol. 3, 3.4.5): `flags` is G, D/B, L, AVL."""
    return ((limit & 0xFFFF) | (base & 0xFF_FFFF) << 16 | access << 40
            | ((limit >> 16) & 0xF) << 48 | flags << 52 | (base >> 24) << 56)


_CODE_ACCESS = 0x9B
"""Present, DPL 0, code, execute/read, accessed."""
_DATA_ACCESS = 0x93
"""Present, DPL 0, data, read/write, accessed."""
_FLAGS_4K_32 = 0xC
"""G=1 (4 KiB granularity), D/B=1."""
_FLAGS_LONG = 0xA
"""G=1, L=1: a 64-bit code segment."""


class _Builder:
    """Allocates pages and fills the capture's own page tables."""

    def __init__(self, spec: CaptureSpec) -> None:
        self.spec = spec
        self.entry_size = 4 if spec.paging == "legacy" else 8
        self.levels = _LEVELS[spec.paging]
        self.pages: dict[int, bytearray] = {}
        self.linear: dict[int, int] = {}
        self.reserved: set[int] = set()
        self.next_free = FIRST_ALLOCATED_GPA
        for page in spec.page_tables + spec.data_pages:
            self.reserved.add(page.gpa)
        for blob in spec.code:
            if blob.gpa is not None:
                first = blob.gla & ~PAGE_OFFSET_MASK
                last = (blob.end - 1) & ~PAGE_OFFSET_MASK
                for page_gla in range(first, last + PAGE_SIZE, PAGE_SIZE):
                    self.reserved.add((blob.gpa & ~PAGE_OFFSET_MASK) + page_gla - first)
        self.root = self.allocate()

    def allocate(self) -> int:
        while self.next_free in self.reserved or self.next_free in self.pages:
            self.next_free += PAGE_SIZE
        gpa = self.next_free
        if gpa >= (1 << 32):
            raise UsageError("capture: no free guest-physical page below 4 GiB")
        self.pages[gpa] = bytearray(PAGE_SIZE)
        return gpa

    def page(self, gpa: int) -> bytearray:
        if gpa not in self.pages:
            self.pages[gpa] = bytearray(PAGE_SIZE)
        return self.pages[gpa]

    def _read_entry(self, table: int, index: int) -> int:
        start = index * self.entry_size
        return int.from_bytes(self.pages[table][start:start + self.entry_size], "little")

    def _write_entry(self, table: int, index: int, value: int) -> None:
        start = index * self.entry_size
        self.pages[table][start:start + self.entry_size] = value.to_bytes(
            self.entry_size, "little")

    def map(self, gla: int, gpa: int, what: str) -> None:
        """Map the 4 KiB page at `gla` to `gpa` (both page aligned)."""
        known = self.linear.get(gla)
        if known is not None:
            if known == gpa:
                return
            raise UsageError(f"capture: {what} at {gla:#x} overlaps another mapping "
                             f"(to {known:#x})")
        table = self.root
        for depth, (shift, bits) in enumerate(self.levels[:-1]):
            index = (gla >> shift) & ((1 << bits) - 1)
            entry = self._read_entry(table, index)
            if not entry & PRESENT:
                child = self.allocate()
                # A PAE PDPTE has no RW bit (SDM Table 4-8: bits 2:1 reserved).
                flags = PRESENT if self.spec.paging == "pae" and depth == 0 else (
                    PRESENT | WRITABLE)
                entry = child | flags
                self._write_entry(table, index, entry)
            table = entry & ~PAGE_OFFSET_MASK & ((1 << 52) - 1)
        shift, bits = self.levels[-1]
        self._write_entry(table, (gla >> shift) & ((1 << bits) - 1), gpa | PRESENT | WRITABLE)
        self.linear[gla] = gpa


def build_layout(spec: CaptureSpec) -> GuestLayout:
    """Lay out `spec`'s guest. Raises `UsageError` when addresses collide."""
    builder = _Builder(spec)
    for page in spec.page_tables + spec.data_pages:
        builder.pages[page.gpa] = bytearray(page.data)
        builder.map(page.gla, page.gpa, "page")
    for blob in spec.code:
        first = blob.gla & ~PAGE_OFFSET_MASK
        last = (blob.end - 1) & ~PAGE_OFFSET_MASK
        for page_gla in range(first, last + PAGE_SIZE, PAGE_SIZE):
            if page_gla in builder.linear:
                page_gpa = builder.linear[page_gla]
            elif blob.gpa is not None:
                page_gpa = (blob.gpa & ~PAGE_OFFSET_MASK) + page_gla - first
            else:
                page_gpa = builder.allocate()
            builder.page(page_gpa)
            builder.map(page_gla, page_gpa, "code")
        for offset, byte in enumerate(blob.data):
            gla = blob.gla + offset
            builder.pages[builder.linear[gla & ~PAGE_OFFSET_MASK]][gla & PAGE_OFFSET_MASK] = byte

    cs_base = _code_segment_base(spec)
    if spec.code_bits == 64:
        area = SYSTEM_AREA_64
        sentinel = area
        gdt, stack_top = area + PAGE_SIZE, area + (2 + STACK_PAGES) * PAGE_SIZE
    else:
        area = SYSTEM_AREA_32
        gdt, stack_top = area + PAGE_SIZE, area + (2 + STACK_PAGES) * PAGE_SIZE
        sentinel = area
        if spec.code_bits == 16:
            sentinel = _sentinel_16(builder, cs_base)
    for gla in [sentinel & ~PAGE_OFFSET_MASK, gdt] + [
            stack_top - (n + 1) * PAGE_SIZE for n in range(STACK_PAGES)]:
        if gla in builder.linear:
            raise UsageError(f"capture: linear page {gla:#x} is used by the description but "
                             "the capture needs it for its sentinel, GDT or stack")
        builder.map(gla, builder.allocate(), "capture page")
    # The sentinel page holds HLT; a call that ever ran it would stop anyway.
    builder.pages[builder.linear[sentinel & ~PAGE_OFFSET_MASK]][
        sentinel & PAGE_OFFSET_MASK] = 0xF4

    segments = _segments(spec, cs_base)
    gdt_page = builder.pages[builder.linear[gdt]]
    descriptors = _descriptors(spec, cs_base)
    for selector, descriptor in descriptors.items():
        gdt_page[selector:selector + 8] = descriptor.to_bytes(8, "little")
    return GuestLayout(
        pages=MappingProxyType({gpa: bytes(data) for gpa, data in builder.pages.items()}),
        linear_to_physical=MappingProxyType(dict(builder.linear)),
        control=_control_registers(spec, builder.root),
        gdt_gla=gdt, gdt_limit=max(descriptors) + 7,
        segments=MappingProxyType(segments),
        sentinel_gla=sentinel, sentinel_rip=sentinel - cs_base,
        stack_top_gla=stack_top,
        monitored=MappingProxyType({page.gpa: page.gla for page in spec.page_tables}),
        data_pages=MappingProxyType({page.gpa: page.gla for page in spec.data_pages}),
    )


def _code_segment_base(spec: CaptureSpec) -> int:
    """CS base: 0 for 64-bit code; given or 0 for 32-bit; given or the 64 KiB
    below the first code blob for 16-bit code (whose IP has 16 bits)."""
    if spec.code_bits == 64:
        return 0
    if "cs_base" in spec.segments:
        base = spec.segments["cs_base"]
    elif spec.code_bits == 16:
        base = spec.code[0].gla & ~0xFFFF
    else:
        base = 0
    limit = 1 << spec.code_bits
    for index, blob in enumerate(spec.code):
        if not (base <= blob.gla and blob.end - base <= limit):
            raise UsageError(f"capture: code[{index}] at {blob.gla:#x} is out of reach of "
                             f"{spec.code_bits}-bit code with CS base {base:#x}")
    return base


def _sentinel_16(builder: _Builder, cs_base: int) -> int:
    """A free page inside the 16-bit code segment for the return address."""
    for offset in range(0xF000, 0, -PAGE_SIZE):
        gla = cs_base + offset
        if gla not in builder.linear:
            return gla
    raise UsageError("capture: no free page left in the 64 KiB 16-bit code segment for the "
                     "return sentinel")


def _segments(spec: CaptureSpec, cs_base: int) -> dict[str, Segment]:
    bases = spec.segments
    if spec.code_bits == 64:
        data = Segment(0x18, 0)
        return {"cs": Segment(0x10, 0), "ds": data, "es": data, "ss": data,
                "fs": Segment(0, bases.get("fs_base", 0)),
                "gs": Segment(0, bases.get("gs_base", 0))}
    ds_base = bases.get("ds_base", 0)
    es_base = bases.get("es_base", ds_base)
    ss_base = bases.get("ss_base", ds_base)
    return {
        "cs": Segment(0x70 if spec.code_bits == 16 else 0x60, cs_base),
        "ds": Segment(0x68, ds_base),
        "es": Segment(0x68 if es_base == ds_base else 0x78, es_base),
        "ss": Segment(0x68 if ss_base == ds_base else 0x80, ss_base),
        "fs": Segment(0xD8, bases.get("fs_base", 0)),
        "gs": Segment(0xE0, bases.get("gs_base", 0)),
    }


def _descriptors(spec: CaptureSpec, cs_base: int) -> dict[int, int]:
    """Selector -> descriptor for every segment `_segments` uses."""
    if spec.code_bits == 64:
        return {0x10: segment_descriptor(0, 0xFFFFF, _CODE_ACCESS, _FLAGS_LONG),
                0x18: segment_descriptor(0, 0xFFFFF, _DATA_ACCESS, _FLAGS_4K_32)}
    out: dict[int, int] = {}
    if spec.code_bits == 16:
        # D=0, byte granularity, 64 KiB: a 16-bit code segment in protected mode.
        out[0x70] = segment_descriptor(cs_base, 0xFFFF, _CODE_ACCESS, 0)
    else:
        out[0x60] = segment_descriptor(cs_base, 0xFFFFF, _CODE_ACCESS, _FLAGS_4K_32)
    for name, segment in _segments(spec, cs_base).items():
        if name != "cs":
            out[segment.selector] = segment_descriptor(segment.base, 0xFFFFF, _DATA_ACCESS,
                                                       _FLAGS_4K_32)
    return out


def _control_registers(spec: CaptureSpec, root: int) -> ControlRegisters:
    cr0 = CR0_PE | CR0_ET | CR0_PG
    cr4 = CR4_OSFXSR | CR4_OSXMMEXCPT
    efer = 0
    if spec.paging == "legacy":
        cr4 |= CR4_PSE
    else:
        cr4 |= CR4_PAE
        efer |= EFER_NXE
    if spec.paging in ("4level", "5level"):
        efer |= EFER_LME | EFER_LMA
    if spec.paging == "5level":
        cr4 |= CR4_LA57
    return ControlRegisters(cr0=cr0, cr3=root, cr4=cr4, efer=efer)
