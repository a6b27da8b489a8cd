"""Guest programs the KVM runner executes: what runs, with which registers.

`shared_program` is a loop for several vCPUs at once: locked read-modify-
writes on entries every vCPU shares, bits each vCPU owns, plain stores to
entries of its own; what the entries must hold at the end follows from its
parameters (`GuestProgram.checks`).

`stress_program` is a loop that writes the monitored page tables with every
instruction family the handler emulates (MOV register and immediate of 1, 2,
4 and 8 bytes, XCHG, CMPXCHG that matches and that does not, CMPXCHG8B both
ways, LOCK AND/OR/XOR, BTS/BTR/BTC with an immediate and with a register bit
offset, STOS of every size), at entries and with values drawn from an
xorshift generator the guest runs itself, so every iteration writes other
entries with other values.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from ptemu.errors import UsageError
from ptemu.kvm.asm import (
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
    R15,
    RAX,
    RBP,
    RBX,
    RCX,
    RDI,
    RDX,
    RSI,
    Assembler,
)
from ptemu.kvm.layout import GuestLayout

BLOCK = 0x80
"""Bytes of page table one iteration writes (16 entries of 8 bytes, 32 of 4)."""


U64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class FinalCheck:
    """One end-of-run expectation: the sum (mod 2**64) of 8-byte entries.

    One GPA is a plain value (a counter, a bitmap, a private entry); several
    are a total whose parts depend on the interleaving (each vCPU's sum of
    the tickets it drew) but whose sum does not.
    """

    name: str
    gpas: tuple[int, ...]
    expected: int

    def observed(self, tables: bytes, tables_gpa: int) -> int:
        """The value in `tables` (the monitored pages, which start at `tables_gpa`)."""
        total = 0
        for gpa in self.gpas:
            offset = gpa - tables_gpa
            total += int.from_bytes(tables[offset:offset + 8], "little")
        return total & U64


@dataclass(frozen=True, slots=True)
class GuestProgram:
    """Code and initial state of one guest run."""

    name: str
    code: bytes
    """Loaded at `GuestLayout.code_gpa`, executed from `GuestLayout.text`."""
    registers: Mapping[str, int] = field(default_factory=dict)
    """Initial general registers besides RIP, RSP and RFLAGS (which the runner sets)."""
    data: bytes = b""
    """Placed at `GuestLayout.data_gpa` (reached by the guest through the direct map)."""
    monitored: bytes = b""
    """Initial content of the monitored pages (zero-padded)."""
    writes_per_iteration: int = 0
    """Page-table writes one loop iteration makes (for reports)."""
    pages: Mapping[int, bytes] = field(default_factory=dict)
    """Extra 4 KiB pages mapped at their GLA (page-aligned keys): code linked at
    its own address (kernel functions) and the data it reads."""
    heap: bytes = b""
    """Placed at `GuestLayout.heap_gpa` (reached through the direct map)."""
    description: str = ""
    """What the program runs, in words (for reports)."""
    vcpu_registers: tuple[Mapping[str, int], ...] = ()
    """Per-vCPU registers over `registers`, one mapping per vCPU: a program for
    several vCPUs (`shared_program`) runs on exactly this many. Empty: one vCPU."""
    checks: tuple[FinalCheck, ...] = ()
    """What the monitored pages must hold at the end, computed from the
    program's parameters (`shared_program`)."""
    varying: tuple[int, ...] = ()
    """GPAs of 8-byte entries whose final value depends on how the vCPUs
    interleaved (left out when two runs' tables are compared)."""


def initial_entries(layout: GuestLayout, seed: int) -> bytes:
    """Plausible PTEs for the monitored pages: present, RW, A, frames below 4 GiB."""
    generator = random.Random(seed)
    size = layout.mode.entry_size
    count = layout.monitored_size // size
    entries = []
    for _ in range(count):
        frame = generator.getrandbits(20) << 12
        flags = generator.choice((0x63, 0x67, 0x23, 0x25, 0x0, 0x61))
        entries.append((frame | flags).to_bytes(size, "little"))
    return b"".join(entries)


def _check(iterations: int, seed: int) -> None:
    if not 1 <= iterations <= 10_000_000:
        raise UsageError(f"iterations: {iterations} is not in 1..10000000")
    if seed < 0:
        raise UsageError(f"seed: {seed} is negative")


def stress_program(layout: GuestLayout, iterations: int, seed: int = 1) -> GuestProgram:
    """The all-families stress loop for `layout` (64-bit or 32-bit code)."""
    _check(iterations, seed)
    if layout.code_bits == 64:
        return _stress64(layout, iterations, seed)
    return _stress32(layout, iterations, seed)


def _block_mask(layout: GuestLayout) -> int:
    return (layout.monitored_size - 1) & ~(BLOCK - 1)


def _stress64(layout: GuestLayout, iterations: int, seed: int) -> GuestProgram:
    a = Assembler(64)
    a.label("top")
    # xorshift64 (Marsaglia 13/7/17) in r12; rsi = value, rdi = a 128-byte block.
    for direction, count in (("shl", 13), ("shr", 7), ("shl", 17)):
        a.mov_rr(RAX, R12, w=True)
        a.shift(direction, RAX, count, w=True)
        a.alu_rr("xor", R12, RAX, w=True)
    a.mov_rr(RSI, R12, w=True)
    a.mov_rr(RDI, R12, w=True)
    a.shift("shr", RDI, 24, w=True)
    a.alu_rr("and", RDI, R14, w=True)
    a.alu_rr("add", RDI, R13, w=True)
    # MOV from a register: 8, 4 (both halves, high first as PAE kernels do), 2, 1 bytes.
    a.mov_store(8, RSI, RDI, 0x00)
    a.mov_store(4, RSI, RDI, 0x0C)
    a.mov_store(4, RSI, RDI, 0x08)
    a.mov_store(2, RSI, RDI, 0x12)
    a.mov_store(1, RSI, RDI, 0x17)
    # MOV of an immediate: 8 (imm32 sign-extended), 4, 2, 1 bytes.
    a.mov_store_imm(8, RDI, 0x18, 0x80000063)
    a.mov_store_imm(4, RDI, 0x20, 0x00ABC067)
    a.mov_store_imm(2, RDI, 0x26, 0x8000)
    a.mov_store_imm(1, RDI, 0x28, 0x25)
    a.shift("rol", RSI, 17, w=True)
    a.xchg(8, RSI, RDI, 0x30)
    # CMPXCHG whose compare matches, then one that cannot (RAX = ~entry).
    a.load(RAX, RDI, 0x38, w=True)
    a.cmpxchg(8, RSI, RDI, 0x38)
    a.load(RAX, RDI, 0x40, w=True)
    a.not_(RAX, w=True)
    a.cmpxchg(8, RSI, RDI, 0x40)
    # CMPXCHG8B: EDX:EAX = entry (match), then EDX inverted (mismatch); ECX:EBX = value.
    a.load(RAX, RDI, 0x48)
    a.load(RDX, RDI, 0x4C)
    a.mov_rr(RBX, RSI, w=True)
    a.mov_rr(RCX, RSI, w=True)
    a.shift("shr", RCX, 32, w=True)
    a.cmpxchg8b(RDI, 0x48)
    a.load(RAX, RDI, 0x50)
    a.load(RDX, RDI, 0x54)
    a.not_(RDX)
    a.cmpxchg8b(RDI, 0x50)
    # LOCK AND/OR/XOR; a byte AND that clears RW as Linux's ptep_set_wrprotect does.
    a.logic("and", 8, RSI, RDI, 0x58)
    a.logic("or", 8, RSI, RDI, 0x60)
    a.logic("xor", 4, RSI, RDI, 0x68)
    a.logic_imm8("and", 1, RDI, 0x60, 0xFD)
    # BTS/BTR/BTC with an immediate (NX, RW, a 32-bit operand) ...
    a.bit_imm("bts", 8, RDI, 0x70, 63)
    a.bit_imm("btr", 8, RDI, 0x70, 1)
    a.bit_imm("btc", 4, RDI, 0x74, 5)
    # ... and with a register bit offset inside the operand (0..63).
    a.mov_rr(RAX, RSI, w=True)
    a.alu_ri("and", RAX, 63, w=True)
    a.bit_reg("bts", 8, RAX, RDI, 0x78)
    a.alu_ri("xor", RAX, 5, w=True)
    a.bit_reg("btc", 8, RAX, RDI, 0x78)
    a.alu_ri("and", RAX, 31)
    a.bit_reg("btr", 4, RAX, RDI, 0x7C)
    # STOS of 8, 4, 2, 1 bytes from the block start (RDI advances each time).
    a.mov_rr(RAX, RSI, w=True)
    a.stos(8)
    a.not_(RAX, w=True)
    a.stos(4)
    a.stos(2)
    a.stos(1)
    a.regreg(b"\xff", 1, R15, w=True)  # dec r15
    a.jnz("top")
    a.hlt()
    registers = {
        "r12": seed * 0x9E3779B97F4A7C15 % (1 << 64) or 1,
        "r13": layout.monitored_gla,
        "r14": _block_mask(layout),
        "r15": iterations,
    }
    return GuestProgram(name=f"stress-{layout.mode.name}-64", code=a.assemble(),
                        registers=registers, monitored=initial_entries(layout, seed),
                        writes_per_iteration=28)


def _xorshift32_step(a: Assembler, state_disp: int) -> None:
    """eax = next xorshift32 (13/17/5) of the state at [ebp + state_disp]; stored back."""
    a.load(RAX, RBP, state_disp)
    for direction, count in (("shl", 13), ("shr", 17), ("shl", 5)):
        a.mov_rr(RCX, RAX)
        a.shift(direction, RCX, count)
        a.alu_rr("xor", RAX, RCX)
    a.store(RAX, RBP, state_disp)


# Data area of the 32-bit program, addressed from EBP.
_STATE_LOW, _STATE_HIGH, _COUNTER, _VALUE_HIGH = 0, 4, 8, 12


def _stress32(layout: GuestLayout, iterations: int, seed: int) -> GuestProgram:
    a = Assembler(32)
    a.label("top")
    _xorshift32_step(a, _STATE_HIGH)
    a.store(RAX, RBP, _VALUE_HIGH)
    _xorshift32_step(a, _STATE_LOW)
    a.mov_rr(RSI, RAX)
    a.mov_rr(RDI, RAX)
    a.shift("shr", RDI, 8)
    a.alu_ri("and", RDI, _block_mask(layout))
    a.alu_ri("add", RDI, layout.monitored_gla)
    # MOV from a register: 4 bytes; an 8-byte value as two halves, low first and
    # then high first (how 32-bit PAE kernels write entries); 2 and 1 bytes.
    a.mov_store(4, RSI, RDI, 0x00)
    a.load(RAX, RBP, _VALUE_HIGH)
    a.mov_store(4, RSI, RDI, 0x08)
    a.mov_store(4, RAX, RDI, 0x0C)
    a.mov_store(4, RAX, RDI, 0x14)
    a.mov_store(4, RSI, RDI, 0x10)
    a.mov_store(2, RSI, RDI, 0x1A)
    a.mov_rr(RCX, RSI)
    a.mov_store(1, RCX, RDI, 0x1F)
    # MOV of an immediate: 4, 2, 1 bytes.
    a.mov_store_imm(4, RDI, 0x20, 0x00ABC067)
    a.mov_store_imm(2, RDI, 0x26, 0x8000)
    a.mov_store_imm(1, RDI, 0x24, 0x25)
    a.xchg(4, RSI, RDI, 0x28)
    # CMPXCHG that matches, then one that cannot.
    a.load(RAX, RDI, 0x2C)
    a.cmpxchg(4, RSI, RDI, 0x2C)
    a.load(RAX, RDI, 0x30)
    a.not_(RAX)
    a.cmpxchg(4, RSI, RDI, 0x30)
    # CMPXCHG8B: EDX:EAX = the 8 bytes (match), then EAX inverted (mismatch).
    a.load(RAX, RDI, 0x38)
    a.load(RDX, RDI, 0x3C)
    a.mov_rr(RBX, RSI)
    a.load(RCX, RBP, _VALUE_HIGH)
    a.cmpxchg8b(RDI, 0x38)
    a.load(RAX, RDI, 0x40)
    a.load(RDX, RDI, 0x44)
    a.not_(RAX)
    a.cmpxchg8b(RDI, 0x40)
    # LOCK AND/OR/XOR and the RW-clearing byte AND.
    a.logic("and", 4, RSI, RDI, 0x48)
    a.logic("or", 4, RSI, RDI, 0x4C)
    a.logic("xor", 4, RSI, RDI, 0x50)
    a.logic_imm8("and", 1, RDI, 0x48, 0xFD)
    # BTS/BTR/BTC with an immediate and with a register bit offset (0..31).
    a.bit_imm("bts", 4, RDI, 0x54, 31)
    a.bit_imm("btr", 4, RDI, 0x58, 1)
    a.bit_imm("btc", 2, RDI, 0x5C, 5)
    a.mov_rr(RAX, RSI)
    a.alu_ri("and", RAX, 31)
    a.bit_reg("bts", 4, RAX, RDI, 0x60)
    a.bit_reg("btr", 4, RAX, RDI, 0x64)
    a.bit_reg("btc", 4, RAX, RDI, 0x68)
    # STOS of 4, 2, 1 bytes at the block start.
    a.mov_rr(RAX, RSI)
    a.stos(4)
    a.stos(2)
    a.stos(1)
    a.dec_mem(RBP, _COUNTER)
    a.jnz("top")
    a.hlt()
    generator = random.Random(seed)
    data = struct.pack("<IIII", generator.getrandbits(32) | 1, generator.getrandbits(32) | 1,
                       iterations, 0)
    registers = {"rbp": layout.gla_of(layout.data_gpa)}
    return GuestProgram(name=f"stress-{layout.mode.name}-32", code=a.assemble(),
                        registers=registers, data=data, monitored=initial_entries(layout, seed),
                        writes_per_iteration=28)


# --- several vCPUs on shared entries ------------------------------------------

SHARED_TICKET = 0x00
"""``lock xadd`` of 1 by every vCPU: a ticket counter (each vCPU sums the old
values it draws)."""
SHARED_WEIGHTED = 0x08
"""``lock xadd`` of v + 1 by vCPU v."""
SHARED_CAS = 0x10
"""A ``lock cmpxchg`` retry loop adding v + 1."""
SHARED_CAS8B = 0x18
"""A ``lock cmpxchg8b`` retry loop adding (v + 1) << 24 (carries cross bit 32)."""
SHARED_BITS = 0x20
"""A bitmap: vCPU v owns bits 8v..8v+7 and sets and clears them with
``lock bts``/``lock btr`` (register bit offsets)."""
PRIVATE_BASE = 0x100
PRIVATE_STRIDE = 0x10
"""vCPU v's own entries at `PRIVATE_BASE` + v * `PRIVATE_STRIDE`, in the same
page as the shared ones."""
PRIVATE_LAST = 0x0
"""``mov`` of (v << 48) | the loop counter, every iteration (ends as (v << 48) | 1)."""
PRIVATE_TICKETS = 0x8
"""``mov`` of the sum of the tickets vCPU v drew so far."""

SHARED_START: dict[int, int] = {
    SHARED_TICKET: 0x1000,
    SHARED_WEIGHTED: 0x7FFF_FFFF_FFFF_FF00,
    SHARED_CAS: 0xFFFF_FFFF_FFFF_FFF0,
    SHARED_CAS8B: 0x0000_0001_F800_0000,
    SHARED_BITS: 0xA5A5_5A5A_0FF0_C33C,
}
"""Initial values of the shared entries (wrap-arounds and carries included)."""

MAX_SHARED_VCPUS = 8
SHARED_WRITES_PER_ITERATION = 8
"""At least: two XADD, one CMPXCHG and one CMPXCHG8B (more when they retry),
BTS, BTR and two MOV."""


def owned_bits(initial: int, vcpus: int, iterations: int) -> int:
    """The bitmap after every vCPU ran `iterations` iterations of its BTS/BTR pair.

    Iteration with counter c (from `iterations` down to 1) of vCPU v sets bit
    8v + (c & 7), then clears bit 8v + ((c + 4) & 7). The owners' bits are
    disjoint, so the interleaving does not matter.
    """
    value = initial
    for vcpu in range(vcpus):
        for counter in range(iterations, 0, -1):
            value |= 1 << (8 * vcpu + (counter & 7))
            value &= ~(1 << (8 * vcpu + ((counter + 4) & 7)))
    return value & U64


def shared_program(layout: GuestLayout, vcpus: int, iterations: int,
                   seed: int = 1) -> GuestProgram:
    """`vcpus` vCPUs hammering shared entries of the first monitored page.

    Each iteration of vCPU v: ``lock xadd`` 1 into the ticket counter (the old
    value added to its ticket sum), ``lock xadd`` v + 1, a ``lock cmpxchg``
    loop adding v + 1, a ``lock cmpxchg8b`` loop adding (v + 1) << 24, ``lock
    bts``/``lock btr`` of its own bits, and plain stores of its loop counter
    and ticket sum to its private entries. 64-bit code only (the loops use
    64-bit arithmetic). Entries the program does not name hold random PTEs.
    """
    _check(iterations, seed)
    if not 1 <= vcpus <= MAX_SHARED_VCPUS:
        raise UsageError(f"vcpus: {vcpus} is not in 1..{MAX_SHARED_VCPUS}")
    if layout.code_bits != 64 or layout.mode.entry_size != 8:
        raise UsageError("the shared-entries program runs 64-bit code in 4- or 5-level paging "
                         f"(asked: {layout.mode.name} paging, {layout.code_bits}-bit code)")
    a = Assembler(64)
    a.label("top")
    a.mov_imm(RAX, 1)
    a.xadd(8, RAX, R13, SHARED_TICKET)
    a.alu_rr("add", R10, RAX, w=True)
    a.mov_rr(RAX, R9, w=True)
    a.xadd(8, RAX, R13, SHARED_WEIGHTED)
    a.label("cas")
    a.load(RAX, R13, SHARED_CAS, w=True)
    a.mov_rr(RCX, RAX, w=True)
    a.alu_rr("add", RCX, R9, w=True)
    a.cmpxchg(8, RCX, R13, SHARED_CAS)
    a.jnz("cas")
    a.label("cas8b")
    a.load(RAX, R13, SHARED_CAS8B, w=True)   # EDX:EAX = the entry, ECX:EBX = it + r11
    a.mov_rr(RDX, RAX, w=True)
    a.shift("shr", RDX, 32, w=True)
    a.mov_rr(RBX, RAX, w=True)
    a.alu_rr("add", RBX, R11, w=True)
    a.mov_rr(RCX, RBX, w=True)
    a.shift("shr", RCX, 32, w=True)
    a.cmpxchg8b(R13, SHARED_CAS8B)
    a.jnz("cas8b")
    a.mov_rr(RAX, R15, w=True)                # bit 8v + (c & 7)
    a.alu_ri("and", RAX, 7, w=True)
    a.alu_rr("add", RAX, R8, w=True)
    a.bit_reg("bts", 8, RAX, R13, SHARED_BITS)
    a.mov_rr(RAX, R15, w=True)                # bit 8v + ((c + 4) & 7)
    a.alu_ri("add", RAX, 4, w=True)
    a.alu_ri("and", RAX, 7, w=True)
    a.alu_rr("add", RAX, R8, w=True)
    a.bit_reg("btr", 8, RAX, R13, SHARED_BITS)
    a.mov_rr(RAX, R12, w=True)
    a.alu_rr("or", RAX, R15, w=True)
    a.mov_store(8, RAX, R14, PRIVATE_LAST)
    a.mov_store(8, R10, R14, PRIVATE_TICKETS)
    a.regreg(b"\xff", 1, R15, w=True)  # dec r15
    a.jnz("top")
    a.hlt()

    base = layout.monitored_gla
    per_vcpu = tuple(
        {"r8": 8 * v, "r9": v + 1, "r11": (v + 1) << 24, "r12": v << 48,
         "r14": base + PRIVATE_BASE + v * PRIVATE_STRIDE}
        for v in range(vcpus))
    monitored = bytearray(initial_entries(layout, seed))
    for offset, value in SHARED_START.items():
        monitored[offset:offset + 8] = value.to_bytes(8, "little")
    gpa = layout.monitored_gpa
    total = vcpus * iterations
    weights = vcpus * (vcpus + 1) // 2
    checks = [
        FinalCheck("lock xadd ticket counter", (gpa + SHARED_TICKET,),
                   (SHARED_START[SHARED_TICKET] + total) & U64),
        FinalCheck("lock xadd v+1 counter", (gpa + SHARED_WEIGHTED,),
                   (SHARED_START[SHARED_WEIGHTED] + iterations * weights) & U64),
        FinalCheck("lock cmpxchg loop counter", (gpa + SHARED_CAS,),
                   (SHARED_START[SHARED_CAS] + iterations * weights) & U64),
        FinalCheck("lock cmpxchg8b loop counter", (gpa + SHARED_CAS8B,),
                   (SHARED_START[SHARED_CAS8B] + (iterations * weights << 24)) & U64),
        FinalCheck("lock bts/btr owned bits", (gpa + SHARED_BITS,),
                   owned_bits(SHARED_START[SHARED_BITS], vcpus, iterations)),
        FinalCheck("tickets drawn (sum over vCPUs)",
                   tuple(gpa + PRIVATE_BASE + v * PRIVATE_STRIDE + PRIVATE_TICKETS
                         for v in range(vcpus)),
                   (total * SHARED_START[SHARED_TICKET] + total * (total - 1) // 2) & U64),
    ]
    checks += [FinalCheck(f"vCPU {v} private entry", (gpa + PRIVATE_BASE + v * PRIVATE_STRIDE
                                                     + PRIVATE_LAST,), (v << 48) | 1)
               for v in range(vcpus)]
    varying = tuple(gpa + PRIVATE_BASE + v * PRIVATE_STRIDE + PRIVATE_TICKETS
                    for v in range(vcpus))
    return GuestProgram(
        name=f"shared-{layout.mode.name}-64x{vcpus}", code=a.assemble(),
        registers={"r10": 0, "r13": base, "r15": iterations}, monitored=bytes(monitored),
        writes_per_iteration=SHARED_WRITES_PER_ITERATION, vcpu_registers=per_vcpu,
        checks=tuple(checks), varying=varying,
        description=(f"{vcpus} vCPUs x {iterations} iterations on shared entries: lock xadd, "
                     "lock cmpxchg and cmpxchg8b loops, lock bts/btr on owned bits, private "
                     "mov"))
