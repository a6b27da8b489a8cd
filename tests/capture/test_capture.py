"""`ptemu capture` against values worked out by hand from the Intel SDM.

Each test runs a small snippet through the capture (Unicorn with paging on)
and checks the recorded event against what the SDM says the instruction
does, computed here by hand, never copied from the capture's output.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from ptemu.capture import capture_description
from ptemu.errors import UsageError

DIRECT_4LEVEL = 0xFFFF_8880_0000_0000
DIRECT_5LEVEL = 0xFF11_0000_0000_0000
TEXT_64 = 0xFFFF_FFFF_8100_1000
PT_GPA = 0x1234_5000

ZF, CF, PF, AF, SF = 0x40, 0x01, 0x04, 0x10, 0x80


def h(value: int) -> str:
    return f"{value:#x}"


def i(text: str) -> int:
    return int(text, 16)


def describe64(code: str, calls: list[dict[str, Any]], *, paging: str = "4level",
               entries: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    base = DIRECT_5LEVEL if paging == "5level" else DIRECT_4LEVEL
    return {
        "name": f"{paging}/test", "paging": paging, "code_bits": 64,
        "code": [{"gla": h(TEXT_64), "bytes": code}],
        "page_tables": [{"gpa": h(PT_GPA), "gla": h(base + PT_GPA), "entries": entries or {}}],
        "calls": calls, **extra,
    }


def test_mov_qword_records_the_store_and_rip() -> None:
    # 48 89 37 = mov [rdi], rsi (SDM MOV 89 /r, REX.W): 8 bytes, no flags.
    old, new = 0x8000_0000_0123_4063, 0x8000_0000_1234_6067
    doc = capture_description(describe64("48 89 37 c3", [
        {"regs": {"rdi": h(DIRECT_4LEVEL + PT_GPA + 0x10), "rsi": h(new)}}],
        entries={"2": h(old)}))
    (event,) = doc["events"]
    assert i(event["gpa"]) == PT_GPA + 0x10
    assert i(event["gla"]) == DIRECT_4LEVEL + PT_GPA + 0x10
    assert i(event["regs"]["rip"]) == TEXT_64
    assert event["code"] == "48 89 37 c3"
    expect = event["expect"]
    assert expect["status"] == "emulated"
    assert expect["writes"] == [{"gpa": h(PT_GPA + 0x10), "offset": 0, "size": 8,
                                 "value": h(new), "old": h(old)}]
    assert expect["entries"] == [{"gpa": h(PT_GPA + 0x10), "state": "complete",
                                  "old": h(old), "new": h(new)}]
    assert expect["regs"] == {"rip": h(TEXT_64 + 3)}
    # The fixture starts from the description's contents.
    assert doc["memory"] == [{"gpa": h(PT_GPA + 0x10), "data": old.to_bytes(8, "little").hex()}]


def test_failed_cmpxchg_still_writes_and_loads_the_accumulator() -> None:
    # lock cmpxchg [rdi], rsi with RAX != [rdi]: ZF=0, RAX = old, and the CPU writes
    # the old value back (SDM CMPXCHG: "the destination operand is written back").
    old = 0x8000_0000_1234_6067
    rax = 0x1234
    doc = capture_description(describe64("f0 48 0f b1 37 c3", [
        {"regs": {"rdi": h(DIRECT_4LEVEL + PT_GPA + 0x18), "rsi": "0x0", "rax": h(rax)}}],
        entries={"3": h(old)}))
    (event,) = doc["events"]
    assert event["expect"]["writes"] == [{"gpa": h(PT_GPA + 0x18), "offset": 0, "size": 8,
                                          "value": h(old), "old": h(old)}]
    # Flags of CMP RAX, [rdi]: 0x1234 - 0x8000000012346067 borrows (CF=1); the result
    # 0x7fffffffedcbb1cd is positive (SF=0), no signed overflow (OF=0), low byte 0xcd
    # has five 1 bits (PF=0), 4 - 7 borrows from bit 4 (AF=1), not zero (ZF=0).
    assert event["expect"]["regs"] == {"rip": h(TEXT_64 + 5), "rax": h(old),
                                       "rflags": h(0x2 | CF | AF)}


def test_successful_32bit_cmpxchg_leaves_rax_high_bits_alone() -> None:
    # lock cmpxchg [rdi], esi with EAX == [rdi]: ZF=1, [rdi] = ESI, and the SDM's
    # pseudocode does not write the accumulator on success, so RAX keeps bits 63:32
    # (Unicorn 2.1 clears them: the capture corrects that erratum).
    entry = 0x8000_0000_0123_4063
    rax = 0xDEAD_BEEF_0123_4063
    doc = capture_description(describe64("f0 0f b1 37 c3", [
        {"regs": {"rdi": h(DIRECT_4LEVEL + PT_GPA), "rsi": "0x5555067", "rax": h(rax)}}],
        entries={"0": h(entry)}))
    (event,) = doc["events"]
    assert event["expect"]["writes"] == [{"gpa": h(PT_GPA), "offset": 0, "size": 4,
                                          "value": "0x5555067", "old": h(entry)}]
    # CMP of equal values: ZF=1, PF=1 (zero has even parity), others 0.
    assert event["expect"]["regs"] == {"rip": h(TEXT_64 + 4), "rflags": h(0x2 | ZF | PF)}


def test_failed_32bit_cmpxchg_zero_extends_into_rax() -> None:
    # Mismatch: EAX = [rdi] and, as every 32-bit register write in 64-bit mode,
    # RAX bits 63:32 become 0 (SDM vol. 1, 3.4.1.1).
    entry = 0x8000_0000_0123_4063
    doc = capture_description(describe64("f0 0f b1 37 c3", [
        {"regs": {"rdi": h(DIRECT_4LEVEL + PT_GPA), "rsi": "0x5555067",
                  "rax": "0xffffffffffffffff"}}], entries={"0": h(entry)}))
    (event,) = doc["events"]
    assert event["expect"]["regs"]["rax"] == "0x1234063"
    assert event["expect"]["writes"][0]["value"] == "0x1234063"
    assert not i(event["expect"]["regs"]["rflags"]) & ZF


def test_lock_and_byte_rmw_completes_under_strict() -> None:
    # lock and byte [rdi], 0xfd: 0x67 & 0xfd = 0x65; result positive, non-zero,
    # 0x65 = 0110 0101 has four 1 bits (PF=1); AND clears CF and OF.
    entry = 0x8000_0000_1234_6067
    doc = capture_description(describe64("f0 80 27 fd c3", [
        {"regs": {"rdi": h(DIRECT_4LEVEL + PT_GPA + 0x20)}}], entries={"4": h(entry)}))
    (event,) = doc["events"]
    assert event["expect"]["writes"] == [{"gpa": h(PT_GPA + 0x20), "offset": 0, "size": 1,
                                          "value": "0x65", "old": h(entry)}]
    assert event["expect"]["entries"] == [{"gpa": h(PT_GPA + 0x20), "state": "complete",
                                           "old": h(entry), "new": h(entry & ~0x2)}]
    assert event["expect"]["regs"] == {"rip": h(TEXT_64 + 4), "rflags": h(0x2 | PF)}


def test_lock_and_byte_stays_partial_under_hvmi() -> None:
    description = describe64("f0 80 27 fd c3", [{"regs": {"rdi": h(DIRECT_4LEVEL + PT_GPA)}}],
                             entries={"0": "0x67"}, policy="hvmi")
    (event,) = capture_description(description)["events"]
    assert event["expect"]["entries"] == [{"gpa": h(PT_GPA), "state": "partial"}]


def pae_description(code: str, calls: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"name": "pae/test", "paging": "pae", "code_bits": 32,
            "code": [{"label": "f", "gla": "0xc1001000", "bytes": code}],
            "page_tables": [{"gpa": "0x1234000", "gla": "0xc1234000",
                             "entries": {"3": "0x1111063"}}],
            "calls": calls, **extra}


SET_PTE_CALL = {"entry": "f", "regs": {"rax": "0xc1234018", "rcx": "0x80000000",
                                       "rdx": "0x2222067"}}


def test_pae_halves_are_coalesced_into_one_event() -> None:
    # docs/capture.md's example: mov [eax+4], ecx; mov [eax], edx.
    doc = capture_description(pae_description("89 48 04 89 10 c3", [SET_PTE_CALL]))
    (event,) = doc["events"]
    assert (event["gpa"], event["gla"]) == ("0x123401c", "0xc123401c")
    assert event["expect"]["writes"] == [
        {"gpa": "0x1234018", "offset": 4, "size": 4, "value": "0x80000000", "old": "0x1111063"},
        {"gpa": "0x1234018", "offset": 0, "size": 4, "value": "0x2222067",
         "old": "0x8000000001111063"}]
    assert event["expect"]["entries"] == [{"gpa": "0x1234018", "state": "complete",
                                           "old": "0x1111063", "new": "0x8000000002222067"}]
    assert event["expect"]["regs"] == {"rip": "0xc1001005"}
    assert event["captured"]["instructions"] == ["mov", "mov"]
    assert doc["capture"]["coalesce"] is True


def test_pae_halves_without_coalescing_are_two_events() -> None:
    doc = capture_description(pae_description("89 48 04 89 10 c3", [SET_PTE_CALL],
                                              coalesce=False))
    first, second = doc["events"]
    assert first["expect"]["entries"] == [{"gpa": "0x1234018", "state": "partial"}]
    assert first["expect"]["regs"] == {"rip": "0xc1001003"}
    assert second["expect"]["entries"] == [{"gpa": "0x1234018", "state": "complete",
                                            "old": "0x1111063", "new": "0x8000000002222067"}]
    assert doc["capture"]["coalesce"] is False


def test_second_half_after_another_instruction_is_not_coalesced() -> None:
    # lea eax, [eax] between the halves: the handler cannot emulate it in the same exit.
    doc = capture_description(pae_description("89 48 04 8d 00 89 10 c3", [SET_PTE_CALL]))
    assert [len(event["expect"]["writes"]) for event in doc["events"]] == [1, 1]


def test_duplicate_delivery_under_hvmi() -> None:
    # The same exit delivered twice: the second run of mov [eax+4], ecx stores the
    # same bytes over themselves; hvmi's same-RIP rule calls it a duplicate.
    doc = capture_description(pae_description(
        "89 48 04 c3", [{**SET_PTE_CALL, "deliver_twice": [0]}], policy="hvmi"))
    first, second = doc["events"]
    assert first["regs"] == second["regs"]
    assert second["expect"]["writes"] == [{"gpa": "0x1234018", "offset": 4, "size": 4,
                                           "value": "0x80000000", "old": "0x8000000001111063"}]
    assert second["expect"]["entries"] == [{"gpa": "0x1234018", "state": "duplicate"}]
    assert second["captured"]["redelivered"] is True


def test_memory_patch_rides_on_the_calls_first_event() -> None:
    # The CPU sets the A bit (0x20) between the two calls.
    calls = [{"entry": "f", "regs": {"rax": "0xc1234018", "rdx": "0x2222047"}},
             {"entry": "f", "regs": {"rax": "0xc1234018", "rdx": "0x3333067"},
              "memory": [{"gpa": "0x1234018", "data": "67"}]}]
    doc = capture_description(pae_description("89 10 c3", calls))
    first, second = doc["events"]
    assert "memory" not in first
    assert second["memory"] == [{"gpa": "0x1234018", "data": "67"}]
    assert second["expect"]["writes"][0]["old"] == "0x2222067"


def test_16bit_code_uses_16bit_addressing_and_segment_bases() -> None:
    # 66 89 40 04 in 16-bit code: mov [bx+si+4], eax; linear = DS base + (BX+SI+4).
    description = {
        "name": "legacy/t16", "paging": "legacy", "code_bits": 16,
        "code": [{"gla": "0x9000", "bytes": "66 89 40 04 c3"}],
        "page_tables": [{"gpa": "0x1234000", "gla": "0xc1234000"}],
        "segments": {"ds_base": "0xc1230000", "cs_base": "0x0"},
        "calls": [{"regs": {"rbx": "0x4000", "rsi": "0x10", "rax": "0x12345067"}}],
    }
    (event,) = capture_description(description)["events"]
    assert (event["gla"], event["gpa"]) == ("0xc1234014", "0x1234014")
    assert event["regs"]["rip"] == "0x9000"
    assert event["regs"]["ds_base"] == "0xc1230000"
    assert event["expect"]["writes"] == [{"gpa": "0x1234014", "offset": 0, "size": 4,
                                          "value": "0x12345067", "old": "0x0"}]
    assert event["expect"]["regs"] == {"rip": "0x9004"}


def test_rep_stos_is_one_event_with_one_record_per_entry() -> None:
    # std; rep stosq with RCX=3 from entry 5 down: entries 5, 4, 3 in that order;
    # RDI ends 3*8 lower, RCX at 0, RIP past the instruction.
    rdi = DIRECT_4LEVEL + PT_GPA + 5 * 8
    doc = capture_description(describe64("fd f3 48 ab fc c3", [
        {"regs": {"rdi": h(rdi), "rcx": "0x3", "rax": "0x63"}}]))
    (event,) = doc["events"]
    assert [w["gpa"] for w in event["expect"]["writes"]] == [
        h(PT_GPA + 40), h(PT_GPA + 32), h(PT_GPA + 24)]
    assert all(w["size"] == 8 and w["value"] == "0x63" for w in event["expect"]["writes"])
    assert event["expect"]["regs"] == {"rip": h(TEXT_64 + 4), "rcx": "0x0", "rdi": h(rdi - 24)}


def test_5level_paging_reaches_an_address_4level_cannot() -> None:
    # 0xff11000012345010 is non-canonical with 48-bit linear addresses (bits 63:47
    # differ), so only a 5-level walk (CR4.LA57) can complete this store.
    gla = DIRECT_5LEVEL + PT_GPA + 0x10
    doc = capture_description(describe64("48 89 37 c3", [
        {"regs": {"rdi": h(gla), "rsi": "0x63"}}], paging="5level"))
    (event,) = doc["events"]
    assert event["gla"] == h(gla)
    assert i(event["regs"]["cr4"]) & (1 << 12)
    assert "LA57" in doc["capture"]["oracle"]
    description_4level = describe64("48 89 37 c3", [{"regs": {"rdi": h(gla)}}])
    description_4level["page_tables"][0]["gla"] = h(DIRECT_5LEVEL + PT_GPA)
    with pytest.raises(UsageError, match="not canonical with 4level paging"):
        capture_description(description_4level)


def test_code_that_faults_is_a_usage_error() -> None:
    # mov [rdi], rsi with RDI pointing at an unmapped page: #PF, which the capture
    # reports instead of recording anything.
    with pytest.raises(UsageError, match="the CPU stopped"):
        capture_description(describe64("48 89 37 c3", [{"regs": {"rdi": "0x1000"}}]))


def test_code_that_never_returns_is_a_usage_error() -> None:
    # jmp $ (eb fe) spins forever.
    with pytest.raises(UsageError, match="did not return within 50 instructions"):
        capture_description(describe64("eb fe", [{"regs": {}}], max_instructions=50))


def test_capture_is_deterministic() -> None:
    description = pae_description("89 48 04 89 10 c3", [SET_PTE_CALL])
    assert capture_description(copy.deepcopy(description)) == \
        capture_description(copy.deepcopy(description))
