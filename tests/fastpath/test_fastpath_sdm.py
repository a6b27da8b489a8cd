"""Per instruction: bytes, registers and flags worked out by hand from the Intel
SDM vol. 2 instruction pages (flag rules per page; PF = even number of ones
in the result's low byte; AF = carry or borrow out of bit 3).

Where the SDM leaves a flag undefined, the expected value is the one Unicorn
gives (the fast path matches it): AND/OR/XOR clear AF, BT* leave every flag
but CF alone. RFLAGS bit 1 is always reported set.
"""

from __future__ import annotations

import dataclasses

import pytest
from fastpath_helpers import decode

from ptemu.errors import UsageError
from ptemu.fastpath import FastStore, compile_fast, emulate_fast

RIP64 = 0xFFFFFFFF81001234
RIP32 = 0xC1001234
PTE = 0x8000000012345067
CF, PF, AF, ZF, SF, OF = 0x1, 0x4, 0x10, 0x40, 0x80, 0x800
ALL = CF | PF | AF | ZF | SF | OF | 0x2


def run(code: str, regs: dict[str, int], destination: int, *, size: int,
        code_bits: int = 64) -> FastStore:
    store = decode(code, code_bits)
    assert store.access_size == size
    result = emulate_fast(store, regs, destination.to_bytes(size, "little"))
    assert result is not None
    return result


def le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")


# -- MOV, MOVNTI ----------------------------------------------------------------------------


def test_mov_register_64bit() -> None:
    # 89 /r with REX.W: r/m64 := r64; no flags.
    result = run("48 89 37", {"rip": RIP64, "rsi": PTE, "rflags": 0x2}, 0, size=8)
    assert result == FastStore(le(PTE, 8), {"rip": RIP64 + 3})


def test_mov_high_byte_register() -> None:
    # 88 /r, reg field 4 without REX is AH = rax bits 15:8.
    result = run("88 27", {"rip": RIP64, "rax": 0x1234}, 0xFF, size=1)
    assert result.stored == b"\x12" and result.registers == {"rip": RIP64 + 2}


def test_mov_rex_byte_registers() -> None:
    # With a REX prefix, reg 6 is SIL; 44 88 07 is R8B.
    assert run("40 88 37", {"rip": RIP64, "rsi": 0x1AB}, 0, size=1).stored == b"\xab"
    assert run("44 88 07", {"rip": RIP64, "r8": 0x2CD}, 0, size=1).stored == b"\xcd"


def test_mov_immediates() -> None:
    # C7 /0 id with REX.W sign-extends imm32 0x92345067 to 64 bits; 66 C7 stores imm16.
    assert run("48 c7 07 67 50 34 92", {"rip": RIP64}, 0, size=8).stored == le(
        0xFFFFFFFF92345067, 8)
    assert run("66 c7 07 34 82", {"rip": RIP64}, 0, size=2).stored == b"\x34\x82"
    assert run("c6 07 80", {"rip": RIP64}, 0, size=1).stored == b"\x80"


def test_rflags_bit_1_is_reported_set() -> None:
    # Bit 1 of RFLAGS reads as 1 (SDM vol. 1, 3.4.3); a caller's value without it changes.
    result = run("89 37", {"rip": RIP64, "rsi": 1, "rflags": 0x200}, 0, size=4)
    assert result.registers == {"rip": RIP64 + 2, "rflags": 0x202}


def test_rip_wraps_at_32_bits_outside_64bit_code() -> None:
    # EIP is 32 bits: the caller's upper half is dropped.
    result = run("89 37", {"rip": 0xFFFFFFFF_C1001234, "rsi": 1}, 0, size=4, code_bits=32)
    assert result.registers == {"rip": 0xC1001236}
    # 16-bit code runs in a 16-bit segment of a 32-bit engine: IP 0xfffe + 2 is 0x10000.
    result = run("89 35", {"rip": 0xFFFE, "rsi": 1}, 0, size=2, code_bits=16)
    assert result.stored == b"\x01\x00" and result.registers == {"rip": 0x10000}


def test_movnti() -> None:
    # 0F C3 /r: MOVNTI m64, r64 stores the register, no flags.
    result = run("48 0f c3 37", {"rip": RIP64, "rsi": PTE}, 0, size=8)
    assert result == FastStore(le(PTE, 8), {"rip": RIP64 + 4})


# -- STOS -----------------------------------------------------------------------------------


def test_stos_steps_rdi_by_the_size() -> None:
    # STOSQ: [rdi] := rax; rdi += 8 when DF=0, -= 8 when DF=1.
    result = run("48 ab", {"rip": RIP64, "rax": PTE, "rdi": 0x1000}, 0, size=8)
    assert result == FastStore(le(PTE, 8), {"rip": RIP64 + 2, "rdi": 0x1008})
    result = run("aa", {"rip": RIP64, "rax": 0x63, "rdi": 0x1000, "rflags": 0x402}, 0, size=1)
    assert result == FastStore(b"\x63", {"rip": RIP64 + 1, "rdi": 0xFFF})


def test_stos_with_32bit_addressing_in_64bit_code_zero_extends_rdi() -> None:
    # 67 AB: the address size is 32, so EDI is updated: 0xfffffffc + 4 wraps to 0,
    # and a 32-bit register write zero-extends (SDM vol. 1, 3.4.1.1).
    result = run("67 ab", {"rip": RIP64, "rax": 7, "rdi": 0xAAAABBBB_FFFFFFFC}, 0, size=4)
    assert result.registers == {"rip": RIP64 + 2, "rdi": 0}


def test_stos_in_16bit_code_merges_di() -> None:
    # 16-bit addressing updates DI only: 0xfffe + 2 wraps to 0, bits 63:16 stay.
    result = run("ab", {"rip": 0x100, "rax": 0x5067, "rdi": 0x1234_0000_FFFE}, 0, size=2,
                 code_bits=16)
    assert result == FastStore(b"\x67\x50", {"rip": 0x101, "rdi": 0x1234_0000_0000})


def test_stos_in_32bit_code_keeps_the_callers_upper_half() -> None:
    result = run("ab", {"rip": RIP32, "rax": 1, "rdi": 0xDEAD0000_00001000}, 0, size=4,
                 code_bits=32)
    assert result.registers == {"rip": RIP32 + 1, "rdi": 0xDEAD0000_00001004}


# -- XCHG -----------------------------------------------------------------------------------


def test_xchg_64bit() -> None:
    result = run("48 87 37", {"rip": RIP64, "rsi": 5}, PTE, size=8)
    assert result == FastStore(le(5, 8), {"rip": RIP64 + 3, "rsi": PTE})


def test_xchg_32bit_register_zero_extends_in_64bit_code() -> None:
    result = run("87 37", {"rip": RIP64, "rsi": 0xFFFFFFFF_00000005}, 0x12345067, size=4)
    assert result == FastStore(le(5, 4), {"rip": RIP64 + 2, "rsi": 0x12345067})


def test_xchg_32bit_register_keeps_the_callers_upper_half_in_32bit_code() -> None:
    result = run("87 37", {"rip": RIP32, "rsi": 0xFFFFFFFF_00000005}, 0x12345067, size=4,
                 code_bits=32)
    assert result.registers == {"rip": RIP32 + 2, "rsi": 0xFFFFFFFF_12345067}


def test_xchg_high_byte_merges() -> None:
    # 86 /r, reg 4 = AH: only rax bits 15:8 change.
    result = run("86 27", {"rip": RIP64, "rax": 0x1122334455667788}, 0xAB, size=1)
    assert result == FastStore(b"\x77", {"rip": RIP64 + 2, "rax": 0x112233445566AB88})


def test_xchg_with_equal_values_changes_only_rip() -> None:
    result = run("48 87 37", {"rip": RIP64, "rsi": PTE}, PTE, size=8)
    assert result.registers == {"rip": RIP64 + 3}


# -- CMPXCHG, CMPXCHG8B ---------------------------------------------------------------------


def test_cmpxchg_match() -> None:
    # Equal: ZF=1, [m] := src; flags of CMP 5, 5: result 0, PF=1.
    result = run("f0 48 0f b1 37", {"rip": RIP64, "rsi": PTE, "rax": 5}, 5, size=8)
    assert result == FastStore(le(PTE, 8), {"rip": RIP64 + 5, "rflags": 0x2 | ZF | PF})


def test_cmpxchg_mismatch_loads_the_accumulator() -> None:
    # 7 - PTE borrows (CF=1) = 0x7fffffffedcbafa0: SF=0; positive - negative = positive,
    # OF=0; low byte 0xa0 has two ones, PF=1; 7 - 7 in the low nibble, AF=0.
    result = run("f0 48 0f b1 37", {"rip": RIP64, "rsi": 9, "rax": 7}, PTE, size=8)
    assert result == FastStore(le(PTE, 8), {"rip": RIP64 + 5, "rax": PTE,
                                            "rflags": 0x2 | CF | PF})


def test_cmpxchg_32bit_mismatch_zero_extends_rax_in_64bit_code() -> None:
    # 7 - 5 = 2: every flag clear, so RFLAGS does not change.
    result = run("0f b1 37", {"rip": RIP64, "rsi": 1, "rax": 0xFFFFFFFF_00000007}, 5, size=4)
    assert result == FastStore(le(5, 4), {"rip": RIP64 + 3, "rax": 5})


def test_cmpxchg_32bit_match_leaves_rax_alone() -> None:
    # The SDM writes the accumulator only on a mismatch (Unicorn 2.1 zero-extends
    # it anyway: unicorn-engine/unicorn#2332; the fast path follows the SDM).
    result = run("0f b1 37", {"rip": RIP64, "rsi": 1, "rax": 0xFFFFFFFF_00000005}, 5, size=4)
    assert result == FastStore(le(1, 4), {"rip": RIP64 + 3, "rflags": 0x2 | ZF | PF})


def test_cmpxchg_8bit_mismatch_merges_al() -> None:
    # CMP AL=0x88, 0x90: 0xf8 with a borrow: CF=1, SF=1; -120 - -112 = -8, OF=0;
    # 8 - 0 in the low nibble, AF=0; 0xf8 has five ones, PF=0.
    result = run("0f b0 37", {"rip": RIP64, "rdx": 0x4200, "rax": 0x1122334455667788}, 0x90,
                 size=1)
    assert result == FastStore(b"\x90", {"rip": RIP64 + 3, "rax": 0x1122334455667790,
                                         "rflags": 0x2 | CF | SF})


def test_cmpxchg_in_32bit_code_keeps_the_callers_upper_half() -> None:
    result = run("f0 0f b1 37", {"rip": RIP32, "rsi": 1, "rax": 0xAAAABBBB_00000007}, 5,
                 size=4, code_bits=32)
    assert result.registers["rax"] == 0xAAAABBBB_00000005


def test_cmpxchg8b() -> None:
    # EDX:EAX == m64: m64 := ECX:EBX, ZF=1, the other flags unaffected.
    regs = {"rip": RIP32, "rdx": 0x1, "rax": 0x63, "rcx": 0x80000000, "rbx": 0x2345067,
            "rflags": ALL & ~ZF}
    result = run("f0 0f c7 0f", regs, 0x1_00000063, size=8, code_bits=32)
    assert result == FastStore(le(0x80000000_02345067, 8), {"rip": RIP32 + 4, "rflags": ALL})
    # Otherwise EDX:EAX := m64 and ZF=0, m64 written back unchanged.
    result = run("f0 0f c7 0f", regs | {"rflags": ALL}, 0x80000000_02345067, size=8,
                 code_bits=32)
    assert result == FastStore(le(0x80000000_02345067, 8), {
        "rip": RIP32 + 4, "rax": 0x02345067, "rdx": 0x80000000, "rflags": ALL & ~ZF})


def test_cmpxchg8b_mismatch_zero_extends_in_64bit_code() -> None:
    regs = {"rip": RIP64, "rax": 0xFFFF0000_00000006, "rdx": 0xFFFF0000_00000000}
    result = run("f0 0f c7 0f", regs, 5, size=8)
    assert result.registers == {"rip": RIP64 + 4, "rax": 5, "rdx": 0}


# -- AND, OR, XOR ---------------------------------------------------------------------------


def test_lock_and_clears_rw() -> None:
    # 0x67 & 0xfd = 0x65, four ones: PF=1; OF=CF=0; AF cleared as Unicorn does.
    result = run("f0 80 27 fd", {"rip": RIP64, "rflags": ALL}, 0x67, size=1)
    assert result == FastStore(b"\x65", {"rip": RIP64 + 4, "rflags": 0x2 | PF})


def test_or_sets_sign() -> None:
    result = run("48 09 37", {"rip": RIP64, "rsi": 1}, 1 << 63, size=8)
    assert result == FastStore(le((1 << 63) | 1, 8), {"rip": RIP64 + 3, "rflags": 0x2 | SF})


def test_xor_to_zero() -> None:
    result = run("31 37", {"rip": RIP64, "rsi": 0x12345067}, 0x12345067, size=4)
    assert result == FastStore(bytes(4), {"rip": RIP64 + 2, "rflags": 0x2 | ZF | PF})


# -- BTS, BTR, BTC --------------------------------------------------------------------------


def test_bts_immediate_sets_cf_from_the_old_bit() -> None:
    # Bit 1 of 0x67 is set: CF=1; the other flags keep their values.
    result = run("f0 48 0f ba 2f 01", {"rip": RIP64, "rflags": ALL & ~CF}, PTE, size=8)
    assert result == FastStore(le(PTE, 8), {"rip": RIP64 + 6, "rflags": ALL})


def test_btr_immediate_clears_nx() -> None:
    result = run("48 0f ba 37 3f", {"rip": RIP64}, PTE, size=8)
    assert result == FastStore(le(0x12345067, 8), {"rip": RIP64 + 5, "rflags": 0x2 | CF})


def test_bit_immediate_is_taken_modulo_the_operand_size() -> None:
    # 32-bit operand: bit 37 is bit 5; 0x47 has bit 5 clear, CF=0.
    result = run("0f ba 2f 25", {"rip": RIP64, "rflags": ALL & ~CF}, 0x12345047, size=4)
    assert result == FastStore(le(0x12345067, 4), {"rip": RIP64 + 4})


def test_bit_register_offset_is_taken_modulo_the_operand_size() -> None:
    # The caller gives the unit that holds the bit; -1 is bit 63 of the unit below.
    result = run("48 0f bb 37", {"rip": RIP64, "rsi": 2**64 - 1}, 0, size=8)
    assert result == FastStore(le(1 << 63, 8), {"rip": RIP64 + 4})
    # 16-bit operand: offset 19 is bit 3 of its word.
    result = run("66 0f b3 37", {"rip": RIP64, "rsi": 19}, 0x0008, size=2)
    assert result == FastStore(bytes(2), {"rip": RIP64 + 4, "rflags": 0x2 | CF})


# -- ADD, SUB, ADC, SBB, XADD ---------------------------------------------------------------


def test_add_carries_out() -> None:
    # -1 + 1 = 0 with a carry out of bit 63 and of bit 3: CF ZF PF AF; OF=0 (signs differ).
    result = run("f0 48 01 37", {"rip": RIP64, "rsi": 1}, 2**64 - 1, size=8)
    assert result == FastStore(bytes(8), {"rip": RIP64 + 4, "rflags": 0x2 | CF | ZF | PF | AF})


def test_add_byte_overflows() -> None:
    # 0x7f + 1 = 0x80: positive + positive = negative, OF=1; SF=1; AF=1; one bit, PF=0.
    result = run("00 37", {"rip": RIP64, "rdx": 0x100}, 0x7F, size=1)
    assert result == FastStore(b"\x80", {"rip": RIP64 + 2, "rflags": 0x2 | OF | SF | AF})


def test_sub_borrows() -> None:
    # 0 - 1 = all ones: CF=1, SF=1, AF=1, PF=1; OF=0.
    result = run("48 29 37", {"rip": RIP64, "rsi": 1}, 0, size=8)
    assert result == FastStore(b"\xff" * 8, {"rip": RIP64 + 3,
                                             "rflags": 0x2 | CF | SF | AF | PF})


def test_adc_and_sbb_use_the_carry() -> None:
    # ADC: 1 + 1 + CF = 3, two ones: PF=1, CF=0.
    result = run("48 11 37", {"rip": RIP64, "rsi": 1, "rflags": 0x3}, 1, size=8)
    assert result == FastStore(le(3, 8), {"rip": RIP64 + 3, "rflags": 0x2 | PF})
    # SBB: 0 - 0 - CF = all ones: CF SF AF PF.
    result = run("48 19 37", {"rip": RIP64, "rsi": 0, "rflags": 0x3}, 0, size=8)
    assert result == FastStore(b"\xff" * 8, {"rip": RIP64 + 3,
                                             "rflags": 0x2 | CF | SF | AF | PF})


def test_xadd() -> None:
    # TEMP := SRC + DEST; SRC := DEST; DEST := TEMP. 0xf + 1 = 0x10: AF=1; one bit, PF=0.
    result = run("f0 48 0f c1 37", {"rip": RIP64, "rsi": 1}, 0xF, size=8)
    assert result == FastStore(le(0x10, 8), {"rip": RIP64 + 5, "rsi": 0xF, "rflags": 0x2 | AF})


def test_xadd_register_widths() -> None:
    # A 16-bit source merges into RSI; a 32-bit one zero-extends in 64-bit code.
    result = run("66 0f c1 37", {"rip": RIP64, "rsi": 0xAAAA_0000_0000_0001}, 0x1234, size=2)
    assert result.stored == le(0x1235, 2) and result.registers["rsi"] == 0xAAAA_0000_0000_1234
    result = run("0f c1 37", {"rip": RIP64, "rsi": 0xAAAA_0000_0000_0001}, 0x1234, size=4)
    assert result.registers["rsi"] == 0x1234


# -- INC, DEC, NOT, NEG ---------------------------------------------------------------------


def test_inc_keeps_cf() -> None:
    # 0x7fff...ff + 1: OF SF AF, low byte 0 so PF=1; CF as it was (set).
    result = run("f0 48 ff 07", {"rip": RIP64, "rflags": 0x3}, 2**63 - 1, size=8)
    assert result == FastStore(le(1 << 63, 8), {"rip": RIP64 + 4,
                                                 "rflags": 0x2 | CF | OF | SF | AF | PF})
    result = run("fe 07", {"rip": RIP64}, 0xFF, size=1)
    assert result == FastStore(b"\x00", {"rip": RIP64 + 2, "rflags": 0x2 | ZF | PF | AF})


def test_dec_to_zero() -> None:
    result = run("48 ff 0f", {"rip": RIP64}, 1, size=8)
    assert result == FastStore(bytes(8), {"rip": RIP64 + 3, "rflags": 0x2 | ZF | PF})


def test_not_changes_no_flag() -> None:
    result = run("f0 48 f7 17", {"rip": RIP64, "rflags": ALL}, PTE, size=8)
    assert result == FastStore(le(PTE ^ (2**64 - 1), 8), {"rip": RIP64 + 4})


def test_neg() -> None:
    # NEG: CF = (operand != 0); flags of 0 - operand.
    result = run("48 f7 1f", {"rip": RIP64}, 1, size=8)
    assert result == FastStore(b"\xff" * 8, {"rip": RIP64 + 3,
                                             "rflags": 0x2 | CF | SF | AF | PF})
    result = run("f6 1f", {"rip": RIP64, "rflags": ALL}, 0, size=1)
    assert result == FastStore(b"\x00", {"rip": RIP64 + 2, "rflags": 0x2 | ZF | PF})
    # -0x80000000 overflows back to itself: OF CF SF, low byte 0: PF.
    result = run("f7 1f", {"rip": RIP64}, 0x80000000, size=4)
    assert result == FastStore(le(0x80000000, 4), {"rip": RIP64 + 2,
                                                   "rflags": 0x2 | OF | CF | SF | PF})


# -- the API --------------------------------------------------------------------------------


def test_missing_registers_read_as_zero() -> None:
    result = run("48 87 37", {}, PTE, size=8)
    assert result == FastStore(bytes(8), {"rip": 3, "rsi": PTE})


def test_destination_of_the_wrong_length_is_a_usage_error() -> None:
    store = decode("48 89 37")
    with pytest.raises(UsageError, match="8 destination bytes, got 4"):
        emulate_fast(store, {"rip": RIP64}, bytes(4))


def test_compile_fast_gives_the_same_result() -> None:
    store = decode("f0 48 0f b1 37")
    emulator = compile_fast(store)
    assert emulator is not None
    regs = {"rip": RIP64, "rsi": PTE, "rax": 5}
    assert emulator(regs, le(5, 8)) == emulate_fast(store, regs, le(5, 8))


def test_equal_stores_of_distinct_identity_are_both_served() -> None:
    first = decode("48 89 37")
    second = dataclasses.replace(first, source_register="rax")
    regs = {"rip": RIP64, "rsi": 1, "rax": 2}
    assert emulate_fast(first, regs, bytes(8)) == FastStore(le(1, 8), {"rip": RIP64 + 3})
    assert emulate_fast(second, regs, bytes(8)) == FastStore(le(2, 8), {"rip": RIP64 + 3})
