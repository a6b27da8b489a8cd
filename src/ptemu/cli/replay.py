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
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ptemu.cli.options import count
from ptemu.engines import DEFAULT_ENGINE, ENGINES
from ptemu.errors import PtemuError, UsageError
from ptemu.fixtures import (
    EventReport,
    Fixture,
    FixtureStream,
    Outcome,
    corpus_path,
    find_fixtures,
    is_stream_path,
    load_fixture,
    open_stream,
    replay_events,
)
from ptemu.results import EventResult
from ptemu.status import EntryState, Policy
from ptemu.values import escaped, hex_int

PROGRESS_MIN_EVENTS = 300
"""A progress bar appears on a terminal's stderr only above this many events."""

EXIT_OK = 0
EXIT_MISMATCH = 1

MAX_JOBS = 256
"""Most processes ``-j`` starts."""

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
                        help="fixture files or folders (searched recursively for *.json "
                        "and *.jsonl); a *.jsonl file is a streamed trace, replayed as it "
                        "is read")
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
    parser.add_argument("-j", "--jobs", type=count(1, MAX_JOBS), default=1, metavar="N",
                        help="replay the files over N processes, decimal (default 1); the "
                        "output, in file order, and the exit status are those of -j 1")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Replay the fixtures `args` names; return the exit status."""
    paths = args.paths or [corpus_path()]
    files = find_fixtures(paths)
    settings = _Settings(policy=args.policy, coalesce=args.coalesce, engine=args.engine,
                         json=args.json)
    out = sys.stdout
    if args.jobs > 1 and len(files) > 1:
        tally = _run_parallel(files, settings, args.jobs, out)
    else:
        tally = _run_serial(files, settings, out)
    if args.json:
        print(json.dumps({"passed": tally.passed, "failed": tally.failed,
                          "errors": tally.errors, "unchecked": tally.unchecked,
                          "not_compared": tally.not_compared, "events": tally.events}),
              file=out)
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


@dataclass(frozen=True, slots=True)
class _Settings:
    """What the command line asks of every replay (sent to worker processes)."""

    policy: str | None
    coalesce: bool | None
    engine: str | None
    json: bool


Trace = Fixture | FixtureStream
"""A fixture held whole (``*.json``) or a streamed trace read as it replays (``*.jsonl``)."""


def _open(path: Path) -> Trace:
    """Load a fixture, or open a stream (its header checked); refuse one without events."""
    trace: Trace
    if is_stream_path(path):
        trace = open_stream(path)
        empty = not trace.has_events
    else:
        trace = load_fixture(path)
        empty = not trace.events
    if empty:
        raise UsageError(f"{escaped(str(path))}: no events to replay (a fixture "
                         "with an empty 'events' list is a memory image: walk it with "
                         "ptemu walk)")
    return trace


def _run_serial(files: list[Path], settings: _Settings, out: TextIO) -> _Tally:
    """Every file loaded (streams: their header) before the first event, then replayed."""
    traces = [_open(path) for path in files]
    progress = _Progress(sys.stderr, traces) if _wants_progress(traces) else None
    # Lines and the bar share the terminal only when stdout is one too.
    interleaved = progress is not None and out.isatty()

    def emit(line: str) -> None:
        if interleaved and progress:
            progress.clear()
        print(line, file=out)
        if interleaved and progress:
            progress.draw()

    tally = _Tally()
    for trace in traces:
        tally.merge(_replay_trace(trace, settings, emit, progress))
    if progress:
        progress.clear()
    return tally


def _run_parallel(files: list[Path], settings: _Settings, jobs: int, out: TextIO) -> _Tally:
    """Each file loaded and replayed in one of `jobs` processes; output in file order.

    Every result is held until all are in, so that unusable input stops the
    run with exit status 2 and nothing on stdout, as with ``-j 1``.
    """
    from concurrent.futures import ProcessPoolExecutor

    progress = _Progress(sys.stderr, [], files=len(files)) if sys.stderr.isatty() else None
    results: list[tuple[list[str], _Tally | None, str | None]] = []
    with ProcessPoolExecutor(max_workers=min(jobs, len(files))) as pool:
        for result in pool.map(_replay_file, [(str(path), settings) for path in files]):
            results.append(result)
            if progress:
                progress.file_done()
    if progress:
        progress.clear()
    for _lines, _tally, error in results:
        if error is not None:
            raise PtemuError(error)
    tally = _Tally()
    for lines, file_tally, _error in results:
        for line in lines:
            print(line, file=out)
        assert file_tally is not None
        tally.merge(file_tally)
    return tally


def _replay_file(job: tuple[str, _Settings]) -> tuple[list[str], _Tally | None, str | None]:
    """One file in a worker process: its output lines and counts, or its error."""
    path, settings = job
    lines: list[str] = []
    try:
        tally = _replay_trace(_open(Path(path)), settings, lines.append, None)
    except PtemuError as error:
        return [], None, str(error)
    return lines, tally, None


def _replay_trace(trace: Trace, settings: _Settings, emit: Callable[[str], None],
                  progress: _Progress | None) -> _Tally:
    """Replay one trace, handing each output line to `emit`; its counts.

    Nothing is kept per event: the counts grow, and each event's lines go
    out as it finishes. A fixture held whole prints its line (name, events,
    verdict) first and its mismatches after, as before; a stream cannot know
    its verdict before its end, so its mismatches come as they happen and its
    line last.
    """
    if isinstance(trace, Fixture):
        header, events, streamed = trace, iter(trace.events), False
    else:
        header, events, streamed = trace.header, iter(trace), True
    coalesce = header.coalesce if settings.coalesce is None else settings.coalesce
    unlike = _unlike_recorded(header, settings.policy, coalesce)
    tally = _Tally()
    held: list[str] = []
    detail = emit if streamed else held.append
    name = escaped(header.name)
    for event in replay_events(header, events, policy=settings.policy, coalesce=coalesce,
                               engine=settings.engine, compare=unlike is None):
        tally.add(event.outcome, unlike)
        if settings.json:
            emit(json.dumps(_event_object(header, event, unlike)))
        else:
            if event.outcome is Outcome.ERROR:
                detail(f"  event {event.index}: error: {escaped(event.error or '')}")
            for mismatch in event.mismatches:
                detail(f"  event {event.index}: {mismatch}")
        if progress:
            progress.advance(trace)
    if not settings.json:
        noun = "event" if tally.events == 1 else "events"
        outcome = tally.outcome()
        if unlike and outcome is Outcome.UNCHECKED:
            emit(f"{name}  {tally.events} {noun}  NOT COMPARED ({unlike})")
        else:
            emit(f"{name}  {tally.events} {noun}  {outcome.value.upper()}")
        for line in held:
            emit(line)
    return tally


@dataclass(slots=True)
class _Tally:
    """Event counts (of one trace, or of the whole run)."""

    passed: int = 0
    failed: int = 0
    errors: int = 0
    unchecked: int = 0
    not_compared: int = 0
    events: int = 0

    def add(self, outcome: Outcome, unlike: str | None) -> None:
        self.events += 1
        if outcome is Outcome.PASS:
            self.passed += 1
        elif outcome is Outcome.FAIL:
            self.failed += 1
        elif outcome is Outcome.ERROR:
            self.errors += 1
        elif unlike:
            self.not_compared += 1
        else:
            self.unchecked += 1

    def merge(self, other: _Tally) -> None:
        self.passed += other.passed
        self.failed += other.failed
        self.errors += other.errors
        self.unchecked += other.unchecked
        self.not_compared += other.not_compared
        self.events += other.events

    def outcome(self) -> Outcome:
        """``ERROR`` if any event errored, else ``FAIL``, else ``PASS`` if any
        was compared, else ``UNCHECKED`` (as `FixtureReport.outcome`)."""
        if self.errors:
            return Outcome.ERROR
        if self.failed:
            return Outcome.FAIL
        return Outcome.PASS if self.passed else Outcome.UNCHECKED


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


def _event_object(fixture: Fixture, event: EventReport, unlike: str | None) -> JsonObject:
    result = event.result
    outcome = event.outcome.value
    if unlike and event.outcome is Outcome.UNCHECKED:
        outcome = "not-compared"
    obj: JsonObject = {
        "fixture": fixture.name,
        "path": str(fixture.path),
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


def _wants_progress(traces: list[Trace]) -> bool:
    if not sys.stderr.isatty():
        return False
    return any(not isinstance(trace, Fixture) for trace in traces) or \
        sum(len(trace.events) for trace in traces if isinstance(trace, Fixture)) \
        > PROGRESS_MIN_EVENTS


class _Progress:
    """A one-line bar on a terminal's stderr, redrawn as events finish (~100 times).

    When every trace is held whole, the bar counts events (``N/T events``).
    A stream's length in events is unknown until its end, so with one the bar
    counts bytes of the files read instead and shows the events so far. With
    ``-j N`` it advances by whole files.
    """

    __slots__ = ("_finished", "_sizes", "_step", "_total", "_trace_start", "current", "done",
                 "files", "files_done", "stream", "total_events", "width")

    def __init__(self, stream: TextIO, traces: list[Trace], width: int = 40,
                 files: int = 0) -> None:
        self.stream = stream
        self.width = width
        self.done = 0
        self.files = files
        self.files_done = 0
        self.current: Trace | None = None
        known = all(isinstance(trace, Fixture) for trace in traces)
        self.total_events = sum(len(trace.events) for trace in traces
                                if isinstance(trace, Fixture)) if known else None
        self._sizes = {id(trace): self._size(trace) for trace in traces}
        self._total = max(1, sum(self._sizes.values()))
        self._finished = 0
        self._trace_start = 0
        self._step = max(1, self.total_events // 100) if self.total_events else 64

    @staticmethod
    def _size(trace: Trace) -> int:
        if isinstance(trace, FixtureStream):
            return max(1, trace.size)
        return max(1, len(trace.events))

    def advance(self, trace: Trace) -> None:
        if trace is not self.current:
            if self.current is not None:
                self._finished += self._sizes.get(id(self.current), 0)
            self.current = trace
            self._trace_start = self.done
        self.done += 1
        if self.done % self._step == 0 or self.done == self.total_events:
            self.draw()

    def file_done(self) -> None:
        self.files_done += 1
        self.draw()

    def draw(self) -> None:
        if self.files:
            filled = self.width * self.files_done // self.files
            what = f"{self.files_done}/{self.files} files"
        elif self.total_events is not None:
            filled = self.width * self.done // max(1, self.total_events)
            what = f"{self.done}/{self.total_events} events"
        else:
            current = 0
            if isinstance(self.current, FixtureStream):
                current = self.current.bytes_read
            elif self.current is not None:
                current = self.done - self._trace_start
            filled = min(self.width, self.width * (self._finished + current) // self._total)
            what = f"{self.done} events"
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r[{bar}] {what}")
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\x1b[K")
        self.stream.flush()
