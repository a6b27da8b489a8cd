"""Peak RSS of a handler serving many events, and write-state bytes per entry.

    python benchmarks/memory.py [--events 1000000] [--entries 100000]

A benchmark, not a test: it prints figures for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc

from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.memory import InMemoryGuestMemory
from ptemu.vcpu import Vcpu
from ptemu.writestate import WriteInput, WriteStateTable

BASE_GLA = 0xFFFF888010000000
BASE_GPA = 0x10000000


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def serve(events: int, entries: int, engine: str, paging: str) -> tuple[float, float]:
    """Serve `events` MOV/PAE-half events over `entries` entries; (seconds, peak MiB)."""
    memory = InMemoryGuestMemory()
    handler = PtWriteHandler(memory, paging, engine=engine)
    vcpu = Vcpu()
    if paging == "pae":  # 4-byte halves: entries go pending, then complete
        code, bits, size = bytes.fromhex("8910"), 32, 4
        base_gla = 0xC0000000
    else:
        code, bits, size = bytes.fromhex("488937"), 64, 8
        base_gla = BASE_GLA
    start = time.perf_counter()
    for number in range(events):
        entry = number % entries
        half = (number // entries) % 2 * 4 if size == 4 else 0
        gla = base_gla + entry * 8 + half
        gpa = BASE_GPA + entry * 8 + half
        vcpu.begin_exit()
        handler.handle_ept_write(vcpu, WriteEvent(
            gpa, gla, {"rip": 0x81001000, "rax": gla, "rdi": gla, "rdx": number & 0xFFFFFFFF,
                       "rsi": number}, code, bits))
    return time.perf_counter() - start, peak_rss_mib()


def bytes_per_entry(entries: int) -> dict[str, float]:
    """tracemalloc's view of a WriteStateTable holding `entries` pending / idle entries."""
    figures = {}
    for label, size in (("pending (half-written PAE entry)", 4),
                        ("idle after a strict completion", 8)):
        tracemalloc.start()
        table = WriteStateTable()
        baseline = tracemalloc.get_traced_memory()[0]
        for number in range(entries):
            table.apply(BASE_GPA + number * 8,
                        WriteInput(offset=0, size=size, value=number, entry_before=0,
                                   entry_after=number, rip=0x1000,
                                   event_fingerprint=hash((number, 1))),
                        entry_size=8, policy="strict", guest_is_32bit=True)  # type: ignore[arg-type]
        used = tracemalloc.get_traced_memory()[0] - baseline
        tracemalloc.stop()
        figures[label] = used / entries
        del table
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--paging", default="pae")
    args = parser.parse_args()
    print(f"start: peak RSS {peak_rss_mib():.1f} MiB")
    seconds, peak = serve(args.events, args.entries, args.engine, args.paging)
    print(f"served {args.events} events over {args.entries} entries ({args.paging}, "
          f"engine {args.engine}) in {seconds:.1f} s: peak RSS {peak:.1f} MiB")
    for label, size in bytes_per_entry(args.entries).items():
        print(f"write state per entry, {label}: {size:.0f} bytes")


if __name__ == "__main__":
    main()
