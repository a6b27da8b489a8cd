"""Read functions, symbols and bytes out of an ELF file (32/64-bit, little-endian).

Just enough ELF (what x86 uses) for two users:

* ``ptemu capture``'s ``{elf, symbol}`` code blobs: `read_function` finds a
  symbol in ``.symtab`` (or ``.dynsym``) and copies ``st_size`` bytes from the
  section that holds it, e.g. ``native_set_pte`` from a decompressed vmlinux;
* the corpus tools (tools/corpus), which read a whole kernel image: its
  PT_LOAD segments (address -> file offset), its sections by name, its
  function symbols, and bytes or pointers at a linked address (`ElfImage`,
  over a memory map so that an 800 MB debug vmlinux is not read into memory).

Raises `UsageError` naming the file (and the symbol or address) when the file
cannot give what is asked.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from ptemu.errors import UsageError

_SHT_SYMTAB = 2
_SHT_DYNSYM = 11
_SHT_NOBITS = 8
_SHN_UNDEF = 0
_SHN_LORESERVE = 0xFF00
_PT_LOAD = 1
STT_FUNC = 2
"""``st_info`` type of a function symbol."""


@dataclass(frozen=True, slots=True)
class ElfFunction:
    """A function's code and the address it is linked at."""

    symbol: str
    address: int
    code: bytes


@dataclass(frozen=True, slots=True)
class ElfSegment:
    """A PT_LOAD program header: `filesz` bytes at file `offset` load at `vaddr`."""

    vaddr: int
    offset: int
    filesz: int


@dataclass(frozen=True, slots=True)
class ElfSection:
    """A section header, its name resolved through ``.shstrtab``."""

    name: str
    kind: int
    address: int
    offset: int
    size: int
    link: int
    entry_size: int


@dataclass(frozen=True, slots=True)
class ElfSymbol:
    """A named symbol: value, size, type (``STT_*``) and section index."""

    name: str
    value: int
    size: int
    kind: int
    section: int


Buffer = bytes | mmap.mmap
"""What an `ElfImage` reads from: the file's bytes, or a read-only map of it."""


class ElfImage:
    """A read-only view of one ELF file: segments, sections, symbols, bytes.

    Build it with `ElfImage.open` (a memory map, released by `close` or a
    ``with`` block) or directly from the file's bytes.
    """

    def __init__(self, data: Buffer, name: str) -> None:
        self.data = data
        self.name = name
        self._file: object = None
        if data[:4] != b"\x7fELF" or len(data) < 52:
            raise UsageError(f"{name}: not an ELF file")
        if data[5] != 1:
            raise UsageError(f"{name}: only little-endian ELF files are supported")
        if data[4] not in (1, 2):
            raise UsageError(f"{name}: ELF class {data[4]} is neither 32- nor 64-bit")
        self.bits = 64 if data[4] == 2 else 32
        self.segments = self._segments()
        self.sections = self._sections()

    @classmethod
    def open(cls, path: Path) -> ElfImage:
        """Map `path` read-only; raises `UsageError` naming it when it cannot be read."""
        try:
            handle = path.open("rb")
        except OSError as error:
            raise UsageError(f"{path}: cannot read ELF file: {error.strerror}") from None
        try:
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as error:
            handle.close()
            raise UsageError(f"{path}: cannot map ELF file: {error}") from None
        try:
            image = cls(data, str(path))
        except UsageError:
            data.close()
            handle.close()
            raise
        image._file = handle
        return image

    def close(self) -> None:
        """Release the memory map and the file (nothing for an image built from bytes)."""
        if isinstance(self.data, mmap.mmap):
            self.data.close()
        close = getattr(self._file, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    # -- headers ------------------------------------------------------------------------

    def _header(self) -> tuple[int, int, int, int, int, int, int]:
        """(phoff, shoff, phentsize, phnum, shentsize, shnum, shstrndx)."""
        if self.bits == 64:
            fields = struct.unpack_from("<QQIHHHHHH", self.data, 0x20)
        else:
            fields = struct.unpack_from("<IIIHHHHHH", self.data, 0x1C)
        phoff, shoff, _flags, _ehsize, phentsize, phnum, shentsize, shnum, shstrndx = fields
        return phoff, shoff, phentsize, phnum, shentsize, shnum, shstrndx

    def _segments(self) -> tuple[ElfSegment, ...]:
        phoff, _, phentsize, phnum, _, _, _ = self._header()
        out: list[ElfSegment] = []
        for number in range(phnum if phoff else 0):
            at = phoff + number * phentsize
            if self.bits == 64:
                kind, _, offset, vaddr, _, filesz = struct.unpack_from("<IIQQQQ", self.data, at)
            else:
                kind, offset, vaddr, _, filesz = struct.unpack_from("<IIIII", self.data, at)
            if kind == _PT_LOAD:
                out.append(ElfSegment(vaddr, offset, filesz))
        return tuple(out)

    def _sections(self) -> tuple[ElfSection, ...]:
        _, shoff, _, _, shentsize, shnum, shstrndx = self._header()
        if shoff == 0 or shoff + shnum * shentsize > len(self.data):
            return ()
        layout = "<IIQQQQIIQQ" if self.bits == 64 else "<IIIIIIIIII"
        raw = []
        for number in range(shnum):
            fields = struct.unpack_from(layout, self.data, shoff + number * shentsize)
            name, kind, _flags, address, offset, size, link, _info, _align, entry_size = fields
            raw.append((name, kind, address, offset, size, link, entry_size))
        names = raw[shstrndx][3] if shstrndx < len(raw) else None
        return tuple(ElfSection(self._cstr(names + r[0]) if names is not None else "", *r[1:])
                     for r in raw)

    def _cstr(self, at: int) -> str:
        end = self.data.find(b"\x00", at)
        return bytes(self.data[at:end]).decode("ascii", "replace")

    # -- queries ------------------------------------------------------------------------

    def section(self, name: str) -> ElfSection | None:
        """The first section called `name`, if any."""
        return next((s for s in self.sections if s.name == name), None)

    def offset_of(self, vaddr: int, size: int = 1) -> int:
        """File offset of `vaddr` through the PT_LOAD segments (all `size` bytes
        file-backed); raises `UsageError` otherwise."""
        for segment in self.segments:
            if segment.vaddr <= vaddr and vaddr + size <= segment.vaddr + segment.filesz:
                return segment.offset + (vaddr - segment.vaddr)
        raise UsageError(f"{self.name}: address {vaddr:#x} (+{size}) is in no PT_LOAD segment")

    def maps(self, vaddr: int, size: int = 1) -> bool:
        """True when `size` bytes at `vaddr` are file-backed by a PT_LOAD segment."""
        return any(s.vaddr <= vaddr and vaddr + size <= s.vaddr + s.filesz
                   for s in self.segments)

    def read(self, vaddr: int, size: int) -> bytes:
        """`size` bytes at linked address `vaddr` (through the segments)."""
        at = self.offset_of(vaddr, size)
        return bytes(self.data[at:at + size])

    def read_pointer(self, vaddr: int) -> int:
        """The pointer-sized little-endian value at `vaddr`."""
        return int.from_bytes(self.read(vaddr, self.bits // 8), "little")

    def symbols(self, *, dynamic: bool = False) -> list[ElfSymbol]:
        """Every named symbol of ``.symtab`` (of ``.dynsym`` too when `dynamic`);
        empty for a stripped file."""
        kinds = (_SHT_SYMTAB, _SHT_DYNSYM) if dynamic else (_SHT_SYMTAB,)
        out: list[ElfSymbol] = []
        for table in self.sections:
            if table.kind in kinds and table.link < len(self.sections):
                out.extend(self._table_symbols(table, self.sections[table.link]))
        return out

    def _table_symbols(self, table: ElfSection, names: ElfSection) -> list[ElfSymbol]:
        entry_size = table.entry_size or (24 if self.bits == 64 else 16)
        out: list[ElfSymbol] = []
        for at in range(table.offset, table.offset + table.size, entry_size):
            if self.bits == 64:
                name, info, _other, index, value, size = struct.unpack_from("<IBBHQQ",
                                                                            self.data, at)
            else:
                name, value, size, info, _other, index = struct.unpack_from("<IIIBBH",
                                                                            self.data, at)
            if name:
                out.append(ElfSymbol(self._cstr(names.offset + name), value, size, info & 0xF,
                                     index))
        return out

    def function(self, symbol: str) -> ElfFunction:
        """The bytes of `symbol` (``st_size`` of them, from the section that holds
        it) and its linked address; raises `UsageError` naming the file and symbol."""
        found = next((s for s in self.symbols(dynamic=True) if s.name == symbol), None)
        if found is None:
            raise UsageError(f"{self.name}: no symbol {symbol!r} in its symbol tables")
        index = found.section
        if index == _SHN_UNDEF or index >= _SHN_LORESERVE or index >= len(self.sections):
            raise UsageError(f"{self.name}: symbol {symbol!r} is not defined in a section")
        if found.size == 0:
            raise UsageError(f"{self.name}: symbol {symbol!r} has size 0")
        home = self.sections[index]
        if home.kind == _SHT_NOBITS:
            raise UsageError(f"{self.name}: symbol {symbol!r} lives in a section without "
                             "bytes")
        if not (home.address <= found.value
                and found.value + found.size <= home.address + home.size):
            raise UsageError(f"{self.name}: symbol {symbol!r} runs outside its section")
        start = home.offset + (found.value - home.address)
        return ElfFunction(symbol, found.value, bytes(self.data[start:start + found.size]))


def read_function(path: Path, symbol: str) -> ElfFunction:
    """The bytes of `symbol` (``st_size`` of them) and its linked address."""
    try:
        image = path.read_bytes()
    except OSError as error:
        raise UsageError(f"{path}: cannot read ELF file: {error.strerror}") from None
    elf = ElfImage(image, str(path))
    if not elf.sections:
        raise UsageError(f"{path}: no usable section header table")
    return elf.function(symbol)
