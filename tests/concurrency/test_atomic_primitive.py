"""The hardware compare-and-exchange (ptemu.atomic) against hand-computed results.

Every width, success and failure, at offset 0 and at an aligned offset inside
a page; expected values differ from memory in one byte only (the last, or the
high half of a 16-byte block) so a primitive that compares too few bytes fails.
"""

from __future__ import annotations

import mmap
import platform

import pytest

from ptemu.atomic import ATOMIC_WIDTHS, AtomicBuffer, Libatomic, atomic_block, libatomic
from ptemu.errors import UsageError

PATTERN = bytes((0x80 | index) & 0xFF for index in range(64))  # top bits set: unsigned


@pytest.fixture
def page():
    buffer = mmap.mmap(-1, mmap.PAGESIZE)
    buffer[0x40:0x40 + len(PATTERN)] = PATTERN
    atomic = AtomicBuffer(buffer)
    yield buffer, atomic
    atomic.release()
    buffer.close()


@pytest.mark.parametrize("width", ATOMIC_WIDTHS)
@pytest.mark.parametrize("offset", [0x40, 0x60])
def test_success_stores_desired_and_touches_nothing_else(page, width, offset):
    buffer, atomic = page
    before = bytes(buffer)
    expected = before[offset:offset + width]
    desired = bytes(0xFF - byte for byte in expected)  # every bit flipped
    assert atomic.compare_exchange(offset, expected, desired) is None
    after = bytes(buffer)
    assert after[offset:offset + width] == desired
    assert after[:offset] == before[:offset]
    assert after[offset + width:] == before[offset + width:]


@pytest.mark.parametrize("width", ATOMIC_WIDTHS)
def test_failure_returns_what_memory_holds_and_stores_nothing(page, width):
    buffer, atomic = page
    offset = 0x40
    before = bytes(buffer)
    held = PATTERN[:width]
    wrong_last = held[:-1] + bytes([held[-1] ^ 0x01])
    assert atomic.compare_exchange(offset, wrong_last, bytes(width)) == held
    assert bytes(buffer) == before


def test_sixteen_bytes_compare_both_halves(page):
    buffer, atomic = page
    held = PATTERN[:16]
    high_differs = held[:8] + bytes(8)
    low_differs = bytes(8) + held[8:]
    assert atomic.compare_exchange(0x40, high_differs, bytes(16)) == held
    assert atomic.compare_exchange(0x40, low_differs, bytes(16)) == held
    assert buffer[0x40:0x50] == held
    desired = bytes(range(0xF0, 0x100))
    assert atomic.compare_exchange(0x40, held, desired) is None
    assert buffer[0x40:0x50] == desired


def test_a_failed_exchange_reports_the_value_a_retry_succeeds_with(page):
    buffer, atomic = page
    found = atomic.compare_exchange(0x48, bytes(8), b"\x11" * 8)
    assert found == PATTERN[8:16]
    assert atomic.compare_exchange(0x48, found, b"\x11" * 8) is None
    assert buffer[0x48:0x50] == b"\x11" * 8


@pytest.mark.parametrize(("offset", "size", "width"), [
    (0x12, 2, 2), (0x11, 2, 4), (0x13, 2, 8), (0x10, 1, 1), (0x11, 3, 4), (0x14, 4, 4),
    (0x16, 4, 16),
    (0x18, 8, 8), (0x1C, 8, None), (0x10, 16, 16), (0x14, 8, 16), (0x18, 16, None),
    (0x0, 17, None), (0x5, 0, None),
])
def test_atomic_block_is_the_smallest_aligned_width_holding_the_span(offset, size, width):
    assert atomic_block(offset, size) == width


@pytest.mark.parametrize(("offset", "expected", "message"), [
    (0x41, bytes(8), "not naturally aligned"),
    (0x48, bytes(16), "not naturally aligned"),
    (0x40, bytes(3), "the hardware does"),
    (mmap.PAGESIZE - 4, bytes(8), "outside the buffer"),
    (-8, bytes(8), "outside the buffer"),
])
def test_caller_mistakes_raise_usage_errors(page, offset, expected, message):
    _, atomic = page
    with pytest.raises(UsageError, match=message):
        atomic.compare_exchange(offset, expected, expected)


def test_length_mismatch_and_release_raise(page):
    _, atomic = page
    with pytest.raises(UsageError, match="desired"):
        atomic.compare_exchange(0x40, bytes(8), bytes(4))
    atomic.release()
    with pytest.raises(UsageError, match="released"):
        atomic.compare_exchange(0x40, bytes(8), bytes(8))


def test_a_read_only_buffer_is_refused():
    with pytest.raises(UsageError, match="writable"):
        AtomicBuffer(bytes(64))


def test_a_missing_library_is_a_usage_error_naming_the_package(tmp_path):
    with pytest.raises(UsageError, match=r"libatomic\.so\.1.*libatomic1"):
        Libatomic(str(tmp_path / "libatomic.so.1"))


def test_a_library_without_the_functions_is_a_usage_error():
    with pytest.raises(UsageError, match="lacks a function"):
        Libatomic("libc.so.6")


def test_narrow_widths_are_lock_free_and_sixteen_is_cmpxchg16b():
    library = libatomic()
    assert all(library.lock_free[width] for width in (1, 2, 4, 8))
    flags = open("/proc/cpuinfo").read()  # noqa: SIM115 - a one-off read
    if platform.machine() != "x86_64" or " cx16" not in flags:
        pytest.skip("needs an x86-64 CPU with CMPXCHG16B (cx16) to check the 16-byte path")
    assert library.wide_is_cmpxchg16b
    library.check_widths()  # raises if any width would take a lock


def test_a_cpu_without_cmpxchg16b_is_refused(monkeypatch):
    library = Libatomic()
    monkeypatch.setattr(library, "wide_is_cmpxchg16b", False)
    with pytest.raises(UsageError, match="CMPXCHG16B"):
        library.check_widths()
