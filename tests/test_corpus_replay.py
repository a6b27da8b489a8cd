"""The shipped corpus replays with 0 mismatches: through `ptemu replay`, and
through the replay API under each engine (every fixture under the policy it
asks for)."""

from __future__ import annotations

import pytest

from ptemu.cli import main
from ptemu.engines import ENGINES
from ptemu.fixtures import corpus_path, find_fixtures, load_fixture, replay_fixture
from ptemu.fixtures.replay import Outcome

FIXTURES = [load_fixture(path) for path in find_fixtures([corpus_path()])]


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
