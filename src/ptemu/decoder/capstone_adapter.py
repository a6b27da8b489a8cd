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
from ptemu.decoder.model import SUB_REGISTERS, DecodedStore, MemoryOperand, read_prefixes

MAX_INSTRUCTION_LENGTH = 15
"""The architectural limit on an x86 instruction's length (SDM vol. 2, 2.3.11)."""

_MODES = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}
_STACK_BASES = frozenset({"rbp", "rsp", "ebp", "esp", "bp", "sp"})
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


def _memory_operand(instruction: Any, operand: Any, code_bits: int, *,
                    string_destination: bool) -> MemoryOperand:
    memory = operand.mem
    base = instruction.reg_name(memory.base) if memory.base else None
    index = instruction.reg_name(memory.index) if memory.index else None
    override = read_prefixes(bytes(instruction.bytes), code_bits).segment(code_bits)
    if string_destination:
        segment = "es"  # STOS/MOVS store through ES:rDI; no override applies.
    elif override is not None:
        segment = override
    elif base in _STACK_BASES:
        segment = "ss"
    else:
        segment = "ds"
    for name in (base, index):
        if name is not None and name not in SUB_REGISTERS:
            raise _Unsupported(f"address register {name} is not a general register")
    return MemoryOperand(segment=segment, base=base, index=index, scale=memory.scale,
                         displacement=memory.disp, address_bits=instruction.addr_size * 8)


_EVEX = 0x62
_NOT_PREFIXED = (0x66, 0xF2, 0xF3)
_SSE_FAMILIES = frozenset({"vector-store", "aligned-vector-store"})
_SSE_PREFIX = {
    **dict.fromkeys(("movups", "movaps", "movntps", "movlps", "movhps"), "none"),
    **dict.fromkeys(("movupd", "movapd", "movntpd", "movlpd", "movhpd", "movdqa", "movntdq",
                     "movq", "movd"), "66"),
    **dict.fromkeys(("movss", "movdqu"), "f3"),
    "movsd": "f2",
}
"""The mandatory prefix of each SSE store ptemu emulates (SDM vol. 2; MMX forms
of MOVD/MOVQ have none, but name an mm register, which is refused)."""


def _sse_prefix(legacy: bytes) -> str:
    """The mandatory prefix the CPU sees (SDM vol. 2, 2.1.2): F2/F3 over 66;
    with both F2 and F3 it is not defined here ("both")."""
    repeats = {byte for byte in legacy if byte in (0xF2, 0xF3)}
    if len(repeats) == 2:
        return "both"
    if repeats:
        return f"{repeats.pop():x}"
    return "66" if 0x66 in legacy else "none"
_EVEX_REFUSED_BITS = 0x97
"""EVEX byte P2 bits z (7), b (4) and aaa (2:0): zeroing, broadcast/rounding
and the opmask register. ptemu's register set has no opmask registers, so a
masked store cannot be emulated exactly; z and b on a store are #UD or change
its meaning."""


_PTR_WORDS = {1: "byte ptr", 2: "word ptr", 4: "dword ptr", 8: "qword ptr"}
_SIZED_NAMES = {(sub.full, sub.shift, sub.bits): name for name, sub in SUB_REGISTERS.items()}


def _sized(name: str, size: int) -> str:
    """The name of `name`'s register at `size` bytes (``esi`` at 2 is ``si``).

    Capstone names the register right even where it misreports the memory
    operand's size; this keeps the two consistent whatever it reports.
    """
    sub = SUB_REGISTERS[name]
    if sub.full.startswith(("xmm", "ymm")) or sub.full == "rip" or sub.shift:
        return name
    return _SIZED_NAMES.get((sub.full, 0, 8 * size), name)


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
        memory = _memory_operand(instruction, destination, code_bits,
                                 string_destination=family.string)
        source = None
        if family.string and len(memory_indexes) > 1:
            source = _memory_operand(instruction, operands[memory_indexes[1]], code_bits,
                                     string_destination=False)
    except _Unsupported as refusal:
        return DecodeRefusal(f"'{text}': {refusal}")
    if code_bits == 32 and memory.segment == "cs":
        # SDM vol. 3, 5.5: a code segment is never writable in protected mode,
        # so the store raises #GP(0) before paging is consulted (host CPU:
        # 2e 89 37). 16-bit code may run in real mode, where CS is writable.
        return DecodeRefusal(f"'{text}': a store through CS raises #GP(0) in 32-bit code")
    encoding = bytes(instruction.bytes)
    prefixes = read_prefixes(encoding, code_bits)
    lock = prefixes.lock
    if lock and family.access is not Access.READ_MODIFY_WRITE:
        # SDM vol. 2, LOCK: #UD unless the instruction is a read-modify-write
        # with a memory destination, so these bytes never store anything.
        return DecodeRefusal(f"'{text}': LOCK on {name} raises #UD")
    if family.name == "movnti" and any(byte in prefixes.legacy for byte in _NOT_PREFIXED):
        # SDM vol. 2, MOVNTI is "NP 0F C3": a 66, F2 or F3 prefix raises #UD
        # (host CPU: 66 67 0f c3 37), wherever it stands among the prefixes.
        return DecodeRefusal(f"'{text}': MOVNTI with a 66/F2/F3 prefix raises #UD")
    if family.name in _SSE_FAMILIES:
        expected = _SSE_PREFIX.get(name)
        if expected is None or _sse_prefix(prefixes.legacy) != expected:
            # Capstone picks the mandatory prefix wrongly when other prefixes
            # stand between (it reads f2 26 66 0f 29 as MOVAPD; the CPU: #UD).
            return DecodeRefusal(f"'{text}': its mandatory prefix is not "
                                 f"{expected if expected is not None else 'known'}")
    if family.register_store and (prefixes.rex or any(
            byte in prefixes.legacy for byte in (*_NOT_PREFIXED, 0xF0))):
        # SDM vol. 2, 2.3.2: 66, F2, F3, LOCK or REX before VEX/EVEX: #UD.
        return DecodeRefusal(f"'{text}': a 66/F2/F3/LOCK/REX prefix before VEX raises #UD")
    if encoding[prefixes.opcode:prefixes.opcode + 1] == bytes([_EVEX]) \
            and family.register_store and len(encoding) > prefixes.opcode + 3 \
            and encoding[prefixes.opcode + 3] & _EVEX_REFUSED_BITS:
        return DecodeRefusal(f"'{text}': an EVEX store with an opmask, zeroing or "
                             "broadcast is not emulated (no opmask registers)")
    access_size = destination.size
    if family.integer and access_size != 1:
        access_size = prefixes.operand_size(code_bits)
    other_operands = [op for i, op in enumerate(operands) if i != destination_index]
    source_register = None
    immediate = None
    bit_offset_register = None
    for operand in other_operands:
        if operand.type == x86_const.X86_OP_REG:
            source_register = instruction.reg_name(operand.reg)
        elif operand.type == x86_const.X86_OP_IMM:
            immediate = operand.imm & ((1 << (8 * access_size)) - 1)
    if source_register is not None and source_register not in SUB_REGISTERS:
        return DecodeRefusal(f"'{text}': register {source_register} is not supported")
    if family.integer and source_register is not None and access_size != 1:
        source_register = _sized(source_register, access_size)
    if access_size != destination.size and destination.size in _PTR_WORDS:
        text = text.replace(_PTR_WORDS[destination.size], _PTR_WORDS.get(access_size, "?"), 1)
    if family.bit_test and source_register is not None:
        bit_offset_register = source_register
    return DecodedStore(
        family=family,
        mnemonic=instruction.mnemonic,
        text=text,
        length=instruction.size,
        code_bits=code_bits,
        destination=memory,
        access_size=access_size,
        # From the bytes: Capstone drops the F2 of ``f2 a5`` (REPNE MOVSD, which
        # the CPU repeats as REP MOVSD), reading it as SSE's MOVSD name.
        rep=family.string and any(byte in _REP_PREFIXES for byte in prefixes.legacy),
        lock=lock,
        bit_offset_register=bit_offset_register,
        source=source,
        source_register=source_register,
        immediate=immediate,
    )
