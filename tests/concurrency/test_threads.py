"""One handler served by several vCPU threads at once.

Before the handler locked itself, four threads sharing one handler killed the
process with SIGSEGV inside Unicorn within 0.2 s, lost `lock add` updates to a
shared entry and let a `KeyError` escape from the decode cache. Here four
threads feed events through the fast engine (MOV, XCHG, LOCK OR, LOCK CMPXCHG,
LOCK ADD) and through Unicorn (MOVUPS, REP STOSQ) on shared and private
entries with a 1 us switch interval; afterwards
memory and write state must equal a sequential replay of the same events in
the order their commits happened, and every `lock add` must be counted.
"""

from __future__ import annotations

import random
import threading

import pytest
from racing import run_threads

from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.memory import InMemoryGuestMemory
from ptemu.status import Policy, Status
from ptemu.vcpu import Vcpu

TABLE_GPA = 0x20_0000
TABLE_GLA = 0xFFFF_8880_0020_0000
RIP = 0xFFFF_FFFF_8100_0000
THREADS = 4
EVENTS_PER_THREAD = 400
SHARED_ENTRY = 0            # every thread's `lock add` lands here
SHARED_OTHERS = range(1, 8)  # MOV, XCHG, LOCK OR, CMPXCHG from every thread land here too
PRIVATE_BASE = 16           # thread t owns entries 16 + 32 t .. 16 + 32 t + 31

LOCK_ADD = bytes.fromhex("f0 48 01 07")        # lock add [rdi], rax
LOCK_OR = bytes.fromhex("f0 48 09 07")         # lock or [rdi], rax
CMPXCHG = bytes.fromhex("f0 48 0f b1 0f")      # lock cmpxchg [rdi], rcx
MOV = bytes.fromhex("48 89 07")                # mov [rdi], rax
XCHG = bytes.fromhex("48 87 07")               # xchg [rdi], rax
MOVUPS = bytes.fromhex("0f 11 07")             # movups [rdi], xmm0 (Unicorn engine)
REP_STOSQ = bytes.fromhex("f3 48 ab")          # rep stosq (Unicorn engine)


class _CommitLog(InMemoryGuestMemory):
    """Guest memory that logs, per successful compare-and-store, the event
    the committing thread is serving (the commit order)."""

    __slots__ = ("current", "order")

    def __init__(self) -> None:
        super().__init__()
        self.current = threading.local()
        self.order: list[tuple[int, WriteEvent]] = []

    def compare_and_store(self, gpa: int, expected: bytes, new: bytes) -> bool:
        done = super().compare_and_store(gpa, expected, new)
        if done and getattr(self.current, "event", None) is not None:
            self.order.append(self.current.event)
            self.current.event = None  # one log line per event, even for coalesced pairs
        return done


def _events(thread: int, seed: int) -> list[tuple[WriteEvent, int]]:
    """(event, increment) pairs: increments count only for the shared `lock add`."""
    generator = random.Random(seed)
    out = []
    for _ in range(EVENTS_PER_THREAD):
        kind = generator.randrange(7)
        slot = PRIVATE_BASE + 32 * thread + generator.randrange(30)
        if kind < 4 and generator.randrange(2):  # MOV, XCHG, LOCK OR, CMPXCHG: shared half the time
            slot = generator.choice(SHARED_OTHERS)
        value = generator.getrandbits(64)
        regs = {"rip": RIP, "rdi": TABLE_GLA + 8 * slot, "rax": value}
        code, increment = (MOV, XCHG, LOCK_OR, CMPXCHG, MOVUPS, REP_STOSQ, LOCK_ADD)[kind], 0
        if code is LOCK_ADD:
            regs["rdi"] = TABLE_GLA + 8 * SHARED_ENTRY
            regs["rax"] = increment = generator.randrange(1, 1000)
        elif code is CMPXCHG:  # compares with 0 (entries start at 0) or a random value
            regs["rax"] = generator.choice((0, value))
            regs["rcx"] = generator.getrandbits(64)
        elif code is MOVUPS:  # 8-byte aligned: across a 16-byte boundary half the time
            regs["xmm0"] = generator.getrandbits(128)
        elif code is REP_STOSQ:
            regs["rcx"] = 2
        gla = regs["rdi"]
        out.append((WriteEvent(gpa=TABLE_GPA + gla - TABLE_GLA, gla=gla, regs=regs, code=code,
                               code_bits=64), increment))
    return out


def test_threads_sharing_one_handler_lose_nothing_and_equal_the_sequential_replay() -> None:
    memory = _CommitLog()
    handler = PtWriteHandler(memory, "4level", policy=Policy.STRICT)
    plans = [_events(thread, seed=thread) for thread in range(THREADS)]

    def serve(plan: list[tuple[WriteEvent, int]]) -> None:
        vcpu = Vcpu()
        for event, _ in plan:
            vcpu.begin_exit()
            memory.current.event = event
            result = handler.handle_ept_write(vcpu, event)
            assert result.status is Status.EMULATED, result.reason

    assert run_threads(serve, plans) == []
    assert len(memory.order) == THREADS * EVENTS_PER_THREAD

    expected_sum = sum(increment for plan in plans for _, increment in plan) % (1 << 64)
    shared = int.from_bytes(memory.read(TABLE_GPA + 8 * SHARED_ENTRY, 8), "little")
    assert shared == expected_sum, "a lock add was lost"

    sequential_memory = InMemoryGuestMemory()
    sequential = PtWriteHandler(sequential_memory, "4level", policy=Policy.STRICT)
    vcpu = Vcpu()
    for event in memory.order:
        vcpu.begin_exit()
        assert sequential.handle_ept_write(vcpu, event).status is Status.EMULATED
    assert sequential_memory == InMemoryGuestMemory(
        [(TABLE_GPA, memory.read(TABLE_GPA, 0x1000))])
    assert sequential.pending() == handler.pending()
    states = {gpa: handler.write_state.get(gpa) for gpa in handler.write_state}
    assert {gpa: sequential.write_state.get(gpa) for gpa in sequential.write_state} == states


@pytest.mark.parametrize("engine", ["auto", "unicorn"])
def test_four_threads_of_lock_add_on_one_entry_lose_no_increment(engine: str) -> None:
    """The attack from issue 14: 4 threads x `lock add` on one shared entry
    (517 of 81,279 updates were lost before the handler locked itself)."""
    memory = InMemoryGuestMemory()
    handler = PtWriteHandler(memory, "4level", engine=engine)
    per_thread = 20000 if engine == "auto" else 250
    increments = [[random.Random(thread).randrange(1, 1 << 20) for _ in range(per_thread)]
                  for thread in range(THREADS)]

    def serve(mine: list[int]) -> None:
        vcpu = Vcpu()
        gla = TABLE_GLA + 8 * SHARED_ENTRY
        for increment in mine:
            vcpu.begin_exit()
            result = handler.handle_ept_write(vcpu, WriteEvent(
                gpa=TABLE_GPA + 8 * SHARED_ENTRY, gla=gla,
                regs={"rip": RIP, "rdi": gla, "rax": increment}, code=LOCK_ADD,
                code_bits=64))
            assert result.status is Status.EMULATED, result.reason

    assert run_threads(serve, increments) == []
    total = sum(map(sum, increments))
    assert int.from_bytes(memory.read(TABLE_GPA + 8 * SHARED_ENTRY, 8), "little") == total
