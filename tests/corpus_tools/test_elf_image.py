"""`ptemu.capture.elf.ElfImage` (shared by `ptemu capture` and the corpus
tools) against binutils' view of files gcc builds here: `nm`, `readelf`."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ptemu.capture.elf import STT_FUNC, ElfImage
from ptemu.errors import UsageError

SOURCE = "int f(int x) { return x * 3 + 1; }\nint g(int x) { return f(x) + 2; }\n"
TOOLS = ("gcc", "nm", "readelf")


def _build(tmp_path: Path, *flags: str, out: str) -> Path:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (binutils/gcc) as the reference")
    (tmp_path / "t.c").write_text(SOURCE)
    target = tmp_path / out
    result = subprocess.run(["gcc", "-O2", *flags, "-o", str(target), str(tmp_path / "t.c")],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"gcc {' '.join(flags)} cannot build here: {result.stderr.strip()[-200:]}")
    return target


def _nm(path: Path) -> dict[str, tuple[int, int]]:
    out = subprocess.run(["nm", "-S", str(path)], capture_output=True, text=True,
                         check=True).stdout
    rows = re.findall(r"^(\w+) (\w+) (\w) (\w+)$", out, re.MULTILINE)
    return {name: (int(value, 16), int(size, 16)) for value, size, kind, name in rows
            if kind == "T"}


def _text_section(path: Path) -> tuple[int, int]:
    """(address, file offset) of .text from `readelf -SW`."""
    out = subprocess.run(["readelf", "-SW", str(path)], capture_output=True, text=True,
                         check=True).stdout
    match = re.search(r"\.text\s+PROGBITS\s+([0-9a-f]+) ([0-9a-f]+)", out)
    assert match is not None, out
    return int(match.group(1), 16), int(match.group(2), 16)


def test_64bit_shared_object_symbols_segments_and_bytes(tmp_path: Path) -> None:
    path = _build(tmp_path, "-shared", "-fPIC", out="t.so")
    reference = _nm(path)
    text_address, text_offset = _text_section(path)
    raw = path.read_bytes()
    loads = re.findall(r"^\s+LOAD\s+0x(\w+) 0x(\w+) 0x\w+ 0x(\w+)",
                       subprocess.run(["readelf", "-lW", str(path)], capture_output=True,
                                      text=True, check=True).stdout, re.MULTILINE)
    with ElfImage.open(path) as elf:
        assert elf.bits == 64
        assert [(s.offset, s.vaddr, s.filesz) for s in elf.segments] == [
            (int(o, 16), int(v, 16), int(f, 16)) for o, v, f in loads]
        functions = {s.name: (s.value, s.size) for s in elf.symbols() if s.kind == STT_FUNC}
        for name in ("f", "g"):
            value, size = reference[name]
            assert functions[name] == (value, size)
            expected = raw[text_offset + value - text_address:][:size]
            assert elf.read(value, size) == expected          # through PT_LOAD
            assert elf.function(name).code == expected        # through the section
            assert elf.offset_of(value) == text_offset + value - text_address
        assert elf.section(".text") is not None
        assert not elf.maps(0x7FFF_0000_0000)
        with pytest.raises(UsageError, match="in no PT_LOAD segment"):
            elf.read(0x7FFF_0000_0000, 4)


def test_32bit_object_symbols_and_bytes(tmp_path: Path) -> None:
    path = _build(tmp_path, "-m32", "-c", out="t.o")
    reference = _nm(path)
    text_address, text_offset = _text_section(path)
    raw = path.read_bytes()
    with ElfImage.open(path) as elf:
        assert elf.bits == 32
        assert elf.segments == ()                                 # a relocatable object
        for name in ("f", "g"):
            value, size = reference[name]
            function = elf.function(name)
            assert (function.address, len(function.code)) == (value, size)
            assert function.code == raw[text_offset + value - text_address:][:size]


def test_not_an_elf_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "vmlinux"
    bad.write_bytes(b"MZ" + bytes(100))
    with pytest.raises(UsageError, match="vmlinux: not an ELF file"):
        ElfImage.open(bad)
    with pytest.raises(UsageError, match="cannot read ELF file"):
        ElfImage.open(tmp_path / "absent")
