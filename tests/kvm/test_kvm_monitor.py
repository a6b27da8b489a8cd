"""The translation monitor on a real hypervisor: KVM exits only where it protects.

A guest edits its own page tables (`ptemu.kvm.monitor_program`); a
`MemslotProtector` turns the monitor's `protect`/`unprotect` into 4 KiB
read-only memslots. What the run must see comes from KVM (the bytes and
registers of every write), from fresh walks of guest memory (the view after
every exit), and from the program's own model of its tables (which writes
exit, what every page holds at the end), never from the monitor.
"""

from __future__ import annotations

import random

import pytest

from conftest import require_mode
from ptemu.errors import UsageError
from ptemu.kvm.device import KvmSystem
from ptemu.kvm.layout import GuestLayout
from ptemu.kvm.memslots import MemslotProtector
from ptemu.kvm.monitor_program import monitor_program
from ptemu.kvm.monitor_run import MonitorRunReport, run_monitored
from ptemu.kvm.runner import RunLimits, StopReason
from ptemu.monitor import MonitorResult, TranslationMonitor

PAGE = 0x1000
CYCLES = 3

# Table writes one cycle makes, counted from the cycle's steps (monitor_program._cycle):
# link the PT; CMPXCHG a PTE; AND; BTS; the hostile byte; two halves; BTR; OR (9);
# split, BTR in the split table, merge, free the PT (4); swap the directory, a write in
# the other one's PT, swap back, clear the entry written while unlinked (4); link and
# unlink a PDPT (4-level only: 2); the shared kernel PT; a window PT (2).
EXITS_PER_CYCLE = {"4level": 21, "pae": 19}
# Pages protected (and as many unprotected) per cycle: the new PT, the split table,
# the other directory and its PT, the first directory and its PT again, the PDPT (4-level).
PROTECTS_PER_CYCLE = {"4level": 7, "pae": 6}
# PDPTE writes (PAE): the two directory swaps, each a change taking effect at CR3 load.
CR3_LOAD_SWAPS = {"4level": 0, "pae": 2}

MODES = [("4level", 64), ("pae", 32)]


def _run(kvm: KvmSystem, paging: str, cycles: int = CYCLES) -> MonitorRunReport:
    layout = GuestLayout.create(paging)
    scenario = monitor_program(layout, cycles)
    return run_monitored(kvm, layout, scenario, limits=RunLimits(timeout=300))


@pytest.mark.parametrize(("paging", "bits"), MODES)
def test_monitor_decides_what_exits_and_its_view_equals_every_walk(kvm, paging, bits):
    require_mode(kvm, paging, bits)
    report = _run(kvm, paging)
    run = report.run
    assert run.stop is StopReason.HALTED, run.detail
    assert run.disagreement_count == 0, [d.describe() for d in run.disagreements]
    assert report.problems == 0, report.first_problems
    assert report.exits_as_expected, report.exit_difference
    assert run.writes == EXITS_PER_CYCLE[paging] * CYCLES
    # Freed tables written as data, tables built before they are linked: no exit.
    assert report.silent_writes > 0
    assert report.final_pages_ok
    assert report.checks == run.writes + 1
    assert report.protects == report.unprotects == PROTECTS_PER_CYCLE[paging] * CYCLES
    # One hostile byte per cycle sets R/W on a present entry: reported at once, partial.
    assert report.partial_changes == CYCLES
    assert report.cr3_load_changes >= CR3_LOAD_SWAPS[paging] * CYCLES
    assert report.ok


def _broken_run(kvm: KvmSystem, monkeypatch: pytest.MonkeyPatch, bug: str) -> MonitorRunReport:
    if bug == "drops-changes":
        handle = TranslationMonitor.handle_ept_write

        def forgetful(self, vcpu, event):  # type: ignore[no-untyped-def]
            result: MonitorResult = handle(self, vcpu, event)
            return MonitorResult(result.status, result.event, result.changes[1:],
                                 result.protected, result.unprotected)

        monkeypatch.setattr(TranslationMonitor, "handle_ept_write", forgetful)
    elif bug == "never-unprotects":
        def keep(self, gpa):  # type: ignore[no-untyped-def]
            self.protected.discard(gpa)          # forgets it, but the memslot stays read-only

        monkeypatch.setattr(MemslotProtector, "unprotect", keep)
    elif bug == "never-protects":
        def pretend(self, gpa):  # type: ignore[no-untyped-def]
            self.protected.add(gpa)              # claims it, but the memslot stays writable

        original_init = MemslotProtector.__init__

        def init(self, vm):  # type: ignore[no-untyped-def]
            original_init(self, vm)
            monkeypatch.setattr(MemslotProtector, "protect", pretend)

        monkeypatch.setattr(MemslotProtector, "__init__", init)
    return _run(kvm, "4level", cycles=2)


@pytest.mark.parametrize("bug", ["drops-changes", "never-unprotects", "never-protects"])
def test_the_run_catches_a_broken_monitor_or_protector(kvm, monkeypatch, bug):
    require_mode(kvm, "4level", 64)
    report = _broken_run(kvm, monkeypatch, bug)
    assert not report.ok
    if bug == "drops-changes":
        assert report.problems > 0
    elif bug == "never-unprotects":
        # The freed table is still read-only: writing data into it exits.
        assert report.run.stop is StopReason.UNEXPECTED_EXIT or not report.exits_as_expected
    else:
        # New tables never become read-only: writes to them do not exit.
        assert not report.exits_as_expected or report.problems > 0


def _minimal_slots(regions: list[tuple[int, int]], protected: set[int]) -> int:
    """Slots of the tiling: one per protected page, one per maximal writable gap."""
    count = 0
    for start, end in regions:
        writable_run = False
        for page in range(start, end, PAGE):
            if page in protected:
                count += 1
                writable_run = False
            elif not writable_run:
                count += 1
                writable_run = True
    return count


def test_memslot_tiling_follows_protect_and_unprotect(kvm):
    regions = [(0, 0x40000), (0x200000, 0x204000)]
    with kvm.create_vm() as vm:
        for slot, (start, end) in enumerate(regions):
            vm.add_memory(slot, start, end - start)
        protector = MemslotProtector(vm)
        pages = [page for start, end in regions for page in range(start, end, PAGE)]
        protected: set[int] = set()
        generator = random.Random(5)
        for _ in range(300):
            page = generator.choice(pages)
            if page in protected:
                protector.unprotect(page)
                protected.remove(page)
            else:
                protector.protect(page)
                protected.add(page)
            assert protector.protected == protected
            assert protector.readonly_pages() == protected
            assert protector.slots == _minimal_slots(regions, protected)
        for page in sorted(protected):
            protector.unprotect(page)
        assert protector.slots == len(regions)


def test_memslot_protector_refuses_what_the_protocol_forbids(kvm):
    with kvm.create_vm() as vm:
        vm.add_memory(0, 0, 0x10000)
        protector = MemslotProtector(vm)
        protector.protect(0x3000)
        with pytest.raises(UsageError, match="already protected"):
            protector.protect(0x3000)
        with pytest.raises(UsageError, match="not protected"):
            protector.unprotect(0x4000)
        with pytest.raises(UsageError, match="page-aligned"):
            protector.protect(0x3008)
        with pytest.raises(UsageError, match="not guest memory"):
            protector.protect(0x100000)
        assert protector.readonly_pages() == {0x3000}


def test_monitor_program_refuses_modes_and_sizes_it_does_not_build():
    with pytest.raises(UsageError, match="4level paging with 64-bit code or in pae"):
        monitor_program(GuestLayout.create("legacy"), 1)
    with pytest.raises(UsageError, match="4level paging with 64-bit code or in pae"):
        monitor_program(GuestLayout.create("4level", 32), 1)
    with pytest.raises(UsageError, match="iterations: 1000 is not in 1.."):
        monitor_program(GuestLayout.create("4level"), 1000)
