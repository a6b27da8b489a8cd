"""The EPT write-violation handler: decode, check, emulate, commit, reassemble.

An introspection engine write-protects a guest's page-table pages in the EPT
and calls `PtWriteHandler.handle_ept_write` from the write-violation exit with
the vCPU's registers *before* the instruction, the bytes at RIP, and the
faulting GPA and GLA. The handler

1. decodes the instruction (Capstone, cached by code size and bytes);
2. checks that its destination covers the faulting GLA (else `REJECTED`) and
   stays in the faulting page (else `UNSUPPORTED`; REP string instructions
   are cut at the page end instead);
3. emulates it (ptemu's fast engine for the common instructions, Unicorn for
   the rest) against a snapshot of the entries and commits the
   stored bytes with an atomic compare-and-store over the entries it wrote
   (entry by entry when they cross a 16-byte boundary: `_commit_entries`),
   starting over when an entry changed meanwhile (the CPU sets A/D bits
   behind our back), at most `max_commit_attempts` times (else `CONTENDED`);
4. in 32-bit PAE code, when the write leaves its entry partial, emulates a
   following store of the other half of the same entry in the same exit
   (semantics.md section 2; see `PtWriteHandler._leaves_entry_partial`);
5. fills the vCPU's PtEmuBuffer and feeds every write record to its entry's
   write state, reporting each entry `COMPLETE` (classified), `PARTIAL` or
   `DUPLICATE`.

Whatever the guest does, the handler returns a status: an event that is not
`EMULATED` has changed neither guest memory, nor registers, nor write state.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from ptemu.atomic import atomic_block
from ptemu.decoder.capstone_adapter import CapstoneDecoder, DecodeRefusal
from ptemu.decoder.families import Access
from ptemu.decoder.model import (
    SUB_REGISTERS,
    DecodedStore,
    destination_address,
    linear_address,
)
from ptemu.emulator import UnicornEmulator, settle_engine_registers
from ptemu.engines import DEFAULT_ENGINE, ENGINES, Engine
from ptemu.errors import PtemuError, UsageError
from ptemu.fastpath import FastEmulator, compile_fast
from ptemu.memory import GuestMemory
from ptemu.paging.modes import PagingMode, paging_mode
from ptemu.paging.walk import walk
from ptemu.registers import (
    REGISTER_DEFAULTS,
    REGISTER_NAMES,
    register_value,
    validate_registers,
)
from ptemu.results import EntryResult, EventResult, WriteRecord
from ptemu.status import EntryState, Policy, Status
from ptemu.values import PAGE_SIZE, mask_bits, page_base, page_offset
from ptemu.vcpu import Vcpu
from ptemu.writestate import EntryWriteState, WriteInput, WriteOutcome, WriteStateTable

DEFAULT_DECODE_CACHE_SIZE = 4096
"""Distinct instructions kept decoded (least recently used ones go first)."""
DEFAULT_MAX_COMMIT_ATTEMPTS = 16
"""Emulate-and-commit rounds before an ever-changing entry gives `CONTENDED`."""
LATER_ENTRY_ATTEMPTS = 256
"""Retries of a later entry of a store committed entry by entry, once the first
entries hold its bytes (then `CommitIncomplete`; see `_commit_entries`)."""

_DEFAULT_FLAGS = REGISTER_DEFAULTS["rflags"]
_CHECKED_NAME_SETS = 64
"""Register-name tuples remembered as valid, so most events skip the check."""
_U64 = mask_bits(64)
_U32 = mask_bits(32)
_DF = 1 << 10
_CR4_PSE = 1 << 4
_EFER_NXE = 1 << 11


class CommitIncomplete(PtemuError):
    """A store over several entries that no single compare-and-store holds was
    committed in part: its first entries hold the new bytes, a later one does
    not, because the memory kept refusing (`LATER_ENTRY_ATTEMPTS` times) or
    raised.

    Only a broken or failing `GuestMemory` causes this: a refusal means the
    entry changed between a read and the compare-and-store, and a guest whose
    tables are write-protected changes an entry without an exit only through
    the CPU's Accessed and Dirty bits, a few times at most. No register and no
    write state was changed and the PtEmuBuffer stays empty, so the exit can
    be treated as not emulated: the guest executes the store again, which
    stores the same bytes (they do not depend on the destination).
    """

    def __init__(self, text: str, window_gpa: int, committed: range, failed: int,
                 error: Exception | None) -> None:
        self.committed = tuple(window_gpa + start for start in committed)
        """GPAs of the entries that hold the new bytes."""
        self.failed = window_gpa + failed
        """GPA of the entry that does not."""
        why = f"the memory raised {error!r}" if error is not None else (
            f"its compare-and-store failed {LATER_ENTRY_ATTEMPTS} times")
        held = ", ".join(f"{gpa:#x}" for gpa in self.committed)
        super().__init__(f"'{text}': entries {held} were committed, but not {self.failed:#x}: "
                         f"{why}")


@dataclass(frozen=True, slots=True)
class WriteEvent:
    """One EPT write violation on a page-table page, as the hypervisor saw it."""

    gpa: int
    """Guest-physical address of the first byte the faulting access wrote."""
    gla: int
    """Guest-linear address of that byte."""
    regs: Mapping[str, int]
    """The vCPU's registers before the instruction (`ptemu.registers` names)."""
    code: bytes
    """The bytes at RIP: the whole instruction, and more for PAE coalescing."""
    code_bits: int
    """16, 32 or 64: the operating size of the faulting code."""


_Decoded = tuple[DecodedStore | DecodeRefusal, FastEmulator | None, bytes]
"""A decode-cache entry: the store (or why not), its fast-engine closure and
the instruction's own bytes (one shared object: part of the strict duplicate
identity, so an event does not slice its code to build it)."""

_Fingerprint = tuple[int, int, bytes, tuple[str, ...], tuple[int, ...]]
"""An event's identity for the strict duplicate test (semantics.md section 3):
GPA, code size, instruction bytes, register names and register values (RIP
among them), compared exactly with ``==``."""


@dataclass(slots=True)
class _Emulated:
    """One instruction emulated and committed (internal, built once per event)."""

    store: DecodedStore
    instruction: bytes
    """The instruction's bytes (shared with the decode cache)."""
    rip: int
    registers: dict[str, int]
    writes: tuple[WriteRecord, ...]
    entries_after: dict[int, int]
    """Whole value of each entry written, after the instruction."""


@dataclass(frozen=True, slots=True)
class _Refused:
    status: Status
    reason: str
    fault: str | None = None


class PtWriteHandler:
    """Emulates guest writes to one guest's write-protected page tables.

    One handler serves one guest (its memory, its paging mode and the write
    state of its entries) and any number of vCPUs; it holds no global state.
    It is thread-safe: one thread per vCPU may call it at once. A lock per
    handler serialises its public methods, because the emulation is Python
    under the GIL anyway (nothing runs in parallel to gain), Unicorn's engine
    must never be entered by two threads, and the write state, the decode
    cache and the commit of one event must be seen whole by the next. An
    uncontended acquire costs well under 1 % of an event (docs/concurrency.md).
    """

    def __init__(self, memory: GuestMemory, paging: str | PagingMode, *,
                 policy: Policy | str = Policy.STRICT, coalesce: bool = True,
                 max_commit_attempts: int = DEFAULT_MAX_COMMIT_ATTEMPTS,
                 decode_cache_size: int = DEFAULT_DECODE_CACHE_SIZE,
                 table_levels: Mapping[int, int] | None = None,
                 engine: Engine | str = DEFAULT_ENGINE) -> None:
        """`engine` is ``"auto"`` (the default: ptemu's pure-Python fast engine
        where it applies, Unicorn for the rest; the two agree bit for bit, which
        the test suite checks) or ``"unicorn"`` (every instruction in Unicorn).
        `table_levels` optionally maps a page-table page's GPA to its level
        (1 = PTE ... 5 = PML5E), which lets `classify` read bit 7 as PAT or PS."""
        if engine not in ENGINES:
            raise UsageError(f"unknown engine {engine!r}: expected one of {ENGINES}")
        self.engine = Engine(engine)
        self._fast_engine = self.engine is Engine.AUTO
        self.mode = paging if isinstance(paging, PagingMode) else paging_mode(paging)
        try:
            self.policy = Policy(policy)
        except ValueError:
            raise UsageError(f"unknown policy {policy!r}: expected 'strict' or 'hvmi'") from None
        if max_commit_attempts < 1:
            raise UsageError("max_commit_attempts must be at least 1")
        if decode_cache_size < 1:
            raise UsageError("decode_cache_size must be at least 1")
        self.memory = memory
        self.coalesce = coalesce
        self.max_commit_attempts = max_commit_attempts
        self.entry_size = self.mode.entry_size
        self.table_levels = dict(table_levels or {})
        self.write_state = WriteStateTable()
        self._guest_is_32bit = self.mode.name in ("legacy", "pae")
        self._code_sizes = (16, 32) if self._guest_is_32bit else (16, 32, 64)
        self._checked_names: set[tuple[str, ...]] = set()
        self._decoder = CapstoneDecoder()
        self._emulator = UnicornEmulator()
        self._decode_cache: OrderedDict[tuple[int, bytes], _Decoded] = OrderedDict()
        self._lock = threading.Lock()
        self._gpa_limit = 1 << self.mode.maxphyaddr
        # Canonical: bits 63..N-1 all equal, i.e. (address + 2**(N-1)) mod 2**64 < 2**N.
        self._canonical_half = 1 << (self.mode.linear_address_bits - 1)
        self._canonical_span = 1 << self.mode.linear_address_bits
        self._decode_cache_size = decode_cache_size

    # -- public API ---------------------------------------------------------

    def handle_ept_write(self, vcpu: Vcpu, event: WriteEvent) -> EventResult:
        """Emulate the write behind one EPT violation; see the module docstring.

        Raises `UsageError` for what the caller got wrong (a GPA or GLA that is
        not a 64-bit address or a GPA past MAXPHYADDR, code that is not bytes,
        unknown register names, a code size the mode cannot run, a register
        value that is not an int) and then has changed nothing. Register values
        are checked where it is cheap, to keep the common event lean: every
        value (type and width) when the event goes through Unicorn, and on the
        fast engine's path the type of each value the instruction reads
        (a value it does not read cannot change the result). Whatever the
        guest did comes back as a status; a destination that is not canonical
        is `FAULT` with ``#GP(0)`` (``#SS(0)`` through SS), as the CPU raises
        it before any access: such an event cannot come from a real exit.
        A `GuestMemory` that raises is not wrapped (its exception escapes and
        nothing was changed), except after part of a store over several
        entries was committed: see `CommitIncomplete`.
        """
        gpa, gla = event.gpa, event.gla
        if type(gpa) is not int or type(gla) is not int or not (
                0 <= gpa < self._gpa_limit and 0 <= gla <= _U64):
            raise UsageError(f"event: GPA {gpa!r} / GLA {gla!r}: expected integers, the GPA "
                             f"below {self._gpa_limit:#x} (MAXPHYADDR), the GLA below 2**64")
        if not isinstance(event.code, (bytes, bytearray)):
            raise UsageError(f"event: code must be bytes, got {type(event.code).__name__}")
        with self._lock:
            try:
                return self._handle(vcpu, event)
            except TypeError as error:  # a register value that is not an int
                raise UsageError(f"event: a value of the wrong type: {error}") from None

    def _handle(self, vcpu: Vcpu, event: WriteEvent) -> EventResult:
        if event.code_bits not in self._code_sizes:
            raise UsageError(f"code_bits {event.code_bits!r} is not possible in "
                             f"{self.mode.name} paging (expected one of {self._code_sizes})")
        names = tuple(event.regs)
        if names not in self._checked_names:
            unknown = sorted(set(names) - REGISTER_NAMES)
            if unknown:
                raise UsageError(f"unknown register names {unknown}")
            if "rip" not in event.regs:
                raise UsageError("registers: 'rip' is required")
            if len(self._checked_names) < _CHECKED_NAME_SETS:
                self._checked_names.add(names)  # an integration passes the same names
        buffer = vcpu.pt_emu_buffer
        if buffer.valid:
            return EventResult(Status.ALREADY_INITIALIZED,
                               reason="a page-table write was already emulated in this exit")
        if page_offset(event.gla) != page_offset(event.gpa):
            return EventResult(Status.REJECTED, reason=(
                f"GLA {event.gla:#x} and GPA {event.gpa:#x} are at different page offsets"))
        first = self._emulate_one(event.code_bits, event.code, event.regs, event.gpa, event.gla)
        if isinstance(first, _Refused):
            return EventResult(first.status, reason=first.reason, fault=first.fault)
        # The strict duplicate identity: the values themselves, never a hash of
        # them (a guest can pick RIPs whose hashes collide, e.g. 0x2 and 2**64-6).
        fingerprint: _Fingerprint | None = (
            (event.gpa, event.code_bits, first.instruction, names,
             tuple(event.regs.values()))
            if self.policy is Policy.STRICT else None)
        done = [first]
        peeked: tuple[EntryWriteState | None, WriteOutcome] | None = None
        if self._may_coalesce(event, first):
            partial, peeked = self._leaves_entry_partial(first, fingerprint)
            if partial:
                second = self._coalesce_second_half(event, first)
                if second is not None:
                    done.append(second)
        return self._finish(vcpu, event, done, fingerprint, peeked)

    def flush(self, entry_gpa: int) -> EntryResult | None:
        """Report a pending entry as complete with its value in memory now.

        Returns None when the entry has nothing pending.
        """
        entry_gpa -= entry_gpa % self.entry_size
        with self._lock:
            now = int.from_bytes(self.memory.read(entry_gpa, self.entry_size), "little")
            outcome = self.write_state.flush(entry_gpa, now)
        if outcome is None:
            return None
        return self._entry_result(entry_gpa, outcome.state, outcome.old, outcome.new)

    def set_table_level(self, page_gpa: int, level: int | None) -> None:
        """Record that the page-table page at `page_gpa` is read at `level`
        (1 = PTE ... 5 = PML5E), or forget its level (None).

        What a user that tracks the hierarchy (the translation monitor) calls as
        tables come and go, so that `classify` reads bit 7 of a completed entry
        as PS or PAT rightly; under the handler's lock, so an event on another
        thread sees the level before or after, never a half-updated mapping.
        `table_levels` stays readable. Raises `UsageError` for a GPA that is
        not a page-aligned non-negative integer or a level outside the mode's.
        """
        if isinstance(page_gpa, bool) or not isinstance(page_gpa, int) or page_gpa < 0 \
                or page_gpa % PAGE_SIZE:
            raise UsageError(f"table page {page_gpa!r}: expected a page-aligned GPA")
        if level is not None and (isinstance(level, bool) or not isinstance(level, int)
                                  or not 1 <= level <= len(self.mode.levels)):
            raise UsageError(f"table level {level!r}: expected 1 to {len(self.mode.levels)} "
                             "or None")
        with self._lock:
            if level is None:
                self.table_levels.pop(page_gpa, None)
            else:
                self.table_levels[page_gpa] = level

    def forget_page(self, page_gpa: int) -> tuple[int, ...]:
        """Drop the write state of every entry in the page at `page_gpa`; return
        the entries that had a partial write pending, in address order.

        For a page that stops being watched (the translation monitor calls it when
        it unprotects a page): the guest's writes to it no longer reach the
        handler, so a pending entry's remembered value, and the last write a
        duplicate is recognised by, would be stale by the time the page is
        watched again (a table freed, reused as data, linked again): a write that
        then completes the entry would report an old value memory never held.
        Raises `UsageError` for a GPA that is not a page-aligned non-negative integer.
        """
        if isinstance(page_gpa, bool) or not isinstance(page_gpa, int) or page_gpa < 0 \
                or page_gpa % PAGE_SIZE:
            raise UsageError(f"page {page_gpa!r}: expected a page-aligned GPA")
        forgotten = []
        with self._lock:
            table = self.write_state
            for entry_gpa in range(page_gpa, page_gpa + PAGE_SIZE, self.entry_size):
                state = table.get(entry_gpa)
                if state is None:
                    continue
                if state.is_pending:
                    forgotten.append(entry_gpa)
                table.forget(entry_gpa)
        return tuple(forgotten)

    def pending(self) -> tuple[int, ...]:
        """GPAs of the entries with a partial write pending, in address order."""
        with self._lock:
            return self.write_state.pending()

    # -- decoding -----------------------------------------------------------

    def decode(self, code_bits: int, code: bytes) -> DecodedStore | DecodeRefusal:
        """Decode (or recall) the instruction at the start of `code`."""
        with self._lock:
            return self._decoded(code_bits, code)[0]

    def _decoded(self, code_bits: int, code: bytes) -> _Decoded:
        """The cache entry: the decoded store and its fast-engine closure."""
        key = (code_bits, bytes(code[:15]))
        cached = self._decode_cache.get(key)
        if cached is not None:
            self._decode_cache.move_to_end(key)
            return cached
        decoded = self._decoder.decode(code_bits, code)
        fast = None
        instruction = b""
        if isinstance(decoded, DecodedStore):
            instruction = key[1][:decoded.length]
            if self._fast_engine:
                fast = compile_fast(decoded)
        entry = (decoded, fast, instruction)
        self._decode_cache[key] = entry
        if len(self._decode_cache) > self._decode_cache_size:
            self._decode_cache.popitem(last=False)
        return entry

    # -- one instruction ----------------------------------------------------

    def _emulate_one(self, code_bits: int, code: bytes, regs: Mapping[str, int], gpa: int,
                     gla: int) -> _Emulated | _Refused:
        decoded, fast_emulator, instruction = self._decoded(code_bits, code)
        if isinstance(decoded, DecodeRefusal):
            return _Refused(Status.UNSUPPORTED, decoded.reason)
        store = decoded
        rip = regs["rip"] & (_U64 if code_bits == 64 else _U32)
        address = destination_address(store, regs, rip)
        size = store.access_size
        if code_bits == 64 and ((address + self._canonical_half) & _U64 >= self._canonical_span
                                or (address + size - 1 + self._canonical_half) & _U64
                                >= self._canonical_span):
            # The CPU checks this before any access: no EPT exit can follow.
            fault = "#SS(0)" if store.destination.segment == "ss" else "#GP(0)"
            return _Refused(Status.FAULT, (
                f"'{store.text}' writes {address:#x}, not canonical with "
                f"{self.mode.linear_address_bits}-bit linear addresses"), fault=fault)
        if not address <= gla < address + size:
            return _Refused(Status.REJECTED, (
                f"'{store.text}' writes {address:#x}..{address + size - 1:#x}, "
                f"not the faulting GLA {gla:#x}"))
        alignment = size if store.family.alignment == -1 else store.family.alignment
        if address % alignment:
            return _Refused(Status.FAULT, (
                f"'{store.text}' needs a {alignment}-byte aligned destination, got {address:#x}"),
                fault="#GP(0)")
        span = self._written_span(store, regs, address)
        if isinstance(span, _Refused):
            return span
        source_pages: list[tuple[int, bytes]] = []
        if store.source is not None:
            source = self._read_source(store, regs, rip, span[2], page_base(gla),
                                       page_base(gpa))
            if isinstance(source, _Refused):
                return source
            source_pages, iterations = source
            span = self._written_span(store, regs, address, limit=iterations)
            assert not isinstance(span, _Refused)
        low, high, iterations = span
        page_gla = page_base(gla)
        page_gpa = page_base(gpa)
        # Offsets of the written bytes inside the page, entry-aligned for the commit.
        low_offset = low - page_gla
        high_offset = high - page_gla
        entry_low = low_offset - low_offset % self.entry_size
        entry_high = -(-high_offset // self.entry_size) * self.entry_size
        span_size = entry_high - entry_low
        first = low_offset - entry_low  # the written bytes inside the entry window
        last = high_offset - entry_low
        window_gpa = page_gpa + entry_low
        whole = span_size == self.entry_size or atomic_block(window_gpa, span_size) is not None
        if not whole and store.family.access is Access.READ_MODIFY_WRITE:
            return _Refused(Status.UNSUPPORTED, (
                f"'{store.text}' reads and writes {window_gpa:#x}..{window_gpa + span_size - 1:#x}"
                ", across a 16-byte boundary: no compare-and-store commits it atomically"))
        for _attempt in range(self.max_commit_attempts):
            registers: dict[str, int] | None = None
            if fast_emulator is not None:  # a form the fast engine handles
                before = self.memory.read(window_gpa, span_size)
                done = fast_emulator(regs, before[first:last])
                after = before[:first] + done.stored + before[last:]
                registers = done.registers
            if registers is None:
                snapshot = self.memory.read(page_gpa, PAGE_SIZE)
                run = self._run(store, code, regs, [(page_gla, snapshot), *source_pages],
                                iterations)
                if isinstance(run, _Refused):
                    return run
                page_after, registers = run
                if page_after[:low_offset] != snapshot[:low_offset] or \
                        page_after[high_offset:] != snapshot[high_offset:]:
                    return _Refused(Status.UNSUPPORTED,
                                    f"'{store.text}' wrote outside the bytes it addresses")
                before = snapshot[entry_low:entry_high]
                after = page_after[entry_low:entry_high]
            if whole:
                if self.memory.compare_and_store(window_gpa, before, after):
                    break
                continue
            committed = self._commit_entries(store, regs, window_gpa, first, last, before, after)
            if committed is None:  # the first entry changed: start over
                continue
            before, after, kept = committed
            if kept is not None:  # a REP stopped after `kept` whole iterations
                cut = self._run(store, code, regs, [(page_gla, snapshot), *source_pages], kept)
                assert not isinstance(cut, _Refused), "fewer steps of a run that worked"
                registers = cut[1]
                if bool(register_value(regs, "rflags") & _DF):
                    first = last - kept * size
                else:
                    last = first + kept * size
            break
        else:
            return _Refused(Status.CONTENDED, (
                f"the entries at {window_gpa:#x} kept changing during "
                f"{self.max_commit_attempts} attempts"))
        writes, entries_after = self._records(store, regs, window_gpa, first, last,
                                              before, after)
        return _Emulated(store, instruction, rip, registers, writes, entries_after)

    def _commit_entries(self, store: DecodedStore, regs: Mapping[str, int], window_gpa: int,
                        first: int, last: int, before: bytes, after: bytes,
                        ) -> tuple[bytes, bytes, int | None] | None:
        """Commit a window no single compare-and-store can hold (it crosses a
        16-byte boundary) entry by entry, in the order the guest writes them.

        Returns None when the first entry changed since it was read: nothing
        is committed and the caller starts over. Otherwise ``(before, after,
        kept)``: the window as committed (an entry stored on a retry shows the
        value it had then) and None, or, for a REP instruction whose later
        entry failed where an iteration ends, the whole iterations committed;
        the guest re-executes the rest, as after an interrupted REP. A later
        entry that fails elsewhere (a plain store, or an iteration across two
        entries) is read again and stored with the same bytes spliced in: the
        bytes of a plain store or a string store do not depend on the
        destination, and the entries already stored cannot be taken back.
        When that keeps failing (`LATER_ENTRY_ATTEMPTS`) or the memory raises
        there, `CommitIncomplete` says which entries hold the new bytes.
        Only read-modify-writes never get here (`_emulate_one` refuses them).
        """
        size = self.entry_size
        memory = self.memory
        starts = range(0, len(before), size)
        downwards = store.rep and bool(register_value(regs, "rflags") & _DF)
        if downwards:
            starts = starts[::-1]
        step = store.access_size
        for index, start in enumerate(starts):
            end = start + size
            if index == 0:
                if not memory.compare_and_store(window_gpa + start, before[start:end],
                                                after[start:end]):
                    return None
                continue
            error: Exception | None = None
            try:
                if memory.compare_and_store(window_gpa + start, before[start:end],
                                            after[start:end]):
                    continue
            except Exception as raised:  # noqa: BLE001 - the memory's own error, reported below
                error = raised
            done = last - end if downwards else start - first
            if store.rep and done % step == 0:
                return before, after, done // step
            low, high = max(first, start), min(last, end)
            try:
                for _retry in range(LATER_ENTRY_ATTEMPTS if error is None else 0):
                    current = memory.read(window_gpa + start, size)
                    new = current[:low - start] + after[low:high] + current[high - start:]
                    if memory.compare_and_store(window_gpa + start, current, new):
                        before = before[:start] + current + before[end:]
                        after = after[:start] + new + after[end:]
                        break
                else:
                    raise CommitIncomplete(store.text, window_gpa, starts[:index], start,
                                           error) from error
            except CommitIncomplete:
                raise
            except Exception as raised:  # the memory failed on the retry
                raise CommitIncomplete(store.text, window_gpa, starts[:index], start,
                                       raised) from raised
        return before, after, None

    def _written_span(self, store: DecodedStore, regs: Mapping[str, int],
                      address: int, limit: int | None = None) -> tuple[int, int, int] | _Refused:
        """Linear [low, high) the instruction writes in the faulting page, and
        the REP iterations that stay inside it (1 when not REP), at most `limit`."""
        size = store.access_size
        page = page_base(address)
        if page_base(address + size - 1) != page:
            return _Refused(Status.UNSUPPORTED, (
                f"'{store.text}' writes {address:#x}..{address + size - 1:#x}, "
                "across the end of the page"))
        if not store.rep:
            return address, address + size, 1
        # The count is rCX at the address size (CX, ECX or RCX).
        count = register_value(regs, "rcx") & mask_bits(store.destination.address_bits)
        if count == 0:
            return _Refused(Status.REJECTED, f"'{store.text}' with a zero count writes nothing")
        if limit is not None:
            count = min(count, limit)
        downwards = bool(register_value(regs, "rflags") & _DF)
        if downwards:
            iterations = min(count, (address - page) // size + 1)
            return address - (iterations - 1) * size, address + size, iterations
        iterations = min(count, (page + PAGE_SIZE - address) // size)
        return address, address + iterations * size, iterations

    def _read_source(self, store: DecodedStore, regs: Mapping[str, int], rip: int,
                     iterations: int, destination_page: int, destination_gpa: int,
                     ) -> tuple[list[tuple[int, bytes]], int] | _Refused:
        """The guest pages MOVS reads, found through the guest's own page
        tables (CR3 in the registers), and the iterations they allow.

        Iterations stop where the source stops translating, as they stop at
        the destination page's end: the guest re-executes the rest. They
        also stop before a read from the page being written, whether through
        its own linear page or through an alias (another linear page mapped
        to the same GPA): the engine copies from a snapshot taken before the
        first iteration, while the CPU's result would depend on how it orders
        a fast-string copy, which nothing in the event shows. When the very
        first read is such a read, the event is `UNSUPPORTED`.
        """
        assert store.source is not None
        width = 64 if store.code_bits == 64 else 32
        next_rip = (rip + store.length) & mask_bits(width)
        first = linear_address(store.source, regs, store.code_bits, next_rip)
        size = store.access_size
        downwards = bool(register_value(regs, "rflags") & _DF) and store.rep
        step = -size if downwards else size
        pages: dict[int, bytes] = {}
        allowed = 0
        problem: str | None = None
        while allowed < iterations:
            problem = self._map_source(pages, (first + allowed * step) & mask_bits(width), size,
                                       destination_page, destination_gpa, regs)
            if problem is not None:
                break
            allowed += 1
        if allowed == 0:
            return _Refused(Status.UNSUPPORTED, f"'{store.text}': its source at {first:#x} "
                                                f"{problem}")
        return list(pages.items()), allowed

    def _map_source(self, pages: dict[int, bytes], start: int, size: int,
                    destination_page: int, destination_gpa: int, regs: Mapping[str, int],
                    ) -> str | None:
        """Add the pages one source read touches to `pages`; None when done,
        else why it cannot be (the end of a sentence about the source)."""
        for page in (page_base(start), page_base(start + size - 1)):
            if page in pages:
                continue
            if page == destination_page:
                return "lies in the page it writes"
            if len(pages) == 2:
                return "needs a third source page"
            translated = self._read_linear_page(page, regs)
            if translated is None:
                return f"does not translate through CR3 {register_value(regs, 'cr3'):#x}"
            gpa, contents = translated
            if gpa == destination_gpa:
                return (f"reads linear page {page:#x}, an alias of the page it writes "
                        f"(GPA {gpa:#x})")
            pages[page] = contents
        return None

    def _read_linear_page(self, page_gla: int, regs: Mapping[str, int],
                          ) -> tuple[int, bytes] | None:
        """The GPA and the 4 KiB of linear `page_gla`, through the guest's page
        tables; None when it does not translate."""
        cr4 = register_value(regs, "cr4")
        efer = register_value(regs, "efer")
        try:
            translation = walk(self.mode, register_value(regs, "cr3"), page_gla, self.memory,
                               pse=bool(cr4 & _CR4_PSE) or "cr4" not in regs,
                               nxe=bool(efer & _EFER_NXE) or "efer" not in regs)
        except UsageError:
            return None
        if translation.gpa is None:
            return None
        gpa = page_base(translation.gpa)
        return gpa, self.memory.read(gpa, PAGE_SIZE)

    def _run(self, store: DecodedStore, code: bytes, regs: Mapping[str, int],
             data_pages: list[tuple[int, bytes]], iterations: int,
             ) -> tuple[bytes, dict[str, int]] | _Refused:
        if store.family.register_store:
            return self._register_store(store, regs, data_pages[0])
        # Unicorn takes every register: check all of them here, where it costs
        # nothing next to the run (the fast engine fails on a bad one it reads).
        validate_registers(regs, require_rip=False)
        vector: tuple[str, ...] = ()
        if store.source_register is not None and store.source_register.startswith("xmm"):
            vector = (store.source_register,)
        try:
            run = self._emulator.run(code_bits=store.code_bits, registers=regs, code=code,
                                     data_pages=data_pages, steps=iterations,
                                     vector_registers=vector)
        except Exception as error:  # noqa: BLE001 - whatever the engine raises, the guest must not stall
            return _Refused(Status.UNSUPPORTED, f"'{store.text}': emulation failed: {error}")
        if run.fault is not None:
            return _Refused(Status.FAULT, f"'{store.text}' raises {run.fault}", fault=run.fault)
        if run.refusal is not None:
            return _Refused(Status.UNSUPPORTED, f"'{store.text}': {run.refusal}")
        registers = run.registers
        settle_engine_registers(store, regs, registers)
        return run.page, registers

    @staticmethod
    def _register_store(store: DecodedStore, regs: Mapping[str, int],
                        page: tuple[int, bytes]) -> tuple[bytes, dict[str, int]] | _Refused:
        """A plain register-to-memory move ptemu performs itself (VEX stores)."""
        if store.source_register is None:
            return _Refused(Status.UNSUPPORTED, f"'{store.text}' has no source register")
        value = SUB_REGISTERS[store.source_register].read(regs)
        width = 64 if store.code_bits == 64 else 32
        address = destination_address(store, regs, register_value(regs, "rip"))
        offset = address - page[0]
        data = (value & mask_bits(8 * store.access_size)).to_bytes(store.access_size, "little")
        after = page[1][:offset] + data + page[1][offset + store.access_size:]
        return after, {"rip": (register_value(regs, "rip") + store.length) & mask_bits(width)}

    def _records(self, store: DecodedStore, regs: Mapping[str, int], window_gpa: int,
                 low: int, high: int, before: bytes, after: bytes,
                 ) -> tuple[tuple[WriteRecord, ...], dict[int, int]]:
        """One record per entry in [low, high) of the window at `window_gpa` (an
        entry boundary), in the order the guest wrote them."""
        size = self.entry_size
        start = low - low % size
        if high <= start + size:  # one entry: most events
            entry_gpa = window_gpa + start
            record = WriteRecord(entry_gpa, low - start, high - low,
                                 int.from_bytes(after[low:high], "little"),
                                 int.from_bytes(before[start:start + size], "little"))
            return (record,), {entry_gpa: int.from_bytes(after[start:start + size], "little")}
        starts = range(start, high, size)
        if store.rep and register_value(regs, "rflags") & _DF:
            starts = starts[::-1]
        records = []
        entries_after = {}
        for start in starts:
            first = max(low, start)
            last = min(high, start + size)
            entry_gpa = window_gpa + start
            records.append(WriteRecord(
                gpa=entry_gpa, offset=first - start, size=last - first,
                value=int.from_bytes(after[first:last], "little"),
                old=int.from_bytes(before[start:start + size], "little")))
            entries_after[entry_gpa] = int.from_bytes(after[start:start + size], "little")
        return tuple(records), entries_after

    # -- PAE second half ----------------------------------------------------

    def _may_coalesce(self, event: WriteEvent, first: _Emulated) -> bool:
        """The shape of a first half: one 4-byte store into an 8-byte PAE entry
        (the PtEmuBuffer is partial), from 16/32-bit code, RIP moved on."""
        return (self.coalesce and self.mode.name == "pae" and event.code_bits != 64
                and not first.store.rep and len(first.writes) == 1
                and first.writes[0].size == 4 and first.registers["rip"] != first.rip)

    def _leaves_entry_partial(self, first: _Emulated, fingerprint: _Fingerprint | None,
                              ) -> tuple[bool, tuple[EntryWriteState | None, WriteOutcome] | None]:
        """Whether a first half leaves its entry partial (semantics.md section 2),
        and, under ``strict``, the write state's verdict to reuse when reporting.

        ``hvmi`` (the seed): every 4-byte write to an 8-byte entry does; the
        seed decides from its partial PtEmuBuffer, before and whatever its
        write state then says, so this keeps coalescing after an ``hvmi``
        duplicate too. ``strict``: only a write the write state calls
        `PARTIAL`. Not a read-modify-write, which completes the entry at once
        (the completion it reports stands alone and the next store is its own
        exit); not a store that completes an entry whose other half was
        pending; and not a duplicate, which leaves the state as the event's
        first delivery left it and must not fold a fresh write into a
        repeated exit (that write would join the entry as a new pending half,
        since only an event's first write to an entry can be a duplicate).
        The verdict is only peeked at: the table changes in `_finish`, with
        the rest of the event, whether or not a second half follows.
        """
        if self.policy is not Policy.STRICT:
            return True, None
        record = first.writes[0]
        peeked = self.write_state.peek(record.gpa, self._write_input(first, record, fingerprint,
                                                                     first_of_event=True),
                                       entry_size=self.entry_size, policy=self.policy,
                                       guest_is_32bit=self._guest_is_32bit)
        return peeked[1].state is EntryState.PARTIAL, peeked

    def _coalesce_second_half(self, event: WriteEvent, first: _Emulated) -> _Emulated | None:
        """Emulate the next instruction too when it writes the entry's other half."""
        record = first.writes[0]
        rest = event.code[first.store.length:]
        if not rest:
            return None
        decoded = self._decoded(event.code_bits, rest)[0]
        if isinstance(decoded, DecodeRefusal) or not decoded.family.pae_second_half \
                or decoded.access_size != 4 or decoded.rep:
            return None
        other_half_gpa = record.gpa + (4 - record.offset)
        other_half_gla = page_base(event.gla) + page_offset(other_half_gpa)
        regs = {**event.regs, **first.registers}
        address = destination_address(decoded, regs, regs["rip"])
        if address != other_half_gla:
            return None
        try:
            second = self._emulate_one(event.code_bits, rest, regs, other_half_gpa,
                                       other_half_gla)
        except Exception:  # noqa: BLE001 - the guest memory failed on the second half
            # The first half is committed: report it alone, as without coalescing.
            # The second instruction was not committed; the guest executes it
            # again and its own exit meets the memory's error, if it persists.
            return None
        return second if isinstance(second, _Emulated) else None

    # -- reporting ----------------------------------------------------------

    @staticmethod
    def _write_input(item: _Emulated, record: WriteRecord, fingerprint: _Fingerprint | None,
                     first_of_event: bool) -> WriteInput:
        """What the write state needs to know about one record of one instruction."""
        unchanged = ((record.old >> (8 * record.offset)) & ((1 << (8 * record.size)) - 1)
                     == record.value)
        return WriteInput(record.offset, record.size, record.value, record.old,
                          item.entries_after[record.gpa], item.rip,
                          item.store.family.access is Access.READ_MODIFY_WRITE, item.store.rep,
                          fingerprint, first_of_event, unchanged)

    def _finish(self, vcpu: Vcpu, event: WriteEvent, done: list[_Emulated],
                fingerprint: _Fingerprint | None,
                peeked: tuple[EntryWriteState | None, WriteOutcome] | None) -> EventResult:
        """Fill the PtEmuBuffer, feed every record to the write states and report.

        `peeked` is the write state's verdict on the first record, already
        computed (by `_leaves_entry_partial`) from the same table: it is
        stored instead of being computed twice.
        """
        before = event.regs.get
        final = done[0].registers
        writes = done[0].writes
        undefined = done[0].store.family.undefined_flags
        if len(done) > 1:  # a coalesced second half: its changes on top of the first's
            final = {**final, **done[1].registers}
            writes += done[1].writes
            undefined |= done[1].store.family.undefined_flags
        changed = {name: value for name, value in final.items()
                   if value != before(name, _DEFAULT_FLAGS if name == "rflags" else 0)}
        outcomes: dict[int, EntryResult] = {}
        table = self.write_state
        write_input = self._write_input
        for item in done:
            for record in item.writes:
                entry_gpa = record.gpa
                if peeked is not None:  # the first record, its verdict already known
                    state, outcome = peeked
                    peeked = None
                    table.put(entry_gpa, state)
                else:
                    outcome = table.apply(
                        entry_gpa, write_input(item, record, fingerprint, entry_gpa not in outcomes),
                        entry_size=self.entry_size, policy=self.policy,
                        guest_is_32bit=self._guest_is_32bit)
                outcomes[entry_gpa] = self._entry_result(entry_gpa, outcome.state,
                                                         outcome.old, outcome.new)
        head = writes[0]
        buffer = vcpu.pt_emu_buffer
        buffer.old = head.old
        buffer.new = head.value
        buffer.partial = head.size < self.entry_size
        buffer.valid = buffer.emulated = True
        buffer.writes = writes
        entries = (tuple(outcomes.values()) if len(outcomes) == 1
                   else tuple(outcomes[gpa] for gpa in sorted(outcomes)))
        return EventResult(Status.EMULATED, writes, entries, changed, undefined, len(done))

    def _entry_result(self, entry_gpa: int, state: EntryState, old: int | None,
                      new: int | None) -> EntryResult:
        if state is not EntryState.COMPLETE:
            return EntryResult(entry_gpa, state)
        return EntryResult(entry_gpa, state, old, new, mode=self.mode,
                           level=self.table_levels.get(page_base(entry_gpa)))
