"""The in-memory guest memory: sparse pages, zero default, atomic compare-and-store."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ptemu.memory import GuestMemory, InMemoryGuestMemory


def test_unwritten_bytes_read_as_zero_and_it_is_a_guest_memory():
    memory = InMemoryGuestMemory()
    assert memory.read(0x1234, 16) == bytes(16)
    assert isinstance(memory, GuestMemory)


def test_reads_and_writes_across_a_page_boundary():
    memory = InMemoryGuestMemory([(0xFFC, bytes(range(1, 9)))])
    assert memory.read(0xFF8, 16) == bytes(4) + bytes(range(1, 9)) + bytes(4)
    assert memory.pages() == [0x0, 0x1000]


def test_compare_and_store_stores_only_on_a_match():
    memory = InMemoryGuestMemory([(0x2000, b"\x67" + bytes(7))])
    assert not memory.compare_and_store(0x2000, bytes(8), b"\x01" * 8)
    assert memory.read(0x2000, 8) == b"\x67" + bytes(7)
    assert memory.compare_and_store(0x2000, b"\x67" + bytes(7), b"\x65" + bytes(7))
    assert memory.read(0x2000, 1) == b"\x65"


@given(writes=st.lists(st.tuples(st.integers(0, 0x3000), st.binary(min_size=1, max_size=40)),
                       max_size=20))
def test_matches_a_flat_bytearray(writes):
    memory = InMemoryGuestMemory()
    model = bytearray(0x4000)
    for gpa, data in writes:
        memory.write(gpa, data)
        model[gpa:gpa + len(data)] = data
    assert memory.read(0, 0x4000) == bytes(model)
    assert memory == InMemoryGuestMemory([(0, bytes(model))])
