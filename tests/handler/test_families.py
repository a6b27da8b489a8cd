"""Per instruction family: bytes, registers and flags worked out by hand from
the Intel SDM vol. 2 instruction pages (cited per test).

Addresses are realistic: a 4-level direct-map GLA 0xffff888012345ff8 over GPA
0x12345ff8, a 32-bit kernel GLA 0xc1234ff8.
"""

from __future__ import annotations

from ptemu.results import WriteRecord
from ptemu.status import EntryState, Status

GLA64 = 0xFFFF888012345FF8
GPA64 = 0x12345FF8
RIP64 = 0xFFFFFFFF81001234
GLA32 = 0xC1234FF8
GPA32 = 0x01234FF8
RIP32 = 0xC1001234
PTE = 0x8000000012345067  # NX | frame 0x12345000 | D A U W P


def test_mov_register_64bit(make_guest):
    # SDM MOV: 89 /r with REX.W stores r64 to r/m64; no flags affected.
    guest = make_guest("4level")
    result = guest.write("48 89 37", {"rip": RIP64, "rdi": GLA64, "rsi": PTE}, GLA64, GPA64)
    assert result.status is Status.EMULATED
    assert result.writes == (WriteRecord(GPA64, 0, 8, PTE, 0),)
    assert [(e.gpa, e.state, e.old, e.new) for e in result.entries] == [
        (GPA64, EntryState.COMPLETE, 0, PTE)]
    assert result.regs == {"rip": RIP64 + 3}
    assert guest.entry(GPA64) == PTE


def test_mov_immediate_sizes(make_guest):
    # C6 /0 ib (1 byte), 66 C7 /0 iw (2 bytes), C7 /0 id (4 bytes, in 64-bit
    # code with REX.W the imm32 is sign-extended to 8 bytes).
    guest = make_guest("4level")
    guest.set_entry(GPA64, 0x1111111111111111)
    result = guest.write("c6 07 63", {"rip": RIP64, "rdi": GLA64}, GLA64, GPA64)
    assert result.writes == (WriteRecord(GPA64, 0, 1, 0x63, 0x1111111111111111),)
    assert guest.entry(GPA64) == 0x1111111111111163
    result = guest.write("66 c7 47 02 34 12", {"rip": RIP64, "rdi": GLA64}, GLA64 + 2, GPA64 + 2)
    assert result.writes == (WriteRecord(GPA64, 2, 2, 0x1234, 0x1111111111111163),)
    assert result.regs == {"rip": RIP64 + 6}
    assert guest.entry(GPA64) == 0x1111111112341163
    result = guest.write("48 c7 07 00 00 00 80", {"rip": RIP64, "rdi": GLA64}, GLA64, GPA64)
    assert result.writes[0].value == 0xFFFFFFFF80000000
    assert guest.entry(GPA64) == 0xFFFFFFFF80000000


def test_mov_partial_stays_partial_until_full(make_guest):
    # A plain 4-byte store into an 8-byte PAE entry is partial (semantics 3).
    guest = make_guest("pae", coalesce=False)
    result = guest.write("89 50 04", {"rip": RIP32, "rax": GLA32, "rdx": 0x1}, GLA32 + 4,
                         GPA32 + 4, code_bits=32)
    assert result.writes == (WriteRecord(GPA32, 4, 4, 0x1, 0),)
    assert [(e.state, e.old) for e in result.entries] == [(EntryState.PARTIAL, None)]
    assert guest.handler.pending() == (GPA32,)
    result = guest.write("89 10", {"rip": RIP32, "rax": GLA32, "rdx": 0x2345067}, GLA32, GPA32,
                         code_bits=32)
    assert [(e.state, e.old, e.new) for e in result.entries] == [
        (EntryState.COMPLETE, 0, 0x1_02345067)]
    assert guest.handler.pending() == ()


def test_stos_without_rep_moves_rdi_by_df(make_guest):
    # SDM STOS: stores rAX at ES:rDI, then rDI += size (DF=0) or -= size (DF=1).
    guest = make_guest("4level")
    result = guest.write("48 ab", {"rip": RIP64, "rdi": GLA64, "rax": PTE}, GLA64, GPA64)
    assert result.writes == (WriteRecord(GPA64, 0, 8, PTE, 0),)
    assert result.regs == {"rip": RIP64 + 2, "rdi": GLA64 + 8}
    result = guest.write("48 ab", {"rip": RIP64, "rdi": GLA64, "rax": 0, "rflags": 0x402},
                         GLA64, GPA64)
    assert result.writes == (WriteRecord(GPA64, 0, 8, 0, PTE),)
    assert result.regs == {"rip": RIP64 + 2, "rdi": GLA64 - 8}


def test_stosd_32bit(make_guest):
    guest = make_guest("legacy")
    result = guest.write("ab", {"rip": RIP32, "rdi": GLA32, "rax": 0x1234067}, GLA32, GPA32,
                         code_bits=32)
    assert result.writes == (WriteRecord(GPA32, 0, 4, 0x1234067, 0),)
    assert result.regs == {"rip": RIP32 + 1, "rdi": GLA32 + 4}
    assert [(e.state, e.new) for e in result.entries] == [(EntryState.COMPLETE, 0x1234067)]


def test_xchg_both_ways(make_guest):
    # SDM XCHG: exchanges; with memory it is always locked; no flags.
    guest = make_guest("4level")
    guest.set_entry(GPA64, PTE)
    result = guest.write("48 87 37", {"rip": RIP64, "rdi": GLA64, "rsi": 0}, GLA64, GPA64)
    assert result.writes == (WriteRecord(GPA64, 0, 8, 0, PTE),)
    assert result.regs == {"rip": RIP64 + 3, "rsi": PTE}
    # "xchg rsi, [rdi]" is the same opcode; the operand order in the source
    # text differs only. 87 /r with ModRM 0x37 again, via the other mnemonic order:
    result = guest.write("48 87 37", {"rip": RIP64, "rdi": GLA64, "rsi": PTE}, GLA64, GPA64)
    assert guest.entry(GPA64) == PTE
    assert result.regs == {"rip": RIP64 + 3, "rsi": 0}


def test_cmpxchg_match_and_mismatch(make_guest):
    # SDM CMPXCHG: compare rAX with r/m; equal: ZF=1, r/m := src; else ZF=0,
    # rAX := r/m. Flags as CMP rAX, r/m.
    guest = make_guest("4level")
    guest.set_entry(GPA64, 0x5)
    result = guest.write("f0 48 0f b1 37", {"rip": RIP64, "rdi": GLA64, "rsi": PTE, "rax": 5},
                         GLA64, GPA64)
    assert result.writes == (WriteRecord(GPA64, 0, 8, PTE, 5),)
    # 5 - 5 = 0: ZF=1, PF=1 (zero has even parity), CF=SF=OF=AF=0.
    assert result.regs == {"rip": RIP64 + 5, "rflags": 0x46}
    result = guest.write("f0 48 0f b1 37", {"rip": RIP64, "rdi": GLA64, "rsi": 9, "rax": 7},
                         GLA64, GPA64)
    # Mismatch: the CPU writes the old value back (a record with value == old).
    assert result.writes == (WriteRecord(GPA64, 0, 8, PTE, PTE),)
    assert guest.entry(GPA64) == PTE
    # 7 - PTE borrows: CF=1; result 0x7ffffffFEDCBAFA0: SF=0, OF=0 (pos - neg = pos).
    # Low byte 0xa0 = 1010 0000: two bits, PF=1. AF: low nibble 7 < 7? 7-7=0 no borrow: AF=0.
    assert result.regs == {"rip": RIP64 + 5, "rax": PTE, "rflags": 0x2 | 0x1 | 0x4}


def test_cmpxchg_32bit_accumulator_zero_extends_in_64bit_code(make_guest):
    # SDM CMPXCHG, 64-bit mode: a 32-bit destination loads EAX, which zero-
    # extends into RAX (SDM vol. 1, 3.4.1.1).
    guest = make_guest("4level")
    guest.set_entry(GPA64, 0x5)
    result = guest.write("f0 0f b1 37", {"rip": RIP64, "rdi": GLA64, "rsi": 1,
                                         "rax": 0xFFFFFFFF00000007}, GLA64, GPA64)
    assert result.writes == (WriteRecord(GPA64, 0, 4, 5, 5),)
    assert result.regs["rax"] == 5
    # On a match only the destination is written: RAX keeps its upper half
    # (real CPUs do; Unicorn 2.1 zero-extends, which the handler corrects).
    result = guest.write("f0 0f b1 37", {"rip": RIP64, "rdi": GLA64, "rsi": 9,
                                         "rax": 0xFFFFFFFF00000005}, GLA64, GPA64)
    assert result.writes == (WriteRecord(GPA64, 0, 4, 9, 5),)
    assert "rax" not in result.regs
    assert result.regs["rflags"] == 0x46


def test_cmpxchg8b_match_and_mismatch(make_guest):
    # SDM CMPXCHG8B: EDX:EAX == m64 -> m64 := ECX:EBX, ZF=1; else EDX:EAX := m64, ZF=0.
    guest = make_guest("pae")
    guest.set_entry(GPA32, 0x0000000100000063)
    regs = {"rip": RIP32, "rdi": GLA32, "rdx": 0x1, "rax": 0x63, "rcx": 0x80000000,
            "rbx": 0x2345067}
    result = guest.write("f0 0f c7 0f", regs, GLA32, GPA32, code_bits=32)
    assert result.writes == (WriteRecord(GPA32, 0, 8, 0x80000000_02345067, 0x1_00000063),)
    assert result.regs == {"rip": RIP32 + 4, "rflags": 0x2 | 0x40}
    assert [(e.state, e.old, e.new) for e in result.entries] == [
        (EntryState.COMPLETE, 0x1_00000063, 0x80000000_02345067)]
    result = guest.write("f0 0f c7 0f", regs, GLA32, GPA32, code_bits=32)
    assert result.writes == (WriteRecord(GPA32, 0, 8, 0x80000000_02345067,
                                         0x80000000_02345067),)
    assert result.regs == {"rip": RIP32 + 4, "rax": 0x02345067, "rdx": 0x80000000}


def test_lock_and_clears_rw(make_guest):
    # SDM AND: OF=CF=0; SF, ZF, PF by the result; AF undefined.
    # 0x67 & 0xfd = 0x65 = 0110 0101: four bits set -> PF=1; not zero; SF=0.
    guest = make_guest("4level")
    guest.set_entry(GPA64, PTE)
    result = guest.write("f0 80 27 fd", {"rip": RIP64, "rdi": GLA64}, GLA64, GPA64)
    assert result.writes == (WriteRecord(GPA64, 0, 1, 0x65, PTE),)
    assert result.regs["rip"] == RIP64 + 4
    assert result.regs["rflags"] & ~result.undefined_flags == 0x6
    assert result.undefined_flags == 0x10  # AF
    # Read-modify-write completes the entry at once under strict (semantics 3).
    assert [(e.state, e.old, e.new) for e in result.entries] == [
        (EntryState.COMPLETE, PTE, PTE & ~0x2)]


def test_lock_and_under_hvmi_stays_partial(make_guest):
    guest = make_guest("4level", policy="hvmi")
    guest.set_entry(GPA64, PTE)
    result = guest.write("f0 80 27 fd", {"rip": RIP64, "rdi": GLA64}, GLA64, GPA64)
    assert [e.state for e in result.entries] == [EntryState.PARTIAL]
    assert guest.handler.pending() == (GPA64,)


def test_or_and_xor_register(make_guest):
    guest = make_guest("4level")
    guest.set_entry(GPA64, 0x12345000)
    result = guest.write("f0 48 09 37", {"rip": RIP64, "rdi": GLA64, "rsi": 0x67}, GLA64, GPA64)
    assert guest.entry(GPA64) == 0x12345067
    # 0x12345067: SF=0 ZF=0; low byte 0x67 has five bits -> PF=0.
    assert result.regs.get("rflags", 0x2) & ~0x10 == 0x2
    result = guest.write("48 31 37", {"rip": RIP64, "rdi": GLA64, "rsi": 0x12345067}, GLA64, GPA64)
    assert guest.entry(GPA64) == 0
    assert result.regs["rflags"] & ~0x10 == 0x46  # ZF, PF


def test_bit_test_family_immediate_and_register(make_guest):
    # SDM BTS/BTR/BTC: CF := selected bit, then set/reset/complement it.
    guest = make_guest("4level")
    guest.set_entry(GPA64, PTE)
    result = guest.write("f0 48 0f ba 37 01", {"rip": RIP64, "rdi": GLA64}, GLA64, GPA64)
    assert guest.entry(GPA64) == PTE & ~0x2
    assert result.regs["rflags"] & 0x1 == 1  # the RW bit was set
    assert result.undefined_flags == 0x894  # OF SF AF PF
    result = guest.write("48 0f ab 37", {"rip": RIP64, "rdi": GLA64, "rsi": 63}, GLA64, GPA64)
    assert guest.entry(GPA64) == PTE & ~0x2  # NX was already set: CF=1, unchanged
    assert result.regs.get("rflags", 0x2) & 0x1 == 1
    result = guest.write("48 0f bb 37", {"rip": RIP64, "rdi": GLA64, "rsi": 63}, GLA64, GPA64)
    assert guest.entry(GPA64) == (PTE & ~0x2) & ~(1 << 63)


def test_bit_test_register_offset_reaches_next_entry(make_guest):
    # Bit-base addressing (SDM BT): offset 64+1 from [rdi] addresses the
    # qword at rdi+8, bit 1. The faulting GLA is that qword's.
    guest = make_guest("4level")
    base = GLA64 - 8
    guest.set_entry(GPA64, 0x67)
    guest.set_entry(GPA64 - 8, 0xAA)
    result = guest.write("48 0f b3 37", {"rip": RIP64, "rdi": base, "rsi": 65}, GLA64, GPA64)
    assert result.status is Status.EMULATED
    assert result.writes == (WriteRecord(GPA64, 0, 8, 0x65, 0x67),)
    assert guest.entry(GPA64 - 8) == 0xAA
    # The same instruction with the GLA of its operand base is rejected: it does
    # not write there.
    result = guest.write("48 0f b3 37", {"rip": RIP64, "rdi": base, "rsi": 65},
                         GLA64 - 8, GPA64 - 8)
    assert result.status is Status.REJECTED


def test_lock_prefix_on_mov_is_not_a_store(make_guest):
    # SDM 2.1.1: LOCK on an instruction that is not read-modify-write is #UD,
    # so such bytes never store anything: the event is unsupported.
    guest = make_guest("4level")
    result = guest.write("f0 48 89 37", {"rip": RIP64, "rdi": GLA64, "rsi": 1}, GLA64, GPA64)
    assert result.status is Status.UNSUPPORTED
    assert guest.entry(GPA64) == 0
