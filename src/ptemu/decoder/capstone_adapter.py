"""The only module that imports Capstone: instruction bytes -> `DecodedStore`.

Capstone's objects and errors stay here: callers get a `DecodedStore` or a
`DecodeRefusal` naming why the bytes are not a store ptemu emulates. Capstone's
per-operand access flags are not trusted (in 5.0 they mark CMPXCHG's and
MOVUPS's memory operand as read-only); the family table decides which operand
is the destination.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import capstone
from capstone import x86_const

from ptemu.decoder.families import FAMILY_BY_INSTRUCTION, Access, Family, MemoryPosition
from ptemu.decoder.model import SUB_REGISTERS, DecodedStore, MemoryOperand

MAX_INSTRUCTION_LENGTH = 15
"""The architectural limit on an x86 instruction's length (SDM vol. 2, 2.3.11)."""

_MODES = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}
_STACK_BASES = frozenset({"rbp", "rsp", "ebp", "esp", "bp", "sp"})
_LOCK = 0xF0
_REP_PREFIXES = frozenset({0xF2, 0xF3})
_SCALAR_SSE_STORES = frozenset({"movsd", "movss"})


@dataclass(frozen=True, slots=True)
class DecodeRefusal:
    """Why the bytes are not a store ptemu emulates (the event is `unsupported`)."""

    reason: str


class CapstoneDecoder:
    """Decodes one instruction per call; holds one Capstone handle per code size."""

    def __init__(self) -> None:
        self._engines: dict[int, Any] = {}
        for bits, mode in _MODES.items():
            engine = capstone.Cs(capstone.CS_ARCH_X86, mode)
            engine.detail = True
            self._engines[bits] = engine

    def decode(self, code_bits: int, code: bytes, address: int = 0) -> DecodedStore | DecodeRefusal:
        """Decode the instruction at the start of `code` as `code_bits` code."""
        engine = self._engines.get(code_bits)
        if engine is None:
            raise ValueError(f"code_bits must be 16, 32 or 64, not {code_bits!r}")
        try:
            instruction = next(engine.disasm(code[:MAX_INSTRUCTION_LENGTH], address, 1), None)
        except capstone.CsError as error:
            return DecodeRefusal(f"Capstone cannot decode the bytes: {error}")
        if instruction is None:
            return DecodeRefusal(f"not a valid {code_bits}-bit instruction: {code[:15].hex(' ')}")
        return _to_store(instruction, code_bits)


def _family_of(instruction: Any, name: str) -> Family | None:
    if name in _SCALAR_SSE_STORES and any(
        operand.type == x86_const.X86_OP_REG
        and instruction.reg_name(operand.reg).startswith("xmm")
        for operand in instruction.operands
    ):
        return FAMILY_BY_INSTRUCTION["movq"]  # stores the low scalar of an xmm register
    return FAMILY_BY_INSTRUCTION.get(name)


def _memory_operand(instruction: Any, operand: Any, *, string_destination: bool) -> MemoryOperand:
    memory = operand.mem
    base = instruction.reg_name(memory.base) if memory.base else None
    index = instruction.reg_name(memory.index) if memory.index else None
    if string_destination:
        segment = "es"  # STOS/MOVS store through ES:rDI; no override applies.
    elif memory.segment:
        segment = instruction.reg_name(memory.segment)
    elif base in _STACK_BASES:
        segment = "ss"
    else:
        segment = "ds"
    for name in (base, index):
        if name is not None and name not in SUB_REGISTERS:
            raise _Unsupported(f"address register {name} is not a general register")
    return MemoryOperand(segment=segment, base=base, index=index, scale=memory.scale,
                         displacement=memory.disp, address_bits=instruction.addr_size * 8)


_LEGACY_PREFIXES = frozenset({0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67})


def _has_lock_prefix(encoding: bytes, code_bits: int) -> bool:
    """Whether a LOCK byte stands among the legacy prefixes.

    Capstone reports one group-1 prefix (the last of LOCK/REP/REPNE), so
    ``f0 f3 89 37`` would look unlocked; the prefix bytes themselves tell.
    """
    for byte in encoding:
        if byte == _LOCK:
            return True
        if byte not in _LEGACY_PREFIXES:
            return False
    return False


class _Unsupported(Exception):
    """Internal: the form is outside what ptemu emulates."""


def _to_store(instruction: Any, code_bits: int) -> DecodedStore | DecodeRefusal:
    name = instruction.insn_name()
    text = f"{instruction.mnemonic} {instruction.op_str}".strip()
    family = _family_of(instruction, name)
    operands = list(instruction.operands)
    memory_indexes = [i for i, op in enumerate(operands) if op.type == x86_const.X86_OP_MEM]
    if family is None:
        if memory_indexes:
            return DecodeRefusal(f"'{text}': ptemu does not emulate {name}")
        return DecodeRefusal(f"'{text}' stores no memory")
    if not memory_indexes:
        return DecodeRefusal(f"'{text}' stores no memory")
    destination_index = memory_indexes[0]
    if family.memory_position is MemoryPosition.FIRST and destination_index != 0:
        return DecodeRefusal(f"'{text}' reads memory but stores none")
    destination = operands[destination_index]
    try:
        memory = _memory_operand(instruction, destination, string_destination=family.string)
        source = None
        if family.string and len(memory_indexes) > 1:
            source = _memory_operand(instruction, operands[memory_indexes[1]],
                                     string_destination=False)
    except _Unsupported as refusal:
        return DecodeRefusal(f"'{text}': {refusal}")
    prefix = instruction.prefix[0]
    lock = _has_lock_prefix(bytes(instruction.bytes), code_bits)
    if lock and family.access is not Access.READ_MODIFY_WRITE:
        # SDM vol. 2, LOCK: #UD unless the instruction is a read-modify-write
        # with a memory destination, so these bytes never store anything.
        return DecodeRefusal(f"'{text}': LOCK on {name} raises #UD")
    other_operands = [op for i, op in enumerate(operands) if i != destination_index]
    source_register = None
    immediate = None
    bit_offset_register = None
    for operand in other_operands:
        if operand.type == x86_const.X86_OP_REG:
            source_register = instruction.reg_name(operand.reg)
        elif operand.type == x86_const.X86_OP_IMM:
            immediate = operand.imm & ((1 << (8 * destination.size)) - 1)
    if family.bit_test and source_register is not None:
        bit_offset_register = source_register
    if source_register is not None and source_register not in SUB_REGISTERS:
        return DecodeRefusal(f"'{text}': register {source_register} is not supported")
    return DecodedStore(
        family=family,
        mnemonic=instruction.mnemonic,
        text=text,
        length=instruction.size,
        code_bits=code_bits,
        destination=memory,
        access_size=destination.size,
        rep=family.string and prefix in _REP_PREFIXES,
        lock=lock,
        bit_offset_register=bit_offset_register,
        source=source,
        source_register=source_register,
        immediate=immediate,
    )
