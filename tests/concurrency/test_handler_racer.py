"""The real PtWriteHandler committing through a MappedGuestMemory while a racer
thread flips Accessed/Dirty bits of the same entries with the hardware CAS.

One handler thread delivers `lock or`, `lock add` and `mov` events on shared
entries; each owns disjoint bits of an entry, the racer owns bits 5 and 6:

- byte 0: the racer's A/D bits (nothing else);
- byte 1: ``mov byte [rdi+1], al``, the last value stored wins;
- bits 16..31: ``lock or qword [rdi], rax``, the OR of every mask;
- bits 32..63: ``lock add dword [rdi+4], eax``, the sum of every addend.

A refused (`CONTENDED`) event changed nothing and is delivered again, as the
guest would re-execute it. At the end every racer flip and every emulated
event must be in memory. A counting wrapper checks the retry bound: an event
is `CONTENDED` exactly when all of its `max_commit_attempts` compare-and-stores
failed, and `EMULATED` after fewer failures.
"""

from __future__ import annotations

import ctypes
import mmap
import random
import time

import pytest
from racing import Racer, fast_switching

from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.memory import MappedGuestMemory
from ptemu.status import Status
from ptemu.vcpu import Vcpu

TABLE_GPA = 0x7000
TABLE_GLA = 0xFFFF_8880_0000_7000
ENTRIES = 8
RIP = 0x40_1000
LOCK_OR = bytes.fromhex("f0480907")    # lock or qword ptr [rdi], rax
LOCK_ADD = bytes.fromhex("f0014704")   # lock add dword ptr [rdi + 4], eax
MOV_BYTE = bytes.fromhex("884701")     # mov byte ptr [rdi + 1], al


class CountingMemory:
    """Passes every call to `inner`; counts failed compare-and-stores."""

    def __init__(self, inner: MappedGuestMemory) -> None:
        self.inner = inner
        self.failures = 0

    def read(self, gpa: int, size: int) -> bytes:
        return self.inner.read(gpa, size)

    def write(self, gpa: int, data: bytes) -> None:
        self.inner.write(gpa, data)

    def compare_and_store(self, gpa: int, expected: bytes, new: bytes) -> bool:
        stored = self.inner.compare_and_store(gpa, expected, new)
        if not stored:
            self.failures += 1
        return stored


RACE_SECONDS = 30.0
"""How long a race may go on past its events waiting for the racer's turns."""


def _race(engine: str, events: int, max_commit_attempts: int, seed: int):
    buffer = mmap.mmap(-1, mmap.PAGESIZE)
    mapped = MappedGuestMemory([(TABLE_GPA, buffer)])
    memory = CountingMemory(mapped)
    handler = PtWriteHandler(memory, "4level", engine=engine,
                             max_commit_attempts=max_commit_attempts)
    anchor = (ctypes.c_char * mmap.PAGESIZE).from_buffer(buffer)
    base = ctypes.addressof(anchor)
    del anchor
    racer = Racer([base + 8 * index for index in range(ENTRIES)], seed=seed)
    vcpu = Vcpu()
    generator = random.Random(seed)
    last_byte = [0] * ENTRIES
    or_bits = [0] * ENTRIES
    sums = [0] * ENTRIES
    statuses = {Status.EMULATED: 0, Status.CONTENDED: 0}
    restarts = 0
    ran = 0
    with fast_switching():
        racer.start()
        try:
            # At least `events`, and on until the race really happened (a busy
            # machine may give the racer few turns), within RACE_SECONDS.
            deadline = time.monotonic() + RACE_SECONDS
            while ran < events or ((racer.updates <= 500 or restarts == 0)
                                   and time.monotonic() < deadline):
                ran += 1
                index = generator.randrange(ENTRIES)
                kind = generator.randrange(3)
                value = generator.getrandbits(32)
                entry_gla = TABLE_GLA + 8 * index
                if kind == 0:
                    code, offset, rax = LOCK_OR, 0, 1 << (16 + value % 16)
                elif kind == 1:
                    code, offset, rax = LOCK_ADD, 4, value
                else:
                    code, offset, rax = MOV_BYTE, 1, value & 0xFF
                event = WriteEvent(gpa=TABLE_GPA + 8 * index + offset, gla=entry_gla + offset,
                                   regs={"rip": RIP, "rdi": entry_gla, "rax": rax},
                                   code=code, code_bits=64)
                while True:  # a refused event is re-executed by the guest
                    vcpu.begin_exit()
                    memory.failures = 0
                    result = handler.handle_ept_write(vcpu, event)
                    statuses[result.status] += 1
                    restarts += memory.failures
                    if result.status is Status.CONTENDED:
                        assert memory.failures == max_commit_attempts, result.reason
                        assert not vcpu.pt_emu_buffer.valid
                        continue
                    assert result.status is Status.EMULATED, result.reason
                    assert memory.failures < max_commit_attempts
                    break
                if kind == 0:
                    or_bits[index] |= rax
                elif kind == 1:
                    sums[index] = (sums[index] + rax) & 0xFFFF_FFFF
                else:
                    last_byte[index] = rax
        finally:
            racer.stop()
    for index in range(ENTRIES):
        entry = int.from_bytes(buffer[8 * index:8 * index + 8], "little")
        assert entry & 0xFF == racer.bits[index], f"entry {index}: a racer flip was lost"
        assert entry >> 8 & 0xFF == last_byte[index], f"entry {index}: a mov was lost"
        assert entry >> 16 & 0xFFFF == or_bits[index] >> 16, f"entry {index}: a lock or was lost"
        assert entry >> 32 == sums[index], f"entry {index}: a lock add was lost"
    mapped.close()
    buffer.close()
    return statuses, racer.updates, restarts, ran


@pytest.mark.parametrize(("engine", "events"), [("auto", 6000), ("unicorn", 1500)])
def test_every_racer_flip_and_every_event_survives_with_the_default_bound(engine, events):
    statuses, racer_updates, restarts, ran = _race(engine, events, max_commit_attempts=16,
                                                   seed=3)
    assert statuses[Status.EMULATED] == ran >= events
    assert racer_updates > 500
    assert restarts > 0, "no commit ever met a racer flip: the test did not race"


def test_a_bound_of_one_attempt_gives_contended_events_that_change_nothing():
    contended = 0
    for seed in range(5, 9):  # a busy machine may interleave less: up to four rounds
        statuses, racer_updates, _, ran = _race("auto", 6000, max_commit_attempts=1, seed=seed)
        assert statuses[Status.EMULATED] == ran >= 6000
        assert racer_updates > 500
        contended += statuses[Status.CONTENDED]
        if contended:
            break
    assert contended > 0, "the racer never beat a single attempt"
