"""The monitor guest program in Unicorn: shared setup of the Unicorn tests.

`UnicornGuest` loads the very image KVM would load (`ptemu.kvm.machine.guest_image`)
into Unicorn, with CR0/CR3/CR4/EFER, GDT and selectors as `ptemu.kvm.layout` sets
them for KVM, every page writable, and runs it until HLT with the caller's code
and memory-write hooks. `UnicornMemory` is Unicorn's memory as ptemu's
`GuestMemory` (Unicorn maps GPAs one to one), and `Tables` is the tests' own
walker of the tables reachable from the watched roots (SDM vol. 3A, 4.4-4.5),
independent of ptemu and of the program's generator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

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
from ptemu.kvm.monitor_program import MonitorScenario, WatchSpec

EFER_MSR = 0xC000_0080
HLT = 0xF4
REP = 0xF3
INSTRUCTION_BUDGET = 2_000_000
ADDRESS_BITS_51_12 = 0x000F_FFFF_FFFF_F000
P, PS = 1 << 0, 1 << 7

CodeHook = Callable[[Any, int, int, object], None]
WriteHook = Callable[[Any, int, int, int, int, object], None]


class UnicornMemory:
    """Unicorn's memory as a `ptemu.memory.GuestMemory` (Unicorn maps GPAs)."""

    def __init__(self, uc: Any) -> None:
        self.uc = uc

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.uc.mem_read(gpa, size))

    def write(self, gpa: int, data: bytes) -> None:
        self.uc.mem_write(gpa, bytes(data))

    def compare_and_store(self, gpa: int, expected: bytes, new: bytes) -> bool:
        # Unicorn runs nothing while a hook or the handler runs: this is atomic.
        if self.read(gpa, len(expected)) != bytes(expected):
            return False
        self.write(gpa, new)
        return True


class Tables:
    """Tables reachable from the watched roots: the tests' own walk (SDM 4.4-4.5).

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


class UnicornGuest:
    """The program's code in Unicorn, on the KVM guest image, set up as KVM sets it up."""

    def __init__(self, layout: GuestLayout, scenario: MonitorScenario) -> None:
        self.layout = layout
        self.scenario = scenario
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
        self.code_selector = SELECTOR_CODE64 if self.long_mode else SELECTOR_CODE32
        uc.reg_write(x86.UC_X86_REG_CS, self.code_selector)
        for name in ("DS", "ES", "SS", "FS", "GS"):
            uc.reg_write(getattr(x86, f"UC_X86_REG_{name}"), SELECTOR_DATA)
        stack = layout.gla_of(layout.stack_top_gpa)
        uc.reg_write(x86.UC_X86_REG_RSP if self.long_mode else x86.UC_X86_REG_ESP, stack)
        self.rdi = x86.UC_X86_REG_RDI if self.long_mode else x86.UC_X86_REG_EDI
        self.tables = Tables(layout, scenario.watches, uc)
        self.memory = UnicornMemory(uc)
        self.halted = False
        self.error = ""

    def code_byte(self, gla: int) -> int:
        return int(self.uc.mem_read(self.layout.code_gpa + gla - self.layout.text, 1)[0])

    def page(self, gpa: int) -> bytes:
        return bytes(self.uc.mem_read(gpa, PAGE))

    def emulate(self, on_code: CodeHook, on_write: WriteHook) -> None:
        """Run from the program's start with the two hooks until HLT or an error.

        `on_code` stops the run (``uc.emu_stop()``) at HLT; an error of
        Unicorn's is kept in `error` with the RIP where it happened.
        """
        hooks = [self.uc.hook_add(unicorn.UC_HOOK_CODE, on_code),
                 self.uc.hook_add(unicorn.UC_HOOK_MEM_WRITE, on_write)]
        until = (1 << 64) - 1 if self.long_mode else (1 << 32) - 1
        try:
            self.uc.emu_start(self.layout.text, until, count=INSTRUCTION_BUDGET)
        except unicorn.UcError as error:
            where = self.uc.reg_read(x86.UC_X86_REG_RIP)
            self.error = f"{error} at rip {where:#x}"
        finally:
            for hook in hooks:
                self.uc.hook_del(hook)
