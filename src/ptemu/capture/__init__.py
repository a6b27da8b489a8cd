"""``ptemu capture``: run guest code with paging on and record its page-table writes.

The capture is the *oracle* ptemu's handler is tested against, so it is a
second, deliberately independent user of Unicorn: it never calls ptemu's
decoder, emulator or handler. It builds a whole guest from a small
description (its own page tables for the paging mode, a GDT, the code at its
real linear addresses, the page-table pages to monitor at their direct-map
addresses), runs the code in Unicorn with CR0.PG on, and records every store
that lands on a monitored page as a fixture event whose expectation is what
the CPU actually stored and the registers it actually left. The only ptemu
logic it uses is `ptemu.writestate` (to fill ``entries`` under the fixture's
policy) and the shared vocabulary (`values`, `registers`, `errors`, `status`).

Layers: `description` (validated input records) -> `layout` (pages, tables,
GDT; pure) -> `machine` (the only Unicorn import here) -> `events` (events,
coalescing, write states) -> `fixture` (JSON).

>>> from ptemu.capture import capture_description            # doctest: +SKIP
>>> document = capture_description(json.load(open("snippet.json")))  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from ptemu.capture.description import CaptureSpec, load_description, parse_description
from ptemu.capture.events import CapturedEvent, build_events
from ptemu.capture.fixture import dump_fixture, fixture_document, oracle_text, write_fixture
from ptemu.capture.layout import build_layout
from ptemu.capture.machine import UNICORN_VERSION, run_machine


def capture_events(spec: CaptureSpec) -> tuple[CapturedEvent, ...]:
    """Run `spec` and return its events with expectations."""
    layout = build_layout(spec)
    return build_events(spec, layout, run_machine(spec, layout))


def capture(spec: CaptureSpec) -> dict[str, object]:
    """Run `spec` and return the fixture document (a JSON-ready dict)."""
    layout = build_layout(spec)
    events = build_events(spec, layout, run_machine(spec, layout))
    return fixture_document(spec, events,
                            layout.pages if spec.include_page_tables else None)


def capture_description(document: object, *, base_dir: Path | None = None) -> dict[str, object]:
    """Validate a description already parsed from JSON and capture it."""
    return capture(parse_description(document, base_dir=base_dir))


def capture_file(path: str | Path) -> dict[str, object]:
    """Load a description file and capture it."""
    return capture(load_description(path))


__all__ = [
    "UNICORN_VERSION",
    "CaptureSpec",
    "CapturedEvent",
    "capture",
    "capture_description",
    "capture_events",
    "capture_file",
    "dump_fixture",
    "fixture_document",
    "load_description",
    "oracle_text",
    "parse_description",
    "write_fixture",
]
