"""Guests that go wrong end the run with a clear report, never a hang."""

from __future__ import annotations

import time

import pytest

from conftest import require_mode
from ptemu.kvm.asm import RAX, RDI, Assembler
from ptemu.kvm.layout import GuestLayout
from ptemu.kvm.programs import GuestProgram
from ptemu.kvm.runner import RunLimits, StopReason, run_guest
from ptemu.status import Status


@pytest.fixture
def layout(kvm) -> GuestLayout:
    require_mode(kvm, "4level", 64)
    return GuestLayout.create("4level", 64)


def _program(build) -> GuestProgram:
    a = Assembler(64)
    build(a)
    return GuestProgram(name="bad", code=a.assemble())


def test_triple_fault_ends_the_run(kvm, layout):
    program = _program(lambda a: (a.mov_imm(RAX, 1), a.ud2()))
    report = run_guest(kvm, layout, program, limits=RunLimits(timeout=10))
    assert report.stop is StopReason.TRIPLE_FAULT
    assert "KVM_EXIT_SHUTDOWN" in report.detail and "triple fault" in report.detail
    assert f"rip={layout.text + 10:#x}" in report.detail  # the UD2 after a 10-byte MOV


def _spin(a: Assembler) -> None:
    a.label("spin")
    a.jmp("spin")


def test_runaway_guest_stops_at_the_exit_bound(kvm, layout):
    report = run_guest(kvm, layout, _program(_spin), limits=RunLimits(max_exits=500, timeout=10))
    assert report.stop is StopReason.EXIT_LIMIT
    assert report.exits == 500
    assert "500" in report.detail


def test_runaway_guest_stops_at_the_time_bound(kvm, layout):
    started = time.monotonic()
    report = run_guest(kvm, layout, _program(_spin), limits=RunLimits(timeout=0.5))
    assert report.stop is StopReason.TIMEOUT
    assert time.monotonic() - started < 5
    assert f"{layout.text:#x}" in report.detail


def test_unmonitored_runaway_guest_is_interrupted_in_kvm_run(kvm, layout):
    # No single-stepping: the vCPU never exits by itself, only the alarm stops it.
    started = time.monotonic()
    report = run_guest(kvm, layout, _program(_spin), monitored=False,
                       limits=RunLimits(timeout=0.5))
    assert report.stop is StopReason.TIMEOUT
    assert report.exits <= 2
    assert time.monotonic() - started < 5


def test_a_write_the_handler_refuses_ends_the_run(kvm, layout):
    # An 8-byte store across the end of the first monitored page: KVM splits it
    # into two MMIO writes; ptemu refuses a write that leaves the faulting page.
    def build(a: Assembler) -> None:
        a.mov_imm(RDI, layout.monitored_gla)
        a.mov_imm(RAX, 0x1111111122222222)
        a.store(RAX, RDI, 0xFFC, w=True)
        a.hlt()
    report = run_guest(kvm, layout, _program(build), limits=RunLimits(timeout=10))
    assert report.stop is StopReason.REFUSED
    assert report.refused is not None and report.refused.status is Status.UNSUPPORTED
    assert f"gpa={layout.monitored_gpa + 0xFFC:#x}" in report.detail
    assert "kvm data=22 22 22 22" in report.detail
    assert "across the end of the page" in report.detail


def test_port_io_is_an_unexpected_exit(kvm, layout):
    program = _program(lambda a: a.raw(b"\xe6\x80"))  # out 0x80, al
    report = run_guest(kvm, layout, program, limits=RunLimits(timeout=10))
    assert report.stop is StopReason.UNEXPECTED_EXIT
    assert "KVM_EXIT_IO (port 0x80)" in report.detail


def test_read_of_unbacked_memory_is_an_unexpected_exit(kvm, layout):
    def build(a: Assembler) -> None:
        a.mov_imm(RDI, layout.gla_of(0x300000))  # mapped by the direct map, no memslot
        a.load(RAX, RDI, 0, w=True)
        a.hlt()
    report = run_guest(kvm, layout, _program(build), limits=RunLimits(timeout=10))
    assert report.stop is StopReason.UNEXPECTED_EXIT
    assert "read 8 bytes at GPA 0x300000" in report.detail


def test_bad_limits_are_usage_errors():
    from ptemu.errors import UsageError
    with pytest.raises(UsageError, match="max exits"):
        RunLimits(max_exits=0)
    with pytest.raises(UsageError, match="timeout"):
        RunLimits(timeout=0)


def test_hlt_ends_a_single_stepped_run_even_when_kvm_reports_a_debug_exit(kvm, layout):
    # Code after the HLT would write a monitored page if the vCPU ran on
    # (kvm_pvm reports a single-stepped HLT as KVM_EXIT_DEBUG and continues).
    def build(a: Assembler) -> None:
        a.mov_imm(RDI, layout.monitored_gla)
        a.hlt()
        a.store(RAX, RDI, 0, w=True)
        a.hlt()
    report = run_guest(kvm, layout, _program(build), limits=RunLimits(timeout=10))
    assert report.stop is StopReason.HALTED
    assert report.writes == 0
    assert report.final_regs["rip"] == layout.text + 11  # just past the first HLT
