"""replay_fixture against the real handler, on traces whose results are worked by hand.

Every expected value below is derived from the instruction encodings (Intel
SDM vol. 2: 89 /r = MOV r/m32, r32; REX.W 87 /r = XCHG r/m64, r64) and the
rules of semantics.md, not from what the handler printed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from ptemu.errors import UsageError
from ptemu.fixtures import (
    EventReport,
    Mismatch,
    Outcome,
    parse_fixture,
    replay_fixture,
)
from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.status import Policy, Status
from ptemu.vcpu import Vcpu

Document = dict[str, Any]

# PAE, 32-bit code: the PTE at GPA 0x3ff0 (linear 0xc0003ff0) is written by
#   c1001234: 89 48 04   mov [eax+4], ecx   ; high half, ecx = 1
#   c1001237: 89 10      mov [eax], edx     ; low half, edx = 0x5063
# so the entry goes 0 -> 0x1_0000_5063 (frame 0x1_0000_5000, P RW A D).
PAE_HIGH_EVENT: Document = {
    "gpa": "0x3ff4", "gla": "0xc0003ff4",
    "regs": {"rip": "0xc1001234", "rax": "0xc0003ff0", "rcx": "0x1", "rdx": "0x5063"},
    "code": "89 48 04 89 10 c3",
}
PAE_LOW_EVENT: Document = {
    "gpa": "0x3ff0", "gla": "0xc0003ff0",
    "regs": {"rip": "0xc1001237", "rax": "0xc0003ff0", "rcx": "0x1", "rdx": "0x5063"},
    "code": "89 10 c3",
}
HIGH_WRITE = {"gpa": "0x3ff0", "offset": 4, "size": 4, "value": "0x1", "old": "0x0"}
LOW_WRITE = {"gpa": "0x3ff0", "offset": 0, "size": 4, "value": "0x5063", "old": "0x100000000"}
COMPLETE = {"gpa": "0x3ff0", "state": "complete", "old": "0x0", "new": "0x100005063"}


def trace(paging: str, code_bits: int, memory: list[Document], *events: Document,
          policy: str | None = None) -> Document:
    doc: Document = {"ptemu_fixture": 1, "name": f"test/{paging}", "paging": paging,
                     "code_bits": code_bits, "memory": memory,
                     "events": [copy.deepcopy(event) for event in events]}
    if policy is not None:
        doc["policy"] = policy
    return doc


def with_expect(event: Document, **expect: object) -> Document:
    out = copy.deepcopy(event)
    out["expect"] = expect
    return out


def replay(doc: Document, **options: Any) -> list[EventReport]:
    return list(replay_fixture(parse_fixture(doc, "trace.json"), **options).events)


def test_pae_second_half_coalesced_in_one_exit() -> None:
    doc = trace("pae", 32, [], with_expect(
        PAE_HIGH_EVENT, status="emulated", writes=[HIGH_WRITE, LOW_WRITE], entries=[COMPLETE],
        regs={"rip": "0xc1001239"}))
    (event,) = replay(doc)
    assert (event.outcome, event.mismatches, event.error) == (Outcome.PASS, (), None)


def test_pae_halves_as_two_events_without_coalescing() -> None:
    doc = trace(
        "pae", 32, [],
        with_expect(PAE_HIGH_EVENT, status="emulated", writes=[HIGH_WRITE],
                    entries=[{"gpa": "0x3ff0", "state": "partial"}], regs={"rip": "0xc1001237"}),
        # The second event sees the first one's store in memory (old = 0x1_0000_0000)
        # and completes the entry with the value it had before the first half.
        with_expect(PAE_LOW_EVENT, status="emulated", writes=[LOW_WRITE], entries=[COMPLETE],
                    regs={"rip": "0xc1001239"}),
    )
    for policy in ("strict", "hvmi"):
        reports = replay(doc, coalesce=False, policy=policy)
        assert [r.outcome for r in reports] == [Outcome.PASS, Outcome.PASS], reports


def test_memory_patch_is_applied_before_the_event() -> None:
    # The CPU set A and D (0x60) and P|RW (0x7) in the low byte meanwhile.
    event = with_expect(PAE_HIGH_EVENT, writes=[dict(HIGH_WRITE, old="0x67")])
    event["memory"] = [{"gpa": "0x3ff0", "data": "67"}]
    (report,) = replay(trace("pae", 32, [], event), coalesce=False)
    assert report.outcome is Outcome.PASS, report.mismatches


def test_initial_memory_regions_are_loaded() -> None:
    doc = trace("pae", 32, [{"gpa": "0x3ff0", "data": "67 00 00 00 00 00 00 00"}],
                with_expect(PAE_HIGH_EVENT, writes=[dict(HIGH_WRITE, old="0x67")]))
    (report,) = replay(doc, coalesce=False)
    assert report.outcome is Outcome.PASS, report.mismatches


def test_rejected_event_changes_nothing_for_the_next_event() -> None:
    # eax+4 = 0xc0002ff4: the store lands on another page than the faulting GLA.
    stray = copy.deepcopy(PAE_HIGH_EVENT)
    stray["regs"]["rax"] = "0xc0002ff0"
    doc = trace("pae", 32, [],
                with_expect(stray, status="rejected", writes=[], entries=[], regs={}),
                with_expect(PAE_HIGH_EVENT, writes=[HIGH_WRITE]))
    reports = replay(doc, coalesce=False)
    assert [r.outcome for r in reports] == [Outcome.PASS, Outcome.PASS], reports


def test_64bit_xchg_changes_a_register() -> None:
    # 4-level, 64-bit code: 48 87 37 = xchg [rdi], rsi on the PTE at GPA 0x7018
    # holding 0xabc067; rsi receives the old entry.
    event = {
        "gpa": "0x7018", "gla": "0xffff888000007018",
        "regs": {"rip": "0xffffffff81001000", "rdi": "0xffff888000007018",
                 "rsi": "0x8000000012345067"},
        "code": "48 87 37",
    }
    doc = trace("4level", 64, [{"gpa": "0x7018", "data": "67 c0 ab 00 00 00 00 00"}],
                with_expect(event, status="emulated",
                            writes=[{"gpa": "0x7018", "offset": 0, "size": 8,
                                     "value": "0x8000000012345067", "old": "0xabc067"}],
                            entries=[{"gpa": "0x7018", "state": "complete", "old": "0xabc067",
                                      "new": "0x8000000012345067"}],
                            regs={"rip": "0xffffffff81001003", "rsi": "0xabc067"}))
    (report,) = replay(doc)
    assert report.outcome is Outcome.PASS, report.mismatches


LEGACY_FIRST: Document = {
    "gpa": "0x2004", "gla": "0xc0102004",
    "regs": {"rip": "0xc1000000", "rax": "0xc0102004", "rdx": "0x123067"},
    "code": "89 10",
}


def legacy_trace(policy: str) -> Document:
    """Two legacy-paging writes of one PTE from the same RIP, different values."""
    second = copy.deepcopy(LEGACY_FIRST)
    second["regs"]["rdx"] = "0x456067"
    return trace(
        "legacy", 32, [],
        with_expect(LEGACY_FIRST, status="emulated",
                    writes=[{"gpa": "0x2004", "offset": 0, "size": 4, "value": "0x123067",
                             "old": "0x0"}],
                    entries=[{"gpa": "0x2004", "state": "complete", "old": "0x0",
                              "new": "0x123067"}],
                    regs={"rip": "0xc1000002"}),
        # hvmi (the seed): same RIP low 23 bits, last write not 8 bytes -> duplicate.
        with_expect(second, status="emulated",
                    entries=[{"gpa": "0x2004", "state": "duplicate"}]),
        policy=policy,
    )


def test_fixture_policy_is_used_unless_overridden() -> None:
    doc = legacy_trace("hvmi")
    assert [r.outcome for r in replay(doc)] == [Outcome.PASS, Outcome.PASS]
    # strict: the second event differs (edx), so it is no duplicate: the entry
    # completes again, 0x123067 -> 0x456067.
    strict = replay(doc, policy="strict")
    assert strict[1].outcome is Outcome.FAIL
    assert strict[1].mismatches == (Mismatch(
        "entries[0]", "{gpa=0x2004 state=duplicate}",
        "{gpa=0x2004 state=complete old=0x123067 new=0x456067}"),)


def test_report_records_policy_and_coalescing() -> None:
    fixture = parse_fixture(legacy_trace("hvmi"), "t.json")
    report = replay_fixture(fixture, policy=Policy.STRICT, coalesce=False)
    assert (report.policy, report.coalesce, report.fixture) == (Policy.STRICT, False, fixture)
    assert replay_fixture(fixture).policy is Policy.HVMI


def test_bad_policy_name_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"unknown policy 'seed'"):
        replay_fixture(parse_fixture(legacy_trace("hvmi"), "t.json"), policy="seed")


def test_wrong_expectation_fails_with_the_right_key() -> None:
    doc = trace("pae", 32, [], with_expect(PAE_HIGH_EVENT, status="emulated",
                                           regs={"rip": "0xc1001237"}))
    (report,) = replay(doc)  # coalescing moves rip past both halves
    assert report.outcome is Outcome.FAIL
    assert report.mismatches == (Mismatch("regs.rip", "0xc1001237", "0xc1001239"),)
    assert report.result is not None and report.result.status is Status.EMULATED


def test_event_without_expect_is_unchecked() -> None:
    doc = trace("pae", 32, [], PAE_HIGH_EVENT)
    (report,) = replay(doc)
    assert report.outcome is Outcome.UNCHECKED
    assert report.result is not None and report.result.status is Status.EMULATED


# -- how replay drives the handler (a spy around the real one) ---------------------


def spy(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record every handle_ept_write call, then run the real method."""
    calls: list[dict[str, Any]] = []
    original: Callable[..., Any] = PtWriteHandler.handle_ept_write

    def recording(self: PtWriteHandler, vcpu: Vcpu, event: WriteEvent) -> Any:
        calls.append({"event": event, "buffer_valid": vcpu.pt_emu_buffer.valid,
                      "vcpu": vcpu, "handler": self,
                      "entry": self.memory.read(event.gpa & ~7, 8)})
        return original(self, vcpu, event)

    monkeypatch.setattr(PtWriteHandler, "handle_ept_write", recording)
    return calls


def test_one_handler_and_vcpu_per_trace_new_exit_per_event(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy(monkeypatch)
    second = copy.deepcopy(PAE_LOW_EVENT)
    second["memory"] = [{"gpa": "0x3ff0", "data": "07"}, {"gpa": "0x3ff0", "data": "27"}]
    replay(trace("pae", 32, [], PAE_HIGH_EVENT, second), coalesce=False)
    assert len(calls) == 2
    assert calls[0]["handler"] is calls[1]["handler"]
    assert calls[0]["vcpu"] is calls[1]["vcpu"]
    assert [c["buffer_valid"] for c in calls] == [False, False]
    # Patches land in order, after the first event's commit of the high half.
    assert calls[1]["entry"] == bytes.fromhex("27 00 00 00 01 00 00 00")
    event = calls[0]["event"]
    assert (event.gpa, event.gla, event.code, event.code_bits) == (
        0x3FF4, 0xC0003FF4, bytes.fromhex("89 48 04 89 10 c3"), 32)
    assert dict(event.regs) == {"rip": 0xC1001234, "rax": 0xC0003FF0, "rcx": 1, "rdx": 0x5063}


def test_handler_exception_is_an_error_and_stops_the_trace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: PtWriteHandler, vcpu: Vcpu, event: WriteEvent) -> Any:
        raise RuntimeError("emulator\nexploded")

    monkeypatch.setattr(PtWriteHandler, "handle_ept_write", boom)
    seen: list[int] = []
    report = replay_fixture(
        parse_fixture(trace("pae", 32, [], PAE_HIGH_EVENT, PAE_LOW_EVENT), "t.json"),
        on_event=lambda r: seen.append(r.index))
    first, second = report.events
    assert (first.outcome, first.error, first.result) == (
        Outcome.ERROR, "RuntimeError: emulator exploded", None)
    assert (second.outcome, second.error) == (Outcome.ERROR, "not run: event 0 raised")
    assert first.mismatches == ()
    assert report.outcome is Outcome.ERROR
    assert report.count(Outcome.ERROR) == 2 and report.count(Outcome.FAIL) == 0
    assert seen == [0, 1]


def test_handler_that_cannot_be_built_errors_every_event(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: PtWriteHandler, *args: Any, **kwargs: Any) -> None:
        raise OSError("no engine")

    monkeypatch.setattr(PtWriteHandler, "__init__", refuse)
    report = replay_fixture(parse_fixture(trace("pae", 32, [], PAE_HIGH_EVENT), "t.json"))
    (event,) = report.events
    assert event.outcome is Outcome.ERROR
    assert event.error == "cannot create the handler: OSError: no engine"


def test_fixture_outcome_precedence() -> None:
    passing = with_expect(PAE_HIGH_EVENT, status="emulated")
    failing = with_expect(PAE_HIGH_EVENT, status="rejected")
    assert replay_fixture(parse_fixture(trace("pae", 32, [], PAE_HIGH_EVENT),
                                        "t.json")).outcome is Outcome.UNCHECKED
    doc = trace("pae", 32, [], passing, PAE_HIGH_EVENT)
    assert replay_fixture(parse_fixture(doc, "t.json"), coalesce=False).outcome is Outcome.PASS
    doc = trace("pae", 32, [], passing, failing)
    assert replay_fixture(parse_fixture(doc, "t.json"), coalesce=False).outcome is Outcome.FAIL
