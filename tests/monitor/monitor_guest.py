"""A guest for the monitor tests: memory, a monitor, and real instructions.

Every write to a page the monitor protects is done by a real instruction whose
bytes and registers are built here (MOV, XCHG, CMPXCHG, CMPXCHG8B, locked
AND/OR/BTS/BTR, 1-byte and 4-byte stores) and delivered as an EPT write event;
a write to any other page is a plain memory write with no event, as on real
hardware. The expected entry value after each write is checked against memory,
so an encoding mistake here cannot pass silently.
"""

from __future__ import annotations

from dataclasses import dataclass

from ptemu.handler import WriteEvent
from ptemu.memory import InMemoryGuestMemory
from ptemu.monitor import InMemoryProtector, MonitorResult, MonitorStatus, TranslationMonitor
from ptemu.paging import paging_mode
from ptemu.vcpu import Vcpu

P, RW, US, PWT, PCD, A, D, PS, G = 1, 2, 4, 8, 16, 32, 64, 128, 256
PAT_LARGE = 1 << 12
NX = 1 << 63
RIP = 0x40_1000

HOWS_64 = ("mov", "xchg", "cmpxchg", "cmpxchg8b", "and", "or", "bts", "btr", "halves",
           "halves-high-first", "high", "byte")
HOWS_PAE = ("cmpxchg8b", "halves", "halves-high-first", "high", "and", "or", "bts", "btr", "byte")
HOWS_LEGACY = ("mov", "xchg", "cmpxchg", "and", "or", "bts", "btr", "byte")


@dataclass(frozen=True)
class Store:
    """One instruction: where it writes inside the entry, its bytes, its registers."""

    offset: int
    size: int
    code: bytes
    regs: dict[str, int]
    data: bytes
    """The bytes it leaves in memory (what a plain write stores when unprotected)."""


def _bytes_of(value: int, offset: int, size: int) -> bytes:
    return ((value >> (8 * offset)) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def stores(how: str, entry_size: int, bits64: bool, cur: int, new: int) -> list[Store]:
    """The instruction(s) that turn entry value `cur` into `new`, written `how`.

    A read-modify-write `how` that cannot produce `new` from `cur` (an AND that
    would have to set a bit) falls back to an exchange.
    """
    full = (1 << (8 * entry_size)) - 1
    changed = cur ^ new
    if how == "and" and new & ~cur & full:
        how = "xchg"
    if how == "or" and cur & ~new & full:
        how = "xchg"
    if how in ("bts", "btr"):
        single = changed and not changed & (changed - 1)
        if not single or (how == "bts") != bool(new & changed):
            how = "xchg"
    if entry_size == 8 and not bits64 and how in ("mov", "xchg", "cmpxchg"):
        how = "cmpxchg8b"            # 32-bit code writes 8 bytes atomically this way
    if entry_size == 4 and how in ("cmpxchg8b", "halves", "halves-high-first", "high"):
        how = "mov"
    rex = b"\x48" if bits64 else b""
    whole = _bytes_of(new, 0, entry_size)
    if how == "mov":
        return [Store(0, entry_size, rex + b"\x89\x07", {"rax": new}, whole)]
    if how == "xchg":
        return [Store(0, entry_size, rex + b"\x87\x07", {"rax": new}, whole)]
    if how == "cmpxchg":
        return [Store(0, entry_size, b"\xf0" + rex + b"\x0f\xb1\x0f",
                      {"rax": cur, "rcx": new}, whole)]
    if how == "cmpxchg8b":
        return [Store(0, 8, b"\xf0\x0f\xc7\x0f",
                      {"rax": cur & 0xFFFF_FFFF, "rdx": cur >> 32,
                       "rbx": new & 0xFFFF_FFFF, "rcx": new >> 32}, whole)]
    if how == "high" and entry_size == 8 and not changed & 0xFFFF_FFFF:
        return [Store(4, 4, b"\x89\x07", {"rax": new >> 32}, whole[4:])]
    if how == "high":
        how = "halves-high-first"
    if how in ("halves", "halves-high-first"):
        low = Store(0, 4, b"\x89\x07", {"rax": new & 0xFFFF_FFFF}, whole[:4])
        high = Store(4, 4, b"\x89\x07", {"rax": new >> 32}, whole[4:])
        return [low, high] if how == "halves" else [high, low]
    if how in ("and", "or", "bts", "btr"):
        if bits64 or entry_size == 4:
            offset, size, shift = 0, entry_size, 0
        else:  # a 32-bit RMW on the dword of a PAE entry that changes
            offset = 4 if changed >> 32 else 0
            size, shift = 4, 32 * (offset // 4)
            if changed >> 32 and changed & 0xFFFF_FFFF:
                return stores("cmpxchg8b", entry_size, bits64, cur, new)
        part = lambda v: (v >> shift) & ((1 << (8 * size)) - 1)
        prefix = b"\xf0" + (rex if size == 8 else b"")
        if how == "and":
            code, regs = prefix + b"\x21\x07", {"rax": part(new | ~cur)}
        elif how == "or":
            code, regs = prefix + b"\x09\x07", {"rax": part(new)}
        else:
            bit = changed.bit_length() - 1 - shift
            opcode = b"\x0f\xab\x07" if how == "bts" else b"\x0f\xb3\x07"
            code, regs = prefix + opcode, {"rax": bit}
        return [Store(offset, size, code, regs, _bytes_of(new, offset, size))]
    if how == "byte":
        return [Store(k, 1, b"\x88\x07", {"rax": (new >> (8 * k)) & 0xFF},
                      _bytes_of(new, k, 1))
                for k in range(entry_size) if (changed >> (8 * k)) & 0xFF] or [
            Store(0, 1, b"\x88\x07", {"rax": new & 0xFF}, whole[:1])]
    raise AssertionError(f"unknown how {how!r}")


class Guest:
    """Guest memory with a monitor in front of its protected pages."""

    def __init__(self, paging: str, *, timing: str = "cpu", **options: object) -> None:
        self.paging = paging
        self.mode = paging_mode(paging)
        self.memory = InMemoryGuestMemory()
        self.protector = InMemoryProtector()
        self.monitor = TranslationMonitor(self.memory, paging, self.protector, timing=timing,
                                          **options)  # type: ignore[arg-type]
        self.vcpu = Vcpu()
        self.bits64 = paging in ("4level", "5level")
        self.results: list[MonitorResult] = []
        self.events = 0

    @property
    def entry_size(self) -> int:
        return self.mode.entry_size

    def read(self, gpa: int) -> int:
        return int.from_bytes(self.memory.read(gpa, self.entry_size), "little")

    def put(self, gpa: int, value: int) -> None:
        """A plain write (setup, or a page the monitor does not protect)."""
        self.memory.write(gpa, value.to_bytes(self.entry_size, "little"))

    def gla_of(self, gpa: int) -> int:
        """Where the guest maps page-table pages linearly (any address with gpa's offset)."""
        # (32-bit: wrapped to 32 bits, for a table the guest put above 1 GiB)
        return (0xFFFF_8880_0000_0000 + gpa) if self.bits64 else (0xC000_0000 + gpa) & 0xFFFF_FFFF

    def write(self, gpa: int, new: int, how: str = "mov") -> list[MonitorResult]:
        """Make entry `gpa` hold `new` the way `how` says; return the monitor's results."""
        out = []
        for store in stores(how, self.entry_size, self.bits64, self.read(gpa), new):
            target = gpa + store.offset
            if self.protector.is_protected(target):
                regs = {"rip": RIP, "rdi": self.gla_of(target), **store.regs}
                event = WriteEvent(gpa=target, gla=self.gla_of(target), regs=regs,
                                   code=store.code, code_bits=64 if self.bits64 else 32)
                self.vcpu.begin_exit()
                result = self.monitor.handle_ept_write(self.vcpu, event)
                assert result.status is MonitorStatus.HANDLED
                assert result.event is not None and result.event.status.value == "emulated", \
                    result.event
                self.events += 1
                out.append(result)
                self.results.append(result)
            else:
                self.memory.write(target, store.data)
        assert self.read(gpa) == new, f"{how}: entry {gpa:#x} is {self.read(gpa):#x}, not {new:#x}"
        return out
