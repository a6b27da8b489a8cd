"""What kind of store an executed instruction is, from its opcode bytes.

The capture needs three facts about an instruction that wrote a page-table
page, none of which the execution itself reports: whether it read the
destination before writing it (a read-modify-write completes an entry at once
under the ``strict`` policy), whether it is a REP string instruction (its
iterations are one event), and whether it is a MOV, XCHG or CMPXCHG (only
those may be a coalesced PAE second half). This small classifier reads them
off the one-byte and two-byte opcode maps (Intel SDM vol. 2, appendix A) after
the legacy and REX prefixes. It is deliberately not ptemu's decoder, which is
what the capture's fixtures test.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

_LEGACY_PREFIXES = frozenset({0x66, 0x67, 0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65})
_LOCK, _REPNE, _REP = 0xF0, 0xF2, 0xF3


class StoreKind(StrEnum):
    """Families of memory-writing instructions the capture tells apart."""

    MOV = "mov"
    MOVNTI = "movnti"
    STOS = "stos"
    MOVS = "movs"
    XCHG = "xchg"
    CMPXCHG = "cmpxchg"
    CMPXCHG8B = "cmpxchg8b"
    CMPXCHG16B = "cmpxchg16b"
    XADD = "xadd"
    ARITHMETIC = "arithmetic"
    """ADD OR ADC SBB AND SUB XOR with a memory destination."""
    BIT = "bit"
    """BTS BTR BTC."""
    UNARY = "unary"
    """INC DEC NOT NEG."""
    OTHER = "other"
    """Anything else that may store (SETcc, shifts, vector stores...)."""


_READ_MODIFY_WRITE = frozenset({StoreKind.XCHG, StoreKind.CMPXCHG, StoreKind.CMPXCHG8B,
                                StoreKind.CMPXCHG16B, StoreKind.XADD, StoreKind.ARITHMETIC,
                                StoreKind.BIT, StoreKind.UNARY})

PAE_SECOND_HALF_KINDS = frozenset({StoreKind.MOV, StoreKind.XCHG, StoreKind.CMPXCHG})
"""Instructions the handler may emulate as the second half of a PAE entry
write in the same exit (semantics.md section 2)."""


@dataclass(frozen=True, slots=True)
class InstructionInfo:
    """The facts the capture needs about one instruction."""

    kind: StoreKind
    lock: bool
    rep: bool
    """A REP/REPNE prefix on a string instruction (STOS, MOVS)."""

    @property
    def read_modify_write(self) -> bool:
        """It reads the destination before writing it (locked or not)."""
        return self.kind in _READ_MODIFY_WRITE


def classify(code: bytes, code_bits: int) -> InstructionInfo:
    """Classify the instruction at the start of `code` run as `code_bits` code.

    >>> classify(bytes.fromhex("f0 0f c7 0e"), 32)
    InstructionInfo(kind=<StoreKind.CMPXCHG8B: 'cmpxchg8b'>, lock=True, rep=False)
    """
    position = 0
    prefixes: set[int] = set()
    while position < len(code) and code[position] in _LEGACY_PREFIXES:
        prefixes.add(code[position])
        position += 1
    rex_w = False
    if code_bits == 64 and position < len(code) and 0x40 <= code[position] <= 0x4F:
        rex_w = bool(code[position] & 0x8)
        position += 1
    lock = _LOCK in prefixes
    if position >= len(code):
        return InstructionInfo(StoreKind.OTHER, lock, False)
    opcode = code[position]
    reg = (code[position + 1] >> 3) & 7 if position + 1 < len(code) else 0
    if opcode == 0x0F:
        return InstructionInfo(_two_byte(code[position + 1:], rex_w), lock, False)
    kind = _one_byte(opcode, reg)
    rep = kind in (StoreKind.STOS, StoreKind.MOVS) and bool(prefixes & {_REP, _REPNE})
    return InstructionInfo(kind, lock, rep)


def _one_byte(opcode: int, reg: int) -> StoreKind:
    if opcode < 0x40 and opcode & 0x7 in (0, 1) and opcode >> 3 != 7:
        return StoreKind.ARITHMETIC  # 00/01 ADD .. 30/31 XOR, Eb/Ev destination
    if opcode in (0x80, 0x81, 0x82, 0x83):
        return StoreKind.OTHER if reg == 7 else StoreKind.ARITHMETIC  # /7 is CMP
    if opcode in (0x86, 0x87):
        return StoreKind.XCHG
    if opcode in (0x88, 0x89, 0x8C, 0xA2, 0xA3):
        return StoreKind.MOV
    if opcode in (0xC6, 0xC7):
        return StoreKind.MOV if reg == 0 else StoreKind.OTHER
    if opcode in (0xAA, 0xAB):
        return StoreKind.STOS
    if opcode in (0xA4, 0xA5):
        return StoreKind.MOVS
    if opcode in (0xFE, 0xFF) and reg in (0, 1):
        return StoreKind.UNARY
    if opcode in (0xF6, 0xF7) and reg in (2, 3):
        return StoreKind.UNARY
    return StoreKind.OTHER


def _two_byte(rest: bytes, rex_w: bool) -> StoreKind:
    if not rest:
        return StoreKind.OTHER
    opcode = rest[0]
    reg = (rest[1] >> 3) & 7 if len(rest) > 1 else 0
    if opcode in (0xB0, 0xB1):
        return StoreKind.CMPXCHG
    if opcode == 0xC7 and reg == 1:
        return StoreKind.CMPXCHG16B if rex_w else StoreKind.CMPXCHG8B
    if opcode in (0xC0, 0xC1):
        return StoreKind.XADD
    if opcode in (0xAB, 0xB3, 0xBB):
        return StoreKind.BIT
    if opcode == 0xBA and reg in (5, 6, 7):
        return StoreKind.BIT
    if opcode == 0xC3:
        return StoreKind.MOVNTI
    return StoreKind.OTHER


def is_cmpxchg_32bit_operand(code: bytes, code_bits: int) -> bool:
    """``CMPXCHG r/m32, r32`` in 64-bit code (0F B1 without REX.W or 66).

    The one store whose result Unicorn 2.1 gets wrong for the capture: see
    `ptemu.capture.machine` (Unicorn issue #2332).
    """
    if code_bits != 64:
        return False
    position = 0
    operand_16 = False
    while position < len(code) and code[position] in _LEGACY_PREFIXES:
        operand_16 |= code[position] == 0x66
        position += 1
    rex_w = False
    if position < len(code) and 0x40 <= code[position] <= 0x4F:
        rex_w = bool(code[position] & 0x8)
        position += 1
    return (not operand_16 and not rex_w
            and code[position:position + 2] == bytes((0x0F, 0xB1)))

