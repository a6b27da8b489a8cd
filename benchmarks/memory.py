"""Peak RSS of a handler serving many events, and write-state bytes per entry.

    python benchmarks/memory.py [--events 1000000] [--entries 100000] [--threads 4]

A benchmark, not a test: it prints figures for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import threading
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


BLOCK = 100_000
"""Events per timing block: the per-event cost is reported block by block."""


def serve(events: int, entries: int, engine: str, paging: str, threads: int = 1,
          ) -> tuple[float, float, list[float]]:
    """Serve `events` MOV/PAE-half events over `entries` entries from `threads`
    vCPU threads sharing one handler; (seconds, peak MiB, us per event per block)."""
    memory = InMemoryGuestMemory()
    handler = PtWriteHandler(memory, paging, engine=engine)
    marks: list[float] = []
    start = time.perf_counter()
    workers = [threading.Thread(target=_serve_share, args=(
        handler, range(share, events, threads), entries, paging, marks))
        for share in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - start
    points = [start, *sorted(marks)]
    per_block = [(later - earlier) / BLOCK * 1e6 for earlier, later in itertools.pairwise(points)]
    return seconds, peak_rss_mib(), per_block


def _serve_share(handler: PtWriteHandler, numbers: range, entries: int, paging: str,
                 marks: list[float]) -> None:
    vcpu = Vcpu()
    if paging == "pae":  # 4-byte halves: entries go pending, then complete
        code, bits, size = bytes.fromhex("8910"), 32, 4
        base_gla = 0xC0000000
    else:
        code, bits, size = bytes.fromhex("488937"), 64, 8
        base_gla = BASE_GLA
    for number in numbers:
        entry = number % entries
        half = (number // entries) % 2 * 4 if size == 4 else 0
        gla = base_gla + entry * 8 + half
        gpa = BASE_GPA + entry * 8 + half
        vcpu.begin_exit()
        handler.handle_ept_write(vcpu, WriteEvent(
            gpa, gla, {"rip": 0x81001000, "rax": gla, "rdi": gla, "rdx": number & 0xFFFFFFFF,
                       "rsi": number}, code, bits))
        if number % BLOCK == BLOCK - 1:
            marks.append(time.perf_counter())


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
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(f"start: peak RSS {peak_rss_mib():.1f} MiB")
    seconds, peak, per_block = serve(args.events, args.entries, args.engine, args.paging,
                                     args.threads)
    print(f"served {args.events} events over {args.entries} entries ({args.paging}, "
          f"engine {args.engine}, {args.threads} threads, one handler) in {seconds:.1f} s: "
          f"peak RSS {peak:.1f} MiB")
    print("us per event, block by block of 100000 events: "
          + ", ".join(f"{cost:.1f}" for cost in per_block))
    for label, size in bytes_per_entry(args.entries).items():
        print(f"write state per entry, {label}: {size:.0f} bytes")


if __name__ == "__main__":
    main()
