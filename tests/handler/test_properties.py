"""Property tests: whatever the guest throws at the handler, it never raises,
and an event that is not emulated changes nothing."""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ptemu.handler import PtWriteHandler, WriteEvent
from ptemu.memory import InMemoryGuestMemory
from ptemu.status import Status
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
