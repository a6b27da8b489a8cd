"""Run a capture's calls in Unicorn with paging on, recording every step.

The capture package's only import of Unicorn. It builds the guest of a
`GuestLayout` (physical pages, CR0/CR3/CR4/EFER, GDT and segment registers),
then runs each call from its entry until the code returns to the sentinel
address (or reaches HLT), with two hooks that only record:

* ``UC_HOOK_CODE`` reads the whole register set before each instruction; that
  read is also the previous instruction's state after;
* ``UC_HOOK_MEM_WRITE`` records each store. With the CPU's own page tables on,
  Unicorn 2.1 reports the store's *guest-physical* address; the hook runs
  before the store, so it also reads the bytes the store is about to replace.

Decisions (what is an event, coalescing, write states) are taken afterwards in
`ptemu.capture.events`. A REP string instruction runs one step per iteration,
each seen by the code hook at the same address.

One known engine erratum is corrected, in the engine itself before the next
instruction runs, so the rest of the run sees architectural state: Unicorn
2.1 (QEMU 5.0's translator) writes EAX back after a *successful* ``CMPXCHG
r/m32, r32`` in 64-bit code, clearing RAX bits 63:32, where the SDM's CMPXCHG
pseudocode (and hardware) leave the accumulator alone on success (Unicorn
issue #2332). The capture puts RAX back to its value before the instruction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import unicorn
from unicorn import x86_const as x86

from ptemu.capture.description import CaptureSpec, MemoryPatch
from ptemu.capture.layout import GuestLayout
from ptemu.capture.opcodes import is_cmpxchg_32bit_operand
from ptemu.errors import UsageError
from ptemu.values import PAGE_OFFSET_MASK, PAGE_SIZE

_ENGINE: Any = unicorn
"""The binding, untyped: its type hints are partial and mypy --strict rejects them."""

UNICORN_VERSION: str = _ENGINE.__version__
"""The engine that produced the captures (recorded in each fixture)."""

_EFER_MSR = 0xC000_0080
_NEVER = (1 << 64) - 1
"""An `until` address no instruction has, so only the hooks end a run."""
_HLT = 0xF4
_UC_ERROR: type[Exception] = _ENGINE.UcError

_GPR_64 = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
           "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_GPR_32 = _GPR_64[:8]
_SELECTORS = ("cs", "ds", "es", "fs", "gs", "ss")


def _register_ids(long_mode: bool) -> tuple[tuple[str, int], ...]:
    """Fixture register name -> Unicorn id for everything read per step."""
    if long_mode:
        names: list[tuple[str, int]] = [(n, getattr(x86, f"UC_X86_REG_{n.upper()}"))
                                        for n in _GPR_64]
        names += [("rip", x86.UC_X86_REG_RIP), ("rflags", x86.UC_X86_REG_RFLAGS),
                  ("fs_base", x86.UC_X86_REG_FS_BASE), ("gs_base", x86.UC_X86_REG_GS_BASE)]
    else:
        names = [(n, getattr(x86, f"UC_X86_REG_E{n[1:].upper()}")) for n in _GPR_32]
        names += [("rip", x86.UC_X86_REG_EIP), ("rflags", x86.UC_X86_REG_EFLAGS)]
    names += [(s, getattr(x86, f"UC_X86_REG_{s.upper()}")) for s in _SELECTORS]
    names += [("cr0", x86.UC_X86_REG_CR0), ("cr3", x86.UC_X86_REG_CR3),
              ("cr4", x86.UC_X86_REG_CR4)]
    return tuple(names)


def _xmm_ids(long_mode: bool) -> tuple[tuple[str, int], ...]:
    count = 16 if long_mode else 8
    return tuple((f"xmm{i}", getattr(x86, f"UC_X86_REG_XMM{i}")) for i in range(count))


@dataclass(frozen=True, slots=True)
class RawWrite:
    """One store as the write hook saw it."""

    gpa: int
    size: int
    value: int
    """The bytes stored, little-endian."""
    before: bytes
    """Memory at ``[gpa, gpa + size)`` just before the store."""


@dataclass(frozen=True, slots=True)
class Step:
    """One executed instruction (one iteration of a REP string instruction)."""

    gla: int
    """Linear address of the instruction."""
    size: int
    """Its length in bytes."""
    regs_before: Mapping[str, int]
    regs_after: Mapping[str, int]
    writes: tuple[RawWrite, ...]
    redelivered: bool = False
    """A second execution from the same registers (a ``deliver_twice`` event)."""


@dataclass(frozen=True, slots=True)
class CallRun:
    """What one call did."""

    steps: tuple[Step, ...]
    patches: tuple[MemoryPatch, ...]


@dataclass(frozen=True, slots=True)
class MachineRun:
    """Every call's steps, the memory at the end and the control registers set."""

    calls: tuple[CallRun, ...]
    final_pages: Mapping[int, bytes]
    """Monitored and data pages after the last call (GPA -> 4096 bytes)."""
    control: Mapping[str, int]
    """cr0, cr3, cr4, efer as Unicorn holds them after setup."""


class _Recorder:
    """The hooks' state while one call runs. Hooks only record."""

    def __init__(self, machine: _Machine, call_index: int, budget: int,
                 deliver_twice: frozenset[int], monitored: frozenset[int]) -> None:
        self.machine = machine
        self.call_index = call_index
        self.budget = budget
        self.deliver_twice = deliver_twice
        self.monitored = monitored
        self.steps: list[Step] = []
        self.current: tuple[int, int, dict[str, int], bool] | None = None
        self.writes: list[RawWrite] = []
        self.writing_steps = 0
        self.executed = 0
        self.finished = False
        self.redeliver: Step | None = None
        self.next_is_redelivery = False
        self.error: str | None = None

    def on_code(self, uc: Any, address: int, size: int, _data: object) -> None:
        regs = self.machine.read_registers()
        if self.current is not None:
            gla, length, before, again = self.current
            self.machine.correct_errata(gla, length, before, regs)
            step = Step(gla, length, MappingProxyType(before), MappingProxyType(regs),
                        tuple(self.writes), again)
            self.steps.append(step)
            self.current, self.writes = None, []
            if any(write.gpa & ~PAGE_OFFSET_MASK in self.monitored for write in step.writes):
                if not again and self.writing_steps in self.deliver_twice:
                    self.redeliver = step
                    self.writing_steps += 1
                    uc.emu_stop()
                    return
                if not again:
                    self.writing_steps += 1
        layout = self.machine.layout
        if address == layout.sentinel_gla or (
                size == 1 and self.machine.code_byte(address) == _HLT):
            self.finished = True
            uc.emu_stop()
            return
        self.executed += 1
        if self.executed > self.budget:
            self.error = f"did not return within {self.budget} instructions"
            uc.emu_stop()
            return
        self.current = (address, size, regs, self.next_is_redelivery)
        self.next_is_redelivery = False

    def on_write(self, uc: Any, _access: int, address: int, size: int, value: int,
                 _data: object) -> None:
        before = bytes(uc.mem_read(address, size))
        self.writes.append(RawWrite(address, size, value & ((1 << (8 * size)) - 1), before))


class _Machine:
    """One Unicorn instance holding the guest of a layout."""

    def __init__(self, spec: CaptureSpec, layout: GuestLayout) -> None:
        self.spec = spec
        self.layout = layout
        self.long_mode = spec.paging in ("4level", "5level")
        mode = unicorn.UC_MODE_64 if self.long_mode else unicorn.UC_MODE_32
        self.uc: Any = _ENGINE.Uc(unicorn.UC_ARCH_X86, mode)
        self.register_ids = _register_ids(self.long_mode)
        self.xmm_ids = _xmm_ids(self.long_mode)
        self.batch_ids = [register for _, register in self.register_ids]
        self.static: dict[str, int] = {}
        self._map_memory()
        self._set_system_state()

    def _map_memory(self) -> None:
        for gpa in sorted(self.layout.pages):
            self.uc.mem_map(gpa, PAGE_SIZE)
            self.uc.mem_write(gpa, self.layout.pages[gpa])

    def _set_system_state(self) -> None:
        uc, control = self.uc, self.layout.control
        uc.reg_write(x86.UC_X86_REG_CR3, control.cr3)
        uc.reg_write(x86.UC_X86_REG_CR4, control.cr4)
        uc.msr_write(_EFER_MSR, control.efer)
        uc.reg_write(x86.UC_X86_REG_CR0, control.cr0)
        got = {"cr0": uc.reg_read(x86.UC_X86_REG_CR0), "cr3": uc.reg_read(x86.UC_X86_REG_CR3),
               "cr4": uc.reg_read(x86.UC_X86_REG_CR4), "efer": uc.msr_read(_EFER_MSR)}
        wanted = {"cr0": control.cr0, "cr3": control.cr3, "cr4": control.cr4,
                  "efer": control.efer}
        for name, value in wanted.items():
            if got[name] != value:
                raise UsageError(f"capture: Unicorn {UNICORN_VERSION} did not take {name} = "
                                 f"{value:#x} (it holds {got[name]:#x})")
        self.control = got
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, self.layout.gdt_gla, self.layout.gdt_limit, 0))
        segments = self.layout.segments
        for name in ("cs", "ds", "es", "ss", "fs", "gs"):
            uc.reg_write(getattr(x86, f"UC_X86_REG_{name.upper()}"), segments[name].selector)
        if self.long_mode:
            uc.reg_write(x86.UC_X86_REG_FS_BASE, segments["fs"].base)
            uc.reg_write(x86.UC_X86_REG_GS_BASE, segments["gs"].base)
        # Bases Unicorn reads back only in long mode (and there FS/GS only) come
        # from the descriptors the layout wrote.
        self.static["efer"] = got["efer"]
        if not (self.long_mode and self.spec.code_bits == 64):
            for name in _SELECTORS:
                self.static[f"{name}_base"] = segments[name].base

    def correct_errata(self, gla: int, length: int, before: Mapping[str, int],
                       after: dict[str, int]) -> None:
        """Undo Unicorn's RAX write after a successful 32-bit CMPXCHG (module
        docstring); `after` is corrected in place, and so is the engine."""
        zero_flag = 1 << 6
        if (after["rflags"] & zero_flag and after["rax"] != before["rax"]
                and is_cmpxchg_32bit_operand(self.code(gla, length), self.spec.code_bits)):
            self.uc.reg_write(x86.UC_X86_REG_RAX, before["rax"])
            after["rax"] = before["rax"]

    def code(self, gla: int, length: int) -> bytes:
        """`length` bytes of code at linear address `gla` (as mapped now)."""
        return bytes(self.code_byte(gla + i) or 0 for i in range(length))

    def code_byte(self, gla: int) -> int | None:
        try:
            gpa = self.layout.translate(gla)
        except KeyError:
            return None
        return int(self.uc.mem_read(gpa, 1)[0])

    def read_registers(self) -> dict[str, int]:
        values = self.uc.reg_read_batch(self.batch_ids)
        regs = {name: int(value) for (name, _), value in zip(self.register_ids, values)}
        for name, register in self.xmm_ids:
            value = int(self.uc.reg_read(register))
            if value:
                regs[name] = value
        regs.update(self.static)
        return regs

    def write_entry_registers(self, regs: Mapping[str, int], rsp: int) -> None:
        """GPRs, RFLAGS and XMM for a call's entry (everything not given is 0)."""
        uc = self.uc
        for name in (_GPR_64 if self.long_mode else _GPR_32):
            value = rsp if name == "rsp" else regs.get(name, 0)
            if self.long_mode:
                uc.reg_write(getattr(x86, f"UC_X86_REG_{name.upper()}"), value)
            else:
                uc.reg_write(getattr(x86, f"UC_X86_REG_E{name[1:].upper()}"), value)
        flags = x86.UC_X86_REG_RFLAGS if self.long_mode else x86.UC_X86_REG_EFLAGS
        uc.reg_write(flags, regs.get("rflags", 0x2))
        for name, register in self.xmm_ids:
            uc.reg_write(register, regs.get(name, 0))

    def restore(self, regs: Mapping[str, int]) -> None:
        """Put back the registers of a step's before-state (for a redelivery)."""
        self.write_entry_registers(regs, regs["rsp"])

    def push_frame(self, stack_args: tuple[int, ...]) -> int:
        """Write the return address (the sentinel) and stack arguments; return RSP."""
        word = 8 if self.spec.code_bits == 64 else 4 if self.spec.code_bits == 32 else 2
        words = (self.layout.sentinel_rip, *stack_args)
        base = self.layout.stack_top_gla - 64 - word * len(words)
        for index, value in enumerate(words):
            gla = base + index * word
            self.uc.mem_write(self.layout.translate(gla), value.to_bytes(word, "little"))
        rsp = base - self.layout.segments["ss"].base
        return rsp if self.spec.code_bits == 64 else rsp & 0xFFFF_FFFF

    def run(self) -> MachineRun:
        monitored = frozenset(self.layout.monitored)
        runs: list[CallRun] = []
        for index, call in enumerate(self.spec.calls):
            for patch in call.memory:
                self.uc.mem_write(patch.gpa, patch.data)
            rsp = self.push_frame(call.stack_args)
            self.write_entry_registers(call.regs, rsp)
            recorder = _Recorder(self, index, self.spec.max_instructions, call.deliver_twice,
                                 monitored)
            hooks = [self.uc.hook_add(unicorn.UC_HOOK_CODE, recorder.on_code),
                     self.uc.hook_add(unicorn.UC_HOOK_MEM_WRITE, recorder.on_write)]
            start = self.layout.rip_of(call.entry)
            try:
                while True:
                    self._start(start, index)
                    if recorder.redeliver is None:
                        break
                    again = recorder.redeliver
                    recorder.redeliver, recorder.current, recorder.writes = None, None, []
                    recorder.next_is_redelivery = True
                    self.restore(again.regs_before)
                    start = again.regs_before["rip"]
            finally:
                for hook in hooks:
                    self.uc.hook_del(hook)
            if recorder.error is not None or not recorder.finished:
                reason = recorder.error or "stopped before returning"
                raise UsageError(f"capture {self.spec.name}: calls[{index}]: {reason}")
            runs.append(CallRun(tuple(recorder.steps), call.memory))
        pages = {gpa: bytes(self.uc.mem_read(gpa, PAGE_SIZE))
                 for gpa in (*self.layout.monitored, *self.layout.data_pages)}
        return MachineRun(tuple(runs), MappingProxyType(pages),
                          MappingProxyType(dict(self.control)))

    def _start(self, rip: int, index: int) -> None:
        try:
            self.uc.emu_start(rip, _NEVER)
        except _UC_ERROR as error:
            where = self.uc.reg_read(x86.UC_X86_REG_RIP if self.long_mode
                                     else x86.UC_X86_REG_EIP)
            raise UsageError(f"capture {self.spec.name}: calls[{index}]: the CPU stopped "
                             f"with {error} at rip {where:#x}") from None


def run_machine(spec: CaptureSpec, layout: GuestLayout) -> MachineRun:
    """Build the guest and run every call of `spec`. Raises `UsageError` when
    the code faults, never returns, or Unicorn refuses the paging setup."""
    return _Machine(spec, layout).run()
