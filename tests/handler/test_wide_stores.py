"""String, wide, vector and arithmetic stores (issue: every way an instruction
can store to a page table). Expected values by hand from the SDM vol. 2 pages."""

from __future__ import annotations

from ptemu.results import WriteRecord
from ptemu.status import EntryState, Status

RIP = 0xFFFFFFFF81001234
G = 0xFFFF888012345000  # page-table page GLA (direct map)
P = 0x12345000          # its GPA


def _records(result):
    return [(w.gpa, w.offset, w.size, w.value) for w in result.writes]


def test_rep_stosq_stops_at_page_end(make_guest):
    # 5 qwords from offset 0xff0: two fit; RCX 5 -> 3, RDI at the page end, RIP stays.
    guest = make_guest("4level")
    result = guest.write("f3 48 ab", {"rip": RIP, "rdi": G + 0xFF0, "rcx": 5, "rax": 0x1111},
                         G + 0xFF0, P + 0xFF0)
    assert _records(result) == [(P + 0xFF0, 0, 8, 0x1111), (P + 0xFF8, 0, 8, 0x1111)]
    assert result.regs == {"rcx": 3, "rdi": G + 0x1000}


def test_rep_stosq_downwards(make_guest):
    # DF=1: stores at 0x10, 0x08, 0x00, then RDI = 0x10 - 3*8; the count (5) is
    # not exhausted, so RIP stays; records in the guest's order, entries by address.
    guest = make_guest("4level")
    result = guest.write("f3 48 ab", {"rip": RIP, "rdi": G + 0x10, "rcx": 5, "rax": 0x2222,
                                      "rflags": 0x402}, G + 0x10, P + 0x10)
    assert _records(result) == [(P + 0x10, 0, 8, 0x2222), (P + 0x8, 0, 8, 0x2222),
                                (P, 0, 8, 0x2222)]
    assert [e.gpa for e in result.entries] == [P, P + 0x8, P + 0x10]
    assert result.regs == {"rcx": 2, "rdi": G - 8}


def test_rep_stos_exhausted_moves_rip(make_guest):
    # rep stosb x10 from 0x20: one full entry and two bytes of the next.
    guest = make_guest("4level")
    result = guest.write("f3 aa", {"rip": RIP, "rdi": G + 0x20, "rcx": 10, "rax": 0x33},
                         G + 0x20, P + 0x20)
    assert _records(result) == [(P + 0x20, 0, 8, 0x3333333333333333), (P + 0x28, 0, 2, 0x3333)]
    assert result.regs == {"rcx": 0, "rdi": G + 0x2A, "rip": RIP + 2}
    assert [e.state for e in result.entries] == [EntryState.COMPLETE, EntryState.PARTIAL]


def test_rep_stosw_and_stosd_32bit(make_guest):
    guest = make_guest("pae")
    result = guest.write("f3 ab", {"rip": 0xC1000000, "rdi": 0xC1234FF0, "rcx": 4, "rax": 0},
                         0xC1234FF0, 0x1234FF0, code_bits=32)
    assert _records(result) == [(0x1234FF0, 0, 8, 0), (0x1234FF8, 0, 8, 0)]
    assert result.regs == {"rcx": 0, "rdi": 0xC1235000, "rip": 0xC1000002}
    result = guest.write("66 f3 ab", {"rip": 0xC1000000, "rdi": 0xC1234FF0, "rcx": 1,
                                      "rax": 0xABCD}, 0xC1234FF0, 0x1234FF0, code_bits=32)
    assert _records(result) == [(0x1234FF0, 0, 2, 0xABCD)]


def _identity_tables(guest):
    """PML4[273] -> PDPT -> PD[1]: a 2 MiB page GLA 0xffff888000200000 -> GPA 0x200000."""
    guest.set_entry(0x1000 + 273 * 8, 0x2003)
    guest.set_entry(0x2000, 0x3003)
    guest.set_entry(0x3000 + 8, 0x200083)
    return {"cr3": 0x1000}


def test_rep_movsq_reads_source_through_guest_tables(make_guest):
    guest = make_guest("4level")
    regs = _identity_tables(guest)
    guest.set_entry(0x200000, 0xAAAA)
    guest.set_entry(0x200008, 0xBBBB)
    result = guest.write("f3 48 a5", {**regs, "rip": RIP, "rsi": 0xFFFF888000200000,
                                      "rdi": G + 0xFF0, "rcx": 5}, G + 0xFF0, P + 0xFF0)
    assert result.status is Status.EMULATED, result.reason
    assert _records(result) == [(P + 0xFF0, 0, 8, 0xAAAA), (P + 0xFF8, 0, 8, 0xBBBB)]
    assert result.regs == {"rcx": 3, "rdi": G + 0x1000, "rsi": 0xFFFF888000200010}


def test_movs_with_untranslatable_source_is_unsupported(make_guest):
    guest = make_guest("4level")
    result = guest.write("48 a5", {"rip": RIP, "cr3": 0x1000, "rsi": 0xFFFF888000200000,
                                   "rdi": G + 0xFF0}, G + 0xFF0, P + 0xFF0)
    assert result.status is Status.UNSUPPORTED


def test_cmpxchg16b_match_mismatch_misaligned(make_guest):
    # SDM CMPXCHG16B: RDX:RAX == m128 -> m128 := RCX:RBX, ZF=1; else RDX:RAX := m128.
    guest = make_guest("4level")
    regs = {"rip": RIP, "rdi": G + 0x40, "rax": 0, "rdx": 0, "rbx": 0x1067, "rcx": 0x2067}
    result = guest.write("f0 48 0f c7 0f", regs, G + 0x40, P + 0x40)
    assert _records(result) == [(P + 0x40, 0, 8, 0x1067), (P + 0x48, 0, 8, 0x2067)]
    assert result.regs == {"rip": RIP + 5, "rflags": 0x42}
    result = guest.write("f0 48 0f c7 0f", regs, G + 0x40, P + 0x40)
    assert _records(result) == [(P + 0x40, 0, 8, 0x1067), (P + 0x48, 0, 8, 0x2067)]
    assert result.regs == {"rip": RIP + 5, "rax": 0x1067, "rdx": 0x2067}
    # Not 16-byte aligned: #GP(0), nothing written (SDM: "the destination operand
    # must be 16-byte aligned").
    result = guest.write("f0 48 0f c7 0f", {**regs, "rdi": G + 0x48}, G + 0x48, P + 0x48)
    assert result.status is Status.FAULT and result.fault == "#GP(0)"
    assert result.writes == ()


def test_sse_stores(make_guest):
    guest = make_guest("4level")
    xmm = (0x5 << 64) | 0x6
    for code in ("0f 11 07", "66 0f 7f 07", "f3 0f 7f 07", "66 0f e7 07", "0f 29 07"):
        # movups, movdqa, movdqu, movntdq, movaps: 16 bytes, low qword first.
        result = guest.write(code, {"rip": RIP, "rdi": G + 0x60, "xmm0": xmm}, G + 0x60, P + 0x60)
        assert _records(result) == [(P + 0x60, 0, 8, 6), (P + 0x68, 0, 8, 5)], code
    result = guest.write("66 48 0f 7e 07", {"rip": RIP, "rdi": G + 0xA0, "xmm0": xmm},
                         G + 0xA0, P + 0xA0)  # movq r/m64, xmm
    assert _records(result) == [(P + 0xA0, 0, 8, 6)]
    result = guest.write("66 0f 7e 07", {"rip": RIP, "rdi": G + 0xA8, "xmm0": xmm},
                         G + 0xA8, P + 0xA8)  # movd r/m32, xmm
    assert _records(result) == [(P + 0xA8, 0, 4, 6)]
    # movdqa to an address that is not 16-byte aligned: #GP(0).
    result = guest.write("66 0f 7f 07", {"rip": RIP, "rdi": G + 0x68, "xmm0": xmm},
                         G + 0x68, P + 0x68)
    assert result.status is Status.FAULT


def test_avx_stores_store_the_register_bytes(make_guest):
    guest = make_guest("4level")
    ymm = (7 << 192) | (5 << 64) | 6
    result = guest.write("c5 fe 7f 07", {"rip": RIP, "rdi": G + 0x80, "ymm0": ymm},
                         G + 0x80, P + 0x80)  # vmovdqu [rdi], ymm0
    assert _records(result) == [(P + 0x80, 0, 8, 6), (P + 0x88, 0, 8, 5), (P + 0x90, 0, 8, 0),
                                (P + 0x98, 0, 8, 7)]
    assert result.regs == {"rip": RIP + 4}
    result = guest.write("c5 fa 7f 07", {"rip": RIP, "rdi": G + 0xC0, "ymm0": ymm},
                         G + 0xC0, P + 0xC0)  # vmovdqu [rdi], xmm0
    assert _records(result) == [(P + 0xC0, 0, 8, 6), (P + 0xC8, 0, 8, 5)]
    result = guest.write("c5 fd 7f 07", {"rip": RIP, "rdi": G + 0x90, "ymm0": ymm},
                         G + 0x90, P + 0x90)  # vmovdqa needs 32-byte alignment
    assert result.status is Status.FAULT


def test_movnti_xadd_and_arithmetic(make_guest):
    guest = make_guest("4level")
    result = guest.write("48 0f c3 37", {"rip": RIP, "rdi": G, "rsi": 0x67}, G, P)  # movnti
    assert _records(result) == [(P, 0, 8, 0x67)]
    # xadd [rdi], rsi: tmp = dst + src; src = dst; dst = tmp. 0x67 + 0x100.
    result = guest.write("f0 48 0f c1 37", {"rip": RIP, "rdi": G, "rsi": 0x100}, G, P)
    assert _records(result) == [(P, 0, 8, 0x167)]
    assert result.regs["rsi"] == 0x67
    # add qword [rdi], 0x20 (83 /0 ib): 0x167 + 0x20 = 0x187; low byte 0x87 has
    # four bits -> PF=1; AF: 7+0 no carry out of bit 3 -> 0.
    result = guest.write("f0 48 83 07 20", {"rip": RIP, "rdi": G}, G, P)
    assert guest.entry(P) == 0x187
    assert result.regs["rflags"] == 0x2 | 0x4
    # sub [rdi], rsi with rsi = 0x188: borrow -> CF=1, result all ones: SF=1, PF=1, AF=1.
    result = guest.write("48 29 37", {"rip": RIP, "rdi": G, "rsi": 0x188}, G, P)
    assert guest.entry(P) == 2**64 - 1
    assert result.regs["rflags"] == 0x2 | 0x1 | 0x4 | 0x10 | 0x80
    # inc leaves CF alone: CF=1 in, result 0 -> ZF PF AF, CF still 1.
    result = guest.write("48 ff 07", {"rip": RIP, "rdi": G, "rflags": 0x3}, G, P)
    assert guest.entry(P) == 0
    assert result.regs["rflags"] == 0x2 | 0x1 | 0x4 | 0x10 | 0x40
    # dec 0 -> all ones; not; neg.
    guest.write("48 ff 0f", {"rip": RIP, "rdi": G}, G, P)
    assert guest.entry(P) == 2**64 - 1
    guest.write("48 f7 17", {"rip": RIP, "rdi": G}, G, P)  # not
    assert guest.entry(P) == 0
    guest.set_entry(P, 5)
    result = guest.write("48 f7 1f", {"rip": RIP, "rdi": G}, G, P)  # neg: CF=1 (source != 0)
    assert guest.entry(P) == 2**64 - 5
    assert result.regs["rflags"] & 0x1 == 1
    # adc/sbb use CF in.
    guest.set_entry(P, 1)
    guest.write("48 11 37", {"rip": RIP, "rdi": G, "rsi": 1, "rflags": 0x3}, G, P)
    assert guest.entry(P) == 3
    guest.write("48 19 37", {"rip": RIP, "rdi": G, "rsi": 1, "rflags": 0x3}, G, P)
    assert guest.entry(P) == 1


def test_bit_offset_addresses_the_unit_that_holds_the_bit(make_guest):
    # bts [rdi], rsi with rsi = 64*600: the qword 600*8 = 0x12c0 bytes on, on the
    # next page. An event there is that write; an event at the operand base is
    # not a write of this instruction at all.
    guest = make_guest("4level")
    regs = {"rip": RIP, "rdi": G, "rsi": 64 * 600}
    result = guest.write("48 0f ab 37", regs, G + 0x12C0, 0x7000 + 0x2C0)
    assert result.writes == (WriteRecord(0x7000 + 0x2C0, 0, 8, 1, 0),)
    assert guest.entry(P) == 0
    result = guest.write("48 0f ab 37", regs, G, P)
    assert result.status is Status.REJECTED
    # Negative offsets address below the operand (bit -1 = bit 63 of the qword before).
    guest.set_entry(P + 0x100, 0)
    result = guest.write("48 0f ab 37", {"rip": RIP, "rdi": G + 0x108, "rsi": 2**64 - 1},
                         G + 0x100, P + 0x100)
    assert result.writes == (WriteRecord(P + 0x100, 0, 8, 1 << 63, 0),)
