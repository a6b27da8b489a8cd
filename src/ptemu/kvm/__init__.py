"""Run guests under KVM and check ptemu's handler against every real VM exit.

Standard library only: `abi` transcribes <linux/kvm.h>, `device` drives
/dev/kvm, `layout` and `machine` bring a guest up directly in a paged mode,
`programs` and `kernel` are what the guest runs, `runner` handles the exits
and compares, `capture` saves what a run saw as a fixture, `probe` says what
this host's KVM can do. `memslots` write-protects single pages with read-only
memslots, `monitor_program` and `monitor_run` run a guest that edits its own
page tables with the translation monitor deciding what exits. docs/kvm.md has the whole story.
"""

from typing import Any

# The names below are loaded on first use (PEP 562), so that importing one
# module of this package (the CLI reads `PROGRAM_NAMES` to build its parser)
# does not import the runner, the handler, Capstone and Unicorn.
_LAZY: dict[str, str] = {
    "Disagreement": "ptemu.kvm.runner",
    "GuestLayout": "ptemu.kvm.layout",
    "GuestMachine": "ptemu.kvm.machine",
    "GuestProgram": "ptemu.kvm.programs",
    "GuestRun": "ptemu.kvm.runner",
    "KvmError": "ptemu.kvm.device",
    "KvmGuestMemory": "ptemu.kvm.machine",
    "KvmSystem": "ptemu.kvm.device",
    "KvmUnavailable": "ptemu.kvm.device",
    "MemslotProtector": "ptemu.kvm.memslots",
    "MonitorRunReport": "ptemu.kvm.monitor_run",
    "MonitorScenario": "ptemu.kvm.monitor_program",
    "ModeSupport": "ptemu.kvm.probe",
    "ObservedWrite": "ptemu.kvm.runner",
    "PROGRAM_NAMES": "ptemu.kvm.catalog",
    "RunLimits": "ptemu.kvm.runner",
    "RunReport": "ptemu.kvm.runner",
    "StopReason": "ptemu.kvm.runner",
    "build_program": "ptemu.kvm.catalog",
    "fixture_document": "ptemu.kvm.capture",
    "kernel_program": "ptemu.kvm.kernel",
    "load_kernel_writers": "ptemu.kvm.kernel",
    "monitor_program": "ptemu.kvm.monitor_program",
    "probe_host": "ptemu.kvm.probe",
    "probe_mode": "ptemu.kvm.probe",
    "run_guest": "ptemu.kvm.runner",
    "run_monitored": "ptemu.kvm.monitor_run",
    "save_fixture": "ptemu.kvm.capture",
    "select_writers": "ptemu.kvm.kernel",
    "stress_program": "ptemu.kvm.programs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ptemu.kvm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


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
    "MemslotProtector",
    "ModeSupport",
    "MonitorRunReport",
    "MonitorScenario",
    "ObservedWrite",
    "RunLimits",
    "RunReport",
    "StopReason",
    "build_program",
    "fixture_document",
    "kernel_program",
    "load_kernel_writers",
    "monitor_program",
    "probe_host",
    "probe_mode",
    "run_guest",
    "run_monitored",
    "save_fixture",
    "select_writers",
    "stress_program",
]
