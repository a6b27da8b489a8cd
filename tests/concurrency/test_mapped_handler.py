"""The handler over a MappedGuestMemory: one hardware compare-and-exchange for a
write inside one aligned 16-byte block, entry by entry for a longer one.

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


def test_rep_stosq_over_four_entries_commits_through_mapped_memory(guest):
    buffer, handler = guest
    result = _deliver(handler, "f3 48 ab", 0x40, {"rcx": 4, "rax": HIGH})
    assert result.status is Status.EMULATED
    assert [_quad(buffer, 0x40 + 8 * index) for index in range(4)] == [HIGH] * 4


def test_an_8_byte_aligned_movups_commits_through_mapped_memory(guest):
    buffer, handler = guest
    result = _deliver(handler, "0f 11 07", 0x68, {"xmm0": HIGH << 64 | LOW})
    assert result.status is Status.EMULATED
    assert (_quad(buffer, 0x68), _quad(buffer, 0x70)) == (LOW, HIGH)


class _RacingMemory:
    """A MappedGuestMemory on which, just before the compare-and-store number
    `at` (counting from 0), another agent ORs `bits` into the entry at `gpa`
    with a hardware exchange (as the CPU sets Accessed/Dirty bits), or on
    which compare-and-store number `at` is simply refused (`bits` None)."""

    def __init__(self, inner: MappedGuestMemory, at: int, gpa: int, bits: int | None) -> None:
        self.inner, self.at, self.gpa, self.bits = inner, at, gpa, bits
        self.stores = 0

    def read(self, gpa: int, size: int) -> bytes:
        return self.inner.read(gpa, size)

    def write(self, gpa: int, data: bytes) -> None:
        self.inner.write(gpa, data)

    def compare_and_store(self, gpa: int, expected: bytes, new: bytes) -> bool:
        number = self.stores
        self.stores += 1
        if number == self.at:
            if self.bits is None:
                return False
            while True:
                now = self.inner.read(self.gpa, 8)
                raced = (int.from_bytes(now, "little") | self.bits).to_bytes(8, "little")
                if self.inner.compare_and_store(self.gpa, now, raced):
                    break
        return self.inner.compare_and_store(gpa, expected, new)


def _racing_handler(buffer: mmap.mmap, at: int, gpa_offset: int, bits: int | None):
    memory = MappedGuestMemory([(TABLE_GPA, buffer)])
    racing = _RacingMemory(memory, at, TABLE_GPA + gpa_offset, bits)
    return PtWriteHandler(racing, "4level", engine="unicorn"), memory


def test_rep_stosq_downwards_stops_after_the_iterations_whose_entries_committed():
    # DF=1: RDI goes down by 8 per iteration, so the guest writes 0x58, 0x50,
    # 0x48, 0x40. The third entry it writes (0x48) is refused: two iterations
    # are done, RCX = 4 - 2, RDI = start - 16, RIP stays (an interrupted REP).
    buffer = mmap.mmap(-1, mmap.PAGESIZE)
    handler, memory = _racing_handler(buffer, 2, 0, None)
    result = _deliver(handler, "f3 48 ab", 0x58,
                      {"rcx": 4, "rax": HIGH, "rflags": 0x2 | 1 << 10})
    assert result.status is Status.EMULATED, result.reason
    assert dict(result.regs) == {"rcx": 2, "rdi": TABLE_GLA + 0x58 - 16}
    assert [w.gpa for w in result.writes] == [TABLE_GPA + 0x58, TABLE_GPA + 0x50]
    assert [_quad(buffer, offset) for offset in (0x40, 0x48, 0x50, 0x58)] == [0, 0, HIGH, HIGH]
    memory.close()
    buffer.close()


def test_a_plain_store_retries_a_later_entry_and_keeps_what_raced_into_its_other_bytes():
    # movups [rdi] at 0x6c writes 0x6c..0x7b: the high half of entry 0x68, all of
    # 0x70, the low half of 0x78. Just before entry 0x78 commits, another agent
    # sets bit 63 (a byte the store does not write) there; the handler stores
    # the same bytes again on top of it, and reports the entry's old value as
    # it was then.
    buffer = mmap.mmap(-1, mmap.PAGESIZE)
    handler, memory = _racing_handler(buffer, 2, 0x78, 1 << 63)
    result = _deliver(handler, "0f 11 07", 0x6C, {"xmm0": HIGH << 64 | LOW})
    assert result.status is Status.EMULATED, result.reason
    data = (HIGH << 64 | LOW).to_bytes(16, "little")
    assert bytes(buffer[0x6C:0x7C]) == data
    assert bytes(buffer[0x7C:0x80]) == (1 << 31).to_bytes(4, "little")
    last = result.writes[-1]
    assert (last.gpa, last.offset, last.size, last.old) == (TABLE_GPA + 0x78, 0, 4, 1 << 63)
    memory.close()
    buffer.close()


def test_a_locked_read_modify_write_across_16_bytes_is_unsupported_and_changes_nothing(guest):
    buffer, handler = guest
    buffer[0x18:0x28] = bytes(range(1, 17))
    result = _deliver(handler, "f0 48 01 07", 0x1C, {"rax": 1})  # lock add [rdi], rax
    assert result.status is Status.UNSUPPORTED
    assert "16-byte boundary" in result.reason
    assert bytes(buffer[0x18:0x28]) == bytes(range(1, 17))
    assert not result.regs and handler.pending() == ()
