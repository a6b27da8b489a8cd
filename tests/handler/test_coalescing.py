"""PAE second-half coalescing as semantics.md section 2 says, under both policies.

The rule: after a 4-byte store into an 8-byte PAE entry, the handler emulates
the next instruction in the same exit when it stores the other half, but only
when the first store *leaves the entry partial*. Under ``hvmi`` (the seed)
every such store does; under ``strict`` a read-modify-write completes the
entry at once, so the next store is its own exit. Every expected value below
is worked out by hand from the SDM (what the instructions store) and from the
write-state rules of semantics.md section 3, never taken from the handler.
"""

from __future__ import annotations

import pytest

from ptemu.status import EntryState, Status

RIP = 0xC1001234
GLA = 0xC1234FF0
GPA = 0x01234FF0

XCHG_LOW = "87 10"                        # xchg [eax], edx
MOV_HIGH_ZERO = "c7 40 04 00 00 00 00"    # mov dword [eax+4], 0
MOV_HIGH = "89 48 04"                     # mov [eax+4], ecx
MOV_LOW = "89 10"                         # mov [eax], edx
CMPXCHG8B = "f0 0f c7 0e"                 # lock cmpxchg8b [esi]
MOV_HIGH_FROM_ESI = "89 46 04"            # mov [esi+4], eax


def _writes(result):
    return [(w.gpa, w.offset, w.size, w.value, w.old) for w in result.writes]


def _entries(result):
    return [(e.gpa, e.state, e.old, e.new) for e in result.entries]


# -- Linux native_ptep_get_and_clear (PAE): xchg the low half, then clear the high


def test_xchg_low_then_mov_high_hvmi_is_one_exit(make_guest):
    # hvmi: the 4-byte XCHG leaves the entry partial (mask 0x0f, cur = 0x1_12345067),
    # so the MOV of the high half is coalesced and completes it: old = cur, new = 0.
    guest = make_guest("pae", policy="hvmi")
    guest.set_entry(GPA, 0x1_12345067)
    result = guest.write(XCHG_LOW + MOV_HIGH_ZERO, {"rip": RIP, "rax": GLA, "rdx": 0}, GLA, GPA,
                         code_bits=32)
    assert result.status is Status.EMULATED
    assert result.instructions == 2
    assert _writes(result) == [(GPA, 0, 4, 0, 0x1_12345067), (GPA, 4, 4, 0, 0x1_00000000)]
    assert _entries(result) == [(GPA, EntryState.COMPLETE, 0x1_12345067, 0)]
    # XCHG loads the old low half into EDX; RIP moves past both (2 + 7 bytes).
    assert result.regs == {"rdx": 0x12345067, "rip": RIP + 9}
    assert guest.entry(GPA) == 0
    assert guest.handler.pending() == ()


def test_xchg_low_then_mov_high_strict_is_two_exits(make_guest):
    # strict: the XCHG read the whole entry and completes it at once: old = the entry
    # before, new = memory after (high half kept, low half zero). Its completion stands
    # alone; the MOV is the guest's next exit, a plain store that leaves it partial.
    guest = make_guest("pae")
    guest.set_entry(GPA, 0x1_12345067)
    first = guest.write(XCHG_LOW + MOV_HIGH_ZERO, {"rip": RIP, "rax": GLA, "rdx": 0}, GLA, GPA,
                        code_bits=32)
    assert first.status is Status.EMULATED
    assert first.instructions == 1
    assert _writes(first) == [(GPA, 0, 4, 0, 0x1_12345067)]
    assert _entries(first) == [(GPA, EntryState.COMPLETE, 0x1_12345067, 0x1_00000000)]
    assert first.regs == {"rdx": 0x12345067, "rip": RIP + 2}
    assert guest.entry(GPA) == 0x1_00000000  # the high half is not written yet
    assert guest.handler.pending() == ()
    second = guest.write(MOV_HIGH_ZERO, {"rip": RIP + 2, "rax": GLA, "rdx": 0x12345067},
                         GLA + 4, GPA + 4, code_bits=32)
    assert second.instructions == 1
    assert _writes(second) == [(GPA, 4, 4, 0, 0x1_00000000)]
    assert _entries(second) == [(GPA, EntryState.PARTIAL, None, None)]
    assert second.regs == {"rip": RIP + 9}
    assert guest.entry(GPA) == 0
    assert guest.handler.pending() == (GPA,)


def test_lock_cmpxchg_of_one_half_is_not_coalesced_under_strict(make_guest):
    # f0 0f b1 16 = lock cmpxchg [esi], edx (EAX is the compare value, so ESI holds
    # the address). EAX == the low half: match, [esi] := EDX. Then mov [esi+4], eax
    # stores the other half: strict completes at the CMPXCHG and stops there; hvmi
    # coalesces the MOV, which completes the entry with EAX in the high half.
    for policy, instructions in (("strict", 1), ("hvmi", 2)):
        guest = make_guest("pae", policy=policy)
        guest.set_entry(GPA, 0x1_12345067)
        result = guest.write("f0 0f b1 16" + MOV_HIGH_FROM_ESI,
                             {"rip": RIP, "rsi": GLA, "rax": 0x12345067, "rdx": 0x22222067},
                             GLA, GPA, code_bits=32)
        assert result.instructions == instructions, policy
        if policy == "strict":
            assert _entries(result) == [(GPA, EntryState.COMPLETE, 0x1_12345067, 0x1_22222067)]
            assert guest.entry(GPA) == 0x1_22222067
        else:  # the high half gets EAX = 0x12345067
            assert _entries(result) == [(GPA, EntryState.COMPLETE, 0x1_12345067,
                                         0x12345067_22222067)]
            assert guest.entry(GPA) == 0x12345067_22222067


# -- Linux set_pte_atomic / cmpxchg64 (PAE): lock cmpxchg8b on the whole entry


@pytest.mark.parametrize("policy", ["strict", "hvmi"])
def test_lock_cmpxchg8b_match_is_one_8_byte_write_never_coalesced(make_guest, policy):
    # SDM CMPXCHG8B: EDX:EAX == m64 -> m64 := ECX:EBX, ZF := 1. An 8-byte write fills
    # the entry (complete under both policies) and the PtEmuBuffer is not partial, so
    # the following store to the high half is not emulated in this exit.
    guest = make_guest("pae", policy=policy)
    guest.set_entry(GPA, 0x1_12345067)
    regs = {"rip": RIP, "rsi": GLA, "rdx": 1, "rax": 0x12345067, "rcx": 2, "rbx": 0x22222067}
    result = guest.write(CMPXCHG8B + MOV_HIGH_FROM_ESI, regs, GLA, GPA, code_bits=32)
    assert result.instructions == 1
    assert _writes(result) == [(GPA, 0, 8, 0x2_22222067, 0x1_12345067)]
    assert _entries(result) == [(GPA, EntryState.COMPLETE, 0x1_12345067, 0x2_22222067)]
    assert result.regs == {"rip": RIP + 4, "rflags": 0x42}
    assert guest.entry(GPA) == 0x2_22222067


@pytest.mark.parametrize("policy", ["strict", "hvmi"])
def test_lock_cmpxchg8b_mismatch_writes_back_and_is_not_coalesced(make_guest, policy):
    # Mismatch: EDX:EAX := m64, ZF := 0, and the locked instruction writes the old
    # value back (8 bytes): complete with old == new under both policies.
    guest = make_guest("pae", policy=policy)
    guest.set_entry(GPA, 0x1_12345067)
    regs = {"rip": RIP, "rsi": GLA, "rdx": 0, "rax": 0, "rcx": 2, "rbx": 0x22222067}
    result = guest.write(CMPXCHG8B + MOV_HIGH_FROM_ESI, regs, GLA, GPA, code_bits=32)
    assert result.instructions == 1
    assert _writes(result) == [(GPA, 0, 8, 0x1_12345067, 0x1_12345067)]
    assert _entries(result) == [(GPA, EntryState.COMPLETE, 0x1_12345067, 0x1_12345067)]
    assert result.regs == {"rip": RIP + 4, "rax": 0x12345067, "rdx": 1}


# -- Linux native_set_pte (PAE): mov the high half, then the low half


@pytest.mark.parametrize("policy", ["strict", "hvmi"])
def test_mov_high_then_mov_low_is_one_exit_under_both_policies(make_guest, policy):
    # A plain 4-byte MOV leaves the entry partial under both policies (mask 0xf0),
    # so the low half is coalesced and completes it: old = 0, new = ECX:EDX.
    guest = make_guest("pae", policy=policy)
    regs = {"rip": RIP, "rax": GLA, "rcx": 0x80000000, "rdx": 0x12345067}
    result = guest.write(MOV_HIGH + MOV_LOW, regs, GLA + 4, GPA + 4, code_bits=32)
    assert result.instructions == 2
    assert _writes(result) == [(GPA, 4, 4, 0x80000000, 0),
                               (GPA, 0, 4, 0x12345067, 0x80000000_00000000)]
    assert _entries(result) == [(GPA, EntryState.COMPLETE, 0, 0x80000000_12345067)]
    assert result.regs == {"rip": RIP + 5}
    assert guest.handler.pending() == ()


def test_store_that_completes_a_pending_entry_is_not_coalesced_under_strict(make_guest):
    # The low half is pending from an earlier exit (cur = 0x1_11111067, low = 0x33333067).
    # strict: the MOV of the high half completes the entry (mask 0xff): that completion
    # stands alone, the MOV of the low half is the next exit.
    # hvmi (the seed): every 4-byte store triggers, so the low half follows in the same
    # exit and starts a new pending entry (cur = the entry after the high half).
    for policy in ("strict", "hvmi"):
        guest = make_guest("pae", policy=policy)
        guest.set_entry(GPA, 0x1_11111067)
        guest.write(MOV_LOW + "c3", {"rip": RIP - 0x100, "rax": GLA, "rdx": 0x33333067},
                    GLA, GPA, code_bits=32)
        assert guest.handler.pending() == (GPA,)
        regs = {"rip": RIP, "rax": GLA, "rcx": 0x2, "rdx": 0x44444067}
        result = guest.write(MOV_HIGH + MOV_LOW, regs, GLA + 4, GPA + 4, code_bits=32)
        if policy == "strict":
            assert result.instructions == 1
            assert _entries(result) == [(GPA, EntryState.COMPLETE, 0x1_11111067, 0x2_33333067)]
            assert result.regs == {"rip": RIP + 3}
            assert guest.handler.pending() == ()
            assert guest.entry(GPA) == 0x2_33333067
        else:
            assert result.instructions == 2
            assert _entries(result) == [(GPA, EntryState.PARTIAL, None, None)]
            assert result.regs == {"rip": RIP + 5}
            assert guest.handler.pending() == (GPA,)
            assert guest.entry(GPA) == 0x2_44444067


# -- duplicates


def test_strict_duplicate_is_not_coalesced(make_guest):
    # The first delivery came with a code window that ended after the instruction,
    # so it was not coalesced: the high half is pending. The second delivery is the
    # same event (same GPA, instruction bytes, registers; memory already holds the
    # bytes): a duplicate. It leaves the state as it was and is not coalesced.
    guest = make_guest("pae")
    regs = {"rip": RIP, "rax": GLA, "rcx": 0x80000000, "rdx": 0x12345067}
    first = guest.write(MOV_HIGH, regs, GLA + 4, GPA + 4, code_bits=32)
    assert _entries(first) == [(GPA, EntryState.PARTIAL, None, None)]
    state = guest.handler.write_state.snapshot()
    again = guest.write(MOV_HIGH + MOV_LOW, regs, GLA + 4, GPA + 4, code_bits=32)
    assert again.status is Status.EMULATED
    assert again.instructions == 1
    assert _entries(again) == [(GPA, EntryState.DUPLICATE, None, None)]
    assert again.regs == {"rip": RIP + 3}
    assert guest.handler.write_state.snapshot() == state
    assert guest.entry(GPA) == 0x80000000_00000000


def test_hvmi_duplicate_is_coalesced_as_the_seed_does(make_guest):
    # hvmi decides from the partial PtEmuBuffer, as the seed does: the same-RIP
    # duplicate changes nothing, and the coalesced low half completes the entry
    # pending from the first delivery: old = 0, new = 0x80000000_12345067.
    guest = make_guest("pae", policy="hvmi")
    regs = {"rip": RIP, "rax": GLA, "rcx": 0x80000000, "rdx": 0x12345067}
    guest.write(MOV_HIGH, regs, GLA + 4, GPA + 4, code_bits=32)
    again = guest.write(MOV_HIGH + MOV_LOW, regs, GLA + 4, GPA + 4, code_bits=32)
    assert again.instructions == 2
    assert _entries(again) == [(GPA, EntryState.COMPLETE, 0, 0x80000000_12345067)]
    assert again.regs == {"rip": RIP + 5}


# -- deciding leaves no trace


@pytest.mark.parametrize(("policy", "code"), [
    ("strict", XCHG_LOW + MOV_HIGH_ZERO),  # verdict complete: not coalesced
    ("strict", MOV_HIGH + "89 50 08"),     # verdict partial, but the next store is elsewhere
    ("strict", MOV_HIGH + "c3"),           # verdict partial, the next instruction stores nothing
    ("hvmi", MOV_HIGH + "89 50 08"),
    ("hvmi", MOV_HIGH + "c3"),
])
def test_an_event_not_coalesced_leaves_the_state_of_a_single_instruction(make_guest, policy,
                                                                         code):
    # Whatever the handler looked at to decide (the write state's verdict, the next
    # instruction), an event it did not coalesce leaves exactly the write state,
    # memory and registers of the same event handled with coalescing off.
    regs = {"rip": RIP, "rax": GLA, "rcx": 0x7, "rdx": 0}
    gla, gpa = (GLA, GPA) if code.startswith(XCHG_LOW) else (GLA + 4, GPA + 4)
    results = []
    guests = []
    for coalesce in (True, False):
        guest = make_guest("pae", policy=policy, coalesce=coalesce)
        guest.set_entry(GPA, 0x1_12345067)
        guest.write(MOV_LOW + "c3", {"rip": RIP - 0x40, "rax": GLA + 8, "rdx": 0x5},
                    GLA + 8, GPA + 8, code_bits=32)  # another entry, pending
        results.append(guest.write(code, regs, gla, gpa, code_bits=32))
        guests.append(guest)
    coalesced, single = results
    assert coalesced.instructions == single.instructions == 1
    assert (coalesced.writes, coalesced.entries, dict(coalesced.regs)) == (
        single.writes, single.entries, dict(single.regs))
    assert guests[0].handler.write_state == guests[1].handler.write_state
    assert guests[0].memory == guests[1].memory
