"""Property tests: whatever the guest throws at the handler, it never raises,
and an event that is not emulated changes nothing."""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.memory import InMemoryGuestMemory
from ptemu.status import EntryState, Status
from ptemu.vcpu import Vcpu

PAGE_GLA = 0xFFFF888012345000
PAGE_GPA = 0x12345000

# Opcode heads of stores and near-stores, so that many random cases decode to
# something that writes memory; pure random bytes follow them.
HEADS = [b"", b"\x88", b"\x89", b"\x48\x89", b"\xc6", b"\xc7", b"\x48\xc7", b"\x87", b"\x48\x87",
         b"\xf0\x48\x0f\xb1", b"\x0f\xb1", b"\xf0\x0f\xc7", b"\x0f\xc7", b"\xf0\x80", b"\x81",
         b"\x83", b"\xf0\x48\x09", b"\x21", b"\x31", b"\x0f\xab", b"\xf0\x0f\xb3", b"\x0f\xbb",
         b"\x0f\xba", b"\xaa", b"\xab", b"\xf3\xab", b"\xf3\x48\xab", b"\x66", b"\x67", b"\x64",
         b"\x65", b"\xf0", b"\x0f\x11", b"\x66\x0f\x7f", b"\xc5\xfe\x7f", b"\x48\x0f\xc7",
         b"\xf0\x48\x0f\xc1", b"\xfe", b"\xff", b"\xf6", b"\xf7", b"\x0f\xc3", b"\xf3\xa5",
         # complete [rdi]/[edi] forms, so that a good share of cases store
         b"\x48\x89\x37", b"\x89\x37", b"\x88\x07", b"\xf0\x48\x0f\xb1\x37", b"\x48\x87\x37",
         b"\xf0\x80\x27", b"\x48\xab", b"\xf3\x48\xab", b"\xf3\xaa", b"\xf0\x0f\xc7\x0f",
         b"\xf0\x48\x0f\xab\x37", b"\x48\x0f\xba\x37"]

registers = st.fixed_dictionaries(
    {"rip": st.sampled_from([0xFFFFFFFF81001234, 0xC1001234, 0x1234, 0xFFFFFFFF81000FFE])},
    optional={name: st.one_of(st.integers(0, 2**64 - 1),
                              st.integers(0, 0xFFF).map(lambda o: PAGE_GLA + o),
                              st.integers(0, 0xFFF).map(lambda o: 0xC1234000 + o),
                              st.integers(-8, 130).map(lambda v: v % 2**64))
              for name in ("rax", "rcx", "rdx", "rbx", "rsi", "rdi", "rbp", "rsp", "r8")}
    | {"rflags": st.integers(0, 0xFFF).map(lambda f: f | 2),
       "fs_base": st.sampled_from([0, PAGE_GLA, 0x10000000]),
       "gs_base": st.sampled_from([0, PAGE_GLA]),
       "xmm0": st.integers(0, 2**128 - 1)})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(head=st.sampled_from(HEADS), tail=st.binary(min_size=0, max_size=14),
       regs=registers, offset=st.integers(0, 0xFFF), code_bits=st.sampled_from([16, 32, 64]),
       paging=st.sampled_from(["legacy", "pae", "4level", "5level"]),
       policy=st.sampled_from(["strict", "hvmi"]), pending=st.booleans(),
       page_bytes=st.binary(min_size=16, max_size=16))
def test_never_raises_and_refusals_change_nothing(head, tail, regs, offset, code_bits, paging,
                                                  policy, pending, page_bytes):
    if code_bits == 64 and paging in ("legacy", "pae"):
        code_bits = 32
    memory = InMemoryGuestMemory([(PAGE_GPA + (offset & ~0xF), page_bytes)])
    handler = PtWriteHandler(memory, paging, policy=policy)
    vcpu = Vcpu()
    if pending:  # some write state exists before the event
        vcpu.begin_exit()
        handler.handle_ept_write(vcpu, WriteEvent(
            PAGE_GPA + 0x800, PAGE_GLA + 0x800, {"rip": 0x1000, "rdi": PAGE_GLA + 0x800, "rax": 1},
            b"\x88\x07", 32 if code_bits == 16 else code_bits))
    memory_before = memory.copy()
    state_before = handler.write_state.snapshot()
    regs_before = dict(regs)
    gla = (regs.get("rdi", PAGE_GLA + offset) if offset % 3 else PAGE_GLA + offset)
    gpa = PAGE_GPA + (gla & 0xFFF)
    vcpu.begin_exit()
    result = handler.handle_ept_write(vcpu, WriteEvent(gpa, gla, regs, head + tail, code_bits))
    assert isinstance(result.status, Status)
    event(f"status {result.status.value}")
    assert regs == regs_before  # the caller's registers are never mutated
    if result.status is not Status.EMULATED:
        assert memory == memory_before
        assert handler.write_state.snapshot() == state_before
        assert not vcpu.pt_emu_buffer.valid
        assert (result.writes, result.entries, dict(result.regs)) == ((), (), {})
    else:
        assert result.writes and result.entries
        assert vcpu.pt_emu_buffer.valid
        # Every byte that changed lies inside a write record.
        covered = set()
        for record in result.writes:
            covered.update(range(record.gpa + record.offset,
                                 record.gpa + record.offset + record.size))
        for page in {PAGE_GPA, gpa & ~0xFFF}:
            after = memory.read(page, 4096)
            before = memory_before.read(page, 4096)
            changed = {page + i for i in range(4096) if after[i] != before[i]}
            assert changed <= covered


# -- PAE coalescing (semantics.md section 2) -------------------------------------------------

PAE_GLA = 0xC1234FF0
PAE_GPA = 0x01234FF0
# 4-byte stores into one half of the entry at [esi] (offset 0) or [esi+4] (offset 4).
FIRST_HALVES = [("89 16", 0), ("89 56 04", 4), ("87 16", 0), ("87 56 04", 4),  # mov, xchg
                ("f0 0f b1 16", 0), ("f0 0f b1 56 04", 4),                      # lock cmpxchg
                ("f0 21 16", 0), ("f0 09 56 04", 4)]                             # lock and, or
SECOND_HALVES = [("89 0e", 0), ("89 4e 04", 4), ("87 0e", 0), ("87 4e 04", 4),
                 ("f0 0f b1 0e", 0), ("f0 0f b1 4e 04", 4)]
dword = st.integers(0, 2**32 - 1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=st.sampled_from(FIRST_HALVES), second=st.sampled_from(SECOND_HALVES),
       policy=st.sampled_from(["strict", "hvmi"]), entry=st.integers(0, 2**64 - 1),
       earlier=st.sampled_from([None, 0, 4]), eax=dword, ecx=dword, edx=dword)
def test_coalesced_exactly_when_the_first_half_leaves_the_entry_partial(
        first, second, policy, entry, earlier, eax, ecx, edx):
    # Two handlers see the same history; one coalesces, one does not. The coalescing
    # one takes the second instruction in the same exit exactly when it stores the
    # other half and (hvmi) always / (strict) the first write left the entry partial
    # (what the non-coalescing handler reports for it); and then its event is the
    # two separate events joined: same records, final entry state, memory.
    handlers = []
    for coalesce in (True, False):
        memory = InMemoryGuestMemory([(PAE_GPA, entry.to_bytes(8, "little"))])
        handler = PtWriteHandler(memory, "pae", policy=policy, coalesce=coalesce)
        if earlier is not None:  # a half written by an earlier exit: the entry is pending
            vcpu = Vcpu()
            vcpu.begin_exit()
            handler.handle_ept_write(vcpu, WriteEvent(
                PAE_GPA + earlier, PAE_GLA + earlier,
                {"rip": 0xC1000000, "rdi": PAE_GLA + earlier, "rax": 0x5063},
                b"\x89\x07\xc3", 32))
        handlers.append((handler, memory))
    (joined, joined_memory), (single, single_memory) = handlers
    regs = {"rip": 0xC1001000, "rsi": PAE_GLA, "rax": eax, "rcx": ecx, "rdx": edx}
    code = bytes.fromhex(first[0] + second[0])
    head = len(bytes.fromhex(first[0]))

    def deliver(handler, event_regs, event_code, offset):
        vcpu = Vcpu()
        vcpu.begin_exit()
        return handler.handle_ept_write(vcpu, WriteEvent(
            PAE_GPA + offset, PAE_GLA + offset, event_regs, event_code, 32))

    together = deliver(joined, regs, code, first[1])
    alone = deliver(single, regs, code, first[1])
    assert together.status is alone.status is Status.EMULATED
    other_half = first[1] != second[1]
    partial = alone.entries[0].state is EntryState.PARTIAL
    expected = 2 if other_half and (policy == "hvmi" or partial) else 1
    assert together.instructions == expected
    if expected == 1:
        assert (together.writes, together.entries, dict(together.regs)) == (
            alone.writes, alone.entries, dict(alone.regs))
        assert joined.write_state == single.write_state
    else:
        after = {**regs, **alone.regs}
        rest = deliver(single, after, code[head:], second[1])
        assert together.writes == alone.writes + rest.writes
        assert together.entries == rest.entries
        assert dict(together.regs) == {name: value for name, value in {**after, **rest.regs}.items()
                                       if value != regs.get(name, 2 if name == "rflags" else 0)}
        assert joined.pending() == single.pending()
    assert joined_memory == single_memory
