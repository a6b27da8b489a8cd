"""A KVM run in which the translation monitor decides what exits.

`run_monitored` brings up `monitor_program`'s guest with every page writable,
hands a `TranslationMonitor` a `MemslotProtector` over the VM's memslots and
sets up the program's watches: from then on a page exits exactly when the
monitor protects it, as under a hypervisor that edits its EPT. Each exit goes
through the monitor (which has its handler emulate the write, compared with
what KVM did as in every run, `ptemu.kvm.runner`), and after each the run checks,
against a fresh `ptemu.paging.walk` of guest memory at every probe address:

* the monitor's view (`TranslationMonitor.translation`) equals the walk;
* the changes it reported, applied to the translations before the exit, give
  the walk (nothing missed, nothing spurious, old sides right);
* the pages it protects are exactly the tables the walks read, and exactly
  the pages KVM has as read-only memslots.

At the end: the exits came at exactly the GPAs the program's own model says
are linked-table writes, in order (so a table freed and then written as data
did not exit), and every page the program wrote holds what the model says.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.kvm.device import KvmSystem
from ptemu.kvm.layout import PAGE, GuestLayout
from ptemu.kvm.machine import GuestMachine
from ptemu.kvm.memslots import MemslotProtector
from ptemu.kvm.monitor_program import MonitorScenario
from ptemu.kvm.runner import GuestRun, RunLimits, RunReport, StopReason, _Stop
from ptemu.memory import GuestMemory
from ptemu.monitor import (
    MonitorResult,
    MonitorStatus,
    Translation,
    TranslationMonitor,
    TranslationState,
    Unfollowed,
)
from ptemu.paging.modes import PagingMode
from ptemu.paging.walk import walk
from ptemu.results import EventResult
from ptemu.status import Policy

KEEP_PROBLEMS = 20
"""Problems kept in the report with their text (all are counted)."""
DEFAULT_LIMITS = RunLimits()


def walked_translation(mode: PagingMode, cr3: int, gla: int, memory: GuestMemory
                       ) -> tuple[TranslationState, list[int]]:
    """What the CPU translates `gla` to, by a walk of memory, and the table pages it read.

    A walk that comes back to a table already on its path is reported as the
    monitor reports it (`Unfollowed("self-reference")`), with the pages read
    until then.
    """
    result = walk(mode, cr3, gla, memory)
    pages: list[int] = []
    for step in result.steps:
        page = step.table_gpa & ~(PAGE - 1)
        if page in pages:
            return Unfollowed("self-reference"), pages
        pages.append(page)
    if result.gpa is None or result.permissions is None or result.page_size is None:
        return None, pages
    leaf = result.steps[-1].entry
    return Translation(
        frame=result.gpa & ~(PAGE - 1), page_size=result.page_size,
        writable=result.permissions.writable, user=result.permissions.user,
        executable=result.permissions.executable, protection_key=leaf.protection_key,
        pwt=leaf.pwt, pcd=leaf.pcd, pat=bool(leaf.pat)), pages


class ViewCheck:
    """The checks a monitored run makes after every exit (see the module docstring),
    whatever runs the guest: at every probe address, the monitor's view against a
    walk of memory and the reported changes against the translations before; the
    protected pages against the tables the walks read. Failures go to `problem`."""

    def __init__(self, monitor: TranslationMonitor, scenario: MonitorScenario,
                 memory: GuestMemory, problem: Callable[[str], None]) -> None:
        self.monitor = monitor
        self.scenario = scenario
        self.memory = memory
        self.problem = problem
        self.never_loaded = tuple(dict.fromkeys(
            monitor.mode.root_table_gpa(spec.cr3) for spec in scenario.watches[:-1]
            if spec.cr3 != scenario.watches[-1].cr3))
        """Watched roots that no vCPU loads into CR3 (the program's processes; the
        last watch is the hierarchy the vCPU runs on)."""
        self.until_load_changes = 0
        self.shadow: dict[tuple[int, int], TranslationState] = {
            (root, gla): walked_translation(monitor.mode, root, gla, memory)[0]
            for root, probes in scenario.probes.items() for gla in probes}
        """The translations as the reported changes leave them."""

    def cr3_loads(self) -> list[MonitorResult]:
        """Tell the monitor that no vCPU holds PDPTEs of the never-loaded roots."""
        return [self.monitor.cr3_loaded(root) for root in self.never_loaded]

    def account(self, outcome: MonitorResult) -> None:
        """Apply `outcome`'s changes to the shadow, checking each one's old side."""
        for change in outcome.changes:
            if change.until_cr3_load:
                self.until_load_changes += 1
                self.problem(f"change at {change.start:#x} (cr3 {change.cr3:#x}) in tables "
                             "under PDPTEs that no vCPU holds (until_cr3_load)")
                continue
            for gla in self.scenario.probes.get(change.cr3, ()):
                if not change.start <= gla < change.end:
                    continue
                old, new = change.old_at(gla), change.new_at(gla)
                if old != self.shadow[(change.cr3, gla)]:
                    self.problem(f"change at {gla:#x} (cr3 {change.cr3:#x}) says the old "
                                 f"translation was {old}, it was "
                                 f"{self.shadow[(change.cr3, gla)]}")
                if old == new:
                    self.problem(f"change at {gla:#x} (cr3 {change.cr3:#x}) changes nothing")
                self.shadow[(change.cr3, gla)] = new

    def check(self) -> frozenset[int]:
        """Compare view, shadow and walks at every probe; return the protected pages."""
        mode = self.monitor.mode
        reached: set[int] = set()
        for (root, gla), shadowed in self.shadow.items():
            expected, pages = walked_translation(mode, root, gla, self.memory)
            reached.update(pages)
            seen = self.monitor.translation(root, gla)
            if seen != expected:
                self.problem(f"view at {gla:#x} (cr3 {root:#x}) is {seen}, a walk "
                             f"gives {expected}")
            if shadowed != expected:
                self.problem(f"the changes reported at {gla:#x} (cr3 {root:#x}) add up "
                             f"to {shadowed}, a walk gives {expected}")
                self.shadow[(root, gla)] = expected
        protected = self.monitor.protected_pages()
        if protected != reached:
            self.problem("protected pages differ from the tables the walks read: extra "
                         f"{sorted(map(hex, protected - reached))}, missing "
                         f"{sorted(map(hex, reached - protected))}")
        return protected


@dataclass(frozen=True, slots=True)
class MonitorRunReport:
    """A monitored run: the runner's report and the monitor's figures and checks."""

    run: RunReport
    checks: int
    """Exits after which the view was checked (and the check before the first)."""
    problems: int
    """Checks that failed (each a difference at one probe or in the protected set)."""
    first_problems: tuple[str, ...]
    changes: int
    """Translation changes the monitor reported."""
    partial_changes: int
    cr3_load_changes: int
    protects: int
    unprotects: int
    peak_protected: int
    slot_changes: int
    """KVM_SET_USER_MEMORY_REGION calls the protection made."""
    peak_slots: int
    probes: int
    exits_expected: int
    exits_as_expected: bool
    """The exits came at exactly the program's linked-table writes, in order."""
    exit_difference: str
    """Where they first differ ("" when they do not)."""
    silent_writes: int
    final_pages_ok: bool
    monitor_seconds: float
    """Seconds inside the monitor (its handler and the memslot changes included)."""
    protection_seconds: float
    """Seconds of those in `MemslotProtector.protect`/`unprotect` (KVM's slot updates)."""
    check_seconds: float

    @property
    def ok(self) -> bool:
        return (self.run.ok and self.problems == 0 and self.exits_as_expected
                and self.final_pages_ok)


class MonitoredGuestRun(GuestRun):
    """`GuestRun` whose exits are decided and handled by a `TranslationMonitor`."""

    def __init__(self, machine: GuestMachine, scenario: MonitorScenario, *,
                 limits: RunLimits = DEFAULT_LIMITS, policy: Policy | str = Policy.STRICT) -> None:
        mode = machine.layout.mode
        if machine.cr3 != scenario.watches[-1].cr3:
            raise AssertionError("the running hierarchy's root is not where the program "
                                 "expects it")
        handler = PtWriteHandler(machine.memory, mode, policy=policy, coalesce=False)
        super().__init__(machine, limits=limits, handler=handler)
        self.single_step = True
        self.scenario = scenario
        self.protector = MemslotProtector(machine.vm)
        self.monitor = TranslationMonitor(machine.memory, mode, self.protector, handler=handler)
        for spec in scenario.watches:
            spec.install(self.monitor)
        self.exit_gpas: list[int] = []
        self.problems = 0
        self.first_problems: list[str] = []
        self.checks = 0
        self.changes = self.partial_changes = self.cr3_load_changes = 0
        self.protects = self.unprotects = 0
        self.peak_protected = len(self.protector.protected)
        self.monitor_seconds = 0.0
        self.check_seconds = 0.0
        self.view_check = ViewCheck(self.monitor, scenario, machine.memory, self._problem)
        self._last: MonitorResult | None = None
        self._setup_protection_seconds = self.protector.seconds
        self._check()

    # -- hooks -------------------------------------------------------------------------

    def _write_exits(self, gpa: int, size: int) -> bool:
        first, last = gpa & ~(PAGE - 1), (gpa + size - 1) & ~(PAGE - 1)
        return first in self.protector.protected and last in self.protector.protected

    def _known_gla(self, gpa: int) -> int | None:
        return self.layout.gla_of(gpa)

    def _emulate(self, event: WriteEvent) -> EventResult:
        self.exit_gpas.append(event.gpa)
        started = time.perf_counter()
        outcome = self.monitor.handle_ept_write(self.handler_vcpu, event)
        self.monitor_seconds += time.perf_counter() - started
        if outcome.status is not MonitorStatus.HANDLED or outcome.event is None:
            raise _Stop(StopReason.UNEXPECTED_EXIT, (
                f"GPA {event.gpa:#x} exited but the monitor does not protect it"))
        self._last = outcome
        return outcome.event

    def _mmio(self, before_raw: bytes) -> bytes:
        after = super()._mmio(before_raw)
        outcome, self._last = self._last, None
        if outcome is not None:
            self._account(outcome)
        # No vCPU has the processes' roots in CR3, so none holds their PAE PDPTEs:
        # tell the monitor, as a hypervisor that knows its vCPUs' CR3s would.
        for released in self.view_check.cr3_loads():
            self._account(released)
        self._check()
        return after

    # -- checks ------------------------------------------------------------------------

    def _problem(self, text: str) -> None:
        self.problems += 1
        if len(self.first_problems) < KEEP_PROBLEMS:
            self.first_problems.append(f"after exit {len(self.exit_gpas)}: {text}")

    def _account(self, outcome: MonitorResult) -> None:
        self.protects += len(outcome.protected)
        self.unprotects += len(outcome.unprotected)
        self.peak_protected = max(self.peak_protected, len(self.protector.protected))
        for change in outcome.changes:
            self.changes += 1
            self.partial_changes += change.partial
            self.cr3_load_changes += change.at_cr3_load
        self.view_check.account(outcome)

    def _check(self) -> None:
        started = time.perf_counter()
        self.checks += 1
        protected = self.view_check.check()
        if protected != self.protector.readonly_pages() or \
                protected != self.protector.protected:
            self._problem("the monitor's protected pages are not KVM's read-only memslots")
        self.check_seconds += time.perf_counter() - started

    def report(self, run: RunReport) -> MonitorRunReport:
        """The run's report with the monitor's figures and the final checks."""
        memory = self.machine.memory
        final_ok = all(memory.read(page, PAGE) == content
                       for page, content in self.scenario.final_pages.items())
        expected, seen = self.scenario.exit_gpas, tuple(self.exit_gpas)
        difference = ""
        if seen != expected:
            index = next((i for i, (e, s) in enumerate(zip(expected, seen, strict=False))
                          if e != s), min(len(expected), len(seen)))
            difference = (f"exit {index}: expected "
                          f"{hex(expected[index]) if index < len(expected) else 'none'}, "
                          f"got {hex(seen[index]) if index < len(seen) else 'none'} "
                          f"({len(seen)} exits, {len(expected)} expected)")
        return MonitorRunReport(
            run=run, checks=self.checks, problems=self.problems,
            first_problems=tuple(self.first_problems), changes=self.changes,
            partial_changes=self.partial_changes, cr3_load_changes=self.cr3_load_changes,
            protects=self.protects, unprotects=self.unprotects,
            peak_protected=self.peak_protected, slot_changes=self.protector.slot_changes,
            peak_slots=self.protector.peak_slots,
            probes=sum(len(p) for p in self.scenario.probes.values()),
            exits_expected=len(self.scenario.exit_gpas),
            exits_as_expected=not difference, exit_difference=difference,
            silent_writes=self.scenario.silent_writes, final_pages_ok=final_ok,
            monitor_seconds=self.monitor_seconds,
            protection_seconds=self.protector.seconds - self._setup_protection_seconds,
            check_seconds=self.check_seconds)


def run_monitored(system: KvmSystem, layout: GuestLayout, scenario: MonitorScenario, *,
                  limits: RunLimits = DEFAULT_LIMITS, policy: Policy | str = Policy.STRICT
                  ) -> MonitorRunReport:
    """Run `scenario` with the monitor deciding what exits; see the module docstring.

    Raises `KvmUnavailable` when this host cannot run the layout's mode.
    """
    with GuestMachine(system, layout, scenario.program, monitored=False) as machine:
        run = MonitoredGuestRun(machine, scenario, limits=limits, policy=policy)
        return run.report(run.run())

