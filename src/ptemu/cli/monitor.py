"""``ptemu monitor``: replay a trace through the translation monitor.

The fixture's memory must hold the guest's own paging structures (a trace
captured with ``include_page_tables``). The monitor watches the ranges asked
for in the space of ``--cr3`` (default: CR3 of the first event), protecting
the tables they reach; then every event is delivered as the hypervisor would:
an event on a protected page goes to the monitor, which has it emulated and
reports the translation changes; an event on any other page would not exit on
real hardware, so its write is emulated by the handler alone and reported as
``unprotected``. Event ``memory`` patches are applied as the CPU's own writes
(A/D bits), which do not exit either.

Output: a table, or with ``--json`` JSON Lines: one object per page protected
or unprotected, per event and per change, then a summary. Numbers are hex and
must be written with ``0x``. Exit status 0, or 2 for unusable input (one line
on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ptemu.cli.options import hex_number
from ptemu.errors import UsageError
from ptemu.fixtures import load_fixture
from ptemu.handler import WriteEvent
from ptemu.memory import InMemoryGuestMemory
from ptemu.monitor import (
    InMemoryProtector,
    MonitorStatus,
    Run,
    Translation,
    TranslationChange,
    TranslationMonitor,
    Unfollowed,
)
from ptemu.values import PAGE_SIZE, hex_int
from ptemu.vcpu import Vcpu

EXIT_OK = 0
SPACES = ("all", "user", "kernel")

JsonObject = dict[str, object]


_hex = hex_number(64)
"""A number written in hex with its 0x prefix (the only spelling accepted)."""


def _watch(text: str) -> tuple[int, int]:
    """``GLA[:SIZE]``, both hex with 0x; SIZE defaults to one page."""
    gla, colon, size = text.partition(":")
    return _hex(gla), _hex(size) if colon else PAGE_SIZE


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``monitor`` subcommand."""
    parser = subparsers.add_parser(
        "monitor",
        help="replay a trace through the translation monitor and print translation changes",
        description="Replay a fixture whose memory holds the guest's page tables through the "
        "translation monitor: print the pages it protects and unprotects and every change "
        "of the watched translations. Without --watch or --space, the whole space.",
    )
    parser.add_argument("fixture", metavar="FIXTURE", help="a fixture file (JSON)")
    parser.add_argument("--watch", type=_watch, action="append", default=[],
                        metavar="GLA[:SIZE]",
                        help="watch this linear range (hex with 0x; SIZE defaults to 0x1000); "
                        "repeatable")
    parser.add_argument("--space", choices=SPACES, default=None,
                        help="watch the whole space or its user or kernel half")
    parser.add_argument("--cr3", type=_hex, default=None,
                        help="the address space (default: CR3 of the first event)")
    parser.add_argument("--timing", choices=("cpu", "seed"), default="cpu",
                        help="report after every write (cpu, the default) or only when an "
                        "entry is complete (seed)")
    parser.add_argument("--json", action="store_true",
                        help="JSON Lines on stdout: protections, events, changes, a summary")
    parser.set_defaults(run=run)


add_parser = register
"""The same as `register` (the name the monitor issue used)."""


def run(args: argparse.Namespace) -> int:
    """Replay the fixture `args` names through the monitor; return the exit status."""
    fixture = load_fixture(args.fixture)
    cr3 = args.cr3
    if cr3 is None:
        if not fixture.events or "cr3" not in fixture.events[0].regs:
            raise UsageError(f"{args.fixture}: no event carries cr3; give --cr3")
        cr3 = fixture.events[0].regs["cr3"]
    memory = InMemoryGuestMemory(fixture.memory_regions)
    protector = InMemoryProtector()
    monitor = TranslationMonitor(memory, fixture.paging, protector, timing=args.timing,
                                 policy=fixture.policy)
    if args.space is not None or not args.watch:
        monitor.watch_space(cr3, ranges=args.space or "all")
    for gla, size in args.watch:
        monitor.watch(cr3, gla, size)
    out = _Output(args.json)
    out.protections(None, protector.log)
    logged = len(protector.log)
    vcpu = Vcpu()
    totals = {"events": 0, "changes": 0, "unprotected_events": 0}
    for event in fixture.events:
        for gpa, data in event.memory:
            memory.write(gpa, data)
        vcpu.begin_exit()
        write = WriteEvent(gpa=event.gpa, gla=event.gla, regs=dict(event.regs),
                           code=event.code, code_bits=fixture.code_bits)
        result = monitor.handle_ept_write(vcpu, write)
        totals["events"] += 1
        if result.status is MonitorStatus.NOT_PROTECTED:
            # No exit on real hardware: the guest's write lands all the same.
            handled = monitor.handler.handle_ept_write(vcpu, write)
            totals["unprotected_events"] += 1
            out.event(event.index, event.gpa, "unprotected", handled.status.value, ())
            continue
        status = result.event.status.value if result.event is not None else "none"
        out.event(event.index, event.gpa, "protected", status, result.changes)
        totals["changes"] += len(result.changes)
        out.protections(event.index, protector.log[logged:])
        logged = len(protector.log)
    out.summary(totals, len(protector.protected))
    return EXIT_OK


class _Output:
    """Writes the table or the JSON Lines."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def _emit(self, obj: JsonObject, line: str) -> None:
        print(json.dumps(obj) if self.as_json else line, file=sys.stdout)

    def protections(self, event: int | None, log: Sequence[tuple[str, int]]) -> None:
        for op, page in log:
            where = "watch" if event is None else f"event {event}"
            self._emit({"type": op, "page": hex_int(page), "event": event},
                       f"{op:<9} {hex_int(page):>18}   ({where})")

    def event(self, index: int, gpa: int, page: str, status: str,
              changes: Sequence[TranslationChange]) -> None:
        noun = "change" if len(changes) == 1 else "changes"
        self._emit({"type": "event", "event": index, "gpa": hex_int(gpa), "page": page,
                    "status": status, "changes": len(changes)},
                   f"event {index}  gpa {hex_int(gpa)}  {page} page  {status}  "
                   f"{len(changes)} {noun}")
        for change in changes:
            self._emit(_change_object(index, change), _change_line(change))

    def summary(self, totals: dict[str, int], protected: int) -> None:
        self._emit({"type": "summary", **totals, "protected_pages": protected},
                   f"{totals['events']} events ({totals['unprotected_events']} on unprotected "
                   f"pages), {_count(totals['changes'], 'change')}, "
                   f"{_count(protected, 'page')} protected at the end")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _describe(run: Run) -> str:
    state = run.translation
    if state is None:
        return "none"
    if isinstance(state, Unfollowed):
        return f"unfollowed ({state.reason})"
    rights = ("W" if state.writable else "-") + ("U" if state.user else "S") + (
        "X" if state.executable else "-")
    return f"{hex_int(state.frame)} {rights} {_size(state.page_size)}"


def _size(page_size: int) -> str:
    """4K, 2M, 4M or 1G: a page size in its largest whole binary unit."""
    for shift, unit in ((30, "G"), (20, "M")):
        if page_size >= 1 << shift and page_size % (1 << shift) == 0:
            return f"{page_size >> shift}{unit}"
    return f"{page_size >> 10}K"


def _side(runs: tuple[Run, ...]) -> str:
    return ", ".join(_describe(run) for run in runs[:3]) + (
        f", ... ({len(runs)} runs)" if len(runs) > 3 else "")


def _change_line(change: TranslationChange) -> str:
    flags = "".join((" partial" if change.partial else "",
                     " at-cr3-load" if change.at_cr3_load else "",
                     " until-cr3-load" if change.until_cr3_load else ""))
    causes = ", ".join(f"{c.level_name} {hex_int(c.gpa)}" for c in change.cause)
    return (f"  change {hex_int(change.start)}-{hex_int(change.end)}: {_side(change.old)}"
            f" -> {_side(change.new)}  [{causes}]{flags}")


def _run_object(run: Run) -> JsonObject:
    state = run.translation
    obj: JsonObject = {"start": hex_int(run.start), "end": hex_int(run.end)}
    if isinstance(state, Translation):
        obj.update({"frame": hex_int(state.frame), "page_size": hex_int(state.page_size),
                    "writable": state.writable, "user": state.user,
                    "executable": state.executable, "protection_key": state.protection_key,
                    "pwt": state.pwt, "pcd": state.pcd, "pat": state.pat})
    elif isinstance(state, Unfollowed):
        obj["unfollowed"] = state.reason
    else:
        obj["translation"] = None
    return obj


def _change_object(event: int, change: TranslationChange) -> JsonObject:
    return {
        "type": "change", "event": event, "cr3": hex_int(change.cr3),
        "start": hex_int(change.start), "end": hex_int(change.end),
        "old": [_run_object(run) for run in change.old],
        "new": [_run_object(run) for run in change.new],
        "cause": [{"gpa": hex_int(c.gpa), "level": c.level_name, "old": hex_int(c.old),
                   "new": hex_int(c.new), "partial": c.partial} for c in change.cause],
        "partial": change.partial, "at_cr3_load": change.at_cr3_load,
        "until_cr3_load": change.until_cr3_load,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ptemu.cli.monitor ARGS`` is ``ptemu monitor ARGS``."""
    from ptemu.cli import main as ptemu_main

    return ptemu_main(["monitor", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
