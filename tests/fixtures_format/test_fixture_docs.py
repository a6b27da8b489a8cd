"""The example in docs/fixture-format.md loads, validates against the schema and passes.

Its expected values are worked by hand in the document (PAE halves written by
89 48 04 / 89 10 after the CPU set the low byte to 0x67); this keeps the
document and the code from drifting apart.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import jsonschema  # type: ignore[import-untyped]

from ptemu.fixtures import Outcome, parse_fixture, replay_fixture

DOC = Path(__file__).resolve().parents[2] / "docs" / "fixture-format.md"


def _example() -> object:
    match = re.search(r"```json\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    assert match, "docs/fixture-format.md has no ```json example"
    return json.loads(match.group(1))


def test_documented_example_is_valid_and_replays_clean() -> None:
    example = _example()
    schema = json.loads(resources.files("ptemu").joinpath("schema/fixture.schema.json")
                        .read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(example)
    report = replay_fixture(parse_fixture(example, DOC))
    assert [(e.outcome, e.mismatches) for e in report.events] == [(Outcome.PASS, ())]
