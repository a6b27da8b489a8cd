"""Turn a machine run into fixture events with expectations.

Each instruction that stored to a monitored page-table page becomes one event
(a REP string instruction: one event per monitored page its iterations write).
Its expectation comes from what the execution did:

* ``writes``: each recorded store split into one record per page-table entry,
  in the order the CPU stored, ``old`` being the whole entry just before; the
  iterations of one REP instruction that continue in the same entry join one
  record (one record per entry and instruction, as the format asks);
* ``regs``: every register whose value differs between before and after;
* ``entries``: the stores fed, in order, to `ptemu.writestate` under the
  fixture's policy (the only ptemu logic the capture uses besides values).

PAE coalescing (semantics.md section 2): with ``coalesce`` on, a single 4-byte
store into an 8-byte PAE entry from 16/32-bit code that leaves the entry
partial is merged with the next instruction when that one is a MOV, XCHG or
CMPXCHG storing 4 bytes to the other half of the same entry: one event, both
instructions' records in order, registers changed over both. "Leaves the
entry partial" is the handler's rule (`PtWriteHandler._leaves_entry_partial`):
under ``hvmi``, as in the seed, every such store (its PtEmuBuffer is
partial); under ``strict``, only a store the write state calls partial, so an
XCHG of one half (a read-modify-write, complete at once) followed by a MOV of
the other is two events, and so is a duplicate followed by the other half.

The write hook reports guest-physical addresses; an event's GLA is the
monitored page's linear address (each monitored page is mapped exactly once).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from ptemu.capture.description import CaptureSpec, MemoryPatch
from ptemu.capture.layout import GuestLayout
from ptemu.capture.machine import MachineRun, RawWrite, Step
from ptemu.capture.opcodes import PAE_SECOND_HALF_KINDS, InstructionInfo, classify
from ptemu.errors import UsageError
from ptemu.status import EntryState, Policy
from ptemu.values import PAGE_OFFSET_MASK
from ptemu.writestate import WriteInput, WriteOutcome, WriteStateTable


@dataclass(frozen=True, slots=True)
class EntryWrite:
    """One store's part in one page-table entry (a fixture ``writes`` record)."""

    gpa: int
    offset: int
    size: int
    value: int
    old: int


@dataclass(frozen=True, slots=True)
class EntryOutcome:
    """An entry's state after an event (a fixture ``entries`` record)."""

    gpa: int
    state: EntryState
    old: int | None = None
    new: int | None = None


@dataclass(frozen=True, slots=True)
class CapturedEvent:
    """One fixture event with its expectation."""

    gpa: int
    gla: int
    regs: Mapping[str, int]
    code: bytes
    memory: tuple[MemoryPatch, ...]
    writes: tuple[EntryWrite, ...]
    entries: tuple[EntryOutcome, ...]
    changed: Mapping[str, int]
    instructions: tuple[str, ...]
    """Kinds of the instruction(s) the event covers (2 when coalesced)."""
    call: int
    redelivered: bool


@dataclass(frozen=True, slots=True)
class _Instruction:
    """Consecutive steps of one instruction (REP iterations on one page)."""

    steps: tuple[Step, ...]
    info: InstructionInfo

    @property
    def first(self) -> Step:
        return self.steps[0]

    @property
    def writes(self) -> tuple[RawWrite, ...]:
        return tuple(write for step in self.steps for write in step.writes)


class _Shadow:
    """Monitored and data pages as the events have left them so far.

    Kept from the description and the recorded stores alone, and checked
    against what the write hook read and against the machine's final memory,
    so that a store the hook missed cannot go unnoticed.
    """

    def __init__(self, spec: CaptureSpec) -> None:
        self.pages = {page.gpa: bytearray(page.data)
                      for page in spec.page_tables + spec.data_pages}
        self.dirty_data: list[tuple[int, int]] = []
        self.data_gpas = {page.gpa for page in spec.data_pages}

    def read(self, gpa: int, size: int) -> bytes:
        page = self.pages[gpa & ~PAGE_OFFSET_MASK]
        offset = gpa & PAGE_OFFSET_MASK
        return bytes(page[offset:offset + size])

    def write(self, gpa: int, data: bytes, *, by_guest: bool = True) -> None:
        """Store `data`; a guest store to a data page is remembered for the next
        event's ``memory`` patches (a description's own patch is not)."""
        page = self.pages.get(gpa & ~PAGE_OFFSET_MASK)
        if page is None:
            return  # the stack or another page of the capture's own
        offset = gpa & PAGE_OFFSET_MASK
        page[offset:offset + len(data)] = data
        if by_guest and gpa & ~PAGE_OFFSET_MASK in self.data_gpas:
            self.dirty_data.append((gpa, len(data)))

    def take_data_patches(self) -> tuple[MemoryPatch, ...]:
        """Data-page bytes stored since the last event, as ``memory`` patches."""
        out = tuple(MemoryPatch(gpa, self.read(gpa, size)) for gpa, size in self.dirty_data)
        self.dirty_data = []
        return out


def build_events(spec: CaptureSpec, layout: GuestLayout, run: MachineRun,
                 ) -> tuple[CapturedEvent, ...]:
    """Every event of the run, in order. Raises `UsageError` for a store the
    fixture format cannot express (one that leaves the monitored page)."""
    builder = _EventBuilder(spec, layout)
    events: list[CapturedEvent] = []
    for call_index, call_run in enumerate(run.calls):
        for patch in call_run.patches:
            builder.shadow.write(patch.gpa, patch.data, by_guest=False)
        builder.pending_patches += call_run.patches
        events += builder.call_events(call_index, call_run.steps)
    for gpa, page in builder.shadow.pages.items():
        if bytes(page) != run.final_pages[gpa]:
            raise UsageError(f"capture {spec.name}: page {gpa:#x} changed by a store the "
                             "write hook did not report")
    return tuple(events)


class _EventBuilder:
    def __init__(self, spec: CaptureSpec, layout: GuestLayout) -> None:
        self.spec = spec
        self.layout = layout
        self.shadow = _Shadow(spec)
        self.table = WriteStateTable()
        self.entry_size = spec.entry_size
        self.guest_is_32bit = spec.paging in ("legacy", "pae")
        self.may_coalesce = spec.coalesce and spec.paging == "pae" and spec.code_bits != 64
        self.pending_patches: list[MemoryPatch] = []
        """Description patches not yet carried by an event."""

    def call_events(self, call_index: int, steps: Sequence[Step]) -> Iterator[CapturedEvent]:
        instructions = list(self._group(steps))
        position = 0
        while position < len(instructions):
            instruction = instructions[position]
            monitored = [w for w in instruction.writes if self._is_monitored(w.gpa)]
            if not monitored:
                for write in instruction.writes:
                    self.shadow.write(write.gpa, write.value.to_bytes(write.size, "little"))
                position += 1
                continue
            data_patches = self.shadow.take_data_patches()
            fingerprint = self._fingerprint(instruction)
            touched: dict[int, WriteOutcome] = {}
            records = self._feed(instruction, fingerprint, touched)
            covered = [instruction]
            follower = instructions[position + 1] if position + 1 < len(instructions) else None
            if follower is not None and self._coalesces(instruction, records, touched,
                                                        follower):
                records += self._feed(follower, fingerprint, touched)
                covered.append(follower)
            # Delivered again before the guest ran on: this delivery emulated this
            # instruction alone, so its code stops there (a handler shown the next
            # instruction might coalesce it, and replay would cut the run elsewhere).
            alone = (len(covered) == 1 and self.may_coalesce and follower is not None
                     and follower.first.redelivered)
            position += len(covered)
            patches = tuple(self.pending_patches) + data_patches
            self.pending_patches = []
            yield self._event(call_index, covered, records, touched, patches, alone)

    def _group(self, steps: Sequence[Step]) -> Iterator[_Instruction]:
        """Steps into instructions: REP iterations at one address that store to
        the same page form one instruction (a REP that moves on to another page
        starts a new one there, as the handler leaves RIP on the instruction
        and the guest faults again)."""
        group: list[Step] = []
        info: InstructionInfo | None = None
        for step in steps:
            step_info = classify(self._code(step.gla, step.size), self.spec.code_bits)
            # The iteration that finds the count exhausted stores nothing and
            # moves RIP on: it belongs to the instruction it ends.
            if (group and info is not None and info.rep and step.gla == group[0].gla
                    and not step.redelivered
                    and (not step.writes or self._page(step) == self._page(group[0]))):
                group.append(step)
                continue
            if group and info is not None:
                yield _Instruction(tuple(group), info)
            group, info = [step], step_info
        if group and info is not None:
            yield _Instruction(tuple(group), info)

    def _page(self, step: Step) -> int | None:
        pages = {write.gpa & ~PAGE_OFFSET_MASK for write in step.writes}
        return pages.pop() if len(pages) == 1 else None

    def _is_monitored(self, gpa: int) -> bool:
        return gpa & ~PAGE_OFFSET_MASK in self.layout.monitored

    def _code(self, gla: int, size: int) -> bytes:
        blob = self.spec.blob_at(gla)
        if blob is None:
            raise UsageError(f"capture {self.spec.name}: executed code at {gla:#x} lies "
                             "outside every code blob")
        return blob.data[gla - blob.gla:gla - blob.gla + size]

    def _feed(self, instruction: _Instruction, fingerprint: Hashable,
              touched: dict[int, WriteOutcome]) -> list[EntryWrite]:
        """Split the instruction's stores per entry, apply them to the shadow and
        the write states; return the write records in store order."""
        split: list[tuple[Step, EntryWrite]] = []
        for step in instruction.steps:
            for write in step.writes:
                if not self._is_monitored(write.gpa):
                    self.shadow.write(write.gpa, write.value.to_bytes(write.size, "little"))
                    continue
                if (write.gpa + write.size - 1) & ~PAGE_OFFSET_MASK != (
                        write.gpa & ~PAGE_OFFSET_MASK):
                    raise UsageError(f"capture {self.spec.name}: the store at {write.gpa:#x} "
                                     f"({write.size} bytes) leaves its page-table page")
                if self.shadow.read(write.gpa, write.size) != write.before:
                    raise UsageError(f"capture {self.spec.name}: memory at {write.gpa:#x} "
                                     "differs from what the capture recorded")
                for record in self._split(write):
                    split.append((step, record))
                    self.shadow.write(record.gpa, _merge(record, self.entry_size).to_bytes(
                        self.entry_size, "little"))
        records = _join_per_entry([record for _, record in split], self.entry_size)
        rip = instruction.first.regs_before["rip"]
        for record in records:
            entry_after = _merge(record, self.entry_size)
            touched[record.gpa] = self.table.apply(record.gpa, WriteInput(
                offset=record.offset, size=record.size, value=record.value,
                entry_before=record.old, entry_after=entry_after, rip=rip,
                read_modify_write=instruction.info.read_modify_write,
                rep_string=instruction.info.rep,
                event_fingerprint=fingerprint,
                first_of_event=record.gpa not in touched,
                unchanged=entry_after == record.old,
            ), entry_size=self.entry_size, policy=self.spec.policy,
                guest_is_32bit=self.guest_is_32bit)
        return records

    def _fingerprint(self, instruction: _Instruction) -> Hashable:
        """The event's identity for the strict duplicate rule (semantics.md
        section 3), as the handler builds it: the GPA of the event (the first
        store to a monitored page), the code size, the instruction's bytes and
        the registers before it, the values themselves (never a hash of them,
        which a guest can make collide)."""
        step = instruction.first
        gpa = next((write.gpa for write in step.writes if self._is_monitored(write.gpa)), None)
        return (gpa, self.spec.code_bits, self._code(step.gla, step.size),
                tuple(sorted(step.regs_before.items())))

    def _split(self, write: RawWrite) -> Iterator[EntryWrite]:
        """One record per entry the store covers, in ascending address order."""
        size = self.entry_size
        position = write.gpa
        end = write.gpa + write.size
        while position < end:
            entry = position & ~(size - 1)
            chunk = min(end, entry + size) - position
            shift = 8 * (position - write.gpa)
            value = (write.value >> shift) & ((1 << (8 * chunk)) - 1)
            old = int.from_bytes(self.shadow.read(entry, size), "little")
            yield EntryWrite(entry, position - entry, chunk, value, old)
            position += chunk

    def _coalesces(self, first: _Instruction, records: list[EntryWrite],
                   touched: Mapping[int, WriteOutcome], follower: _Instruction) -> bool:
        """The handler's PAE second-half rule (semantics.md section 2), decided
        from what executed: a single 4-byte store into an 8-byte entry, in
        16/32-bit code, that leaves the entry partial (under ``strict`` the
        write state's verdict in `touched` is `PARTIAL`; under ``hvmi`` every
        such store does), followed by a MOV, XCHG or CMPXCHG that stores 4
        bytes to the entry's other half."""
        if not self.may_coalesce or len(records) != 1 or first.info.rep:
            return False
        record = records[0]
        if record.size != 4:
            return False  # a whole 8-byte entry: the PtEmuBuffer is not partial
        if self.spec.policy is Policy.STRICT and touched[record.gpa].state is not (
                EntryState.PARTIAL):
            return False  # completed (a read-modify-write...) or a duplicate
        step = first.first
        if (len(follower.steps) != 1 or follower.first.redelivered
                or follower.first.gla != step.gla + step.size
                or follower.info.kind not in PAE_SECOND_HALF_KINDS):
            return False
        writes = follower.first.writes
        return (len(writes) == 1 and writes[0].size == 4
                and writes[0].gpa == record.gpa + (4 - record.offset))

    def _event(self, call_index: int, covered: list[_Instruction], records: list[EntryWrite],
               touched: Mapping[int, WriteOutcome],
               patches: tuple[MemoryPatch, ...], alone: bool = False) -> CapturedEvent:
        first_step = covered[0].first
        last_step = covered[-1].steps[-1]
        first_write = next(w for w in first_step.writes if self._is_monitored(w.gpa))
        page_gpa = first_write.gpa & ~PAGE_OFFSET_MASK
        gla = self.layout.monitored[page_gpa] | (first_write.gpa & PAGE_OFFSET_MASK)
        length = sum(instruction.first.size for instruction in covered)
        blob = self.spec.blob_at(first_step.gla)
        assert blob is not None
        start = first_step.gla - blob.gla
        code = blob.data[start:start + (length if alone else max(self.spec.code_window, length))]
        before, after = first_step.regs_before, last_step.regs_after
        changed = {name: after.get(name, 0) for name in set(before) | set(after)
                   if after.get(name, 0) != before.get(name, 0)}
        entries = tuple(
            EntryOutcome(gpa, outcome.state, outcome.old, outcome.new)
            if outcome.state is EntryState.COMPLETE else EntryOutcome(gpa, outcome.state)
            for gpa, outcome in sorted(touched.items()))
        return CapturedEvent(
            gpa=first_write.gpa, gla=gla, regs=before, code=code, memory=patches,
            writes=tuple(records), entries=entries, changed=changed,
            instructions=tuple(str(instruction.info.kind) for instruction in covered),
            call=call_index, redelivered=first_step.redelivered)


def _join_per_entry(records: Sequence[EntryWrite], entry_size: int) -> list[EntryWrite]:
    """One record per entry and instruction: REP iterations (or the two entries
    of one wide store) that continue a record of the same entry join it, so
    ``old`` is the entry before the instruction's first byte in it."""
    out: list[EntryWrite] = []
    for record in records:
        last = out[-1] if out else None
        if last is not None and last.gpa == record.gpa and (
                record.offset == last.offset + last.size
                or record.offset + record.size == last.offset):
            offset = min(last.offset, record.offset)
            size = last.size + record.size
            combined = _merge(EntryWrite(last.gpa, last.offset, last.size, last.value, 0),
                              entry_size)
            combined = _merge(EntryWrite(last.gpa, record.offset, record.size, record.value,
                                         combined), entry_size)
            value = (combined >> (8 * offset)) & ((1 << (8 * size)) - 1)
            out[-1] = EntryWrite(last.gpa, offset, size, value, last.old)
        else:
            out.append(record)
    return out


def _merge(record: EntryWrite, entry_size: int) -> int:
    """The whole entry after `record` is stored into it."""
    shift = 8 * record.offset
    mask = ((1 << (8 * record.size)) - 1) << shift
    return (record.old & ~mask & ((1 << (8 * entry_size)) - 1)) | (record.value << shift)
