"""The streamed trace form (JSON Lines): loader, replay, and the JSON twin.

A ``*.jsonl`` trace is a header line (a fixture's keys before ``events``, with
``"stream": true``) and one event per line. Every corpus fixture written in
both forms must load to the same events and replay to the same outcomes;
errors in a stream name the file, the line and the key.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from ptemu.cli import main
from ptemu.errors import FixtureError
from ptemu.fixtures import (
    corpus_path,
    find_fixtures,
    load_fixture,
    open_stream,
    replay_events,
    replay_fixture,
)
from ptemu.fixtures.loader import _Reader
from ptemu.fixtures.stream import stream_lines

Document = dict[str, Any]


def _twin(source: Path, folder: Path) -> Path:
    """`source` (a JSON fixture) rewritten as a stream in `folder`."""
    document = json.loads(source.read_text("utf-8"))
    target = (folder / source.relative_to(corpus_path())).with_suffix(".jsonl")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(stream_lines(document, document["events"])), "utf-8")
    return target


def _write_lines(path: Path, *objects: object) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in objects), "utf-8")
    return path


def _header(document: Document) -> Document:
    header = {key: value for key, value in document.items() if key != "events"}
    header["stream"] = True
    return header


CORPUS = sorted(path for path in find_fixtures([corpus_path()]) if path.suffix == ".json")


def test_the_header_line_says_stream_and_has_no_events(tmp_path: Path) -> None:
    first = _twin(CORPUS[0], tmp_path).read_text("utf-8").splitlines()[0]
    header = json.loads(first)
    assert header["stream"] is True and header["ptemu_fixture"] == 1
    assert "events" not in header


@pytest.mark.parametrize("path", CORPUS, ids=lambda path: str(path.relative_to(corpus_path())))
def test_json_and_jsonl_twins_load_and_replay_identically(path: Path, tmp_path: Path) -> None:
    whole = load_fixture(path)
    twin = _twin(path, tmp_path)
    streamed = load_fixture(twin)
    assert streamed.events == whole.events
    assert (streamed.name, streamed.paging, streamed.code_bits, streamed.memory_regions,
            streamed.policy, streamed.coalesce) == \
        (whole.name, whole.paging, whole.code_bits, whole.memory_regions, whole.policy,
         whole.coalesce)
    stream = open_stream(twin)
    assert stream.header.events == ()
    reference = replay_fixture(whole, coalesce=whole.coalesce)
    reports = list(replay_events(stream.header, stream, coalesce=stream.header.coalesce))
    assert reports == list(reference.events)


def test_cli_output_of_the_twins_is_the_same(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    # The corpus passes, so the human output has no mismatch lines to reorder.
    folder = tmp_path / "streams"
    folder.mkdir()
    for path in CORPUS:
        _twin(path, folder)
    assert main(["replay", *map(str, CORPUS)]) == 0
    whole = capsys.readouterr().out
    assert main(["replay", str(folder)]) == 0
    assert capsys.readouterr().out == whole
    assert main(["replay", "--json", *map(str, CORPUS)]) == 0
    whole_json = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["replay", "--json", str(folder)]) == 0
    streamed_json = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for item in whole_json + streamed_json:
        item.pop("path", None)
    assert streamed_json == whole_json


def test_fast_and_checked_event_paths_agree_on_the_corpus() -> None:
    # The loader reads regular events on a fast path; the checked path is the
    # reference. Both must give the very same event for every corpus event.
    for path in CORPUS:
        document = json.loads(path.read_text("utf-8"))
        fixture = load_fixture(path)
        reader = _Reader(path)
        reader.entry_size = fixture.entry_size
        for index, event in enumerate(document["events"]):
            fast = reader.fast_event(copy.deepcopy(event), index)
            checked = reader.checked_event(copy.deepcopy(event), index)
            assert fast is None or fast == checked, (path, index)
            assert checked == fixture.events[index]


# -- errors name the file, the line and the key -------------------------------------------


def test_bad_event_line_names_file_line_event_and_key(document: Document,
                                                        tmp_path: Path) -> None:
    event = document["events"][0]
    bad = copy.deepcopy(event)
    del bad["regs"]["rip"]
    path = _write_lines(tmp_path / "t.jsonl", _header(document), event, event, bad)
    stream = open_stream(path)
    events = iter(stream)
    assert next(events).index == 0 and next(events).index == 1
    with pytest.raises(FixtureError) as caught:
        next(events)
    assert str(caught.value) == f"{path}: line 4: event 2: key 'regs.rip': missing key"
    assert caught.value.line == 4


@pytest.mark.parametrize(("lines", "message"), [
    (["{", ""], ("line 1: not JSON: Expecting property name enclosed in double quotes at "
     "column 2")),
    (["HEADER_NO_STREAM"], ("line 1: key 'stream': a streamed trace (*.jsonl) starts with a "
     "header that has \"stream\": true")),
    (["HEADER_WITH_EVENTS"], ("line 1: key 'events': a streamed trace's header has no "
     "'events': each event follows on its own line")),
    (["HEADER", "EVENT", "", "EVENT"], ("line 3: empty line (a streamed trace holds one "
     "event per line, and no blank lines)")),
    (["HEADER", "EVENT", "[1"], "line 3: not JSON: Expecting ',' delimiter at column 3"),
    (["HEADER", '{"gpa": "0x1", "gpa": "0x2"}'], ("line 2: key 'gpa': key given twice in one "
     "JSON object (which one counts would be a guess)")),
])
def test_stream_errors(lines: list[str], message: str, document: Document,
                       tmp_path: Path) -> None:
    header = _header(document)
    replace = {
        "HEADER": json.dumps(header),
        "HEADER_NO_STREAM": json.dumps({**header, "stream": False}),
        "HEADER_WITH_EVENTS": json.dumps({**header, "events": []}),
        "EVENT": json.dumps(document["events"][0]),
    }
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(replace.get(line, line) for line in lines) + "\n", "utf-8")
    with pytest.raises(FixtureError) as caught:
        list(open_stream(path))
    assert str(caught.value) == f"{path}: {message}"


def test_a_json_fixture_may_not_claim_to_be_a_stream(document: Document,
                                                     write_json: Any) -> None:
    document["stream"] = True
    with pytest.raises(FixtureError, match="key 'stream': only a streamed trace"):
        load_fixture(write_json(document))


# -- ptemu replay on streams ------------------------------------------------------------


def test_stream_mismatches_come_as_they_happen_and_the_line_last(
        document: Document, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document["capture"] = {"coalesce": False}   # recorded without PAE coalescing
    wrong = copy.deepcopy(document["events"][0])
    wrong["expect"]["regs"]["rip"] = "0xc1001238"   # mov [eax+4], ecx is 3 bytes: 0x...237
    path = _write_lines(tmp_path / "t.jsonl", _header(document), wrong)
    assert main(["replay", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "  event 0: regs.rip: expected 0xc1001238, actual 0xc1001237",
        "test/pae-high-half  1 event  FAIL",
        "0 passed, 1 failed",
    ]


def test_a_bad_line_mid_stream_exits_2_with_one_line(
        document: Document, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write_lines(tmp_path / "t.jsonl", _header(document), document["events"][0],
                        {"gpa": "0x3ff4"})
    assert main(["replay", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"ptemu replay: {path}: line 3: event 1: key 'gla': missing key\n"


def test_a_stream_without_events_is_refused(document: Document, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = _write_lines(tmp_path / "t.jsonl", _header(document))
    assert main(["replay", str(path)]) == 2
    assert "no events to replay" in capsys.readouterr().err


# -- the schemas of the two kinds of line ----------------------------------------------


def _schema(name: str) -> Any:
    from importlib import resources

    import jsonschema  # type: ignore[import-untyped]

    schema = json.loads(resources.files("ptemu").joinpath(f"schema/{name}").read_text("utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_stream_schemas_share_the_fixture_schema_definitions() -> None:
    fixture = _schema("fixture.schema.json").schema
    for name in ("stream-header.schema.json", "stream-event.schema.json"):
        assert _schema(name).schema["$defs"] == fixture["$defs"]


def test_stream_schemas_accept_every_corpus_twin_and_refuse_a_bad_line(tmp_path: Path) -> None:
    header, event = _schema("stream-header.schema.json"), _schema("stream-event.schema.json")
    for path in CORPUS:
        first, *rest = _twin(path, tmp_path).read_text("utf-8").splitlines()
        assert header.is_valid(json.loads(first))
        assert all(event.is_valid(json.loads(line)) for line in rest)
    document = json.loads(CORPUS[0].read_text("utf-8"))
    assert not header.is_valid(document)            # events inline, no "stream"
    assert not event.is_valid({"gpa": "0x1000"})    # no gla, regs, code
