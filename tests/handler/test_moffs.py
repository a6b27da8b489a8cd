"""MOV moffs (A2/A3) and the other exactness classes of issue 11, hand-derived.

Every expectation here is worked out from the Intel SDM vol. 2 ("MOV" with
the moffs forms, 2.2.1.3 on 64-bit direct memory offsets, 2.1.1 on prefixes;
vol. 1, 3.3.7 and 3.6.1 on address and operand sizes; vol. 3, 3.4.4 on
segment bases in 64-bit mode) and written in the test, never read back from
ptemu. `make_guest` runs each case with both engines.

moffs: the address is an immediate of the *address* size, with no ModRM:
8 bytes in 64-bit code (4 with 67, zero-extended), 4 in 32-bit code (2 with
67), 2 in 16-bit code (4 with 67). A segment override applies (in 64-bit code
only FS/GS have a base). The operand is AL (A2) or AX/EAX/RAX (A3) by 66 and
REX.W. A0/A1 are loads: they store nothing.
"""

from __future__ import annotations

import pytest

from ptemu.results import WriteRecord
from ptemu.status import Status

RIP64 = 0xFFFFFFFF81001234
VALUE = 0x8000000012345067


def _moffs(address: int, size: int) -> str:
    return address.to_bytes(size, "little").hex(" ")


@pytest.mark.parametrize(("prefixes", "size", "value"), [
    ("48", 8, VALUE),               # movabs [moffs64], rax
    ("", 4, VALUE & 0xFFFFFFFF),    # [moffs64], eax
    ("66", 2, 0x5067),              # [moffs64], ax
    ("4c", 8, VALUE),               # REX.WR: R means nothing without ModRM
    ("66 48", 8, VALUE),            # REX.W wins over 66
    ("f3 48", 8, VALUE),            # F3 ignored
])
def test_a3_with_a_64bit_address(make_guest, prefixes, size, value):
    gla = 0xFFFF888012345FF8
    guest = make_guest("4level")
    code = f"{prefixes} a3 {_moffs(gla, 8)}"
    result = guest.write(code, {"rip": RIP64, "rax": VALUE}, gla, 0x5FF8)
    assert result.status is Status.EMULATED, result.reason
    assert result.writes == (WriteRecord(0x5FF8, 0, size, value, 0),)
    assert guest.entry(0x5FF8) == value
    length = len(bytes.fromhex(code.replace(" ", "")))
    assert result.regs == {"rip": RIP64 + length}  # nothing else, flags included


def test_a2_stores_al(make_guest):
    gla = 0xFFFF888012345FFB
    guest = make_guest("4level")
    result = guest.write(f"a2 {_moffs(gla, 8)}", {"rip": RIP64, "rax": 0x1234}, gla, 0x5FFB)
    assert result.writes == (WriteRecord(0x5FF8, 3, 1, 0x34, 0),)


def test_57bit_address_under_5level_paging(make_guest):
    # LA57: bits 63:57 copy bit 56. 0xff11000012345ff8 is canonical there.
    gla = 0xFF11000012345FF8
    guest = make_guest("5level")
    result = guest.write(f"48 a3 {_moffs(gla, 8)}", {"rip": 0xFF11000081000000,
                                                     "rax": VALUE}, gla, 0x5FF8)
    assert result.writes == (WriteRecord(0x5FF8, 0, 8, VALUE, 0),)
    assert result.regs == {"rip": 0xFF11000081000000 + 10}


def test_fs_and_gs_bases_in_64bit_code(make_guest):
    guest = make_guest("5level")
    # gs:[0x345ff8] with GS base 0xff11000012000000.
    regs = {"rip": RIP64, "rax": VALUE, "gs_base": 0xFF11000012000000}
    result = guest.write(f"65 48 a3 {_moffs(0x345FF8, 8)}", regs, 0xFF11000012345FF8, 0x5FF8)
    assert result.writes == (WriteRecord(0x5FF8, 0, 8, VALUE, 0),)
    # The sum wraps at 64 bits: fs:[0x...] with the base making it overflow.
    guest = make_guest("4level")
    regs = {"rip": RIP64, "rax": 7, "fs_base": 0xFFFF888000000000}
    result = guest.write(f"64 a3 {_moffs(0x12345FF8, 8)}", regs, 0xFFFF888012345FF8, 0x5FF8)
    assert result.writes == (WriteRecord(0x5FF8, 0, 4, 7, 0),)


def test_null_override_after_fs_does_not_cancel_it(make_guest):
    # 64 26 a3: ES is a null prefix in 64-bit code, FS counts (checked on the host CPU
    # by test_prefix_fuzz).
    guest = make_guest("4level")
    regs = {"rip": RIP64, "rax": 7, "fs_base": 0x10000}
    result = guest.write(f"64 26 a3 {_moffs(0x12345FF8, 8)}", regs, 0x12355FF8, 0x5FF8)
    assert result.writes == (WriteRecord(0x5FF8, 0, 4, 7, 0),)
    # ES/DS overrides alone: base 0 in 64-bit code even if the caller gives one.
    guest = make_guest("4level")
    regs = {"rip": RIP64, "rax": 7, "es_base": 0x10000, "ds_base": 0x20000}
    result = guest.write(f"26 a3 {_moffs(0x12345FF8, 8)}", regs, 0x12345FF8, 0x5FF8)
    assert result.status is Status.EMULATED


def test_address_size_prefix_in_64bit_code(make_guest):
    # 67 a3 <moffs32>: a 4-byte address, zero-extended (not sign-extended).
    guest = make_guest("4level")
    result = guest.write(f"67 a3 {_moffs(0x92345FF8, 4)}", {"rip": RIP64, "rax": VALUE},
                         0x92345FF8, 0x5FF8)
    assert result.writes == (WriteRecord(0x5FF8, 0, 4, 0x12345067, 0),)
    assert result.regs == {"rip": RIP64 + 6}
    # With REX.W and GS: gs base + zero-extended 32-bit offset.
    guest = make_guest("4level")
    regs = {"rip": RIP64, "rax": VALUE, "gs_base": 0xFFFF888000000000}
    result = guest.write(f"65 67 48 a3 {_moffs(0x92345FF8, 4)}", regs, 0xFFFF888092345FF8,
                         0x5FF8)
    assert result.writes == (WriteRecord(0x5FF8, 0, 8, VALUE, 0),)
    assert result.regs == {"rip": RIP64 + 8}


def test_32bit_code_forms(make_guest):
    guest = make_guest("pae")
    result = guest.write(f"a3 {_moffs(0xC1234FF8, 4)}", {"rip": 0xC1001000, "rax": 0x1063},
                         0xC1234FF8, 0x1234FF8, code_bits=32)
    assert result.writes == (WriteRecord(0x1234FF8, 0, 4, 0x1063, 0),)
    assert result.regs == {"rip": 0xC1001005}
    # 66: AX. 67: a 2-byte address, DS base added after it (0x10000000 + 0x5ffc).
    guest = make_guest("pae")
    regs = {"rip": 0xC1001000, "rax": 0xABCD, "ds_base": 0x10000000}
    result = guest.write(f"67 66 a3 {_moffs(0x5FFC, 2)}", regs, 0x10005FFC, 0x1234FFC,
                         code_bits=32)
    assert result.writes == (WriteRecord(0x1234FF8, 4, 2, 0xABCD, 0),)
    assert result.regs == {"rip": 0xC1001005}
    # FS base + offset wraps at 4 GiB: 0xf0000000 + 0x12345ff8 = 0x2345ff8.
    guest = make_guest("pae")
    regs = {"rip": 0xC1001000, "rax": 5, "fs_base": 0xF0000000}
    result = guest.write(f"64 a3 {_moffs(0x12345FF8, 4)}", regs, 0x02345FF8, 0x1234FF8,
                         code_bits=32)
    assert result.writes == (WriteRecord(0x1234FF8, 0, 4, 5, 0),)


def test_16bit_code_forms(make_guest):
    # Default: 2-byte address and AX; DS base added.
    guest = make_guest("legacy")
    regs = {"rip": 0x100, "rax": 0x12345678, "ds_base": 0xC1200000}
    result = guest.write(f"a3 {_moffs(0x4FF8, 2)}", regs, 0xC1204FF8, 0x7FF8, code_bits=16)
    assert result.writes == (WriteRecord(0x7FF8, 0, 2, 0x5678, 0),)
    assert result.regs == {"rip": 0x103}
    # 67: a 4-byte address; 66: EAX.
    guest = make_guest("legacy")
    result = guest.write(f"67 66 a3 {_moffs(0x12344FF8, 4)}", regs, 0xD3544FF8, 0x7FF8,
                         code_bits=16)
    assert result.writes == (WriteRecord(0x7FF8, 0, 4, 0x12345678, 0),)
    assert result.regs == {"rip": 0x107}


def test_loads_are_not_stores(make_guest):
    guest = make_guest("4level")
    for opcode in ("a0", "a1", "48 a1"):
        result = guest.write(f"{opcode} {_moffs(0xFFFF888012345FF8, 8)}", {"rip": RIP64},
                             0xFFFF888012345FF8, 0x5FF8)
        assert result.status is Status.UNSUPPORTED, opcode
    assert guest.entry(0x5FF8) == 0


def test_moffs_elsewhere_is_rejected_and_lock_is_refused(make_guest):
    guest = make_guest("4level")
    result = guest.write(f"48 a3 {_moffs(0xFFFF888012345FF0, 8)}", {"rip": RIP64, "rax": 1},
                         0xFFFF888012345FF8, 0x5FF8)
    assert result.status is Status.REJECTED
    result = guest.write(f"f0 48 a3 {_moffs(0xFFFF888012345FF8, 8)}", {"rip": RIP64, "rax": 1},
                         0xFFFF888012345FF8, 0x5FF8)
    assert result.status is not Status.EMULATED  # LOCK MOV: #UD
    assert guest.entry(0x5FF8) == 0


# -- operand size under F2/F3, bit-base wrap, EVEX, Unicorn errata -------------------------


@pytest.mark.parametrize(("code", "code_bits", "paging"), [
    ("66 f3 0f ba 2f 17", 64, "4level"),
    ("66 f3 0f ba 2f 17", 32, "pae"),
    ("f3 0f ba 2d 17", 16, "pae"),       # [di] in 16-bit code
    ("f2 66 0f ba 2f 17", 64, "4level"),
])
def test_word_bts_under_f2_f3(make_guest, code, code_bits, paging):
    # A word BTS: bit 23 mod 16 = bit 7 of the word at the destination.
    guest = make_guest(paging)
    regs = {"rip": 0x1000, "rdi": 0x4FF8}
    result = guest.write(code, regs, 0x4FF8, 0x4FF8, code_bits=code_bits)
    assert result.status is Status.EMULATED, result.reason
    assert result.writes == (WriteRecord(0x4FF8, 0, 2, 0x80, 0),)
    assert guest.entry(0x4FF8) == 0x80


@pytest.mark.parametrize(("code", "size"), [
    ("f2 f0 66 0f b1 37", 2),   # XACQUIRE LOCK CMPXCHG word
    ("66 f3 f0 0f c1 37", 2),   # XRELEASE LOCK XADD word
    ("f3 66 0f ab 37", 2),      # BTS word, register offset 0
    ("f2 f0 0f b1 37", 4),
    ("f2 f0 48 0f b1 37", 8),
])
def test_hle_prefixes_keep_the_operand_size(make_guest, code, size):
    guest = make_guest("4level")
    guest.set_entry(0x5FF8, 0x1111111111111111)
    regs = {"rip": RIP64, "rdi": 0xFFFF888012345FF8, "rsi": 0, "rax": 0x1111111111111111}
    result = guest.write(code, regs, 0xFFFF888012345FF8, 0x5FF8)
    assert result.status is Status.EMULATED, result.reason
    assert [record.size for record in result.writes] == [size]


def test_bit_base_wraps_at_the_address_size(make_guest):
    # 67 0f ab 07 in 64-bit code: bts [edi], eax with EDI = 0, EAX = -32: the
    # dword at EDI + 4 * (-32 >> 5) = -4, wrapped at 32 bits: 0xfffffffc
    # (as the host CPU does).
    guest = make_guest("4level")
    regs = {"rip": RIP64, "rdi": 0, "rax": (-32) & (2**64 - 1)}
    result = guest.write("67 0f ab 07", regs, 0xFFFFFFFC, 0x5FFC)
    assert result.status is Status.EMULATED, result.reason
    assert result.writes == (WriteRecord(0x5FF8, 4, 4, 1, 0),)
    # 16-bit code: [bx] with BX = 0 and AX = -16 (word BTS): offset -2 wraps to
    # 0xfffe within 64 KiB, then DS base 0x10000 is added: 0x1fffe.
    guest = make_guest("pae")
    regs = {"rip": 0x100, "rbx": 0, "rax": 0xFFF0, "ds_base": 0x10000}
    result = guest.write("0f ab 07", regs, 0x1FFFE, 0x5FFE, code_bits=16)
    assert result.status is Status.EMULATED, result.reason
    assert result.writes == (WriteRecord(0x5FF8, 6, 2, 1, 0),)


def test_masked_evex_store_is_refused(make_guest):
    guest = make_guest("4level")
    regs = {"rip": RIP64, "rdi": 0xFFFF888012345FF0, "xmm0": (1 << 128) - 1}
    for code in ("62 f1 7c 09 11 07",    # vmovups [rdi]{k1}, xmm0
                 "62 f1 7c 89 11 07"):   # with zeroing too
        result = guest.write(code, regs, 0xFFFF888012345FF0, 0x5FF0)
        assert result.status is Status.UNSUPPORTED, code
    assert guest.entry(0x5FF0, 16) == 0
    # Unmasked EVEX: an ordinary 16-byte store.
    result = guest.write("62 f1 7c 08 11 07", regs, 0xFFFF888012345FF0, 0x5FF0)
    assert result.status is Status.EMULATED, result.reason
    assert guest.entry(0x5FF0, 16) == (1 << 128) - 1


@pytest.mark.parametrize(("old", "result_value", "flags"), [
    # NEG: CF = (old != 0); SF, ZF, PF, AF, OF from the result 0 - old (SDM "NEG").
    (0x0000000000000001, 0xFFFFFFFFFFFFFFFF, 0x1 | 0x4 | 0x10 | 0x80),
    (0xFFFFFFFFFFFFFFFF, 0x0000000000000001, 0x1 | 0x10),
    (0x8000000000000000, 0x8000000000000000, 0x1 | 0x4 | 0x80 | 0x800),
    (0, 0, 0x4 | 0x40),
])
def test_lock_neg_flags_come_from_the_result(make_guest, old, result_value, flags):
    guest = make_guest("4level")
    guest.set_entry(0x5FF8, old)
    result = guest.write("f0 48 f7 1f", {"rip": RIP64, "rdi": 0xFFFF888012345FF8,
                                         "rflags": 0x2}, 0xFFFF888012345FF8, 0x5FF8)
    assert guest.entry(0x5FF8) == result_value
    assert result.regs.get("rflags", 0x2) == 0x2 | flags


def test_rex_r_on_a_mov_immediate_store(make_guest):
    # 4c c6 07 01: REX.WR on C6 /0; R extends an opcode extension and is ignored.
    guest = make_guest("4level")
    result = guest.write("4c c6 07 01", {"rip": RIP64, "rdi": 0xFFFF888012345FF8},
                         0xFFFF888012345FF8, 0x5FF8)
    assert result.writes == (WriteRecord(0x5FF8, 0, 1, 1, 0),)
    result = guest.write("4c c7 07 ff ff ff ff", {"rip": RIP64, "rdi": 0xFFFF888012345FF8},
                         0xFFFF888012345FF8, 0x5FF8)
    assert result.writes == (WriteRecord(0x5FF8, 0, 8, 2**64 - 1, 1),)
