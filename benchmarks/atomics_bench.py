"""Cost of one compare-and-exchange on an mmap, per candidate and width.

Run: ``python benchmarks/atomics_bench.py`` (about 30 s; the ``atomics`` and
``cffi`` rows need those packages, and say so when they are missing). Prints
the Markdown table of benchmarks/atomics.md: microseconds per successful
compare-exchange (the common case of a commit), the best of five runs, and
the ratio to a plain Python slice compare and store (which is *not* atomic:
the baseline of what we had).
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import sys
import timeit
from collections.abc import Callable

from ptemu.atomic import ATOMIC_WIDTHS, AtomicBuffer, libatomic
from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.memory import InMemoryGuestMemory, MappedGuestMemory
from ptemu.vcpu import Vcpu

CALLS = 50_000
RUNS = 5
SEQ_CST = 5
CELLS = {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32, 8: ctypes.c_uint64}


def best_us(call: Callable[[], object]) -> float:
    return min(timeit.repeat(call, number=CALLS, repeat=RUNS)) / CALLS * 1e6


def plain(buffer: mmap.mmap, width: int) -> Callable[[], object]:
    value = buffer[:width]

    def compare_and_store() -> bool:
        if buffer[0:width] != value:
            return False
        buffer[0:width] = value
        return True
    return compare_and_store


def sized(library: ctypes.CDLL, address: int, width: int) -> Callable[[], object]:
    """libatomic's ``__atomic_compare_exchange_N`` through ctypes, called bare."""
    function = getattr(library, f"__atomic_compare_exchange_{width}")
    function.restype = ctypes.c_bool
    if width == 16:
        function.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64 * 2),
                             ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int, ctypes.c_int)
        return lambda: function(address, (ctypes.c_uint64 * 2)(0, 0), 0, 0, SEQ_CST, SEQ_CST)
    cell = CELLS[width]
    function.argtypes = (ctypes.c_void_p, ctypes.POINTER(cell), cell, ctypes.c_int, ctypes.c_int)
    return lambda: function(address, cell(0), 0, SEQ_CST, SEQ_CST)


def generic(library: ctypes.CDLL, address: int, width: int) -> Callable[[], object]:
    """libatomic's ``__atomic_compare_exchange(size, ptr, expected*, desired*, ...)``."""
    function = getattr(library, "__atomic_compare_exchange")
    function.restype = ctypes.c_bool
    function.argtypes = (ctypes.c_size_t, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                         ctypes.c_int, ctypes.c_int)
    zero = bytes(width)
    return lambda: function(width, address, ctypes.create_string_buffer(zero, width), zero,
                            SEQ_CST, SEQ_CST)


def cffi_abi(address: int, width: int) -> Callable[[], object] | None:
    try:
        import cffi  # type: ignore[import-untyped]
    except ImportError:
        return None
    ffi = cffi.FFI()
    ffi.cdef("_Bool __atomic_compare_exchange(size_t, void *, void *, void *, int, int);")
    library = ffi.dlopen("libatomic.so.1")
    pointer = ffi.cast("void *", address)
    zero = bytes(width)
    return lambda: library.__atomic_compare_exchange(
        width, pointer, ffi.from_buffer(bytearray(zero)), ffi.from_buffer(zero),
        SEQ_CST, SEQ_CST)


def atomics_package(buffer: mmap.mmap, width: int) -> tuple[Callable[[], object], object] | None:
    try:
        import atomics  # type: ignore[import-not-found]
    except ImportError:
        return None
    if width == 16:
        return None
    view = atomics.atomicview(buffer=memoryview(buffer)[0:width], atype=atomics.UINT)
    atomic = view.__enter__()  # kept open: the cheapest way to use it
    return (lambda: atomic.cmpxchg_strong(expected=0, desired=0)), view


def main() -> None:
    buffer = mmap.mmap(-1, mmap.PAGESIZE)
    anchor = (ctypes.c_char * mmap.PAGESIZE).from_buffer(buffer)
    address = ctypes.addressof(anchor)
    library_path = libatomic().path
    released = ctypes.CDLL(library_path)  # releases the GIL around each call
    holding = ctypes.PyDLL(library_path)  # keeps it
    ptemu_view = AtomicBuffer(buffer)
    rows: dict[str, dict[int, float | None]] = {}
    baseline = {width: best_us(plain(buffer, width)) for width in ATOMIC_WIDTHS}
    rows["plain slice compare + store (not atomic)"] = dict(baseline)
    rows["ptemu.atomic.AtomicBuffer.compare_exchange"] = {
        width: best_us(lambda width=width: ptemu_view.compare_exchange(  # type: ignore[misc]
            0, bytes(width), bytes(width))) for width in ATOMIC_WIDTHS}
    rows["libatomic `_N` via ctypes.CDLL (bare call)"] = {
        width: best_us(sized(released, address, width)) for width in ATOMIC_WIDTHS}
    rows["libatomic `_N` via ctypes.PyDLL (GIL held)"] = {
        width: best_us(sized(holding, address, width)) for width in ATOMIC_WIDTHS}
    rows["libatomic generic via ctypes.CDLL (bare call)"] = {
        width: best_us(generic(released, address, width)) for width in ATOMIC_WIDTHS}
    cffi_row: dict[int, float | None] = {}
    for width in ATOMIC_WIDTHS:
        call = cffi_abi(address, width)
        cffi_row[width] = None if call is None else best_us(call)
    rows["libatomic generic via cffi ABI mode (bare call)"] = cffi_row
    package_row: dict[int, float | None] = {}
    views = []
    for width in ATOMIC_WIDTHS:
        made = atomics_package(buffer, width)
        if made is None:
            package_row[width] = None
        else:
            package_row[width] = best_us(made[0])
            views.append(made[1])
    rows["`atomics` 1.0.3, view kept open"] = package_row
    for view in views:
        view.__exit__(None, None, None)  # type: ignore[attr-defined]
    ptemu_view.release()
    del anchor
    print(f"Python {platform.python_version()} on {platform.machine()}, "
          f"{sys.platform}; {CALLS} calls, best of {RUNS}; us per call (x plain)\n")
    print("| candidate | " + " | ".join(f"{width} B" for width in ATOMIC_WIDTHS) + " |")
    print("|---|" + "---|" * len(ATOMIC_WIDTHS))
    for name, row in rows.items():
        cells = []
        for width in ATOMIC_WIDTHS:
            value = row[width]
            cells.append("n/a" if value is None else
                         f"{value:.2f} ({value / baseline[width]:.1f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")


def guest_memories() -> None:
    """A commit through each guest memory, and one handler event through each."""
    buffer = mmap.mmap(-1, mmap.PAGESIZE)
    mapped = MappedGuestMemory([(0x7000, buffer)])
    in_memory = InMemoryGuestMemory([(0x7000, bytes(mmap.PAGESIZE))])
    print("\n| guest memory | 8-byte entry | 16 bytes | 2 bytes inside an entry |")
    print("|---|---|---|---|")
    for name, memory in (("InMemoryGuestMemory (not shared)", in_memory),
                         ("MappedGuestMemory (hardware CAS)", mapped)):
        cells = [best_us(lambda memory=memory, gpa=gpa, size=size:  # type: ignore[misc]
                         memory.compare_and_store(gpa, bytes(size), bytes(size)))
                 for gpa, size in ((0x7008, 8), (0x7010, 16), (0x7022, 2))]
        print(f"| {name} | " + " | ".join(f"{cell:.2f}" for cell in cells) + " |")
    print("\n| handler event, engine auto | InMemoryGuestMemory | MappedGuestMemory |")
    print("|---|---|---|")
    for text, code in (("lock or qword [rdi], rax", "f0480907"),
                       ("mov qword [rdi], rax", "488907")):
        cells = []
        for memory in (in_memory, mapped):
            handler = PtWriteHandler(memory, "4level")
            vcpu = Vcpu()
            event = WriteEvent(gpa=0x7040, gla=0xFFFF888000007040,
                               regs={"rip": 0x401000, "rdi": 0xFFFF888000007040, "rax": 0x20},
                               code=bytes.fromhex(code), code_bits=64)

            def deliver(handler: PtWriteHandler = handler, vcpu: Vcpu = vcpu,
                        event: WriteEvent = event) -> object:
                vcpu.begin_exit()
                return handler.handle_ept_write(vcpu, event)
            cells.append(best_us(deliver))
        print(f"| `{text}` | {cells[0]:.2f} | {cells[1]:.2f} |")
    mapped.close()
    buffer.close()


if __name__ == "__main__":
    main()
    guest_memories()
