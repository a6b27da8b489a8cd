"""``ptemu monitor`` on the worked example of docs/monitor.md, through the real
``ptemu`` dispatcher in a subprocess (``python -m ptemu.cli.monitor`` is the same
command, should the dispatcher ever not list it)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from example_trace import DATA_FILE, example_fixture

COMMAND = [sys.executable, "-m", "ptemu", "monitor"]
ROOT = Path(__file__).resolve().parents[2]
MONITOR_DOC = ROOT / "docs" / "monitor.md"


def ptemu_monitor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COMMAND, *args], capture_output=True, text=True, check=False,
                          timeout=120)


def test_the_shipped_example_is_what_the_generator_builds():
    assert json.loads(DATA_FILE.read_text()) == example_fixture()


def test_json_lines_report_protections_and_changes_of_the_worked_example():
    done = ptemu_monitor(str(DATA_FILE), "--watch", "0x0:0x400000", "--json")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    at_watch = [o["page"] for o in lines if o["type"] == "protect" and o["event"] is None]
    assert at_watch == ["0x1000", "0x2000", "0x3000", "0x4000"]
    changes = [(o["event"], o["start"], o["end"], o["partial"]) for o in lines
               if o["type"] == "change"]
    assert changes == [
        (0, "0x1000", "0x2000", False),          # PTE 1 mapped
        (1, "0x0", "0x1000", False),             # RW cleared
        (3, "0x203000", "0x204000", True),       # 1-byte store cleared P: at once, partial
        (4, "0x0", "0x2000", False),             # PDPTE 0 dropped: what was mapped goes
        (4, "0x200000", "0x203000", False),
        (4, "0x204000", "0x400000", False),
    ]
    first = next(o for o in lines if o["type"] == "change")
    assert first["new"][0]["frame"] == "0x200000" and first["old"][0]["translation"] is None
    assert first["cause"] == [{"gpa": "0x4008", "level": "PTE", "old": "0x0",
                               "new": "0x200007", "partial": False}]
    # The split (event 2) links the PT at 0x5000: protected, no translation changed.
    assert [o["page"] for o in lines if o["type"] == "protect" and o["event"] == 2] == [
        "0x5000"]
    assert sorted(o["page"] for o in lines if o["type"] == "unprotect") == [
        "0x3000", "0x4000", "0x5000"]
    assert lines[-1] == {"type": "summary", "events": 5, "changes": 6,
                         "unprotected_events": 0, "protected_pages": 2}


def test_seed_timing_does_not_report_the_partial_store():
    done = ptemu_monitor(str(DATA_FILE), "--space", "user", "--timing", "seed", "--json")
    assert done.returncode == 0, done.stderr
    events = {o["event"]: o["changes"] for o in map(json.loads, done.stdout.splitlines())
              if o["type"] == "event"}
    assert events[3] == 0


def test_table_output_names_each_change():
    done = ptemu_monitor(str(DATA_FILE), "--space", "user")
    assert done.returncode == 0, done.stderr
    assert "change 0x1000-0x2000: none -> 0x200000 WUX 4K  [PTE 0x4008]" in done.stdout
    assert "[PTE 0x5018] partial" in done.stdout
    assert done.stdout.splitlines()[-1] == (
        "5 events (0 on unprotected pages), 6 changes, 2 pages protected at the end")


def test_events_on_pages_no_watch_reaches_are_emulated_without_the_monitor():
    # Watching only linear 0x300000.. (the 2 MiB page): PT 0x4000 is not protected.
    done = ptemu_monitor(str(DATA_FILE), "--watch", "0x300000", "--json")
    assert done.returncode == 0, done.stderr
    events = [o for o in map(json.loads, done.stdout.splitlines()) if o["type"] == "event"]
    assert [o["page"] for o in events] == ["unprotected", "unprotected", "protected",
                                           "protected", "protected"]


@pytest.mark.parametrize(("args", "words"), [
    (["--cr3", "1000"], "--cr3"),
    (["--watch", "4096"], "--watch"),
    (["--watch", "0x1000:0x"], "--watch"),
    (["--space", "half"], "--space"),
])
def test_malformed_numbers_and_choices_exit_2_with_one_line(args, words):
    done = ptemu_monitor(str(DATA_FILE), *args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and words in done.stderr


def test_an_unreadable_fixture_or_a_bad_range_exits_2_naming_it(tmp_path):
    missing = tmp_path / "none.json"
    done = ptemu_monitor(str(missing))
    assert done.returncode == 2 and str(missing) in done.stderr
    done = ptemu_monitor(str(DATA_FILE), "--watch", "0x800000000000")
    assert done.returncode == 2 and "canonical" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def _doc_examples() -> list[tuple[str, list[str]]]:
    """(command, shown output lines) of every ``$ ptemu monitor`` block of docs/monitor.md."""
    blocks = re.findall(r"```\n\$ (ptemu monitor [^\n]*)\n(.*?)```",
                        MONITOR_DOC.read_text(encoding="utf-8"), re.DOTALL)
    return [(command, output.splitlines()) for command, output in blocks]


DOC_EXAMPLES = _doc_examples()


def test_the_worked_example_runs_on_the_shipped_corpus_trace():
    commands = [command for command, _ in DOC_EXAMPLES]
    assert len(commands) >= 3
    assert all("/monitor-own-hierarchy.json" in c for c in commands)
    assert any("fixtures/4level/" in c for c in commands)
    assert any("fixtures/pae/" in c for c in commands)
    assert any("--space" in c for c in commands) and any("--watch" in c for c in commands)


@pytest.mark.parametrize(("command", "shown"), DOC_EXAMPLES, ids=[c for c, _ in DOC_EXAMPLES])
def test_the_output_docs_monitor_md_shows_is_what_the_cli_prints(command, shown):
    done = subprocess.run([*COMMAND, *shlex.split(command)[2:]], cwd=ROOT, capture_output=True,
                          text=True, check=False, timeout=120)
    assert done.returncode == 0 and done.stderr == ""
    printed = done.stdout.splitlines()
    if "..." not in shown:
        assert printed == shown
        return
    # A "..." line stands for lines left out; the pieces between must appear, in order.
    pieces: list[list[str]] = [[]]
    for line in shown:
        if line == "...":
            pieces.append([])
        else:
            pieces[-1].append(line)
    position = 0
    for lines in filter(None, pieces):
        starts = [i for i in range(position, len(printed) - len(lines) + 1)
                  if printed[i:i + len(lines)] == lines]
        assert starts, f"not printed (in this order): {lines[0][:80]}"
        position = starts[0] + len(lines)
