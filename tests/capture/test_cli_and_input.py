"""`ptemu capture` on the command line, and the description's validation."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from ptemu.capture import capture_description, parse_description
from ptemu.capture.elf import read_function
from ptemu.cli import main
from ptemu.errors import UsageError
from ptemu.fixtures import load_fixture

GOOD: dict[str, Any] = {
    "name": "4level/cli", "paging": "4level", "code_bits": 64,
    "code": [{"gla": "0xffffffff81001000", "bytes": "48 89 37 c3"}],
    "page_tables": [{"gpa": "0x12345000", "gla": "0xffff888012345000"}],
    "calls": [{"regs": {"rdi": "0xffff888012345010", "rsi": "0x63"}}],
}


def write(tmp_path: Path, document: object, name: str = "description.json") -> Path:
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else json.dumps(document),
                    encoding="utf-8")
    return path


def test_cli_writes_a_loadable_fixture(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    out = tmp_path / "fixture.json"
    assert main(["capture", str(write(tmp_path, GOOD)), "-o", str(out)]) == 0
    fixture = load_fixture(out)
    assert fixture.name == "4level/cli"
    assert len(fixture.events) == 1
    assert ": 1 event\n" in capsys.readouterr().err


def test_cli_without_output_prints_the_fixture(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capture", str(write(tmp_path, GOOD))]) == 0
    assert json.loads(capsys.readouterr().out)["ptemu_fixture"] == 1


def test_cli_overrides_policy_and_coalescing(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capture", str(write(tmp_path, GOOD)), "--policy", "hvmi",
                 "--no-coalesce"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["policy"] == "hvmi"
    assert document["capture"]["coalesce"] is False


@pytest.mark.parametrize(("document", "message"), [
    ("{", "not JSON"),
    ([1], "expected an object"),
    ({**GOOD, "paging": "3level"}, "paging: unknown paging mode '3level'"),
    ({k: v for k, v in GOOD.items() if k != "calls"}, "calls: missing key"),
    ({**GOOD, "code_bits": 64, "paging": "pae"}, "code_bits: 64 is not possible with pae"),
    ({**GOOD, "policy": "lenient"}, "policy: unknown policy 'lenient'"),
    ({**GOOD, "code": [{"gla": "0xffffffff81001000", "bytes": "zz"}]},
     "code[0].bytes: not hex bytes"),
    ({**GOOD, "page_tables": [{"gpa": "0x12345008", "gla": "0xffff888012345000"}]},
     "page_tables[0].gpa: 0x12345008 is not page aligned"),
    ({**GOOD, "page_tables": [{"gpa": "0x12345000", "gla": "0x0000900012345000"}]},
     "page_tables[0].gla: 0x900012345000 is not canonical"),
    ({**GOOD, "calls": [{"regs": {"rsp": "0x1"}}]}, "calls[0].regs.rsp: not a register"),
    ({**GOOD, "calls": [{"entry": "nope"}]}, "calls[0].entry: no code blob labelled 'nope'"),
    ({**GOOD, "segments": {"ds_base": "0x1000"}}, "segments.ds_base: 64-bit code ignores"),
    ({**GOOD, "calls": [{"regs": {"rdi": "0x1000", "rsi": "0x63"}}]}, "the CPU stopped"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              document: object, message: str) -> None:
    path = write(tmp_path, document)
    assert main(["capture", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith(f"ptemu capture: {path}: ")


def test_cli_output_into_a_missing_folder_is_refused(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    out = tmp_path / "absent" / "fixture.json"
    assert main(["capture", str(write(tmp_path, GOOD)), "-o", str(out)]) == 2
    assert capsys.readouterr().err == (f"ptemu capture: -o {out}: no such folder "
                                       f"{tmp_path / 'absent'} (ptemu capture creates no "
                                       "folders)\n")
    assert not (tmp_path / "absent").exists()


def test_cli_missing_description(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capture", str(tmp_path / "absent.json")]) == 2
    assert "no such description file" in capsys.readouterr().err


@pytest.mark.parametrize(("change", "message"), [
    ({"page_tables": [{"gpa": "0x12345000", "gla": "0xffff888012345000"},
                      {"gpa": "0x12345000", "gla": "0xffff888012346000"}]},
     "page_tables[1].gpa: 0x12345000 is also used by page_tables[0]"),
    ({"page_tables": [{"gpa": "0x12345000", "gla": "0xffff888012345000",
                       "entries": {"512": "0x1"}}]}, "index 512 is beyond the 512 entries"),
    ({"calls": [{"memory": [{"gpa": "0x999000", "data": "01"}]}]},
     "are not inside one page-table or data page"),
    ({"code": [{"gla": "0xffff888012345000", "bytes": "c3"}]}, "is also page_tables[0]"),
])
def test_description_rules(change: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_description({**GOOD, **change})


def test_32bit_description_rejects_64bit_registers() -> None:
    description = {"name": "pae/x", "paging": "pae", "code_bits": 32,
                   "code": [{"gla": "0xc1001000", "bytes": "c3"}],
                   "page_tables": [{"gpa": "0x1234000", "gla": "0xc1234000"}],
                   "calls": [{"regs": {"r8": "0x1"}}]}
    with pytest.raises(UsageError, match="16/32-bit code has no r8"):
        parse_description(description)


def tiny_elf64(symbol: bytes, code: bytes, address: int) -> bytes:
    """An ELF64 relocatable with .text, .symtab, .strtab, .shstrtab, built from
    the ELF specification's layouts (Elf64_Ehdr, Elf64_Shdr, Elf64_Sym)."""
    shstrtab = b"\0.text\0.symtab\0.strtab\0.shstrtab\0"
    strtab = b"\0other\0" + symbol + b"\0"
    other_sym = struct.pack("<IBBHQQ", 1, 0x12, 0, 1, address, 1)
    wanted = struct.pack("<IBBHQQ", 7, 0x12, 0, 1, address + 1, len(code) - 1)
    symtab = bytes(24) + other_sym + wanted
    body = code + symtab + strtab + shstrtab
    text_off = 64
    sym_off = text_off + len(code)
    str_off = sym_off + len(symtab)
    shs_off = str_off + len(strtab)
    sh_off = shs_off + len(shstrtab)
    header = (b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
              + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, sh_off, 0, 64, 0, 0, 64, 5, 4))
    sections = [
        bytes(64),
        struct.pack("<IIQQQQIIQQ", 1, 1, 6, address, text_off, len(code), 0, 0, 16, 0),
        struct.pack("<IIQQQQIIQQ", 7, 2, 0, 0, sym_off, len(symtab), 3, 1, 8, 24),
        struct.pack("<IIQQQQIIQQ", 15, 3, 0, 0, str_off, len(strtab), 0, 0, 1, 0),
        struct.pack("<IIQQQQIIQQ", 23, 3, 0, 0, shs_off, len(shstrtab), 0, 0, 1, 0),
    ]
    return header + body + b"".join(sections)


def test_elf_function_by_symbol(tmp_path: Path) -> None:
    code = bytes.fromhex("90 48 89 37 c3")          # nop | native_set_pte: mov [rdi], rsi; ret
    (tmp_path / "vmlinux").write_bytes(tiny_elf64(b"native_set_pte", code, 0xFFFFFFFF81001000))
    function = read_function(tmp_path / "vmlinux", "native_set_pte")
    assert function.address == 0xFFFFFFFF81001001
    assert function.code == code[1:]
    description = {**GOOD, "code": [{"elf": "vmlinux", "symbol": "native_set_pte"}]}
    document = capture_description(description, base_dir=tmp_path)
    assert document["events"][0]["regs"]["rip"] == "0xffffffff81001001"
    assert document["capture"]["code"][0]["origin"] == "elf vmlinux:native_set_pte"
    with pytest.raises(UsageError, match="no symbol 'native_set_pmd'"):
        read_function(tmp_path / "vmlinux", "native_set_pmd")


def test_the_documented_example_file(tmp_path: Path) -> None:
    example = (Path(__file__).resolve().parents[2] / "tools" / "corpus" / "capture_specs"
               / "pae-set-pte-example.json")
    out = tmp_path / "example.json"
    assert main(["capture", str(example), "-o", str(out)]) == 0
    (event,) = load_fixture(out).events
    assert event.expect is not None and event.expect.regs == {"rip": 0xC1001005}
    assert [(w.offset, w.value) for w in event.expect.writes or ()] == [
        (4, 0x8000_0000), (0, 0x0222_2067)]
