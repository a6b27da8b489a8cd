"""Failure injection: a guest memory that fails at its k-th call, for every k.

For each corpus-like event (one-entry MOV, XCHG, CMPXCHG, CMPXCHG8B; the
multi-entry 16-byte MOVUPS, CMPXCHG16B and REP STOSQ; a PAE pair of 32-bit
halves the handler coalesces) and each way to fail (`failing_memory`), the
event is delivered once per k from 0 to past the calls a clean delivery makes.
Each delivery must either

- return `EMULATED` with exactly what a clean delivery gives (memory, result
  registers and writes, write state): a refused compare-and-store is only a
  reason to start over; or, for the PAE pair, what a clean delivery of the
  first instruction alone gives (the handler may drop the second half, which
  the guest then executes itself); or
- return another status, or raise `InjectedFailure` unchanged (the handler
  lets a memory's own exception through), and then have changed nothing:
  no byte of guest memory, no write state, no PtEmuBuffer, no register.

A write state is pending on one entry before every event (a low half written
alone), so a refused event that touched the write state would show.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
from failing_memory import FAILURES, FailingGuestMemory, InjectedFailure

from ptemu.handler import CommitIncomplete, PtWriteHandler, WriteEvent
from ptemu.memory import InMemoryGuestMemory
from ptemu.status import Status
from ptemu.vcpu import Vcpu

TABLE_GPA = 0x7000
RIP = 0x40_1000
VALUE = 0x8000_0000_0ABC_D067
PENDING_ENTRY = 12  # the entry with a half written before every event


@dataclass(frozen=True)
class Case:
    name: str
    code: str
    entry: int
    """Index of the first entry written (the event's GPA is its address + offset)."""
    regs: dict[str, int] = field(default_factory=dict)
    offset: int = 0
    paging: str = "4level"
    code_bits: int = 64

    @property
    def table_gla(self) -> int:
        return 0xC000_7000 if self.code_bits == 32 else 0xFFFF_8880_0000_7000


_INITIAL = b"".join((0x0010_0000 * index + 0x1000 * index | 0x63).to_bytes(8, "little")
                    for index in range(512))
"""The table page: entries all different and all present (PAE reads it the same way)."""


def _entry(index: int) -> int:
    return int.from_bytes(_INITIAL[8 * index:8 * index + 8], "little")


CASES = [
    Case("mov qword", "48 89 0f", 0, {"rcx": VALUE}),
    Case("mov dword completing the pending entry", "89 4f 04", PENDING_ENTRY,
         {"rcx": 0x8000_0000}, offset=4),
    Case("xchg qword", "48 87 0f", 1, {"rcx": VALUE}),
    Case("lock cmpxchg, compare matches", "f0 48 0f b1 0f", 2, {"rax": _entry(2), "rcx": VALUE}),
    Case("lock cmpxchg, compare fails", "f0 48 0f b1 0f", 3, {"rax": 0, "rcx": VALUE}),
    Case("lock cmpxchg8b", "f0 0f c7 0f", 4,
         {"rax": _entry(4) & 0xFFFF_FFFF, "rdx": _entry(4) >> 32,
          "rbx": VALUE & 0xFFFF_FFFF, "rcx": VALUE >> 32}),
    Case("movups, two entries, 16-byte aligned", "0f 11 07", 6,
         {"xmm0": (VALUE << 64) | (VALUE ^ 0x2)}),
    Case("movups, two entries, 8-byte aligned", "0f 11 07", 9,
         {"xmm0": (VALUE << 64) | (VALUE ^ 0x4)}),
    Case("lock cmpxchg16b", "f0 48 0f c7 0f", 14,
         {"rax": _entry(14), "rdx": _entry(15), "rbx": VALUE, "rcx": VALUE ^ 0x20}),
    Case("rep stosq over four entries", "f3 48 ab", 16, {"rcx": 4, "rax": VALUE}),
    Case("PAE: low half then high half, coalesced", "89 07 89 57 04", 20,
         {"rax": 0x0ABC_D067, "rdx": 0x8000_0000}, paging="pae", code_bits=32),
]

KNOWN_BUGS: dict[tuple[str, str], str] = {}
"""(case name, failure) pairs the handler gets wrong today, with the bug (none now:
the PAE coalesced pair whose second half fails reports its first half alone)."""


class Setup:
    """A guest with its table page loaded and a pending half-written entry."""

    def __init__(self, case: Case, engine: str, *, coalesce: bool = True) -> None:
        self.inner = InMemoryGuestMemory([(TABLE_GPA, _INITIAL)])
        self.memory = FailingGuestMemory(self.inner)
        self.handler = PtWriteHandler(self.memory, case.paging, engine=engine,
                                      coalesce=coalesce)
        self.vcpu = Vcpu()
        pending_gla = case.table_gla + 8 * PENDING_ENTRY
        warm_up = WriteEvent(gpa=TABLE_GPA + 8 * PENDING_ENTRY, gla=pending_gla,
                             regs={"rip": RIP, "rdi": pending_gla, "rcx": 0x1234_5067},
                             code=bytes.fromhex("89 0f"), code_bits=case.code_bits)
        result = self.handler.handle_ept_write(self.vcpu, warm_up)
        assert result.status is Status.EMULATED
        assert self.handler.pending() == (TABLE_GPA + 8 * PENDING_ENTRY,)
        self.vcpu.begin_exit()
        entry_gla = case.table_gla + 8 * case.entry
        self.event = WriteEvent(
            gpa=TABLE_GPA + 8 * case.entry + case.offset, gla=entry_gla + case.offset,
            regs={"rip": RIP, "rdi": entry_gla, **case.regs}, code=bytes.fromhex(case.code),
            code_bits=case.code_bits)

    def deliver(self):
        return self.handler.handle_ept_write(self.vcpu, self.event)


def _observed(setup: Setup, result) -> tuple:
    return (setup.inner.copy(), dict(setup.handler.write_state.snapshot()),
            None if result is None else (result.status, dict(result.regs), result.writes,
                                         result.instructions))


def _check_every_k(case: Case, engine: str, how: str) -> int:
    """Deliver the event failing at every k; returns how many deliveries failed."""
    clean_setup = Setup(case, engine)
    clean_setup.memory.calls = clean_setup.memory.stores = 0
    clean_result = clean_setup.deliver()
    assert clean_result.status is Status.EMULATED, clean_result.reason
    clean = {clean_result.instructions: _observed(clean_setup, clean_result)}
    if clean_result.instructions == 2:
        alone = Setup(case, engine, coalesce=False)
        clean[1] = _observed(alone, alone.deliver())
    calls = clean_setup.memory.calls if how == "raise" else clean_setup.memory.stores
    injected = 0
    for fail_at in range(calls + 1):  # the last k is past every call: no failure
        setup = Setup(case, engine)
        before = _observed(setup, None)
        setup.memory.fail_at, setup.memory.how = fail_at, how  # type: ignore[assignment]
        setup.memory.calls = setup.memory.stores = 0
        label = f"{case.name}, {how} at call {fail_at}"
        try:
            result = setup.deliver()
        except InjectedFailure:
            assert how == "raise", label
            result = None
        except CommitIncomplete as error:
            injected += setup.memory.failed
            _check_incomplete(case, setup, before, clean[1][0], error, how, label)
            continue
        injected += setup.memory.failed
        if result is not None and case.code.startswith("f3") and result.status is \
                Status.EMULATED and len(result.writes) < case.regs["rcx"]:
            _check_rep_cut_short(case, engine, setup, result, label)
            continue
        if result is not None and result.status is Status.EMULATED:
            assert result.instructions in clean, label
            assert _observed(setup, result) == clean[result.instructions], label
            continue
        if result is not None:
            assert result.status is Status.CONTENDED, (label, result.status, result.reason)
            assert not result.regs and not result.writes, label
        assert _observed(setup, None)[:2] == before[:2], f"{label}: a refused event changed state"
        assert not setup.vcpu.pt_emu_buffer.valid, label
    return injected


def _check_incomplete(case: Case, setup: Setup, before: tuple, clean_memory, error,
                      how: str, label: str) -> None:
    """A plain store over two blocks whose second entry failed for good: the
    first entry holds the new bytes (as a clean delivery leaves it), the
    failed one and every later one hold what they held, nothing else changed."""
    assert "movups" in case.name and how in ("raise", "refuse_from"), label
    entries = [TABLE_GPA + 8 * (case.entry + index) for index in range(2)]
    assert (error.committed, error.failed) == ((entries[0],), entries[1]), label
    if how == "raise":
        assert isinstance(error.__cause__, InjectedFailure), label
    assert setup.inner.read(entries[0], 8) == clean_memory.read(entries[0], 8), label
    expected = before[0].copy()
    expected.write(entries[0], clean_memory.read(entries[0], 8))
    assert setup.inner == expected, label
    assert dict(setup.handler.write_state.snapshot()) == before[1], label
    assert not setup.vcpu.pt_emu_buffer.valid, label


def _check_rep_cut_short(case: Case, engine: str, setup: Setup, result, label: str) -> None:
    """REP STOSQ whose later entry failed: it stops after the iterations whose
    entries were stored, as an interrupted REP does (SDM: RCX and RDI count
    the iterations done, RIP stays on the instruction so the guest finishes)."""
    kept = len(result.writes)
    gla = case.table_gla + 8 * case.entry
    assert 1 <= kept < case.regs["rcx"], label
    assert dict(result.regs) == {"rcx": case.regs["rcx"] - kept, "rdi": gla + 8 * kept}, label
    for index in range(case.regs["rcx"]):
        gpa = TABLE_GPA + 8 * (case.entry + index)
        value = VALUE if index < kept else _entry(case.entry + index)
        assert int.from_bytes(setup.inner.read(gpa, 8), "little") == value, (label, index)
    # The write state is what a clean delivery of the iterations kept leaves,
    # but for the event identity (the duplicate test's), which is this event's.
    shorter = Setup(Case(case.name, case.code, case.entry, {**case.regs, "rcx": kept}),
                    engine)
    assert shorter.deliver().status is Status.EMULATED

    def states(handler: PtWriteHandler) -> dict:
        return {gpa: replace(state, last_event=None)
                for gpa, state in handler.write_state.snapshot().items()}

    assert states(setup.handler) == states(shorter.handler), label


def _params():
    for case in CASES:
        for how in FAILURES:
            marks = []
            bug = KNOWN_BUGS.get((case.name, how))
            if bug is not None:
                marks.append(pytest.mark.xfail(strict=True, reason=bug))
            yield pytest.param(case, how, marks=marks, id=f"{case.name}-{how}")


@pytest.mark.parametrize("engine", ["auto", "unicorn"])
@pytest.mark.parametrize(("case", "how"), list(_params()))
def test_a_failing_memory_never_leaves_an_instruction_half_committed(case, how, engine):
    assert _check_every_k(case, engine, how) > 0
