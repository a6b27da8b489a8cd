"""What a guest can get wrong: every refusal is a status and changes nothing."""

from __future__ import annotations

from ptemu.status import Status

RIP64 = 0xFFFFFFFF81001234
GLA64 = 0xFFFF888012345FF8
GPA64 = 0x12345FF8


def _unchanged(guest, before):
    assert guest.memory == before
    assert guest.handler.pending() == ()
    assert not guest.vcpu.pt_emu_buffer.valid


def test_instruction_that_stores_nothing_is_unsupported(make_guest):
    guest = make_guest()
    before = guest.memory.copy()
    for code in ("90", "48 8b 07", "0f ab c7"):  # nop; mov rax,[rdi]; bts edi,eax
        result = guest.write(code, {"rip": RIP64, "rdi": GLA64}, GLA64, GPA64)
        assert result.status is Status.UNSUPPORTED, code
        assert (result.writes, result.entries, dict(result.regs)) == ((), (), {})
    _unchanged(guest, before)


def test_store_elsewhere_is_rejected(make_guest):
    guest = make_guest()
    before = guest.memory.copy()
    result = guest.write("48 89 37", {"rip": RIP64, "rdi": GLA64 - 8, "rsi": 1}, GLA64, GPA64)
    assert result.status is Status.REJECTED
    _unchanged(guest, before)


def test_gla_gpa_offset_mismatch_is_rejected(make_guest):
    guest = make_guest()
    result = guest.write("48 89 37", {"rip": RIP64, "rdi": GLA64, "rsi": 1}, GLA64, GPA64 - 8)
    assert result.status is Status.REJECTED


def test_write_across_page_end_is_unsupported(make_guest):
    guest = make_guest()
    before = guest.memory.copy()
    result = guest.write("48 89 37", {"rip": RIP64, "rdi": GLA64 + 4, "rsi": 1},
                         GLA64 + 4, GPA64 + 4)
    assert result.status is Status.UNSUPPORTED
    _unchanged(guest, before)


def test_undecodable_bytes_are_unsupported(make_guest):
    guest = make_guest()
    result = guest.write("ff ff", {"rip": RIP64}, GLA64, GPA64)
    assert result.status is Status.UNSUPPORTED


def test_second_emulation_in_one_exit_is_already_initialized(make_guest):
    guest = make_guest()
    first = guest.write("48 89 37", {"rip": RIP64, "rdi": GLA64, "rsi": 1}, GLA64, GPA64)
    assert first.status is Status.EMULATED
    from ptemu.handler import WriteEvent

    event = WriteEvent(GPA64, GLA64, {"rip": RIP64, "rdi": GLA64, "rsi": 2},
                       bytes.fromhex("488937"), 64)
    again = guest.handler.handle_ept_write(guest.vcpu, event)  # same exit: no begin_exit
    assert again.status is Status.ALREADY_INITIALIZED
    assert guest.entry(GPA64) == 1


def test_contended_entry_gives_up_and_changes_nothing(make_guest):
    # Memory whose entry changes on every read: the commit never succeeds.
    from ptemu.handler import PtWriteHandler, WriteEvent
    from ptemu.memory import InMemoryGuestMemory
    from ptemu.vcpu import Vcpu

    class RacingMemory(InMemoryGuestMemory):
        def read(self, gpa, size):
            data = super().read(gpa, size)
            current = int.from_bytes(super().read(GPA64, 8), "little")
            super().write(GPA64, ((current + 1) | 0x20).to_bytes(8, "little"))  # "A bit" races
            return data

    memory = RacingMemory()
    handler = PtWriteHandler(memory, "4level", max_commit_attempts=3)
    vcpu = Vcpu()
    vcpu.begin_exit()
    result = handler.handle_ept_write(vcpu, WriteEvent(
        GPA64, GLA64, {"rip": RIP64, "rdi": GLA64, "rsi": 0x1234}, bytes.fromhex("488937"), 64))
    assert result.status is Status.CONTENDED
    assert handler.pending() == ()
    assert not vcpu.pt_emu_buffer.valid
    assert int.from_bytes(InMemoryGuestMemory.read(memory, GPA64, 8), "little") != 0x1234


def test_commit_retries_after_the_cpu_sets_the_accessed_bit(make_guest):
    # The first compare fails (the entry gained its A bit); the retry emulates
    # against the new value, so an AND keeps the A bit the CPU set.
    from ptemu.handler import PtWriteHandler, WriteEvent
    from ptemu.memory import InMemoryGuestMemory
    from ptemu.vcpu import Vcpu

    class OneRace(InMemoryGuestMemory):
        raced = False

        def compare_and_store(self, gpa, expected, new):
            if not self.raced:
                self.raced = True
                self.write(GPA64, (0x12345007 | 0x20).to_bytes(8, "little"))
            return super().compare_and_store(gpa, expected, new)

    memory = OneRace([(GPA64, (0x12345007).to_bytes(8, "little"))])
    handler = PtWriteHandler(memory, "4level")
    vcpu = Vcpu()
    vcpu.begin_exit()
    result = handler.handle_ept_write(vcpu, WriteEvent(
        GPA64, GLA64, {"rip": RIP64, "rdi": GLA64}, bytes.fromhex("f08027fd"), 64))
    assert result.status is Status.EMULATED
    assert int.from_bytes(memory.read(GPA64, 8), "little") == 0x12345025
    assert result.entries[0].old == 0x12345027 and result.entries[0].new == 0x12345025


def test_caller_errors_raise_with_a_clear_message(make_guest):
    import pytest

    from ptemu.errors import UsageError

    guest = make_guest("pae")
    with pytest.raises(UsageError, match="code_bits 64"):
        guest.write("89 10", {"rip": 0x1000}, 0x1000, 0x1000, code_bits=64)
    with pytest.raises(UsageError, match="'rdx_'"):
        guest.write("89 10", {"rip": 0x1000, "rdx_": 1}, 0x1000, 0x1000, code_bits=32)
    with pytest.raises(UsageError, match="rip"):
        guest.write("89 10", {"rax": 0x1000}, 0x1000, 0x1000, code_bits=32)
    with pytest.raises(UsageError, match="policy"):
        make_guest("4level", policy="lenient")
    with pytest.raises(UsageError):
        make_guest("6level")


def test_lock_on_a_plain_store_is_refused_even_behind_rep(make_guest):
    # f0 f3 89 37: LOCK then REP then MOV; Capstone reports only the last
    # group-1 prefix. LOCK on MOV raises #UD (SDM vol. 2, LOCK).
    guest = make_guest()
    for code in ("f0 f3 89 37", "f3 f0 48 89 37", "f0 ab"):
        result = guest.write(code, {"rip": RIP64, "rdi": GLA64, "rsi": 1, "rax": 1}, GLA64, GPA64)
        assert result.status is Status.UNSUPPORTED, code
    assert guest.entry(GPA64) == 0


def test_instruction_at_rip_zero(make_guest):
    guest = make_guest()
    result = guest.write("48 87 37", {"rip": 0, "rdi": GLA64, "rsi": 5}, GLA64, GPA64)
    assert result.status is Status.EMULATED
    assert result.regs["rip"] == 3


# -- MOVS from an alias of the page it writes (issue 11, section 6)

PT_PAGE_GLA = 0xFFFF888012345000  # the written page-table page, GPA 0x12345000
PT_PAGE_GPA = 0x12345000
DATA_GLA = 0xFFFF888000400000     # -> GPA 0x5000 (an ordinary page)
ALIAS_GLA = 0xFFFF888000401000    # -> GPA 0x12345000: another linear page of the same GPA


def _tables_with_an_alias(guest, alias=True):
    """4-level tables: CR3 0x1000, PML4[273] -> PDPT 0x2000, PDPT[0] -> PD 0x3000,
    PD[2] -> PT 0x4000, PT[0] -> 0x5000 and PT[1] -> the page-table page (or, with
    `alias` off, -> 0x6000)."""
    guest.set_entry(0x1000 + 273 * 8, 0x2003)
    guest.set_entry(0x2000, 0x3003)
    guest.set_entry(0x3000 + 2 * 8, 0x4003)
    guest.set_entry(0x4000, 0x5003)
    guest.set_entry(0x4008, (PT_PAGE_GPA if alias else 0x6000) | 3)
    return {"rip": RIP64, "cr3": 0x1000}


def test_movs_from_an_alias_of_the_written_page_is_unsupported(make_guest):
    guest = make_guest()
    regs = _tables_with_an_alias(guest)
    guest.set_entry(PT_PAGE_GPA + 0x100, 0x1111)
    before = guest.memory.copy()
    # rep movsq, then movsq: the source ALIAS_GLA + 0x100 walks to GPA 0x12345100,
    # inside the page being written, through a linear page other than its own.
    for code, count in (("f3 48 a5", 2), ("48 a5", 0)):
        result = guest.write(code, {**regs, "rsi": ALIAS_GLA + 0x100, "rdi": PT_PAGE_GLA + 0xFF0,
                                    "rcx": count}, PT_PAGE_GLA + 0xFF0, PT_PAGE_GPA + 0xFF0)
        assert result.status is Status.UNSUPPORTED, code
        assert "alias" in result.reason
        assert (result.writes, result.entries, dict(result.regs)) == ((), (), {})
        _unchanged(guest, before)


def test_movs_from_the_written_page_itself_is_unsupported(make_guest):
    guest = make_guest()
    regs = _tables_with_an_alias(guest)
    before = guest.memory.copy()
    result = guest.write("f3 48 a5", {**regs, "rsi": PT_PAGE_GLA + 0x100,
                                      "rdi": PT_PAGE_GLA + 0xFF0, "rcx": 2},
                         PT_PAGE_GLA + 0xFF0, PT_PAGE_GPA + 0xFF0)
    assert result.status is Status.UNSUPPORTED
    _unchanged(guest, before)


def test_rep_movs_stops_before_the_iteration_that_reads_the_alias(make_guest):
    # rep movsq, RCX = 3, from DATA_GLA + 0xff8: the first qword comes from GPA 0x5ff8;
    # the second would come from ALIAS_GLA, the written page: the emulation stops
    # after one iteration (RCX 2, RSI and RDI 8 further on, RIP on the instruction),
    # and the guest re-executes the rest, which is then refused.
    guest = make_guest()
    regs = _tables_with_an_alias(guest)
    guest.set_entry(0x5FF8, 0xAAAA)
    result = guest.write("f3 48 a5", {**regs, "rsi": DATA_GLA + 0xFF8, "rdi": PT_PAGE_GLA + 0xFE0,
                                      "rcx": 3}, PT_PAGE_GLA + 0xFE0, PT_PAGE_GPA + 0xFE0)
    assert result.status is Status.EMULATED, result.reason
    assert [(w.gpa, w.offset, w.size, w.value) for w in result.writes] == [
        (PT_PAGE_GPA + 0xFE0, 0, 8, 0xAAAA)]
    assert result.regs == {"rcx": 2, "rsi": ALIAS_GLA, "rdi": PT_PAGE_GLA + 0xFE8}
    rest = guest.write("f3 48 a5", {**regs, "rsi": ALIAS_GLA, "rdi": PT_PAGE_GLA + 0xFE8,
                                    "rcx": 2}, PT_PAGE_GLA + 0xFE8, PT_PAGE_GPA + 0xFE8)
    assert rest.status is Status.UNSUPPORTED


def test_rep_movs_without_an_alias_copies_every_iteration(make_guest):
    # The same copy when the second source page is an ordinary page (GPA 0x6000):
    # all three qwords are copied, RCX is exhausted and RIP moves on.
    guest = make_guest()
    regs = _tables_with_an_alias(guest, alias=False)
    guest.set_entry(0x5FF8, 0xAAAA)
    guest.set_entry(0x6000, 0xBBBB)
    guest.set_entry(0x6008, 0xCCCC)
    result = guest.write("f3 48 a5", {**regs, "rsi": DATA_GLA + 0xFF8, "rdi": PT_PAGE_GLA + 0xFE0,
                                      "rcx": 3}, PT_PAGE_GLA + 0xFE0, PT_PAGE_GPA + 0xFE0)
    assert result.status is Status.EMULATED, result.reason
    assert [(w.gpa, w.value) for w in result.writes] == [
        (PT_PAGE_GPA + 0xFE0, 0xAAAA), (PT_PAGE_GPA + 0xFE8, 0xBBBB),
        (PT_PAGE_GPA + 0xFF0, 0xCCCC)]
    assert result.regs == {"rcx": 0, "rsi": ALIAS_GLA + 0x10, "rdi": PT_PAGE_GLA + 0xFF8,
                           "rip": RIP64 + 3}
