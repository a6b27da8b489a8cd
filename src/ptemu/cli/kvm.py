"""``ptemu kvm``: run guests under KVM and check ptemu against every real exit.

``ptemu kvm run`` brings a guest up in a paging mode, runs a page-table
writer under single-stepping with the page tables in a read-only memslot,
checks ptemu's handler against KVM on each write and prints exits handled,
disagreements and events per second. ``ptemu kvm probe`` says what this
host's KVM can do.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from ptemu.errors import UsageError
from ptemu.kvm.capture import save_fixture
from ptemu.kvm.catalog import PROGRAM_NAMES, build_program
from ptemu.kvm.device import KvmSystem
from ptemu.kvm.layout import GuestLayout
from ptemu.kvm.probe import probe_host
from ptemu.kvm.runner import RunLimits, RunReport, StopReason, run_guest
from ptemu.paging.modes import MODE_NAMES

EXIT_OK = 0
EXIT_DISAGREE = 1
"""ptemu and KVM disagree, the handler refused a write, or the page tables
differ from an unmonitored run."""
EXIT_GUEST = 3
"""The guest did not finish: triple fault, a bound reached, an unexpected exit."""


def register(subparsers: Any) -> None:
    """Add ``ptemu kvm`` with its ``run`` and ``probe`` subcommands."""
    parser = subparsers.add_parser(
        "kvm", help="run guests under KVM and check ptemu against real VM exits",
        description=__doc__.split("\n\n")[1] if __doc__ else None)
    commands = parser.add_subparsers(dest="kvm_command", metavar="KVM_COMMAND")
    commands.required = True
    run = commands.add_parser("run", help="run a guest page-table writer under KVM")
    run.add_argument("--mode", default="4level", choices=MODE_NAMES,
                     help="paging mode of the guest (default 4level)")
    run.add_argument("--code-bits", type=int, choices=(32, 64), default=None,
                     help="operating size of the writer (default: 64 in 4/5-level, else 32; "
                          "32 in 4/5-level runs in compatibility mode)")
    run.add_argument("--program", default="stress", choices=PROGRAM_NAMES,
                     help="guest program (default stress)")
    run.add_argument("--iterations", type=int, default=100,
                     help="loop iterations of the guest program (default 100); the kernel "
                          "program calls each writer this many times")
    run.add_argument("--writers", metavar="PATH",
                     help="kernel-writer records for --program kernel (default: the corpus's "
                          "kernel_writers.json)")
    run.add_argument("--seed", type=int, default=1, help="seed of values and entries")
    run.add_argument("--pages", type=int, default=4, help="monitored page-table pages (1..64)")
    run.add_argument("--max-exits", type=int, default=RunLimits().max_exits,
                     help="end the run after this many VM exits")
    run.add_argument("--timeout", type=float, default=RunLimits().timeout,
                     help="end the run after this many seconds")
    run.add_argument("--save-fixture", metavar="PATH",
                     help="save every write as a fixture (format version 1)")
    run.add_argument("--no-compare", action="store_true",
                     help="skip the unmonitored reference run of the same program")
    run.add_argument("--show", type=int, default=5, metavar="N",
                     help="disagreements to print in full (default 5)")
    run.set_defaults(run=run_command)
    probe = commands.add_parser("probe", help="what this host's KVM can do")
    probe.set_defaults(run=probe_command)


def _print_report(report: RunReport, show: int) -> None:
    print(f"  exits handled: {report.writes} (KVM_EXIT_MMIO writes checked against ptemu)")
    print(f"  disagreements: {report.disagreement_count}")
    print(f"  events per second: {report.writes_per_second:.0f} "
          f"({report.writes} in {report.elapsed:.2f} s, {report.handler_seconds:.2f} s "
          "in the handler)")
    print(f"  vm exits: {report.exits} ({report.steps} single steps)")
    if report.families:
        print("  instructions: " + ", ".join(
            f"{name} {count}" for name, count in sorted(report.families.items())))
    print(f"  end: {report.stop} ({report.detail})")
    for disagreement in report.disagreements[:show]:
        print(disagreement.describe())


def run_command(args: argparse.Namespace) -> int:
    limits = RunLimits(max_exits=args.max_exits, timeout=args.timeout)
    layout = GuestLayout.create(args.mode, args.code_bits, monitored_pages=args.pages)
    program = build_program(args.program, layout, iterations=args.iterations, seed=args.seed,
                            writers=args.writers)
    system = KvmSystem()
    try:
        print(f"ptemu kvm: {layout.mode.name} paging, {layout.code_bits}-bit code, "
              f"program {program.name}, {args.iterations} iterations")
        if program.description:
            print(f"  guest: {program.description}")
        sys.stdout.flush()
        report = run_guest(system, layout, program, monitored=True, limits=limits,
                           capture=args.save_fixture is not None)
        _print_report(report, args.show)
        status = EXIT_OK
        if report.stop is StopReason.REFUSED or report.disagreement_count:
            status = EXIT_DISAGREE
        elif report.stop is not StopReason.HALTED:
            status = EXIT_GUEST
        if report.stop is StopReason.HALTED and not args.no_compare:
            reference = run_guest(system, layout, program, monitored=False, limits=limits)
            same = reference.stop is StopReason.HALTED and \
                reference.final_tables == report.final_tables
            print(f"  page tables: {'equal to' if same else 'DIFFERENT from'} an unmonitored "
                  f"run ({reference.stop}, {reference.elapsed:.3f} s)")
            if not same:
                status = max(status, EXIT_DISAGREE)
        if args.save_fixture:
            command = "ptemu kvm run " + shlex.join(sys.argv[3:]) if len(sys.argv) > 3 else ""
            count = save_fixture(args.save_fixture, report, layout, command=command)
            print(f"  fixture: {count} events saved to {args.save_fixture}")
    finally:
        system.close()
    return status


def probe_command(args: argparse.Namespace) -> int:
    with KvmSystem() as system:
        host = probe_host(system)
    yes = {True: "yes", False: "no"}
    print(f"{host.device}: KVM API 12, backend {host.backend or 'unknown'}")
    print(f"  read-only memslots (KVM_CAP_READONLY_MEM): {yes[host.readonly_memslots]}")
    print(f"  single-stepping (KVM_CAP_SET_GUEST_DEBUG): {yes[host.guest_debug]}")
    print(f"  registers in kvm_run (KVM_CAP_SYNC_REGS): {yes[host.sync_regs]}")
    print(f"  LA57 for guests (CPUID.(EAX=07H,ECX=0):ECX[16]): {yes[host.la57]}")
    for mode in host.modes:
        line = f"  {mode.paging} paging, {mode.code_bits}-bit code: {yes[mode.supported]}"
        print(line + (f" ({mode.reason})" if mode.reason else ""))
    if host.accessed_dirty is not None:
        print(f"  A/D in a read-only memslot: {host.accessed_dirty.describe()}")
    if not host.readonly_memslots:
        raise UsageError("this host's KVM has no read-only memslots: ptemu kvm run cannot work")
    return EXIT_OK
