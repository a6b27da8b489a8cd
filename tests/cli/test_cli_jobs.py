"""``ptemu replay -j N``: the same output, in the same order, and exit status as -j 1."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ptemu.fixtures import corpus_path

# A PAE guest writes the PTE at GPA 0x3ff0 in two halves, coalesced into one
# exit: mov [eax+4], ecx (89 48 04) then mov [eax], edx (89 10); RIP ends
# 3 + 2 bytes on, at 0xc1001239.
PAE_EVENT: dict[str, object] = {
    "gpa": "0x3ff4", "gla": "0xc0003ff4",
    "regs": {"rip": "0xc1001234", "rax": "0xc0003ff0", "rcx": "0x1", "rdx": "0x5063"},
    "code": "89 48 04 89 10 c3",
    "expect": {"status": "emulated", "regs": {"rip": "0xc1001239"}},
}


def document(name: str) -> dict[str, Any]:
    return {"ptemu_fixture": 1, "name": name, "paging": "pae", "code_bits": 32,
            "memory": [], "events": [copy.deepcopy(PAE_EVENT)]}


def write(path: Path, doc: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc), encoding="utf-8")


def _replay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ptemu", "replay", *args],
                          capture_output=True, text=True, check=False, timeout=300)


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """The corpus, one failing fixture and one streamed trace, in one folder."""
    folder = tmp_path / "mixed"
    shutil.copytree(corpus_path(), folder)
    failing = document("zz/failing")
    failing["events"][0]["expect"]["regs"]["rip"] = "0xc1001238"  # really 0xc1001239
    write(folder / "zz" / "failing.json", failing)
    header = {key: value for key, value in document("zz/streamed").items() if key != "events"}
    (folder / "zz" / "streamed.jsonl").write_text(
        json.dumps({**header, "stream": True}) + "\n" + json.dumps(PAE_EVENT) + "\n", "utf-8")
    return folder


def test_jobs_give_the_output_and_status_of_one_job(mixed: Path) -> None:
    one = _replay(str(mixed))
    assert one.returncode == 1 and "zz/failing  1 event  FAIL" in one.stdout
    assert "zz/streamed  1 event  PASS" in one.stdout
    for jobs in ("2", "3"):
        many = _replay("-j", jobs, str(mixed))
        assert (many.returncode, many.stdout, many.stderr) == \
            (one.returncode, one.stdout, one.stderr)
    one_json = _replay("--json", str(mixed))
    assert _replay("--json", "-j", "2", str(mixed)).stdout == one_json.stdout


def test_jobs_with_unusable_input_exit_2_with_nothing_on_stdout(mixed: Path) -> None:
    bad = copy.deepcopy(document("aa/bad"))
    del bad["events"][0]["gla"]
    write(mixed / "aa" / "bad.json", bad)
    one = _replay(str(mixed))
    many = _replay("-j", "2", str(mixed))
    assert one.returncode == many.returncode == 2
    assert one.stdout == many.stdout == ""
    assert many.stderr == one.stderr
    assert one.stderr.endswith("bad.json: event 0: key 'gla': missing key\n")


@pytest.mark.parametrize("value", ["0", "0x2", "²", "١", "2.0", "-1", "9" * 5000])
def test_jobs_is_a_decimal_count(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from ptemu.cli import main

    with pytest.raises(SystemExit) as caught:
        main(["replay", "-j", value])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ptemu replay: -j/--jobs: ") and err.count("\n") == 1
    assert len(err) < 300
