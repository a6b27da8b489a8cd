"""Forms the fast path leaves to Unicorn come back as None, never as a guess."""

from __future__ import annotations

import dataclasses

import pytest
from fastpath_helpers import decode

from ptemu.fastpath import compile_fast, emulate_fast

REGS = {"rip": 0xFFFFFFFF81001234, "rdi": 0x1000, "rsi": 0x1000, "rcx": 4}


@pytest.mark.parametrize(("code", "code_bits"), [
    ("f3 48 ab", 64),          # REP STOSQ
    ("f3 ab", 32),             # REP STOSD
    ("48 a5", 64),             # MOVSQ
    ("f3 a4", 32),             # REP MOVSB
    ("48 0f c7 0f", 64),       # CMPXCHG16B
    ("0f 11 07", 64),          # MOVUPS: a vector store
    ("66 0f 7f 07", 64),       # MOVDQA
    ("66 0f d6 07", 64),       # MOVQ m64, xmm
    ("c5 fa 7f 07", 64),       # VMOVDQU (the handler's own register store)
])
def test_unhandled_forms_give_none(code: str, code_bits: int) -> None:
    store = decode(code, code_bits)
    assert compile_fast(store) is None
    assert emulate_fast(store, REGS, bytes(store.access_size)) is None


@pytest.mark.parametrize("code", ["48 89 37", "48 ab", "48 0f c3 37"])
def test_lock_on_a_plain_store_gives_none(code: str) -> None:
    # LOCK MOV / LOCK STOS / LOCK MOVNTI raise #UD on the CPU (SDM vol. 2, LOCK);
    # Capstone refuses most such encodings, the fast path refuses the record.
    store = dataclasses.replace(decode(code), lock=True)
    assert emulate_fast(store, REGS, bytes(8)) is None


def test_odd_records_give_none() -> None:
    xchg = decode("48 87 37")
    assert emulate_fast(dataclasses.replace(xchg, source_register=None), REGS, bytes(8)) is None
    assert emulate_fast(dataclasses.replace(xchg, source_register="xmm0"), REGS,
                        bytes(8)) is None
    # A source register that does not match the operand size.
    assert emulate_fast(dataclasses.replace(xchg, source_register="esi"), REGS, bytes(8)) is None
    mov = decode("48 89 37")
    assert emulate_fast(dataclasses.replace(mov, access_size=16), REGS, bytes(16)) is None
    assert emulate_fast(dataclasses.replace(mov, mnemonic="movsx"), REGS, bytes(8)) is None
    add = decode("48 01 37")
    assert emulate_fast(dataclasses.replace(add, source_register=None), REGS, bytes(8)) is None
