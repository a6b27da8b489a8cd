"""End to end: `ptemu replay` as a whole process against the naive script.

A user who replays a long trace pays for start-up, parsing and checking the
file, the handler and the comparison. This measures all of it the way a user
sees it: wall-clock time of whole processes on the same synthetic trace
(`ptemu.bench.trace`), with the time of a 1-event run of the same command
subtracted so that interpreter and import start-up do not count per event.
The naive side is `python -m ptemu.bench.naive_replay` (standard JSON, a fresh
Capstone decode and Unicorn engine per event). Both run in turns, several
rounds, and the ratio is taken from the medians of the same run.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ptemu.bench.trace import write_synthetic_trace


def write_trace(path: Path, events: int) -> None:
    """Write a synthetic trace of `events` events to `path`, one event in memory at a
    time: the streamed form (JSON Lines) when `path` ends in ``.jsonl``, else one
    JSON file (`ptemu.bench.trace.write_synthetic_trace`)."""
    write_synthetic_trace(path, events)


def _seconds(command: Sequence[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: "
                           f"{done.stderr.decode(errors='replace').strip()[:200]}")
    return elapsed


def run_end_to_end(events: int = 20000, naive_events: int = 2000, rounds: int = 3,
                   progress: TextIO | None = None) -> dict[str, Any]:
    """Time both commands; per-event costs in microseconds and their ratio.

    The naive script runs `naive_events` events (its per-event cost is flat and
    it is slow); ptemu runs `events`. Each per-event cost is the median over
    `rounds` of (time of the long run - time of the 1-event run) / events.
    """
    python = sys.executable
    ptemu = [python, "-m", "ptemu"]
    naive = [python, "-m", "ptemu.bench.naive_replay"]
    with tempfile.TemporaryDirectory(prefix="ptemu-bench-") as folder:
        paths = {count: Path(folder) / f"trace-{count}.json"
                 for count in {1, events, naive_events}}
        for count, path in paths.items():
            write_trace(path, count)
        samples: dict[str, list[float]] = {"ptemu": [], "naive": [], "startup": []}
        for round_number in range(rounds):
            if progress:
                print(f"end to end: round {round_number + 1} of {rounds}", file=progress)
            startup = _seconds([*ptemu, "replay", str(paths[1])])
            samples["startup"].append(startup)
            long_run = _seconds([*ptemu, "replay", str(paths[events])])
            samples["ptemu"].append((long_run - startup) / events)
            naive_startup = _seconds([*naive, str(paths[1])])
            naive_run = _seconds([*naive, str(paths[naive_events])])
            samples["naive"].append((naive_run - naive_startup) / naive_events)
    ptemu_us = statistics.median(samples["ptemu"]) * 1e6
    naive_us = statistics.median(samples["naive"]) * 1e6
    return {
        "events": events, "naive_events": naive_events, "rounds": rounds,
        "ptemu_us_per_event": round(ptemu_us, 2),
        "naive_us_per_event": round(naive_us, 2),
        "ratio": round(naive_us / ptemu_us, 1) if ptemu_us > 0 else None,
        "startup_s": round(statistics.median(samples["startup"]), 3),
    }


def render_end_to_end(figures: dict[str, Any]) -> str:
    """The figures as the lines `ptemu bench --end-to-end` prints."""
    return "\n".join([
        (f"end to end ({figures['events']}-event trace, whole processes, "
        "a 1-event run subtracted):"),
        f"  ptemu replay   {figures['ptemu_us_per_event']:>9.2f} us/event",
        (f"  naive script   {figures['naive_us_per_event']:>9.2f} us/event "
        f"({figures['naive_events']} events)"),
        f"  ratio          {figures['ratio']}x",
        f"  start-up       {figures['startup_s']} s (ptemu replay of 1 event)",
    ])
