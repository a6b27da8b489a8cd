"""The monitored run of the monitor guest program, in Unicorn: PAE with the monitor.

`ptemu.kvm.monitor_run.MonitoredGuestRun` runs `ptemu.kvm.monitor_program`'s
guest under KVM with a `TranslationMonitor` deciding what exits; this host's
KVM pages only in long mode, so its PAE variant never runs here. This test does
what that run does, with Unicorn as the CPU (on the same image, control
registers and GDT, `unicorn_program.UnicornGuest`) and an "EPT exit" made of
Unicorn hooks:

* Unicorn's memory is the `GuestMemory` of both the monitor and the guest; an
  `InMemoryProtector` holds the pages the monitor protects, and the program's
  watches are set up as `MonitoredGuestRun` sets them up.
* A code hook keeps the registers before every instruction. A store to a
  protected page is let through but remembered (its GPA, size and the bytes
  there before it); at the next instruction (or HLT) the bytes are put back and
  the write goes to `monitor.handle_ept_write` with the registers before the
  instruction, its bytes (fetched through the guest's tables) and its GLA, as
  `ptemu.kvm.runner` builds the event. The handler's writes and registers must
  equal Unicorn's (`ptemu.fixtures.compare_event`, RFLAGS outside the
  undefined flags) and the page must end as Unicorn left it. An exiting
  instruction must make exactly one store, inside one entry.
* After every exit, `cr3_loaded` is called for every watched root other than
  the vCPU's CR3 (the program's processes, never loaded), as
  `MonitoredGuestRun._mmio` does, and then the same `ViewCheck` as that run at
  every probe address: the monitor's view equals a fresh walk of memory; the
  reported changes, applied to the translations before, give that walk; no
  change is `until_cr3_load`; the protected pages are the tables the walks read,
  and here also the tables the tests' own walker (`unicorn_program.Tables`)
  reaches.
* At the end: the exits came at exactly `MonitorScenario.exit_gpas`, in order;
  every page ends as `MonitorScenario.final_pages` says; the guest reached HLT.

Negative controls show the checks can fail: without the `cr3_loaded` calls, PAE
exits at the write the model calls silent (into the directory a PDPTE swap
unlinked), while 4-level is unaffected; a monitor whose changes are dropped is
caught by the shadow of the translations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest
from unicorn import x86_const as x86
from unicorn_program import HLT, UnicornGuest

from ptemu.fixtures.compare import compare_event
from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.kvm.abi import KVM_REGS_NAMES
from ptemu.kvm.layout import PAGE, SELECTOR_DATA, GuestLayout
from ptemu.kvm.monitor_program import (
    DIRECTORY_ENTRY_WRITTEN_UNLINKED,
    MonitorScenario,
    monitor_program,
)
from ptemu.kvm.monitor_run import ViewCheck
from ptemu.kvm.runner import CODE_FETCH_BYTES, _kvm_expectation
from ptemu.monitor import (
    InMemoryProtector,
    MonitorStatus,
    TranslationMonitor,
)
from ptemu.paging.walk import walk
from ptemu.status import Status
from ptemu.vcpu import Vcpu

MODES = [("4level", 64), ("pae", 32)]
CYCLES = 4
"""Every kind of write of a cycle, a freed table reused, the window PTs in turn."""
CONTROL_CYCLES = 1

_GENERAL_64 = ("RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RSP", "RBP",
               "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15", "RIP", "RFLAGS")
_GENERAL_32 = ("EAX", "EBX", "ECX", "EDX", "ESI", "EDI", "ESP", "EBP", "EIP", "EFLAGS")


@dataclasses.dataclass(frozen=True, slots=True)
class _Pending:
    """A store to a protected page that Unicorn made: the exit to deliver."""

    gpa: int
    size: int
    old: bytes
    """The bytes at ``[gpa, gpa + size)`` before the store."""
    regs: dict[str, int]
    """The general registers, RIP and RFLAGS before the instruction."""


class _MonitoredRun(UnicornGuest):
    """The program in Unicorn with the monitor handling every write to a page it protects."""

    def __init__(self, layout: GuestLayout, scenario: MonitorScenario, *,
                 retain_loaded_pdptes: bool = True, tell_cr3_loads: bool = True,
                 drop_changes: bool = False) -> None:
        super().__init__(layout, scenario)
        mode = self.mode = layout.mode
        self.tell_cr3_loads = tell_cr3_loads
        self.drop_changes = drop_changes
        self.protector = InMemoryProtector()
        self.handler = PtWriteHandler(self.memory, mode, coalesce=False)
        self.monitor = TranslationMonitor(self.memory, mode, self.protector,
                                          handler=self.handler,
                                          retain_loaded_pdptes=retain_loaded_pdptes)
        for spec in scenario.watches:
            spec.install(self.monitor)
        assert self.cr3 == scenario.watches[-1].cr3      # the running hierarchy
        self.vcpu = Vcpu(0)
        self.names = _GENERAL_64 if self.long_mode else _GENERAL_32
        self.registers = [getattr(x86, f"UC_X86_REG_{name}") for name in self.names]
        self.before: dict[str, int] = {}
        self.pending: _Pending | None = None
        self.stores = 0
        """Stores of the instruction running now."""
        self.exits: list[int] = []
        self.problems: list[str] = []
        self.checks = 0
        self.view_check = ViewCheck(self.monitor, scenario, self.memory, self._problem)
        self._check()

    # -- Unicorn -------------------------------------------------------------------

    def _general(self) -> dict[str, int]:
        values = dict(zip((name.lower() for name in self.names),
                          self.uc.reg_read_batch(self.registers), strict=True))
        if not self.long_mode:
            values = {"r" + name[1:]: value for name, value in values.items()}
            values.update({f"r{n}": 0 for n in range(8, 16)})
        return {name: values[name] for name in KVM_REGS_NAMES}

    def _on_code(self, uc: Any, address: int, size: int, _data: object) -> None:
        if self.pending is not None:
            self._exit()
        if self.problems and self.problems[-1].startswith("fatal"):
            uc.emu_stop()
            return
        if size == 1 and self.code_byte(address) == HLT:
            self.halted = True
            uc.emu_stop()
            return
        self.before = self._general()
        self.stores = 0

    def _on_write(self, uc: Any, _access: int, address: int, size: int, _value: int,
                  _data: object) -> None:
        self.stores += 1
        first, last = address & ~(PAGE - 1), (address + size - 1) & ~(PAGE - 1)
        protected = self.protector.protected
        if first not in protected and last not in protected:
            if self.pending is not None:
                self._fatal(f"the instruction storing to protected {self.pending.gpa:#x} also "
                            f"stores to {address:#x}")
            return
        entry = self.mode.entry_size
        if self.pending is not None or self.stores != 1 or \
                address // entry != (address + size - 1) // entry:
            self._fatal(f"an exiting instruction at rip {self.before['rip']:#x} makes a store "
                        f"of {size} bytes at {address:#x} that is not its one store inside "
                        "one entry")
            return
        self.pending = _Pending(address, size, self.memory.read(address, size), self.before)

    def run(self) -> _MonitoredRun:
        self.emulate(self._on_code, self._on_write)
        if self.pending is not None:
            self._exit()
        return self

    # -- the exit ------------------------------------------------------------------

    def _fatal(self, text: str) -> None:
        self.problems.append(f"fatal, after exit {len(self.exits)}: {text}")
        self.uc.emu_stop()

    def _problem(self, text: str) -> None:
        self.problems.append(f"after exit {len(self.exits)}: {text}")

    def _event_registers(self, general: Mapping[str, int]) -> dict[str, int]:
        regs = dict(general)
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            regs[name] = self.code_selector if name == "cs" else SELECTOR_DATA
            regs[f"{name}_base"] = 0        # the layout's GDT is flat
        regs.update(self.held)
        return regs

    def _code(self, regs: Mapping[str, int]) -> bytes:
        """The bytes at RIP through the guest's own tables (as `GuestRun._fetch_code`)."""
        out = b""
        while len(out) < CODE_FETCH_BYTES:
            address = regs["rip"] + len(out)
            gpa = walk(self.mode, self.cr3, address, self.memory).gpa
            assert gpa is not None, f"RIP {address:#x} is not mapped"
            chunk = min(CODE_FETCH_BYTES - len(out), PAGE - (address & (PAGE - 1)))
            out += self.memory.read(gpa, chunk)
        return out

    def _exit(self) -> None:
        store, self.pending = self.pending, None
        assert store is not None
        after = self._general()
        data = self.memory.read(store.gpa, store.size)
        page_gpa = store.gpa & ~(PAGE - 1)
        unicorn_page = self.page(page_gpa)
        self.memory.write(store.gpa, store.old)     # the EPT kept the store out
        page_before = self.page(page_gpa)
        regs = self._event_registers(store.regs)
        gla = self.layout.gla_of(store.gpa)
        if walk(self.mode, self.cr3, gla, self.memory).gpa != store.gpa:
            self._fatal(f"GLA {gla:#x} does not translate to the store's GPA {store.gpa:#x}")
            return
        self.exits.append(store.gpa)
        self.vcpu.begin_exit()
        outcome = self.monitor.handle_ept_write(self.vcpu, WriteEvent(
            gpa=store.gpa, gla=gla, regs=regs, code=self._code(regs),
            code_bits=self.layout.code_bits))
        if outcome.status is not MonitorStatus.HANDLED or outcome.event is None or \
                outcome.event.status is not Status.EMULATED:
            self._fatal(f"the monitor did not emulate the write at {store.gpa:#x}: {outcome}")
            self.memory.write(page_gpa, unicorn_page)
            return
        expect = _kvm_expectation(store.gpa, data, page_gpa, page_before,
                                  self.mode.entry_size, regs, after)
        for mismatch in compare_event(expect, outcome.event, before=regs):
            self._problem(f"write at {store.gpa:#x}: {mismatch.key}: Unicorn "
                          f"{mismatch.expected}, handler {mismatch.actual}")
        if self.page(page_gpa) != unicorn_page:
            self._problem(f"page {page_gpa:#x} differs from what Unicorn wrote")
            self.memory.write(page_gpa, unicorn_page)
        if self.drop_changes:
            outcome = dataclasses.replace(outcome, changes=())
        self.view_check.account(outcome)
        if self.tell_cr3_loads:
            for released in self.view_check.cr3_loads():
                self.view_check.account(released)
        self._check()

    # -- the checks ----------------------------------------------------------------

    def _check(self) -> None:
        """`ViewCheck.check`, and the protected pages against the tests' own walker and
        the protector."""
        self.checks += 1
        protected = self.view_check.check()
        for what, pages in (("Tables reaches", self.tables.linked()),
                            ("the protector holds", frozenset(self.protector.protected))):
            if protected != pages:
                self._problem(f"protected pages differ from those {what}: extra "
                              f"{sorted(map(hex, protected - pages))}, missing "
                              f"{sorted(map(hex, pages - protected))}")


def _run(paging: str, bits: int, cycles: int, **options: bool) -> _MonitoredRun:
    layout = GuestLayout.create(paging, bits)
    return _MonitoredRun(layout, monitor_program(layout, cycles), **options).run()


@pytest.fixture(scope="module", params=MODES, ids=[paging for paging, _ in MODES])
def ran(request: pytest.FixtureRequest) -> _MonitoredRun:
    paging, bits = request.param
    return _run(paging, bits, CYCLES)


def test_the_guest_reaches_hlt(ran):
    assert not ran.error, ran.error
    assert ran.halted


def test_every_exit_is_handled_as_unicorn_executed_it_and_the_view_follows(ran):
    assert ran.problems == []
    assert ran.checks == len(ran.exits) + 1


def test_the_exits_are_the_models_in_order(ran):
    assert tuple(ran.exits) == ran.scenario.exit_gpas
    assert len(ran.exits) == CYCLES * (21 if ran.long_mode else 19)


def test_every_page_ends_as_the_model_says(ran):
    wrong = [f"{gpa:#x}" for gpa, content in sorted(ran.scenario.final_pages.items())
             if ran.page(gpa) != content]
    assert not wrong


# -- negative controls ---------------------------------------------------------------


def test_without_cr3_loaded_pae_exits_at_the_write_into_the_unlinked_directory():
    run = _run("pae", 32, CONTROL_CYCLES, tell_cr3_loads=False)
    assert run.halted and not run.error
    expected = run.scenario.exit_gpas
    assert tuple(run.exits) != expected
    index = next(i for i, (a, b) in enumerate(zip(run.exits, expected, strict=False))
                 if a != b)
    # The one extra exit is the write the model calls silent, at the swapped-out
    # directory's entry (which exits again, as the model says, once swapped back
    # in); the model's exits are all there around it.
    extra = run.exits[index]
    assert extra & (PAGE - 1) == DIRECTORY_ENTRY_WRITTEN_UNLINKED * run.mode.entry_size
    assert run.exits[:index] + run.exits[index + 1:] == list(expected)
    assert expected[index:].index(extra) > 0
    # Its change holds until a CR3 load, and the retained directory stays protected.
    assert run.view_check.until_load_changes >= 1
    assert any("protected pages differ" in problem for problem in run.problems)


def test_without_cr3_loaded_4level_is_unaffected():
    run = _run("4level", 64, CONTROL_CYCLES, tell_cr3_loads=False)
    assert run.halted and run.problems == []
    assert tuple(run.exits) == run.scenario.exit_gpas


def test_a_monitor_that_drops_its_changes_is_caught():
    run = _run("pae", 32, CONTROL_CYCLES, drop_changes=True)
    assert tuple(run.exits) == run.scenario.exit_gpas
    assert any("add up to" in problem for problem in run.problems)
