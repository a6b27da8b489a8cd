"""Grow one capture description (docs/capture.md): the monitored page-table
page, code blobs, calls, segments and data pages; and the `Trace` it becomes."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ptemu.capture import capture_description as _capture_description

from .entries import ENTRY_SIZE, TEXT, direct, h

Json = dict[str, Any]

def capture_description(description: Json) -> Json:
    """`ptemu.capture.capture_description`, typed for this script's JSON dicts."""
    return dict(_capture_description(description))

@dataclass
class Trace:
    """One description to capture (or a hand-written fixture)."""

    name: str
    description: Json | None = None
    fixture: Json | None = None
    finish: Callable[[Json], Json] | None = None
    """Applied to the captured fixture (a check and a documented rewrite, e.g.
    `own_hierarchy`'s CR3); None for the plain capture."""

@dataclass
class Guest:
    """Helper that grows one description: a page-table page and code blobs."""

    name: str
    paging: str
    code_bits: int
    source: str
    table_gpa: int
    table_gla: int | None = None
    policy: str | None = None
    code: list[Json] = field(default_factory=list)
    calls: list[Json] = field(default_factory=list)
    entries: dict[int, int] = field(default_factory=dict)
    segments: dict[str, int] = field(default_factory=dict)
    extra_pages: list[Json] = field(default_factory=list)
    data_pages: list[Json] = field(default_factory=list)
    code_base: int | None = None
    """Linear address of the first snippet (default: the kernel text)."""
    include_page_tables: bool = True
    """Ship the capture's own paging structures in the fixture (every corpus
    trace does: ``ptemu walk`` and a MOVS source need them)."""

    def __post_init__(self) -> None:
        if self.table_gla is None:
            self.table_gla = direct(self.paging, self.table_gpa)
        self._next_code = self.code_base or TEXT[self.paging] + 0x1000

    @property
    def entry_size(self) -> int:
        return ENTRY_SIZE[self.paging]

    def entry(self, index: int) -> int:
        """Linear address of entry `index` of the monitored page."""
        assert self.table_gla is not None
        return self.table_gla + index * self.entry_size

    def entry_gpa(self, index: int) -> int:
        return self.table_gpa + index * self.entry_size

    def blob(self, label: str, code: str, gla: int | None = None) -> str:
        if gla is None:
            gla = self._next_code
            self._next_code += 0x40
        self.code.append({"label": label, "gla": h(gla), "bytes": code})
        return label

    def call(self, entry: str, memory: list[Json] | None = None, twice: list[int] | None = None,
             stack: list[int] | None = None, **regs: int) -> None:
        item: Json = {"entry": entry, "regs": {k: h(v) for k, v in regs.items()}}
        if memory:
            item["memory"] = memory
        if twice:
            item["deliver_twice"] = twice
        if stack:
            item["stack"] = [h(v) for v in stack]
        self.calls.append(item)

    def description(self) -> Json:
        out: Json = {
            "name": self.name,
            "source": self.source,
            "paging": self.paging,
            "code_bits": self.code_bits,
            "code": self.code,
            "page_tables": [{"gpa": h(self.table_gpa), "gla": h(self.table_gla or 0),
                             "entries": {str(i): h(v) for i, v in sorted(self.entries.items())}},
                            *self.extra_pages],
            "calls": self.calls,
        }
        if self.policy:
            out["policy"] = self.policy
        if self.segments:
            out["segments"] = {k: h(v) for k, v in self.segments.items()}
        if self.data_pages:
            out["data_pages"] = self.data_pages
        if self.include_page_tables:
            out["include_page_tables"] = True
        return out

    def trace(self) -> Trace:
        return Trace(self.name, description=self.description())

SYNTHETIC_SOURCE = ("synthetic snippet written for the corpus (tools/corpus/build_corpus.py), "
                    "captured with ptemu capture")

def guest(name: str, paging: str, code_bits: int, rng: random.Random, what: str,
          **kwargs: Any) -> Guest:
    """A guest whose monitored page is a random page below 512 MiB, in the direct map."""
    gpa = kwargs.pop("table_gpa", None) or rng.randrange(0x0100_0000, 0x2000_0000, 0x1000)
    return Guest(name=f"{paging}/{name}", paging=paging, code_bits=code_bits,
                 source=f"{SYNTHETIC_SOURCE}: {what}", table_gpa=gpa, **kwargs)

def patch(gpa: int, value: int, size: int) -> Json:
    return {"gpa": h(gpa), "data": value.to_bytes(size, "little").hex()}
