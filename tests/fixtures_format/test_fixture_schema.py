"""The shipped JSON Schema and the loader agree on what a fixture is.

The schema checks structure, names and widths; a few rules need arithmetic
across keys (entry alignment and fit for the paging mode, a value's width for
its write size, address order, entries matching writes, xmm/ymm agreement) and
live in the loader only. `LOADER_ONLY` lists those documents explicitly, so a
schema that starts rejecting them (or a loader that stops) fails here.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from importlib import resources
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from ptemu.errors import FixtureError
from ptemu.fixtures import parse_fixture
from ptemu.status import EntryState, Policy, Status

Document = dict[str, Any]
Edit = Callable[[Document], None]


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    text = resources.files("ptemu").joinpath("schema/fixture.schema.json").read_text("utf-8")
    schema = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _event(doc: Document) -> Document:
    event: Document = doc["events"][0]
    return event


def _expect(doc: Document) -> Document:
    expect: Document = doc["events"][0]["expect"]
    return expect


def _edit(**changes: object) -> Edit:
    def edit(doc: Document) -> None:
        doc.update(changes)
    return edit


def _event_edit(**changes: object) -> Edit:
    def edit(doc: Document) -> None:
        _event(doc).update(changes)
    return edit


def _expect_edit(**changes: object) -> Edit:
    def edit(doc: Document) -> None:
        _expect(doc).update(changes)
    return edit


def _regs(**changes: object) -> Edit:
    def edit(doc: Document) -> None:
        _event(doc)["regs"].update(changes)
    return edit


def _drop(key: str) -> Edit:
    def edit(doc: Document) -> None:
        del doc[key]
    return edit


def _drop_event_key(key: str) -> Edit:
    def edit(doc: Document) -> None:
        del _event(doc)[key]
    return edit


def _legacy_write(offset: int = 0) -> Edit:
    def edit(doc: Document) -> None:
        doc["paging"] = "legacy"
        _expect(doc)["writes"] = [
            {"gpa": "0x3ff4", "offset": offset, "size": 4, "value": "0x1", "old": "0x0"}]
        _expect(doc)["entries"] = [
            {"gpa": "0x3ff4", "state": "complete", "old": "0x0", "new": "0x1"}]
    return edit


GOOD: dict[str, Edit] = {
    "as-is": lambda doc: None,
    "numbers": _event_edit(gpa=16372, gla=3221241844),
    "version-hex": _edit(ptemu_fixture="0x1"),
    "code-bits-hex": _edit(code_bits="0x10"),
    "legacy": _legacy_write(),
    "4level-64": _edit(paging="4level", code_bits=64),
    "5level-16": _edit(paging="5level", code_bits=16),
    "no-source": _drop("source"),
    "policy-hvmi": _edit(policy="hvmi"),
    "unknown-keys": _edit(comment={"anything": [1, 2]}),
    "empty-memory": _edit(memory=[]),
    "zero-events": _edit(events=[]),       # a memory image kept for ptemu walk
    "capture-coalesce-off": _edit(capture={"tool": "x", "coalesce": False}),
    "patches": _event_edit(memory=[{"gpa": 0, "data": ""}, {"gpa": "0x10", "data": "6 7"}]),
    "no-expect": _drop_event_key("expect"),
    "empty-expect": _event_edit(expect={}),
    "rejected": _event_edit(expect={"status": "rejected", "writes": [], "entries": [],
                                    "regs": {}}),
    "wide-registers": _regs(ymm0="0x" + "f" * 64, xmm1="0x" + "0" * 40 + "1", cs=65535,
                            fs_base="0xffffffffffffffff"),
    "duplicate-entry": _expect_edit(entries=[{"gpa": "0x3ff0", "state": "duplicate"}]),
    "complete-entry": _expect_edit(
        entries=[{"gpa": "0x3ff0", "state": "complete", "old": 0, "new": "0x100000000"}]),
}
GOOD.update({f"status-{s.value}": _event_edit(expect={"status": s.value}) for s in Status})
GOOD.update({f"entry-{s.value}": _expect_edit(entries=[{"gpa": "0x3ff0", "state": s.value}])
             for s in EntryState if s is not EntryState.COMPLETE})
GOOD.update({f"policy-{p.value}": _edit(policy=p.value) for p in Policy})

BAD: dict[str, Edit] = {
    "empty-object": lambda doc: doc.clear(),
    "version-2": _edit(ptemu_fixture=2),
    "version-string": _edit(ptemu_fixture="1"),
    "no-name": _drop("name"),
    "blank-name": _edit(name=" "),
    "source-null": _edit(source=None),
    "paging-unknown": _edit(paging="2level"),
    "code-bits-64-pae": _edit(code_bits=64),
    "code-bits-64-hex-legacy": _edit(paging="legacy", code_bits="0x40"),
    "code-bits-8": _edit(code_bits=8),
    "no-memory": _drop("memory"),
    "no-events": _drop("events"),
    "capture-coalesce-string": _edit(capture={"coalesce": "no"}),
    "policy-unknown": _edit(policy="seed"),
    "negative-gpa": _event_edit(gpa=-1),
    "decimal-string": _event_edit(gpa="16372"),
    "bool-gpa": _event_edit(gpa=True),
    "gpa-65-bits": _event_edit(gpa="0x10000000000000000"),
    "no-rip": _event_edit(regs={"rax": 1}),
    "bad-register": _regs(eax=1),
    "wide-selector": _regs(ss="0x10000"),
    "wide-gpr": _regs(rsp=2**64),
    "odd-code": _event_edit(code="894"),
    "empty-code": _event_edit(code=""),
    "code-0x": _event_edit(code="0x89"),
    "bad-patch": _event_edit(memory=[{"data": "00"}]),
    "status-unknown": _expect_edit(status="done"),
    "write-missing-old": _expect_edit(writes=[{"gpa": 0, "offset": 0, "size": 8, "value": 0}]),
    "write-size-0": _expect_edit(
        writes=[{"gpa": 0, "offset": 0, "size": 0, "value": 0, "old": 0}]),
    "write-offset-8": _expect_edit(
        writes=[{"gpa": 0, "offset": 8, "size": 1, "value": 0, "old": 0}]),
    "entry-state-unknown": _expect_edit(entries=[{"gpa": "0x3ff0", "state": "pending"}]),
    "complete-without-old": _expect_edit(
        entries=[{"gpa": "0x3ff0", "state": "complete", "new": 0}]),
    "partial-with-new": _expect_edit(
        entries=[{"gpa": "0x3ff0", "state": "partial", "new": 0}]),
    "rejected-with-writes": _expect_edit(status="rejected"),
    "unsupported-with-regs": _event_edit(expect={"status": "unsupported", "regs": {"rip": 1}}),
    "expect-regs-unknown": _expect_edit(regs={"pc": 1}),
}

# Rules only the loader checks: the schema accepts these documents.
LOADER_ONLY: dict[str, Edit] = {
    "write-unaligned-gpa": _expect_edit(
        writes=[{"gpa": "0x3ff4", "offset": 0, "size": 4, "value": 1, "old": 0}],
        entries=[{"gpa": "0x3ff4", "state": "partial"}]),
    "write-past-entry": _expect_edit(
        writes=[{"gpa": "0x3ff0", "offset": 4, "size": 8, "value": 1, "old": 0}]),
    "value-wider-than-size": _expect_edit(
        writes=[{"gpa": "0x3ff0", "offset": 4, "size": 4, "value": "0x100000000", "old": 0}]),
    "legacy-offset-4": _legacy_write(offset=4),
    "entries-out-of-order": _expect_edit(
        writes=[], entries=[{"gpa": "0x3ff8", "state": "partial"},
                            {"gpa": "0x3ff0", "state": "partial"}]),
    "entries-not-matching-writes": _expect_edit(entries=[{"gpa": "0x3ff8", "state": "partial"}]),
    "xmm-ymm-disagree": _regs(xmm2="0x1", ymm2="0x2"),
    "region-past-2^64": _edit(memory=[{"gpa": "0xffffffffffffffff", "data": "0000"}]),
}


def _apply(base: Document, edit: Edit) -> Document:
    doc = copy.deepcopy(base)
    edit(doc)
    return doc


def _loader_accepts(doc: object) -> bool:
    try:
        parse_fixture(doc, "doc.json")
    except FixtureError:
        return False
    return True


@pytest.mark.parametrize("edit", list(GOOD.values()), ids=list(GOOD))
def test_both_accept(validator: jsonschema.Draft202012Validator, document: Document,
                     edit: Edit) -> None:
    doc = _apply(document, edit)
    assert list(validator.iter_errors(doc)) == []
    assert _loader_accepts(doc)


@pytest.mark.parametrize("edit", list(BAD.values()), ids=list(BAD))
def test_both_reject(validator: jsonschema.Draft202012Validator, document: Document,
                     edit: Edit) -> None:
    doc = _apply(document, edit)
    assert not validator.is_valid(doc)
    assert not _loader_accepts(doc)


@pytest.mark.parametrize("edit", list(LOADER_ONLY.values()), ids=list(LOADER_ONLY))
def test_loader_only_rules(validator: jsonschema.Draft202012Validator, document: Document,
                           edit: Edit) -> None:
    doc = _apply(document, edit)
    assert validator.is_valid(doc)
    assert not _loader_accepts(doc)


def test_top_level_array_rejected_by_both(validator: jsonschema.Draft202012Validator) -> None:
    assert not validator.is_valid([])
    assert not _loader_accepts([])
