"""Real guests under KVM: ptemu's handler against every write KVM executes.

For each paging mode and code size this host's KVM runs, a stress guest
makes a few thousand page-table writes across every instruction family; each
write is checked (bytes against KVM's MMIO data, registers against the
vCPU's), and the final page tables must equal those the same program leaves
when the page tables are ordinary writable memory.
"""

from __future__ import annotations

import pytest

from conftest import require_mode
from ptemu.kvm.layout import GuestLayout
from ptemu.kvm.programs import stress_program
from ptemu.kvm.runner import RunLimits, StopReason, run_guest

MODES = [("legacy", 32), ("pae", 32), ("4level", 64), ("4level", 32), ("5level", 64)]
ITERATIONS = 80
FAMILIES = {"mov", "xchg", "cmpxchg", "cmpxchg8b", "and", "or", "xor", "bts", "btr", "btc"}


@pytest.mark.parametrize(("paging", "bits"), MODES, ids=[f"{p}-{b}" for p, b in MODES])
def test_stress_guest_agrees_with_kvm_and_matches_unmonitored_run(kvm, paging, bits):
    require_mode(kvm, paging, bits)
    layout = GuestLayout.create(paging, bits)
    program = stress_program(layout, ITERATIONS, seed=7)
    limits = RunLimits(timeout=40)
    monitored = run_guest(kvm, layout, program, monitored=True, limits=limits)
    details = "\n".join(d.describe() for d in monitored.disagreements)
    assert monitored.stop is StopReason.HALTED, monitored.detail
    assert monitored.disagreement_count == 0, details
    assert monitored.writes == ITERATIONS * program.writes_per_iteration
    assert monitored.writes >= 2000
    stos = {name for name in monitored.families if name.startswith("stos")}
    assert FAMILIES <= set(monitored.families), monitored.families
    assert len(stos) == (4 if bits == 64 else 3)

    reference = run_guest(kvm, layout, program, monitored=False, limits=limits)
    assert reference.stop is StopReason.HALTED, reference.detail
    assert reference.writes == 0 and reference.steps == 0
    assert reference.final_tables != reference.initial_tables
    assert monitored.initial_tables == reference.initial_tables
    assert monitored.final_tables == reference.final_tables
    # The guest's loop registers end the same way too (RIP after HLT, the counter).
    assert monitored.final_regs["rip"] == reference.final_regs["rip"]
