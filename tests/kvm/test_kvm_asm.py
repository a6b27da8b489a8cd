"""The guest programs' encoder against Capstone, an independent decoder."""

from __future__ import annotations

import capstone
import pytest

from ptemu.kvm.asm import R12, R13, R15, RAX, RBP, RCX, RDI, RDX, RSI, RSP, Assembler
from ptemu.kvm.layout import GuestLayout
from ptemu.kvm.programs import stress_program


def _disassemble(bits: int, code: bytes) -> list[str]:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if bits == 64 else
                     capstone.CS_MODE_32)
    out = [f"{i.mnemonic} {i.op_str}".strip() for i in md.disasm(code, 0)]
    assert sum(len(i.bytes) for i in md.disasm(code, 0)) == len(code), "undecodable tail"
    return out


CASES_64 = [
    (lambda a: a.mov_store(8, RSI, RDI, 0), "mov qword ptr [rdi], rsi"),
    (lambda a: a.mov_store(4, RSI, RDI, 0x0C), "mov dword ptr [rdi + 0xc], esi"),
    (lambda a: a.mov_store(2, RSI, RDI, 0x12), "mov word ptr [rdi + 0x12], si"),
    (lambda a: a.mov_store(1, RSI, RDI, 0x17), "mov byte ptr [rdi + 0x17], sil"),
    (lambda a: a.mov_store(8, R12, R13, -8), "mov qword ptr [r13 - 8], r12"),
    (lambda a: a.mov_store(4, RAX, RBP, 0x200), "mov dword ptr [rbp + 0x200], eax"),
    (lambda a: a.mov_store_imm(8, RDI, 0x18, 0x80000063),
     "mov qword ptr [rdi + 0x18], 0xffffffff80000063"),
    (lambda a: a.mov_store_imm(4, RDI, 0x20, 0xABC067), "mov dword ptr [rdi + 0x20], 0xabc067"),
    (lambda a: a.mov_store_imm(2, RDI, 0x26, 0x8000), "mov word ptr [rdi + 0x26], 0x8000"),
    (lambda a: a.mov_store_imm(1, RDI, 0x28, 0x25), "mov byte ptr [rdi + 0x28], 0x25"),
    (lambda a: a.xchg(8, RSI, RDI, 0x30), "xchg qword ptr [rdi + 0x30], rsi"),
    (lambda a: a.cmpxchg(8, RSI, RDI, 0x38), "lock cmpxchg qword ptr [rdi + 0x38], rsi"),
    (lambda a: a.cmpxchg(4, RSI, RDI, 0x38, lock=False), "cmpxchg dword ptr [rdi + 0x38], esi"),
    (lambda a: a.cmpxchg8b(RDI, 0x48), "lock cmpxchg8b qword ptr [rdi + 0x48]"),
    (lambda a: a.logic("and", 8, RSI, RDI, 0x58), "lock and qword ptr [rdi + 0x58], rsi"),
    (lambda a: a.logic("or", 4, RSI, RDI, 0x60), "lock or dword ptr [rdi + 0x60], esi"),
    (lambda a: a.logic("xor", 1, RDX, RDI, 0x68), "lock xor byte ptr [rdi + 0x68], dl"),
    (lambda a: a.logic_imm8("and", 1, RDI, 0x60, 0xFD), "lock and byte ptr [rdi + 0x60], 0xfd"),
    (lambda a: a.bit_imm("bts", 8, RDI, 0x70, 63), "lock bts qword ptr [rdi + 0x70], 0x3f"),
    (lambda a: a.bit_imm("btr", 4, RDI, 0x70, 1), "lock btr dword ptr [rdi + 0x70], 1"),
    (lambda a: a.bit_imm("btc", 2, RDI, 0x74, 5), "lock btc word ptr [rdi + 0x74], 5"),
    (lambda a: a.bit_reg("bts", 8, RAX, RDI, 0x78), "lock bts qword ptr [rdi + 0x78], rax"),
    (lambda a: a.bit_reg("btr", 4, RAX, RDI, 0x7C), "lock btr dword ptr [rdi + 0x7c], eax"),
    (lambda a: a.bit_reg("btc", 8, RCX, RDI, 0), "lock btc qword ptr [rdi], rcx"),
    (lambda a: a.stos(8), "stosq qword ptr [rdi], rax"),
    (lambda a: a.stos(4), "stosd dword ptr [rdi], eax"),
    (lambda a: a.stos(2), "stosw word ptr [rdi], ax"),
    (lambda a: a.stos(1), "stosb byte ptr [rdi], al"),
    (lambda a: a.mov_imm(R12, 0x1122334455667788), "movabs r12, 0x1122334455667788"),
    (lambda a: a.shift("shr", RDI, 24, w=True), "shr rdi, 0x18"),
    (lambda a: a.alu_rr("and", RDI, R15, w=True), "and rdi, r15"),
    (lambda a: a.dec_mem(RBP, 8), "dec dword ptr [rbp + 8]"),
]


@pytest.mark.parametrize(("emit", "text"), CASES_64, ids=[text for _, text in CASES_64])
def test_64_bit_encodings(emit, text):
    a = Assembler(64)
    emit(a)
    assert _disassemble(64, a.assemble()) == [text]


CASES_32 = [
    (lambda a: a.mov_store(4, RSI, RDI, 8), "mov dword ptr [edi + 8], esi"),
    (lambda a: a.mov_store(1, RCX, RDI, 0x1F), "mov byte ptr [edi + 0x1f], cl"),
    (lambda a: a.cmpxchg8b(RDI, 0x38), "lock cmpxchg8b qword ptr [edi + 0x38]"),
    (lambda a: a.xchg(4, RSI, RDI, 0x28), "xchg dword ptr [edi + 0x28], esi"),
    (lambda a: a.stos(4), "stosd dword ptr es:[edi], eax"),
    (lambda a: a.mov_imm(RAX, 0xC0000000), "mov eax, 0xc0000000"),
]


@pytest.mark.parametrize(("emit", "text"), CASES_32, ids=[text for _, text in CASES_32])
def test_32_bit_encodings(emit, text):
    a = Assembler(32)
    emit(a)
    assert _disassemble(32, a.assemble()) == [text]


def test_branches_resolve_to_their_labels():
    a = Assembler(64)
    a.label("top")
    a.hlt()
    a.jnz("top")
    a.call("end")
    a.label("end")
    a.ret()
    assert _disassemble(64, a.assemble()) == ["hlt", "jne 0", "call 0xc", "ret"]


def test_encoder_refuses_what_it_cannot_encode():
    with pytest.raises(ValueError, match="SIB"):
        Assembler(64).mov_store(8, RAX, RSP, 0)
    with pytest.raises(ValueError, match="32-bit code"):
        Assembler(32).mov_store(8, RAX, RDI, 0)
    with pytest.raises(ValueError, match="undefined label"):
        a = Assembler(64)
        a.jmp("nowhere")
        a.assemble()


@pytest.mark.parametrize(("paging", "bits"), [("4level", 64), ("4level", 32), ("pae", 32)])
def test_stress_programs_decode_whole_and_cover_every_family(paging, bits):
    program = stress_program(GuestLayout.create(paging, bits), iterations=3)
    text = " ".join(_disassemble(bits, program.code))
    for mnemonic in ("mov", "xchg", "lock cmpxchg ", "lock cmpxchg8b", "lock and", "lock or",
                     "lock xor", "lock bts", "lock btr", "lock btc", "stosd", "stosw", "stosb"):
        assert mnemonic in text, mnemonic
    assert text.endswith("hlt")
