"""Hardware compare-and-exchange on host memory shared with a running guest.

A page-table entry in guest RAM is written by three agents at once: the guest's
vCPUs (locked instructions), the CPU's page walker (Accessed and Dirty bits,
set with a locked read-modify-write) and the handler committing an emulated
store. A compare followed by a store in Python loses any update that lands
between the two; only the processor's own compare-and-exchange (``LOCK
CMPXCHG`` for 1 to 8 bytes, ``LOCK CMPXCHG16B`` for 16) is atomic with respect
to the others.

We reach those instructions through GCC's ``libatomic`` (``libatomic.so.1``,
installed wherever GCC is; Debian's package ``libatomic1``) with `ctypes`,
rather than machine code of our own. Why libatomic and how fast it is
(about 1.2 us per call here, 2 us for 16 bytes; the ``atomics`` package 9 to
10 us and no 16-byte width): benchmarks/atomics.md.

Lock-freedom is what matters: libatomic falls back to a lock of its own for a
width the CPU cannot do in one instruction, and such a lock is not atomic with
respect to a guest, which never takes it. For 1, 2, 4 and 8 bytes libatomic
answers ``__atomic_is_lock_free`` truthfully. For 16 bytes the GCC 7 to 12
libatomic answers false even where it uses ``LOCK CMPXCHG16B`` (it calls a
width lock-free only when a plain *load* of it is, and a CMPXCHG16B load
writes); its x86-64 build selects the CMPXCHG16B code whenever CPUID reports
CMPXCHG16B (CPUID.01H:ECX[13], ``cx16`` in /proc/cpuinfo) and a lock
otherwise. So a 16-byte width counts as lock-free here when libatomic says so,
or on x86-64 when the CPU has ``cx16``; otherwise `libatomic()` refuses it
(the disassembly that shows this is in benchmarks/atomics.md).

A missing library or a width that would take a lock is a `UsageError` when
the `AtomicBuffer` is made, never a silent fallback to a plain store.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import threading
from typing import Any, Final

from ptemu.errors import UsageError

ATOMIC_WIDTHS: Final = (1, 2, 4, 8, 16)
"""Widths, in bytes, of the hardware compare-and-exchange."""
LIBATOMIC_NAME: Final = "libatomic.so.1"
_SEQ_CST: Final = 5
"""``__ATOMIC_SEQ_CST``: the locked instruction is a full barrier anyway."""
_X86_64: Final = frozenset({"x86_64", "amd64"})
_INSTALL_HINT: Final = ("install GCC's atomic library (Debian and Ubuntu: apt-get install "
                        "libatomic1; Fedora: dnf install libatomic; it comes with gcc)")

_CELL_TYPES: Final[dict[int, Any]] = {
    1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32, 8: ctypes.c_uint64,
}


def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports, empty where /proc/cpuinfo is missing."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


class Libatomic:
    """GCC's libatomic, loaded, with its compare-exchange functions typed.

    Use `libatomic()` for the shared instance; build one directly only to
    load a library from another path (tests do, to check the error).
    """

    def __init__(self, path: str | None = None) -> None:
        name = path or ctypes.util.find_library("atomic") or LIBATOMIC_NAME
        try:
            library = ctypes.CDLL(name)
        except OSError as error:
            raise UsageError(f"hardware compare-and-exchange needs {LIBATOMIC_NAME}, which "
                             f"could not be loaded ({error}): {_INSTALL_HINT}") from None
        self.path = name
        self._functions: dict[int, Any] = {}  # ctypes foreign functions
        try:
            # getattr: a dotted name starting with two underscores would be mangled in a class.
            is_lock_free = getattr(library, "__atomic_is_lock_free")
            for width in ATOMIC_WIDTHS:
                self._functions[width] = getattr(library, f"__atomic_compare_exchange_{width}")
        except AttributeError as error:
            raise UsageError(f"{name} lacks a function ptemu needs ({error}): "
                             f"{_INSTALL_HINT}") from None
        is_lock_free.argtypes = (ctypes.c_size_t, ctypes.c_void_p)
        is_lock_free.restype = ctypes.c_bool
        for width, cell in _CELL_TYPES.items():
            function = self._functions[width]
            function.argtypes = (ctypes.c_void_p, ctypes.POINTER(cell), cell,
                                 ctypes.c_int, ctypes.c_int)
            function.restype = ctypes.c_bool
        # On x86-64 (System V) an unsigned __int128 argument travels in two
        # consecutive integer registers, low half first: the same registers as
        # two 64-bit arguments in its place.
        self._x86_64 = platform.machine().lower() in _X86_64
        wide = self._functions[16]
        wide.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64 * 2), ctypes.c_uint64,
                         ctypes.c_uint64, ctypes.c_int, ctypes.c_int)
        wide.restype = ctypes.c_bool
        # Ask with a 16-byte aligned address (ctypes aligns its own arrays).
        probe = (ctypes.c_uint64 * 2)()
        address = ctypes.addressof(probe)
        self.lock_free = {width: bool(is_lock_free(width, address)) for width in ATOMIC_WIDTHS}
        self.cx16 = "cx16" in _cpu_flags()
        self.wide_is_cmpxchg16b = self.lock_free[16] or (self._x86_64 and self.cx16)
        self._lock = threading.Lock()

    def check_widths(self) -> None:
        """Raise `UsageError` unless every width in `ATOMIC_WIDTHS` is lock-free."""
        narrow = [width for width in ATOMIC_WIDTHS[:-1] if not self.lock_free[width]]
        if narrow:
            raise UsageError(f"{self.path}: compare-and-exchange of {narrow} bytes takes a lock "
                             "on this machine, which a guest does not see: not atomic")
        if not self._x86_64 and not self.lock_free[16]:
            raise UsageError(f"{self.path}: 16-byte compare-and-exchange is not lock-free on "
                             f"{platform.machine()}, so it would not be atomic against a guest")
        if not self.wide_is_cmpxchg16b:
            raise UsageError("16-byte compare-and-exchange needs CMPXCHG16B, which this CPU "
                             "does not report (no 'cx16' in /proc/cpuinfo); libatomic would "
                             "use a lock a guest does not see")

    def compare_exchange(self, address: int, expected: bytes, desired: bytes) -> bytes | None:
        """One hardware compare-and-exchange of ``len(expected)`` bytes at `address`.

        Returns None when memory held `expected` and now holds `desired`, else
        the bytes it holds (read by the same instruction, so not torn).
        `address` must be naturally aligned for the width and writable: this
        is the unchecked primitive under `AtomicBuffer`.
        """
        width = len(expected)
        if width == 16:
            cell16 = (ctypes.c_uint64 * 2)(int.from_bytes(expected[:8], "little"),
                                           int.from_bytes(expected[8:], "little"))
            if self._functions[16](address, cell16, int.from_bytes(desired[:8], "little"),
                                   int.from_bytes(desired[8:], "little"), _SEQ_CST, _SEQ_CST):
                return None
            return cell16[0].to_bytes(8, "little") + cell16[1].to_bytes(8, "little")
        cell = _CELL_TYPES[width](int.from_bytes(expected, "little"))
        if self._functions[width](address, cell, int.from_bytes(desired, "little"),
                                  _SEQ_CST, _SEQ_CST):
            return None
        return int(cell.value).to_bytes(width, "little")


_shared: Libatomic | None = None
_shared_lock = threading.Lock()


def libatomic() -> Libatomic:
    """The process's `Libatomic`, loaded and checked once (thread-safe).

    Raises `UsageError` naming what is missing and how to install it.
    """
    global _shared
    if _shared is None:
        with _shared_lock:
            if _shared is None:
                loaded = Libatomic()
                loaded.check_widths()
                _shared = loaded
    return _shared


def atomic_block(offset: int, size: int) -> int | None:
    """The smallest naturally aligned atomic width holding ``[offset, offset+size)``.

    None when no width in `ATOMIC_WIDTHS` does (the span crosses a 16-byte
    boundary). ``atomic_block(0x12, 2) == 2``, ``atomic_block(0x11, 2) == 4``,
    ``atomic_block(0x1C, 8) is None``.
    """
    if size < 1:
        return None
    last = offset + size - 1
    for width in ATOMIC_WIDTHS:
        if offset // width == last // width:
            return width
    return None


class AtomicBuffer:
    """Hardware compare-and-exchange on a writable buffer (an `mmap`, a
    `bytearray`, a ctypes array) at byte offsets.

    The buffer is pinned (exported) while the `AtomicBuffer` lives, so it can
    neither move nor be closed under a call; `release()` unpins it. Offsets
    are checked: in bounds, and naturally aligned *in host memory* for the
    width (``LOCK CMPXCHG16B`` faults on a misaligned address, and a split
    lock is slow or refused).
    """

    __slots__ = ("_anchor", "_library", "address", "size")

    def __init__(self, buffer: Any, *, library: Libatomic | None = None) -> None:
        self._library = library or libatomic()
        try:
            anchor = (ctypes.c_char * len(buffer)).from_buffer(buffer)
        except (TypeError, ValueError) as error:
            raise UsageError(f"atomic access needs a writable, contiguous buffer: {error}") from None
        self._anchor: ctypes.Array[ctypes.c_char] | None = anchor
        self.address = ctypes.addressof(anchor)
        self.size = len(buffer)

    def compare_exchange(self, offset: int, expected: bytes, desired: bytes) -> bytes | None:
        """Store `desired` at `offset` if the bytes there equal `expected`, atomically.

        Returns None on success, else the bytes found (what the same
        instruction read). Widths 1, 2, 4, 8 and 16 at a naturally aligned
        host address; anything else is a `UsageError`.
        """
        width = len(expected)
        if self._anchor is None:
            raise UsageError("compare_exchange on a released AtomicBuffer")
        if len(desired) != width:
            raise UsageError(f"compare_exchange: expected has {width} bytes, desired "
                             f"{len(desired)}")
        if width not in _WIDTH_SET:
            raise UsageError(f"compare_exchange of {width} bytes: the hardware does "
                             f"{ATOMIC_WIDTHS}")
        if not 0 <= offset <= self.size - width:
            raise UsageError(f"compare_exchange of {width} bytes at offset {offset:#x}: "
                             f"outside the buffer of {self.size:#x} bytes")
        address = self.address + offset
        if address % width:
            raise UsageError(f"compare_exchange of {width} bytes at host address {address:#x}: "
                             "not naturally aligned")
        return self._library.compare_exchange(address, expected, desired)

    def release(self) -> None:
        """Unpin the buffer; later calls raise `UsageError`."""
        self._anchor = None


_WIDTH_SET: Final = frozenset(ATOMIC_WIDTHS)
