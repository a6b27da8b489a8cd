"""Hand-written events: what a capture cannot record because the CPU never does
it (a store that misses the faulting GLA: ``rejected``; an instruction that
stores nothing: ``unsupported``), built from a captured event's real registers
and code."""

from __future__ import annotations

import random
from collections.abc import Iterator

from .entries import Values, h
from .guest import Json, Trace, capture_description, guest


def handwritten(rng: random.Random) -> Iterator[Trace]:
    v = Values("4level", rng)
    g = guest("rejected-store-misses-faulting-gla", "4level", 64, rng,
              "hand-written from a captured MOV: the event names another entry than the "
              "one the instruction stores to, so no store covers the faulting GLA")
    g.entries = {2: v.pte(), 9: v.pte()}
    g.blob("set", "48 89 37 c3")
    g.call("set", rdi=g.entry(2), rsi=v.pte())
    fixture = capture_description(g.description())
    event = fixture["events"][0]
    event["gpa"] = h(g.entry_gpa(9))
    event["gla"] = h(g.entry(9))
    _refuse(fixture, "rejected")
    yield Trace(fixture["name"], fixture=fixture)

    g = guest("rejected-store-on-another-page", "pae", 32, rng,
              "hand-written from a captured MOV: the event's page differs from the page the "
              "instruction stores to")
    v = Values("pae", rng)
    g.entries = {4: v.pte()}
    g.blob("set", "89 10 c3")
    g.call("set", rax=g.entry(4), rdx=0x1234_5067)
    # The event's page is mapped too (a page the code never touches), so that
    # its GLA walks to its GPA through the tables the fixture carries.
    assert g.table_gla is not None
    g.data_pages.append({"gpa": h(g.table_gpa + 0x1000), "gla": h(g.table_gla + 0x1000),
                         "data": ""})
    fixture = capture_description(g.description())
    event = fixture["events"][0]
    event["gpa"] = h(g.entry_gpa(4) + 0x1000)
    event["gla"] = h(g.entry(4) + 0x1000)
    _refuse(fixture, "rejected")
    yield Trace(fixture["name"], fixture=fixture)

    v = Values("4level", rng)
    for name, code, what in (
            ("unsupported-nop", "90 c3", "NOP"),
            ("unsupported-load", "8b 07 c3", "MOV EAX, [RDI] (a load)")):
        g = guest(name, "4level", 64, rng,
                  f"hand-written from a captured MOV's registers: {what} at RIP stores "
                  "nothing, so there is nothing to emulate")
        g.entries = {3: v.pte()}
        g.blob("set", "48 89 37 c3")
        g.call("set", rdi=g.entry(3), rsi=v.pte())
        fixture = capture_description(g.description())
        fixture["events"][0]["code"] = code
        _refuse(fixture, "unsupported")
        yield Trace(fixture["name"], fixture=fixture)

    g = guest("unsupported-load", "legacy", 32, rng,
              "hand-written from a captured MOV's registers: MOV EDX, [EAX] stores nothing")
    v = Values("legacy", rng)
    g.entries = {3: v.pte()}
    g.blob("set", "89 10 c3")
    g.call("set", rax=g.entry(3), rdx=v.pte())
    fixture = capture_description(g.description())
    fixture["events"][0]["code"] = "8b 10 c3"
    _refuse(fixture, "unsupported")
    yield Trace(fixture["name"], fixture=fixture)

def _refuse(fixture: Json, status: str) -> None:
    """Turn a captured single-event fixture into a refused one: nothing changes."""
    assert len(fixture["events"]) == 1
    event = fixture["events"][0]
    event["expect"] = {"status": status, "writes": [], "entries": [], "regs": {}}
    event.pop("captured", None)
    fixture["capture"]["hand_written"] = (
        f"event edited by tools/corpus/build_corpus.py: expect {status}, nothing written")
