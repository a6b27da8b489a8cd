"""Read one function's bytes and address out of an ELF file's symbol table.

Just enough ELF (32- and 64-bit, little-endian: what x86 uses) to find a
symbol in ``.symtab`` (or ``.dynsym``) and copy ``st_size`` bytes from the
section that holds it, e.g. ``native_set_pte`` from a decompressed vmlinux.
Raises `UsageError` naming the file and the symbol when that is not possible.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ptemu.errors import UsageError

_SHT_SYMTAB = 2
_SHT_DYNSYM = 11
_SHT_NOBITS = 8
_SHN_UNDEF = 0
_SHN_LORESERVE = 0xFF00


@dataclass(frozen=True, slots=True)
class ElfFunction:
    """A function's code and the address it is linked at."""

    symbol: str
    address: int
    code: bytes


@dataclass(frozen=True, slots=True)
class _Section:
    kind: int
    address: int
    offset: int
    size: int
    link: int
    entry_size: int


def read_function(path: Path, symbol: str) -> ElfFunction:
    """The bytes of `symbol` (``st_size`` of them) and its linked address."""
    try:
        image = path.read_bytes()
    except OSError as error:
        raise UsageError(f"{path}: cannot read ELF file: {error.strerror}") from None
    if image[:4] != b"\x7fELF" or len(image) < 52:
        raise UsageError(f"{path}: not an ELF file")
    is64 = image[4] == 2
    if image[5] != 1:
        raise UsageError(f"{path}: only little-endian ELF files are supported")
    sections = _sections(image, is64, path)
    for section in sections:
        if section.kind not in (_SHT_SYMTAB, _SHT_DYNSYM):
            continue
        names = sections[section.link]
        found = _find_symbol(image, section, names, symbol, is64)
        if found is None:
            continue
        value, size, index = found
        if index == _SHN_UNDEF or index >= _SHN_LORESERVE or index >= len(sections):
            raise UsageError(f"{path}: symbol {symbol!r} is not defined in a section")
        if size == 0:
            raise UsageError(f"{path}: symbol {symbol!r} has size 0")
        home = sections[index]
        if home.kind == _SHT_NOBITS:
            raise UsageError(f"{path}: symbol {symbol!r} lives in a section without bytes")
        start = home.offset + (value - home.address)
        if not (home.address <= value and value + size <= home.address + home.size):
            raise UsageError(f"{path}: symbol {symbol!r} runs outside its section")
        return ElfFunction(symbol, value, image[start:start + size])
    raise UsageError(f"{path}: no symbol {symbol!r} in its symbol tables")


def _sections(image: bytes, is64: bool, path: Path) -> list[_Section]:
    if is64:
        offset, = struct.unpack_from("<Q", image, 0x28)
        entry_size, count = struct.unpack_from("<HH", image, 0x3A)
        layout = "<IIQQQQIIQQ"
    else:
        offset, = struct.unpack_from("<I", image, 0x20)
        entry_size, count = struct.unpack_from("<HH", image, 0x2E)
        layout = "<IIIIIIIIII"
    if offset == 0 or offset + count * entry_size > len(image):
        raise UsageError(f"{path}: no usable section header table")
    out: list[_Section] = []
    for number in range(count):
        fields = struct.unpack_from(layout, image, offset + number * entry_size)
        _name, kind, _flags, address, file_offset, size, link, _info, _align, ent = fields
        out.append(_Section(kind, address, file_offset, size, link, ent))
    return out


def _find_symbol(image: bytes, table: _Section, names: _Section, wanted: str,
                 is64: bool) -> tuple[int, int, int] | None:
    """(value, size, section index) of `wanted` in one symbol table."""
    target = wanted.encode()
    entry_size = table.entry_size or (24 if is64 else 16)
    for start in range(table.offset, table.offset + table.size, entry_size):
        if is64:
            name, _info, _other, index, value, size = struct.unpack_from("<IBBHQQ", image, start)
        else:
            name, value, size, _info, _other, index = struct.unpack_from("<IIIBBH", image, start)
        begin = names.offset + name
        if image[begin:begin + len(target) + 1] == target + b"\0":
            return value, size, index
    return None
