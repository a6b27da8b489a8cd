"""`include_page_tables`: the fixture carries the guest's own paging structures,
so that a MOVS source can be found by walking them during replay."""

from __future__ import annotations

from ptemu.capture import capture_description
from ptemu.fixtures import parse_fixture, replay_fixture
from ptemu.fixtures.replay import Outcome
from ptemu.memory import InMemoryGuestMemory
from ptemu.paging import paging_mode, walk

SOURCE_GPA = 0x0300_0000
SOURCE_GLA = 0xFFFF_8880_0300_0000


def description(include: bool) -> dict[str, object]:
    return {
        "name": "4level/movs-test", "paging": "4level", "code_bits": 64,
        "code": [{"label": "copy", "gla": "0xffffffff81001000", "bytes": "f3 48 a5 c3"}],
        "page_tables": [{"gpa": "0x2345000", "gla": "0xffff888002345000",
                         "entries": {"0": "0x1111063", "1": "0x2222063"}}],
        "data_pages": [{"gpa": hex(SOURCE_GPA), "gla": hex(SOURCE_GLA),
                        "data": (0x8000000033333063).to_bytes(8, "little").hex()
                        + (0x4444063).to_bytes(8, "little").hex()}],
        "calls": [{"entry": "copy", "regs": {"rdi": "0xffff888002345000",
                                              "rsi": hex(SOURCE_GLA), "rcx": "0x2"}}],
        "include_page_tables": include,
    }


def test_the_fixture_memory_walks_to_the_source_and_replays():
    document = capture_description(description(True))
    fixture = parse_fixture(document, "movs.json")
    event = fixture.events[0]
    memory = InMemoryGuestMemory(fixture.memory_regions)
    translation = walk(paging_mode("4level"), event.regs["cr3"], SOURCE_GLA, memory)
    assert translation.gpa == SOURCE_GPA
    report = replay_fixture(fixture)
    assert [e.outcome for e in report.events] == [Outcome.PASS]
    values = [w.value for w in report.events[0].result.writes]
    assert values == [0x8000000033333063, 0x4444063]


def test_without_the_tables_the_movs_source_cannot_be_found():
    fixture = parse_fixture(capture_description(description(False)), "movs.json")
    report = replay_fixture(fixture)
    assert report.events[0].outcome is Outcome.FAIL
    assert report.events[0].result.status.value == "unsupported"
