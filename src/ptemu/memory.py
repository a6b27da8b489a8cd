"""Guest-physical memory as the handler sees it: a three-call protocol.

A hypervisor integration implements `GuestMemory` over its own mapping of guest
RAM (Xen's foreign mappings, a KVM memslot, ...). `compare_and_store` must be
atomic with respect to the guest: the CPU sets Accessed/Dirty bits in
page-table entries behind the emulator's back, and the handler relies on the
compare to notice and start over.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

from ptemu.values import PAGE_OFFSET_MASK, PAGE_SIZE


@runtime_checkable
class GuestMemory(Protocol):
    """Read, write and compare-and-store on guest-physical addresses."""

    def read(self, gpa: int, size: int) -> bytes:
        """Return `size` bytes at `gpa`; bytes never written read as zero."""
        ...

    def write(self, gpa: int, data: bytes) -> None:
        """Store `data` at `gpa` unconditionally."""
        ...

    def compare_and_store(self, gpa: int, expected: bytes, new: bytes) -> bool:
        """Atomically store `new` at `gpa` if memory there equals `expected`.

        Returns whether the store happened. `expected` and `new` have the same
        length.
        """
        ...


class InMemoryGuestMemory:
    """Sparse guest-physical memory held in 4 KiB pages (zero when unset).

    Used by fixture replay, the tests and the benchmarks; a single-threaded
    owner makes `compare_and_store` trivially atomic.
    """

    __slots__ = ("_pages",)

    def __init__(self, regions: Iterable[tuple[int, bytes]] = ()) -> None:
        self._pages: dict[int, bytearray] = {}
        for gpa, data in regions:
            self.write(gpa, data)

    def _spans(self, gpa: int, size: int) -> Iterator[tuple[int, int, int, int]]:
        """(page number, offset in page, offset in buffer, length) per page touched."""
        done = 0
        while done < size:
            address = gpa + done
            offset = address & PAGE_OFFSET_MASK
            length = min(size - done, PAGE_SIZE - offset)
            yield address >> 12, offset, done, length
            done += length

    def read(self, gpa: int, size: int) -> bytes:
        if gpa < 0 or size < 0:
            raise ValueError(f"bad read at {gpa:#x} size {size}")
        offset = gpa & PAGE_OFFSET_MASK
        if offset + size <= PAGE_SIZE:  # one page: the handler's common case
            page = self._pages.get(gpa >> 12)
            return bytes(size) if page is None else bytes(page[offset:offset + size])
        out = bytearray(size)
        for page_number, offset, start, length in self._spans(gpa, size):
            page = self._pages.get(page_number)
            if page is not None:
                out[start:start + length] = page[offset:offset + length]
        return bytes(out)

    def write(self, gpa: int, data: bytes) -> None:
        if gpa < 0:
            raise ValueError(f"bad write at {gpa:#x}")
        offset = gpa & PAGE_OFFSET_MASK
        if offset + len(data) <= PAGE_SIZE:
            page = self._pages.get(gpa >> 12)
            if page is None:
                page = self._pages[gpa >> 12] = bytearray(PAGE_SIZE)
            page[offset:offset + len(data)] = data
            return
        for page_number, offset, start, length in self._spans(gpa, len(data)):
            page = self._pages.get(page_number)
            if page is None:
                page = self._pages[page_number] = bytearray(PAGE_SIZE)
            page[offset:offset + length] = data[start:start + length]

    def compare_and_store(self, gpa: int, expected: bytes, new: bytes) -> bool:
        if len(expected) != len(new):
            raise ValueError("compare_and_store: expected and new differ in length")
        if self.read(gpa, len(expected)) != expected:
            return False
        self.write(gpa, new)
        return True

    def pages(self) -> list[int]:
        """GPAs of the pages that hold any written byte, in address order."""
        return sorted(number << 12 for number in self._pages)

    def copy(self) -> InMemoryGuestMemory:
        """An independent copy (for tests that compare before and after)."""
        clone = InMemoryGuestMemory()
        clone._pages = {number: bytearray(page) for number, page in self._pages.items()}
        return clone

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, InMemoryGuestMemory):
            return NotImplemented
        numbers = set(self._pages) | set(other._pages)
        zero = bytes(PAGE_SIZE)
        return all(self._pages.get(n, zero) == other._pages.get(n, zero) for n in numbers)

    __hash__ = None  # type: ignore[assignment]
