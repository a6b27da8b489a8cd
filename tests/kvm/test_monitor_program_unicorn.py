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
  entry layout (P, PS, bits 51:12; vol. 3A, 4.4-4.5), written here and not taken
  from ptemu or the generator. The GPAs of those writes, in order, must equal
  `MonitorScenario.exit_gpas`, and their number per cycle the hand count of
  `tests/kvm/test_kvm_monitor.py`;
* every other writing instruction (a REP STOS counted once) is a write the
  model calls silent (`MonitorScenario.silent_writes`; PAE's 32-bit store loop
  writes each entry as two dword stores, each counted);
* each store's GPA as Unicorn reports it is the translation, through the
  guest's own tables (`ptemu.paging.walk`), of the linear address in RDI/EDI.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import unicorn
from unicorn import x86_const as x86

from ptemu.kvm.layout import (
    CR4_BY_MODE,
    EFER_BY_MODE,
    GDT_LIMIT,
    GUEST_CR0,
    PAGE,
    SELECTOR_CODE32,
    SELECTOR_CODE64,
    SELECTOR_DATA,
    GuestLayout,
)
from ptemu.kvm.machine import guest_image
from ptemu.kvm.monitor_program import MonitorScenario, WatchSpec, monitor_program
from ptemu.paging.walk import walk

EFER_MSR = 0xC000_0080
HLT = 0xF4
REP = 0xF3
INSTRUCTION_BUDGET = 2_000_000
ADDRESS_BITS_51_12 = 0x000F_FFFF_FFFF_F000
P, PS = 1 << 0, 1 << 7

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


class _UnicornMemory:
    """Unicorn's memory as a `ptemu.paging.walk.PhysicalReader` (Unicorn maps GPAs)."""

    def __init__(self, uc: Any) -> None:
        self.uc = uc

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.uc.mem_read(gpa, size))


class _Tables:
    """Tables reachable from the watched roots: the test's own walk (SDM 4.4-4.5).

    Linear addresses are handled in the mode's own width (48 bits for 4-level,
    sign extension dropped; 32 bits for PAE). Each level is given by the lowest
    address bit its index selects; PS makes a leaf at the 1 GiB (4-level
    PDPTE only: a PAE PDPTE has no PS) and 2 MiB levels.
    """

    def __init__(self, layout: GuestLayout, watches: tuple[WatchSpec, ...], uc: Any) -> None:
        self.uc = uc
        self.level4 = layout.mode.name == "4level"
        self.shifts = (39, 30, 21, 12) if self.level4 else (30, 21, 12)
        self.width = 48 if self.level4 else 32
        self.regions: list[tuple[int, int, int]] = []
        mask = (1 << self.width) - 1
        for watch in watches:
            if watch.ranges == "all":
                self.regions.append((watch.cr3, 0, 1 << self.width))
            elif watch.ranges == "kernel":
                # The upper half: 4-level's canonical upper half, or PAE's 3 GiB split.
                base = 1 << 47 if watch.kernel_base is None else watch.kernel_base & mask
                self.regions.append((watch.cr3, base, 1 << self.width))
            else:
                assert not isinstance(watch.ranges, str), watch.ranges
                for gla, size in watch.ranges:
                    self.regions.append((watch.cr3, gla & mask, (gla & mask) + size))

    def _entry(self, gpa: int) -> int:
        return int.from_bytes(self.uc.mem_read(gpa, 8), "little")

    def _walk(self, table: int, depth: int, base: int, low: int, high: int) -> Iterator[int]:
        yield table
        if depth == len(self.shifts) - 1:
            return
        shift = self.shifts[depth]
        count = 4 if (not self.level4 and depth == 0) else 512
        for index in range(count):
            start = base + (index << shift)
            if start + (1 << shift) <= low or start >= high:
                continue
            entry = self._entry(table + 8 * index)
            if not entry & P:
                continue
            if entry & PS and shift in ((30, 21) if self.level4 else (21,)):
                continue
            yield from self._walk(entry & ADDRESS_BITS_51_12, depth + 1, start, low, high)

    def linked(self) -> frozenset[int]:
        pages: set[int] = set()
        for root, low, high in self.regions:
            pages.update(self._walk(root, 0, 0, low, high))
        return frozenset(pages)


class _Run:
    """The program's code in Unicorn, on the KVM guest image, until HLT."""

    def __init__(self, layout: GuestLayout, scenario: MonitorScenario) -> None:
        self.layout = layout
        self.long_mode = layout.code_bits == 64
        image, self.cr3 = guest_image(layout, scenario.program)
        mode = unicorn.UC_MODE_64 if self.long_mode else unicorn.UC_MODE_32
        uc: Any = unicorn.Uc(unicorn.UC_ARCH_X86, mode)
        self.uc = uc
        self.memory_end = layout.monitored_gpa + layout.monitored_size
        uc.mem_map(0, self.memory_end)      # RAM and the monitored pages, all writable
        for page in image.pages():
            uc.mem_write(page, image.read(page, PAGE))
        self.control = {"cr3": self.cr3, "cr4": CR4_BY_MODE[layout.mode.name],
                        "efer": EFER_BY_MODE[layout.mode.name], "cr0": GUEST_CR0}
        uc.reg_write(x86.UC_X86_REG_CR3, self.control["cr3"])
        uc.reg_write(x86.UC_X86_REG_CR4, self.control["cr4"])
        uc.msr_write(EFER_MSR, self.control["efer"])
        uc.reg_write(x86.UC_X86_REG_CR0, self.control["cr0"])
        self.held = {"cr0": uc.reg_read(x86.UC_X86_REG_CR0),
                     "cr3": uc.reg_read(x86.UC_X86_REG_CR3),
                     "cr4": uc.reg_read(x86.UC_X86_REG_CR4), "efer": uc.msr_read(EFER_MSR)}
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, layout.gla_of(layout.gdt_gpa), GDT_LIMIT, 0))
        uc.reg_write(x86.UC_X86_REG_CS, SELECTOR_CODE64 if self.long_mode else SELECTOR_CODE32)
        for name in ("DS", "ES", "SS", "FS", "GS"):
            uc.reg_write(getattr(x86, f"UC_X86_REG_{name}"), SELECTOR_DATA)
        stack = layout.gla_of(layout.stack_top_gpa)
        uc.reg_write(x86.UC_X86_REG_RSP if self.long_mode else x86.UC_X86_REG_ESP, stack)
        self.rdi = x86.UC_X86_REG_RDI if self.long_mode else x86.UC_X86_REG_EDI
        self.tables = _Tables(layout, scenario.watches, uc)
        self.reader = _UnicornMemory(uc)
        self.linked: frozenset[int] | None = None
        self.stores: list[Store] = []
        self.seq = 0
        self.rip = 0
        self.halted = False
        self.error = ""

    def code_byte(self, gla: int) -> int:
        return int(self.uc.mem_read(self.layout.code_gpa + gla - self.layout.text, 1)[0])

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
        result = walk(self.layout.mode, self.cr3, int(uc.reg_read(self.rdi)), self.reader)
        self.stores.append(Store(self.seq, self.rip, address, size, linked, result.gpa))

    def run(self) -> None:
        hooks = [self.uc.hook_add(unicorn.UC_HOOK_CODE, self._on_code),
                 self.uc.hook_add(unicorn.UC_HOOK_MEM_WRITE, self._on_write)]
        until = (1 << 64) - 1 if self.long_mode else (1 << 32) - 1
        try:
            self.uc.emu_start(self.layout.text, until, count=INSTRUCTION_BUDGET)
        except unicorn.UcError as error:
            where = self.uc.reg_read(x86.UC_X86_REG_RIP)
            self.error = f"{error} at rip {where:#x}"
        finally:
            for hook in hooks:
                self.uc.hook_del(hook)

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

    def page(self, gpa: int) -> bytes:
        return bytes(self.uc.mem_read(gpa, PAGE))


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
