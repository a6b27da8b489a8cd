"""The runner's checks catch a handler that is wrong, and the guest follows KVM."""

from __future__ import annotations

import dataclasses

from conftest import require_mode
from ptemu.kvm.layout import GuestLayout
from ptemu.kvm.machine import GuestMachine
from ptemu.kvm.programs import stress_program
from ptemu.kvm.runner import GuestRun, RunLimits, StopReason, run_guest


class _WrongHandler:
    """Wraps the real handler; every 10th write it stores one flipped bit and
    reports RAX off by one, as a buggy emulator might."""

    def __init__(self, real, memory) -> None:
        self.real = real
        self.memory = memory
        self.calls = 0

    def decode(self, *args):
        return self.real.decode(*args)

    def handle_ept_write(self, vcpu, event):
        result = self.real.handle_ept_write(vcpu, event)
        self.calls += 1
        if self.calls % 10:
            return result
        byte = self.memory.read(event.gpa, 1)[0] ^ 0x04
        self.memory.write(event.gpa, bytes([byte]))
        regs = dict(result.regs)
        regs["rax"] = (event.regs["rax"] + 1) % (1 << 64)
        return dataclasses.replace(result, regs=regs)


def test_wrong_bytes_and_registers_are_reported_and_the_guest_follows_kvm(kvm):
    require_mode(kvm, "4level", 64)
    layout = GuestLayout.create("4level", 64)
    program = stress_program(layout, 5, seed=3)
    with GuestMachine(kvm, layout, program, monitored=True) as machine:
        run = GuestRun(machine, limits=RunLimits(timeout=20))
        run.handler = _WrongHandler(run.handler, machine.memory)  # type: ignore[assignment]
        report = run.run()
    assert report.stop is StopReason.HALTED
    assert report.writes == 5 * program.writes_per_iteration
    assert report.disagreement_count == report.writes // 10
    first = report.disagreements[0]
    keys = {m.key for m in first.mismatches}
    assert "regs.rax" in keys
    assert any(key.startswith("memory[") for key in keys)
    text = first.describe()
    assert f"rip={first.write.regs['rip']:#x}" in text and "registers before:" in text
    rax = next(m for m in first.mismatches if m.key == "regs.rax")
    assert int(rax.actual, 16) == first.write.regs["rax"] + 1
    # After each disagreement the page was set to what KVM wrote.
    reference = run_guest(kvm, layout, program, monitored=False)
    assert report.final_tables == reference.final_tables
