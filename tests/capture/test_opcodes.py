"""The capture's own opcode classifier, on encodings from the SDM's opcode maps."""

from __future__ import annotations

import pytest

from ptemu.capture.opcodes import StoreKind, classify, is_cmpxchg_32bit_operand


@pytest.mark.parametrize(("code", "bits", "kind", "rmw", "lock", "rep"), [
    ("48 89 37", 64, StoreKind.MOV, False, False, False),           # 89 /r
    ("c6 07 63", 64, StoreKind.MOV, False, False, False),           # C6 /0 ib
    ("c7 47 04 00 00 00 80", 32, StoreKind.MOV, False, False, False),
    ("a3 20 40 23 c1", 32, StoreKind.MOV, False, False, False),     # A3 moffs32
    ("f3 48 ab", 64, StoreKind.STOS, False, False, True),           # REP STOSQ
    ("ab", 32, StoreKind.STOS, False, False, False),
    ("f0 48 87 37", 64, StoreKind.XCHG, True, True, False),         # 87 /r
    ("86 10", 32, StoreKind.XCHG, True, False, False),
    ("f0 48 0f b1 37", 64, StoreKind.CMPXCHG, True, True, False),   # 0F B1 /r
    ("f0 0f c7 0e", 32, StoreKind.CMPXCHG8B, True, True, False),    # 0F C7 /1
    ("f0 48 0f c7 0f", 64, StoreKind.CMPXCHG16B, True, True, False),  # REX.W 0F C7 /1
    ("f0 80 27 fd", 64, StoreKind.ARITHMETIC, True, True, False),   # 80 /4 ib: AND
    ("48 09 37", 64, StoreKind.ARITHMETIC, True, False, False),     # 09 /r: OR
    ("31 10", 32, StoreKind.ARITHMETIC, True, False, False),        # 31 /r: XOR
    ("83 38 00", 32, StoreKind.OTHER, False, False, False),         # 83 /7: CMP stores nothing
    ("f0 48 0f ba 2f 3f", 64, StoreKind.BIT, True, True, False),    # 0F BA /5 ib: BTS
    ("0f ba 20 01", 32, StoreKind.OTHER, False, False, False),      # 0F BA /4: BT
    ("0f b3 10", 32, StoreKind.BIT, True, False, False),            # 0F B3: BTR
    ("f0 ff 07", 32, StoreKind.UNARY, True, True, False),           # FF /0: INC
    ("0f c3 37", 32, StoreKind.MOVNTI, False, False, False),        # 0F C3: MOVNTI
])
def test_classify(code: str, bits: int, kind: StoreKind, rmw: bool, lock: bool,
                  rep: bool) -> None:
    info = classify(bytes.fromhex(code), bits)
    assert (info.kind, info.read_modify_write, info.lock, info.rep) == (kind, rmw, lock, rep)


def test_rex_is_only_a_prefix_in_64bit_code() -> None:
    # 0x48 is DEC EAX in 32-bit code, so "48 89 37" is not one MOV there.
    assert classify(bytes.fromhex("48 89 37"), 32).kind is StoreKind.OTHER


@pytest.mark.parametrize(("code", "bits", "expected"), [
    ("f0 0f b1 37", 64, True),
    ("f0 48 0f b1 37", 64, False),      # REX.W: 64-bit operand
    ("66 0f b1 37", 64, False),         # 16-bit operand
    ("f0 0f b1 37", 32, False),         # no upper half to lose in 32-bit code
])
def test_cmpxchg_32bit_operand(code: str, bits: int, expected: bool) -> None:
    assert is_cmpxchg_32bit_operand(bytes.fromhex(code), bits) is expected
