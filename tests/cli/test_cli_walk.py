"""`ptemu walk` as a user runs it: the installed command on fixtures and raw images.

Every expected translation is worked by hand from the SDM's walk (Vol. 3A,
section 4.3 for 32-bit paging, 4.4 for PAE, 4.5 for 4- and 5-level paging):
the index at each level is a bit field of the linear address, the entry is read
at table + index * entry size, and the final GPA is the frame of the mapping
entry plus the low bits of the address. The tables are written by the test
itself, so each line below can be checked with pencil and paper.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

P_RW = 0x3          # present, writable (supervisor)
P_RW_US = 0x7       # present, writable, user
PS = 0x80           # bit 7: the entry maps a page


def ptemu(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the installed `ptemu` console script, as a user does."""
    script = shutil.which("ptemu", path=str(Path(sys.executable).parent)) or shutil.which("ptemu")
    if script is None:
        pytest.fail("the `ptemu` console script is not installed (pip install -e .)")
    return subprocess.run([script, *map(str, argv)], capture_output=True, text=True,
                          timeout=120, check=False)


def refused(done: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a run that must exit 2 with nothing on stdout."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.endswith("\n"), done.stderr
    assert done.stderr.startswith("ptemu walk: ")
    return done.stderr.rstrip("\n")


class Image:
    """A raw guest-physical memory dump starting at `base`, built entry by entry."""

    def __init__(self, base: int, size: int, entry_size: int = 8) -> None:
        self.base, self.data, self.entry_size = base, bytearray(size), entry_size

    def put(self, gpa: int, value: int) -> None:
        fmt = "<Q" if self.entry_size == 8 else "<I"
        self.data[gpa - self.base:gpa - self.base + self.entry_size] = struct.pack(fmt, value)

    def write(self, path: Path) -> Path:
        path.write_bytes(bytes(self.data))
        return path


# -- 4-level paging, raw image --------------------------------------------------------

# GLA 0xffff888012345ff8: bits 47:39 = 0x111 = 273 (PML4), 38:30 = 0 (PDPT),
# 29:21 = 0x91 = 145 (PD), 20:12 = 0x145 = 325 (PT), offset 0xff8.
GLA_4K = 0xFFFF_8880_1234_5FF8
# GLA 0xffff888040abcdef: PML4 273, PDPT 1 (bits 38:30 = 1), PD 5 (bits 29:21 =
# 0x205 & 0x1ff), 2 MiB offset 0xabcdef & 0x1fffff = 0xbcdef.
GLA_2M = 0xFFFF_8880_40AB_CDEF


def four_level_image(tmp_path: Path) -> Path:
    image = Image(base=0x1000, size=0x5000)                    # GPA 0x1000..0x5fff
    image.put(0x1000 + 273 * 8, 0x2000 | P_RW)                 # PML4E -> PDPT 0x2000
    image.put(0x2000 + 0 * 8, 0x3000 | P_RW)                   # PDPTE[0] -> PD 0x3000
    image.put(0x2000 + 1 * 8, 0x5000 | P_RW)                   # PDPTE[1] -> PD 0x5000
    image.put(0x3000 + 145 * 8, 0x4000 | P_RW)                 # PDE -> PT 0x4000
    image.put(0x4000 + 325 * 8, (1 << 63) | 0x1234_5000 | P_RW | 0x60)   # XD, A, D
    image.put(0x5000 + 5 * 8, 0x7660_0000 | PS | P_RW_US)      # 2 MiB page at 0x76600000
    image.put(0x3000 + 146 * 8, 0x9000 | P_RW)                 # PDE -> PT 0x9000 (not dumped)
    return image.write(tmp_path / "guest.bin")


def test_image_4k_translation(tmp_path: Path) -> None:
    done = ptemu("walk", "--image", four_level_image(tmp_path), "--base", "0x1000",
                 "--paging", "4level", "--cr3", "0x1000", hex(GLA_4K))
    assert (done.returncode, done.stderr) == (0, "")
    lines = done.stdout.splitlines()
    assert lines[:7] == [
        "paging: 4level (MAXPHYADDR 52)",
        "cr3: 0x1000",
        "gla: 0xffff888012345ff8",
        "PML4E[273] at 0x1888 = 0x2003: table at 0x2000",
        "PDPTE[0] at 0x2000 = 0x3003: table at 0x3000",
        "PDE[145] at 0x3488 = 0x4003: table at 0x4000",
        "PTE[325] at 0x4a28 = 0x8000000012345063: maps 4 KiB page at 0x12345000",
    ]
    assert "gpa: 0x12345ff8 (4 KiB page)" in lines          # 0x12345000 + 0xff8
    assert "page: writable yes, user no, executable no" in lines   # US=0 everywhere, XD=1


def test_image_2m_translation_as_json(tmp_path: Path) -> None:
    done = ptemu("walk", "--image", four_level_image(tmp_path), "--base", "0x1000",
                 "--paging", "4level", "--cr3", "0x1000", hex(GLA_2M), "--json")
    assert (done.returncode, done.stderr) == (0, "")
    data = json.loads(done.stdout)
    assert [(s["level"], s["index"], s["entry_gpa"]) for s in data["steps"]] == [
        ("PML4E", 273, "0x1888"), ("PDPTE", 1, "0x2008"), ("PDE", 5, "0x5028")]
    assert data["gpa"] == "0x766bcdef"                      # 0x76600000 + 0xbcdef
    assert data["page_bytes"] == "0x200000"                 # a size: page_bytes, as in entry
    assert "page_size" not in data
    assert data["stop"] is None and data["notes"] == []
    assert data["permissions"]["user_write"] is False       # the PML4E and PDPTE have US=0


def test_image_table_outside_the_dump_is_an_error_not_a_zero(tmp_path: Path) -> None:
    # GLA ...12545ff8: PD index 146 -> PT 0x9000, which the dump (0x1000..0x5fff)
    # does not hold; reading zeros there would invent "not present".
    message = refused(ptemu("walk", "--image", four_level_image(tmp_path), "--base", "0x1000",
                            "--paging", "4level", "--cr3", "0x1000", "0xffff888012545ff8"))
    assert message == (f"ptemu walk: the PTE at 0x9a28 (table at 0x9000) is not in "
                       f"{tmp_path / 'guest.bin'} (GPA 0x1000..0x5fff): the image does not "
                       "hold that table")


def test_image_root_outside_the_dump(tmp_path: Path) -> None:
    message = refused(ptemu("walk", "--image", four_level_image(tmp_path), "--base", "0x1000",
                            "--paging", "4level", "--cr3", "0x8000", hex(GLA_4K)))
    assert message == (f"ptemu walk: --cr3 0x8000: the root table at 0x8000 (PML4Es) is not "
                       f"in {tmp_path / 'guest.bin'} (GPA 0x1000..0x5fff): the image holds no "
                       "bytes there")


# -- PAE and 32-bit paging, raw images --------------------------------------------------


def test_pae_image(tmp_path: Path) -> None:
    # CR3 0x1020: the PDPT is 32-byte aligned at 0x1020 (CR3 bits 31:5).
    # GLA 0xc0123abc: PDPT index bits 31:30 = 3, PD index bits 29:21 = 0,
    # PT index bits 20:12 = 0x123 = 291, offset 0xabc.
    image = Image(base=0x0, size=0x4000)
    image.put(0x1020 + 3 * 8, 0x2000 | 0x1)                  # PDPTE: P only (no R/W in PAE)
    image.put(0x2000 + 0 * 8, 0x3000 | P_RW_US)              # PDE -> PT 0x3000
    image.put(0x3000 + 291 * 8, 0x0ABC_D000 | P_RW_US)       # PTE -> page 0xabcd000
    path = image.write(tmp_path / "pae.bin")
    done = ptemu("walk", "--image", path, "--base", "0x0", "--paging", "pae",
                 "--cr3", "0x1020", "0xc0123abc")
    assert (done.returncode, done.stderr) == (0, "")
    lines = done.stdout.splitlines()
    assert "PDPTE[3] at 0x1038 = 0x2001: table at 0x2000" in lines
    assert "PDE[0] at 0x2000 = 0x3007: table at 0x3000" in lines
    assert "PTE[291] at 0x3918 = 0xabcd007: maps 4 KiB page at 0xabcd000" in lines
    assert "gpa: 0xabcdabc (4 KiB page)" in lines


def test_legacy_image_with_a_4m_page(tmp_path: Path) -> None:
    # 32-bit paging, CR3 0x5000. GLA 0x00c01abc: PD index bits 31:22 = 3;
    # PDE 3 maps a 4 MiB page at 0x01000000 (PS=1, CR4.PSE=1 by default):
    # GPA = 0x01000000 + (0x00c01abc & 0x3fffff) = 0x01001abc.
    # GLA 0x00801abc: PD index 2 -> PT 0x6000, PT index bits 21:12 = 1.
    image = Image(base=0x5000, size=0x2000, entry_size=4)
    image.put(0x5000 + 3 * 4, 0x0100_0000 | PS | P_RW)
    image.put(0x5000 + 2 * 4, 0x6000 | P_RW)
    image.put(0x6000 + 1 * 4, 0x0007_7000 | P_RW)
    path = image.write(tmp_path / "legacy.bin")
    big = ptemu("walk", "--image", path, "--base", "0x5000", "--paging", "legacy",
                "--cr3", "0x5000", "0xc01abc")
    assert big.returncode == 0
    assert "PDE[3] at 0x500c = 0x1000083: maps 4 MiB page at 0x1000000" in big.stdout
    assert "gpa: 0x1001abc (4 MiB page)" in big.stdout.splitlines()
    small = ptemu("walk", "--image", path, "--base", "0x5000", "--paging", "legacy",
                  "--cr3", "0x5000", "0x801abc", "--json")
    data = json.loads(small.stdout)
    assert (data["gpa"], data["page_bytes"]) == ("0x77abc", "0x1000")
    assert [s["entry_gpa"] for s in data["steps"]] == ["0x5008", "0x6004"]
    # Without CR4.PSE the PS bit is ignored in a 32-bit PDE: 0x1000083 points to a
    # page table at 0x1000000, outside the image.
    message = refused(ptemu("walk", "--image", path, "--base", "0x5000", "--paging",
                            "legacy", "--cr3", "0x5000", "0xc01abc", "--no-pse"))
    assert "the PTE at 0x1000004 (table at 0x1000000) is not in" in message


# -- fixtures: with and without events --------------------------------------------------


def five_level_image_fixture(tmp_path: Path, events: list[object]) -> Path:
    # 5-level paging, GLA 0xff11223344556678 (57-bit canonical: bits 63:56 copy bit 56 = 1).
    # Indexes: PML5 bits 56:48 = 0x111 = 273, PML4 bits 47:39 = 0x44 = 68,
    # PDPT bits 38:30 = 0xcd = 205, PD bits 29:21 = 0x22, PT bits 20:12 = 0x156,
    # offset 0x678.  A 1 GiB page at the PDPTE: GPA = 0x80000000 + (gla & 0x3fffffff)
    # = 0x80000000 + 0x04556678.
    entries = {0x1000 + 273 * 8: 0x2000 | P_RW, 0x2000 + 68 * 8: 0x3000 | P_RW,
               0x3000 + 205 * 8: 0x8000_0000 | PS | P_RW}
    document = {
        "ptemu_fixture": 1, "name": "cli/five-level-image", "paging": "5level",
        "code_bits": 64,
        "memory": [{"gpa": hex(gpa), "data": value.to_bytes(8, "little").hex()}
                   for gpa, value in entries.items()],
        "events": events,
    }
    path = tmp_path / "image.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def test_event_less_fixture_walks_and_replay_refuses_it(tmp_path: Path) -> None:
    path = five_level_image_fixture(tmp_path, events=[])
    done = ptemu("walk", path, "--cr3", "0x1000", "0xff11223344556678")
    assert (done.returncode, done.stderr) == (0, "")
    lines = done.stdout.splitlines()
    assert lines[3:6] == [
        "PML5E[273] at 0x1888 = 0x2003: table at 0x2000",
        "PML4E[68] at 0x2220 = 0x3003: table at 0x3000",
        "PDPTE[205] at 0x3668 = 0x80000083: maps 1 GiB page at 0x80000000",
    ]
    assert "gpa: 0x84556678 (1 GiB page)" in lines
    message = ptemu("replay", path)
    assert (message.returncode, message.stdout) == (2, "")
    assert message.stderr == (f"ptemu replay: {path}: no events to replay (a fixture with an "
                              "empty 'events' list is a memory image: walk it with ptemu "
                              "walk)\n")


def test_fixture_page_never_given_reads_zero_with_a_note(tmp_path: Path) -> None:
    # PML5E 273 -> 0x2000; PML4E[0] (GLA bits 47:39 = 0) is in the 0x2000 page the
    # fixture gives, and is zero: not present, no note. PML5E[0] points nowhere
    # the fixture gives (zero entry, root page given): not present either.
    # A PML4E pointing to 0x7000, a page the fixture never gives, gets a note.
    path = five_level_image_fixture(tmp_path, events=[])
    document = json.loads(path.read_text())
    document["memory"].append({"gpa": hex(0x2000 + 69 * 8),
                               "data": (0x7000 | P_RW).to_bytes(8, "little").hex()})
    path.write_text(json.dumps(document))
    # GLA with PML5 273, PML4 69 (bits 47:39), the rest 0: 0xff11228000000000.
    done = ptemu("walk", path, "--cr3", "0x1000", "0xff11228000000000", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["stop"] == "not-present"
    assert [s["entry_gpa"] for s in data["steps"]] == ["0x1888", "0x2228", "0x7000"]
    assert data["notes"] == [(f"PDPTE table at 0x7000: the memory of {path} gives no byte of "
                              "its page, so its entries read as zero")]


def test_fixture_without_page_tables_says_what_is_missing(tmp_path: Path) -> None:
    event = {"gpa": "0x9ff8", "gla": "0xff11223344556678", "code": "48 89 37",
             "regs": {"rip": "0xffffffff81000000", "cr3": "0x400000"}}
    path = five_level_image_fixture(tmp_path, events=[event])
    message = refused(ptemu("walk", path, "--cr3", "0x400000", "0x0"))
    assert message == (f"ptemu walk: --cr3 0x400000: the root table at 0x400000 (PML5Es) is "
                       f"not in the memory of {path}: the fixture holds no page tables there "
                       "(a capture records them with include_page_tables)")
    # A CR3 other than the one the events ran with: the message names theirs.
    message = refused(ptemu("walk", path, "--cr3", "0x9000", "0x0"))
    assert message.endswith("; its events run with cr3 0x400000")


@pytest.mark.parametrize(("argv", "message"), [
    (["--cr3", "0x1000", "0x0"], "give FIXTURE.json, or --image FILE --base GPA --paging MODE"),
    (["{fixture}", "--image", "{image}", "--cr3", "0x1000", "0x0"],
     "give FIXTURE.json or --image FILE, not both"),
    (["{fixture}", "--base", "0x0", "--cr3", "0x1000", "0x0"], "--base applies to --image only"),
    (["{fixture}", "--paging", "pae", "--cr3", "0x1000", "0x0"],
     "--paging pae: {fixture} says paging 5level"),
    (["--image", "{image}", "--paging", "4level", "--cr3", "0x1000", "0x0"],
     "--image needs --base GPA"),
    (["--image", "{image}", "--base", "0x0", "--cr3", "0x1000", "0x0"],
     "--image needs --paging MODE"),
    (["--image", "{tmp}/absent.bin", "--base", "0x0", "--paging", "pae", "--cr3", "0x0", "0x0"],
     "--image {tmp}/absent.bin: cannot read: No such file or directory"),
    (["--image", "{empty}", "--base", "0x0", "--paging", "pae", "--cr3", "0x0", "0x0"],
     "--image {empty}: the file is empty"),
    (["--image", "{image}", "--base", "0xfffffffffffff000", "--paging", "4level",
      "--cr3", "0x0", "0x0"], "runs past the 64-bit guest-physical address space"),
    (["--image", "{image}", "--base", "0x0", "--paging", "pae", "--cr3", "0x0",
      "0x100000000"], "GLA: 0x100000000 does not fit pae paging's 32-bit linear addresses"),
    (["{fixture}", "{fixture}", "--cr3", "0x0", "0x0"], "too many arguments"),
    (["{fixture}", "--cr3", "0x0"], "GLA: missing"),
])
def test_walk_usage_errors(tmp_path: Path, argv: list[str], message: str) -> None:
    names = {"fixture": str(five_level_image_fixture(tmp_path, events=[])),
             "image": str(four_level_image(tmp_path)), "tmp": str(tmp_path),
             "empty": str(tmp_path / "empty.bin")}
    (tmp_path / "empty.bin").write_bytes(b"")
    line = refused(ptemu("walk", *(arg.format(**names) for arg in argv)))
    assert message.format(**names) in line


# -- the shipped corpus: every trace carries its page tables --------------------------------


def test_walk_translates_every_shipped_trace_as_its_capture_did(
        capsys: pytest.CaptureFixture[str]) -> None:
    # The expected GPA of each event is what the capture oracle's CPU (Unicorn
    # running the guest with paging on, walking its own tables) faulted on, not
    # ptemu's walker. In-process for speed: 130-odd files.
    from ptemu.cli import main
    from ptemu.fixtures import corpus_path, find_fixtures, load_fixture

    checked = 0
    for path in find_fixtures([corpus_path()]):
        fixture = load_fixture(path)
        for event in fixture.events:
            assert main(["walk", str(path), "--cr3", hex(event.regs.get("cr3", 0)),
                         hex(event.gla), "--json"]) == 0, (path, capsys.readouterr().err)
            data = json.loads(capsys.readouterr().out)
            assert data["notes"] == [], path
            status = event.expect.status if event.expect else None
            if status is not None and status.value == "emulated":
                assert data["gpa"] == hex(event.gpa), (path, event.index)
                checked += 1
            break                                   # the first event of each trace
    assert checked >= 100
