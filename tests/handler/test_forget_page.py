"""`PtWriteHandler.forget_page`: a page that stops being watched loses its write state.

Expected values are worked out by hand from semantics section 3: a plain
1-byte store leaves an 8-byte entry partial; the next whole store completes it
with ``old`` = the value before the first pending write, unless the state was
forgotten, when ``old`` is the entry as memory holds it.
"""

from __future__ import annotations

import pytest

from ptemu.errors import UsageError
from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.memory import InMemoryGuestMemory
from ptemu.status import EntryState
from ptemu.vcpu import Vcpu

PAGE = 0x3000
ENTRY = PAGE + 0x18
GLA = 0xFFFF_8880_0000_0000 + ENTRY
MOV_BYTE = b"\xc6\x07\x65"          # mov byte [rdi], 0x65
MOV_QWORD = b"\x48\x89\x07"         # mov [rdi], rax


def _event(code: bytes, **regs: int) -> WriteEvent:
    return WriteEvent(gpa=ENTRY, gla=GLA, regs={"rip": 0x40_1000, "rdi": GLA, **regs},
                      code=code, code_bits=64)


def _handler() -> tuple[PtWriteHandler, InMemoryGuestMemory, Vcpu]:
    memory = InMemoryGuestMemory()
    memory.write(ENTRY, (0x10067).to_bytes(8, "little"))
    return PtWriteHandler(memory, "4level"), memory, Vcpu()


def _write(handler: PtWriteHandler, vcpu: Vcpu, event: WriteEvent):  # type: ignore[no-untyped-def]
    vcpu.begin_exit()
    return handler.handle_ept_write(vcpu, event)


def test_a_forgotten_page_reports_old_from_memory_not_from_stale_state():
    handler, memory, vcpu = _handler()
    first = _write(handler, vcpu, _event(MOV_BYTE))
    assert first.entries[0].state is EntryState.PARTIAL
    assert handler.forget_page(PAGE) == (ENTRY,)
    assert handler.pending() == ()
    # While unwatched the guest rewrites the entry (no event reaches the handler).
    memory.write(ENTRY, (0x55555001).to_bytes(8, "little"))
    done = _write(handler, vcpu, _event(MOV_QWORD, rax=0x20067))
    entry = done.entries[0]
    assert entry.state is EntryState.COMPLETE
    assert (entry.old, entry.new) == (0x55555001, 0x20067)


def test_without_forgetting_the_pending_value_is_what_completes():
    handler, _memory, vcpu = _handler()
    _write(handler, vcpu, _event(MOV_BYTE))
    done = _write(handler, vcpu, _event(MOV_QWORD, rax=0x20067))
    assert (done.entries[0].old, done.entries[0].new) == (0x10067, 0x20067)


def test_forget_page_leaves_other_pages_and_refuses_unaligned_pages():
    handler, _memory, vcpu = _handler()
    _write(handler, vcpu, _event(MOV_BYTE))
    assert handler.forget_page(PAGE + 0x1000) == ()
    assert handler.pending() == (ENTRY,)
    for bad in (PAGE + 8, -0x1000, True, "0x3000"):
        with pytest.raises(UsageError, match="page-aligned"):
            handler.forget_page(bad)  # type: ignore[arg-type]
