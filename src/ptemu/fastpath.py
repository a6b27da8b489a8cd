"""A pure-Python engine for the common page-table stores: the handler's fast path.

`emulate_fast(store, regs, destination)` computes what one store instruction
leaves at its destination and in the registers, as the Unicorn path
(`ptemu.emulator`) reports it, in about a microsecond instead of Unicorn's
tens: MOV, MOVNTI, STOS without REP, XCHG, CMPXCHG, CMPXCHG8B, AND/OR/XOR,
BTS/BTR/BTC, ADD/SUB/ADC/SBB, INC/DEC, NOT/NEG and XADD. Any other form (REP,
MOVS, vector stores, CMPXCHG16B, LOCK on MOV/STOS/MOVNTI, which the CPU
refuses with #UD) gives None, and the handler runs Unicorn.

Each `DecodedStore` is compiled once into a closure (`compile_fast`) that
holds everything the store fixes (sizes, masks, the registers it reads and
writes, the flag arithmetic); a call only reads registers, does the
arithmetic and builds the result. `emulate_fast` finds the closure by the
store's identity; a caller that keeps stores in a cache of its own can keep
the closure beside each one and skip that look-up.

Register conventions are the handler's:

* in 64-bit code a 32-bit register write zero-extends into the 64-bit
  register; 8- and 16-bit writes merge (``ah`` is bits 15:8);
* in 16/32-bit code the upper 32 bits the caller gives for a register are
  kept, and a 32-bit write replaces the low 32 bits;
* RIP moves past the instruction, wrapped to 64 bits in 64-bit code and to
  32 bits otherwise (16-bit code included: the engine runs 16-bit code in a
  16-bit code segment of its 32-bit CPU, whose EIP does not wrap at 64 KiB);
* RFLAGS is the guest's with the flags the instruction sets replaced and
  bit 1 set; every other bit (DF, IF, TF, AC...) passes through.

Flags the SDM leaves undefined are given the values Unicorn 2.1 (QEMU 5)
gives them, so that both engines agree bit for bit:

* AND/OR/XOR: AF is cleared (QEMU's ``CC_OP_LOGIC`` computes AF = 0);
* BTS/BTR/BTC: only CF changes; OF, SF, AF, PF (undefined) and ZF (unaffected)
  keep the guest's values. QEMU translates BT* at the start of a translation
  block, where the condition-code state is dynamic: it computes EFLAGS and
  replaces CF alone.

One deliberate difference: a 32-bit CMPXCHG in 64-bit code whose compare
succeeds leaves RAX alone here, as the SDM says and hardware does; Unicorn 2.1
zero-extends EAX into RAX even on success (unicorn-engine/unicorn#2332). The
two agree whenever the upper half of RAX is zero or the compare fails.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache

from ptemu.decoder.families import AF, CF, DF, OF, PF, SF, STATUS_FLAGS, ZF
from ptemu.decoder.model import SUB_REGISTERS, DecodedStore
from ptemu.errors import UsageError
from ptemu.registers import RFLAGS_RESERVED_ONE

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1
_ONE = RFLAGS_RESERVED_ONE

_PARITY: tuple[int, ...] = tuple(0 if byte.bit_count() & 1 else PF for byte in range(256))
"""PF for each value of a result's low byte: set when it has an even number of ones."""

_CACHE_LIMIT = 8192
"""Compiled stores `emulate_fast` keeps; past it the cache starts over."""

_SIZES = frozenset({1, 2, 4, 8})


@dataclass(frozen=True, slots=True)
class FastStore:
    """What one instruction did: the bytes it left and the registers it changed."""

    stored: bytes
    """The bytes the instruction leaves at its destination (``access_size`` bytes)."""
    registers: dict[str, int]
    """Every register whose value changed (full names: ``rax``.., ``rip``,
    ``rflags``), with its new value. ``rflags`` only when its value changed."""


_new_object = object.__new__
_set_stored = FastStore.__dict__["stored"].__set__
_set_registers = FastStore.__dict__["registers"].__set__


def _fast_store(stored: bytes, registers: dict[str, int]) -> FastStore:
    """`FastStore(stored, registers)` in 0.3 us instead of 0.5: the frozen
    dataclass's own ``__init__`` sets the same slots, through one more layer."""
    record: FastStore = _new_object(FastStore)
    _set_stored(record, stored)
    _set_registers(record, registers)
    return record


FastEmulator = Callable[[Mapping[str, int], bytes], FastStore]
"""A compiled store: ``(registers before, destination bytes) -> FastStore``."""

_Source = tuple[str, int, int]
"""A register read: (full register, shift, mask)."""
_Target = tuple[str, int, int]
"""A register write: (full register, bits kept from the old value, shift)."""
_Operation = Callable[[int, int, int], tuple[int, int]]
"""(destination, operand, rflags before) -> (result, flags it computes)."""

_COMPILED: dict[int, tuple[DecodedStore, FastEmulator | None]] = {}


def emulate_fast(store: DecodedStore, regs: Mapping[str, int],
                 destination: bytes) -> FastStore | None:
    """Emulate `store` for registers `regs`, or None for a form not handled here.

    `destination` is the ``store.access_size`` bytes at the destination
    address before the instruction; for BTS/BTR/BTC with a register bit
    offset, the operand-sized unit that holds the bit (the one
    `ptemu.decoder.model.destination_address` designates). Registers missing
    from `regs` read as 0 (``rflags`` as 0x2). Raises `UsageError` when
    `destination` has the wrong length.
    """
    entry = _COMPILED.get(id(store))
    if entry is None or entry[0] is not store:
        if len(_COMPILED) >= _CACHE_LIMIT:
            _COMPILED.clear()
        entry = (store, compile_fast(store))
        _COMPILED[id(store)] = entry  # the entry holds the store, so its id stays its own
    emulator = entry[1]
    if emulator is None:
        return None
    return emulator(regs, destination)


def compile_fast(store: DecodedStore) -> FastEmulator | None:
    """The closure that emulates `store`, or None when the fast path does not handle it."""
    if store.rep or store.access_size not in _SIZES:
        return None
    words = store.mnemonic.split()
    name = words[-1] if words else ""
    if name not in store.family.instructions:
        return None
    if store.access_size == 8 and store.code_bits != 64 and name != "cmpxchg8b":
        return None
    builder = _BUILDERS.get(store.family.name)
    if builder is None:
        return None
    if store.lock and store.family.name in _NOT_LOCKABLE:
        return None  # the CPU raises #UD (Unicorn 2.1 ignores the prefix): not ours to guess
    return builder(store, name)


# -- register access, fixed per store ------------------------------------------------------


def _source(name: str | None) -> _Source | None:
    sub = SUB_REGISTERS.get(name) if name is not None else None
    if sub is None or sub.bits > 64 or sub.full == "rip":
        return None
    return sub.full, sub.shift, (1 << sub.bits) - 1


def _target(name: str, code_bits: int) -> _Target:
    sub = SUB_REGISTERS[name]
    if sub.bits == 64 or (sub.bits == 32 and code_bits == 64):
        keep = 0
    else:
        keep = _MASK64 & ~(((1 << sub.bits) - 1) << sub.shift)
    return sub.full, keep, sub.shift


def _accumulator(size: int) -> str:
    return {1: "al", 2: "ax", 4: "eax", 8: "rax"}[size]


def _rip_mask(store: DecodedStore) -> int:
    return _MASK64 if store.code_bits == 64 else _MASK32


def _wrong_destination(store: DecodedStore, destination: bytes) -> UsageError:
    return UsageError(f"emulate_fast: '{store.text}' needs {store.access_size} destination "
                      f"bytes, got {len(destination)}")


# -- the arithmetic, fixed per operand size -------------------------------------------------


@cache
def _operations(bits: int) -> dict[str, _Operation]:
    """Every read-modify-write operation at one operand size (SDM vol. 2 flag rules)."""
    mask = (1 << bits) - 1
    sign = 1 << (bits - 1)
    parity = _PARITY

    def add(a: int, b: int, carry: int) -> tuple[int, int]:
        total = a + b + carry
        result = total & mask
        flags = parity[result & 0xFF] | ((a ^ b ^ result) & AF)
        if total > mask:
            flags |= CF
        if not result:
            flags |= ZF
        if result & sign:
            flags |= SF
        if (a ^ result) & (b ^ result) & sign:
            flags |= OF
        return result, flags

    def subtract(a: int, b: int, borrow: int) -> tuple[int, int]:
        total = a - b - borrow
        result = total & mask
        flags = parity[result & 0xFF] | ((a ^ b ^ result) & AF)
        if total < 0:
            flags |= CF
        if not result:
            flags |= ZF
        if result & sign:
            flags |= SF
        if (a ^ b) & (a ^ result) & sign:
            flags |= OF
        return result, flags

    def logic_flags(result: int) -> int:
        flags = parity[result & 0xFF]
        if not result:
            flags |= ZF
        if result & sign:
            flags |= SF
        return flags

    def op_add(a: int, b: int, rflags: int) -> tuple[int, int]:
        return add(a, b, 0)

    def op_adc(a: int, b: int, rflags: int) -> tuple[int, int]:
        return add(a, b, rflags & CF)

    def op_sub(a: int, b: int, rflags: int) -> tuple[int, int]:
        return subtract(a, b, 0)

    def op_sbb(a: int, b: int, rflags: int) -> tuple[int, int]:
        return subtract(a, b, rflags & CF)

    def op_neg(a: int, b: int, rflags: int) -> tuple[int, int]:
        return subtract(0, a, 0)

    def op_and(a: int, b: int, rflags: int) -> tuple[int, int]:
        result = a & b
        return result, logic_flags(result)

    def op_or(a: int, b: int, rflags: int) -> tuple[int, int]:
        result = a | b
        return result, logic_flags(result)

    def op_xor(a: int, b: int, rflags: int) -> tuple[int, int]:
        result = a ^ b
        return result, logic_flags(result)

    def op_not(a: int, b: int, rflags: int) -> tuple[int, int]:
        return a ^ mask, 0

    def op_bts(a: int, b: int, rflags: int) -> tuple[int, int]:
        return a | (1 << b), (a >> b) & 1

    def op_btr(a: int, b: int, rflags: int) -> tuple[int, int]:
        return a & ~(1 << b), (a >> b) & 1

    def op_btc(a: int, b: int, rflags: int) -> tuple[int, int]:
        return a ^ (1 << b), (a >> b) & 1

    return {"add": op_add, "xadd": op_add, "adc": op_adc, "sub": op_sub, "sbb": op_sbb,
            "neg": op_neg, "inc": op_add, "dec": op_sub, "and": op_and, "or": op_or,
            "xor": op_xor, "not": op_not, "bts": op_bts, "btr": op_btr, "btc": op_btc}


_DEFINED_FLAGS = {
    "inc": STATUS_FLAGS & ~CF, "dec": STATUS_FLAGS & ~CF,  # INC/DEC leave CF alone
    "not": 0,
    "bts": CF, "btr": CF, "btc": CF,  # the others as Unicorn leaves them: unchanged
}
"""Flags each operation replaces, when not all six status flags."""

_NOT_LOCKABLE = frozenset({"mov", "stos", "movnti"})


# -- one builder per family ------------------------------------------------------------------


def _build_move(store: DecodedStore, name: str) -> FastEmulator | None:
    """MOV/MOVNTI: the source register's or the immediate's bytes; nothing else changes."""
    size = store.access_size
    rip_mask = _rip_mask(store)
    length = store.length
    if store.source_register is None:
        if store.immediate is None or name != "mov":
            return None
        stored = (store.immediate & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

        def move_immediate(regs: Mapping[str, int], destination: bytes) -> FastStore:
            if len(destination) != size:
                raise _wrong_destination(store, destination)
            get = regs.get
            changed = {"rip": ((get("rip", 0) & rip_mask) + length) & rip_mask}
            flags = get("rflags", _ONE)
            if not flags & _ONE:
                changed["rflags"] = flags | _ONE
            return _fast_store(stored, changed)

        return move_immediate
    source = _source(store.source_register)
    if source is None or source[2] != (1 << (8 * size)) - 1:
        return None
    full, shift, mask = source

    def move_register(regs: Mapping[str, int], destination: bytes) -> FastStore:
        if len(destination) != size:
            raise _wrong_destination(store, destination)
        get = regs.get
        changed = {"rip": ((get("rip", 0) & rip_mask) + length) & rip_mask}
        flags = get("rflags", _ONE)
        if not flags & _ONE:
            changed["rflags"] = flags | _ONE
        return _fast_store(((get(full, 0) >> shift) & mask).to_bytes(size, "little"), changed)

    return move_register


def _build_stos(store: DecodedStore, name: str) -> FastEmulator | None:
    """STOS: store the accumulator at ES:rDI, then step rDI by the size, down when DF."""
    size = store.access_size
    rip_mask = _rip_mask(store)
    length = store.length
    accumulator = _source(_accumulator(size))
    assert accumulator is not None
    _, _, mask = accumulator
    address_bits = store.destination.address_bits
    address_mask = (1 << address_bits) - 1
    # rDI is written at the address size: DI merges, EDI zero-extends in 64-bit code.
    keep = 0 if store.code_bits == 64 and address_bits >= 32 else _MASK64 & ~address_mask

    def stos(regs: Mapping[str, int], destination: bytes) -> FastStore:
        if len(destination) != size:
            raise _wrong_destination(store, destination)
        get = regs.get
        flags = get("rflags", _ONE)
        changed = {"rip": ((get("rip", 0) & rip_mask) + length) & rip_mask}
        old = get("rdi", 0)
        step = -size if flags & DF else size
        new = (old & keep) | (((old & address_mask) + step) & address_mask)
        if new != old:
            changed["rdi"] = new
        if not flags & _ONE:
            changed["rflags"] = flags | _ONE
        return _fast_store((get("rax", 0) & mask).to_bytes(size, "little"), changed)

    return stos


def _build_xchg(store: DecodedStore, name: str) -> FastEmulator | None:
    """XCHG: the register's bytes to memory, the memory's old value to the register."""
    size = store.access_size
    rip_mask = _rip_mask(store)
    length = store.length
    source = _source(store.source_register)
    if source is None or source[2] != (1 << (8 * size)) - 1:
        return None
    assert store.source_register is not None
    full, shift, mask = source
    _, keep, _ = _target(store.source_register, store.code_bits)

    def xchg(regs: Mapping[str, int], destination: bytes) -> FastStore:
        if len(destination) != size:
            raise _wrong_destination(store, destination)
        get = regs.get
        changed = {"rip": ((get("rip", 0) & rip_mask) + length) & rip_mask}
        old = get(full, 0)
        stored = ((old >> shift) & mask).to_bytes(size, "little")
        new = (old & keep) | (int.from_bytes(destination, "little") << shift)
        if new != old:
            changed[full] = new
        flags = get("rflags", _ONE)
        if not flags & _ONE:
            changed["rflags"] = flags | _ONE
        return _fast_store(stored, changed)

    return xchg


def _build_cmpxchg(store: DecodedStore, name: str) -> FastEmulator | None:
    """CMPXCHG: flags of CMP accumulator, destination; equal: store the source;
    else write the old value back and load it into the accumulator."""
    size = store.access_size
    rip_mask = _rip_mask(store)
    length = store.length
    source = _source(store.source_register)
    mask = (1 << (8 * size)) - 1
    if source is None or source[2] != mask:
        return None
    full, shift, _ = source
    _, keep, _ = _target(_accumulator(size), store.code_bits)
    sign = 1 << (8 * size - 1)
    parity = _PARITY
    other_flags = ~STATUS_FLAGS

    def cmpxchg(regs: Mapping[str, int], destination: bytes) -> FastStore:
        if len(destination) != size:
            raise _wrong_destination(store, destination)
        get = regs.get
        changed = {"rip": ((get("rip", 0) & rip_mask) + length) & rip_mask}
        accumulator = get("rax", 0)
        current = int.from_bytes(destination, "little")
        # The flags of CMP accumulator, current (as `_operations`' subtract, inlined:
        # CMPXCHG is the second most frequent page-table store).
        compared = accumulator & mask
        total = compared - current
        difference = total & mask
        computed = parity[difference & 0xFF] | ((compared ^ current ^ difference) & AF)
        if total < 0:
            computed |= CF
        if difference & sign:
            computed |= SF
        if (compared ^ current) & (compared ^ difference) & sign:
            computed |= OF
        if not difference:
            computed |= ZF
            stored = ((get(full, 0) >> shift) & mask).to_bytes(size, "little")
        else:
            stored = destination
            new = (accumulator & keep) | current
            if new != accumulator:
                changed["rax"] = new
        flags = get("rflags", _ONE)
        new_flags = (flags & other_flags) | computed | _ONE
        if new_flags != flags:
            changed["rflags"] = new_flags
        return _fast_store(stored, changed)

    return cmpxchg


def _build_cmpxchg8b(store: DecodedStore, name: str) -> FastEmulator | None:
    """CMPXCHG8B: EDX:EAX == m64 -> m64 := ECX:EBX, ZF=1; else EDX:EAX := m64
    (old value written back), ZF=0. The other flags are unaffected."""
    if store.access_size != 8:
        return None
    rip_mask = _rip_mask(store)
    length = store.length
    # EAX/EDX loads zero-extend in 64-bit code and keep the caller's high half otherwise.
    keep = 0 if store.code_bits == 64 else _MASK64 & ~_MASK32

    def cmpxchg8b(regs: Mapping[str, int], destination: bytes) -> FastStore:
        if len(destination) != 8:
            raise _wrong_destination(store, destination)
        get = regs.get
        changed = {"rip": ((get("rip", 0) & rip_mask) + length) & rip_mask}
        current = int.from_bytes(destination, "little")
        rax = get("rax", 0)
        rdx = get("rdx", 0)
        flags = get("rflags", _ONE)
        if current == ((rdx & _MASK32) << 32) | (rax & _MASK32):
            stored = (((get("rcx", 0) & _MASK32) << 32)
                      | (get("rbx", 0) & _MASK32)).to_bytes(8, "little")
            new_flags = flags | ZF | _ONE
        else:
            stored = destination
            new_flags = (flags & ~ZF) | _ONE
            new = (rax & keep) | (current & _MASK32)
            if new != rax:
                changed["rax"] = new
            new = (rdx & keep) | (current >> 32)
            if new != rdx:
                changed["rdx"] = new
        if new_flags != flags:
            changed["rflags"] = new_flags
        return _fast_store(stored, changed)

    return cmpxchg8b


def _build_read_modify_write(store: DecodedStore, name: str) -> FastEmulator | None:
    """AND/OR/XOR, BT*, ADD/SUB/ADC/SBB, INC/DEC, NOT/NEG, XADD: destination := op(destination,
    operand), with the operation's flags; XADD also loads the old destination into its source."""
    size = store.access_size
    bits = 8 * size
    mask = (1 << bits) - 1
    rip_mask = _rip_mask(store)
    length = store.length
    operation = _operations(bits).get(name)
    if operation is None:
        return None
    defined = _DEFINED_FLAGS.get(name, STATUS_FLAGS)
    keep_flags = ~defined
    full: str | None = None
    shift = 0
    operand_mask = mask
    constant = 0
    if name in ("inc", "dec"):
        constant = 1
    elif name in ("not", "neg"):
        pass
    elif store.source_register is not None:
        source = _source(store.source_register)
        if source is None or source[2] != mask:
            return None
        full, shift, _ = source
        if store.family.bit_test:
            operand_mask = bits - 1  # the bit offset modulo the operand size
    elif store.immediate is not None and name != "xadd":
        constant = store.immediate & (bits - 1 if store.family.bit_test else mask)
    else:
        return None
    xadd_target: _Target | None = None
    if name == "xadd":
        assert store.source_register is not None
        xadd_target = _target(store.source_register, store.code_bits)

    def read_modify_write(regs: Mapping[str, int], destination: bytes) -> FastStore:
        if len(destination) != size:
            raise _wrong_destination(store, destination)
        get = regs.get
        changed = {"rip": ((get("rip", 0) & rip_mask) + length) & rip_mask}
        flags = get("rflags", _ONE)
        current = int.from_bytes(destination, "little")
        operand = constant if full is None else (get(full, 0) >> shift) & operand_mask
        result, computed = operation(current, operand, flags)
        if xadd_target is not None:
            target, keep, target_shift = xadd_target
            old = get(target, 0)
            new = (old & keep) | (current << target_shift)
            if new != old:
                changed[target] = new
        new_flags = (flags & keep_flags) | (computed & defined) | _ONE
        if new_flags != flags:
            changed["rflags"] = new_flags
        return _fast_store(result.to_bytes(size, "little"), changed)

    return read_modify_write


_BUILDERS: dict[str, Callable[[DecodedStore, str], FastEmulator | None]] = {
    "mov": _build_move,
    "movnti": _build_move,
    "stos": _build_stos,
    "xchg": _build_xchg,
    "cmpxchg": _build_cmpxchg,
    "cmpxchg8b": _build_cmpxchg8b,
    "logic": _build_read_modify_write,
    "bit-test": _build_read_modify_write,
    "arithmetic": _build_read_modify_write,
    "inc-dec": _build_read_modify_write,
    "not": _build_read_modify_write,
}
"""Family name (a row of `ptemu.decoder.families.FAMILIES`) -> its builder."""
