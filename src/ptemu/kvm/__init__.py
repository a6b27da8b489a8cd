"""Run guests under KVM and check ptemu's handler against every real VM exit.

Standard library only: `abi` transcribes <linux/kvm.h>, `device` drives
/dev/kvm, `layout` and `machine` bring a guest up directly in a paged mode,
`programs` and `kernel` are what the guest runs, `runner` handles the exits
and compares, `capture` saves what a run saw as a fixture, `probe` says what
this host's KVM can do. docs/kvm.md has the whole story.
"""

from ptemu.kvm.capture import fixture_document, save_fixture
from ptemu.kvm.catalog import PROGRAM_NAMES, build_program
from ptemu.kvm.device import KvmError, KvmSystem, KvmUnavailable
from ptemu.kvm.kernel import kernel_program, load_kernel_writers, select_writers
from ptemu.kvm.layout import GuestLayout
from ptemu.kvm.machine import GuestMachine, KvmGuestMemory
from ptemu.kvm.probe import ModeSupport, probe_host, probe_mode
from ptemu.kvm.programs import GuestProgram, stress_program
from ptemu.kvm.runner import (
    Disagreement,
    GuestRun,
    ObservedWrite,
    RunLimits,
    RunReport,
    StopReason,
    run_guest,
)

__all__ = [
    "PROGRAM_NAMES",
    "Disagreement",
    "GuestLayout",
    "GuestMachine",
    "GuestProgram",
    "GuestRun",
    "KvmError",
    "KvmGuestMemory",
    "KvmSystem",
    "KvmUnavailable",
    "ModeSupport",
    "ObservedWrite",
    "RunLimits",
    "RunReport",
    "StopReason",
    "build_program",
    "fixture_document",
    "kernel_program",
    "load_kernel_writers",
    "probe_host",
    "probe_mode",
    "run_guest",
    "save_fixture",
    "select_writers",
    "stress_program",
]
