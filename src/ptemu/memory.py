"""Guest-physical memory as the handler sees it: a three-call protocol.

A hypervisor integration implements `GuestMemory` over its own mapping of guest
RAM (Xen's foreign mappings, a KVM memslot, ...), or hands its writable
mappings to `MappedGuestMemory`. `compare_and_store` must be atomic with
respect to the guest: the CPU sets Accessed/Dirty bits in page-table entries
behind the emulator's back, other vCPUs run locked instructions on them, and
the handler relies on the compare to notice and start over.

Atomic is possible only where the hardware has an instruction for it: a span
inside one naturally aligned block of 1, 2, 4, 8 or 16 bytes (``LOCK
CMPXCHG``, ``LOCK CMPXCHG16B``). `MappedGuestMemory` refuses any other span
with `UsageError` rather than store it in pieces that a guest could see half
done; a caller with a longer write (a REP STOS over a page, an unaligned
16-byte store over three entries) commits it entry by entry, one
compare-and-store each, as the CPU itself stores it iteration by iteration.
`InMemoryGuestMemory` has a single owner and no guest, so it takes any span.
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ptemu.atomic import ATOMIC_WIDTHS, Libatomic, atomic_block, libatomic
from ptemu.errors import UsageError
from ptemu.values import PAGE_OFFSET_MASK, PAGE_SIZE

WIDEN_ATTEMPTS = 64
"""Compare-exchanges of a wider block before a span inside it gives up (returns
False) because the block's *other* bytes keep changing."""


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
        length. Memory shared with a running guest can do this only for a
        span inside one naturally aligned 16-byte block, and may raise
        `UsageError` for a longer one (see the module docstring).
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


@dataclass(frozen=True, slots=True)
class _Region:
    gpa: int
    size: int
    buffer: Any
    address: int
    """Host address of the buffer's first byte."""


class MappedGuestMemory:
    """Guest memory over writable host buffers at given GPAs (a hypervisor's
    `mmap` of guest RAM, a `bytearray`), committing with the hardware.

    `compare_and_store` is one hardware compare-and-exchange (`ptemu.atomic`)
    for a span inside one naturally aligned block of 1, 2, 4, 8 or 16 bytes:
    a span that fills its block is one instruction; a smaller one (3 bytes at
    offset 1) is exchanged with the block's other bytes as they are, and
    tried again while only those other bytes change (at most
    `WIDEN_ATTEMPTS` times, then False). A span across a 16-byte boundary,
    or outside every buffer, raises `UsageError`: no instruction stores it
    atomically, so the caller must commit it entry by entry.

    `read` and `write` are plain copies, not atomic: a read may see an entry
    half updated by a vCPU (a compare-and-store with those bytes then fails
    and the handler starts over), and `write` is for loading memory nothing
    else is writing yet. Bytes outside every buffer read as zero.

    Buffers are pinned (exported) while the memory lives, so they can neither
    move nor close under a call; `close()` unpins them. With ``pin=False``
    (for buffers their owner must be able to close, such as a VM's memslots)
    the caller keeps each buffer open and unmoved while the memory is used,
    and a call on a closed `mmap` raises `UsageError`.

    Raises `UsageError` at construction when libatomic is missing, when a
    width would not be lock-free, when buffers overlap, or when a buffer's
    host address and GPA disagree modulo 16 (a naturally aligned guest
    address must be naturally aligned in host memory for ``CMPXCHG16B``).
    The memory holds no state of its own, so any number of threads may use it.
    """

    __slots__ = ("_anchors", "_library", "_pinned", "_regions", "_starts")

    def __init__(self, regions: Iterable[tuple[int, Any]], *, pin: bool = True,
                 library: Libatomic | None = None) -> None:
        self._library = library or libatomic()
        self._library.check_widths()
        self._pinned = pin
        made: list[_Region] = []
        # The ctypes exports that pin the buffers, kept apart from the regions
        # so that a traceback holding a region does not keep a buffer pinned.
        self._anchors: list[Any] = []
        for gpa, buffer in regions:
            if isinstance(gpa, bool) or not isinstance(gpa, int) or gpa < 0:
                raise UsageError(f"mapped region GPA {gpa!r}: expected a non-negative integer")
            try:
                anchor = (ctypes.c_char * len(buffer)).from_buffer(buffer)
            except (TypeError, ValueError) as error:
                raise UsageError(f"mapped region at {gpa:#x}: needs a writable, contiguous "
                                 f"buffer ({error})") from None
            address = ctypes.addressof(anchor)
            if (address - gpa) % ATOMIC_WIDTHS[-1]:
                raise UsageError(
                    f"mapped region at GPA {gpa:#x} lies at host address {address:#x}: the two "
                    f"must agree modulo {ATOMIC_WIDTHS[-1]} (an mmap's page alignment does)")
            made.append(_Region(gpa, len(buffer), buffer, address))
            if pin:
                self._anchors.append(anchor)
            del anchor
        made.sort(key=lambda region: region.gpa)
        for low, high in itertools.pairwise(made):
            if high.gpa < low.gpa + low.size:
                raise UsageError(f"mapped regions at {low.gpa:#x} and {high.gpa:#x} overlap")
        self._regions = tuple(made)
        self._starts = [region.gpa for region in made]

    def _region(self, gpa: int, size: int) -> _Region | None:
        """The region holding all of ``[gpa, gpa + size)``, if one does."""
        index = bisect.bisect_right(self._starts, gpa) - 1
        if index < 0:
            return None
        region = self._regions[index]
        if gpa + size > region.gpa + region.size:
            return None
        if not self._pinned and getattr(region.buffer, "closed", False):
            raise UsageError(f"the buffer mapped at {region.gpa:#x} is closed")
        return region

    def read(self, gpa: int, size: int) -> bytes:
        if gpa < 0 or size < 0:
            raise UsageError(f"bad read at {gpa:#x} size {size}")
        region = self._region(gpa, size)
        if region is not None:
            start = gpa - region.gpa
            return bytes(region.buffer[start:start + size])
        out = bytearray(size)  # straddles buffers or reads unbacked bytes
        for region in self._regions:
            low = max(gpa, region.gpa)
            high = min(gpa + size, region.gpa + region.size)
            if low < high:
                if not self._pinned and getattr(region.buffer, "closed", False):
                    raise UsageError(f"the buffer mapped at {region.gpa:#x} is closed")
                out[low - gpa:high - gpa] = region.buffer[low - region.gpa:high - region.gpa]
        return bytes(out)

    def write(self, gpa: int, data: bytes) -> None:
        region = self._region(gpa, len(data)) if gpa >= 0 else None
        if region is None:
            raise UsageError(f"write of {len(data)} bytes at {gpa:#x}: no mapped region holds it")
        start = gpa - region.gpa
        region.buffer[start:start + len(data)] = data

    def compare_and_store(self, gpa: int, expected: bytes, new: bytes) -> bool:
        size = len(expected)
        if len(new) != size:
            raise UsageError("compare_and_store: expected and new differ in length")
        if size == 0:
            return True
        region = self._region(gpa, size) if gpa >= 0 else None
        if region is None:
            raise UsageError(f"compare_and_store of {size} bytes at {gpa:#x}: no mapped region "
                             "holds it")
        width = atomic_block(gpa, size)
        if width is None:
            raise UsageError(
                f"compare_and_store of {size} bytes at {gpa:#x} crosses a 16-byte boundary: "
                "no instruction stores it atomically; commit it entry by entry")
        offset = gpa - region.gpa
        exchange = self._library.compare_exchange
        if width == size:
            return exchange(region.address + offset, expected, new) is None
        inside = offset % width
        block = offset - inside
        current = bytes(region.buffer[block:block + width])
        for _attempt in range(WIDEN_ATTEMPTS):
            if current[inside:inside + size] != expected:
                return False
            found = exchange(region.address + block, current,
                             current[:inside] + new + current[inside + size:])
            if found is None:
                return True
            current = found
        return False

    def regions(self) -> list[tuple[int, int]]:
        """(GPA, size) of each mapped buffer, in address order."""
        return [(region.gpa, region.size) for region in self._regions]

    def close(self) -> None:
        """Unpin the buffers (their owner may close them); later calls raise."""
        self._regions = ()
        self._starts = []
        self._anchors = []
