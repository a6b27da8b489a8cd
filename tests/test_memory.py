"""Guest memories: the in-memory one (sparse pages, zero default) and the mapped one
(host buffers at GPAs, hardware compare-and-store, refusing what is not atomic)."""

from __future__ import annotations

import mmap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ptemu.errors import UsageError
from ptemu.memory import GuestMemory, InMemoryGuestMemory, MappedGuestMemory


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


# -- MappedGuestMemory: guest memory over host buffers, hardware compare-and-store --

@pytest.fixture
def two_regions():
    low = mmap.mmap(-1, 0x2000)
    high = mmap.mmap(-1, 0x1000)
    memory = MappedGuestMemory([(0x10000, high), (0x4000, low)])
    yield memory, low, high
    memory.close()
    low.close()
    high.close()


def test_mapped_memory_reads_writes_and_reads_unbacked_bytes_as_zero(two_regions):
    memory, low, high = two_regions
    assert isinstance(memory, GuestMemory)
    assert memory.regions() == [(0x4000, 0x2000), (0x10000, 0x1000)]
    memory.write(0x4FFC, bytes(range(1, 9)))  # inside one buffer, across a page
    assert low[0xFFC:0x1004] == bytes(range(1, 9))
    high[0:4] = b"\xAA\xBB\xCC\xDD"
    assert memory.read(0xFFFE, 6) == bytes(2) + b"\xAA\xBB\xCC\xDD"
    assert memory.read(0x5FFE, 4) == bytes(4)  # past the low buffer's end
    with pytest.raises(UsageError, match="no mapped region"):
        memory.write(0x5FFE, bytes(4))


@pytest.mark.parametrize("width", [1, 2, 4, 8, 16])
def test_mapped_compare_and_store_of_each_aligned_width(two_regions, width):
    memory, low, _ = two_regions
    gpa = 0x4000 + 0x100
    low[0x100:0x110] = bytes(range(0x10, 0x20))
    held = bytes(range(0x10, 0x10 + width))
    new = b"\xEE" * width
    assert not memory.compare_and_store(gpa, held[:-1] + b"\x00", new)
    assert low[0x100:0x110] == bytes(range(0x10, 0x20))
    assert memory.compare_and_store(gpa, held, new)
    assert low[0x100:0x110] == new + bytes(range(0x10 + width, 0x20))


def test_a_span_inside_a_wider_block_is_stored_with_its_neighbours_kept(two_regions):
    memory, low, _ = two_regions
    low[0x200:0x210] = bytes(range(0x30, 0x40))
    # Bytes 0x205..0x20B sit inside the aligned 16-byte block at 0x200.
    assert not memory.compare_and_store(0x4205, b"\x00" * 7, b"\x01" * 7)
    assert memory.compare_and_store(0x4205, bytes(range(0x35, 0x3C)), b"\x01" * 7)
    assert low[0x200:0x210] == bytes(range(0x30, 0x35)) + b"\x01" * 7 + bytes(range(0x3C, 0x40))


@pytest.mark.parametrize(("gpa", "size", "message"), [
    (0x4208, 16, "crosses a 16-byte boundary"),
    (0x4200, 24, "crosses a 16-byte boundary"),
    (0x4000, 0x1000, "crosses a 16-byte boundary"),
    (0x8000, 8, "no mapped region"),
    (0x5FF8, 16, "no mapped region"),
])
def test_a_span_no_instruction_stores_atomically_is_refused(two_regions, gpa, size, message):
    memory, _, _ = two_regions
    with pytest.raises(UsageError, match=message):
        memory.compare_and_store(gpa, bytes(size), bytes(size))


def test_construction_refuses_overlap_readonly_and_misaligned_buffers():
    first = mmap.mmap(-1, 0x1000)
    second = mmap.mmap(-1, 0x1000)
    with pytest.raises(UsageError, match="overlap"):
        MappedGuestMemory([(0x1000, first), (0x1800, second)])
    with pytest.raises(UsageError, match="writable"):
        MappedGuestMemory([(0x1000, bytes(0x1000))])
    with pytest.raises(UsageError, match="modulo 16"):
        MappedGuestMemory([(0x1000, memoryview(first)[8:])])
    with pytest.raises(UsageError, match="non-negative"):
        MappedGuestMemory([(-0x1000, first)])
    first.close()
    second.close()


def test_an_unpinned_buffer_that_was_closed_is_a_usage_error():
    buffer = mmap.mmap(-1, 0x1000)
    memory = MappedGuestMemory([(0x1000, buffer)], pin=False)
    assert memory.compare_and_store(0x1008, bytes(8), b"\x01" * 8)
    buffer.close()  # possible only because the memory did not pin it
    with pytest.raises(UsageError, match="closed"):
        memory.read(0x1008, 8)
    with pytest.raises(UsageError, match="closed"):
        memory.compare_and_store(0x1008, b"\x01" * 8, bytes(8))


def test_a_pinned_buffer_cannot_close_until_the_memory_does():
    buffer = mmap.mmap(-1, 0x1000)
    memory = MappedGuestMemory([(0x1000, buffer)])
    with pytest.raises(BufferError):
        buffer.close()
    memory.close()
    buffer.close()
