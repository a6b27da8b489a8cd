"""A very small x86 encoder for the guest programs the KVM runner builds.

Only the forms the guest programs need: register and ``[base + disp]``
memory operands (no SIB, so the base is never RSP/R12), immediates, and
rel32 branches to labels. Encodings follow the SDM vol. 2 opcode tables;
tests/kvm checks each one against Capstone. Registers are numbered as in
ModRM/REX (0 = rAX, 1 = rCX, 2 = rDX, 3 = rBX, 4 = rSP, 5 = rBP, 6 = rSI,
7 = rDI, 8..15 = R8..R15).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)
R8, R9, R10, R11, R12, R13, R14, R15 = range(8, 16)

LOCK = b"\xf0"
OPSIZE = b"\x66"


def _rex(*, w: bool, reg: int, base: int, force: bool) -> bytes:
    value = 0x40 | (8 if w else 0) | (4 if reg & 8 else 0) | (1 if base & 8 else 0)
    return bytes([value]) if value != 0x40 or force else b""


@dataclass
class Assembler:
    """Emits one code blob for `bits` (32 or 64) with labels and rel32 fixups."""

    bits: int
    code: bytearray = field(default_factory=bytearray)
    labels: dict[str, int] = field(default_factory=dict)
    fixups: list[tuple[int, str]] = field(default_factory=list)

    def _check(self, *regs: int, w: bool = False) -> None:
        if self.bits == 32 and (w or any(r >= 8 for r in regs)):
            raise ValueError("REX.W or R8-R15 in 32-bit code")

    def _prefix(self, *, w: bool, reg: int, base: int, byte_reg: bool = False) -> bytes:
        self._check(reg, base, w=w)
        # SPL/BPL/SIL/DIL need a REX prefix; without one 4..7 mean AH/CH/DH/BH.
        force = self.bits == 64 and byte_reg and 4 <= reg < 8
        return _rex(w=w, reg=reg, base=base, force=force) if self.bits == 64 else b""

    def mem(self, opcode: bytes, reg: int, base: int, disp: int = 0, *, w: bool = False,
            prefixes: bytes = b"", imm: bytes = b"", byte_reg: bool = False) -> None:
        """``opcode`` with ModRM ``reg`` and memory ``[base + disp]``, then `imm`."""
        if base & 7 == RSP:
            raise ValueError("base RSP/R12 needs a SIB byte, which this encoder does not emit")
        rex = self._prefix(w=w, reg=reg, base=base, byte_reg=byte_reg)
        if -128 <= disp <= 127:
            modrm, tail = 0x40, struct.pack("<b", disp)
        else:
            modrm, tail = 0x80, struct.pack("<i", disp)
        modrm |= (reg & 7) << 3 | (base & 7)
        self.code += prefixes + rex + opcode + bytes([modrm]) + tail + imm

    def regreg(self, opcode: bytes, reg: int, rm: int, *, w: bool = False,
               imm: bytes = b"") -> None:
        """``opcode`` with ModRM mod=11: ``reg`` and register ``rm``."""
        rex = self._prefix(w=w, reg=reg, base=rm)
        self.code += rex + opcode + bytes([0xC0 | (reg & 7) << 3 | (rm & 7)]) + imm

    # -- plain instructions -----------------------------------------------------

    def mov_imm(self, reg: int, value: int) -> None:
        """``mov reg, imm`` (imm64 with REX.W in 64-bit code, imm32 otherwise)."""
        if self.bits == 64:
            self.code += _rex(w=True, reg=0, base=reg, force=True) + bytes([0xB8 | reg & 7])
            self.code += struct.pack("<Q", value & (2**64 - 1))
        else:
            self._check(reg)
            self.code += bytes([0xB8 | reg]) + struct.pack("<I", value & 0xFFFFFFFF)

    def mov_rr(self, dst: int, src: int, *, w: bool = False) -> None:
        """``mov dst, src``."""
        self.regreg(b"\x89", src, dst, w=w)

    def load(self, dst: int, base: int, disp: int = 0, *, w: bool = False) -> None:
        """``mov dst, [base + disp]``."""
        self.mem(b"\x8b", dst, base, disp, w=w)

    def alu_rr(self, op: str, dst: int, src: int, *, w: bool = False) -> None:
        """``add/or/and/sub/xor dst, src``."""
        opcode = {"add": 0x01, "or": 0x09, "and": 0x21, "sub": 0x29, "xor": 0x31}[op]
        self.regreg(bytes([opcode]), src, dst, w=w)

    def alu_ri(self, op: str, dst: int, value: int, *, w: bool = False) -> None:
        """``add/or/and/sub/xor dst, imm32``."""
        ext = {"add": 0, "or": 1, "and": 4, "sub": 5, "xor": 6}[op]
        self.regreg(b"\x81", ext, dst, w=w, imm=struct.pack("<I", value & 0xFFFFFFFF))

    def shift(self, op: str, dst: int, count: int, *, w: bool = False) -> None:
        """``rol/ror/shl/shr dst, imm8``."""
        ext = {"rol": 0, "ror": 1, "shl": 4, "shr": 5}[op]
        self.regreg(b"\xc1", ext, dst, w=w, imm=bytes([count]))

    def not_(self, dst: int, *, w: bool = False) -> None:
        self.regreg(b"\xf7", 2, dst, w=w)

    def dec_mem(self, base: int, disp: int = 0, *, w: bool = False) -> None:
        """``dec dword/qword [base + disp]``."""
        self.mem(b"\xff", 1, base, disp, w=w)

    def store(self, src: int, base: int, disp: int = 0, *, w: bool = False) -> None:
        """``mov [base + disp], src`` (32/64-bit)."""
        self.mem(b"\x89", src, base, disp, w=w)

    # -- the store families the handler emulates (size = 1, 2, 4 or 8 bytes) --

    def _sized(self, size: int, byte_opcode: bytes, opcode: bytes) -> tuple[bytes, bytes, bool]:
        """(prefixes, opcode, REX.W) of an instruction whose operand size is `size`."""
        if size == 1:
            return b"", byte_opcode, False
        if size == 2:
            return OPSIZE, opcode, False
        if size == 4:
            return b"", opcode, False
        if size == 8:
            return b"", opcode, True
        raise ValueError(f"operand size {size} is not 1, 2, 4 or 8")

    def mov_store(self, size: int, src: int, base: int, disp: int = 0) -> None:
        """``mov [base + disp], src`` (88/89 /r)."""
        prefixes, opcode, w = self._sized(size, b"\x88", b"\x89")
        self.mem(opcode, src, base, disp, w=w, prefixes=prefixes, byte_reg=size == 1)

    def mov_store_imm(self, size: int, base: int, disp: int, value: int) -> None:
        """``mov [base + disp], imm`` (C6 /0 ib, C7 /0 iw/id; imm32 sign-extended for 8)."""
        prefixes, opcode, w = self._sized(size, b"\xc6", b"\xc7")
        imm_size = {1: "<B", 2: "<H", 4: "<I", 8: "<I"}[size]
        imm = struct.pack(imm_size, value & ((1 << (8 * min(size, 4))) - 1))
        self.mem(opcode, 0, base, disp, w=w, prefixes=prefixes, imm=imm)

    def xchg(self, size: int, reg: int, base: int, disp: int = 0) -> None:
        """``xchg [base + disp], reg`` (86/87 /r, locked without a prefix)."""
        prefixes, opcode, w = self._sized(size, b"\x86", b"\x87")
        self.mem(opcode, reg, base, disp, w=w, prefixes=prefixes, byte_reg=size == 1)

    def cmpxchg(self, size: int, reg: int, base: int, disp: int = 0, *, lock: bool = True) -> None:
        """``[lock] cmpxchg [base + disp], reg`` (0F B0/B1 /r)."""
        prefixes, opcode, w = self._sized(size, b"\x0f\xb0", b"\x0f\xb1")
        self.mem(opcode, reg, base, disp, w=w, prefixes=(LOCK if lock else b"") + prefixes,
                 byte_reg=size == 1)

    def xadd(self, size: int, reg: int, base: int, disp: int = 0, *, lock: bool = True) -> None:
        """``[lock] xadd [base + disp], reg`` (0F C0/C1 /r)."""
        prefixes, opcode, w = self._sized(size, b"\x0f\xc0", b"\x0f\xc1")
        self.mem(opcode, reg, base, disp, w=w, prefixes=(LOCK if lock else b"") + prefixes,
                 byte_reg=size == 1)

    def cmpxchg8b(self, base: int, disp: int = 0, *, lock: bool = True) -> None:
        """``[lock] cmpxchg8b [base + disp]`` (0F C7 /1)."""
        self.mem(b"\x0f\xc7", 1, base, disp, prefixes=LOCK if lock else b"")

    def logic(self, op: str, size: int, src: int, base: int, disp: int = 0, *,
              lock: bool = True) -> None:
        """``[lock] and/or/xor [base + disp], src`` (20/21, 08/09, 30/31 /r)."""
        byte_opcode = {"and": 0x20, "or": 0x08, "xor": 0x30}[op]
        prefixes, opcode, w = self._sized(size, bytes([byte_opcode]), bytes([byte_opcode + 1]))
        self.mem(opcode, src, base, disp, w=w, prefixes=(LOCK if lock else b"") + prefixes,
                 byte_reg=size == 1)

    def logic_imm8(self, op: str, size: int, base: int, disp: int, value: int, *,
                   lock: bool = True) -> None:
        """``[lock] and/or/xor [base + disp], imm8`` (80 /n ib; 83 /n ib sign-extended)."""
        ext = {"and": 4, "or": 1, "xor": 6}[op]
        prefixes, opcode, w = self._sized(size, b"\x80", b"\x83")
        self.mem(opcode, ext, base, disp, w=w, prefixes=(LOCK if lock else b"") + prefixes,
                 imm=bytes([value & 0xFF]))

    def bit_imm(self, op: str, size: int, base: int, disp: int, bit: int, *,
                lock: bool = True) -> None:
        """``[lock] bts/btr/btc [base + disp], imm8`` (0F BA /5 /6 /7 ib); size 2, 4 or 8."""
        ext = {"bts": 5, "btr": 6, "btc": 7}[op]
        prefixes, opcode, w = self._sized(size, b"", b"\x0f\xba")
        if size == 1:
            raise ValueError("bit tests have no byte form")
        self.mem(opcode, ext, base, disp, w=w, prefixes=(LOCK if lock else b"") + prefixes,
                 imm=bytes([bit]))

    def bit_reg(self, op: str, size: int, offset_reg: int, base: int, disp: int = 0, *,
                lock: bool = True) -> None:
        """``[lock] bts/btr/btc [base + disp], reg`` (0F AB / B3 / BB /r); size 2, 4 or 8."""
        second = {"bts": 0xAB, "btr": 0xB3, "btc": 0xBB}[op]
        prefixes, opcode, w = self._sized(size, b"", bytes([0x0F, second]))
        if size == 1:
            raise ValueError("bit tests have no byte form")
        self.mem(opcode, offset_reg, base, disp, w=w,
                 prefixes=(LOCK if lock else b"") + prefixes)

    def stos(self, size: int) -> None:
        """``stos`` of `size` bytes at rDI (AA, AB; 66 AB; REX.W AB)."""
        prefixes, opcode, w = self._sized(size, b"\xaa", b"\xab")
        self._check(w=w)
        self.code += prefixes + (b"\x48" if w else b"") + opcode

    def hlt(self) -> None:
        self.code += b"\xf4"

    def ud2(self) -> None:
        self.code += b"\x0f\x0b"

    def ret(self) -> None:
        self.code += b"\xc3"

    def raw(self, data: bytes) -> None:
        """Bytes written by hand (for instructions the encoder has no method for)."""
        self.code += data

    # -- labels and branches ----------------------------------------------------

    def label(self, name: str) -> None:
        if name in self.labels:
            raise ValueError(f"label {name!r} defined twice")
        self.labels[name] = len(self.code)

    def _rel32(self, opcode: bytes, target: str) -> None:
        self.code += opcode
        self.fixups.append((len(self.code), target))
        self.code += b"\0\0\0\0"

    def jmp(self, target: str) -> None:
        self._rel32(b"\xe9", target)

    def jnz(self, target: str) -> None:
        self._rel32(b"\x0f\x85", target)

    def call(self, target: str) -> None:
        self._rel32(b"\xe8", target)

    def assemble(self) -> bytes:
        """Resolve branches and return the code bytes."""
        out = bytearray(self.code)
        for position, target in self.fixups:
            if target not in self.labels:
                raise ValueError(f"undefined label {target!r}")
            struct.pack_into("<i", out, position, self.labels[target] - (position + 4))
        return bytes(out)
