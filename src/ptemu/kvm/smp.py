"""Several vCPUs, one handler: a guest whose vCPUs race on shared page-table entries.

Each vCPU runs on its own Python thread doing KVM_RUN and serving its own
KVM_EXIT_MMIO writes with ONE `PtWriteHandler` over the machine's shared
`KvmGuestMemory`, as a multi-vCPU hypervisor does. KVM_RUN releases the GIL,
so the guest's instructions on the other vCPUs (KVM's decode and emulation of
their locked instructions included) run while the handler emulates and
commits an exiting vCPU's write.

Why the handler decides atomicity here. The monitored pages are a read-only
memslot, so *every* guest store to them exits: KVM's emulator reads the
entry, computes, and hands the write to user space; it cannot perform a
locked read-modify-write on memory it may not write (its compare-exchange
falls back to a plain emulated write). Two vCPUs running ``lock xadd`` on
one counter can therefore both be told by KVM the same old value. What lands
in memory is what the handler commits: it re-reads the entry and commits with
the guest memory's compare-and-store (a hardware CAS), retrying when the entry
changed, so the counters come out exact only because the handler's commit is
atomic. And what the vCPU continues with must be the handler's registers (the
old value XADD returns, CMPXCHG's ZF and RAX): a vCPU that kept KVM's would
believe a CMPXCHG succeeded that the handler's commit found stale, and lose an
increment. So, as an introspection engine does, the runner sets the vCPU's
registers to the handler's after each write whose registers differ.

How each write is checked against KVM (per vCPU, per exit). KVM computed the
write from the entry as it was when its emulator read it, some time during
that vCPU's KVM_RUN. A ledger numbers every commit the handler makes; before
each KVM_RUN a vCPU notes the ledger's number. At the exit:

1. The handler's result is compared with KVM's (the bytes written, the
   registers after) assuming KVM read the value the handler read. This holds
   whenever no other vCPU committed to that entry meanwhile, and then the
   comparison is exactly the single-vCPU one.
2. Otherwise, the same instruction is emulated by a private scratch handler
   on each value the entry had during that KVM_RUN (from the ledger: the
   values committed since the mark, and the last few before it, one per
   vCPU, since a commit may be recorded a little after it lands). KVM must
   agree with one of them: the write is then counted as *raced*.
3. No value agrees: a disagreement.

The run's result is checked at the end by the program's `FinalCheck`s
(counters equal the sum of their increments, each owned bit what its owner
left), computed from its parameters.
"""

from __future__ import annotations

import signal
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from ptemu.fixtures.compare import Mismatch, compare_event
from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.kvm.device import KvmSystem, regs_from_raw
from ptemu.kvm.layout import PAGE, GuestLayout
from ptemu.kvm.machine import GuestMachine
from ptemu.kvm.programs import GuestProgram
from ptemu.kvm.runner import (
    _PREFIXES,
    GENERAL_REGISTERS,
    Disagreement,
    GuestRun,
    ObservedWrite,
    RunLimits,
    RunReport,
    StopReason,
    _kvm_expectation,
    _Stop,
)
from ptemu.memory import InMemoryGuestMemory
from ptemu.results import EventResult, WriteRecord
from ptemu.status import Policy, Status
from ptemu.vcpu import Vcpu

LEDGER_HISTORY = 4096
"""Commits remembered per entry (a vCPU's KVM_RUN spans far fewer)."""
JOIN_GRACE = 5.0
"""Seconds the vCPU threads get to stop after the run's time bound."""
_INTERRUPT = signal.SIGUSR1
"""Sent to a vCPU thread to interrupt its KVM_RUN (with ``immediate_exit`` set)."""


class CommitLedger:
    """Every value the handler committed to each entry, numbered in commit order.

    Thread-safe. Numbers start at 1; `mark` is the number of the last one
    recorded. A commit is recorded just after the handler returns, so two
    vCPUs' records may land in the other order than their commits: `values`
    widens its answer by one earlier value per vCPU to cover that.
    """

    def __init__(self, initial: bytes, base_gpa: int, entry_size: int, vcpus: int) -> None:
        self._lock = threading.Lock()
        self._initial = initial
        self._base = base_gpa
        self._entry_size = entry_size
        self._slack = vcpus
        self._sequence = 0
        self._history: dict[int, deque[tuple[int, int]]] = {}

    def mark(self) -> int:
        with self._lock:
            return self._sequence

    def record(self, writes: tuple[WriteRecord, ...]) -> None:
        """Note the entries an emulated write left (its records)."""
        with self._lock:
            for record in writes:
                self._sequence += 1
                mask = record.new_entry_bytes_mask
                new = (record.old & ~mask) | (record.value << (8 * record.offset)) & mask
                history = self._history.get(record.gpa)
                if history is None:
                    history = self._history[record.gpa] = deque(maxlen=LEDGER_HISTORY)
                history.append((self._sequence, new))

    def values(self, entry_gpa: int, since: int) -> list[int]:
        """Values entry `entry_gpa` may have had at any time after mark `since`.

        The last `vcpus` values recorded up to `since` (the initial value when
        fewer were), then every value recorded after it, oldest first.
        """
        with self._lock:
            history = list(self._history.get(entry_gpa, ()))
        before = [value for number, value in history if number <= since]
        after = [value for number, value in history if number > since]
        out = before[-self._slack:]
        if len(before) < self._slack:
            offset = entry_gpa - self._base
            out.insert(0, int.from_bytes(self._initial[offset:offset + self._entry_size],
                                         "little"))
        return out + after


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    """One `FinalCheck` of the program against the final tables."""

    name: str
    expected: int
    observed: int

    @property
    def holds(self) -> bool:
        return self.expected == self.observed


@dataclass(frozen=True, slots=True)
class SmpReport:
    """A run of one guest on several vCPUs: each vCPU's report and the totals."""

    program: str
    paging: str
    code_bits: int
    monitored: bool
    vcpus: tuple[RunReport, ...]
    stop: StopReason
    """`HALTED` when every vCPU halted, else the first other way one ended."""
    detail: str
    elapsed: float
    initial_tables: bytes
    final_tables: bytes
    checks: tuple[CheckOutcome, ...]
    families: Mapping[str, int] = field(default_factory=dict)

    @property
    def exits(self) -> int:
        return sum(report.exits for report in self.vcpus)

    @property
    def steps(self) -> int:
        return sum(report.steps for report in self.vcpus)

    @property
    def writes(self) -> int:
        return sum(report.writes for report in self.vcpus)

    @property
    def disagreement_count(self) -> int:
        return sum(report.disagreement_count for report in self.vcpus)

    @property
    def disagreements(self) -> tuple[Disagreement, ...]:
        return tuple(d for report in self.vcpus for d in report.disagreements)

    @property
    def raced(self) -> int:
        return sum(report.raced for report in self.vcpus)

    @property
    def rewritten(self) -> int:
        return sum(report.rewritten for report in self.vcpus)

    @property
    def handler_seconds(self) -> float:
        return sum(report.handler_seconds for report in self.vcpus)

    @property
    def writes_per_second(self) -> float:
        return self.writes / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def checks_hold(self) -> bool:
        return all(check.holds for check in self.checks)

    @property
    def ok(self) -> bool:
        """Every vCPU halted, ptemu agreed with KVM on every write, every check holds."""
        return (self.stop is StopReason.HALTED and self.disagreement_count == 0
                and self.checks_hold)


class _Shared:
    """What the vCPU threads of one run share."""

    def __init__(self, machine: GuestMachine, policy: Policy | str, initial: bytes) -> None:
        layout = machine.layout
        self.handler = PtWriteHandler(machine.memory, layout.mode, policy=policy, coalesce=False)
        self.ledger = CommitLedger(initial, layout.monitored_gpa, layout.mode.entry_size,
                                   len(machine.vcpus))
        self.stop = threading.Event()
        self.interrupt: Callable[[], None] = lambda: None


class _SharedVcpuRun(GuestRun):
    """One vCPU's loop; its writes go to the shared handler (see the module docstring)."""

    def __init__(self, machine: GuestMachine, index: int, shared: _Shared, *,
                 limits: RunLimits, policy: Policy | str) -> None:
        super().__init__(machine, limits=limits, policy=policy, vcpu=machine.vcpus[index],
                         handler=shared.handler, index=index)
        self.index = index
        self.shared = shared
        self._mark = 0
        self._scratch_memory = InMemoryGuestMemory()
        # The vCPU's own handler, for what the shared one must not be asked
        # from several threads: the decode behind the family counts, and the
        # re-emulation on the values a raced write may have read.
        self._scratch = PtWriteHandler(self._scratch_memory, self.layout.mode, policy=policy,
                                       coalesce=False)
        self._scratch_vcpu = Vcpu(index)

    def _before_run(self) -> None:
        if self.shared.stop.is_set():
            raise _Stop(StopReason.STOPPED, "another vCPU's run ended first")
        self._mark = self.shared.ledger.mark()

    def _mnemonic(self, code: bytes) -> str:
        decoded = self._scratch.decode(self.layout.code_bits, code)
        words = [word for word in getattr(decoded, "text", "").split() if word not in _PREFIXES]
        return words[0] if words else "?"

    def _mmio(self, before_raw: bytes) -> bytes:
        gpa, data, after_raw, after = self._mmio_write()
        regs = self._event_registers(regs_from_raw(before_raw))
        gla = self._gla_of(gpa, regs)
        code = self._fetch_code(regs)
        event = WriteEvent(gpa=gpa, gla=gla, regs=regs, code=code,
                           code_bits=self.layout.code_bits)
        self.handler_vcpu.begin_exit()
        started = time.perf_counter()  # the handler locks itself: vCPU threads share it
        result = self.handler.handle_ept_write(self.handler_vcpu, event)
        self.handler_seconds += time.perf_counter() - started
        index = self.writes
        self.writes += 1
        if result.status is not Status.EMULATED:
            raise _Stop(StopReason.REFUSED, (
                f"ptemu's handler returned '{result.status}' for a write "
                f"KVM executed: {result.reason or result.fault or 'no reason given'}; "
                f"rip={regs['rip']:#x} code={code.hex(' ')} gpa={gpa:#x} gla={gla:#x} "
                f"kvm data={data.hex(' ')}"), refused=result)
        self.shared.ledger.record(result.writes)
        mnemonic = self._mnemonic(code)
        self.families[mnemonic] = self.families.get(mnemonic, 0) + 1
        mismatches, raced, seen_page = self._check(event, data, after, result)
        if raced:
            self.raced += 1
        if mismatches:
            self.disagreement_count += 1
            if len(self.disagreements) < self.limits.keep_disagreements:
                expect = _kvm_expectation(gpa, data, gpa & ~(PAGE - 1), seen_page,
                                          self.layout.mode.entry_size, regs, after)
                observed = ObservedWrite(index=index, gpa=gpa, gla=gla, data=data, regs=regs,
                                         after=after, code=code, expect=expect)
                self.disagreements.append(Disagreement(observed, mismatches, result))
        return self._continue_with(regs, after, after_raw, result)

    def _continue_with(self, regs: Mapping[str, int], after: Mapping[str, int],
                       after_raw: bytes, result: EventResult) -> bytes:
        """Give the vCPU the handler's registers where KVM's differ; the raw state it runs on."""
        wanted = {name: regs[name] for name in GENERAL_REGISTERS}
        wanted.update((name, value) for name, value in result.regs.items() if name in wanted)
        differs = any(wanted[name] != after[name] for name in GENERAL_REGISTERS
                      if name != "rflags")
        differs |= bool((wanted["rflags"] ^ after["rflags"]) & ~result.undefined_flags)
        if not differs:
            return after_raw
        self.vcpu.set_regs(wanted)
        self.rewritten += 1
        return struct.pack("<18Q", *(wanted[name] for name in GENERAL_REGISTERS))

    def _check(self, event: WriteEvent, data: bytes, after: Mapping[str, int],
               result: EventResult) -> tuple[tuple[Mismatch, ...], bool, bytes]:
        """(mismatches, raced, the page as the handler saw it) for one write."""
        gpa, regs = event.gpa, event.regs
        entry_size = self.layout.mode.entry_size
        page_gpa = gpa & ~(PAGE - 1)
        page = bytearray(self.machine.memory.read(page_gpa, PAGE))
        for record in result.writes:
            offset = record.gpa - page_gpa
            page[offset:offset + entry_size] = record.old.to_bytes(entry_size, "little")
        seen = bytes(page)
        expect = _kvm_expectation(gpa, data, page_gpa, seen, entry_size, regs, after)
        mismatches = compare_event(expect, result, before=regs)
        entry = gpa - gpa % entry_size
        if not mismatches or (gpa + len(data) > entry + entry_size) or len(result.writes) != 1:
            return mismatches, False, seen
        offset = entry - page_gpa
        handler_value = result.writes[0].old
        for value in dict.fromkeys(self.shared.ledger.values(entry, self._mark)):
            if value == handler_value:
                continue
            page[offset:offset + entry_size] = value.to_bytes(entry_size, "little")
            self._scratch_memory.write(page_gpa, bytes(page))
            self._scratch_vcpu.begin_exit()
            other = self._scratch.handle_ept_write(self._scratch_vcpu, event)
            if other.status is not Status.EMULATED:
                continue
            other_expect = _kvm_expectation(gpa, data, page_gpa, bytes(page), entry_size, regs,
                                            after)
            if not compare_event(other_expect, other, before=regs):
                return (), True, seen
        return mismatches, False, seen


@contextmanager
def _interrupter(shared: _Shared, machine: GuestMachine,
                 threads: list[threading.Thread]) -> Iterator[None]:
    """Let any thread stop every vCPU, also one blocked in KVM_RUN.

    Sets ``immediate_exit`` in every ``kvm_run`` and, when a handler for
    `_INTERRUPT` could be installed (only the main thread can), sends it to
    each vCPU thread so a KVM_RUN in progress returns EINTR. Elsewhere a
    guest that never exits is not interrupted: a monitored run single-steps,
    so every KVM_RUN returns after one instruction anyway.
    """
    installed = threading.current_thread() is threading.main_thread()
    previous = signal.signal(_INTERRUPT, lambda signum, frame: None) if installed else None

    def interrupt() -> None:
        shared.stop.set()
        for vcpu in machine.vcpus:
            vcpu.request_immediate_exit()
        if installed:
            for thread in threads:
                if thread.ident is not None and thread.is_alive():
                    signal.pthread_kill(thread.ident, _INTERRUPT)

    shared.interrupt = interrupt
    try:
        yield
    finally:
        if installed:
            signal.signal(_INTERRUPT, previous)


def check_tables(program: GuestProgram, tables: bytes, tables_gpa: int
                 ) -> tuple[CheckOutcome, ...]:
    """The program's final checks against `tables` (the monitored pages)."""
    return tuple(CheckOutcome(check.name, check.expected, check.observed(tables, tables_gpa))
                 for check in program.checks)


def run_smp(system: KvmSystem, layout: GuestLayout, program: GuestProgram, *,
            monitored: bool = True, limits: RunLimits | None = None,
            policy: Policy | str = Policy.STRICT) -> SmpReport:
    """Run `program` on as many vCPUs as it has `vcpu_registers` (one thread each).

    With `monitored`, the page tables are a read-only memslot, every vCPU
    single-steps, and each write goes through the one shared handler and is
    checked (module docstring); without, the vCPUs run at full speed on
    writable tables with the CPU's own atomics, the reference for the checks.
    `limits.max_exits` bounds each vCPU; `limits.timeout` the whole run.
    """
    limits = limits if limits is not None else RunLimits()
    vcpus = max(1, len(program.vcpu_registers))
    with GuestMachine(system, layout, program, monitored=monitored, vcpus=vcpus) as machine:
        initial = machine.monitored_bytes()
        shared = _Shared(machine, policy, initial)
        runs = [_SharedVcpuRun(machine, index, shared, limits=limits, policy=policy)
                for index in range(vcpus)]
        if monitored:
            for vcpu in machine.vcpus:
                vcpu.set_single_step(True)
                vcpu.enable_sync_regs()
        reports: list[RunReport | None] = [None] * vcpus
        failures: list[BaseException] = []

        def serve(index: int) -> None:
            try:
                report = runs[index].run()
            except Exception as error:  # noqa: BLE001 - re-raised in the caller's thread below
                failures.append(error)
                shared.interrupt()
                return
            reports[index] = report
            if report.stop is not StopReason.HALTED:
                shared.interrupt()

        threads = [threading.Thread(target=serve, args=(index,), name=f"vcpu{index}",
                                    daemon=True) for index in range(vcpus)]
        start = time.monotonic()
        deadline = start + limits.timeout
        timed_out = False
        with _interrupter(shared, machine, threads):
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            if any(thread.is_alive() for thread in threads):
                timed_out = True
                shared.interrupt()
                for thread in threads:
                    thread.join(JOIN_GRACE)
        elapsed = time.monotonic() - start
        if failures:
            raise failures[0]
        done = [report for report in reports if report is not None]
        stop, detail = _overall_stop(done, vcpus, limits, timed_out)
        final = machine.monitored_bytes()
        families: dict[str, int] = {}
        for report in done:
            for name, count in report.families.items():
                families[name] = families.get(name, 0) + count
        return SmpReport(
            program=program.name, paging=str(layout.mode.name), code_bits=layout.code_bits,
            monitored=monitored, vcpus=tuple(done), stop=stop, detail=detail, elapsed=elapsed,
            initial_tables=initial, final_tables=final,
            checks=check_tables(program, final, layout.monitored_gpa), families=families)


def _overall_stop(done: list[RunReport], vcpus: int, limits: RunLimits,
                  timed_out: bool) -> tuple[StopReason, str]:
    """How a run of several vCPUs ended: the first vCPU's own reason, else the time bound."""
    if len(done) < vcpus:
        return StopReason.TIMEOUT, (f"{vcpus - len(done)} vCPU thread(s) did not stop within "
                                    f"{limits.timeout:g} s + {JOIN_GRACE:g} s")
    for report in done:
        if report.stop not in (StopReason.HALTED, StopReason.STOPPED):
            return report.stop, f"vCPU {done.index(report)}: {report.detail}"
    if timed_out:
        return StopReason.TIMEOUT, (f"the guest ran {limits.timeout:g} s without finishing "
                                    "(--timeout)")
    for report in done:
        if report.stop is StopReason.STOPPED:
            return report.stop, report.detail
    return StopReason.HALTED, f"every vCPU ({vcpus}) executed HLT"


def tables_equal_outside(program: GuestProgram, layout: GuestLayout, first: bytes,
                         second: bytes) -> bool:
    """Whether two runs' final tables are equal outside the program's `varying` entries."""
    a, b = bytearray(first), bytearray(second)
    for gpa in program.varying:
        offset = gpa - layout.monitored_gpa
        a[offset:offset + 8] = b[offset:offset + 8] = bytes(8)
    return a == b
