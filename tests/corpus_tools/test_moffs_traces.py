"""The shipped MOV moffs traces (issue 11, section 1) store where the
instruction bytes say and what the accumulator holds.

Two checks, neither taking anything from the capture's own arithmetic:

- `HAND_WORKED`: every event of every moffs trace, written out by hand from
  the scenario the builder describes (tools/corpus/ptemu_corpus/synthetic64.py
  and synthetic32.py): the first byte's GLA and GPA, the store's size and
  value, RIP before and after. SDM vol. 2, MOV A2/A3: the moffs is an
  immediate of the address size (8 bytes in 64-bit code, 4 with 67; 2 in
  16-bit code, 4 with 67), zero-extended and added to the segment base (DS
  unless overridden; in 64-bit code only FS and GS have one), the sum wrapped
  at 4 GiB outside 64-bit code; the operand is AL (A2), or AX/EAX/RAX (A3) by
  66, REX.W and the code size.
- `_expected_store`: the same rule applied to each event's code bytes and
  segment bases, so a trace whose code changes is still checked.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from ptemu.fixtures import corpus_path

# name -> one row per event: (gla, gpa, size, value, rip, rip after)
HAND_WORKED: dict[str, list[tuple[int, int, int, int, int, int]]] = {
    # Code at 0xffffffff81000000, one blob per 0x40; table gpa 0x12345000 in the
    # direct map (0xffff888000000000 + gpa); gs_base = the direct map's base.
    "4level/mov-moffs-absolute": [
        # 48 a3 08 50 34 12 80 88 ff ff: 10 bytes, rax = 0x8000000012345067
        (0xFFFF_8880_1234_5008, 0x1234_5008, 8, 0x8000_0000_1234_5067,
         0xFFFF_FFFF_8100_0000, 0xFFFF_FFFF_8100_000A),
        # 66 a3 10 50 34 12 80 88 ff ff: ax = 0x1234
        (0xFFFF_8880_1234_5010, 0x1234_5010, 2, 0x1234,
         0xFFFF_FFFF_8100_0040, 0xFFFF_FFFF_8100_004A),
        # a2 18 50 34 12 80 88 ff ff: 9 bytes, al = 0x25
        (0xFFFF_8880_1234_5018, 0x1234_5018, 1, 0x25,
         0xFFFF_FFFF_8100_0080, 0xFFFF_FFFF_8100_0089),
        # 65 48 a3 20 50 34 12 00 00 00 00: 0xffff888000000000 + 0x12345020
        (0xFFFF_8880_1234_5020, 0x1234_5020, 8, 0x67,
         0xFFFF_FFFF_8100_00C0, 0xFFFF_FFFF_8100_00CB),
    ],
    # The same under LA57: the direct map at 0xff11000000000000, an address
    # that is non-canonical under 4-level paging.
    "5level/mov-moffs-absolute": [
        (0xFF11_0000_1234_5008, 0x1234_5008, 8, 0x8000_0000_1234_5067,
         0xFFFF_FFFF_8100_0000, 0xFFFF_FFFF_8100_000A),
        (0xFF11_0000_1234_5010, 0x1234_5010, 2, 0x1234,
         0xFFFF_FFFF_8100_0040, 0xFFFF_FFFF_8100_004A),
        (0xFF11_0000_1234_5018, 0x1234_5018, 1, 0x25,
         0xFFFF_FFFF_8100_0080, 0xFFFF_FFFF_8100_0089),
        # 65 48 a3 20 50 34 12 00 00 00 00, gs_base 0xff11000000000000
        (0xFF11_0000_1234_5020, 0x1234_5020, 8, 0x67,
         0xFFFF_FFFF_8100_00C0, 0xFFFF_FFFF_8100_00CB),
    ],
    # 67 a3 08 50 34 92: the 4-byte moffs 0x92345008 is zero-extended (sign
    # extension would give 0xffffffff92345008, which nothing maps).
    "4level/mov-moffs-32bit-address": [
        # rax = 0xffffffff12345067: eax only
        (0x9234_5008, 0x0234_5008, 4, 0x1234_5067,
         0xFFFF_FFFF_8100_0000, 0xFFFF_FFFF_8100_0006),
        # 67 48 a3 10 50 34 92: rax
        (0x9234_5010, 0x0234_5010, 8, 0x8000_0000_1234_5067,
         0xFFFF_FFFF_8100_0040, 0xFFFF_FFFF_8100_0047),
    ],
    # 32-bit code at 0xc1001000; table gpa 0x1345000 at 0xc0000000 + gpa.
    "pae/mov-moffs": [
        # a3 08 50 34 c1, eax = 0x12345067
        (0xC134_5008, 0x0134_5008, 4, 0x1234_5067, 0xC100_1000, 0xC100_1005),
        # 66 a3 0c 50 34 c1, ax = 0x1234 (the high half's low word)
        (0xC134_500C, 0x0134_500C, 2, 0x1234, 0xC100_1040, 0xC100_1046),
        # a2 10 50 34 c1, al = 0x63
        (0xC134_5010, 0x0134_5010, 1, 0x63, 0xC100_1080, 0xC100_1085),
        # 64 a3 18 50 34 d1: 0xf0000000 + 0xd1345018 = 0x1c1345018, wrapped
        (0xC134_5018, 0x0134_5018, 4, 0x67, 0xC100_10C0, 0xC100_10C6),
    ],
    # 16-bit code, CS base 0x10000, first blob at 0x10100 (IP 0x100).
    "pae/mov-moffs-code16": [
        # 67 66 a3 08 50 34 12: DS base 0x10000000 + 0x12345008, eax
        (0x2234_5008, 0x0234_5008, 4, 0x1234_5067, 0x100, 0x107),
        # 26 a3 10 50: ES base 0x22340000 + 0x5010, ax = 0x8025
        (0x2234_5010, 0x0234_5010, 2, 0x8025, 0x140, 0x144),
    ],
    # Legacy paging; the table mapped at 0x2345000 (gla = gpa).
    "legacy/mov-moffs": [
        # 64 a3 08 50 34 12: 0xf0000000 + 0x12345008 = 0x102345008, wrapped
        (0x0234_5008, 0x0234_5008, 4, 0x67, 0xC100_1000, 0xC100_1006),
        # a2 0c 50 34 02, al = 0x25
        (0x0234_500C, 0x0234_500C, 1, 0x25, 0xC100_1040, 0xC100_1045),
    ],
}

SEGMENTS = {0x26: "es_base", 0x2E: "cs_base", 0x36: "ss_base", 0x3E: "ds_base",
            0x64: "fs_base", 0x65: "gs_base"}


def _load(name: str) -> dict[str, Any]:
    path = corpus_path() / f"{name}.json"
    assert path.is_file(), f"the corpus has no {name}"
    fixture: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return fixture


def _expected_store(code: bytes, regs: dict[str, int],
                    code_bits: int) -> tuple[int, int, int, int]:
    """(linear address, size, value, length) of `mov [moffs], al/rAX` from its bytes."""
    operand = 2 if code_bits == 16 else 4
    address_bytes = 8 if code_bits == 64 else code_bits // 8
    segment = None if code_bits == 64 else "ds_base"
    position = 0
    while code[position] in (0x66, 0x67, *SEGMENTS) or (
            code_bits == 64 and 0x40 <= code[position] <= 0x4F):
        byte = code[position]
        if byte == 0x66:
            operand = 4 if code_bits == 16 else 2
        elif byte == 0x67:
            address_bytes = {64: 4, 32: 2, 16: 4}[code_bits]
        elif byte in SEGMENTS:
            # In 64-bit code only FS and GS have a base.
            segment = SEGMENTS[byte] if code_bits != 64 or byte in (0x64, 0x65) else None
        elif byte & 0x08:  # REX.W
            operand = 8
        position += 1
    opcode = code[position]
    assert opcode in (0xA2, 0xA3), "not MOV moffs, AL/rAX"
    if opcode == 0xA2:
        operand = 1
    offset = int.from_bytes(code[position + 1:position + 1 + address_bytes], "little")
    base = regs.get(segment, 0) if segment else 0
    width = 64 if code_bits == 64 else 32
    linear = (base + offset) & ((1 << width) - 1)
    value = regs["rax"] & ((1 << (8 * operand)) - 1)
    return linear, operand, value, position + 1 + address_bytes


@pytest.mark.parametrize("name", sorted(HAND_WORKED))
def test_moffs_traces_record_the_hand_worked_stores(name: str) -> None:
    fixture = _load(name)
    rows = [(int(event["gla"], 16), int(event["gpa"], 16),
             event["expect"]["writes"][0]["size"],
             int(event["expect"]["writes"][0]["value"], 16),
             int(event["regs"]["rip"], 16), int(event["expect"]["regs"]["rip"], 16))
            for event in fixture["events"]]
    assert rows == HAND_WORKED[name]
    for event in fixture["events"]:
        assert event["expect"]["status"] == "emulated"
        assert len(event["expect"]["writes"]) == 1
        # MOV changes no flags and no register but RIP.
        assert set(event["expect"]["regs"]) == {"rip"}


@pytest.mark.parametrize("name", sorted(HAND_WORKED))
def test_moffs_traces_store_what_the_encoding_says(name: str) -> None:
    fixture = _load(name)
    for event in fixture["events"]:
        regs = {key: int(value, 16) for key, value in event["regs"].items()}
        linear, size, value, length = _expected_store(bytes.fromhex(event["code"]), regs,
                                                      fixture["code_bits"])
        assert int(event["gla"], 16) == linear
        (write,) = event["expect"]["writes"]
        assert (write["size"], int(write["value"], 16)) == (size, value)
        assert int(write["gpa"], 16) + write["offset"] == int(event["gpa"], 16)
        assert int(event["expect"]["regs"]["rip"], 16) == regs["rip"] + length
