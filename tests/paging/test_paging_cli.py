"""`ptemu entry` and `ptemu walk` through the real dispatcher: output and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ptemu.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        status = main(list(argv))
    except SystemExit as stop:          # argparse's own checks (choices, types)
        status = int(stop.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


def test_entry_text(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "entry", "--paging", "4level", "--level", "2",
                           "0x80000000000000e3")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "paging: 4level (MAXPHYADDR 52)"
    for line in ("level: PDE (2)", "kind: page", "ps: yes", "nx: yes",
                 "address: 0x0", "page_bytes: 0x200000 (2 MiB)", "reserved_bits: 0x0"):
        assert line in lines


def test_entry_json(capsys: pytest.CaptureFixture[str]) -> None:
    # Legacy 4 MiB PDE, PSE-36 bits 20:13 = 1 (PA bit 32), bit 21 reserved, PAT.
    status, out, _ = run(capsys, "entry", "--paging", "legacy", "--level", "2", "0x203083",
                         "--json")
    assert status == 0
    data = json.loads(out)
    assert data["level"] == "PDE" and data["level_number"] == 2
    assert data["address"] == "0x100000000" and data["reserved_bits"] == "0x200000"
    assert data["pat"] is True and data["page_bytes"] == "0x400000"
    assert "nx" not in data                                   # 32-bit entries have no XD


def test_entry_reserved_note_and_maxphyaddr(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "entry", "--paging", "4level", "--level", "1",
                         "--maxphyaddr", "46", "0x400000001003")
    assert status == 0
    assert "reserved_bits: 0x400000000000 (set: the CPU raises #PF with PFEC.RSVD=1)" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--paging", "ia32e", "--level", "1", "0x1"], "--paging: invalid choice: 'ia32e'"),
    (["--paging", "pae", "--level", "4", "0x1"], "no level 4"),
    (["--paging", "4level", "--level", "0", "0x1"], "--level: 0 is not in 1..5"),
    (["--paging", "4level", "--level", "1", "xyz"], "VALUE: 'xyz' is not a hex number"),
    (["--paging", "legacy", "--level", "1", "0x100000000"],
     "VALUE: 0x100000000 does not fit in a 4-byte legacy entry"),
    (["--paging", "4level", "--level", "1", "--maxphyaddr", "60", "0x1"],
     "--maxphyaddr: 60 is not in 32..52"),
])
def test_entry_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str],
                             message: str) -> None:
    status, out, err = run(capsys, "entry", *argv)
    assert status == 2 and out == ""
    assert message in err and err.count("\n") == 1 and err.startswith("ptemu entry: ")


def write_fixture(tmp_path: Path, memory: list[dict[str, str]]) -> Path:
    document = {
        "ptemu_fixture": 1, "name": "paging/walk-cli", "paging": "4level", "code_bits": 64,
        "memory": memory,
        "events": [{"gpa": "0x4000", "gla": "0xffff888000004000",
                    "regs": {"rip": "0xffffffff81000000"}, "code": "90"}],
    }
    path = tmp_path / "walk.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def entry_bytes(value: int) -> str:
    return value.to_bytes(8, "little").hex()


GLA = 0xFFFF_8880_0020_1ABC     # PML4 273, PDPT 0, PD 1, PT 1


def tree(tmp_path: Path) -> Path:
    pml4, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000
    return write_fixture(tmp_path, [
        {"gpa": hex(pml4 + 273 * 8), "data": entry_bytes(pdpt | 0x63)},
        {"gpa": hex(pdpt), "data": entry_bytes(pd | 0x63)},
        {"gpa": hex(pd + 8), "data": entry_bytes(pt | 0x63)},
        {"gpa": hex(pt + 8), "data": entry_bytes(0x8000_0000_1234_5163)},
    ])


def test_walk_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "walk", str(tree(tmp_path)), "--cr3", "0x1000", hex(GLA))
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert "PML4E[273] at 0x1888 = 0x2063: table at 0x2000" in lines
    assert "PTE[1] at 0x4008 = 0x8000000012345163: maps 4 KiB page at 0x12345000" in lines
    assert "gpa: 0x12345abc (4 KiB page)" in lines
    assert "page: writable yes, user no, executable no" in lines


def test_walk_json_not_present(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "walk", str(tree(tmp_path)), "--cr3", "0x1000",
                         hex(GLA + 0x1000), "--json")
    assert status == 0
    data = json.loads(out)
    assert data["stop"] == "not-present" and data["gpa"] is None
    assert [s["level"] for s in data["steps"]] == ["PML4E", "PDPTE", "PDE", "PTE"]
    assert data["steps"][3]["entry_gpa"] == "0x4010" and data["steps"][3]["entry"] == "0x0"
    assert data["steps"][0]["table_gla"] == "0x0"


def test_walk_cr3_outside_memory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "walk", str(tree(tmp_path)), "--cr3", "0x9000", hex(GLA))
    assert status == 2 and out == ""
    assert err == (f"ptemu walk: --cr3 0x9000: the root table at 0x9000 (PML4Es) is not in the "
                   f"memory of {tmp_path / 'walk.json'}: the fixture holds no page tables there "
                   "(a capture records them with include_page_tables)\n")


def test_walk_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "walk", str(tmp_path / "missing.json"), "--cr3", "0x1000", "0x0")
    assert status == 2 and "cannot read" in err
    status, _, err = run(capsys, "walk", str(tree(tmp_path)), "--cr3", "0x1000", "zz")
    assert status == 2 and "GLA: 'zz' is not a hex number" in err
    status, _, err = run(capsys, "walk", str(tree(tmp_path)), "--cr3", "0x1000", hex(1 << 64))
    assert status == 2 and "does not fit" in err
