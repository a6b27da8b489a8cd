"""What a caller gets wrong raises `UsageError` at once and writes nothing:
addresses that are not guest addresses, values of the wrong type."""

from __future__ import annotations

from typing import Any

import pytest

from ptemu.errors import UsageError
from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.memory import InMemoryGuestMemory
from ptemu.vcpu import Vcpu

MOV = bytes.fromhex("48 89 07")  # mov [rdi], rax


def _event(**changes: Any) -> WriteEvent:
    fields: dict[str, Any] = {"gpa": 0x1008, "gla": 0xFFFF_8880_0000_1008,
                              "regs": {"rip": 0x1000, "rdi": 0xFFFF_8880_0000_1008, "rax": 0x67},
                              "code": MOV, "code_bits": 64}
    fields.update(changes)
    return WriteEvent(**fields)


@pytest.mark.parametrize("changes", [
    {"gpa": 1 << 64},                        # not a 64-bit address
    {"gpa": 1 << 52},                        # past MAXPHYADDR (52 by default)
    {"gpa": -8},
    {"gla": 1 << 64},
    {"gpa": "0x1008"},                       # a string, not an int
    {"gpa": True},
    {"code": "48 89 07"},                    # text, not bytes
    {"regs": {"rip": 0x1000, "rdi": "0x1008", "rax": 0x67}},
], ids=["gpa-2**64", "gpa-past-maxphyaddr", "gpa-negative", "gla-2**64", "gpa-str",
        "gpa-bool", "code-str", "register-str"])
def test_a_caller_error_raises_usage_error_and_changes_nothing(changes: dict[str, Any]) -> None:
    memory = InMemoryGuestMemory()
    handler = PtWriteHandler(memory, "4level")
    vcpu = Vcpu()
    with pytest.raises(UsageError):
        handler.handle_ept_write(vcpu, _event(**changes))
    assert memory.pages() == [] and handler.pending() == ()
    assert not vcpu.pt_emu_buffer.valid


def test_the_same_event_with_good_values_is_emulated() -> None:
    memory = InMemoryGuestMemory()
    result = PtWriteHandler(memory, "4level").handle_ept_write(Vcpu(), _event())
    assert result.status == "emulated"
    assert memory.read(0x1008, 8) == (0x67).to_bytes(8, "little")


@pytest.mark.parametrize("changes", [
    {"gla": -8},
    {"gla": float(0xFFFF_8880_0000_1008)},
    {"code": [0x48, 0x89, 0x07]},
    {"code_bits": "64"},
    {"regs": {"rip": 0x1000, "rdi": 0xFFFF_8880_0000_1008, "rax": 0x67 + 0.5}},
    {"regs": {"rip": 0x1000, "rdi": 0xFFFF_8880_0000_1008, "rax": None}},
    {"regs": {"rip": "0x1000", "rdi": 0xFFFF_8880_0000_1008, "rax": 0x67}},
    {"regs": {"rip": 0x1000, "rdi": 0xFFFF_8880_0000_1008, "rax": 0x67, "rbx": "1"}},
    {"regs": {"rip": 0x1000, "rdi": 0xFFFF_8880_0000_1008, "rax": 1 << 64}},
    {"regs": {"rip": 0x1000, "rdi": 0xFFFF_8880_0000_1008, "rax": -1}},
    {"regs": [("rip", 0x1000)]},
], ids=["gla-negative", "gla-float", "code-list", "code-bits-str", "register-float",
        "register-none", "rip-str", "unused-register-str", "register-2**64", "register-negative",
        "regs-not-a-mapping"])
def test_more_caller_errors_raise_usage_error_and_change_nothing(changes: dict[str, Any]) -> None:
    # Unicorn's path checks every register value (type and width); the fast
    # engine only the ones it reads (next test).
    memory = InMemoryGuestMemory([(0x1000, bytes(range(256)) * 16)])
    before = memory.copy()
    handler = PtWriteHandler(memory, "4level", engine="unicorn")
    vcpu = Vcpu()
    with pytest.raises(UsageError):
        handler.handle_ept_write(vcpu, _event(**changes))
    assert memory == before and handler.pending() == ()
    assert not vcpu.pt_emu_buffer.valid


@pytest.mark.parametrize("value", ["0x67", None, 0x67 + 0.5])
def test_the_fast_engine_refuses_a_value_it_reads_that_is_not_an_int(value: Any) -> None:
    memory = InMemoryGuestMemory([(0x1000, bytes(range(256)) * 16)])
    before = memory.copy()
    handler = PtWriteHandler(memory, "4level", engine="auto")
    vcpu = Vcpu()
    regs = {"rip": 0x1000, "rdi": 0xFFFF_8880_0000_1008, "rax": value}
    with pytest.raises(UsageError, match="wrong type"):
        handler.handle_ept_write(vcpu, _event(regs=regs))
    assert memory == before and handler.pending() == ()
    assert not vcpu.pt_emu_buffer.valid
