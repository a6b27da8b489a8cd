"""Tests of the per-entry write state (semantics.md section 3).

Expected values are worked out by hand from the spec and the seed's
``IntHookPtwProcessWrite`` (hook_ptwh.c); the hypothesis tests compare with an
independent model: byte arrays for assembly, and a line-by-line transcription
of the seed's C (a mutable struct) for the ``hvmi`` policy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptemu.errors import UsageError
from ptemu.status import EntryState, Policy
from ptemu.writestate import (
    LAST_WRITE_RIP_MASK,
    EntryWriteState,
    WriteInput,
    WriteOutcome,
    WriteStateTable,
    apply_write,
    flush_entry,
)

COMPLETE, PARTIAL, DUPLICATE = EntryState.COMPLETE, EntryState.PARTIAL, EntryState.DUPLICATE
HVMI, STRICT = Policy.HVMI, Policy.STRICT

PTE = 0x3FF8  # an entry GPA in a page-table page

# A PAE PTE before and after a remap: present, RW, US, A, D, frame 0x12345000;
# then NX set, frame 0x23456000, flags P RW A D (0x63).
PAE_OLD = 0x0000_0000_1234_5067
PAE_NEW = 0x8000_0000_2345_6063


def pae_write(offset: int, value: int, before: int, rip: int, **kw: object) -> WriteInput:
    """A 4-byte store of `value` into half `offset` of a PAE entry holding `before`."""
    shift = 8 * offset
    after = (before & ~(0xFFFF_FFFF << shift)) | (value << shift)
    return WriteInput(offset=offset, size=4, value=value, entry_before=before,
                      entry_after=after, rip=rip, **kw)  # type: ignore[arg-type]


def run(table: WriteStateTable, write: WriteInput, *, policy: Policy = HVMI,
        entry_size: int = 8, guest_is_32bit: bool = True, gpa: int = PTE) -> WriteOutcome:
    return table.apply(gpa, write, entry_size=entry_size, policy=policy,
                       guest_is_32bit=guest_is_32bit)


# --- the seed's documented behaviours -------------------------------------------------------

@pytest.mark.parametrize("policy", [HVMI, STRICT])
def test_pae_high_half_then_low_half(policy: Policy) -> None:
    table = WriteStateTable()
    high = pae_write(4, 0x8000_0000, PAE_OLD, rip=0xC100_1000)
    assert run(table, high, policy=policy) == WriteOutcome(PARTIAL)
    assert table.pending() == (PTE,)
    state = table.get(PTE)
    assert state is not None
    assert (state.cur, state.assembling, state.written_mask) == (
        PAE_OLD, 0x8000_0000_0000_0000, 0xF0)
    # Memory now holds the half-written entry; `old` must still be the value
    # before the first chunk, not this intermediate one.
    low = pae_write(0, 0x2345_6063, high.entry_after, rip=0xC100_1008)
    assert low.entry_before == 0x8000_0000_1234_5067
    assert run(table, low, policy=policy) == WriteOutcome(COMPLETE, old=PAE_OLD, new=PAE_NEW)
    assert table.pending() == ()


@pytest.mark.parametrize("policy", [HVMI, STRICT])
def test_pae_low_half_then_high_half(policy: Policy) -> None:
    table = WriteStateTable()
    low = pae_write(0, 0x2345_6063, PAE_OLD, rip=0xC100_2000)
    assert run(table, low, policy=policy) == WriteOutcome(PARTIAL)
    state = table.get(PTE)
    assert state is not None
    assert (state.cur, state.assembling, state.written_mask) == (PAE_OLD, 0x2345_6063, 0x0F)
    high = pae_write(4, 0x8000_0000, low.entry_after, rip=0xC100_2008)
    assert run(table, high, policy=policy) == WriteOutcome(COMPLETE, old=PAE_OLD, new=PAE_NEW)
    assert table.pending() == ()


def test_xchg_low_then_mov_high_hvmi_assembles_both() -> None:
    # Linux PAE native_ptep_get_and_clear: xchg(&pte_low, 0); pte_high = 0.
    table = WriteStateTable()
    xchg = pae_write(0, 0, PAE_NEW, rip=0xC100_3000, read_modify_write=True)
    assert run(table, xchg) == WriteOutcome(PARTIAL)
    mov = pae_write(4, 0, xchg.entry_after, rip=0xC100_3010)
    assert xchg.entry_after == 0x8000_0000_0000_0000
    assert run(table, mov) == WriteOutcome(COMPLETE, old=PAE_NEW, new=0)
    assert len(table) == 1 and table.pending() == ()  # idle, last RIP kept


def test_xchg_low_then_mov_high_strict_completes_at_the_xchg() -> None:
    table = WriteStateTable()
    xchg = pae_write(0, 0, PAE_NEW, rip=0xC100_3000, read_modify_write=True,
                     event_fingerprint=1)
    # The xchg read the whole entry: the high half it left is coherent.
    assert run(table, xchg, policy=STRICT) == WriteOutcome(
        COMPLETE, old=PAE_NEW, new=0x8000_0000_0000_0000)
    mov = pae_write(4, 0, xchg.entry_after, rip=0xC100_3010, event_fingerprint=2)
    assert run(table, mov, policy=STRICT) == WriteOutcome(PARTIAL)
    state = table.get(PTE)
    assert state is not None
    assert (state.cur, state.assembling, state.written_mask) == (0x8000_0000_0000_0000, 0, 0xF0)
    assert table.flush(PTE, 0) == WriteOutcome(COMPLETE, old=0x8000_0000_0000_0000, new=0)


def test_hvmi_duplicate_delivery_changes_nothing() -> None:
    table = WriteStateTable()
    low = pae_write(0, 0x2345_6063, PAE_OLD, rip=0xC100_4000)
    assert run(table, low) == WriteOutcome(PARTIAL)
    before = table.snapshot()
    state_before = table.get(PTE)
    # Xen delivers the same event again; memory already holds the low half.
    again = pae_write(0, 0x2345_6063, low.entry_after, rip=0xC100_4000)
    assert run(table, again) == WriteOutcome(DUPLICATE)
    assert table.snapshot() == before
    assert table.get(PTE) is state_before
    high = pae_write(4, 0x8000_0000, again.entry_after, rip=0xC100_4008)
    assert run(table, high) == WriteOutcome(COMPLETE, old=PAE_OLD, new=PAE_NEW)


def test_hvmi_duplicate_uses_low_23_bits_of_rip() -> None:
    state = EntryWriteState(0, 0, 0, last_write_rip=0x0012_3456)
    write = WriteInput(offset=0, size=4, value=5, entry_before=0, entry_after=5,
                       rip=0xC012_3456 | (1 << 23))
    assert (0xC012_3456 | (1 << 23)) & LAST_WRITE_RIP_MASK == 0x12_3456
    out = apply_write(state, write, entry_size=4, policy=HVMI, guest_is_32bit=True)
    assert out == (state, WriteOutcome(DUPLICATE))
    other = replace(write, rip=0xC012_3456 ^ (1 << 22))  # bit 22 is kept: not the same RIP
    _, outcome = apply_write(state, other, entry_size=4, policy=HVMI, guest_is_32bit=True)
    assert outcome == WriteOutcome(COMPLETE, old=0, new=5)


def test_hvmi_last_rip_survives_completion() -> None:
    # Legacy paging: a full 4-byte store completes; the same RIP again is a duplicate.
    table = WriteStateTable()
    first = WriteInput(offset=0, size=4, value=0x0040_1067, entry_before=0x0030_1067,
                       entry_after=0x0040_1067, rip=0xC10A_0000)
    assert run(table, first, entry_size=4) == WriteOutcome(COMPLETE, old=0x0030_1067,
                                                            new=0x0040_1067)
    second = replace(first, value=0, entry_before=0x0040_1067, entry_after=0)
    assert run(table, second, entry_size=4) == WriteOutcome(DUPLICATE)


def test_hvmi_last_write_of_8_bytes_is_never_followed_by_a_duplicate() -> None:
    table = WriteStateTable()
    cmpxchg8b = WriteInput(offset=0, size=8, value=PAE_NEW, entry_before=PAE_OLD,
                           entry_after=PAE_NEW, rip=0xC100_5000, read_modify_write=True)
    assert run(table, cmpxchg8b) == WriteOutcome(COMPLETE, old=PAE_OLD, new=PAE_NEW)
    again = pae_write(0, 0x2345_6063, PAE_NEW, rip=0xC100_5000)
    assert run(table, again) == WriteOutcome(PARTIAL)
    # The same with a state that records the 8-byte write explicitly.
    state = EntryWriteState(0, 0, 0, last_write_rip=0x5000, last_write_was_8=True)
    assert again.rip & LAST_WRITE_RIP_MASK == 0x5000
    _, outcome = apply_write(state, again, entry_size=8, policy=HVMI, guest_is_32bit=True)
    assert outcome == WriteOutcome(PARTIAL)
    four = replace(state, last_write_was_8=False)  # contrast: after a 4-byte write it is one
    assert apply_write(four, again, entry_size=8, policy=HVMI,
                       guest_is_32bit=True) == (four, WriteOutcome(DUPLICATE))


def test_hvmi_never_duplicates_on_64bit_guests() -> None:
    table = WriteStateTable()
    low = pae_write(0, 0x2345_6063, PAE_OLD, rip=0xFFFF_FFFF_8100_0000)
    assert run(table, low, guest_is_32bit=False) == WriteOutcome(PARTIAL)
    again = pae_write(0, 0x2345_6063, low.entry_after, rip=0xFFFF_FFFF_8100_0000)
    assert run(table, again, guest_is_32bit=False) == WriteOutcome(PARTIAL)
    state = table.get(PTE)
    assert state is not None and state.last_write_rip is None
    full = WriteInput(offset=0, size=8, value=PAE_NEW, entry_before=PAE_OLD,
                      entry_after=PAE_NEW, rip=0xFFFF_FFFF_8100_0010)
    for _ in range(2):
        outcome = run(table, replace(full, entry_before=PAE_OLD), guest_is_32bit=False,
                      gpa=PTE + 8)
        assert outcome == WriteOutcome(COMPLETE, old=PAE_OLD, new=PAE_NEW)
    assert table.get(PTE + 8) is None  # nothing kept for a completed 64-bit-guest entry


# `lock and byte [rdi], 0xfd` on a 4-level PTE 0x8000000012345067 (P RW US A D):
# byte 0 becomes 0x67 & 0xfd = 0x65, RW cleared.
PTE64 = 0x8000_0000_1234_5067
LOCK_AND = WriteInput(offset=0, size=1, value=0x65, entry_before=PTE64,
                      entry_after=0x8000_0000_1234_5065, rip=0xFFFF_FFFF_8123_4567,
                      read_modify_write=True, event_fingerprint=("lock and", 1))


def test_one_byte_lock_and_stays_partial_under_hvmi() -> None:
    table = WriteStateTable()
    assert run(table, LOCK_AND, guest_is_32bit=False) == WriteOutcome(PARTIAL)
    assert table.pending() == (PTE,)
    state = table.get(PTE)
    assert state is not None
    assert (state.cur, state.assembling, state.written_mask) == (PTE64, 0x65, 0x01)


def test_one_byte_lock_and_completes_under_strict() -> None:
    table = WriteStateTable()
    assert run(table, LOCK_AND, policy=STRICT, guest_is_32bit=False) == WriteOutcome(
        COMPLETE, old=PTE64, new=0x8000_0000_1234_5065)
    assert table.pending() == ()


def test_strict_read_modify_write_reports_old_of_the_pending_entry() -> None:
    table = WriteStateTable()
    high = pae_write(4, 0x8000_0000, PAE_OLD, rip=0xC100_6000, event_fingerprint=1)
    assert run(table, high, policy=STRICT) == WriteOutcome(PARTIAL)
    # lock or dword [eax], 0x20 on the low half (sets A): old is the entry before the
    # pending high-half write, new is memory after the or.
    low = pae_write(0, 0x1234_5067, high.entry_after, rip=0xC100_6010,
                    read_modify_write=True, event_fingerprint=2)
    assert run(table, low, policy=STRICT) == WriteOutcome(
        COMPLETE, old=PAE_OLD, new=0x8000_0000_1234_5067)
    assert table.pending() == ()


def test_strict_duplicate_needs_same_event_and_unchanged_memory() -> None:
    event = (0xC100_7000, (("rax", 0x2345_6063),), PTE)
    low = pae_write(0, 0x2345_6063, PAE_OLD, rip=0xC100_7000, event_fingerprint=event)
    state, outcome = apply_write(None, low, entry_size=8, policy=STRICT, guest_is_32bit=True)
    assert outcome == WriteOutcome(PARTIAL) and state is not None
    again = pae_write(0, 0x2345_6063, low.entry_after, rip=0xC100_7000,
                      event_fingerprint=event, unchanged=True)
    assert apply_write(state, again, entry_size=8, policy=STRICT,
                       guest_is_32bit=True) == (state, WriteOutcome(DUPLICATE))
    # Each missing condition makes it an ordinary write (which, being the same
    # bytes again, leaves the entry partial).
    for not_dup in (replace(again, unchanged=False), replace(again, rep_string=True),
                    replace(again, first_of_event=False),
                    replace(again, event_fingerprint=(0xC100_7000, (("rax", 1),), PTE))):
        _, outcome = apply_write(state, not_dup, entry_size=8, policy=STRICT,
                                 guest_is_32bit=True)
        assert outcome == WriteOutcome(PARTIAL), not_dup


def test_strict_fingerprints_are_compared_exactly_not_by_hash() -> None:
    # Fingerprints that hash alike (2 and 2**64 - 6 hash to 2) but differ: the first
    # completing write's redelivery look-alike is an ordinary write, complete with
    # old == new; only an equal fingerprint makes a duplicate.
    first, other = (0x1000, b"\x48\x89\x37", 2), (0x1000, b"\x48\x89\x37", 2**64 - 6)
    assert hash(first) == hash(other) and first != other
    full = WriteInput(offset=0, size=8, value=PAE_NEW, entry_before=PAE_OLD,
                      entry_after=PAE_NEW, rip=0xC100_8000, event_fingerprint=first)
    state, _ = apply_write(None, full, entry_size=8, policy=STRICT, guest_is_32bit=False)
    look_alike = replace(full, entry_before=PAE_NEW, unchanged=True, event_fingerprint=other)
    assert apply_write(state, look_alike, entry_size=8, policy=STRICT,
                       guest_is_32bit=False)[1] == WriteOutcome(COMPLETE, old=PAE_NEW,
                                                                new=PAE_NEW)
    same = replace(look_alike, event_fingerprint=(0x1000, b"\x48\x89\x37", 2))
    assert apply_write(state, same, entry_size=8, policy=STRICT,
                       guest_is_32bit=False) == (state, WriteOutcome(DUPLICATE))


@pytest.mark.parametrize("policy", [HVMI, STRICT])
def test_peek_changes_nothing_and_put_commits_what_apply_would(policy: Policy) -> None:
    high = pae_write(4, 0x8000_0000, PAE_OLD, rip=0xC100_9000, event_fingerprint="e")
    peeking, applying = WriteStateTable(), WriteStateTable()
    state, outcome = peeking.peek(PTE, high, entry_size=8, policy=policy, guest_is_32bit=True)
    assert outcome == WriteOutcome(PARTIAL)
    assert len(peeking) == 0 and peeking.pending() == ()
    peeking.put(PTE, state)
    assert run(applying, high, policy=policy) == outcome
    assert peeking == applying and peeking.pending() == (PTE,)
    # Peeking at the completing half leaves the pending state in place.
    low = pae_write(0, 0x2345_6063, high.entry_after, rip=0xC100_9010, event_fingerprint="f")
    _, done = peeking.peek(PTE, low, entry_size=8, policy=policy, guest_is_32bit=True)
    assert done == WriteOutcome(COMPLETE, old=PAE_OLD, new=0x8000_0000_2345_6063)
    assert peeking == applying and peeking.pending() == (PTE,)
    peeking.put(PTE, None)
    assert len(peeking) == 0 and peeking.pending() == ()


def test_strict_ignores_rip_and_catches_duplicate_of_a_completing_event() -> None:
    table = WriteStateTable()
    full = WriteInput(offset=0, size=4, value=0x0040_1067, entry_before=0x0030_1067,
                      entry_after=0x0040_1067, rip=0xC10A_0000, event_fingerprint="e1")
    assert run(table, full, policy=STRICT, entry_size=4) == WriteOutcome(
        COMPLETE, old=0x0030_1067, new=0x0040_1067)
    # Same RIP, different event: not a duplicate under strict (hvmi would drop it).
    second = replace(full, value=0, entry_before=0x0040_1067, entry_after=0,
                     event_fingerprint="e2")
    assert run(table, second, policy=STRICT, entry_size=4) == WriteOutcome(
        COMPLETE, old=0x0040_1067, new=0)
    # The second one delivered again: memory already holds 0.
    redelivered = replace(second, entry_before=0, unchanged=True)
    before = table.snapshot()
    assert run(table, redelivered, policy=STRICT, entry_size=4) == WriteOutcome(DUPLICATE)
    assert table.snapshot() == before


def test_rep_iterations_of_one_event_are_never_duplicates() -> None:
    # rep stosb over one legacy entry: 4 iterations, one RIP, one event.
    for policy in (HVMI, STRICT):
        table = WriteStateTable()
        memory = 0x0030_1067
        outcomes = []
        for i in range(4):
            after = memory & ~(0xFF << 8 * i)
            outcomes.append(run(table, WriteInput(
                offset=i, size=1, value=0, entry_before=memory, entry_after=after,
                rip=0xC10B_0000, rep_string=True, event_fingerprint="rep",
                first_of_event=i == 0, unchanged=False), policy=policy, entry_size=4))
            memory = after
        assert outcomes == [WriteOutcome(PARTIAL)] * 3 + [
            WriteOutcome(COMPLETE, old=0x0030_1067, new=0)], policy


# --- flush and pending -----------------------------------------------------------------------

def test_flush_pending_entry_reports_memory_now() -> None:
    table = WriteStateTable()
    low = pae_write(0, 0x2345_6063, PAE_OLD, rip=0xC100_8000)
    run(table, low)
    assert table.flush(PTE, 0x0000_0000_2345_6063) == WriteOutcome(
        COMPLETE, old=PAE_OLD, new=0x0000_0000_2345_6063)
    assert table.pending() == ()
    # The last RIP is kept: the flushed write delivered again is still a duplicate.
    assert run(table, replace(low, entry_before=low.entry_after)) == WriteOutcome(DUPLICATE)


def test_flush_of_an_entry_with_nothing_pending_returns_none() -> None:
    table = WriteStateTable()
    assert table.flush(PTE, 0x1234) is None
    assert len(table) == 0
    run(table, WriteInput(offset=0, size=4, value=1, entry_before=0, entry_after=1,
                          rip=0xC100_9000), entry_size=4)
    before = table.snapshot()
    assert table.flush(PTE, 1) is None
    assert table.snapshot() == before
    assert flush_entry(None, 5) == (None, None)
    idle = EntryWriteState(0, 0, 0, last_write_rip=3)
    assert flush_entry(idle, 5) == (idle, None)


def test_pending_lists_partial_entries_sorted() -> None:
    table = WriteStateTable()
    for gpa in (0x5008, 0x1000, 0x3FF8):
        run(table, pae_write(4, 0x8000_0000, 0, rip=0xC100_A000 + gpa), gpa=gpa)
    run(table, WriteInput(offset=0, size=8, value=PAE_NEW, entry_before=0, entry_after=PAE_NEW,
                          rip=0xC100_B000), gpa=0x2000)
    assert table.pending() == (0x1000, 0x3FF8, 0x5008)
    run(table, pae_write(0, 1, 0x8000_0000_0000_0000, rip=0xC100_C000), gpa=0x3FF8)
    assert table.pending() == (0x1000, 0x5008)
    table.forget(0x1000)
    assert table.pending() == (0x5008,)


def test_snapshot_restore_and_equality() -> None:
    table = WriteStateTable()
    run(table, pae_write(0, 1, 0, rip=0xC100_D000))
    snap = table.snapshot()
    run(table, pae_write(4, 2, 1, rip=0xC100_D008))
    assert table.snapshot() != snap and table.pending() == ()
    table.restore(snap)
    assert table.snapshot() == snap and table.pending() == (PTE,)
    other = WriteStateTable()
    other.restore(snap)
    assert other == table
    with pytest.raises(TypeError):
        hash(table)


# --- what is kept per entry -----------------------------------------------------------------

def test_idle_entries_keep_only_what_the_duplicate_rules_need() -> None:
    full4 = WriteInput(offset=0, size=4, value=1, entry_before=0, entry_after=1, rip=0xC100_E000)
    full8 = WriteInput(offset=0, size=8, value=1, entry_before=0, entry_after=1, rip=0xC100_E000)
    table = WriteStateTable()
    run(table, full8, gpa=0x1000)                        # hvmi, last write 8 bytes: dropped
    run(table, full8, gpa=0x2000, guest_is_32bit=False)  # hvmi, 64-bit guest: dropped
    assert len(table) == 0
    run(table, full4, gpa=0x3000, entry_size=4)          # hvmi 32-bit: last RIP kept
    run(table, full4, gpa=0x4000, entry_size=4)
    assert len(table) == 2
    a, b = table.get(0x3000), table.get(0x4000)
    assert a == EntryWriteState(0, 0, 0, last_write_rip=0xE000)  # 0xC100E000 & 0x7FFFFF
    assert a is b  # idle states are shared
    run(table, replace(full8, event_fingerprint="ev"), gpa=0x5000, policy=STRICT)
    assert table.get(0x5000) == EntryWriteState(0, 0, 0, last_event="ev")


def test_bad_arguments_raise_usage_error() -> None:
    write = WriteInput(offset=4, size=4, value=1, entry_before=0, entry_after=1, rip=0)
    with pytest.raises(UsageError, match="entry_size"):
        apply_write(None, write, entry_size=16, policy=HVMI, guest_is_32bit=True)
    with pytest.raises(UsageError, match="does not fit"):
        apply_write(None, write, entry_size=4, policy=HVMI, guest_is_32bit=True)
    with pytest.raises(UsageError, match="does not fit"):
        apply_write(None, replace(write, size=0), entry_size=8, policy=HVMI,
                    guest_is_32bit=True)
    with pytest.raises(UsageError, match="entry_before"):
        apply_write(None, replace(write, entry_before=1 << 64), entry_size=8, policy=HVMI,
                    guest_is_32bit=True)
    with pytest.raises(UsageError, match="policy"):
        apply_write(None, write, entry_size=8, policy="lenient",  # type: ignore[arg-type]
                    guest_is_32bit=True)


# --- properties ------------------------------------------------------------------------------

@st.composite
def chunked_entries(draw: st.DrawFn) -> tuple[int, int, list[tuple[int, int, int]]]:
    """(entry_size, initial entry, disjoint chunks (offset, size, value) covering it, shuffled)."""
    entry_size = draw(st.sampled_from([4, 8]))
    cuts = sorted(draw(st.sets(st.integers(1, entry_size - 1))))
    bounds = [0, *cuts, entry_size]
    chunks = [(lo, hi - lo, draw(st.integers(0, (1 << (8 * (hi - lo))) - 1)))
              for lo, hi in pairwise(bounds)]
    initial = draw(st.integers(0, (1 << (8 * entry_size)) - 1))
    return entry_size, initial, draw(st.permutations(chunks))


def store_bytes(entry: int, entry_size: int, offset: int, size: int, value: int) -> int:
    """Memory model: the entry as bytes, with `size` bytes of `value` stored at `offset`."""
    data = bytearray(entry.to_bytes(entry_size, "little"))
    data[offset:offset + size] = value.to_bytes(size, "little")
    return int.from_bytes(data, "little")


@settings(max_examples=300)
@given(chunked_entries(), st.sampled_from([HVMI, STRICT]), st.booleans(), st.booleans())
def test_disjoint_chunks_in_any_order_assemble_the_entry(
        case: tuple[int, int, list[tuple[int, int, int]]], policy: Policy,
        guest_is_32bit: bool, start_idle: bool) -> None:
    entry_size, initial, chunks = case
    expected_new = initial
    for offset, size, value in chunks:
        expected_new = store_bytes(expected_new, entry_size, offset, size, value)
    # An idle state with an unrelated last RIP/event must not change anything.
    state: EntryWriteState | None = (
        EntryWriteState(0, 0, 0, last_write_rip=0x7F_FFFF, last_event="older")
        if start_idle else None)
    memory = initial
    for i, (offset, size, value) in enumerate(chunks):
        after = store_bytes(memory, entry_size, offset, size, value)
        write = WriteInput(offset=offset, size=size, value=value, entry_before=memory,
                           entry_after=after, rip=0xC000_0000 + 0x10 * i,
                           event_fingerprint=("event", i))
        state, outcome = apply_write(state, write, entry_size=entry_size, policy=policy,
                                     guest_is_32bit=guest_is_32bit)
        memory = after
        if i < len(chunks) - 1:
            assert outcome == WriteOutcome(PARTIAL)
            assert state is not None and state.cur == initial  # old captured at the first chunk
        else:
            assert outcome == WriteOutcome(COMPLETE, old=initial, new=expected_new)
            assert state is None or not state.is_pending


@given(st.sampled_from([4, 8]), st.data(), st.sampled_from([HVMI, STRICT]), st.booleans(),
       st.booleans())
def test_full_width_write_completes_at_once(entry_size: int, data: st.DataObject,
                                            policy: Policy, guest_is_32bit: bool,
                                            rmw: bool) -> None:
    limit = (1 << (8 * entry_size)) - 1
    before, value = data.draw(st.integers(0, limit)), data.draw(st.integers(0, limit))
    write = WriteInput(offset=0, size=entry_size, value=value, entry_before=before,
                       entry_after=value, rip=0x1234, read_modify_write=rmw,
                       event_fingerprint="e")
    state, outcome = apply_write(None, write, entry_size=entry_size, policy=policy,
                                 guest_is_32bit=guest_is_32bit)
    assert outcome == WriteOutcome(COMPLETE, old=before, new=value)
    assert state is None or not state.is_pending


writes = st.builds(
    lambda offset, size, value, before, after, rip, rmw, rep, first, unchanged: WriteInput(
        offset=offset, size=min(size, 8 - offset), value=value, entry_before=before,
        entry_after=after, rip=rip, read_modify_write=rmw, rep_string=rep,
        event_fingerprint=("ev", rip), first_of_event=first, unchanged=unchanged),
    st.integers(0, 7), st.integers(1, 8), st.integers(0, (1 << 64) - 1),
    st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1),
    st.sampled_from([0x10, 0x20, 0x800010]), st.booleans(), st.booleans(), st.booleans(),
    st.booleans())
states = st.none() | st.builds(
    EntryWriteState, st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1),
    st.integers(0, 0xFF), st.none() | st.sampled_from([0x10, 0x20]), st.booleans(),
    st.none() | st.builds(lambda r: ("ev", r), st.sampled_from([0x10, 0x20])))


@given(states, writes, st.sampled_from([HVMI, STRICT]), st.booleans())
def test_apply_write_never_mutates_its_inputs(state: EntryWriteState | None, write: WriteInput,
                                              policy: Policy, guest_is_32bit: bool) -> None:
    state_copy, write_copy = copy.deepcopy(state), copy.deepcopy(write)
    new_state, outcome = apply_write(state, write, entry_size=8, policy=policy,
                                     guest_is_32bit=guest_is_32bit)
    assert state == state_copy and write == write_copy
    if outcome.state is DUPLICATE:
        assert new_state is state


# The seed's IntHookPtwProcessWrite, transcribed from hook_ptwh.c with its
# mutable HOOK_PTEWS, as the oracle for the hvmi policy.
@dataclass
class SeedPtews:
    cur_entry: int = 0
    int_entry: int = 0
    written_mask: int = 0
    last_write_rip: int = 0
    last_write_size: int = 0  # 1 == 8 bytes


def seed_process_write(ws: SeedPtews, *, guest64: bool, rip: int, size: int, offset: int,
                       old_value: int, new_value: int, entry_size: int,
                       ) -> tuple[str, int | None, int | None]:
    if not guest64:
        if (rip & ((1 << 23) - 1)) == ws.last_write_rip and ws.last_write_size == 0:
            return "duplicate", None, None
        ws.last_write_rip = rip & ((1 << 23) - 1)
        ws.last_write_size = 1 if size == 8 else 0
    byte_mask = ((1 << size) - 1) << offset
    bit_mask = sum(0xFF << (8 * i) for i in range(8) if byte_mask & (1 << i))  # gByteMaskToBitMask
    if ws.written_mask == 0:
        ws.cur_entry = old_value
    ws.written_mask |= byte_mask
    ws.int_entry = (ws.int_entry & ~bit_mask) | (((new_value << (offset * 8)) & (2**64 - 1))
                                                 & bit_mask)
    if ws.written_mask != (1 << entry_size) - 1:
        return "partial", None, None
    result = ("complete", ws.cur_entry, ws.int_entry)
    ws.cur_entry, ws.int_entry, ws.written_mask = ws.int_entry, 0, 0
    return result


seed_steps = st.lists(st.tuples(st.integers(0, 7), st.integers(1, 8),
                                st.integers(0, (1 << 64) - 1),
                                st.sampled_from([0xC000_0010, 0xC000_0020, 0xC080_0010, 0x10])),
                      min_size=1, max_size=12)


@settings(max_examples=300)
@given(st.sampled_from([4, 8]), st.booleans(), st.sampled_from([0x10, 0x20]), st.booleans(),
       st.integers(0, (1 << 64) - 1), seed_steps)
def test_hvmi_matches_the_seed(entry_size: int, guest64: bool, first_rip: int, first_was_8: bool,
                               initial: int, steps: list[tuple[int, int, int, int]]) -> None:
    initial &= (1 << (8 * entry_size)) - 1
    seed = SeedPtews(last_write_rip=first_rip, last_write_size=int(first_was_8))
    state: EntryWriteState | None = EntryWriteState(
        0, 0, 0, last_write_rip=first_rip, last_write_was_8=first_was_8)
    memory = initial
    for offset, size, value, rip in steps:
        offset %= entry_size
        size = min(size, entry_size - offset)
        value &= (1 << (8 * size)) - 1
        after = store_bytes(memory, entry_size, offset, size, value)
        expected = seed_process_write(seed, guest64=guest64, rip=rip, size=size, offset=offset,
                                      old_value=memory, new_value=value, entry_size=entry_size)
        state, outcome = apply_write(
            state, WriteInput(offset=offset, size=size, value=value, entry_before=memory,
                              entry_after=after, rip=rip, read_modify_write=True),
            entry_size=entry_size, policy=HVMI, guest_is_32bit=not guest64)
        assert (outcome.state.value, outcome.old, outcome.new) == expected
        if seed.written_mask:
            assert state is not None
            assert (state.cur, state.assembling, state.written_mask) == (
                seed.cur_entry, seed.int_entry, seed.written_mask)
        else:
            assert state is None or not state.is_pending
        memory = after
