"""``ptemu replay``: run fixture files through the handler and report mismatches.

Every file is loaded and validated before the first event runs, so unusable
input (not JSON, wrong version, a missing key, an unknown paging mode) stops
with one line on stderr and exit status 2, before any output. Then:

* human output: one line per fixture (name, events, verdict), one indented
  line per mismatch (event, key, expected, actual in hex) or harness error,
  and last the line ``N passed, M failed`` counting events;
* ``--json``: JSON Lines, one object per event, then one summary object.

A fixture's expectations were recorded under its own policy (``policy``) and
PAE coalescing (``capture.coalesce``), and hold only under them. Each fixture
replays under its own settings unless ``--policy`` / ``--no-coalesce`` say
otherwise; a fixture replayed under other settings than it was recorded
under is run but **not compared** (its line says so, and its events count as
"not compared", never as failures). Coalescing exists only in PAE paging, so
``--no-coalesce`` changes nothing for the other modes.

A fixture with no events (a memory image kept for ``ptemu walk``) is refused.
Names read from files are printed escaped (`ptemu.values.escaped`).

Exit status: 0 when every compared expectation holds, 1 when any event
mismatched or raised in the harness, 2 for unusable input (raised as
`PtemuError` and printed by the dispatcher).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

from ptemu.engines import DEFAULT_ENGINE, ENGINES
from ptemu.errors import UsageError
from ptemu.fixtures import (
    EventReport,
    Fixture,
    FixtureReport,
    Outcome,
    corpus_path,
    find_fixtures,
    load_fixture,
    replay_fixture,
)
from ptemu.results import EventResult
from ptemu.status import EntryState, Policy
from ptemu.values import escaped, hex_int

PROGRESS_MIN_EVENTS = 300
"""A progress bar appears on a terminal's stderr only above this many events."""

EXIT_OK = 0
EXIT_MISMATCH = 1

JsonObject = dict[str, object]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``replay`` subcommand."""
    parser = subparsers.add_parser(
        "replay",
        help="replay fixture files through the handler and compare with their expectations",
        description="Replay captured EPT write events through the page-table write handler "
        "and compare each result with the fixture's expect. With no PATH, replay the corpus "
        "that ships with ptemu.",
    )
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help="fixture files or folders (searched recursively for *.json)")
    parser.add_argument("--policy", choices=[policy.value for policy in Policy], default=None,
                        help="write-state policy for every fixture (default: each fixture's "
                        "own, strict when it names none); a fixture recorded under another "
                        "policy is run but not compared")
    parser.add_argument("--no-coalesce", dest="coalesce", action="store_const", const=False,
                        default=None,
                        help="do not emulate a PAE entry's second half in the same exit "
                        "(default: as each fixture was recorded); a PAE fixture recorded "
                        "with coalescing is then run but not compared")
    parser.add_argument("--engine", choices=ENGINES, default=None,
                        help=f"the handler's engine (default {DEFAULT_ENGINE}: the fast "
                        "engine where it applies, Unicorn for the rest)")
    parser.add_argument("--json", action="store_true",
                        help="JSON Lines on stdout: one object per event, then a summary")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Replay the fixtures `args` names; return the exit status."""
    paths = args.paths or [corpus_path()]
    fixtures = [load_fixture(path) for path in find_fixtures(paths)]
    for fixture in fixtures:
        if not fixture.events:
            raise UsageError(f"{escaped(str(fixture.path))}: no events to replay (a fixture "
                             "with an empty 'events' list is a memory image: walk it with "
                             "ptemu walk)")
    total = sum(len(fixture.events) for fixture in fixtures)
    out = sys.stdout
    progress = _Progress(sys.stderr, total) if _wants_progress(total) else None
    tally = _Tally()
    for fixture in fixtures:
        coalesce = fixture.coalesce if args.coalesce is None else args.coalesce
        unlike = _unlike_recorded(fixture, args.policy, coalesce)
        report = replay_fixture(_without_expectations(fixture) if unlike else fixture,
                                policy=args.policy, coalesce=coalesce, engine=args.engine,
                                on_event=progress.advance if progress else None)
        tally.add(report, unlike)
        lines = _json_lines(report, unlike) if args.json else _human_lines(report, unlike)
        if progress:
            progress.clear()
        for line in lines:
            print(line, file=out)
        if progress:
            progress.draw()
    if progress:
        progress.clear()
    if args.json:
        print(json.dumps({"passed": tally.passed, "failed": tally.failed,
                          "errors": tally.errors, "unchecked": tally.unchecked,
                          "not_compared": tally.not_compared, "events": total}), file=out)
    else:
        if tally.errors:
            print(f"{tally.errors} events raised in the harness (errors, not mismatches)",
                  file=out)
        if tally.unchecked:
            print(f"{tally.unchecked} events have no expect (not compared)", file=out)
        if tally.not_compared:
            print(f"{tally.not_compared} events not compared: their fixtures were recorded "
                  "under another policy or coalescing, and their expectations hold only "
                  "under those", file=out)
        print(f"{tally.passed} passed, {tally.failed} failed", file=out)
    return EXIT_MISMATCH if tally.failed or tally.errors else EXIT_OK


@dataclass(slots=True)
class _Tally:
    """Event counts over the whole run."""

    passed: int = 0
    failed: int = 0
    errors: int = 0
    unchecked: int = 0
    not_compared: int = 0

    def add(self, report: FixtureReport, unlike: str | None) -> None:
        self.passed += report.count(Outcome.PASS)
        self.failed += report.count(Outcome.FAIL)
        self.errors += report.count(Outcome.ERROR)
        if unlike:
            self.not_compared += report.count(Outcome.UNCHECKED)
        else:
            self.unchecked += report.count(Outcome.UNCHECKED)


def _unlike_recorded(fixture: Fixture, policy: str | None, coalesce: bool) -> str | None:
    """How the replay's settings differ from the fixture's recorded ones, or None."""
    differences = []
    if policy is not None and Policy(policy) is not fixture.policy:
        differences.append(f"recorded under policy {fixture.policy}, replayed under {policy}")
    if fixture.paging == "pae" and coalesce != fixture.coalesce:
        recorded = "with" if fixture.coalesce else "without"
        replayed = "with" if coalesce else "without"
        differences.append(f"recorded {recorded} coalescing, replayed {replayed}")
    return "; ".join(differences) or None


def _without_expectations(fixture: Fixture) -> Fixture:
    """`fixture` with no ``expect``: run it, compare nothing."""
    return dataclasses.replace(fixture, events=tuple(
        dataclasses.replace(event, expect=None) for event in fixture.events))


def _human_lines(report: FixtureReport, unlike: str | None) -> Iterator[str]:
    count = len(report.events)
    noun = "event" if count == 1 else "events"
    name = escaped(report.fixture.name)
    if unlike and report.outcome is Outcome.UNCHECKED:
        yield f"{name}  {count} {noun}  NOT COMPARED ({unlike})"
    else:
        yield f"{name}  {count} {noun}  {report.outcome.value.upper()}"
    for event in report.events:
        if event.outcome is Outcome.ERROR:
            yield f"  event {event.index}: error: {escaped(event.error or '')}"
        for mismatch in event.mismatches:
            yield f"  event {event.index}: {mismatch}"


def _json_lines(report: FixtureReport, unlike: str | None) -> Iterator[str]:
    for event in report.events:
        yield json.dumps(_event_object(report, event, unlike))


def _event_object(report: FixtureReport, event: EventReport, unlike: str | None) -> JsonObject:
    result = event.result
    outcome = event.outcome.value
    if unlike and event.outcome is Outcome.UNCHECKED:
        outcome = "not-compared"
    obj: JsonObject = {
        "fixture": report.fixture.name,
        "path": str(report.fixture.path),
        "event": event.index,
        "outcome": outcome,
    }
    if unlike:
        obj["not_compared"] = unlike
    obj.update(_result_object(result))
    obj["ok"] = event.outcome in (Outcome.PASS, Outcome.UNCHECKED)
    obj["mismatches"] = [{"key": m.key, "expected": m.expected, "actual": m.actual}
                         for m in event.mismatches]
    obj["error"] = event.error
    return obj


def _result_object(result: EventResult | None) -> JsonObject:
    """``status``, ``writes``, ``entries``, ``regs`` of a result, integers in hex."""
    if result is None:
        return {"status": None, "writes": [], "entries": [], "regs": {}}
    entries: list[JsonObject] = []
    for entry in result.entries:
        item: JsonObject = {"gpa": hex_int(entry.gpa), "state": entry.state.value}
        if entry.state is EntryState.COMPLETE and entry.old is not None and entry.new is not None:
            item["old"] = hex_int(entry.old)
            item["new"] = hex_int(entry.new)
        entries.append(item)
    return {
        "status": result.status.value,
        "writes": [{"gpa": hex_int(w.gpa), "offset": w.offset, "size": w.size,
                    "value": hex_int(w.value), "old": hex_int(w.old)} for w in result.writes],
        "entries": entries,
        "regs": {name: hex_int(value) for name, value in sorted(result.regs.items())},
    }


def _wants_progress(total: int) -> bool:
    return total > PROGRESS_MIN_EVENTS and sys.stderr.isatty()


class _Progress:
    """A one-line bar on a terminal's stderr, redrawn as events finish."""

    __slots__ = ("done", "stream", "total", "width")

    def __init__(self, stream: TextIO, total: int, width: int = 40) -> None:
        self.stream = stream
        self.total = total
        self.width = width
        self.done = 0

    def advance(self, _report: EventReport) -> None:
        self.done += 1
        # Redraw at most ~100 times: each write is a terminal round trip.
        if self.done == self.total or self.done % max(1, self.total // 100) == 0:
            self.draw()

    def draw(self) -> None:
        filled = self.width * self.done // max(1, self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} events")
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\x1b[K")
        self.stream.flush()
