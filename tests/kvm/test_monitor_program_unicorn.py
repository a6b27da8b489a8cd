"""The monitored-run guest program, run in Unicorn with its real paging (no KVM needed).

This host's KVM pages only in long mode, so the PAE variant of
`ptemu.kvm.monitor_program` (32-bit code: CMPXCHG8B, 32-bit LOCK AND/OR/BTS/BTR
on one dword, REP STOSD, a loop of two dword stores) never runs there. Here
Unicorn runs the program's code on the very image KVM would load
(`ptemu.kvm.machine.guest_image`), with CR0/CR3/CR4/EFER, GDT and selectors as
`ptemu.kvm.layout` sets them for KVM, every page writable, until HLT; the
4-level variant (64-bit code) runs the same way as a control.

What the generator's model promises is checked against oracles of the test's own:

* every page in `MonitorScenario.final_pages` holds exactly those bytes at the end;
* every page the guest writes is one the model accounts for;
* which writes must exit: a write exits when it lands in a table *linked* at that
  moment, i.e. reachable from a watched root (`MonitorScenario.watches`) within
  the watched linear range. Reachability is worked out in the write hook, before
  the store, by walking the guest's tables in Unicorn's memory with the SDM's
  entry layout (P, PS, bits 51:12; vol. 3A, 4.4-4.5), written in the tests
  (`unicorn_program.Tables`) and not taken from ptemu or the generator. The GPAs of those writes, in order, must equal
  `MonitorScenario.exit_gpas`, and their number per cycle the hand count of
  `tests/kvm/test_kvm_monitor.py`;
* every other writing instruction (a REP STOS counted once) is a write the
  model calls silent (`MonitorScenario.silent_writes`; PAE's 32-bit store loop
  writes each entry as two dword stores, each counted);
* each store's GPA as Unicorn reports it is the translation, through the
  guest's own tables (`ptemu.paging.walk`), of the linear address in RDI/EDI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from unicorn_program import HLT, REP, UnicornGuest

from ptemu.kvm.layout import PAGE, GuestLayout
from ptemu.kvm.monitor_program import MonitorScenario, monitor_program
from ptemu.paging.walk import walk

# Table writes one cycle makes, counted by hand from the cycle's steps as
# tests/kvm/test_kvm_monitor.py does: link the PT, CMPXCHG a PTE, AND, BTS, the
# hostile byte, two halves, BTR, OR (9); split, BTR in the split table, merge,
# free the PT (4); swap the directory, a write in the other one's PT, swap back,
# clear the entry written while unlinked (4); link and unlink a PDPT (4-level
# only: 2); the shared kernel PT and a window PT (2).
EXITS_PER_CYCLE = {"4level": 21, "pae": 19}

MODES = [("4level", 64), ("pae", 32)]
CYCLES = 5
"""Enough for every window PT and kernel PTE to be written and freed pages to be reused
(the generator allows up to 51 cycles; all pass too, in about 11 s per mode)."""


@dataclass(frozen=True, slots=True)
class Store:
    """One call of the write hook."""

    seq: int
    """Which instruction execution made it (the code hook's count)."""
    rip: int
    gpa: int
    size: int
    linked: bool
    """The page was a linked (watched, reachable) table just before the store."""
    walked_gpa: int | None
    """The GPA of RDI/EDI through the guest's tables (`ptemu.paging.walk`)."""


@dataclass
class Instruction:
    """One writing instruction (all iterations of a REP STOS together)."""

    rip: int
    stores: list[Store] = field(default_factory=list)

    @property
    def linked(self) -> bool:
        return any(store.linked for store in self.stores)


class _Run(UnicornGuest):
    """The program's code in Unicorn, on the KVM guest image, until HLT."""

    def __init__(self, layout: GuestLayout, scenario: MonitorScenario) -> None:
        super().__init__(layout, scenario)
        self.linked: frozenset[int] | None = None
        self.stores: list[Store] = []
        self.seq = 0
        self.rip = 0

    def _on_code(self, uc: Any, address: int, size: int, _data: object) -> None:
        if size == 1 and self.code_byte(address) == HLT:
            self.halted = True
            uc.emu_stop()
            return
        self.seq += 1
        self.rip = address

    def _on_write(self, uc: Any, _access: int, address: int, size: int, _value: int,
                  _data: object) -> None:
        if self.linked is None:
            self.linked = self.tables.linked()
        page = address & ~(PAGE - 1)
        linked = page in self.linked
        if linked:
            self.linked = None          # the store may link or unlink: walk again next time
        result = walk(self.layout.mode, self.cr3, int(uc.reg_read(self.rdi)), self.memory)
        self.stores.append(Store(self.seq, self.rip, address, size, linked, result.gpa))

    def run(self) -> None:
        self.emulate(self._on_code, self._on_write)

    def instructions(self) -> list[Instruction]:
        """Stores grouped per instruction; a REP STOS's iterations are one."""
        out: list[Instruction] = []
        last_seq = -1
        for store in self.stores:
            same = store.seq == last_seq
            rep_again = (bool(out) and store.seq == last_seq + 1 and out[-1].rip == store.rip
                         and self.code_byte(store.rip) == REP)
            if same or rep_again:
                out[-1].stores.append(store)
            else:
                out.append(Instruction(store.rip, [store]))
            last_seq = store.seq
        return out


def _first_difference(got: list[int], want: tuple[int, ...]) -> str:
    for index, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return f"write {index}: got {a:#x}, the model expects {b:#x}"
    return f"lengths differ: got {len(got)}, the model expects {len(want)}"


@pytest.fixture(scope="module", params=MODES, ids=[paging for paging, _ in MODES])
def ran(request: pytest.FixtureRequest) -> tuple[str, MonitorScenario, _Run]:
    paging, bits = request.param
    layout = GuestLayout.create(paging, bits)
    scenario = monitor_program(layout, CYCLES)
    run = _Run(layout, scenario)
    run.run()
    return paging, scenario, run


def test_unicorn_takes_the_kvm_control_registers(ran):
    _, _, run = ran
    assert run.held == run.control


def test_the_guest_reaches_hlt(ran):
    _, _, run = ran
    assert not run.error, run.error
    assert run.halted, f"stopped after {run.seq} instructions without HLT"


def test_every_page_ends_as_the_model_says(ran):
    _, scenario, run = ran
    wrong = [f"{gpa:#x}" for gpa, content in sorted(scenario.final_pages.items())
             if run.page(gpa) != content]
    assert not wrong, f"pages differing from the model: {wrong}"


def test_every_written_page_is_in_the_model(ran):
    _, scenario, run = ran
    written = {store.gpa & ~(PAGE - 1) for store in run.stores}
    assert written
    assert written <= set(scenario.final_pages), sorted(
        hex(page) for page in written - set(scenario.final_pages))


def test_each_store_gpa_is_the_walk_of_its_linear_address(ran):
    _, _, run = ran
    # Every store of the program is to [RDI] or [RDI+4] (EDI in 32-bit code).
    assert run.stores
    wrong = [store for store in run.stores
             if store.walked_gpa is None or store.gpa - store.walked_gpa not in (0, 4)]
    assert not wrong, wrong[:5]
    assert all(store.gpa + store.size <= run.memory_end for store in run.stores)


def test_writes_to_linked_tables_are_exactly_the_models_exits(ran):
    paging, scenario, run = ran
    instructions = run.instructions()
    exiting = [ins for ins in instructions if ins.linked]
    # An exit is one instruction's one store, inside one entry.
    assert all(len(ins.stores) == 1 for ins in exiting), [
        ins for ins in exiting if len(ins.stores) != 1][:3]
    entry = run.layout.mode.entry_size
    assert all(ins.stores[0].gpa // entry == (ins.stores[0].gpa + ins.stores[0].size - 1) // entry
               for ins in exiting)
    got = [ins.stores[0].gpa for ins in exiting]
    assert tuple(got) == scenario.exit_gpas, _first_difference(got, scenario.exit_gpas)
    assert len(got) == EXITS_PER_CYCLE[paging] * CYCLES


def test_every_other_writing_instruction_is_a_silent_write_of_the_model(ran):
    paging, scenario, run = ran
    instructions = run.instructions()
    silent = [ins for ins in instructions if not ins.linked]
    assert len(silent) == scenario.silent_writes
    # Each cycle fills the new PT and the split table, then both again as data:
    # four REP STOS of a whole page (1024 dwords or 512 qwords).
    unit = 4 if paging == "pae" else 8
    fills = [ins for ins in silent if len(ins.stores) > 1]
    assert len(fills) == 4 * CYCLES
    assert all(len(ins.stores) == PAGE // unit and {s.size for s in ins.stores} == {unit}
               for ins in fills)
