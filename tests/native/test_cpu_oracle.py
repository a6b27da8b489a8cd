"""The native oracle itself, checked on hand-derived cases.

Every expected value below is worked out from the Intel SDM (the instruction's
description in vol. 2, flag definitions in vol. 1 3.4.3.1, exceptions in vol. 3) and
written down before running; none is copied from the oracle's output. The encodings
are spelled out next to each case.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from cpu_oracle import (
    FLAGS_MASK,
    NativeOracle,
    OracleInputError,
    OracleUnavailable,
    Outcome,
    get_oracle,
    native_register_names,
)
from hypothesis import given, settings
from hypothesis import strategies as st

DATA = 0x1000_0000
"""A data page (page-aligned, far from the helper's own mappings)."""
CODE = 0x4000_0000
"""Where the instruction is placed (RIP)."""

CF, PF, AF, ZF, SF, TF, IF, DF, OF = 0x1, 0x4, 0x10, 0x40, 0x80, 0x100, 0x200, 0x400, 0x800
ONE = 0x2
"""RFLAGS bit 1 always reads 1 (SDM vol. 1, 3.4.3)."""
SI_KERNEL = 0x80
"""Linux si_code for a fault the kernel raised without an address (#GP)."""
SEGV_MAPERR = 1
PF_WRITE_USER_NOT_PRESENT = 0b110
"""#PF error code: P=0 (not present), W/R=1 (write), U/S=1 (user) (SDM vol. 3A, 4.7)."""


def page(fill: int = 0, **qwords: int) -> bytes:
    """A 4 KiB page of `fill` bytes with little-endian qwords at offsets ``o<hex>=value``."""
    data = bytearray([fill]) * 4096
    for key, value in qwords.items():
        offset = int(key[1:], 16)
        data[offset:offset + 8] = value.to_bytes(8, "little")
    return bytes(data)


def qword(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset:offset + 8], "little")


# ---- plain stores, RSP, RIP-relative ---------------------------------------------------


def test_mov_store_writes_rsi_little_endian(oracle64: NativeOracle) -> None:
    # 48 89 37 = MOV r/m64, r64 (REX.W 89 /r); ModRM 37: reg=rsi, rm=[rdi].
    rsi = 0x1122_3344_5566_7788
    result = oracle64.run(bytes.fromhex("488937"), {"rdi": DATA + 8, "rsi": rsi,
                                                    "rflags": CF | ZF | ONE},
                          {DATA: page(0xAA)}, rip=CODE)
    assert result.outcome is Outcome.COMPLETED and result.fault is None
    expected = bytearray(page(0xAA))
    expected[8:16] = bytes.fromhex("8877665544332211")
    assert result.pages[DATA] == bytes(expected)
    assert result.regs["rip"] == CODE + 3
    assert result.regs["rsi"] == rsi and result.regs["rdi"] == DATA + 8
    assert result.rflags == CF | ZF | ONE  # MOV affects no flags


def test_push_uses_the_given_rsp(oracle64: NativeOracle) -> None:
    # 50 = PUSH rax: RSP -= 8, then [RSP] = rax.
    rax = 0x0102_0304_0506_0708
    result = oracle64.run(b"\x50", {"rax": rax, "rsp": DATA + 0x100}, {DATA: page()},
                          rip=CODE)
    assert result.regs["rsp"] == DATA + 0xF8
    assert qword(result.pages[DATA], 0xF8) == rax
    assert result.regs["rip"] == CODE + 1


def test_rip_relative_load_uses_the_callers_rip(oracle64: NativeOracle) -> None:
    # 48 8B 05 disp32 = MOV rax, [rip+disp32]; RIP-relative addresses count from the next
    # instruction: CODE + 7 + 0xFF9 = CODE + 0x1000, the page after the code page.
    result = oracle64.run(bytes.fromhex("488b05f90f0000"), {},
                          {CODE + 0x1000: page(o0=0xDEAD_BEEF_CAFE_F00D)}, rip=CODE)
    assert result.outcome is Outcome.COMPLETED
    assert result.regs["rax"] == 0xDEAD_BEEF_CAFE_F00D
    assert result.regs["rip"] == CODE + 7


def test_add_sets_flags_and_masks_tf(oracle64: NativeOracle) -> None:
    # 48 01 D8 = ADD rax, rbx. 0x7FFF...F + 1 = 0x8000...0: OF=1 (two positives give a
    # negative), SF=1, ZF=0, CF=0 (no unsigned carry out), AF=1 (carry out of bit 3),
    # PF=1 (low byte 0x00 has an even number of ones). DF passes through; TF is masked on
    # input (else the CPU would single-step), IF is not reported.
    result = oracle64.run(bytes.fromhex("4801d8"),
                          {"rax": 0x7FFF_FFFF_FFFF_FFFF, "rbx": 1, "rflags": TF | DF | IF | ONE},
                          {}, rip=CODE)
    assert result.outcome is Outcome.COMPLETED
    assert result.regs["rax"] == 0x8000_0000_0000_0000
    assert result.rflags == OF | SF | AF | PF | DF | ONE
    assert result.rflags_raw & FLAGS_MASK == OF | SF | AF | PF | DF


# ---- CMPXCHG -----------------------------------------------------------------------


def test_lock_cmpxchg_match_stores_and_sets_zf(oracle64: NativeOracle) -> None:
    # F0 48 0F B1 37 = LOCK CMPXCHG [rdi], rsi. rax == [rdi]: ZF=1 and [rdi] = rsi. The
    # other flags are those of CMP rax, [rdi] with equal operands: result 0, so CF=SF=OF=
    # AF=0 and PF=1. CF SF OF start set to show they are written.
    old = 0x0123_4567_89AB_CDEF
    result = oracle64.run(bytes.fromhex("f0480fb137"),
                          {"rdi": DATA + 0x10, "rax": old, "rsi": 0xFEED_FACE,
                           "rflags": CF | SF | OF | ONE},
                          {DATA: page(o10=old)}, rip=CODE)
    assert qword(result.pages[DATA], 0x10) == 0xFEED_FACE
    assert result.regs["rax"] == old
    assert result.rflags == ZF | PF | ONE


def test_lock_cmpxchg_mismatch_loads_rax(oracle64: NativeOracle) -> None:
    # rax=1, [rdi]=2: not equal, so ZF=0, rax = [rdi], memory keeps 2. CMP 1 - 2 =
    # 0xFFFF...F: CF=1 (borrow), SF=1, OF=0, AF=1 (borrow from bit 4), PF=1 (0xFF: 8 ones).
    result = oracle64.run(bytes.fromhex("f0480fb137"),
                          {"rdi": DATA + 0x10, "rax": 1, "rsi": 0x5555, "rflags": ZF | ONE},
                          {DATA: page(o10=2)}, rip=CODE)
    assert result.regs["rax"] == 2
    assert qword(result.pages[DATA], 0x10) == 2
    assert result.rflags == CF | SF | AF | PF | ONE


# ---- BTS bit-base addressing ---------------------------------------------------------


def test_bts_register_offset_past_the_operand_sets_a_bit_in_another_qword(
    oracle64: NativeOracle,
) -> None:
    # 48 0F AB 07 = BTS [rdi], rax. With a register offset and a memory operand the offset
    # is signed and unbounded: the bit is bit (130 mod 64) = 2 of the qword at
    # rdi + 8 * (130 div 64) = rdi + 0x10 (SDM BT/BTS, "bit base" addressing). CF = old bit
    # (0); ZF is unaffected (starts 1).
    result = oracle64.run(bytes.fromhex("480fab07"),
                          {"rdi": DATA + 0x100, "rax": 130, "rflags": ZF | ONE},
                          {DATA: page()}, rip=CODE)
    expected = bytearray(4096)
    expected[0x110] = 0x04
    assert result.pages[DATA] == bytes(expected)
    assert result.rflags & (CF | ZF) == ZF


def test_bts_reports_the_old_bit_in_cf(oracle64: NativeOracle) -> None:
    result = oracle64.run(bytes.fromhex("480fab07"), {"rdi": DATA + 0x100, "rax": 130},
                          {DATA: page(o110=0x04)}, rip=CODE)
    assert qword(result.pages[DATA], 0x110) == 0x04
    assert result.rflags & CF == CF


def test_bts_negative_offset_reaches_below_the_operand(oracle64: NativeOracle) -> None:
    # rax = -1: qword at rdi + 8 * floor(-1 / 64) = rdi - 8, bit 63, i.e. bit 7 of the byte
    # at rdi - 1.
    result = oracle64.run(bytes.fromhex("480fab07"), {"rdi": DATA + 0x100, "rax": 2**64 - 1},
                          {DATA: page()}, rip=CODE)
    expected = bytearray(4096)
    expected[0xFF] = 0x80
    assert result.pages[DATA] == bytes(expected)


# ---- REP STOS ------------------------------------------------------------------------


PATTERN = 0xA5A5_5A5A_0F0F_F0F0


def test_rep_stosq_forward(oracle64: NativeOracle) -> None:
    # F3 48 AB = REP STOSQ: RCX times store rax at [rdi], rdi += 8 (DF=0), rcx -= 1.
    result = oracle64.run(bytes.fromhex("f348ab"),
                          {"rdi": DATA + 0x10, "rcx": 3, "rax": PATTERN}, {DATA: page(0x11)},
                          rip=CODE)
    data = result.pages[DATA]
    assert [qword(data, o) for o in (0x10, 0x18, 0x20)] == [PATTERN] * 3
    assert data[:0x10] == b"\x11" * 0x10 and data[0x28:] == b"\x11" * (4096 - 0x28)
    assert result.regs["rcx"] == 0 and result.regs["rdi"] == DATA + 0x28
    assert result.regs["rip"] == CODE + 3


def test_rep_stosq_backward(oracle64: NativeOracle) -> None:
    # DF=1: stores at rdi, rdi-8, rdi-16 and leaves rdi 24 lower.
    result = oracle64.run(bytes.fromhex("f348ab"),
                          {"rdi": DATA + 0x20, "rcx": 3, "rax": PATTERN, "rflags": DF | ONE},
                          {DATA: page(0x11)}, rip=CODE)
    data = result.pages[DATA]
    assert [qword(data, o) for o in (0x10, 0x18, 0x20)] == [PATTERN] * 3
    assert data[:0x10] == b"\x11" * 0x10 and data[0x28:] == b"\x11" * (4096 - 0x28)
    assert result.regs["rcx"] == 0 and result.regs["rdi"] == DATA + 0x08
    assert result.rflags == DF | ONE


def test_rep_stosq_faults_at_the_page_end_with_progress_kept(oracle64: NativeOracle) -> None:
    # Four stores from DATA+0xFF0: two fit, the third hits the unmapped next page. A REP
    # string instruction interrupted by an exception keeps RCX/RDI at the point reached
    # and RIP on the instruction, so it can resume (SDM vol. 2, REP). #PF -> SIGSEGV.
    result = oracle64.run(bytes.fromhex("f348ab"),
                          {"rdi": DATA + 0xFF0, "rcx": 4, "rax": PATTERN}, {DATA: page()},
                          rip=CODE)
    assert result.outcome is Outcome.FAULTED and result.fault is not None
    assert result.fault.signal == signal.SIGSEGV and result.fault.si_code == SEGV_MAPERR
    assert result.fault.exception == "#PF"
    assert result.fault.address == DATA + 0x1000
    assert result.fault.error_code == PF_WRITE_USER_NOT_PRESENT
    assert result.regs["rcx"] == 2 and result.regs["rdi"] == DATA + 0x1000
    assert result.regs["rip"] == CODE
    assert qword(result.pages[DATA], 0xFF0) == PATTERN == qword(result.pages[DATA], 0xFF8)


# ---- CMPXCHG16B --------------------------------------------------------------------


def test_cmpxchg16b_misaligned_raises_gp_reported_as_sigsegv(oracle64: NativeOracle) -> None:
    # F0 48 0F C7 0F = LOCK CMPXCHG16B [rdi] (REX.W 0F C7 /1). A memory operand not
    # 16-byte aligned raises #GP(0) (SDM CMPXCHG8B/16B, exceptions); Linux delivers #GP as
    # SIGSEGV with si_code SI_KERNEL and no address, nothing written, RIP unchanged.
    regs = {"rdi": DATA + 8, "rax": 0, "rdx": 0, "rbx": 1, "rcx": 2}
    result = oracle64.run(bytes.fromhex("f0480fc70f"), regs, {DATA: page()}, rip=CODE)
    assert result.outcome is Outcome.FAULTED and result.fault is not None
    assert result.fault.signal == signal.SIGSEGV
    assert result.fault.si_code == SI_KERNEL and result.fault.address == 0
    assert result.fault.exception == "#GP" and result.fault.error_code == 0
    assert result.regs["rip"] == CODE
    assert result.pages[DATA] == page()


def test_cmpxchg16b_match_stores_rcx_rbx(oracle64: NativeOracle) -> None:
    # rdx:rax == m128: ZF=1 and m128 = rcx:rbx. CF, PF, AF, SF, OF are unaffected.
    lo, hi = 0x1111_1111_1111_1111, 0x2222_2222_2222_2222
    result = oracle64.run(bytes.fromhex("f0480fc70f"),
                          {"rdi": DATA + 0x10, "rax": lo, "rdx": hi, "rbx": 0xB, "rcx": 0xC,
                           "rflags": CF | ONE},
                          {DATA: page(o10=lo, o18=hi)}, rip=CODE)
    assert (qword(result.pages[DATA], 0x10), qword(result.pages[DATA], 0x18)) == (0xB, 0xC)
    assert result.rflags == CF | ZF | ONE


def test_cmpxchg16b_mismatch_loads_rdx_rax(oracle64: NativeOracle) -> None:
    lo, hi = 0x1111_1111_1111_1111, 0x2222_2222_2222_2222
    result = oracle64.run(bytes.fromhex("f0480fc70f"),
                          {"rdi": DATA + 0x10, "rax": lo + 1, "rdx": hi, "rbx": 0xB,
                           "rcx": 0xC, "rflags": ZF | ONE},
                          {DATA: page(o10=lo, o18=hi)}, rip=CODE)
    assert (result.regs["rax"], result.regs["rdx"]) == (lo, hi)
    assert (qword(result.pages[DATA], 0x10), qword(result.pages[DATA], 0x18)) == (lo, hi)
    assert result.rflags & ZF == 0


# ---- vector registers ---------------------------------------------------------------


YMM0 = int.from_bytes(bytes(range(32)), "little")


def test_movups_stores_xmm0(oracle64: NativeOracle) -> None:
    # 0F 11 07 = MOVUPS [rdi], xmm0: the register's 16 bytes in memory order.
    result = oracle64.run(bytes.fromhex("0f1107"),
                          {"rdi": DATA + 0x31, "xmm0": YMM0 & (2**128 - 1)}, {DATA: page()},
                          rip=CODE)
    assert result.pages[DATA][0x31:0x41] == bytes(range(16))
    assert result.pages[DATA].count(0) == 4096 - 15  # bytes 1..15 are the only non-zeros


def test_vmovdqu_stores_all_32_bytes_of_ymm0(avx64: NativeOracle) -> None:
    # C5 FE 7F 07 = VMOVDQU [rdi], ymm0 (VEX.256.F3.0F 7F /r): 32 bytes, no alignment rule.
    result = avx64.run(bytes.fromhex("c5fe7f07"), {"rdi": DATA + 0x28, "ymm0": YMM0},
                       {DATA: page(0xEE)}, rip=CODE)
    assert result.outcome is Outcome.COMPLETED
    data = result.pages[DATA]
    assert data[0x28:0x48] == bytes(range(32))
    assert data[:0x28] == b"\xee" * 0x28 and data[0x48:] == b"\xee" * (4096 - 0x48)


def test_ymm_registers_load_and_report_all_256_bits(avx64: NativeOracle) -> None:
    # C5 FD 6F C8 = VMOVDQA ymm1, ymm0 (VEX.256.66.0F 6F /r): ymm1 := ymm0; ymm15 untouched.
    ymm15 = (2**256 - 1) // 3
    result = avx64.run(bytes.fromhex("c5fd6fc8"), {"ymm0": YMM0, "ymm15": ymm15}, {}, rip=CODE)
    assert result.regs["ymm1"] == YMM0 and result.regs["ymm0"] == YMM0
    assert result.regs["xmm1"] == YMM0 & (2**128 - 1)
    assert result.regs["ymm15"] == ymm15


def test_vmovdqu_loads_ymm_from_memory(avx64: NativeOracle) -> None:
    # C5 FE 6F 17 = VMOVDQU ymm2, [rdi].
    data = bytearray(4096)
    data[0x100:0x120] = bytes(range(0xE0, 0x100))
    result = avx64.run(bytes.fromhex("c5fe6f17"), {"rdi": DATA + 0x100}, {DATA: bytes(data)},
                       rip=CODE)
    assert result.regs["ymm2"] == int.from_bytes(bytes(range(0xE0, 0x100)), "little")


# ---- segment bases -----------------------------------------------------------------


@pytest.mark.parametrize(("prefix", "base"), [("64", "fs_base"), ("65", "gs_base")])
def test_fs_and_gs_base(oracle64: NativeOracle, prefix: str, base: str) -> None:
    # <seg> 48 8B 04 25 10 00 00 00 = MOV rax, seg:[0x10] (SIB with no base and no index).
    if not oracle64.capabilities.fsgsbase:
        pytest.skip("host kernel does not enable FSGSBASE (no HWCAP2_FSGSBASE)")
    result = oracle64.run(bytes.fromhex(prefix + "488b042510000000"), {base: DATA},
                          {DATA: page(o10=0x0BAD_F00D_1234_5678)}, rip=CODE)
    assert result.outcome is Outcome.COMPLETED
    assert result.regs["rax"] == 0x0BAD_F00D_1234_5678
    assert result.regs[base] == DATA


# ---- faults are results ------------------------------------------------------------


def test_store_to_an_unmapped_page_is_a_page_fault(oracle64: NativeOracle) -> None:
    result = oracle64.run(bytes.fromhex("488937"), {"rdi": DATA + 0x2008, "rsi": 1},
                          {DATA: page()}, rip=CODE)
    assert result.fault is not None and result.fault.exception == "#PF"
    assert result.fault.address == DATA + 0x2008
    assert result.fault.error_code == PF_WRITE_USER_NOT_PRESENT
    assert result.pages[DATA] == page()


def test_ud2_is_sigill(oracle64: NativeOracle) -> None:
    # 0F 0B = UD2, which always raises #UD; Linux reports SIGILL at the instruction.
    result = oracle64.run(bytes.fromhex("0f0b"), {}, {}, rip=CODE)
    assert result.fault is not None and result.fault.signal == signal.SIGILL
    assert result.fault.exception == "#UD" and result.fault.address == CODE


def test_syscall_is_blocked_and_reported(oracle64: NativeOracle) -> None:
    # 0F 05 = SYSCALL with rax = 62 (kill): the sandbox turns it into SIGSYS.
    result = oracle64.run(bytes.fromhex("0f05"), {"rax": 62, "rdi": 1, "rsi": 9}, {}, rip=CODE)
    assert result.fault is not None and result.fault.signal == signal.SIGSYS
    assert result.fault.address == 62 and result.fault.exception is None


@pytest.mark.parametrize("bits", [64, 32])
@pytest.mark.parametrize("code", ["0f05", "0f34", "cd80"])
def test_no_system_call_gate_gets_through(bits: int, code: str) -> None:
    # SYSCALL (0F 05), SYSENTER (0F 34), INT 0x80 (CD 80) set up as write(2, buf, 18) in
    # either ABI, with a valid stack. Either the CPU refuses the gate in this mode (#UD ->
    # SIGILL: SYSENTER in 64-bit mode on AMD, SYSCALL in compatibility mode on Intel) or the
    # kernel receives the call and the sandbox refuses it (SIGSYS). It never completes.
    oracle = _oracle_or_skip(bits)
    regs = {"rax": 4 if bits == 32 else 1, "rbx": 2, "rcx": DATA, "rdx": 18, "rbp": DATA,
            "rsp": DATA + 0x800}
    if bits == 64:
        regs |= {"rdi": 2, "rsi": DATA}
    result = oracle.run(bytes.fromhex(code), regs, {DATA: page(0x41)}, rip=CODE)
    assert result.outcome is Outcome.FAULTED and result.fault is not None
    assert result.fault.signal in (signal.SIGSYS, signal.SIGILL)


def test_an_endless_instruction_times_out_and_the_next_case_runs(oracle64: NativeOracle) -> None:
    # EB FE = JMP to itself.
    start = time.monotonic()
    result = oracle64.run(bytes.fromhex("ebfe"), {"rax": 7}, {}, rip=CODE)
    assert result.outcome is Outcome.TIMED_OUT and result.regs["rax"] == 7
    assert time.monotonic() - start < 10
    after = oracle64.run(b"\x50", {"rax": 9, "rsp": DATA + 8}, {DATA: page()}, rip=CODE)
    assert after.outcome is Outcome.COMPLETED and qword(after.pages[DATA], 0) == 9


# ---- nothing an instruction does survives into the next case ------------------------


def _worker_writable_mappings(oracle: NativeOracle) -> list[tuple[int, str]]:
    """(start, name) of the running worker's writable mappings, from /proc."""
    supervisor = oracle.helper_pid
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children")
    if not children.exists():
        pytest.skip("kernel has no /proc/<pid>/task/<tid>/children (CONFIG_PROC_CHILDREN)")
    worker = children.read_text().split()[0]
    found = []
    for line in Path(f"/proc/{worker}/maps").read_text().splitlines():
        fields = line.split()
        if fields[1].startswith("rw"):
            found.append((int(fields[0].split("-")[0], 16), fields[-1]))
    return found


def test_a_store_into_the_workers_own_memory_faults(oracle64: NativeOracle) -> None:
    # The worker write-protects its memory while the instruction runs, so a store that
    # misses the caller's pages cannot corrupt it: a #PF with W|U set in the error code
    # (P is set only if the page was ever touched), and si_code SEGV_ACCERR because a
    # mapping exists there. Then the worker runs the next case normally.
    oracle64.run(b"\x90", {}, {}, rip=CODE)  # make sure a worker is running
    targets = [start for start, name in _worker_writable_mappings(oracle64)
               if name.endswith(("[heap]", "[stack]", "(deleted)")) or "cpu_oracle" in name]
    assert targets
    for target in targets:
        result = oracle64.run(bytes.fromhex("488937"), {"rdi": target, "rsi": 2**64 - 1}, {},
                              rip=CODE)
        assert result.fault is not None, hex(target)
        assert result.fault.signal == signal.SIGSEGV and result.fault.si_code == 2
        assert result.fault.address == target and result.fault.error_code & 0b110 == 0b110
    after = oracle64.run(bytes.fromhex("488937"), {"rdi": DATA, "rsi": 3}, {DATA: page()},
                         rip=CODE)
    assert qword(after.pages[DATA], 0) == 3


def test_popf_setting_ac_is_reported_and_cleared(oracle64: NativeOracle) -> None:
    # 9D = POPFQ: pops AC|CF|bit 1 into RFLAGS (AC is settable at CPL 3; IF is not, with
    # IOPL 0, and stays 1). The next case must not run with alignment checking on.
    result = oracle64.run(b"\x9d", {"rsp": DATA + 0x100},
                          {DATA: page(o100=0x40000 | CF | ONE)}, rip=CODE)
    assert result.rflags_raw & (0x40000 | IF | CF) == 0x40000 | IF | CF
    assert result.rflags == CF | ONE and result.regs["rsp"] == DATA + 0x108
    after = oracle64.run(bytes.fromhex("488937"), {"rdi": DATA + 1, "rsi": 5}, {DATA: page()},
                         rip=CODE)
    assert after.outcome is Outcome.COMPLETED and after.pages[DATA][1] == 5


@pytest.mark.parametrize("bits", [64, 32])
@pytest.mark.parametrize("code", ["8ee0", "8ee8"])
def test_loading_fs_or_gs_does_not_break_the_helper(bits: int, code: str) -> None:
    # 8E E0 / 8E E8 = MOV fs/gs, eax with 0x2B (Linux's user data selector): glibc keeps
    # its TLS in FS (64-bit) or GS (32-bit); the handler restores both.
    oracle = _oracle_or_skip(bits)
    result = oracle.run(bytes.fromhex(code), {"rax": 0x2B}, {}, rip=CODE)
    assert result.outcome is Outcome.COMPLETED
    after = oracle.run(bytes.fromhex("8937"), {"rdi": DATA + 1, "rsi": 5}, {DATA: page()},
                       rip=CODE)
    assert after.outcome is Outcome.COMPLETED and after.pages[DATA][1] == 5


def _oracle_or_skip(bits: int) -> NativeOracle:
    try:
        return get_oracle(bits)
    except OracleUnavailable as exc:
        pytest.skip(str(exc))


# ---- 32-bit code -------------------------------------------------------------------


def test_32bit_helper_runs_32bit_code(oracle32: NativeOracle) -> None:
    # In 32-bit mode 48 is DEC eax (no REX prefixes): 5 - 1 = 4; ZF=SF=OF=AF=0, PF=0 (4 has
    # one bit set); CF is unaffected by DEC (starts 1).
    result = oracle32.run(b"\x48", {"rax": 5, "rflags": CF | ONE}, {}, rip=CODE)
    assert result.regs["rax"] == 4
    assert result.rflags == CF | ONE
    assert result.regs["rip"] == CODE + 1


def test_32bit_store(oracle32: NativeOracle) -> None:
    # 89 37 = MOV [edi], esi.
    result = oracle32.run(bytes.fromhex("8937"), {"rdi": DATA + 4, "rsi": 0xCAFE_BABE},
                          {DATA: page()}, rip=CODE)
    assert result.pages[DATA][:12] == bytes.fromhex("00000000bebafeca00000000")


def test_32bit_cmpxchg8b_match(oracle32: NativeOracle) -> None:
    # F0 0F C7 0F = LOCK CMPXCHG8B [edi]: edx:eax == m64, so ZF=1 and m64 = ecx:ebx.
    result = oracle32.run(bytes.fromhex("f00fc70f"),
                          {"rdi": DATA, "rax": 0x3333_4444, "rdx": 0x1111_2222,
                           "rbx": 0x7777_8888, "rcx": 0x5555_6666},
                          {DATA: page(o0=0x1111_2222_3333_4444)}, rip=CODE)
    assert qword(result.pages[DATA], 0) == 0x5555_6666_7777_8888
    assert result.rflags & ZF


def test_32bit_rejects_64bit_only_registers(oracle32: NativeOracle) -> None:
    with pytest.raises(OracleInputError, match="r8"):
        oracle32.run(b"\x90", {"r8": 1}, {}, rip=CODE)
    with pytest.raises(OracleInputError, match="rax"):
        oracle32.run(b"\x90", {"rax": 2**32}, {}, rip=CODE)


# ---- bad requests raise --------------------------------------------------------------


@pytest.mark.parametrize(
    ("regs", "pages", "match"),
    [
        ({"cr3": 1}, {}, "cr3"),
        ({"rax": -1}, {}, "rax"),
        ({"xmm0": 1, "ymm0": 2}, {}, "xmm0"),
        ({}, {DATA + 8: bytes(4096)}, "page"),
        ({}, {DATA: bytes(100)}, "page"),
        ({}, {CODE: bytes(4096)}, "overlaps the code"),
    ],
)
def test_bad_requests_raise(
    oracle64: NativeOracle, regs: dict[str, int], pages: dict[int, bytes], match: str
) -> None:
    with pytest.raises(OracleInputError, match=match):
        oracle64.run(b"\x90", regs, pages, rip=CODE)


def test_register_vocabulary() -> None:
    assert "r15" in native_register_names(64) and "r15" not in native_register_names(32)
    assert "ymm15" in native_register_names(64) and "ymm8" not in native_register_names(32)
    assert "fs_base" not in native_register_names(32)


# ---- properties: many cases, flags from their definitions ------------------------------


@settings(max_examples=300, deadline=None)
@given(offset=st.integers(0, 4096 - 8), value=st.integers(0, 2**64 - 1))
def test_mov_store_property(oracle64: NativeOracle, offset: int, value: int) -> None:
    result = oracle64.run(bytes.fromhex("488937"), {"rdi": DATA + offset, "rsi": value},
                          {DATA: page()}, rip=CODE)
    expected = bytearray(4096)
    expected[offset:offset + 8] = value.to_bytes(8, "little")
    assert result.pages[DATA] == bytes(expected)


def add_flags(a: int, b: int) -> int:
    """RFLAGS after ADD a, b (64-bit), from the flag definitions (SDM vol. 1, 3.4.3.1)."""
    res = (a + b) % 2**64
    flags = ONE
    flags |= CF if a + b >= 2**64 else 0
    flags |= PF if (res & 0xFF).bit_count() % 2 == 0 else 0
    flags |= AF if (a ^ b ^ res) & 0x10 else 0
    flags |= ZF if res == 0 else 0
    flags |= SF if res >> 63 else 0
    flags |= OF if (a >> 63) == (b >> 63) != (res >> 63) else 0
    return flags


@settings(max_examples=300, deadline=None)
@given(a=st.integers(0, 2**64 - 1), b=st.integers(0, 2**64 - 1))
def test_add_flags_property(oracle64: NativeOracle, a: int, b: int) -> None:
    result = oracle64.run(bytes.fromhex("4801d8"), {"rax": a, "rbx": b}, {}, rip=CODE)
    assert result.regs["rax"] == (a + b) % 2**64
    assert result.rflags == add_flags(a, b)
