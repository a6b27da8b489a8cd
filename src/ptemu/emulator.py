"""The only module the handler uses Unicorn through: run one instruction at
the guest's real linear addresses against copies of its pages.

Unicorn cannot map kernel addresses such as ``0xffff888000001000`` directly,
so the engine runs in its virtual-TLB mode: a TLB-fill hook translates each
linear page the instruction touches to one of a few physical pages of the
engine (the code window, the page-table page snapshot, a MOVS source, the
GDT). In 16/32-bit code the segment bases are real: the engine loads its own
GDT whose descriptors carry the guest's bases (and a 16-bit code descriptor for
16-bit code), so address generation is the CPU's, not ours.

Hooks only record; the caller decides. Nothing the caller passes is mutated.
One engine per code size is created once and reused for every run.
"""

from __future__ import annotations

import ctypes
import struct
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import unicorn as _unicorn
from unicorn import x86_const as ux
from unicorn.unicorn_py3.unicorn import uclib

unicorn: Any = _unicorn  # its bindings are only partly typed

from ptemu.decoder.model import LOCK, SEGMENT_OVERRIDES, DecodedStore, read_prefixes
from ptemu.registers import GENERAL_REGISTERS, RFLAGS_RESERVED_ONE, SEGMENT_BASES, register_value
from ptemu.values import PAGE_OFFSET_MASK, PAGE_SIZE, mask_bits, page_base

CODE_WINDOW_PAGES = 2
"""Pages of one code window: an instruction may cross into the next page."""
CODE_SLOTS = 64
"""Code windows kept in the engine, each with the blocks QEMU translated from
it: an instruction seen before runs without being translated again."""
ENGINE_DATA_BASE = CODE_SLOTS * CODE_WINDOW_PAGES * PAGE_SIZE
MAX_DATA_PAGES = 4
ENGINE_GDT = ENGINE_DATA_BASE + MAX_DATA_PAGES * PAGE_SIZE
ENGINE_MEMORY = ENGINE_GDT + PAGE_SIZE

_UNREACHABLE = 0x800
"""Distance from RIP to the stop address: far beyond a 15-byte instruction."""

ARITHMETIC_FLAGS = 0x8D5
"""CF PF AF ZF SF OF: the flags the stores ptemu emulates read or define."""
ENGINE_FLAGS = ARITHMETIC_FLAGS | 0x400
"""Plus DF, which string instructions read. Other guest flags (TF, IF, AC...)
are not handed to the engine: TF would trap in it, AC is not modelled."""

FAULT_NAMES = {0: "#DE", 1: "#DB", 3: "#BP", 5: "#BR", 6: "#UD", 7: "#NM", 12: "#SS",
               13: "#GP(0)", 14: "#PF", 16: "#MF", 17: "#AC(0)", 19: "#XM"}

_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss")
_SEGMENT_BASES = SEGMENT_BASES
_SELECTOR_IDS = {name: getattr(ux, f"UC_X86_REG_{name.upper()}") for name in _SEGMENTS}
_GPR64_IDS = {name: getattr(ux, f"UC_X86_REG_{name.upper()}") for name in GENERAL_REGISTERS}
_GPR32_IDS = {name: getattr(ux, f"UC_X86_REG_E{name[1:].upper()}")
              for name in GENERAL_REGISTERS[:8]}
_XMM_IDS = {f"xmm{i}": getattr(ux, f"UC_X86_REG_XMM{i}") for i in range(16)}


@dataclass(frozen=True, slots=True)
class EmulationRun:
    """What one run of the engine left behind."""

    registers: dict[str, int]
    """General registers, ``rip`` and ``rflags`` after the run (full guest
    widths: in 16/32-bit code the high halves are the guest's own)."""
    page: bytes
    """The first data page (the one the instruction writes) after the run."""
    fault: str | None = None
    """The exception the instruction raised instead of completing, if any."""
    refusal: str | None = None
    """Why the engine could not run it (an access outside the given pages)."""


def _descriptor(base: int, *, code: bool, default_32: bool) -> bytes:
    """A flat 4 GiB GDT descriptor with `base` (SDM vol. 3, 3.4.5)."""
    limit = 0xFFFFF
    access = 0x9B if code else 0x93  # present, DPL 0, code RX / data RW, accessed
    flags = 0x8 | (0x4 if default_32 else 0x0)  # G=1, D/B
    value = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (access << 40)
    value |= ((limit >> 16) & 0xF) << 48 | (flags << 52) | (((base >> 24) & 0xFF) << 56)
    return struct.pack("<Q", value)


class _RegisterBlock:
    """Registers moved with one ``uc_reg_{read,write}_batch`` call.

    The Python wrapper's per-register path costs several microseconds a
    register; one batch call over preallocated ctypes arrays costs about one.
    """

    def __init__(self, uc: Any, register_ids: Sequence[int]) -> None:
        count = len(register_ids)
        self._uc = uc
        self._count = count
        self._ids = (ctypes.c_int * count)(*register_ids)
        self.values = (ctypes.c_uint64 * count)()
        self._pointers = (ctypes.c_void_p * count)(
            *(ctypes.addressof(self.values) + 8 * i for i in range(count)))

    def write(self, values: Sequence[int]) -> None:
        self.values[:] = list(values)
        status = uclib.uc_reg_write_batch(self._uc._uch, self._ids, self._pointers, self._count)
        if status != unicorn.UC_ERR_OK:
            raise unicorn.UcError(status)

    def read(self) -> list[int]:
        ctypes.memset(self.values, 0, 8 * self._count)  # 32-bit registers fill the low half
        status = uclib.uc_reg_read_batch(self._uc._uch, self._ids, self._pointers, self._count)
        if status != unicorn.UC_ERR_OK:
            raise unicorn.UcError(status)
        return self.values[:]


class _Engine:
    """One Unicorn instance for one CPU mode, with its hooks installed once."""

    def __init__(self, mode: int) -> None:
        self.uc: Any = unicorn.Uc(unicorn.UC_ARCH_X86, mode)
        self.wide = mode == unicorn.UC_MODE_64
        gprs = _GPR64_IDS if self.wide else _GPR32_IDS
        self.gpr_names = tuple(gprs)
        flags_id = ux.UC_X86_REG_RFLAGS if self.wide else ux.UC_X86_REG_EFLAGS
        pc_id = ux.UC_X86_REG_RIP if self.wide else ux.UC_X86_REG_EIP
        bases = (ux.UC_X86_REG_FS_BASE, ux.UC_X86_REG_GS_BASE) if self.wide else ()
        self.state_in = _RegisterBlock(self.uc, (*gprs.values(), flags_id, pc_id, *bases))
        self.state_out = _RegisterBlock(self.uc, (*gprs.values(), flags_id, pc_id))
        self.uc.ctl_set_tlb_mode(unicorn.UC_TLB_VIRTUAL)
        self.uc.mem_map(0, ENGINE_MEMORY)  # code windows, data pages, GDT
        self.translations: dict[int, int] = {}
        self.fault_vector: int | None = None
        self.code_slots: OrderedDict[tuple[int, bytes], int] = OrderedDict()
        """(code linear address, code bytes) -> engine address of its window."""
        self.data_contents: list[bytes | None] = [None] * MAX_DATA_PAGES
        """What each engine data page holds now, to skip rewriting it."""
        self.segments: tuple[int, ...] | None = None
        """Code size, GDT page and segment bases last loaded (16/32-bit engine)."""
        self.uc.hook_add(unicorn.UC_HOOK_TLB_FILL, self._fill_tlb)
        self.uc.hook_add(unicorn.UC_HOOK_INTR, self._record_interrupt)

    def _fill_tlb(self, uc: Any, address: int, access: int, entry: Any, user_data: Any) -> bool:
        physical = self.translations.get(address & ~(PAGE_SIZE - 1))
        if physical is None:
            return False
        entry.paddr = physical
        entry.perms = unicorn.UC_PROT_ALL
        return True

    def _record_interrupt(self, uc: Any, vector: int, user_data: Any) -> None:
        self.fault_vector = vector
        uc.emu_stop()


class UnicornEmulator:
    """Runs one instruction of guest code at its real linear addresses."""

    def __init__(self) -> None:
        self._engines: dict[int, _Engine] = {}

    def _engine(self, code_bits: int) -> _Engine:
        key = 64 if code_bits == 64 else 32
        engine = self._engines.get(key)
        if engine is None:
            engine = _Engine(unicorn.UC_MODE_64 if key == 64 else unicorn.UC_MODE_32)
            self._engines[key] = engine
        return engine

    def run(self, *, code_bits: int, registers: Mapping[str, int], code: bytes,
            data_pages: Sequence[tuple[int, bytes]], steps: int = 1,
            vector_registers: Sequence[str] = ()) -> EmulationRun:
        """Execute `steps` instruction steps (one REP iteration each) of `code`.

        `data_pages` are ``(linear page address, 4 KiB contents)``: the only
        memory the instruction may touch besides its code; the first is the
        page it writes. `registers` are the guest's before the instruction;
        `vector_registers` the xmm registers it reads.
        """
        if len(data_pages) > MAX_DATA_PAGES:
            raise ValueError(f"at most {MAX_DATA_PAGES} data pages per run")
        engine = self._engine(code_bits)
        uc = engine.uc
        code = engine_code(code_bits, code)
        get = registers.get
        width = 64 if code_bits == 64 else 32
        low_mask = mask_bits(width)
        rip = get("rip", 0) & low_mask
        code_linear = rip if code_bits == 64 else (rip + get("cs_base", 0)) & low_mask
        code_page = page_base(code_linear)
        window = self._code_window(engine, code_linear, code)
        translations = {code_page: window, (code_page + PAGE_SIZE) & low_mask: window + PAGE_SIZE}
        for number, (linear_page, _) in enumerate(data_pages):
            # A data page may be the page after the code's (an instruction
            # that crosses into it is not one that writes it), not the code's own.
            if linear_page == code_page:
                return EmulationRun({}, data_pages[0][1],
                                    refusal="the instruction's code lies on a monitored page")
            translations[linear_page] = ENGINE_DATA_BASE + number * PAGE_SIZE

        for number, (_, contents) in enumerate(data_pages):
            if engine.data_contents[number] != contents:
                uc.mem_write(ENGINE_DATA_BASE + number * PAGE_SIZE, contents)
                engine.data_contents[number] = contents

        gdt_linear = 0
        if code_bits != 64:
            gdt_linear = self._free_page(translations, width)
            translations[gdt_linear] = ENGINE_GDT
        if translations != engine.translations:
            engine.translations = translations
            uc.ctl(unicorn.UC_CTL_TLB_FLUSH, unicorn.UC_CTL_IO_WRITE)
        engine.fault_vector = None

        guest_flags = get("rflags", RFLAGS_RESERVED_ONE)
        values = [get(name, 0) & low_mask for name in engine.gpr_names]
        values.append((guest_flags & ENGINE_FLAGS) | RFLAGS_RESERVED_ONE)
        values.append(rip)
        if code_bits == 64:
            values.append(get("fs_base", 0))
            values.append(get("gs_base", 0))
        else:
            segments = (code_bits, gdt_linear, *(get(base, 0) for base in _SEGMENT_BASES))
            if engine.segments != segments:
                self._load_segments(uc, registers, code_bits, gdt_linear)
                engine.segments = segments
        engine.state_in.write(values)
        for name in vector_registers:
            uc.reg_write(_XMM_IDS[name], register_value(registers, name))

        refusal = None
        fault = None
        try:
            # `until` must be an address one instruction cannot reach, inside
            # the code window (0 would stop at once an instruction at RIP 0).
            uc.emu_start(rip, (code_linear + _UNREACHABLE) & low_mask, count=steps)
        except unicorn.UcError as error:
            if error.errno == unicorn.UC_ERR_INSN_INVALID:
                fault = "#UD"
            elif error.errno in (unicorn.UC_ERR_READ_UNMAPPED, unicorn.UC_ERR_WRITE_UNMAPPED,
                                 unicorn.UC_ERR_FETCH_UNMAPPED):
                refusal = "the instruction accesses memory outside the pages it was given"
            else:
                refusal = f"the engine stopped: {error}"
        if engine.fault_vector is not None:
            fault = FAULT_NAMES.get(engine.fault_vector, f"vector {engine.fault_vector}")
        if fault is not None or refusal is not None:
            # An exception leaves QEMU's pending-exception state behind (the
            # next fault would be reported as #DF): start the next run afresh.
            del self._engines[64 if code_bits == 64 else 32]

        *gpr_values, flags, rip_after = engine.state_out.read()
        if width == 32:
            high = ~low_mask
            after = {name: value | (get(name, 0) & high)
                     for name, value in zip(engine.gpr_names, gpr_values)}
            rip_after |= rip & high
        else:
            after = dict(zip(engine.gpr_names, gpr_values))
        after["rip"] = rip_after
        after["rflags"] = (guest_flags & ~ENGINE_FLAGS) | (flags & ENGINE_FLAGS) | 0x2
        page = bytes(uc.mem_read(ENGINE_DATA_BASE, PAGE_SIZE))
        engine.data_contents[0] = page
        return EmulationRun(after, page, fault=fault, refusal=refusal)

    @staticmethod
    def _code_window(engine: _Engine, code_linear: int, code: bytes) -> int:
        """The engine address of a window holding `code` at `code_linear`.

        A window already holding these bytes at this address is reused with
        the blocks QEMU translated from it; otherwise the least recently used
        window is rewritten and the translation cache dropped (the engine does
        not notice a write over code it has translated).
        """
        key = (code_linear, code)
        slots = engine.code_slots
        window = slots.get(key)
        if window is not None:
            slots.move_to_end(key)
            return window
        if len(slots) < CODE_SLOTS:
            window = len(slots) * CODE_WINDOW_PAGES * PAGE_SIZE
        else:
            window = slots.popitem(last=False)[1]
        contents = bytearray(CODE_WINDOW_PAGES * PAGE_SIZE)
        start = code_linear & PAGE_OFFSET_MASK
        contents[start:start + len(code)] = code[:len(contents) - start]
        engine.uc.mem_write(window, bytes(contents))
        engine.uc.ctl_flush_tb()
        slots[key] = window
        return window

    @staticmethod
    def _free_page(translations: Mapping[int, int], width: int) -> int:
        """A linear page for the engine's GDT that the instruction does not use."""
        candidate = page_base(mask_bits(width))
        while candidate in translations:
            candidate -= PAGE_SIZE
        return candidate

    @staticmethod
    def _load_segments(uc: Any, registers: Mapping[str, int], code_bits: int,
                       gdt_linear: int) -> None:
        """Give every segment register the guest's base through the engine's GDT."""
        table = bytearray(8)  # the null descriptor
        selectors: dict[str, int] = {}
        for name in _SEGMENTS:
            selectors[name] = len(table)
            table += _descriptor(register_value(registers, f"{name}_base"),
                                 code=name == "cs", default_32=name != "cs" or code_bits == 32)
        uc.mem_write(ENGINE_GDT, bytes(table))
        uc.reg_write(ux.UC_X86_REG_GDTR, (0, gdt_linear, len(table) - 1, 0))
        for name in ("ds", "es", "fs", "gs", "ss", "cs"):
            uc.reg_write(_SELECTOR_IDS[name], selectors[name])


_ZF = 1 << 6
_REP = 0xF3
_REX_R = 0x4
_FS_GS_OVERRIDE = {"fs": 0x64, "gs": 0x65}
_NEG = 3
"""ModRM.reg of NEG in the F6/F7 group."""


def engine_code(code_bits: int, code: bytes) -> bytes:
    """`code` with the one instruction at its start re-encoded, at the same
    length and with the same meaning on the CPU, where Unicorn 2.1 would run
    the original wrongly:

    - LOCK NEG m: Unicorn computes SF and PF from the operand instead of the
      result. The engine runs one instruction on private copies, so the lock
      itself means nothing there: each F0 becomes F3, a prefix the CPU
      ignores on NEG (SDM vol. 2, 2.1.1: REP applies to string instructions
      only), and the flags come out as the CPU's.
    - REX.R on ``C6 /0`` / ``C7 /0`` (MOV m, imm): valid on the CPU (REX.R
      extends a ModRM.reg that is an opcode extension here, so it is
      ignored); Unicorn raises #UD. REX.R is cleared.

    - In 64-bit code an ES/CS/SS/DS override after an FS or GS override:
      the CPU ignores the null override and uses FS/GS; Unicorn takes the last
      override. Every override byte becomes the FS/GS one that counts.

    Any other code is returned as it is.
    """
    prefixes = read_prefixes(code, code_bits)
    start = prefixes.opcode
    if code_bits == 64:
        segment = prefixes.segment(64)
        if segment is not None:
            byte = _FS_GS_OVERRIDE[segment]
            code = bytes(byte if index < start and value in SEGMENT_OVERRIDES else value
                         for index, value in enumerate(code))
    if start + 1 >= len(code):
        return code
    opcode = code[start]
    modrm = code[start + 1]
    if opcode in (0xF6, 0xF7) and LOCK in prefixes.legacy and (modrm >> 3) & 7 == _NEG:
        head = bytes(_REP if byte == LOCK else byte for byte in code[:start])
        return head + code[start:]
    if opcode in (0xC6, 0xC7) and prefixes.rex & _REX_R:
        return code[:start - 1] + bytes([prefixes.rex & ~_REX_R]) + code[start:]
    return code


def settle_engine_registers(store: DecodedStore, before: Mapping[str, int],
                            after: dict[str, int]) -> None:
    """Bring a run's registers to what the CPU leaves, where the engine differs.

    - Unicorn 2.1 (QEMU 5) zero-extends RAX even when a 32-bit CMPXCHG in
      64-bit code succeeds (unicorn-engine issue #2332); the CPU writes EAX
      only on a mismatch (SDM vol. 2, CMPXCHG), so RAX stays as it was.
    - A REP string instruction run for exactly its remaining count stops on
      the instruction; the CPU has moved past it once the count is exhausted.
    """
    if store.family.name == "cmpxchg" and store.access_size == 4 and store.code_bits == 64 \
            and after["rflags"] & _ZF:
        after["rax"] = register_value(before, "rax")
    if store.rep and after["rip"] == register_value(before, "rip") and \
            after["rcx"] & mask_bits(store.destination.address_bits) == 0:
        width = 64 if store.code_bits == 64 else 32
        after["rip"] = (after["rip"] + store.length) & mask_bits(width)
