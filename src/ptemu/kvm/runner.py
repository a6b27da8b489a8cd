"""Run a guest under KVM and check ptemu's handler against every real exit.

The monitored page-table pages sit in a read-only memslot, so each guest
write to them stops the vCPU with KVM_EXIT_MMIO: KVM has decoded and
executed the instruction itself and reports the physical address, length
and bytes; the vCPU's registers already hold their values *after* the
instruction. The registers *before* it come from single-stepping
(KVM_GUESTDBG_SINGLESTEP): KVM_EXIT_DEBUG after every instruction, and the
state at the last one is the state before the next. An instruction that
exits as MMIO does not also report a debug exit, so the last debug state is
exactly the state before the write.

At each write the runner does what an introspection engine does: it takes
the instruction bytes at CS:RIP through a walk of the guest's own page
tables, and calls `PtWriteHandler.handle_ept_write` with the registers
before the instruction, the GPA and the GLA. The handler commits its bytes
to the page as an engine would. Then the runner compares, with the fixture
comparison (`ptemu.fixtures.compare_event`):

* the bytes the handler stored with the bytes KVM reports (split per entry,
  with each entry's value before the write), and the whole page the handler
  committed with the page before plus KVM's bytes, and
* the registers the handler computes with the vCPU's registers after the
  instruction (RFLAGS outside the instruction's undefined flags).

A disagreement is recorded with the instruction, both values and the
registers, and the page is then set to what KVM wrote, so the guest always
continues on the hardware's result. A write the handler refuses ends the
run. Every run is bounded by a number of exits and by time.
"""

from __future__ import annotations

import signal
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum

from ptemu.errors import UsageError
from ptemu.fixtures.compare import Mismatch, compare_event
from ptemu.fixtures.model import Expectation
from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.kvm import abi
from ptemu.kvm.device import KvmSystem, VcpuHandle, regs_from_raw
from ptemu.kvm.layout import PAGE, GuestLayout
from ptemu.kvm.machine import GuestMachine
from ptemu.kvm.programs import GuestProgram
from ptemu.paging.walk import walk
from ptemu.results import EventResult, WriteRecord
from ptemu.status import Policy, Status
from ptemu.vcpu import Vcpu

CODE_FETCH_BYTES = 16
"""Bytes taken at RIP: a whole instruction (at most 15) and one more."""
GENERAL_REGISTERS = abi.KVM_REGS_NAMES
_RIP_OFFSET = 8 * GENERAL_REGISTERS.index("rip")
HLT = b"\xf4"
_PREFIXES = frozenset({"lock", "rep", "repe", "repne", "repz", "repnz"})


class StopReason(StrEnum):
    """Why a run ended."""

    HALTED = "halted"
    """The guest executed HLT: it finished its program."""
    TRIPLE_FAULT = "triple-fault"
    """KVM_EXIT_SHUTDOWN: the guest raised an exception it could not deliver."""
    EXIT_LIMIT = "exit-limit"
    """The bound on VM exits was reached (a runaway guest)."""
    TIMEOUT = "timeout"
    """The bound on wall-clock time was reached (a runaway guest)."""
    REFUSED = "handler-refused"
    """ptemu's handler did not emulate a write that KVM executed."""
    UNEXPECTED_EXIT = "unexpected-exit"
    """An exit the runner cannot handle (port I/O, an MMIO read, a write
    outside the monitored pages, a KVM internal error...)."""
    STOPPED = "stopped"
    """Another vCPU's run ended first (a guest with several vCPUs)."""


@dataclass(frozen=True, slots=True)
class RunLimits:
    """Bounds on one run; reaching either ends it with a report."""

    max_exits: int = 10_000_000
    timeout: float = 600.0
    """Seconds of wall-clock time."""
    keep_disagreements: int = 20
    """Disagreements kept in the report (all are counted)."""

    def __post_init__(self) -> None:
        if self.max_exits < 1:
            raise UsageError(f"max exits: {self.max_exits} is not positive")
        if not self.timeout > 0:
            raise UsageError(f"timeout: {self.timeout} is not positive")


@dataclass(frozen=True, slots=True)
class ObservedWrite:
    """One guest write to a monitored page as KVM executed it."""

    index: int
    """Position among the run's writes, from 0."""
    gpa: int
    gla: int
    data: bytes
    """The bytes KVM reported (KVM_EXIT_MMIO ``data[:len]``)."""
    regs: Mapping[str, int]
    """Registers before the instruction (general, RIP, RFLAGS, segments, CR0/3/4, EFER)."""
    after: Mapping[str, int]
    """General registers, RIP and RFLAGS after it, from the vCPU."""
    code: bytes
    """Bytes at RIP, fetched through the guest's page tables."""
    expect: Expectation
    """What KVM did, as a fixture expectation: status, writes per entry, changed registers."""


@dataclass(frozen=True, slots=True)
class Disagreement:
    """A write where ptemu's handler and KVM differ."""

    write: ObservedWrite
    mismatches: tuple[Mismatch, ...]
    result: EventResult

    def describe(self) -> str:
        """Several lines: the instruction, each difference, the registers before."""
        w = self.write
        head = (f"write #{w.index}: rip={w.regs['rip']:#x} code={w.code.hex(' ')} "
                f"gpa={w.gpa:#x} gla={w.gla:#x} kvm data={w.data.hex(' ')}")
        lines = [head]
        lines += [f"  {m.key}: kvm {m.expected}, ptemu {m.actual}" for m in self.mismatches]
        lines.append("  registers before: " + " ".join(
            f"{name}={w.regs[name]:#x}" for name in GENERAL_REGISTERS))
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class RunReport:
    """What one guest run did and saw."""

    program: str
    paging: str
    code_bits: int
    monitored: bool
    stop: StopReason
    detail: str
    exits: int
    """KVM_RUN returns."""
    steps: int
    """Single-step (KVM_EXIT_DEBUG) exits."""
    writes: int
    """Monitored writes handled (KVM_EXIT_MMIO exits checked against the handler)."""
    disagreement_count: int
    disagreements: tuple[Disagreement, ...]
    elapsed: float
    """Seconds from the first KVM_RUN to the end."""
    handler_seconds: float
    """Seconds spent inside the handler."""
    final_regs: Mapping[str, int]
    initial_tables: bytes
    final_tables: bytes
    observed: tuple[ObservedWrite, ...] = ()
    """Every write, when the run was asked to capture them."""
    refused: EventResult | None = None
    """The handler's result for the write it refused (stop `REFUSED`)."""
    families: Mapping[str, int] = field(default_factory=dict)
    """Writes per instruction mnemonic, as the handler decoded them."""
    raced: int = 0
    """Writes (several vCPUs only) where KVM's emulation read the entry before
    another vCPU's commit changed it, and agreed with ptemu given that value."""
    rewritten: int = 0
    """Writes (several vCPUs only) after which the vCPU's registers were set
    to the handler's, because KVM had computed them from an older value."""

    @property
    def ok(self) -> bool:
        """The guest finished and ptemu agreed with KVM on every write."""
        return self.stop is StopReason.HALTED and self.disagreement_count == 0

    @property
    def writes_per_second(self) -> float:
        return self.writes / self.elapsed if self.elapsed > 0 else 0.0


@contextmanager
def _alarm(seconds: float, run_page: abi.RunPage) -> Iterator[None]:
    """Interrupt KVM_RUN after `seconds` (SIGALRM + ``immediate_exit``).

    A guest that never exits (an unmonitored run stuck in a loop) would block
    KVM_RUN forever; the signal makes it return EINTR, and ``immediate_exit``
    makes any later KVM_RUN return at once. Signals can only be handled in the
    main thread; elsewhere only the exit and time checks between exits apply.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: object) -> None:
        run_page[abi.RUN_IMMEDIATE_EXIT] = 1

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _Stop(Exception):
    def __init__(self, reason: StopReason, detail: str,
                 refused: EventResult | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.refused = refused


class GuestRun:
    """One run of a program on one vCPU of a `GuestMachine`; `run()` returns the report.

    `vcpu` (default: the machine's first) and `handler` (default: a new one
    over the machine's memory) let several runs, one per vCPU, share one
    handler (`ptemu.kvm.smp`).
    """

    def __init__(self, machine: GuestMachine, *, limits: RunLimits = RunLimits(),
                 capture: bool = False, policy: Policy | str = Policy.STRICT,
                 vcpu: VcpuHandle | None = None, handler: PtWriteHandler | None = None,
                 index: int = 0) -> None:
        self.machine = machine
        self.vcpu: VcpuHandle = machine.vcpu if vcpu is None else vcpu
        self.layout: GuestLayout = machine.layout
        self.limits = limits
        self.capture = capture
        # One instruction per exit: KVM executed exactly one, so the PAE
        # second-half coalescing (which would run ahead of the vCPU) is off.
        self.handler = handler if handler is not None else PtWriteHandler(
            machine.memory, self.layout.mode, policy=policy, coalesce=False)
        self.handler_vcpu = Vcpu(index)
        self.exits = 0
        self.steps = 0
        self.writes = 0
        self.handler_seconds = 0.0
        self.disagreement_count = 0
        self.disagreements: list[Disagreement] = []
        self.observed: list[ObservedWrite] = []
        self.families: dict[str, int] = {}
        self._code_pages: dict[int, int] = {}
        """GLA page -> GPA page of code single-stepped through (the runner's
        guests never change CR3 or their code mappings)."""
        self._cs_base = self.vcpu.get_sregs().cs.base
        self.raced = 0
        self.rewritten = 0
        self.single_step = machine.monitored
        """Single-step the guest (needed to know the registers before each write)."""

    def _before_run(self) -> None:
        """Called before every KVM_RUN; may end the run by raising `_Stop`."""

    def _write_exits(self, gpa: int, size: int) -> bool:
        """Whether a guest write of `size` bytes at `gpa` is one that should exit."""
        return self.layout.is_monitored(gpa, size)

    def _known_gla(self, gpa: int) -> int | None:
        """The GLA through which the guest writes `gpa` (before it is checked)."""
        return self.layout.monitored_gla_of(gpa)

    def _emulate(self, event: WriteEvent) -> EventResult:
        """Have the exit handled: by the handler here, by a monitor in a subclass."""
        return self.handler.handle_ept_write(self.handler_vcpu, event)

    def run(self) -> RunReport:
        machine, vcpu, limits = self.machine, self.vcpu, self.limits
        initial_tables = machine.monitored_bytes()
        regs_raw = bytes(vcpu.regs_raw())
        if self.single_step:
            vcpu.set_single_step(True)
            vcpu.enable_sync_regs()
        refused: EventResult | None = None
        start = time.monotonic()
        deadline = start + limits.timeout
        with _alarm(limits.timeout, vcpu.run_page):
            try:
                while True:
                    if self.exits >= limits.max_exits:
                        raise _Stop(StopReason.EXIT_LIMIT,
                                    f"the guest made {self.exits} exits without finishing "
                                    f"(--max-exits {limits.max_exits})")
                    if time.monotonic() >= deadline:
                        raise _Stop(StopReason.TIMEOUT, self._timeout_detail())
                    self._before_run()
                    reason = vcpu.run()
                    self.exits += 1
                    if reason == abi.ExitReason.DEBUG:
                        self.steps += 1
                        previous, regs_raw = regs_raw, bytes(vcpu.regs_raw())
                        if self._stepped_over_hlt(previous, regs_raw):
                            raise _Stop(StopReason.HALTED, (
                                "the guest executed HLT (KVM reported it as a single-step "
                                "exit)"))
                    elif reason == abi.ExitReason.MMIO:
                        regs_raw = self._mmio(regs_raw)
                    elif reason == abi.ExitReason.HLT:
                        raise _Stop(StopReason.HALTED, "the guest executed HLT")
                    elif reason == abi.ExitReason.INTR:
                        if time.monotonic() >= deadline:
                            raise _Stop(StopReason.TIMEOUT, self._timeout_detail())
                    else:
                        raise self._unexpected(reason)
            except _Stop as stop:
                outcome, detail, refused = stop.reason, stop.detail, stop.refused
        elapsed = time.monotonic() - start
        return RunReport(
            program=machine.program.name, paging=str(self.layout.mode.name),
            code_bits=self.layout.code_bits, monitored=machine.monitored, stop=outcome,
            detail=detail, exits=self.exits, steps=self.steps, writes=self.writes,
            disagreement_count=self.disagreement_count,
            disagreements=tuple(self.disagreements), elapsed=elapsed,
            handler_seconds=self.handler_seconds, final_regs=vcpu.get_regs(),
            initial_tables=initial_tables, final_tables=machine.monitored_bytes(),
            observed=tuple(self.observed), refused=refused, families=dict(self.families),
            raced=self.raced, rewritten=self.rewritten)

    # -- exits ------------------------------------------------------------------

    def _stepped_over_hlt(self, before: bytes, after: bytes) -> bool:
        """Whether the instruction just single-stepped was HLT.

        Some KVMs (kvm_pvm here) report a HLT executed under single-stepping
        as KVM_EXIT_DEBUG with RIP past it, never as KVM_EXIT_HLT, and the
        vCPU then runs on; so a one-byte step over an F4 byte ends the run.
        """
        rip_before = struct.unpack_from("<Q", before, _RIP_OFFSET)[0]
        rip_after = struct.unpack_from("<Q", after, _RIP_OFFSET)[0]
        if rip_after - rip_before != 1:
            return False
        cs_base = self._cs_base
        page = (cs_base + rip_before) & ~(PAGE - 1)
        gpa = self._code_pages.get(page)
        if gpa is None:
            gpa = self._translate(page, self.machine.cr3)
            if gpa is None:
                return False
            self._code_pages[page] = gpa
        return self.machine.memory.read(gpa + ((cs_base + rip_before) & (PAGE - 1)), 1) == HLT

    def _timeout_detail(self) -> str:
        rip = self.vcpu.get_regs()["rip"]
        return (f"the guest ran {self.limits.timeout:g} s without finishing "
                f"(--timeout; last RIP {rip:#x})")

    def _unexpected(self, reason: int) -> _Stop:
        vcpu = self.vcpu
        regs = vcpu.get_regs()
        where = f" at rip={regs['rip']:#x}"
        if reason == abi.ExitReason.SHUTDOWN:
            return _Stop(StopReason.TRIPLE_FAULT, (
                f"KVM_EXIT_SHUTDOWN{where}: the guest raised an exception it could not "
                "deliver (its IDT is empty), a triple fault"))
        name = abi.exit_reason_name(reason)
        if reason == abi.ExitReason.IO:
            port = int.from_bytes(vcpu.run_bytes(abi.RUN_IO_PORT, 2), "little")
            name += f" (port {port:#x})"
        elif reason == abi.ExitReason.INTERNAL_ERROR:
            name += f" (suberror {vcpu.u32(abi.RUN_INTERNAL_SUBERROR)})"
        elif reason == abi.ExitReason.FAIL_ENTRY:
            name += f" (hardware reason {vcpu.u64(abi.RUN_FAIL_ENTRY_REASON):#x})"
        return _Stop(StopReason.UNEXPECTED_EXIT, f"{name}{where}")

    def _mmio_write(self) -> tuple[int, bytes, bytes, dict[str, int]]:
        """The KVM_EXIT_MMIO write just reported: GPA, KVM's bytes, the raw
        registers after it and those registers by name.

        Raises `_Stop` for a read (of memory no memslot backs) and for a
        write outside the monitored pages.
        """
        vcpu = self.vcpu
        gpa = vcpu.u64(abi.RUN_MMIO_PHYS_ADDR)
        length = vcpu.u32(abi.RUN_MMIO_LEN)
        is_write = vcpu.run_page[abi.RUN_MMIO_IS_WRITE]
        data = vcpu.run_bytes(abi.RUN_MMIO_DATA, min(length, 8))
        after_raw = bytes(vcpu.regs_raw())
        after = regs_from_raw(after_raw)
        if not is_write:
            raise _Stop(StopReason.UNEXPECTED_EXIT, (
                f"the guest read {length} bytes at GPA {gpa:#x}, which no memslot backs "
                f"(instruction before rip={after['rip']:#x})"))
        if not self._write_exits(gpa, length):
            raise _Stop(StopReason.UNEXPECTED_EXIT, (
                f"the guest wrote {length} bytes at GPA {gpa:#x}, outside the monitored pages "
                f"(instruction before rip={after['rip']:#x})"))
        return gpa, data, after_raw, after

    def _mmio(self, before_raw: bytes) -> bytes:
        """Handle one KVM_EXIT_MMIO; returns the raw registers after it."""
        layout = self.layout
        gpa, data, after_raw, after = self._mmio_write()
        regs = self._event_registers(regs_from_raw(before_raw))
        gla = self._gla_of(gpa, regs)
        code = self._fetch_code(regs)
        entry_size = layout.mode.entry_size
        page_gpa = gpa & ~(PAGE - 1)
        page_before = self.machine.memory.read(page_gpa, PAGE)
        expect = _kvm_expectation(gpa, data, page_gpa, page_before, entry_size,
                                  regs, after)
        observed = ObservedWrite(index=self.writes, gpa=gpa, gla=gla, data=data, regs=regs,
                                 after=after, code=code, expect=expect)
        self.writes += 1
        if self.capture:
            self.observed.append(observed)
        self.handler_vcpu.begin_exit()
        started = time.perf_counter()
        result = self._emulate(WriteEvent(gpa=gpa, gla=gla, regs=regs, code=code,
                                          code_bits=layout.code_bits))
        self.handler_seconds += time.perf_counter() - started
        if result.status is not Status.EMULATED:
            self._apply_kvm(page_gpa, page_before, gpa, data)
            raise _Stop(StopReason.REFUSED, (
                f"ptemu's handler returned '{result.status}' for a write KVM executed: "
                f"{result.reason or result.fault or 'no reason given'}; "
                f"rip={regs['rip']:#x} code={code.hex(' ')} gpa={gpa:#x} gla={gla:#x} "
                f"kvm data={data.hex(' ')}"), refused=result)
        mnemonic = self._mnemonic(code)
        self.families[mnemonic] = self.families.get(mnemonic, 0) + 1
        mismatches = compare_event(expect, result, before=regs)
        committed = self._committed_mismatch(page_gpa, page_before, gpa, data)
        if committed is not None:
            mismatches += (committed,)
        if mismatches:
            self.disagreement_count += 1
            if len(self.disagreements) < self.limits.keep_disagreements:
                self.disagreements.append(Disagreement(observed, mismatches, result))
            self._apply_kvm(page_gpa, page_before, gpa, data)
        return after_raw

    def _committed_mismatch(self, page_gpa: int, page_before: bytes, gpa: int,
                            data: bytes) -> Mismatch | None:
        """Whether the page now holds exactly its old bytes plus KVM's write."""
        offset = gpa - page_gpa
        expected = page_before[:offset] + data + page_before[offset + len(data):]
        actual = self.machine.memory.read(page_gpa, PAGE)
        if actual == expected:
            return None
        first = next(i for i in range(PAGE) if actual[i] != expected[i])
        start = first - first % 8
        return Mismatch(f"memory[{page_gpa + start:#x}]", expected[start:start + 8].hex(" "),
                        actual[start:start + 8].hex(" "))

    def _apply_kvm(self, page_gpa: int, page_before: bytes, gpa: int, data: bytes) -> None:
        """Make the page what the hardware left: its old bytes plus KVM's write."""
        memory = self.machine.memory
        memory.write(page_gpa, page_before)
        memory.write(gpa, data)

    def _mnemonic(self, code: bytes) -> str:
        decoded = self.handler.decode(self.layout.code_bits, code)
        words = [word for word in getattr(decoded, "text", "").split() if word not in _PREFIXES]
        return words[0] if words else "?"

    def _event_registers(self, general: Mapping[str, int]) -> dict[str, int]:
        """General registers plus what an exit also reports: segments, CRs, EFER.

        The segment and control registers are read at the MMIO exit: none of
        the store families the handler emulates changes them.
        """
        sregs = self.vcpu.get_sregs()
        regs = dict(general)
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            segment = getattr(sregs, name)
            regs[name] = segment.selector
            regs[f"{name}_base"] = segment.base
        regs.update(cr0=sregs.cr0, cr3=sregs.cr3, cr4=sregs.cr4, efer=sregs.efer)
        return regs

    def _translate(self, gla: int, cr3: int) -> int | None:
        return walk(self.layout.mode, cr3, gla, self.machine.memory).gpa

    def _gla_of(self, gpa: int, regs: Mapping[str, int]) -> int:
        gla = self._known_gla(gpa)
        if gla is None or self._translate(gla, regs["cr3"]) != gpa:
            raise _Stop(StopReason.UNEXPECTED_EXIT, (
                f"no guest-linear address of GPA {gpa:#x} is known (the guest changed "
                "the direct map?)"))
        return gla

    def _fetch_code(self, regs: Mapping[str, int]) -> bytes:
        """The bytes at CS:RIP, read through the guest's own page tables."""
        width_mask = (1 << 64) - 1 if self.layout.code_bits == 64 else 0xFFFFFFFF
        gla = (regs["cs_base"] + regs["rip"]) & width_mask
        out = b""
        while len(out) < CODE_FETCH_BYTES:
            address = gla + len(out)
            gpa = self._translate(address, regs["cr3"])
            if gpa is None:
                if out:
                    break  # the instruction ends before an unmapped page
                raise _Stop(StopReason.UNEXPECTED_EXIT, f"RIP {address:#x} is not mapped")
            chunk = min(CODE_FETCH_BYTES - len(out), PAGE - (address & (PAGE - 1)))
            out += self.machine.memory.read(gpa, chunk)
        return out


def _kvm_expectation(gpa: int, data: bytes, page_gpa: int, page_before: bytes,
                     entry_size: int, regs: Mapping[str, int],
                     after: Mapping[str, int]) -> Expectation:
    """What KVM did, as a fixture expectation.

    ``writes``: the bytes KVM wrote, one record per entry they touch, each with
    that entry's whole value before the write. ``regs``: every general
    register, RIP and RFLAGS whose value the instruction changed.
    """
    records = []
    end = gpa + len(data)
    entry = gpa - gpa % entry_size
    while entry < end:
        low, high = max(gpa, entry), min(end, entry + entry_size)
        offset = entry - page_gpa
        old = int.from_bytes(page_before[offset:offset + entry_size], "little")
        records.append(WriteRecord(gpa=entry, offset=low - entry, size=high - low,
                                   value=int.from_bytes(data[low - gpa:high - gpa], "little"),
                                   old=old))
        entry += entry_size
    changed = {name: after[name] for name in GENERAL_REGISTERS if after[name] != regs[name]}
    return Expectation(status=Status.EMULATED, writes=tuple(records), regs=changed)


def run_guest(system: KvmSystem, layout: GuestLayout, program: GuestProgram, *,
              monitored: bool = True, limits: RunLimits = RunLimits(), capture: bool = False,
              policy: Policy | str = Policy.STRICT) -> RunReport:
    """Bring `program` up in `layout`'s mode and run it to the end or a bound.

    With `monitored`, the page tables are a read-only memslot and every write
    is checked against the handler; without, they are ordinary memory and the
    guest runs at full speed (the reference for the final page tables).
    Raises `KvmUnavailable` when this host cannot run the mode.
    """
    with GuestMachine(system, layout, program, monitored=monitored) as machine:
        return GuestRun(machine, limits=limits, capture=capture, policy=policy).run()
