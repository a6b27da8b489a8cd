"""Shared builders for the fixture-format tests: a valid document to mutate."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

Document = dict[str, Any]

# A PAE guest writes the high half of the PTE at GPA 0x3ff0 with
# `mov [eax+4], ecx` (89 48 04): 4 bytes at offset 4 of an 8-byte entry.
VALID: Document = {
    "ptemu_fixture": 1,
    "name": "test/pae-high-half",
    "source": "hand-written for the loader tests",
    "paging": "pae",
    "code_bits": 32,
    "memory": [{"gpa": "0x3000", "data": "00 00 00 00"}],
    "events": [
        {
            "gpa": "0x3ff4",
            "gla": "0xc0003ff4",
            "regs": {"rip": "0xc1001234", "rax": "0xc0003ff0", "rcx": "0x1"},
            "code": "89 48 04",
            "expect": {
                "status": "emulated",
                "writes": [
                    {"gpa": "0x3ff0", "offset": 4, "size": 4, "value": "0x1", "old": "0x0"}
                ],
                "entries": [{"gpa": "0x3ff0", "state": "partial"}],
                "regs": {"rip": "0xc1001237"},
            },
        }
    ],
}


@pytest.fixture
def document() -> Document:
    """A fresh deep copy of a valid fixture document, free to mutate."""
    return copy.deepcopy(VALID)


@pytest.fixture
def write_json(tmp_path: Path) -> Callable[[object, str], Path]:
    """Write a document as JSON into tmp_path and return the file's path."""

    def write(doc: object, name: str = "fixture.json") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc), encoding="utf-8")
        return path

    return write
