"""Hostile files: each is a one-line error (exit 2) or costs memory in
proportion to what it describes (docs/fixture-format.md, "Bounds")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ptemu.cli import main
from ptemu.errors import FixtureError
from ptemu.fixtures import MAX_MEMORY_PAGES, load_fixture

Document = dict[str, Any]


def test_a_51_mb_spaced_hex_region_costs_what_it_describes(document: Document,
                                                           tmp_path: Path) -> None:
    # 17 MiB of bytes written "00 00 ..." (51 MiB of text). Peak RSS of a fresh
    # process that loads it, measured by its parent: the text, its decoded
    # string and the bytes, not a list of 17 million pieces (1.41 GB before).
    size = 17 * 1024 * 1024
    path = tmp_path / "big.json"
    before, after = json.dumps({**document, "memory": [{"gpa": "0x0", "data": "HEX"}]}
                               ).split("HEX")
    with path.open("w", encoding="utf-8") as out:
        out.write(before)
        for _ in range(size // 4096):
            out.write("00 " * 4096)
        out.write(after)
    assert path.stat().st_size > 51_000_000
    script = ("import resource, subprocess, sys; subprocess.run([sys.executable, '-c', "
              "'import sys; from ptemu.fixtures import load_fixture; "
              "f = load_fixture(sys.argv[1]); print(len(f.memory_regions[0][1]))', sys.argv[1]],"
              " check=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                          text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-400:]
    loaded, peak_kb = (int(line) for line in done.stdout.split())
    assert loaded == size
    # raw file + text + JSON string (51 MiB each) + 17 MiB of bytes + interpreter
    assert peak_kb < 300 * 1024, f"peak RSS {peak_kb} KB"


def test_memory_past_the_page_bound_is_refused(document: Document, write_json: Any) -> None:
    # One byte in each of MAX_MEMORY_PAGES + 1 distinct pages: 4 KiB each if kept.
    document["memory"] = [{"gpa": hex(page << 12), "data": "01"}
                          for page in range(MAX_MEMORY_PAGES + 1)]
    with pytest.raises(FixtureError) as caught:
        load_fixture(write_json(document))
    assert caught.value.key == f"memory[{MAX_MEMORY_PAGES}].gpa"
    assert "more than 65536 distinct 4 KiB pages" in str(caught.value)


def test_memory_at_the_page_bound_is_accepted(document: Document, write_json: Any) -> None:
    # The fixture's own event writes in page 3 (GPA 0x3ff0), among these pages.
    document["memory"] = [{"gpa": hex(page << 12), "data": "00"}
                          for page in range(MAX_MEMORY_PAGES)]
    assert len(load_fixture(write_json(document)).memory_regions) == MAX_MEMORY_PAGES


@pytest.mark.parametrize("text", [
    '{"ptemu_fixture": 1, "ptemu_fixture": 1}',
    None,  # a duplicate inside an event's registers
])
def test_duplicate_keys_are_refused(text: str | None, document: Document,
                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if text is None:
        text = json.dumps(document).replace('"rip": "0xc1001234"',
                                            '"rip": "0xc1001234", "rip": "0xc1001235"')
    path = tmp_path / "dup.json"
    path.write_text(text, "utf-8")
    assert main(["replay", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "key given twice in one JSON object" in err
    assert ("key 'rip'" in err) or ("key 'ptemu_fixture'" in err)


@pytest.mark.parametrize("where", ["gpa", "code", "register name", "register value"])
def test_errors_cut_a_20_mb_value(where: str, document: Document, write_json: Any) -> None:
    huge = "f" * 20_000_000
    event = document["events"][0]
    if where == "gpa":
        event["gpa"] = "0x" + huge
    elif where == "code":
        event["code"] = "zz" + huge
    elif where == "register name":
        event["regs"]["r" + huge] = "0x1"
    else:
        event["regs"]["rax"] = "0x" + huge
    with pytest.raises(FixtureError) as caught:
        load_fixture(write_json(document))
    assert len(str(caught.value)) < 400
