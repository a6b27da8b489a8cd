"""Capture and replay agree on PAE event boundaries (semantics.md section 2).

Event boundaries are part of the fixture contract: the capture (Unicorn with
paging on, deciding coalescing from what executed) and the handler replaying
its fixture must cut a run into the same events. Each test captures one of
Linux's PAE entry writes under one policy, checks the events against what
section 2 says (worked out by hand), and replays the fixture with no mismatch.
"""

from __future__ import annotations

from typing import Any

import pytest

from ptemu.capture import capture_description
from ptemu.fixtures import Outcome, parse_fixture, replay_fixture

ENTRY = "0x1234018"   # page_tables entry 3 of the page at GPA 0x1234000
ENTRY_GLA = "0xc1234018"


def describe(code: str, regs: dict[str, str], policy: str, **call: Any) -> dict[str, Any]:
    return {"name": "pae/test", "paging": "pae", "code_bits": 32, "policy": policy,
            "code": [{"label": "f", "gla": "0xc1001000", "bytes": code}],
            "page_tables": [{"gpa": "0x1234000", "gla": "0xc1234000",
                             "entries": {"3": "0x112345067"}}],
            "calls": [{"entry": "f", "regs": regs, **call}]}


def boundaries(doc: dict[str, Any]) -> list[tuple[list[str], list[dict[str, str]]]]:
    """Per event: the instruction kinds it covers and its entry outcomes."""
    return [(event["captured"]["instructions"], event["expect"]["entries"])
            for event in doc["events"]]


def assert_replays(doc: dict[str, Any]) -> None:
    report = replay_fixture(parse_fixture(doc, "captured.json"))
    problems = [(e.index, e.outcome, [str(m) for m in e.mismatches], e.error)
                for e in report.events if e.outcome is not Outcome.PASS]
    assert problems == []
    assert len(report.events) == len(doc["events"])


PARTIAL = {"gpa": ENTRY, "state": "partial"}


def complete(old: int, new: int) -> dict[str, str]:
    return {"gpa": ENTRY, "state": "complete", "old": hex(old), "new": hex(new)}


# xchg [eax], edx ; mov dword [eax+4], 0 ; ret  (native_ptep_get_and_clear)
XCHG_THEN_MOV = "87 10 c7 40 04 00 00 00 00 c3"
# lock cmpxchg8b [esi] ; mov [esi+4], eax ; ret
CMPXCHG8B_THEN_MOV = "f0 0f c7 0e 89 46 04 c3"
# mov [eax+4], ecx ; mov [eax], edx ; ret  (native_set_pte)
HIGH_THEN_LOW = "89 48 04 89 10 c3"


@pytest.mark.parametrize(("policy", "expected"), [
    # strict: the XCHG completes the entry (old 0x1_12345067, new: low half zeroed);
    # the MOV of the high half is its own event and leaves the entry partial.
    ("strict", [(["xchg"], [complete(0x1_12345067, 0x1_00000000)]), (["mov"], [PARTIAL])]),
    # hvmi: the XCHG leaves it partial, the MOV joins its event and completes it.
    ("hvmi", [(["xchg", "mov"], [complete(0x1_12345067, 0)])]),
])
def test_xchg_low_then_mov_high(policy: str, expected: list[Any]) -> None:
    doc = capture_description(describe(XCHG_THEN_MOV, {"rax": ENTRY_GLA, "rdx": "0x0"}, policy))
    assert boundaries(doc) == expected
    assert_replays(doc)


@pytest.mark.parametrize("policy", ["strict", "hvmi"])
def test_lock_cmpxchg8b_then_mov_high(policy: str) -> None:
    # EDX:EAX = the entry: match, the entry := ECX:EBX = 0x2_22222067 (8 bytes, never a
    # first half). The MOV then stores EAX = 0x12345067 to the high half: a separate
    # 4-byte plain store, partial under both policies.
    regs = {"rsi": ENTRY_GLA, "rdx": "0x1", "rax": "0x12345067", "rcx": "0x2",
            "rbx": "0x22222067"}
    doc = capture_description(describe(CMPXCHG8B_THEN_MOV, regs, policy))
    assert boundaries(doc) == [(["cmpxchg8b"], [complete(0x1_12345067, 0x2_22222067)]),
                               (["mov"], [PARTIAL])]
    assert_replays(doc)


@pytest.mark.parametrize("policy", ["strict", "hvmi"])
def test_mov_high_then_mov_low(policy: str) -> None:
    doc = capture_description(describe(HIGH_THEN_LOW, {"rax": ENTRY_GLA, "rcx": "0x80000000",
                                                       "rdx": "0x2222067"}, policy))
    assert boundaries(doc) == [(["mov", "mov"], [complete(0x1_12345067, 0x80000000_02222067)])]
    assert_replays(doc)


@pytest.mark.parametrize(("policy", "expected"), [
    # strict: the redelivered MOV is a duplicate and is not coalesced; the low half is
    # the next event and completes the entry the first delivery left partial.
    ("strict", [(["mov"], [PARTIAL]), (["mov"], [{"gpa": ENTRY, "state": "duplicate"}]),
                (["mov"], [complete(0x1_12345067, 0x80000000_02222067)])]),
    # hvmi (the seed): the duplicate's partial buffer still brings in the low half.
    ("hvmi", [(["mov"], [PARTIAL]),
              (["mov", "mov"], [complete(0x1_12345067, 0x80000000_02222067)])]),
])
def test_redelivered_first_half(policy: str, expected: list[Any]) -> None:
    regs = {"rax": ENTRY_GLA, "rcx": "0x80000000", "rdx": "0x2222067"}
    doc = capture_description(describe(HIGH_THEN_LOW, regs, policy, deliver_twice=[0]))
    assert boundaries(doc) == expected
    assert_replays(doc)
