"""The fixture loader: every rule of format version 1, good and bad input.

Every bad document must raise FixtureError whose one-line message names the
file, the event index (when the problem is inside an event) and the key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ptemu
from ptemu.errors import FixtureError, UsageError
from ptemu.fixtures import (
    Expectation,
    corpus_path,
    find_fixtures,
    load_fixture,
    parse_fixture,
)
from ptemu.results import EntryResult, WriteRecord
from ptemu.status import EntryState, Policy, Status

Document = dict[str, Any]
WriteJson = Callable[..., Path]


# -- good input ---------------------------------------------------------------


def test_valid_document_loads_every_field(document: Document, write_json: WriteJson) -> None:
    path = write_json(document)
    fixture = load_fixture(path)
    assert fixture.path == path
    assert fixture.name == "test/pae-high-half"
    assert fixture.source == "hand-written for the loader tests"
    assert fixture.paging == "pae"
    assert fixture.entry_size == 8
    assert fixture.code_bits == 32
    assert fixture.memory_regions == ((0x3000, bytes(4)),)
    assert fixture.policy is Policy.STRICT
    (event,) = fixture.events
    assert event.index == 0
    assert event.gpa == 0x3FF4
    assert event.gla == 0xC0003FF4
    assert event.regs == {"rip": 0xC1001234, "rax": 0xC0003FF0, "rcx": 1}
    assert event.code == b"\x89\x48\x04"
    assert event.memory == ()
    assert event.expect == Expectation(
        status=Status.EMULATED,
        writes=(WriteRecord(gpa=0x3FF0, offset=4, size=4, value=1, old=0),),
        entries=(EntryResult(gpa=0x3FF0, state=EntryState.PARTIAL),),
        regs={"rip": 0xC1001237},
    )


def test_optional_keys_default(document: Document) -> None:
    del document["source"]
    event = document["events"][0]
    del event["expect"]
    fixture = parse_fixture(document, "doc.json")
    assert fixture.source is None
    assert fixture.policy is Policy.STRICT
    assert fixture.events[0].expect is None
    assert fixture.events[0].memory == ()


def test_empty_events_is_a_memory_image(document: Document) -> None:
    # Format: `events` may be empty in a memory image kept for walking.
    document["events"] = []
    fixture = parse_fixture(document, "image.json")
    assert fixture.events == ()
    assert fixture.memory_regions == ((0x3000, bytes(4)),)


def test_recorded_coalescing_is_read_from_the_capture_key(document: Document) -> None:
    assert parse_fixture(document, "doc.json").coalesce is True       # no capture key
    document["capture"] = {"tool": "ptemu capture"}
    assert parse_fixture(document, "doc.json").coalesce is True       # key absent: on
    document["capture"] = {"tool": "ptemu capture", "coalesce": False}
    assert parse_fixture(document, "doc.json").coalesce is False
    document["capture"] = "free text"                                 # not an object: ignored
    assert parse_fixture(document, "doc.json").coalesce is True


def test_expect_keys_left_out_are_none(document: Document) -> None:
    document["events"][0]["expect"] = {"status": "rejected"}
    expect = parse_fixture(document, "doc.json").events[0].expect
    assert expect == Expectation(status=Status.REJECTED, writes=None, entries=None, regs=None)


def test_numbers_and_hex_strings_mean_the_same(document: Document) -> None:
    event = document["events"][0]
    event["gpa"] = 0x3FF4
    event["regs"]["rcx"] = 1
    document["code_bits"] = "0x20"
    document["ptemu_fixture"] = "0x1"
    fixture = parse_fixture(document, "doc.json")
    assert fixture.code_bits == 32
    assert fixture.events[0].gpa == 0x3FF4
    assert fixture.events[0].regs["rcx"] == 1


def test_hex_digits_any_case_and_bytes_with_or_without_spaces(document: Document) -> None:
    event = document["events"][0]
    event["gla"] = "0XC0003FF4"
    event["code"] = "8948 04"
    document["memory"] = [{"gpa": "0x3000", "data": " 67\n00 0A "}]
    fixture = parse_fixture(document, "doc.json")
    assert fixture.events[0].gla == 0xC0003FF4
    assert fixture.events[0].code == b"\x89\x48\x04"
    assert fixture.memory_regions == ((0x3000, b"\x67\x00\x0a"),)


def test_unknown_keys_are_ignored_everywhere(document: Document) -> None:
    document["captured_by"] = "someone"
    document["memory"][0]["note"] = 1
    event = document["events"][0]
    event["comment"] = "x"
    event["expect"]["confidence"] = "high"
    event["expect"]["writes"][0]["why"] = "test"
    event["expect"]["entries"][0]["extra"] = None
    assert parse_fixture(document, "doc.json").name == "test/pae-high-half"


def test_policy_memory_patches_and_complete_entries(document: Document) -> None:
    document["policy"] = "hvmi"
    event = document["events"][0]
    event["memory"] = [{"gpa": "0x3ff0", "data": "67"}]
    event["expect"]["entries"] = [
        {"gpa": "0x3ff0", "state": "complete", "old": "0x67", "new": "0x100000067"}
    ]
    fixture = parse_fixture(document, "doc.json")
    assert fixture.policy is Policy.HVMI
    assert fixture.events[0].memory == ((0x3FF0, b"\x67"),)
    assert fixture.events[0].expect is not None
    assert fixture.events[0].expect.entries == (
        EntryResult(gpa=0x3FF0, state=EntryState.COMPLETE, old=0x67, new=0x100000067),
    )


@pytest.mark.parametrize(("paging", "bits"), [
    ("legacy", 16), ("legacy", 32), ("pae", 16), ("pae", 32),
    ("4level", 16), ("4level", 32), ("4level", 64), ("5level", 16), ("5level", 64),
])
def test_code_bits_allowed_per_paging_mode(document: Document, paging: str, bits: int) -> None:
    document["paging"] = paging
    document["code_bits"] = bits
    if paging == "legacy":  # 4-byte entries: make the write fit one
        document["events"][0]["expect"]["writes"][0]["offset"] = 0
        document["events"][0]["expect"]["writes"][0]["gpa"] = "0x3ff4"
        document["events"][0]["expect"]["entries"][0]["gpa"] = "0x3ff4"
    assert parse_fixture(document, "doc.json").code_bits == bits


@pytest.mark.parametrize("status", [status.value for status in Status])
def test_every_status_name_is_accepted(document: Document, status: str) -> None:
    document["events"][0]["expect"] = {"status": status}
    expect = parse_fixture(document, "doc.json").events[0].expect
    assert expect is not None and expect.status == Status(status)


def test_register_vocabulary_and_widths(document: Document) -> None:
    regs = document["events"][0]["regs"]
    regs.update({"cs": "0xffff", "ymm15": "0x" + "f" * 64, "xmm3": "0x" + "1" * 32,
                 "gs_base": "0xffff888000000000", "efer": "0xd01", "r15": 0})
    fixture = parse_fixture(document, "doc.json")
    assert fixture.events[0].regs["ymm15"] == (1 << 256) - 1
    assert fixture.events[0].regs["cs"] == 0xFFFF


# -- bad input: one rule per case ---------------------------------------------

Mutation = Callable[[Document], Any]


def _set(path: str, value: object) -> Mutation:
    """Set a key given as dotted path with list indices (`events.0.regs.rip`)."""

    def mutate(doc: Document) -> None:
        *parents, last = path.split(".")
        target: Any = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return mutate


def _delete(path: str) -> Mutation:
    def mutate(doc: Document) -> None:
        *parents, last = path.split(".")
        target: Any = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        del target[last]

    return mutate


def _legacy(then: Mutation) -> Mutation:
    """Switch the document to legacy paging (4-byte entries) with a fitting write."""

    def mutate(doc: Document) -> None:
        doc["paging"] = "legacy"
        write = doc["events"][0]["expect"]["writes"][0]
        write.update({"gpa": "0x3ff4", "offset": 0})
        doc["events"][0]["expect"]["entries"][0]["gpa"] = "0x3ff4"
        then(doc)

    return mutate


E = "events.0."
X = "events.0.expect."

# (id, mutation, event index or None, key or None, fragment of the message)
BAD_CASES: list[tuple[str, Mutation, int | None, str | None, str]] = [
    # top level
    ("version-missing", _delete("ptemu_fixture"), None, "ptemu_fixture", "missing key"),
    ("version-2", _set("ptemu_fixture", 2), None, "ptemu_fixture",
     "unsupported fixture version 2"),
    ("version-decimal-string", _set("ptemu_fixture", "1"), None, "ptemu_fixture",
     "unsupported fixture version \"1\""),
    ("version-null", _set("ptemu_fixture", None), None, "ptemu_fixture",
     "unsupported fixture version null"),
    ("name-missing", _delete("name"), None, "name", "missing key"),
    ("name-number", _set("name", 5), None, "name", "expected a string"),
    ("name-blank", _set("name", "  "), None, "name", "empty name"),
    ("source-number", _set("source", 3), None, "source", "expected a string"),
    ("paging-missing", _delete("paging"), None, "paging", "missing key"),
    ("paging-unknown", _set("paging", "3level"), None, "paging",
     "unknown paging mode '3level'"),
    ("paging-case", _set("paging", "PAE"), None, "paging", "unknown paging mode 'PAE'"),
    ("code-bits-missing", _delete("code_bits"), None, "code_bits", "missing key"),
    ("code-bits-8", _set("code_bits", 8), None, "code_bits", "must be 16, 32 or 64"),
    ("code-bits-64-pae", _set("code_bits", 64), None, "code_bits",
     "code_bits 64 needs paging 4level or 5level, not pae"),
    ("code-bits-64-legacy", _legacy(_set("code_bits", 64)), None, "code_bits",
     "not legacy"),
    ("code-bits-decimal-string", _set("code_bits", "32"), None, "code_bits",
     "not a hex integer"),
    ("memory-missing", _delete("memory"), None, "memory", "missing key"),
    ("memory-object", _set("memory", {}), None, "memory", "expected a JSON array"),
    ("memory-item-not-object", _set("memory.0", "00"), None, "memory[0]",
     "expected a JSON object"),
    ("memory-gpa-missing", _delete("memory.0.gpa"), None, "memory[0].gpa", "missing key"),
    ("memory-data-missing", _delete("memory.0.data"), None, "memory[0].data", "missing key"),
    ("memory-data-odd", _set("memory.0.data", "678"), None, "memory[0].data",
     "not hex bytes"),
    ("memory-data-not-hex", _set("memory.0.data", "zz"), None, "memory[0].data",
     "not hex bytes"),
    ("memory-data-0x", _set("memory.0.data", "0x67"), None, "memory[0].data",
     "not hex bytes"),
    ("memory-data-number", _set("memory.0.data", 67), None, "memory[0].data",
     "expected a hex byte string"),
    ("memory-gpa-negative", _set("memory.0.gpa", -1), None, "memory[0].gpa",
     "negative value"),
    ("memory-gpa-float", _set("memory.0.gpa", 4096.0), None, "memory[0].gpa",
     "expected an integer or hex string"),
    ("memory-gpa-bool", _set("memory.0.gpa", True), None, "memory[0].gpa",
     "expected an integer"),
    ("memory-gpa-underscore", _set("memory.0.gpa", "0x3_000"), None, "memory[0].gpa",
     "not a hex integer"),
    ("memory-gpa-too-wide", _set("memory.0.gpa", "0x10000000000000000"), None,
     "memory[0].gpa", "does not fit in 64 bits"),
    ("memory-past-end", _set("memory.0.gpa", "0xfffffffffffffffe"), None, "memory[0].data",
     "past the 64-bit address space"),
    ("policy-unknown", _set("policy", "lenient"), None, "policy", "unknown policy 'lenient'"),
    ("events-missing", _delete("events"), None, "events", "missing key"),
    ("capture-coalesce-string", _set("capture", {"coalesce": "false"}), None,
     "capture.coalesce", "expected true or false, got a string"),
    ("events-object", _set("events", {}), None, "events", "expected a JSON array"),
    # events
    ("event-not-object", _set("events.0", []), 0, None, "expected a JSON object"),
    ("event-gpa-missing", _delete(E + "gpa"), 0, "gpa", "missing key"),
    ("event-gla-missing", _delete(E + "gla"), 0, "gla", "missing key"),
    ("event-gla-not-hex", _set(E + "gla", "c0003ff4"), 0, "gla", "not a hex integer"),
    ("event-regs-missing", _delete(E + "regs"), 0, "regs", "missing key"),
    ("event-regs-array", _set(E + "regs", []), 0, "regs", "expected a JSON object"),
    ("event-rip-missing", _delete(E + "regs.rip"), 0, "regs.rip", "missing key"),
    ("event-register-unknown", _set(E + "regs.rxx", 1), 0, "regs.rxx",
     "unknown register name 'rxx'"),
    ("event-register-newline", _set(E + "regs.r\nax", 1), 0, "regs.r\\nax",
     "unknown register name 'r\\nax'"),
    ("event-register-upper-case", _set(E + "regs.RAX", 1), 0, "regs.RAX",
     "unknown register name 'RAX'"),
    ("event-selector-too-wide", _set(E + "regs.cs", "0x10000"), 0, "regs.cs",
     "does not fit in 16 bits"),
    ("event-gpr-too-wide", _set(E + "regs.rax", "0x10000000000000000"), 0, "regs.rax",
     "does not fit in 64 bits"),
    ("event-xmm-ymm-disagree",
     lambda d: d["events"][0]["regs"].update({"xmm0": "0x1", "ymm0": "0x2"}), 0, "regs",
     "xmm0 and the low half of ymm0 differ"),
    ("event-code-missing", _delete(E + "code"), 0, "code", "missing key"),
    ("event-code-empty", _set(E + "code", " "), 0, "code", "no instruction bytes"),
    ("event-code-odd", _set(E + "code", "89 48 0"), 0, "code", "not hex bytes"),
    ("event-patch-bad", _set(E + "memory", [{"gpa": "0x3ff0"}]), 0, "memory[0].data",
     "missing key"),
    ("second-event-bad", lambda d: d["events"].append({"gpa": 1}), 1, "gla", "missing key"),
    # expectations
    ("expect-array", _set(E + "expect", []), 0, "expect", "expected a JSON object"),
    ("status-unknown", _set(X + "status", "ok"), 0, "expect.status", "unknown status 'ok'"),
    ("writes-object", _set(X + "writes", {}), 0, "expect.writes", "expected a JSON array"),
    ("write-size-missing", _delete(X + "writes.0.size"), 0, "expect.writes[0].size",
     "missing key"),
    ("write-old-missing", _delete(X + "writes.0.old"), 0, "expect.writes[0].old",
     "missing key"),
    ("write-gpa-unaligned", _set(X + "writes.0.gpa", "0x3ff4"), 0, "expect.writes[0].gpa",
     "not entry-aligned (entries are 8 bytes)"),
    ("write-offset-outside", _set(X + "writes.0.offset", 8), 0, "expect.writes[0].offset",
     "outside a 8-byte entry"),
    ("write-size-zero", _set(X + "writes.0.size", 0), 0, "expect.writes[0].size",
     "does not fit"),
    ("write-past-entry", _set(X + "writes.0.size", 8), 0, "expect.writes[0].size",
     "size 8 at offset 4 does not fit a 8-byte entry"),
    ("write-value-wider-than-size", _set(X + "writes.0.value", "0x100000000"), 0,
     "expect.writes[0].value", "does not fit in 32 bits"),
    ("legacy-write-offset", _legacy(_set(X + "writes.0.offset", 4)), 0,
     "expect.writes[0].offset", "outside a 4-byte entry"),
    ("legacy-write-gpa-unaligned", _legacy(_set(X + "writes.0.gpa", "0x3ff6")), 0,
     "expect.writes[0].gpa", "entries are 4 bytes"),
    ("legacy-write-old-too-wide", _legacy(_set(X + "writes.0.old", "0x100000000")), 0,
     "expect.writes[0].old", "does not fit in 32 bits"),
    ("entries-object", _set(X + "entries", {}), 0, "expect.entries",
     "expected a JSON array"),
    ("entry-state-missing", _delete(X + "entries.0.state"), 0, "expect.entries[0].state",
     "missing key"),
    ("entry-state-unknown", _set(X + "entries.0.state", "done"), 0,
     "expect.entries[0].state", "unknown entry state 'done'"),
    ("entry-unaligned", _set(X + "entries.0.gpa", "0x3ff1"), 0, "expect.entries[0].gpa",
     "not entry-aligned"),
    ("complete-entry-without-new",
     _set(X + "entries.0", {"gpa": "0x3ff0", "state": "complete", "old": "0x0"}), 0,
     "expect.entries[0].new", "missing key"),
    ("partial-entry-with-old",
     _set(X + "entries.0", {"gpa": "0x3ff0", "state": "partial", "old": "0x0"}), 0,
     "expect.entries[0].old", "only a complete entry has 'old'"),
    ("entries-out-of-order",
     _set(X + "entries", [{"gpa": "0x3ff8", "state": "partial"},
                          {"gpa": "0x3ff0", "state": "partial"}]), 0,
     "expect.entries[1].gpa", "address order"),
    ("entries-repeated",
     _set(X + "entries", [{"gpa": "0x3ff0", "state": "partial"},
                          {"gpa": "0x3ff0", "state": "partial"}]), 0,
     "expect.entries[1].gpa", "each entry once"),
    ("entries-disagree-with-writes",
     _set(X + "entries", [{"gpa": "0x3ff8", "state": "partial"}]), 0, "expect.entries",
     "writes: [0x3ff0], entries: [0x3ff8]"),
    ("expect-regs-unknown", _set(X + "regs.eip", 1), 0, "expect.regs.eip",
     "unknown register name 'eip'"),
    ("rejected-with-writes", _set(X + "status", "rejected"), 0, "expect.writes",
     "a 'rejected' event changes nothing: 'writes' must be empty"),
    ("unsupported-with-regs",
     lambda d: d["events"][0].__setitem__(
         "expect", {"status": "unsupported", "writes": [], "regs": {"rip": "0x1"}}), 0,
     "expect.regs", "'regs' must be empty"),
]


@pytest.mark.parametrize(("mutate", "event", "key", "fragment"),
                         [case[1:] for case in BAD_CASES], ids=[case[0] for case in BAD_CASES])
def test_bad_document_names_file_event_and_key(
    document: Document, write_json: WriteJson, mutate: Mutation, event: int | None,
    key: str | None, fragment: str,
) -> None:
    mutate(document)
    path = write_json(document, "traces/bad.json")
    with pytest.raises(FixtureError) as caught:
        load_fixture(path)
    error = caught.value
    message = str(error)
    assert "\n" not in message
    assert (error.path, error.event, error.key) == (str(path), event, key)
    assert message.startswith(f"{path}: ")
    if event is not None:
        assert f": event {event}:" in message
    else:
        assert ": event " not in message
    if key is not None:
        assert f"key '{key}'" in message
    assert fragment in message


def test_not_json_names_the_position(write_json: WriteJson, tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "ptemu_fixture": 1,\n  "name": \n}', encoding="utf-8")
    with pytest.raises(FixtureError) as caught:
        load_fixture(path)
    assert str(caught.value) == f"{path}: not JSON: Expecting value at line 4 column 1"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"name": "caf\xe9"}')
    with pytest.raises(FixtureError, match=r"not UTF-8: bad byte at offset 13"):
        load_fixture(path)


def test_top_level_not_an_object(write_json: WriteJson) -> None:
    path = write_json([1, 2])
    with pytest.raises(FixtureError) as caught:
        load_fixture(path)
    assert str(caught.value) == f"{path}: expected a JSON object, got an array"


def test_unreadable_path(tmp_path: Path) -> None:
    with pytest.raises(FixtureError, match=r"cannot read"):
        load_fixture(tmp_path / "absent.json")


def test_huge_integer_literal_is_a_fixture_error(tmp_path: Path) -> None:
    path = tmp_path / "huge.json"
    path.write_text('{"ptemu_fixture": ' + "9" * 5000 + "}", encoding="utf-8")
    with pytest.raises(FixtureError) as caught:
        load_fixture(path)
    assert "\n" not in str(caught.value)


def test_version_is_checked_before_other_keys(write_json: WriteJson) -> None:
    # A future version may rename everything: say "version", not "missing name".
    path = write_json({"ptemu_fixture": 2})
    with pytest.raises(FixtureError, match=r"unsupported fixture version 2"):
        load_fixture(path)


# -- finding fixture files ------------------------------------------------------


def test_find_fixtures_recurses_sorts_and_dedupes(tmp_path: Path) -> None:
    for name in ("b/2.json", "a/deep/1.json", "c.json", "notes.txt", "a/x.JSON.bak"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    single = tmp_path / "c.json"
    found = find_fixtures([tmp_path, single])
    assert found == [tmp_path / "a/deep/1.json", tmp_path / "b/2.json", single]


def test_find_fixtures_takes_a_named_file_whatever_its_suffix(tmp_path: Path) -> None:
    path = tmp_path / "trace.txt"
    path.write_text("{}")
    assert find_fixtures([str(path)]) == [path]


def test_find_fixtures_missing_path_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"no such file or folder: .*nowhere"):
        find_fixtures([tmp_path / "nowhere"])


def test_find_fixtures_empty_folder_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"no \*\.json or \*\.jsonl fixture files under"):
        find_fixtures([tmp_path])


def test_corpus_path_is_the_package_corpus_folder() -> None:
    path = corpus_path()
    assert path == Path(ptemu.__file__).parent / "corpus"
    assert path.is_dir()
