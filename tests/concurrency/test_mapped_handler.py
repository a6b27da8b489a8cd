"""The handler over a MappedGuestMemory: what commits atomically, and what the
handler must still learn (committing a multi-entry write entry by entry).

Expected memory comes from the instruction's definition (SDM): MOVUPS stores
XMM0's 16 bytes, low quadword first; CMPXCHG16B stores RCX:RBX when RDX:RAX
equals the destination; REP STOSQ stores RAX RCX times, RDI upwards.
"""

from __future__ import annotations

import mmap

import pytest

from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.memory import MappedGuestMemory
from ptemu.status import Status
from ptemu.vcpu import Vcpu

TABLE_GPA = 0x7000
TABLE_GLA = 0xFFFF_8880_0000_7000
RIP = 0x40_1000
LOW = 0x0000_0000_0012_3067
HIGH = 0x8000_0000_0045_6067

PER_ENTRY_COMMIT = (
    "handler gap: it commits a write over several entries with one compare_and_store of "
    "the whole window, and MappedGuestMemory refuses a span across a 16-byte boundary "
    "(no instruction stores it atomically) with UsageError, which escapes the handler; "
    "the handler must commit entry by entry")


@pytest.fixture(params=["auto", "unicorn"])
def guest(request):
    buffer = mmap.mmap(-1, mmap.PAGESIZE)
    memory = MappedGuestMemory([(TABLE_GPA, buffer)])
    handler = PtWriteHandler(memory, "4level", engine=request.param)
    yield buffer, handler
    memory.close()
    buffer.close()


def _deliver(handler: PtWriteHandler, code: str, offset: int, regs: dict[str, int]):
    event = WriteEvent(gpa=TABLE_GPA + offset, gla=TABLE_GLA + offset,
                       regs={"rip": RIP, "rdi": TABLE_GLA + offset, **regs},
                       code=bytes.fromhex(code), code_bits=64)
    return handler.handle_ept_write(Vcpu(), event)


def _quad(buffer: mmap.mmap, offset: int) -> int:
    return int.from_bytes(buffer[offset:offset + 8], "little")


def test_a_16_byte_aligned_movups_commits_both_entries_in_one_cmpxchg16b(guest):
    buffer, handler = guest
    result = _deliver(handler, "0f 11 07", 0x20, {"xmm0": HIGH << 64 | LOW})
    assert result.status is Status.EMULATED
    assert (_quad(buffer, 0x20), _quad(buffer, 0x28)) == (LOW, HIGH)


def test_cmpxchg16b_commits_when_rdx_rax_match(guest):
    buffer, handler = guest
    buffer[0x30:0x40] = (0x1067).to_bytes(8, "little") + (0x2067).to_bytes(8, "little")
    result = _deliver(handler, "f0 48 0f c7 0f", 0x30,
                      {"rax": 0x1067, "rdx": 0x2067, "rbx": LOW, "rcx": HIGH})
    assert result.status is Status.EMULATED
    assert (_quad(buffer, 0x30), _quad(buffer, 0x38)) == (LOW, HIGH)


@pytest.mark.xfail(strict=True, raises=ValueError, reason=PER_ENTRY_COMMIT)
def test_rep_stosq_over_four_entries_commits_through_mapped_memory(guest):
    buffer, handler = guest
    result = _deliver(handler, "f3 48 ab", 0x40, {"rcx": 4, "rax": HIGH})
    assert result.status is Status.EMULATED
    assert [_quad(buffer, 0x40 + 8 * index) for index in range(4)] == [HIGH] * 4


@pytest.mark.xfail(strict=True, raises=ValueError, reason=PER_ENTRY_COMMIT)
def test_an_8_byte_aligned_movups_commits_through_mapped_memory(guest):
    buffer, handler = guest
    result = _deliver(handler, "0f 11 07", 0x68, {"xmm0": HIGH << 64 | LOW})
    assert result.status is Status.EMULATED
    assert (_quad(buffer, 0x68), _quad(buffer, 0x70)) == (LOW, HIGH)
