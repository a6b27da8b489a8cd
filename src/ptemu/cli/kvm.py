"""``ptemu kvm``: run guests under KVM and check ptemu against every real exit.

``ptemu kvm run`` brings a guest up in a paging mode, runs a page-table
writer under single-stepping with the page tables in a read-only memslot,
checks ptemu's handler against KVM on each write and prints exits handled,
disagreements and events per second. ``ptemu kvm probe`` says what this
host's KVM can do. Counts (``--iterations``, ``--pages``, ``--seed``, ...) are
decimal; the paging mode is ``--paging`` as in every other subcommand
(``--mode`` is a deprecated alias).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import TYPE_CHECKING, Any

from ptemu.cli.options import count, seconds
from ptemu.errors import UsageError
from ptemu.kvm.catalog import PROGRAM_NAMES
from ptemu.kvm.machine import MAX_VCPUS
from ptemu.paging.modes import MODE_NAMES

if TYPE_CHECKING:
    from ptemu.kvm.layout import GuestLayout
    from ptemu.kvm.monitor_run import MonitorRunReport
    from ptemu.kvm.runner import RunLimits, RunReport
    from ptemu.kvm.smp import SmpReport

# The runner, the handler, Capstone and Unicorn are imported inside the
# commands, not here: building the parser (every `ptemu` start) stays cheap.
_DEFAULT_MAX_EXITS = 10_000_000
"""`_DEFAULT_MAX_EXITS` (tests/cli/test_cli_startup.py keeps the two equal)."""
_DEFAULT_TIMEOUT = 600.0
"""`_DEFAULT_TIMEOUT`."""
MONITOR_DEFAULT_CYCLES = 10
"""Cycles of ``--program monitor`` when ``--iterations`` is not given."""

EXIT_OK = 0
EXIT_DISAGREE = 1
"""ptemu and KVM disagree, the handler refused a write, or the page tables
differ from an unmonitored run."""
EXIT_GUEST = 3
"""The guest did not finish: triple fault, a bound reached, an unexpected exit."""

_KVM_HELP = ("Run small guests under KVM and check ptemu against real VM exits: 'run' "
             "runs a page-table writer and compares ptemu's handler with KVM on every "
             "write exit, 'probe' says what this host's KVM can do.")
_RUN_HELP = ("Bring a guest up in a paging mode, run a page-table writer under "
             "single-stepping with its page tables in a read-only memslot, handle every "
             "write exit with ptemu's handler and compare with what KVM did. Prints exits "
             "handled, disagreements and events per second; exit status 0 when all "
             "agree, 1 on a disagreement, 3 when the guest does not finish. With "
             "--program monitor the guest edits its own page tables and the translation "
             "monitor decides which pages exit (one read-only memslot per protected page); "
             "after every exit its view is compared with a walk of guest memory.")
_PROBE_HELP = ("Open /dev/kvm and print what this host's KVM offers ptemu kvm run: "
               "read-only memslots, single-stepping, registers in kvm_run, LA57, and which "
               "paging modes and code sizes a guest can run in.")


def register(subparsers: Any) -> None:
    """Add ``ptemu kvm`` with its ``run`` and ``probe`` subcommands."""
    parser = subparsers.add_parser(
        "kvm", help="run guests under KVM and check ptemu against real VM exits",
        description=_KVM_HELP)
    commands = parser.add_subparsers(dest="kvm_command", metavar="KVM_COMMAND")
    commands.required = True
    run = commands.add_parser("run", help="run a guest page-table writer under KVM",
                              description=_RUN_HELP)
    run.add_argument("--paging", default="4level", choices=MODE_NAMES, metavar="MODE",
                     help=f"paging mode of the guest: {', '.join(MODE_NAMES)} (default 4level)")
    run.add_argument("--mode", dest="mode_alias", choices=MODE_NAMES, default=None,
                     help=argparse.SUPPRESS)  # the old name of --paging
    run.add_argument("--code-bits", type=count(16, 64), choices=(32, 64), default=None,
                     metavar="{32,64}",
                     help="operating size of the writer (default: 64 in 4/5-level, else 32; "
                          "32 in 4/5-level runs in compatibility mode)")
    run.add_argument("--program", default="stress", choices=PROGRAM_NAMES,
                     help="guest program (default stress)")
    run.add_argument("--iterations", type=count(1, 10_000_000), default=None, metavar="N",
                     help="loop iterations of the guest program (default 100; 10 cycles "
                          "for --program monitor); the kernel program calls each writer "
                          "this many times")
    run.add_argument("--writers", metavar="PATH",
                     help="kernel-writer records for --program kernel (default: the "
                          "records shipped with ptemu, taken from Debian's kernels)")
    run.add_argument("--seed", type=count(0, (1 << 64) - 1), default=1, metavar="N",
                     help="seed of values and entries, decimal (default 1)")
    run.add_argument("--pages", type=count(1, 64), default=4, metavar="N",
                     help="monitored page-table pages, 1..64 (default 4)")
    run.add_argument("--max-exits", type=count(1, 1 << 40), default=_DEFAULT_MAX_EXITS,
                     metavar="N", help="end the run after this many VM exits "
                                       f"(default {_DEFAULT_MAX_EXITS})")
    run.add_argument("--timeout", type=seconds(1e6), default=_DEFAULT_TIMEOUT,
                     metavar="SECONDS", help="end the run after this many seconds "
                                             f"(default {_DEFAULT_TIMEOUT:g})")
    run.add_argument("--save-fixture", metavar="PATH",
                     help="save every write as a fixture (format version 1); a PATH ending "
                          "in .jsonl gets the streamed form, one event per line")
    run.add_argument("--no-compare", action="store_true",
                     help="skip the unmonitored reference run of the same program")
    run.add_argument("--show", type=count(0, 1_000_000), default=5, metavar="N",
                     help="disagreements to print in full (default 5)")
    run.add_argument("--vcpus", type=count(1, MAX_VCPUS), default=None, metavar="N",
                     help=f"run the shared-entries program on N vCPUs (1..{MAX_VCPUS}), one "
                          "thread each, all served by one handler; 64-bit code only")
    run.set_defaults(run=run_command, command_name="kvm run")
    probe = commands.add_parser("probe", help="what this host's KVM can do",
                                description=_PROBE_HELP)
    probe.set_defaults(run=probe_command, command_name="kvm probe")


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
    from ptemu.kvm.capture import save_fixture
    from ptemu.kvm.catalog import build_program
    from ptemu.kvm.device import KvmSystem
    from ptemu.kvm.layout import GuestLayout
    from ptemu.kvm.runner import RunLimits, StopReason, run_guest

    if args.mode_alias is not None:
        print("ptemu kvm run: --mode is deprecated: use --paging", file=sys.stderr)
        args.paging = args.mode_alias
    limits = RunLimits(max_exits=args.max_exits, timeout=args.timeout)
    layout = GuestLayout.create(args.paging, args.code_bits, monitored_pages=args.pages)
    if args.iterations is None:
        args.iterations = MONITOR_DEFAULT_CYCLES if args.program == "monitor" else 100
    if args.vcpus is not None:
        return run_vcpus_command(args, layout, limits)
    if args.program == "monitor":
        return run_monitor_command(args, layout, limits)
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
    from ptemu.kvm.device import KvmSystem
    from ptemu.kvm.probe import probe_host

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


# --- ptemu kvm run --vcpus N (ptemu.kvm.smp) -------------------------------------


def _print_smp_report(report: SmpReport, show: int) -> None:
    print(f"  exits handled: {report.writes} (KVM_EXIT_MMIO writes from {len(report.vcpus)} "
          "vCPU(s), one shared handler; per vCPU: "
          + " ".join(str(vcpu.writes) for vcpu in report.vcpus) + ")")
    print(f"  disagreements: {report.disagreement_count} ({report.raced} writes raced: KVM "
          "read the entry before another vCPU's commit and agrees given that value; "
          f"registers set to the handler's after {report.rewritten})")
    print(f"  events per second: {report.writes_per_second:.0f} ({report.writes} in "
          f"{report.elapsed:.2f} s, {report.handler_seconds:.2f} s in the handler)")
    print(f"  vm exits: {report.exits} ({report.steps} single steps)")
    if report.families:
        print("  instructions: " + ", ".join(
            f"{name} {count}" for name, count in sorted(report.families.items())))
    held = sum(check.holds for check in report.checks)
    print(f"  final entries: {held} of {len(report.checks)} as computed from the program")
    for check in report.checks:
        mark = "" if check.holds else "  WRONG"
        print(f"    {check.name}: {check.observed:#x} (expected {check.expected:#x}){mark}")
    print(f"  end: {report.stop} ({report.detail})")
    for disagreement in report.disagreements[:show]:
        print(disagreement.describe())


def _print_monitor_report(report: MonitorRunReport, show: int) -> None:
    run = report.run
    print(f"  exits handled: {run.writes} (each through the translation monitor, its handler "
          "checked against KVM)")
    print(f"  disagreements: {run.disagreement_count}")
    print("  exits where the program's model expects them: "
          + ("all" if report.exits_as_expected else f"NO ({report.exit_difference})")
          + f" ({report.exits_expected} table writes exit; {report.silent_writes} stores "
          "to tables not linked yet or any more, and to freed tables reused as data, do not)")
    print(f"  view checks: {report.checks} ({report.probes} probe addresses walked after "
          f"every exit), {report.problems} problems")
    print(f"  translation changes: {report.changes} ({report.partial_changes} partial, "
          f"{report.cr3_load_changes} at the next CR3 load)")
    print(f"  protection: {report.protects} pages protected, {report.unprotects} unprotected, "
          f"at most {report.peak_protected} at once; {report.slot_changes} memslot changes, "
          f"at most {report.peak_slots} memslots")
    print(f"  final pages: {'as' if report.final_pages_ok else 'NOT as'} the program's "
          "model says")
    per_exit = report.monitor_seconds / run.writes * 1e6 if run.writes else 0.0
    slots = report.protection_seconds / run.writes * 1e6 if run.writes else 0.0
    print(f"  monitor: {per_exit:.0f} us an exit, handler included, of which {slots:.0f} us "
          f"in memslot changes ({report.monitor_seconds:.2f} s; "
          f"{report.check_seconds:.2f} s more in the checks)")
    print(f"  vm exits: {run.exits} ({run.steps} single steps)")
    if run.families:
        print("  instructions: " + ", ".join(
            f"{name} {count}" for name, count in sorted(run.families.items())))
    print(f"  end: {run.stop} ({run.detail})")
    for problem in report.first_problems[:show]:
        print(f"  problem {problem}")
    for disagreement in run.disagreements[:show]:
        print(disagreement.describe())


def run_monitor_command(args: argparse.Namespace, layout: GuestLayout,
                        limits: RunLimits) -> int:
    """``ptemu kvm run --program monitor``: the monitor decides what exits."""
    from ptemu.kvm.device import KvmSystem
    from ptemu.kvm.monitor_program import monitor_program
    from ptemu.kvm.monitor_run import run_monitored
    from ptemu.kvm.runner import StopReason

    if args.save_fixture:
        raise UsageError("--save-fixture: the monitor program's writes are not saved as a "
                         "fixture (its tables live outside the monitored pages)")
    scenario = monitor_program(layout, args.iterations)
    system = KvmSystem()
    try:
        print(f"ptemu kvm: {layout.mode.name} paging, {layout.code_bits}-bit code, program "
              f"monitor, {args.iterations} cycles")
        print(f"  guest: {scenario.program.description}")
        sys.stdout.flush()
        report = run_monitored(system, layout, scenario, limits=limits)
        _print_monitor_report(report, args.show)
    finally:
        system.close()
    if report.run.stop is StopReason.REFUSED or report.run.disagreement_count \
            or not report.ok and report.run.stop is StopReason.HALTED:
        return EXIT_DISAGREE
    return EXIT_OK if report.ok else EXIT_GUEST


def run_vcpus_command(args: argparse.Namespace, layout: GuestLayout, limits: RunLimits) -> int:
    """``ptemu kvm run --vcpus N``: the shared-entries program on N vCPUs."""
    from ptemu.kvm.device import KvmSystem
    from ptemu.kvm.programs import shared_program
    from ptemu.kvm.runner import StopReason
    from ptemu.kvm.smp import run_smp, tables_equal_outside

    if args.program != "stress":
        raise UsageError(f"--program {args.program}: --vcpus runs its own program (shared "
                         "counters and bits); --program applies to one-vCPU runs")
    if args.save_fixture:
        raise UsageError("--save-fixture: a fixture replays writes in one order; the writes "
                         "of several vCPUs are not saved")
    program = shared_program(layout, args.vcpus, args.iterations, args.seed)
    system = KvmSystem()
    try:
        print(f"ptemu kvm: {layout.mode.name} paging, {layout.code_bits}-bit code, program "
              f"{program.name}, {args.vcpus} vCPUs x {args.iterations} iterations")
        sys.stdout.flush()
        report = run_smp(system, layout, program, monitored=True, limits=limits)
        _print_smp_report(report, args.show)
        status = EXIT_OK
        if report.stop is StopReason.REFUSED or report.disagreement_count \
                or not report.checks_hold:
            status = EXIT_DISAGREE
        elif report.stop is not StopReason.HALTED:
            status = EXIT_GUEST
        if report.stop is StopReason.HALTED and not args.no_compare:
            reference = run_smp(system, layout, program, monitored=False, limits=limits)
            same = reference.stop is StopReason.HALTED and reference.checks_hold and \
                tables_equal_outside(program, layout, report.final_tables,
                                     reference.final_tables)
            print(f"  unmonitored run ({args.vcpus} vCPUs on writable tables, the CPU's own "
                  f"atomics; {reference.stop}, {reference.elapsed:.3f} s): "
                  + ("final entries as expected, tables equal outside the ticket sums"
                     if same else "DIFFERENT"))
            if not same:
                status = max(status, EXIT_DISAGREE)
    finally:
        system.close()
    return status
