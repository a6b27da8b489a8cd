"""The benchmark's events: taken from the shipped corpus, in a kernel-like mix.

Each `BenchEvent` carries the page-table page as it was just before the event
in its trace, so any engine can replay it alone, in any order.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ptemu.fixtures import corpus_path, find_fixtures, load_fixture
from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.memory import InMemoryGuestMemory
from ptemu.status import Status
from ptemu.values import PAGE_SIZE, page_base
from ptemu.vcpu import Vcpu

KERNEL_MIX: Mapping[str, float] = {
    "mov": 0.55, "xchg": 0.15, "cmpxchg": 0.10, "cmpxchg8b": 0.05, "logic": 0.08,
    "bit-test": 0.07,
}
"""Share of each family in the mix: what busy Linux guests mostly do (set_pte is
a MOV; get_and_clear an XCHG; PAE and atomic updates CMPXCHG/CMPXCHG8B;
write-protect and young-clearing locked AND/BTR)."""


@dataclass(frozen=True, slots=True)
class BenchEvent:
    """One emulated corpus event, replayable on its own."""

    fixture: str
    paging: str
    code_bits: int
    gpa: int
    gla: int
    regs: dict[str, int]
    code: bytes
    page: bytes
    """The page-table page just before the event."""
    family: str

    @property
    def page_gpa(self) -> int:
        return page_base(self.gpa)


def corpus_events(paths: Iterable[Path] | None = None) -> list[BenchEvent]:
    """Every emulated event of the corpus, with its page as it was before it."""
    events: list[BenchEvent] = []
    for path in find_fixtures(list(paths) if paths else [corpus_path()]):
        fixture = load_fixture(path)
        memory = InMemoryGuestMemory(fixture.memory_regions)
        handler = PtWriteHandler(memory, fixture.paging, policy=fixture.policy)
        vcpu = Vcpu()
        for event in fixture.events:
            for gpa, data in event.memory:
                memory.write(gpa, data)
            page = memory.read(page_base(event.gpa), PAGE_SIZE)
            vcpu.begin_exit()
            result = handler.handle_ept_write(vcpu, WriteEvent(
                event.gpa, event.gla, event.regs, event.code, fixture.code_bits))
            if result.status is not Status.EMULATED:
                continue
            decoded = handler.decode(fixture.code_bits, event.code)
            family = getattr(decoded, "family", None)
            events.append(BenchEvent(fixture.name, fixture.paging, fixture.code_bits, event.gpa,
                                     event.gla, dict(event.regs), event.code, page,
                                     family.name if family is not None else "?"))
    return events


def kernel_mix(events: list[BenchEvent], count: int, seed: int = 0) -> list[BenchEvent]:
    """`count` events drawn from `events` in the `KERNEL_MIX` shares (fixed seed)."""
    by_family: dict[str, list[BenchEvent]] = defaultdict(list)
    for event in events:
        by_family[event.family].append(event)
    families = [name for name in KERNEL_MIX if by_family.get(name)]
    if not families:
        raise ValueError("the corpus has no events of the kernel mix's families")
    weights = [KERNEL_MIX[name] for name in families]
    chooser = random.Random(seed)
    picked = chooser.choices(families, weights, k=count)
    return [chooser.choice(by_family[name]) for name in picked]
