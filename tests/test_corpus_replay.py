"""The shipped corpus replays with 0 mismatches: through `ptemu replay`, and
through the replay API under each engine (every fixture under the policy it
asks for). Every trace carries the paging structures its capture ran under:
each event's GLA walks, through the fixture's own memory, to the GPA the
capture's CPU (Unicorn, walking tables ptemu.capture.layout built from the
SDM) stored to, and `ptemu walk` says so."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from ptemu.cli import main
from ptemu.engines import ENGINES
from ptemu.fixtures import corpus_path, find_fixtures, load_fixture, replay_fixture
from ptemu.fixtures.replay import Outcome
from ptemu.memory import InMemoryGuestMemory
from ptemu.paging import paging_mode, walk

PATHS = sorted(find_fixtures([corpus_path()]))
FIXTURES = [load_fixture(path) for path in PATHS]

CR0_WP, CR4_PSE, CR4_SMEP, CR4_SMAP, EFER_NXE = 1 << 16, 1 << 4, 1 << 20, 1 << 21, 1 << 11


def test_ptemu_replay_over_the_corpus_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    events = sum(len(fixture.events) for fixture in FIXTURES)
    assert last == f"{events} passed, 0 failed"


@pytest.mark.parametrize("engine", ENGINES)
def test_every_corpus_event_passes_through_the_handler(engine: str) -> None:
    failures = []
    for fixture in FIXTURES:
        report = replay_fixture(fixture, engine=engine)
        for event in report.events:
            if event.outcome is not Outcome.PASS:
                failures.append((fixture.name, event.index, event.outcome,
                                 [str(m) for m in event.mismatches], event.error))
    assert failures == []


def test_both_policies_are_represented() -> None:
    assert {fixture.policy.value for fixture in FIXTURES} == {"strict", "hvmi"}


def test_every_event_gla_walks_to_its_gpa_through_the_fixture_tables() -> None:
    wrong = []
    for fixture in FIXTURES:
        memory = InMemoryGuestMemory(fixture.memory_regions)
        mode = paging_mode(str(fixture.paging))
        for index, event in enumerate(fixture.events):
            regs = event.regs
            translation = walk(mode, regs["cr3"], event.gla, memory,
                               cr0_wp=bool(regs["cr0"] & CR0_WP),
                               nxe=bool(regs["efer"] & EFER_NXE),
                               pse=bool(regs["cr4"] & CR4_PSE),
                               smep=bool(regs["cr4"] & CR4_SMEP),
                               smap=bool(regs["cr4"] & CR4_SMAP))
            if translation.gpa != event.gpa:
                wrong.append((fixture.name, index, translation.stop, translation.gpa, event.gpa))
    assert wrong == []


@pytest.mark.parametrize("path", PATHS, ids=lambda path: path.stem)
def test_ptemu_walk_translates_the_first_event(path, capsys: pytest.CaptureFixture[str]) -> None:
    event = json.loads(path.read_text(encoding="utf-8"))["events"][0]
    assert main(["walk", str(path), "--cr3", event["regs"]["cr3"], event["gla"], "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stop"] is None
    assert out["gpa"] == event["gpa"]


def test_the_installed_ptemu_walk_works_on_a_shipped_trace() -> None:
    command = shutil.which("ptemu")
    if command is None:
        pytest.skip("no installed `ptemu` command on PATH (pip install . puts one there)")
    path = next(p for p in PATHS if p.parent.name == "pae")
    event = json.loads(path.read_text(encoding="utf-8"))["events"][0]
    result = subprocess.run([command, "walk", str(path), "--cr3", event["regs"]["cr3"],
                             event["gla"]], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "PDPTE" in result.stdout and "PTE" in result.stdout
    assert event["gpa"] in result.stdout, result.stdout
