"""Timing the engines on the same events, interleaved, in one process."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ptemu.bench.naive import naive_event
from ptemu.bench.workload import BenchEvent
from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.memory import InMemoryGuestMemory
from ptemu.values import page_base
from ptemu.vcpu import Vcpu
from ptemu.writestate import WriteInput

Runner = Callable[[BenchEvent], int]
"""Runs one event; returns the nanoseconds the event itself took."""


@dataclass(frozen=True, slots=True)
class EngineFigures:
    """What one engine achieved over the same events as the others."""

    name: str
    events: int
    seconds: float
    median_us: float
    p99_us: float

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def naive_runner() -> Runner:
    def run(event: BenchEvent) -> int:
        start = time.perf_counter_ns()
        try:
            naive_event(event.code_bits, event.regs, event.code, page_base(event.gla),
                        event.page)
        except Exception:  # noqa: BLE001, S110 - the plain flat-segment code fails on
            pass  # some events (16-bit code, segment bases); a user pays its cost all the same
        return time.perf_counter_ns() - start
    return run


class HandlerRunner:
    """Runs events through ptemu: one handler per paging mode (one guest each),
    created on first use and reused for every later event."""

    def __init__(self, engine: str) -> None:
        self.engine = engine
        self.handlers: dict[str, PtWriteHandler] = {}
        self._memories: dict[str, InMemoryGuestMemory] = {}
        self._vcpu = Vcpu()

    def handler(self, paging: str) -> PtWriteHandler:
        handler = self.handlers.get(paging)
        if handler is None:
            memory = self._memories[paging] = InMemoryGuestMemory()
            handler = self.handlers[paging] = PtWriteHandler(memory, paging, engine=self.engine)
        return handler

    def __call__(self, event: BenchEvent) -> int:
        handler = self.handler(event.paging)
        self._memories[event.paging].write(event.page_gpa, event.page)  # as the trace had it
        self._vcpu.begin_exit()
        write = WriteEvent(event.gpa, event.gla, event.regs, event.code, event.code_bits)
        start = time.perf_counter_ns()
        handler.handle_ept_write(self._vcpu, write)
        return time.perf_counter_ns() - start


def measure(runners: dict[str, Runner], events: Sequence[BenchEvent], rounds: int,
            warmup: int = 50) -> list[EngineFigures]:
    """Run every engine over `events`, interleaved by chunks, `rounds` times."""
    samples: dict[str, list[int]] = {name: [] for name in runners}
    for run in runners.values():
        for event in events[:warmup]:
            run(event)
    chunk = max(1, len(events) // 10)
    for _ in range(rounds):
        for start in range(0, len(events), chunk):
            part = events[start:start + chunk]
            for name, run in runners.items():
                bucket = samples[name]
                for event in part:
                    bucket.append(run(event))
    figures = []
    for name, values in samples.items():
        ordered = sorted(values)
        figures.append(EngineFigures(
            name, len(values), sum(values) / 1e9, statistics.median(ordered) / 1e3,
            ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1e3))
    return figures


def pending_state_scaling(engine: str, sizes: Sequence[int], probe: Sequence[BenchEvent],
                          ) -> list[tuple[int, float]]:
    """Median event latency with `size` entries already holding pending writes."""
    def fill(handler: PtWriteHandler, size: int) -> None:
        for number in range(size):
            # Pending partial writes on entries of pages the probe never touches.
            handler.write_state.apply(
                0x40_0000_0000 + number * 8,
                WriteInput(offset=0, size=4, value=1, entry_before=0, entry_after=1, rip=0),
                entry_size=handler.entry_size, policy=handler.policy, guest_is_32bit=False)
    return _scaling(engine, sizes, probe, fill)


def decode_cache_scaling(engine: str, sizes: Sequence[int], probe: Sequence[BenchEvent],
                         ) -> list[tuple[int, float]]:
    """Median event latency with `size` distinct instructions in the decode cache."""
    def fill(handler: PtWriteHandler, size: int) -> None:
        for number in range(size):
            # mov [rdi + disp32], rsi with a distinct displacement each
            handler.decode(64, b"\x48\x89\xb7" + (number * 8).to_bytes(4, "little"))
    return _scaling(engine, sizes, probe, fill)


def _scaling(engine: str, sizes: Sequence[int], probe: Sequence[BenchEvent],
             fill: Callable[[PtWriteHandler, int], None]) -> list[tuple[int, float]]:
    """Median latency of `probe` on a fresh handler that `fill` grew to each size."""
    figures = []
    for size in sizes:
        run = HandlerRunner(engine)
        fill(run.handler(probe[0].paging), size)
        timings = sorted(run(event) for event in probe)
        figures.append((size, statistics.median(timings) / 1e3))
    return figures
