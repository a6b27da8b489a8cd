"""The seed's documented write-state behaviours, driven through the handler
(semantics.md sections 2 and 3)."""

from __future__ import annotations

from ptemu.status import EntryState, Status

RIP = 0xC1001234
GLA = 0xC1234FF0
GPA = 0x01234FF0


def _states(result):
    return [(e.gpa, e.state, e.old, e.new) for e in result.entries]


def test_pae_high_then_low(make_guest):
    # native_set_pte on i386 PAE writes the high half first, then the low.
    guest = make_guest("pae", coalesce=False)
    guest.set_entry(GPA, 0x0000000000000000)
    r1 = guest.write("89 48 04", {"rip": RIP, "rax": GLA, "rcx": 0x80000000}, GLA + 4, GPA + 4,
                     code_bits=32)
    assert _states(r1) == [(GPA, EntryState.PARTIAL, None, None)]
    r2 = guest.write("89 10", {"rip": RIP + 3, "rax": GLA, "rdx": 0x12345067}, GLA, GPA,
                     code_bits=32)
    assert _states(r2) == [(GPA, EntryState.COMPLETE, 0, 0x80000000_12345067)]


def test_pae_low_then_high(make_guest):
    guest = make_guest("pae", coalesce=False)
    guest.set_entry(GPA, 0x80000000_11111067)
    r1 = guest.write("89 10", {"rip": RIP, "rax": GLA, "rdx": 0x22222067}, GLA, GPA,
                     code_bits=32)
    assert r1.entries[0].state is EntryState.PARTIAL
    r2 = guest.write("89 48 04", {"rip": RIP + 2, "rax": GLA, "rcx": 0x1}, GLA + 4, GPA + 4,
                     code_bits=32)
    assert _states(r2) == [(GPA, EntryState.COMPLETE, 0x80000000_11111067, 0x1_22222067)]


def test_xchg_low_then_mov_high_under_hvmi(make_guest):
    # Linux's native_ptep_get_and_clear (PAE): xchg the low half, then write the high.
    guest = make_guest("pae", policy="hvmi", coalesce=False)
    guest.set_entry(GPA, 0x1_12345067)
    r1 = guest.write("87 10", {"rip": RIP, "rax": GLA, "rdx": 0}, GLA, GPA, code_bits=32)
    assert r1.entries[0].state is EntryState.PARTIAL
    assert r1.regs["rdx"] == 0x12345067
    r2 = guest.write("c7 40 04 00 00 00 00", {"rip": RIP + 2, "rax": GLA}, GLA + 4, GPA + 4,
                     code_bits=32)
    assert _states(r2) == [(GPA, EntryState.COMPLETE, 0x1_12345067, 0)]


def test_xchg_completes_at_once_under_strict(make_guest):
    guest = make_guest("pae", coalesce=False)
    guest.set_entry(GPA, 0x1_12345067)
    r1 = guest.write("87 10", {"rip": RIP, "rax": GLA, "rdx": 0}, GLA, GPA, code_bits=32)
    assert _states(r1) == [(GPA, EntryState.COMPLETE, 0x1_12345067, 0x1_00000000)]


def test_duplicate_delivery_under_hvmi(make_guest):
    # Xen delivered the same event twice: same RIP, 4-byte write -> duplicate.
    guest = make_guest("pae", policy="hvmi", coalesce=False)
    regs = {"rip": RIP, "rax": GLA, "rdx": 0x12345067}
    r1 = guest.write("89 10", regs, GLA, GPA, code_bits=32)
    assert r1.entries[0].state is EntryState.PARTIAL
    r2 = guest.write("89 10", regs, GLA, GPA, code_bits=32)
    assert r2.status is Status.EMULATED
    assert r2.entries[0].state is EntryState.DUPLICATE
    assert guest.handler.pending() == (GPA,)


def test_duplicate_delivery_under_strict_is_exact(make_guest):
    # strict: identical event and memory already holds the bytes -> duplicate;
    # the same RIP with other registers is a real write.
    guest = make_guest("pae", coalesce=False)
    regs = {"rip": RIP, "rax": GLA, "rdx": 0x12345067}
    guest.write("89 10", regs, GLA, GPA, code_bits=32)
    r2 = guest.write("89 10", regs, GLA, GPA, code_bits=32)
    assert r2.entries[0].state is EntryState.DUPLICATE
    r3 = guest.write("89 10", {**regs, "rdx": 0x7654321}, GLA, GPA, code_bits=32)
    assert r3.entries[0].state is EntryState.PARTIAL


def test_flush_reports_pending_entry(make_guest):
    guest = make_guest("pae", coalesce=False)
    guest.set_entry(GPA, 0x5_00000000)
    guest.write("89 10", {"rip": RIP, "rax": GLA, "rdx": 0x63}, GLA, GPA, code_bits=32)
    assert guest.handler.pending() == (GPA,)
    flushed = guest.handler.flush(GPA)
    assert (flushed.state, flushed.old, flushed.new) == (EntryState.COMPLETE, 0x5_00000000,
                                                         0x5_00000063)
    assert guest.handler.pending() == ()
    assert guest.handler.flush(GPA) is None


def test_coalesced_second_half_in_one_exit(make_guest):
    # mov [eax+4], ecx ; mov [eax], edx : both halves in one exit (semantics 2).
    guest = make_guest("pae")
    regs = {"rip": RIP, "rax": GLA, "rcx": 0x80000000, "rdx": 0x12345067}
    result = guest.write("89 48 04 89 10 c3", regs, GLA + 4, GPA + 4, code_bits=32)
    assert result.instructions == 2
    assert [(w.gpa, w.offset, w.size, w.value) for w in result.writes] == [
        (GPA, 4, 4, 0x80000000), (GPA, 0, 4, 0x12345067)]
    assert _states(result) == [(GPA, EntryState.COMPLETE, 0, 0x80000000_12345067)]
    assert result.regs == {"rip": RIP + 5}
    buffer = guest.vcpu.pt_emu_buffer
    assert (buffer.old, buffer.new, buffer.partial, buffer.valid) == (0, 0x80000000, True, True)


def test_no_coalescing_when_next_store_is_elsewhere_or_disabled(make_guest):
    guest = make_guest("pae")
    regs = {"rip": RIP, "rax": GLA, "rcx": 1, "rdx": 2}
    # mov [eax+4], ecx ; mov [eax+8], edx: the next entry, not the other half.
    result = guest.write("89 48 04 89 50 08", regs, GLA + 4, GPA + 4, code_bits=32)
    assert result.instructions == 1
    assert result.regs == {"rip": RIP + 3}
    guest = make_guest("pae", coalesce=False)
    result = guest.write("89 48 04 89 10", regs, GLA + 4, GPA + 4, code_bits=32)
    assert result.instructions == 1


def test_classification_attached_to_complete_entries(make_guest):
    guest = make_guest("4level", table_levels={0x12345000: 1})
    result = guest.write("48 89 37", {"rip": 0xFFFFFFFF81000000, "rdi": 0xFFFF888012345FF8,
                                      "rsi": 0x8000000012345067},
                         0xFFFF888012345FF8, 0x12345FF8)
    change = result.entries[0].change
    assert change is not None
    assert "map" in {str(kind) for kind in change.kinds}


# -- strict duplicates are exact (semantics.md section 3; issue: identity by hash())

RIP_LOW, RIP_HIGH = 0x2, 2**64 - 6
PTE_GLA = 0xFFFF888012345010
PTE_GPA = 0x12345010
NEW_PTE = 0x8000000012346067


def _regs(rip):
    return {"rip": rip, "rdi": PTE_GLA, "rsi": NEW_PTE, "rflags": 0x2}


def test_rips_whose_hashes_collide_are_not_duplicates(make_guest):
    # 2**64 - 6 = 8 * (2**61 - 1) + 2: Python hashes ints modulo 2**61 - 1, so both
    # RIPs hash to 2, and so do tuples of otherwise equal registers.
    assert hash(RIP_LOW) == hash(RIP_HIGH)
    assert hash(tuple(_regs(RIP_LOW).values())) == hash(tuple(_regs(RIP_HIGH).values()))
    guest = make_guest("4level")
    first = guest.write("48 89 37", _regs(RIP_LOW), PTE_GLA, PTE_GPA)  # mov [rdi], rsi
    assert _states(first) == [(PTE_GPA, EntryState.COMPLETE, 0, NEW_PTE)]
    # The same store from the other RIP finds memory already holding its bytes, but it
    # is another instruction: a real write, complete with old == new.
    second = guest.write("48 89 37", _regs(RIP_HIGH), PTE_GLA, PTE_GPA)
    assert second.status is Status.EMULATED
    assert _states(second) == [(PTE_GPA, EntryState.COMPLETE, NEW_PTE, NEW_PTE)]
    assert second.regs == {"rip": RIP_HIGH + 3}


def test_same_rip_and_registers_with_other_instruction_bytes_is_not_a_duplicate(make_guest):
    # 48 89 37 and 48 89 77 00 both store RSI to [RDI] (the second with a zero disp8).
    guest = make_guest("4level")
    regs = _regs(0xFFFFFFFF81001000)
    guest.write("48 89 37", regs, PTE_GLA, PTE_GPA)
    other = guest.write("48 89 77 00", regs, PTE_GLA, PTE_GPA)
    assert _states(other) == [(PTE_GPA, EntryState.COMPLETE, NEW_PTE, NEW_PTE)]
    assert other.regs == {"rip": 0xFFFFFFFF81001004}


def test_the_same_event_delivered_twice_is_still_a_duplicate(make_guest):
    guest = make_guest("4level")
    regs = _regs(RIP_HIGH)
    guest.write("48 89 37", regs, PTE_GLA, PTE_GPA)
    state = guest.handler.write_state.snapshot()
    # The same instruction bytes with a longer code window: still the same event.
    again = guest.write("48 89 37 c3", regs, PTE_GLA, PTE_GPA)
    assert _states(again) == [(PTE_GPA, EntryState.DUPLICATE, None, None)]
    assert guest.handler.write_state.snapshot() == state
    # Same event but memory no longer holds its bytes (the guest changed the entry
    # meanwhile): a real write again.
    guest.set_entry(PTE_GPA, 0x1067)
    third = guest.write("48 89 37", regs, PTE_GLA, PTE_GPA)
    assert _states(third) == [(PTE_GPA, EntryState.COMPLETE, 0x1067, NEW_PTE)]
