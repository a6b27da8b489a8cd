"""Racer tests of MappedGuestMemory.compare_and_store against hardware A/D flips.

A racer thread toggles bits 5 and 6 (Accessed, Dirty) of shared 8-byte entries
with the hardware compare-and-exchange, as the CPU's page walker does, while
the main thread commits its own updates with `compare_and_store` in a
read-modify-compare-and-store loop (the handler's retry). The two own disjoint
bits; at the end every entry must hold exactly the racer's last A/D bits and
the writer's count, with no other bit set: nothing lost, nothing torn.

The control test runs the same race with a plain read-compare-write (what
`KvmGuestMemory` did before) and must see lost racer updates, which shows the
check can fail.
"""

from __future__ import annotations

import mmap
import time

import pytest
from racing import RACER_BITS, Racer, fast_switching

from ptemu.memory import MappedGuestMemory

BASE_GPA = 0x7000
ENTRIES = 8
COMMITS = 12_000
COUNTER_SHIFT = 12
COUNTER_MASK = (1 << 32) - 1
HIGH_SHIFT = 16  # the 2-byte field the narrow writer owns: bits 16..31


@pytest.fixture
def shared():
    buffer = mmap.mmap(-1, mmap.PAGESIZE)
    memory = MappedGuestMemory([(BASE_GPA, buffer)])
    yield buffer, memory
    memory.close()
    buffer.close()


def _addresses(memory: MappedGuestMemory, buffer: mmap.mmap) -> list[int]:
    import ctypes
    anchor = (ctypes.c_char * len(buffer)).from_buffer(buffer)
    base = ctypes.addressof(anchor)
    del anchor
    return [base + 8 * index for index in range(ENTRIES)]


def _steps(raced, seconds: float = 30.0):
    """At least COMMITS steps, and on until `raced()` (the racer got its
    turns), within `seconds`: a busy machine may interleave threads less."""
    deadline = time.monotonic() + seconds
    step = 0
    while step < COMMITS or (not raced() and time.monotonic() < deadline):
        yield step
        step += 1


def _entry(buffer: mmap.mmap, index: int) -> int:
    return int.from_bytes(buffer[8 * index:8 * index + 8], "little")


def test_every_racer_flip_and_every_commit_survives_eight_byte_commits(shared):
    buffer, memory = shared
    counts = [0] * ENTRIES
    failed = 0
    racer = Racer(_addresses(memory, buffer), seed=7)
    with fast_switching():
        racer.start()
        for step in _steps(lambda: failed > 0 and racer.updates > 1000):  # noqa: B023 - the running count, on purpose
            index = step * 5 % ENTRIES
            gpa = BASE_GPA + 8 * index
            while True:
                current = memory.read(gpa, 8)
                value = int.from_bytes(current, "little") + (1 << COUNTER_SHIFT)
                if memory.compare_and_store(gpa, current, value.to_bytes(8, "little")):
                    break
                failed += 1
            counts[index] += 1
        racer.stop()
    for index in range(ENTRIES):
        value = _entry(buffer, index)
        assert value & RACER_BITS == racer.bits[index], f"entry {index}: a racer flip was lost"
        assert value >> COUNTER_SHIFT == counts[index], f"entry {index}: a commit was lost"
        assert value & ~RACER_BITS & ((1 << COUNTER_SHIFT) - 1) == 0, f"entry {index}: torn"
    assert racer.updates > 1000
    assert failed > 0, "no commit ever met a racer flip: the test did not race"


def test_sixteen_byte_commits_are_atomic_against_eight_byte_flips(shared):
    buffer, memory = shared
    counts = [0] * ENTRIES
    failed = 0
    racer = Racer(_addresses(memory, buffer), seed=11)
    with fast_switching():
        racer.start()
        for step in _steps(lambda: failed > 0 and racer.updates > 1000):  # noqa: B023 - the running count, on purpose
            pair = step % (ENTRIES // 2)
            gpa = BASE_GPA + 16 * pair
            while True:
                current = memory.read(gpa, 16)
                low = int.from_bytes(current[:8], "little") + (1 << COUNTER_SHIFT)
                high = int.from_bytes(current[8:], "little") + (1 << COUNTER_SHIFT)
                new = low.to_bytes(8, "little") + high.to_bytes(8, "little")
                if memory.compare_and_store(gpa, current, new):
                    break
                failed += 1
            counts[2 * pair] += 1
            counts[2 * pair + 1] += 1
        racer.stop()
    for index in range(ENTRIES):
        value = _entry(buffer, index)
        assert value & RACER_BITS == racer.bits[index], f"entry {index}: a racer flip was lost"
        assert value >> COUNTER_SHIFT == counts[index], f"entry {index}: a commit was lost"
    assert failed > 0, "no commit ever met a racer flip: the test did not race"


def test_a_two_byte_commit_inside_an_entry_keeps_the_racers_bits(shared):
    """Bytes 2..3 of each entry are exchanged as part of their aligned 4-byte
    block, whose byte 0 the racer keeps changing."""
    buffer, memory = shared
    counts = [0] * ENTRIES
    racer = Racer(_addresses(memory, buffer), seed=13)
    with fast_switching():
        racer.start()
        for step in range(COMMITS):
            index = step * 3 % ENTRIES
            gpa = BASE_GPA + 8 * index + 2
            while True:
                current = memory.read(gpa, 2)
                value = (int.from_bytes(current, "little") + 1) & 0xFFFF
                if memory.compare_and_store(gpa, current, value.to_bytes(2, "little")):
                    break
            counts[index] += 1
        racer.stop()
    for index in range(ENTRIES):
        value = _entry(buffer, index)
        assert value & RACER_BITS == racer.bits[index], f"entry {index}: a racer flip was lost"
        assert value >> HIGH_SHIFT == counts[index] & 0xFFFF, f"entry {index}: a commit was lost"


class _ReadThenWrite:
    """The compare-and-store `KvmGuestMemory` had before: read, compare, write."""

    def __init__(self, buffer: mmap.mmap) -> None:
        self.buffer = buffer

    def read(self, offset: int, size: int) -> bytes:
        return self.buffer[offset:offset + size]

    def write(self, offset: int, data: bytes) -> None:
        self.buffer[offset:offset + len(data)] = data

    def compare_and_store(self, offset: int, expected: bytes, new: bytes) -> bool:
        if self.read(offset, len(expected)) != expected:
            return False
        self.write(offset, new)
        return True


def test_control_a_plain_compare_then_store_loses_racer_flips(shared):
    buffer, memory = shared
    deadline = time.monotonic() + 8
    racer = Racer(_addresses(memory, buffer), seed=17)
    plain = _ReadThenWrite(buffer)
    lost = 0
    with fast_switching():
        racer.start()
        while not lost and time.monotonic() < deadline:
            for step in range(2000):
                index = step % ENTRIES
                while True:
                    current = buffer[8 * index:8 * index + 8]
                    value = int.from_bytes(current, "little") + (1 << COUNTER_SHIFT)
                    if plain.compare_and_store(8 * index, current, value.to_bytes(8, "little")):
                        break
            racer.stop()
            lost = sum(_entry(buffer, index) & RACER_BITS != racer.bits[index]
                       for index in range(ENTRIES))
            if not lost:
                racer = Racer(_addresses(memory, buffer), seed=17)
                racer.bits = [_entry(buffer, index) & RACER_BITS for index in range(ENTRIES)]
                racer.start()
    assert lost, "the plain compare-then-store lost nothing: this race cannot tell atomic apart"
