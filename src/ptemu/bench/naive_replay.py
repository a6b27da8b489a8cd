"""The naive end-to-end replay: what a user scripts without ptemu.

``python -m ptemu.bench.naive_replay TRACE.json`` reads a fixture with the
standard library's JSON parser and runs every event through the naive
pipeline (`ptemu.bench.naive.naive_event`: a fresh Capstone decode and a fresh
Unicorn engine per event), keeping the page-table pages in a plain dict. It
compares nothing; it is the baseline that ``ptemu bench --end-to-end`` times
as a whole process against ``ptemu replay`` of the same trace.
"""

from __future__ import annotations

import json
import sys

from ptemu.bench.naive import naive_event


def _number(text: str | int) -> int:
    return text if isinstance(text, int) else int(text, 16)


def replay(path: str) -> int:
    """Run every event of the trace at `path`; returns how many ran."""
    with open(path, encoding="utf-8") as file:
        fixture = json.load(file)
    pages: dict[int, bytearray] = {}

    def store(gpa: int, data: bytes) -> None:
        for index, byte in enumerate(data):
            page = pages.setdefault((gpa + index) & ~0xFFF, bytearray(0x1000))
            page[(gpa + index) & 0xFFF] = byte

    for region in fixture["memory"]:
        store(_number(region["gpa"]), bytes.fromhex(region["data"]))
    for event in fixture["events"]:
        for patch in event.get("memory", ()):
            store(_number(patch["gpa"]), bytes.fromhex(patch["data"]))
        gpa, gla = _number(event["gpa"]), _number(event["gla"])
        regs = {name: _number(value) for name, value in event["regs"].items()}
        page = pages.setdefault(gpa & ~0xFFF, bytearray(0x1000))
        after, _ = naive_event(fixture["code_bits"], regs, bytes.fromhex(event["code"]),
                               gla & ~0xFFF, bytes(page))
        page[:] = after
    return len(fixture["events"])


if __name__ == "__main__":
    print(replay(sys.argv[1]))
