"""The shipped MOV moffs traces store where the instruction bytes say and what
the accumulator holds, worked out here from the encoding alone (SDM vol. 2,
MOV A2/A3: the address is an immediate of the address size, added to the
segment base and wrapped at the address size; the operand size comes from 66
and REX.W) and checked against what the capture oracle recorded."""

from __future__ import annotations

import json

import pytest

from ptemu.fixtures import corpus_path

TRACES = ["4level/mov-moffs-absolute", "5level/mov-moffs-absolute",
          "4level/mov-moffs-32bit-address", "pae/mov-moffs"]
SEGMENT_BASES = {0x64: "fs_base", 0x65: "gs_base"}


def _expected_store(code: bytes, regs: dict[str, int], code_bits: int) -> tuple[int, int, int]:
    """(linear address, size, value) of `mov [moffs], rAX` from its bytes."""
    operand = 4
    address_bytes = 8 if code_bits == 64 else 4
    base = 0
    position = 0
    while code[position] in (0x66, 0x67, 0x64, 0x65) or (
            code_bits == 64 and 0x40 <= code[position] <= 0x4F):
        byte = code[position]
        if byte == 0x66:
            operand = 2
        elif byte == 0x67:
            address_bytes //= 2
        elif byte in SEGMENT_BASES:
            base = regs.get(SEGMENT_BASES[byte], 0)
        elif byte & 0x08:  # REX.W
            operand = 8
        position += 1
    assert code[position] == 0xA3, "not MOV moffs, rAX"
    offset = int.from_bytes(code[position + 1:position + 1 + address_bytes], "little")
    width = 64 if code_bits == 64 else 32
    linear = (base + offset) & ((1 << width) - 1)
    return linear, operand, regs["rax"] & ((1 << (8 * operand)) - 1)


@pytest.mark.parametrize("name", TRACES)
def test_moffs_traces_store_what_the_encoding_says(name: str) -> None:
    fixture = json.loads((corpus_path() / f"{name}.json").read_text())
    assert fixture["events"], name
    for event in fixture["events"]:
        regs = {key: int(value, 16) for key, value in event["regs"].items()}
        linear, size, value = _expected_store(bytes.fromhex(event["code"]), regs,
                                              fixture["code_bits"])
        assert int(event["gla"], 16) == linear
        (write,) = event["expect"]["writes"]
        assert (write["size"], int(write["value"], 16)) == (size, value)
        assert int(write["gpa"], 16) + write["offset"] == int(event["gpa"], 16)
