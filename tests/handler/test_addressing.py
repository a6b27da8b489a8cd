"""Address generation: every form the handler must resolve to the faulting GLA.

Expected addresses are computed by hand per SDM vol. 2, 2.1.5 (ModRM/SIB) and
vol. 3, 3.4 (segment bases; in 64-bit mode only FS and GS have one).
"""

from __future__ import annotations

from ptemu.results import WriteRecord
from ptemu.status import Status

RIP64 = 0xFFFFFFFF81001234
GLA64 = 0xFFFF888012345FF8
GPA64 = 0x12345FF8


def test_base_index_scale_disp8(make_guest):
    # 48 89 74 cf 10: mov [rdi + rcx*8 + 0x10], rsi
    guest = make_guest("4level")
    regs = {"rip": RIP64, "rdi": GLA64 - 0x10 - 8 * 3, "rcx": 3, "rsi": 0x67}
    result = guest.write("48 89 74 cf 10", regs, GLA64, GPA64)
    assert result.writes == (WriteRecord(GPA64, 0, 8, 0x67, 0),)


def test_base_index_disp32(make_guest):
    # 48 89 b4 8f 00 01 00 00: mov [rdi + rcx*4 + 0x100], rsi
    guest = make_guest("4level")
    regs = {"rip": RIP64, "rdi": GLA64 - 0x100 - 4 * 2, "rcx": 2, "rsi": 0x67}
    assert guest.write("48 89 b4 8f 00 01 00 00", regs, GLA64, GPA64).status is Status.EMULATED


def test_disp32_alone_in_32bit_code(make_guest):
    # 89 15 f8 4f 23 c1: mov [0xc1234ff8], edx (ModRM mod=00 rm=101 in 32-bit code)
    guest = make_guest("legacy")
    result = guest.write("89 15 f8 4f 23 c1", {"rip": 0xC1001234, "rdx": 0x1063},
                         0xC1234FF8, 0x1234FF8, code_bits=32)
    assert result.writes == (WriteRecord(0x1234FF8, 0, 4, 0x1063, 0),)


def test_disp32_alone_in_64bit_code_uses_sib(make_guest):
    # 48 89 34 25 f8 5f 34 12: mov [0x12345ff8], rsi (SIB, no base, no index)
    guest = make_guest("4level")
    result = guest.write("48 89 34 25 f8 5f 34 12", {"rip": RIP64, "rsi": 0x67},
                         0x12345FF8, 0x12345FF8)
    assert result.status is Status.EMULATED


def test_rip_relative(make_guest):
    # 48 89 35 <disp32>: mov [rip + disp], rsi; RIP is that of the next instruction.
    guest = make_guest("4level")
    next_rip = RIP64 + 7
    disp = (GLA64 - next_rip) & 0xFFFFFFFF
    if disp >= 1 << 31:  # must fit a signed disp32: pick a GLA near the code instead
        gla = next_rip + 0x1000
        disp = 0x1000
    else:
        gla = GLA64
    code = "48 89 35 " + disp.to_bytes(4, "little").hex(" ")
    gpa = 0x5000 + (gla & 0xFFF)
    result = guest.write(code, {"rip": RIP64, "rsi": 0x67}, gla, gpa)
    assert result.status is Status.EMULATED
    assert result.writes[0].gpa == gpa - (gpa % 8)


def test_16bit_addressing(make_guest):
    # 16-bit code: 89 40 10 = mov [bx + si + 0x10], ax, DS base 0xc1200000.
    guest = make_guest("legacy")
    regs = {"rip": 0x1234, "cs_base": 0xC1000000, "ds_base": 0xC1200000, "rbx": 0x4FE0,
            "rsi": 0x8, "rax": 0xBEEF}
    gla = 0xC1200000 + 0x4FE0 + 0x8 + 0x10
    result = guest.write("89 40 10", regs, gla, 0x7FF8, code_bits=16)
    assert result.writes == (WriteRecord(0x7FF8, 0, 2, 0xBEEF, 0),)
    assert result.regs == {"rip": 0x1237}


def test_16bit_bp_defaults_to_ss(make_guest):
    # [bp + di] uses SS (SDM vol. 1, 3.7.5 / table 3-5).
    guest = make_guest("legacy")
    regs = {"rip": 0x100, "ss_base": 0x00500000, "ds_base": 0x00900000, "rbp": 0xFF0,
            "rdi": 0x8, "rax": 0x1234}
    result = guest.write("89 03", regs, 0x00500FF8, 0x3FF8, code_bits=16)
    assert result.status is Status.EMULATED


def test_fs_gs_overrides_with_nonzero_base(make_guest):
    # 64-bit: 65 48 89 34 25 f8 0f 00 00 = mov gs:[0xff8], rsi; GS base counts.
    guest = make_guest("5level")
    gla = 0xFF11000012345FF8
    result = guest.write("65 48 89 34 25 f8 0f 00 00",
                         {"rip": RIP64, "gs_base": 0xFF11000012345000, "rsi": 0x67}, gla, GPA64)
    assert result.writes == (WriteRecord(GPA64, 0, 8, 0x67, 0),)
    # 32-bit: 64 89 10 = mov fs:[eax], edx; FS base 0x10000000 + 0xb1234ff8.
    guest = make_guest("pae")
    result = guest.write("64 89 10", {"rip": 0xC1001234, "fs_base": 0x10000000,
                                      "rax": 0xB1234FF8, "rdx": 0x5}, 0xC1234FF8, 0x1234FF8,
                         code_bits=32)
    assert result.writes == (WriteRecord(0x1234FF8, 0, 4, 0x5, 0),)


def test_64bit_ignores_ds_base(make_guest):
    # In 64-bit mode DS/ES/SS bases are treated as 0 (SDM vol. 3, 3.4.4).
    guest = make_guest("4level")
    result = guest.write("48 89 37", {"rip": RIP64, "rdi": GLA64, "rsi": 1,
                                      "ds_base": 0x1000}, GLA64, GPA64)
    assert result.status is Status.EMULATED


def test_address_size_prefix_truncates(make_guest):
    # 67 89 37 in 64-bit code: mov [edi], esi: the address is EDI, zero-extended.
    guest = make_guest("4level")
    result = guest.write("67 89 37", {"rip": RIP64, "rdi": 0xFFFFFFFF_00345FF8, "rsi": 7},
                         0x00345FF8, 0x12345FF8)
    assert result.writes == (WriteRecord(0x12345FF8, 0, 4, 7, 0),)


def test_operand_size_prefix_in_32bit_code(make_guest):
    # 66 89 10 in 32-bit code: mov [eax], dx (2 bytes).
    guest = make_guest("legacy")
    result = guest.write("66 89 10", {"rip": 0xC1001234, "rax": 0xC1234FF8, "rdx": 0xABCD1234},
                         0xC1234FF8, 0x1234FF8, code_bits=32)
    assert result.writes == (WriteRecord(0x1234FF8, 0, 2, 0x1234, 0),)
