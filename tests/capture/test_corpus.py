"""The shipped corpus (src/ptemu/corpus, built by ``python -m tools.corpus.build_corpus``):
what it must cover. Replaying it is the fixture tests' job; this checks its shape.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ptemu.fixtures import corpus_path, find_fixtures, load_fixture

CORPUS = corpus_path()
FILES = sorted(find_fixtures([CORPUS]))


@pytest.fixture(scope="module")
def documents() -> dict[Path, dict[str, Any]]:
    return {path: json.loads(path.read_text(encoding="utf-8")) for path in FILES}


def test_at_least_60_traces_that_all_load() -> None:
    assert len(FILES) >= 60
    names = [load_fixture(path).name for path in FILES]
    assert len(set(names)) == len(names)


def test_file_layout_follows_the_name(documents: dict[Path, dict[str, Any]]) -> None:
    for path, document in documents.items():
        assert path.relative_to(CORPUS).with_suffix("").as_posix() == document["name"]
        assert path.parent.name == document["paging"]


def test_every_paging_mode_and_code_size(documents: dict[Path, dict[str, Any]]) -> None:
    assert {d["paging"] for d in documents.values()} == {"legacy", "pae", "4level", "5level"}
    assert {d["code_bits"] for d in documents.values()} == {16, 32, 64}


def test_every_event_has_an_expectation(documents: dict[Path, dict[str, Any]]) -> None:
    for document in documents.values():
        assert document["events"], document["name"]
        assert all("expect" in event for event in document["events"]), document["name"]


def test_a_large_share_comes_from_debian_kernels(documents: dict[Path, dict[str, Any]]) -> None:
    kernel = [d for d in documents.values() if d["source"].startswith("Debian linux-image-")]
    assert len(kernel) * 2 >= len(documents)
    assert {d["paging"] for d in kernel} == {"legacy", "pae", "4level", "5level"}
    for document in kernel:
        assert "function" in document["source"]


def test_instruction_families_and_cases(documents: dict[Path, dict[str, Any]]) -> None:
    kinds: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    states_by_policy: set[tuple[str, str]] = set()
    coalesced = patched = 0
    for document in documents.values():
        for event in document["events"]:
            statuses[event["expect"]["status"]] += 1
            captured = event.get("captured", {})
            kinds.update(captured.get("instructions", []))
            coalesced += len(captured.get("instructions", [])) == 2
            patched += "memory" in event
            for entry in event["expect"]["entries"]:
                states_by_policy.add((document["policy"], entry["state"]))
    assert {"mov", "stos", "xchg", "cmpxchg", "cmpxchg8b", "arithmetic", "bit"} <= set(kinds)
    assert {"emulated", "rejected", "unsupported"} <= set(statuses)
    assert ("hvmi", "duplicate") in states_by_policy
    assert ("hvmi", "partial") in states_by_policy
    assert coalesced > 0 and patched > 0
