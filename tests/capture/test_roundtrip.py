"""Capture -> fixture file -> replay through ptemu's handler: 0 mismatches.

The capture is the oracle; these tests check that its fixtures load with the
project's one loader, that the handler reproduces them, and that a
deliberately wrong expectation is reported with the right key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ptemu.capture import capture_description, dump_fixture
from ptemu.fixtures import Outcome, load_fixture, replay_fixture

SNIPPETS: list[dict[str, Any]] = [
    {   # 4-level: MOV, failing LOCK CMPXCHG, LOCK AND byte, LOCK BTS, XCHG
        "name": "4level/roundtrip", "paging": "4level", "code_bits": 64,
        "code": [{"gla": "0xffffffff81001000",
                  "bytes": "48 89 37 f0 48 0f b1 17 f0 80 27 fd f0 48 0f ba 2f 3f 48 87 0f c3"}],
        "page_tables": [{"gpa": "0x12345000", "gla": "0xffff888012345000",
                         "entries": {"2": "0x8000000001234063"}}],
        "calls": [{"regs": {"rdi": "0xffff888012345010", "rsi": "0x12346067",
                            "rax": "0x1", "rdx": "0x5555", "rcx": "0x0"}}],
    },
    {   # PAE: coalesced halves, then a CMPXCHG8B loop that first fails
        "name": "pae/roundtrip", "paging": "pae", "code_bits": 32,
        "code": [{"label": "set", "gla": "0xc1001000", "bytes": "89 48 04 89 10 c3"},
                 {"label": "cx8", "gla": "0xc1001100", "bytes": "f0 0f c7 0e 75 fa c3"}],
        "page_tables": [{"gpa": "0x1234000", "gla": "0xc1234000",
                         "entries": {"3": "0x1111063"}}],
        "calls": [{"entry": "set", "regs": {"rax": "0xc1234018", "rcx": "0x80000000",
                                            "rdx": "0x2222067"}},
                  {"entry": "cx8", "regs": {"rsi": "0xc1234018", "rbx": "0x3333067",
                                            "rcx": "0x0", "rax": "0x0", "rdx": "0x0"}}],
    },
    {   # legacy, 16-bit code: [bx+si+4] with a DS base, hvmi duplicate delivery
        "name": "legacy/roundtrip", "paging": "legacy", "code_bits": 16, "policy": "hvmi",
        "code": [{"gla": "0x9000", "bytes": "66 89 40 04 c3"}],
        "page_tables": [{"gpa": "0x1234000", "gla": "0xc1234000"}],
        "segments": {"ds_base": "0xc1230000", "cs_base": "0x0"},
        "calls": [{"regs": {"rbx": "0x4000", "rsi": "0x10", "rax": "0x12345067"},
                   "deliver_twice": [0]}],
    },
]


def captured_file(tmp_path: Path, description: dict[str, Any]) -> Path:
    path = tmp_path / (description["name"].replace("/", "-") + ".json")
    path.write_text(dump_fixture(capture_description(description)), encoding="utf-8")
    return path


@pytest.mark.parametrize("description", SNIPPETS, ids=lambda d: d["name"])
def test_captured_fixture_replays_with_no_mismatch(tmp_path: Path,
                                                   description: dict[str, Any]) -> None:
    fixture = load_fixture(captured_file(tmp_path, description))
    assert fixture.events, "the snippet must produce events"
    report = replay_fixture(fixture)
    problems = [(e.index, e.outcome, [str(m) for m in e.mismatches], e.error)
                for e in report.events if e.outcome is not Outcome.PASS]
    assert problems == []


@pytest.mark.parametrize(("edit", "key"), [
    (lambda e: e["writes"][0].update(value="0x7"), "writes[0]"),
    (lambda e: e["regs"].update(rip="0x1"), "regs.rip"),
    (lambda e: e["entries"][0].update(new="0x1"), "entries[0]"),
    (lambda e: e.update(status="rejected", writes=[], entries=[], regs={}), "status"),
])
def test_a_wrong_expectation_is_reported_with_its_key(tmp_path: Path, edit: Any,
                                                      key: str) -> None:
    path = captured_file(tmp_path, SNIPPETS[0])
    document = json.loads(path.read_text(encoding="utf-8"))
    edit(document["events"][0]["expect"])
    path.write_text(json.dumps(document), encoding="utf-8")
    report = replay_fixture(load_fixture(path))
    first = report.events[0]
    assert first.outcome is Outcome.FAIL
    assert key in [mismatch.key for mismatch in first.mismatches]
    assert all(event.outcome is Outcome.PASS for event in report.events[1:])
