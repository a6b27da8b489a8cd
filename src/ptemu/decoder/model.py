"""ptemu's own records for a decoded store, independent of Capstone.

A `DecodedStore` says everything the handler needs to check an event and to
know what the instruction writes: its family (a row of `families.FAMILIES`),
the destination memory operand, how many bytes one store writes, and the
prefixes that change its meaning. `destination_address` turns it plus the
guest's registers into the linear address written, the way the CPU's address
generation does (SDM vol. 1, 3.7.5 and vol. 3, 3.4).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ptemu.decoder.families import Family
from ptemu.registers import register_value
from ptemu.values import mask_bits


@dataclass(frozen=True, slots=True)
class SubRegister:
    """Where a named register lives inside a full-width one (``ah`` = rax bits 15:8)."""

    full: str
    shift: int
    bits: int
    mask: int = field(init=False, repr=False, compare=False)
    """``(1 << bits) - 1``, kept so that address generation does no call per read."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "mask", mask_bits(self.bits))

    def read(self, registers: Mapping[str, int]) -> int:
        return (register_value(registers, self.full) >> self.shift) & self.mask


def _build_sub_registers() -> dict[str, SubRegister]:
    table: dict[str, SubRegister] = {}
    for letter in "abcd":
        full = f"r{letter}x"
        table[full] = SubRegister(full, 0, 64)
        table[f"e{letter}x"] = SubRegister(full, 0, 32)
        table[f"{letter}x"] = SubRegister(full, 0, 16)
        table[f"{letter}l"] = SubRegister(full, 0, 8)
        table[f"{letter}h"] = SubRegister(full, 8, 8)
    for name in ("si", "di", "bp", "sp"):
        full = f"r{name}"
        table[full] = SubRegister(full, 0, 64)
        table[f"e{name}"] = SubRegister(full, 0, 32)
        table[name] = SubRegister(full, 0, 16)
        table[f"{name}l"] = SubRegister(full, 0, 8)
    for number in range(8, 16):
        full = f"r{number}"
        table[full] = SubRegister(full, 0, 64)
        table[f"{full}d"] = SubRegister(full, 0, 32)
        table[f"{full}w"] = SubRegister(full, 0, 16)
        table[f"{full}b"] = SubRegister(full, 0, 8)
    table["rip"] = SubRegister("rip", 0, 64)
    table["eip"] = SubRegister("rip", 0, 32)
    table["ip"] = SubRegister("rip", 0, 16)
    for number in range(16):
        table[f"xmm{number}"] = SubRegister(f"xmm{number}", 0, 128)
        table[f"ymm{number}"] = SubRegister(f"ymm{number}", 0, 256)
    return table


SUB_REGISTERS: dict[str, SubRegister] = _build_sub_registers()
"""Every register name Capstone may print for an operand we read."""

LOCK = 0xF0
LEGACY_PREFIXES = frozenset({0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67})
"""LOCK, REPNE, REP, the six segment overrides, operand- and address-size."""
_OPERAND_SIZE = 0x66
SEGMENT_OVERRIDES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}


@dataclass(frozen=True, slots=True)
class Prefixes:
    """The prefixes of one instruction, read from its bytes (not from Capstone).

    Capstone reports one group-1 prefix (the last of LOCK/REP/REPNE), so
    ``f0 f3 89 37`` would look unlocked, and it lets F2/F3 change the operand
    size it reports for some two-byte opcodes; the bytes themselves tell.
    """

    legacy: bytes
    """The legacy prefix bytes in order."""
    rex: int
    """The REX byte (64-bit code, immediately before the opcode), or 0."""
    opcode: int
    """Offset of the first byte after the prefixes (the opcode, VEX or EVEX)."""

    @property
    def lock(self) -> bool:
        return LOCK in self.legacy

    def segment(self, code_bits: int) -> str | None:
        """The segment register an override selects, or None without one.

        Of several overrides the last counts; in 64-bit code ES, CS, SS and DS
        overrides are null prefixes (SDM vol. 1, 3.3.7.1), so the last FS or
        GS override counts whatever follows it (host CPU: ``64 26 c7 07``
        stores through FS).
        """
        chosen = None
        for byte in self.legacy:
            name = SEGMENT_OVERRIDES.get(byte)
            if name is not None and (code_bits != 64 or name in ("fs", "gs")):
                chosen = name
        return chosen

    def operand_size(self, code_bits: int) -> int:
        """Bytes of a general-purpose operand that is not a byte form (SDM vol. 1,
        3.6.1 and vol. 2, 2.2.1.2): REX.W gives 8; else 0x66 toggles the default,
        2 in 16-bit code and 4 in 32/64-bit code. F2/F3 play no part."""
        if self.rex & 0x8:
            return 8
        sixteen = (code_bits == 16) != (_OPERAND_SIZE in self.legacy)
        return 2 if sixteen else 4


def read_prefixes(encoding: bytes, code_bits: int) -> Prefixes:
    """Split `encoding`'s legacy prefixes and REX from the rest.

    A REX byte followed by a legacy prefix is not a REX prefix of this
    instruction (SDM vol. 2, 2.2.1: REX must immediately precede the opcode);
    the CPU ignores it.
    """
    rex = 0
    legacy = bytearray()
    for offset, byte in enumerate(encoding):
        if byte in LEGACY_PREFIXES:
            legacy.append(byte)
            rex = 0
        elif code_bits == 64 and 0x40 <= byte <= 0x4F:
            rex = byte
        else:
            return Prefixes(bytes(legacy), rex, offset)
    return Prefixes(bytes(legacy), rex, len(encoding))


# Address generation runs once per event: plain masks, no calls.
_RIP_NAMES = frozenset({"rip", "eip"})
_ADDRESS_MASKS = {16: mask_bits(16), 32: mask_bits(32), 64: mask_bits(64)}
_U32 = mask_bits(32)
_U64 = mask_bits(64)


@dataclass(frozen=True, slots=True)
class MemoryOperand:
    """A memory operand's address expression, as the instruction encodes it."""

    segment: str
    """The segment register that applies (override or default): ``ds``, ``es``, ``ss``, ``fs``..."""
    base: str | None
    index: str | None
    scale: int
    displacement: int
    address_bits: int
    """16, 32 or 64: the address size after any 0x67 prefix."""

    @property
    def rip_relative(self) -> bool:
        return self.base in ("rip", "eip")


@dataclass(frozen=True, slots=True)
class DecodedStore:
    """One decoded instruction that stores to memory, in ptemu's own terms."""

    family: Family
    mnemonic: str
    """Instruction name as disassembled, prefixes included (``lock cmpxchg``)."""
    text: str
    """Full disassembly, for messages."""
    length: int
    code_bits: int
    destination: MemoryOperand
    access_size: int
    """Bytes one store writes (per iteration for string instructions)."""
    rep: bool
    lock: bool
    bit_offset_register: str | None = None
    """BTS/BTR/BTC with a register bit offset: the register (bit-base addressing)."""
    source: MemoryOperand | None = None
    """The memory source of MOVS."""
    source_register: str | None = None
    """The register a plain store writes (MOV/MOVNTI/vector moves), when any."""
    immediate: int | None = None
    """The immediate a plain store writes (MOV imm), when any."""


def linear_address(operand: MemoryOperand, registers: Mapping[str, int], code_bits: int,
                   next_rip: int, extra: int = 0) -> int:
    """The linear address `operand` designates for the guest's `registers`.

    Effective address = base + index*scale + displacement (+ `extra`, the
    bit-base displacement of BTS/BTR/BTC), truncated to the address size;
    RIP-relative counts from the next instruction. Then the segment base is
    added: in 64-bit code only FS and GS have one (SDM vol. 3, 3.4.4); in
    16/32-bit code the result wraps at 4 GiB. So a 16-bit offset wraps within
    64 KiB before the base is added, and a 32-bit one in 64-bit code (0x67)
    is zero-extended.
    """
    if operand.base in _RIP_NAMES:
        offset = next_rip + operand.displacement + extra
    else:
        offset = operand.displacement + extra
        if operand.base is not None:
            base = SUB_REGISTERS[operand.base]
            offset += (registers.get(base.full, 0) >> base.shift) & base.mask
        if operand.index is not None:
            index = SUB_REGISTERS[operand.index]
            offset += ((registers.get(index.full, 0) >> index.shift) & index.mask) * operand.scale
    offset &= _ADDRESS_MASKS[operand.address_bits]
    if code_bits == 64:
        if operand.segment in ("fs", "gs"):
            return (offset + registers.get(f"{operand.segment}_base", 0)) & _U64
        return offset
    return (offset + registers.get(f"{operand.segment}_base", 0)) & _U32


def signed(value: int, bits: int) -> int:
    """`value` read as a two's-complement number of `bits` bits."""
    value &= mask_bits(bits)
    return value - (1 << bits) if value >> (bits - 1) else value


def destination_address(store: DecodedStore, registers: Mapping[str, int], rip: int) -> int:
    """The linear address of the first byte the instruction's first store writes.

    For BTS/BTR/BTC with a register bit offset the CPU addresses the
    operand-sized unit that holds the bit (SDM vol. 2, "BT", bit-base
    addressing): base address + operand size * floor(offset / operand bits),
    the displacement taking part in the effective address, so that the sum
    wraps at the address size (host CPU: ``67 0f ab 07`` in 64-bit code with
    EDI = 0 and EAX = -32 writes at 0xfffffffc) before any segment base.
    """
    next_rip = (rip + store.length) & mask_bits(64 if store.code_bits == 64 else 32)
    extra = 0
    if store.bit_offset_register is not None:
        bits = store.access_size * 8
        offset = signed(SUB_REGISTERS[store.bit_offset_register].read(registers), bits)
        extra = store.access_size * (offset // bits)
    return linear_address(store.destination, registers, store.code_bits, next_rip, extra)
