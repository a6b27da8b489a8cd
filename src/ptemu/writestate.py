"""The per-entry write state: reassembling partial writes into whole entries.

A page-table entry may be written in pieces (a 32-bit PAE guest writes its
8-byte entries as two 4-byte stores). Reporting a half-written entry would
show the introspection engine a mapping that never existed, so each entry
keeps a small state that assembles the pieces and reports the entry as
`COMPLETE` (with its value before the first piece and the assembled value)
only once every byte has been written (semantics.md section 3).

Everything here is a pure function of immutable records: `apply_write` and
`flush_entry` return a new state instead of changing one, so the rules are
easy to test exhaustively and a refused event can leave the state untouched
by simply not storing the result. `WriteStateTable` is the thin mutable store
(entry GPA -> state) a handler keeps per guest.

Two policies (`ptemu.status.Policy`):

``hvmi`` -- exactly the seed. On 32-bit guests (legacy, PAE) a write whose
    ``rip & LAST_WRITE_RIP_MASK`` equals the entry's last write RIP, when that
    last write was not 8 bytes, is a *duplicate* (an event Xen delivered
    twice) and changes nothing. The seed never sees several writes of one
    event, so the rule only compares a write with writes of earlier events
    (`WriteInput.first_of_event`). Known consequences, kept on purpose: the
    last RIP survives a completion, so a legacy guest that writes the same
    entry twice in a row from one instruction loses the second write; a
    1-byte ``lock and`` clearing RW leaves a 64-bit entry partial.

``strict`` -- ptemu's default. A duplicate is an event identical to the
    previous event on the entry (an equal `WriteInput.event_fingerprint`:
    same RIP, instruction bytes, registers and GPA, compared with ``==``)
    whose write finds memory already holding what it stores
    (`WriteInput.unchanged`); REP iterations are never duplicates. A
    read-modify-write instruction completes the entry at once with the whole
    entry after the write.

Memory per entry. A state that holds no pending bytes is *idle*; an idle
state keeps only what the duplicate rules need (last RIP and size under
``hvmi``, last event fingerprint under ``strict``) with ``cur`` and
``assembling`` zeroed, because a new first chunk always reloads ``cur`` from
memory. An idle state the rules cannot use any more (no fingerprint, and no
RIP or a last write of 8 bytes, after which the ``hvmi`` rule never fires) is
dropped altogether: `apply_write` returns ``None`` and the table forgets the
entry. Dropping it changes no outcome. Under ``hvmi`` on 64-bit guests every
completed entry is therefore dropped; on 32-bit guests an entry whose last
write was smaller than 8 bytes stays, so that the seed's rule "a second write
from the same RIP after a completion is a duplicate" still holds. Under
``strict`` completed entries stay with their last fingerprint, so that a
second delivery of the completing event is still recognised. The fingerprint
must hold the values themselves (a tuple of them, one object shared by the
event's writes), never a hash or digest of them: a guest can choose register
values whose hashes collide (``hash(2) == hash(2**64 - 6)``), and a collision
would call a real write a duplicate. Idle states are interned, so entries
with the same last RIP or written by the same event share one record.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType

from ptemu.errors import UsageError
from ptemu.status import EntryState, Policy

LAST_WRITE_RIP_MASK = (1 << 23) - 1
"""The bits of RIP the seed keeps per entry (its header says 32; its mask keeps 23)."""

ENTRY_SIZES = (4, 8)
"""Entry sizes in bytes: 4 in legacy paging, 8 in PAE, 4-level and 5-level."""


@dataclass(frozen=True, slots=True)
class EntryWriteState:
    """The write state of one page-table entry (the seed's ``HOOK_PTEWS``).

    An entry with nothing written yet is represented by ``None``, not by a
    record. A record with ``written_mask == 0`` is idle: only the duplicate
    rule fields mean anything, and ``cur``/``assembling`` are 0.
    """

    cur: int
    """The whole entry before the first pending write (meaningful while pending)."""
    assembling: int
    """The entry being assembled: the written bytes in place, other bytes 0
    (the spec's ``int``)."""
    written_mask: int
    """One bit per byte of the entry: bit i set when byte i has been written."""
    last_write_rip: int | None = None
    """``hvmi`` on 32-bit guests: ``rip & LAST_WRITE_RIP_MASK`` of the last
    write; ``None`` when no write was recorded."""
    last_write_was_8: bool = False
    """``hvmi`` on 32-bit guests: the last write stored 8 bytes."""
    last_event: Hashable | None = None
    """``strict``: fingerprint of the last event that wrote this entry."""

    @property
    def is_pending(self) -> bool:
        """Some bytes of the entry are written and the entry is not complete."""
        return self.written_mask != 0


@dataclass(slots=True)
class WriteInput:
    """One write of one event into one entry, as the handler saw it.

    Not frozen, only because a frozen dataclass costs three times as much to
    build and one is built per write on the VM-exit path: treat it as
    immutable (`apply_write` never changes it).
    """

    offset: int
    """Byte offset of the write inside the entry."""
    size: int
    """Bytes written inside this entry (1 .. entry size)."""
    value: int
    """The bytes written, little-endian; bits beyond `size` bytes are ignored."""
    entry_before: int
    """The whole entry in memory before this write."""
    entry_after: int
    """The whole entry in memory after this write."""
    rip: int
    """RIP of the instruction that wrote (before it executed)."""
    read_modify_write: bool = False
    """The instruction read the whole destination before writing it (XCHG,
    CMPXCHG*, XADD, AND, OR, XOR, ADD, SUB, ADC, SBB, INC, DEC, NOT, NEG, BT*):
    under ``strict`` it completes the entry at once."""
    rep_string: bool = False
    """An iteration of a REP string instruction: never a ``strict`` duplicate."""
    event_fingerprint: Hashable = None
    """Identifies the event for the ``strict`` duplicate test: its RIP,
    instruction bytes, registers and GPA themselves (compared with ``==``,
    so never a hash of them, which a guest can make collide)."""
    first_of_event: bool = True
    """The first write this event makes to this entry. Only such a write is
    compared with earlier events by either duplicate rule; later writes of the
    same event (REP iterations, other records) never are."""
    unchanged: bool = False
    """Memory already held what this write stores (``strict`` duplicate test)."""


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """What one write (or a flush) did to its entry."""

    state: EntryState
    old: int | None = None
    """The entry before its first pending write (`COMPLETE` only)."""
    new: int | None = None
    """The entry after its last write (`COMPLETE` only)."""


_PARTIAL = WriteOutcome(EntryState.PARTIAL)
_DUPLICATE = WriteOutcome(EntryState.DUPLICATE)


def apply_write(state: EntryWriteState | None, write: WriteInput, *, entry_size: int,
                policy: Policy, guest_is_32bit: bool,
                ) -> tuple[EntryWriteState | None, WriteOutcome]:
    """Feed one write to an entry's state; return the next state and the outcome.

    `state` is ``None`` for an entry with no state yet; the returned state is
    ``None`` when nothing needs keeping (see the module docstring). On a
    duplicate the very same `state` object comes back. Raises `UsageError` for
    a write that does not fit the entry or an unknown policy.

    >>> s, out = apply_write(None, WriteInput(offset=4, size=4, value=0x1,
    ...     entry_before=0, entry_after=0x1_0000_0000, rip=0xc1000010),
    ...     entry_size=8, policy=Policy.HVMI, guest_is_32bit=True)
    >>> out.state, hex(s.written_mask)
    (<EntryState.PARTIAL: 'partial'>, '0xf0')
    """
    _check_write(write, entry_size)
    if policy == Policy.HVMI:
        return _apply_hvmi(state, write, entry_size, guest_is_32bit)
    if policy == Policy.STRICT:
        return _apply_strict(state, write, entry_size)
    raise UsageError(f"unknown write-state policy {policy!r}: expected 'strict' or 'hvmi'")


def flush_entry(state: EntryWriteState | None, entry_now: int,
                ) -> tuple[EntryWriteState | None, WriteOutcome | None]:
    """Report a pending entry as complete, its new value being memory now.

    For use when the caller stops waiting for the missing bytes (the entry is
    unhooked, the table page is freed...). Returns ``(state, None)``
    unchanged when nothing is pending. Otherwise the outcome is `COMPLETE`
    with ``old`` = the entry before its first pending write and ``new`` =
    `entry_now`; the returned state is idle and keeps the duplicate-rule
    fields, so a second delivery of the last write is still recognised.
    """
    if state is None or state.written_mask == 0:
        return state, None
    outcome = WriteOutcome(EntryState.COMPLETE, old=state.cur, new=entry_now)
    return _idle(state.last_write_rip, state.last_write_was_8, state.last_event), outcome


def _check_write(write: WriteInput, entry_size: int) -> None:
    """Raise `UsageError` unless `write` fits an entry of `entry_size` bytes."""
    if entry_size != 8 and entry_size != 4:
        raise UsageError(f"entry_size: expected 4 or 8 bytes, got {entry_size!r}")
    if write.size < 1 or write.offset < 0 or write.offset + write.size > entry_size:
        raise UsageError(f"write of {write.size} bytes at offset {write.offset} does not fit "
                         f"an entry of {entry_size} bytes")
    limit = 1 << (8 * entry_size)
    if not (0 <= write.entry_before < limit and 0 <= write.entry_after < limit):
        name, whole = (("entry_before", write.entry_before)
                       if not 0 <= write.entry_before < limit else
                       ("entry_after", write.entry_after))
        raise UsageError(f"{name}: {whole!r} is not a {entry_size}-byte entry value")
    if write.value < 0 or write.rip < 0:
        raise UsageError(f"value and rip must be non-negative, got {write.value!r}, {write.rip!r}")


def _apply_hvmi(state: EntryWriteState | None, write: WriteInput, entry_size: int,
                guest_is_32bit: bool) -> tuple[EntryWriteState | None, WriteOutcome]:
    """The seed's rule: same low RIP as the last, not-8-byte write = duplicate."""
    if state is None:
        last_rip, last_was_8 = None, False
    else:
        last_rip, last_was_8 = state.last_write_rip, state.last_write_was_8
    if guest_is_32bit:
        rip_low = write.rip & LAST_WRITE_RIP_MASK
        if write.first_of_event and rip_low == last_rip and not last_was_8:
            return state, _DUPLICATE
        last_rip, last_was_8 = rip_low, write.size == 8
    event = None if state is None else state.last_event
    return _assemble(state, write, entry_size, last_rip, last_was_8, event)


def _apply_strict(state: EntryWriteState | None, write: WriteInput, entry_size: int,
                  ) -> tuple[EntryWriteState | None, WriteOutcome]:
    """ptemu's rule: exact duplicates only; read-modify-write completes at once."""
    if (state is not None and write.first_of_event and not write.rep_string
            and write.unchanged and state.last_event is not None
            and state.last_event == write.event_fingerprint):
        return state, _DUPLICATE
    if write.read_modify_write:
        # The instruction read the whole entry, so the bytes it did not write are
        # coherent with the ones it did: memory after the write is the new entry.
        old = state.cur if state is not None and state.written_mask else write.entry_before
        outcome = WriteOutcome(EntryState.COMPLETE, old=old, new=write.entry_after)
        return _idle(None, False, write.event_fingerprint), outcome
    return _assemble(state, write, entry_size, None, False, write.event_fingerprint)


def _assemble(state: EntryWriteState | None, write: WriteInput, entry_size: int,
              last_rip: int | None, last_was_8: bool, last_event: Hashable | None,
              ) -> tuple[EntryWriteState | None, WriteOutcome]:
    """Merge the written bytes into the entry (semantics.md section 3)."""
    shift = 8 * write.offset
    bit_mask = ((1 << (8 * write.size)) - 1) << shift
    byte_mask = ((1 << write.size) - 1) << write.offset
    if state is None or state.written_mask == 0:
        cur, assembling, written = write.entry_before, 0, 0
    else:
        cur, assembling, written = state.cur, state.assembling, state.written_mask
    written |= byte_mask
    assembling = (assembling & ~bit_mask) | ((write.value << shift) & bit_mask)
    if written != (1 << entry_size) - 1:
        pending = EntryWriteState(cur, assembling, written, last_rip, last_was_8, last_event)
        return pending, _PARTIAL
    outcome = WriteOutcome(EntryState.COMPLETE, old=cur, new=assembling)
    return _idle(last_rip, last_was_8, last_event), outcome


@lru_cache(maxsize=1024)
def _idle(last_rip: int | None, last_was_8: bool, last_event: Hashable | None,
          ) -> EntryWriteState | None:
    """The idle state keeping only what a duplicate rule can still use, interned.

    ``None`` when no rule can use anything: a last write of 8 bytes (or none)
    never makes the ``hvmi`` rule fire, and without a fingerprint the
    ``strict`` rule cannot fire.
    """
    if last_event is None and (last_rip is None or last_was_8):
        return None
    return EntryWriteState(0, 0, 0, last_rip, last_was_8, last_event)


class WriteStateTable:
    """The write states of one guest's entries, keyed by entry GPA.

    Holds an entry only while its state is pending or idle-but-needed (see
    the module docstring), so ``len(table)`` counts those. `snapshot` and
    `restore` let a caller undo a failed event and let tests assert that a
    refused event left the state unchanged; tables compare equal when they
    hold equal states.
    """

    __slots__ = ("_pending", "_states")

    def __init__(self) -> None:
        self._states: dict[int, EntryWriteState] = {}
        self._pending: set[int] = set()

    def apply(self, entry_gpa: int, write: WriteInput, *, entry_size: int, policy: Policy,
              guest_is_32bit: bool) -> WriteOutcome:
        """Feed one write to the entry at `entry_gpa` (see `apply_write`)."""
        state, outcome = apply_write(self._states.get(entry_gpa), write, entry_size=entry_size,
                                     policy=policy, guest_is_32bit=guest_is_32bit)
        self._store(entry_gpa, state)
        return outcome

    def peek(self, entry_gpa: int, write: WriteInput, *, entry_size: int, policy: Policy,
             guest_is_32bit: bool) -> tuple[EntryWriteState | None, WriteOutcome]:
        """What `apply` would do, without doing it: the entry's next state and
        the outcome. The table is left as it was; `put` the state to commit.

        The handler uses this to learn whether a write leaves its entry
        partial (PAE coalescing, semantics.md section 2) before it decides to
        emulate a second instruction in the same exit.
        """
        return apply_write(self._states.get(entry_gpa), write, entry_size=entry_size,
                           policy=policy, guest_is_32bit=guest_is_32bit)

    def put(self, entry_gpa: int, state: EntryWriteState | None) -> None:
        """Make `state` (from `peek`; ``None`` forgets the entry) the entry's state."""
        self._store(entry_gpa, state)

    def flush(self, entry_gpa: int, entry_now: int) -> WriteOutcome | None:
        """Complete a pending entry with its value in memory now; ``None`` if
        nothing is pending there (see `flush_entry`)."""
        state, outcome = flush_entry(self._states.get(entry_gpa), entry_now)
        if outcome is not None:
            self._store(entry_gpa, state)
        return outcome

    def pending(self) -> tuple[int, ...]:
        """Entry GPAs with a partially written entry, ascending."""
        return tuple(sorted(self._pending))

    def get(self, entry_gpa: int) -> EntryWriteState | None:
        """The state kept for the entry at `entry_gpa`, or ``None``."""
        return self._states.get(entry_gpa)

    def forget(self, entry_gpa: int) -> None:
        """Drop whatever is kept for `entry_gpa` (e.g. its table was unhooked)."""
        self._store(entry_gpa, None)

    def snapshot(self) -> Mapping[int, EntryWriteState]:
        """A read-only copy of every kept state (states are immutable)."""
        return MappingProxyType(dict(self._states))

    def restore(self, snapshot: Mapping[int, EntryWriteState]) -> None:
        """Make the table hold exactly the states of `snapshot`."""
        self._states = dict(snapshot)
        self._pending = {gpa for gpa, state in self._states.items() if state.written_mask}

    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._states))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WriteStateTable):
            return NotImplemented
        return self._states == other._states

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"WriteStateTable({len(self._states)} entries, {len(self._pending)} pending)"

    def _store(self, entry_gpa: int, state: EntryWriteState | None) -> None:
        if state is None:
            self._states.pop(entry_gpa, None)
            self._pending.discard(entry_gpa)
            return
        self._states[entry_gpa] = state
        if state.written_mask:
            self._pending.add(entry_gpa)
        else:
            self._pending.discard(entry_gpa)
