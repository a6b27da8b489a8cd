"""A 10^6-event streamed trace replays in bounded memory at a flat cost per event.

The trace is `ptemu.bench.trace`'s synthetic kernel mix, whose expectations
are worked out by hand from the SDM, written to disk one event at a time.
`ptemu replay` runs it in a child process (its real CLI, with the event
loop timed at 10^3, 10^4, 10^5 and 10^6 events); the child's peak RSS is
read with getrusage(RUSAGE_CHILDREN) by a fresh intermediate process, so no
other test's children count.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EVENTS = 1_000_000
PEAK_RSS_LIMIT_KB = 200 * 1024

# Runs `ptemu replay TRACE` in this process, timing the event loop; prints the
# stdout of the command, then one JSON line of timestamps.
_CHILD = r"""
import json, sys, time
import ptemu.cli.replay as replay_cli
from ptemu.cli import main

marks = {}
original = replay_cli.replay_events

def timed(*args, **kwargs):
    start = time.perf_counter()
    for number, report in enumerate(original(*args, **kwargs), 1):
        if number in (1_000, 10_000, 100_000, 1_000_000):
            marks[number] = time.perf_counter() - start
        yield report

replay_cli.replay_events = timed
status = main(["replay", sys.argv[1]])
print(json.dumps({"status": status, "marks": marks}))
"""

# A fresh process whose only child is the replay: its RUSAGE_CHILDREN peak is
# the replay's own.
_PARENT = r"""
import resource, subprocess, sys
done = subprocess.run([sys.executable, "-c", sys.argv[1], sys.argv[2]],
                      capture_output=True, text=True)
sys.stdout.write(done.stdout)
sys.stderr.write(done.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


@pytest.mark.slow
def test_a_million_event_stream_replays_in_bounded_memory_at_flat_cost(tmp_path: Path) -> None:
    from ptemu.bench.trace import write_synthetic_trace

    trace = tmp_path / "million.jsonl"
    write_synthetic_trace(trace, EVENTS)   # one event in memory at a time
    try:
        done = subprocess.run([sys.executable, "-c", _PARENT, _CHILD, str(trace)],
                              capture_output=True, text=True, check=False, timeout=1800)
    finally:
        trace.unlink()
    lines = done.stdout.splitlines()
    assert done.stderr == ""
    assert lines[:2] == ["synthetic/4level-kernel-mix  1000000 events  PASS",
                         "1000000 passed, 0 failed"]
    timing = json.loads(lines[2])
    assert timing["status"] == 0
    peak_kb = int(lines[3])
    assert peak_kb < PEAK_RSS_LIMIT_KB, f"peak RSS {peak_kb} KB"
    marks = {int(key): value for key, value in timing["marks"].items()}
    early = (marks[10_000] - marks[1_000]) / 9_000        # events 10^3 .. 10^4
    late = (marks[1_000_000] - marks[100_000]) / 900_000  # events 10^5 .. 10^6
    # Flat: the last 900,000 events cost no more each than the early ones
    # (within 30%, for a shared machine's noise).
    assert late < 1.3 * early, f"{early * 1e6:.1f} us/event early, {late * 1e6:.1f} late"
