"""Helpers for handler tests: build a guest, run one event, read memory back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pytest

from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.memory import InMemoryGuestMemory
from ptemu.results import EventResult
from ptemu.vcpu import Vcpu


@dataclass
class Guest:
    """One guest: its memory, a handler and a vCPU."""

    memory: InMemoryGuestMemory
    handler: PtWriteHandler
    vcpu: Vcpu

    def write(self, code: str, regs: Mapping[str, int], gla: int, gpa: int,
              code_bits: int = 64) -> EventResult:
        """Deliver one EPT write event in a fresh exit."""
        self.vcpu.begin_exit()
        event = WriteEvent(gpa=gpa, gla=gla, regs=dict(regs),
                           code=bytes.fromhex(code.replace(" ", "")), code_bits=code_bits)
        return self.handler.handle_ept_write(self.vcpu, event)

    def entry(self, gpa: int, size: int = 8) -> int:
        return int.from_bytes(self.memory.read(gpa, size), "little")

    def set_entry(self, gpa: int, value: int, size: int = 8) -> None:
        self.memory.write(gpa, value.to_bytes(size, "little"))


@pytest.fixture(params=["unicorn", "auto"])
def make_guest(request):
    """Builds guests whose handler uses each engine in turn: every handler test
    holds for Unicorn alone and for the fast engine with Unicorn behind it."""
    def make(paging: str = "4level", **options: object) -> Guest:
        memory = InMemoryGuestMemory()
        options.setdefault("engine", request.param)
        return Guest(memory, PtWriteHandler(memory, paging, **options), Vcpu())  # type: ignore[arg-type]
    return make
