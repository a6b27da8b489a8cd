"""Several vCPUs under KVM racing on shared page-table entries, one shared handler.

Each vCPU runs on its own thread; every write to the read-only memslot exits
and is served by the one `PtWriteHandler`. The final entries are checked
against values computed here from the program's parameters (iterations x
vCPUs, the documented start values, the bit pattern worked out by hand),
never from a run; the unmonitored run (the CPU's own atomics on writable
memory) is a second, independent oracle.
"""

from __future__ import annotations

import capstone
import pytest

from conftest import require_mode
from ptemu.cli import main
from ptemu.errors import UsageError
from ptemu.handler import PtWriteHandler
from ptemu.kvm import smp
from ptemu.kvm.asm import R8, R13, RAX, RCX, Assembler
from ptemu.kvm.layout import GuestLayout
from ptemu.kvm.machine import GuestMachine
from ptemu.kvm.programs import (
    PRIVATE_BASE,
    PRIVATE_LAST,
    PRIVATE_STRIDE,
    PRIVATE_TICKETS,
    SHARED_BITS,
    SHARED_CAS,
    SHARED_CAS8B,
    SHARED_START,
    SHARED_TICKET,
    SHARED_WEIGHTED,
    GuestProgram,
    owned_bits,
    shared_program,
)
from ptemu.kvm.runner import RunLimits, StopReason
from ptemu.results import WriteRecord
from ptemu.status import Status

U64 = (1 << 64) - 1
ITERATIONS = 40
"""At least 8, so every owner's byte of the bitmap ends as 0x1E (worked out below)."""
HAMMER_ITERATIONS = 100
"""Per vCPU in the N = 2, 4, 8 runs (800 loops, some 6,500 checked writes at N = 8)."""
OWNED_BYTE_AFTER_8 = 0x1E
"""Iteration c sets bit c & 7 and then clears bit (c + 4) & 7 of the owner's byte; over
the last eight iterations (c = 8..1) the later of the two operations on bit k wins:
k=0 set at 8, cleared at 4 -> 0; k=1..3 set at 1..3, cleared at 5..7 -> 1; k=4 set at
4, cleared at 8 -> 1; k=5..7 set at 5..7, cleared at 1..3 -> 0: 0b00011110."""


def _entry(tables: bytes, offset: int) -> int:
    return int.from_bytes(tables[offset:offset + 8], "little")


def _expected_entries(vcpus: int, iterations: int) -> dict[str, int]:
    """What the shared entries must hold, from the program's parameters alone."""
    total = vcpus * iterations
    weights = sum(v + 1 for v in range(vcpus))
    owned_mask = (1 << (8 * vcpus)) - 1
    pattern = int.from_bytes(bytes([OWNED_BYTE_AFTER_8]) * vcpus, "little")
    return {
        "ticket": (SHARED_START[SHARED_TICKET] + total) & U64,
        "weighted": (SHARED_START[SHARED_WEIGHTED] + iterations * weights) & U64,
        "cas": (SHARED_START[SHARED_CAS] + iterations * weights) & U64,
        "cas8b": (SHARED_START[SHARED_CAS8B] + (iterations * weights << 24)) & U64,
        "bits": (SHARED_START[SHARED_BITS] & ~owned_mask) | pattern,
        "tickets": sum(SHARED_START[SHARED_TICKET] + t for t in range(total)) & U64,
    }


def _assert_final_entries(tables: bytes, vcpus: int, iterations: int) -> None:
    want = _expected_entries(vcpus, iterations)
    assert _entry(tables, SHARED_TICKET) == want["ticket"]
    assert _entry(tables, SHARED_WEIGHTED) == want["weighted"]
    assert _entry(tables, SHARED_CAS) == want["cas"]
    assert _entry(tables, SHARED_CAS8B) == want["cas8b"]
    assert _entry(tables, SHARED_BITS) == want["bits"]
    privates = [PRIVATE_BASE + v * PRIVATE_STRIDE for v in range(vcpus)]
    assert sum(_entry(tables, p + PRIVATE_TICKETS) for p in privates) & U64 == want["tickets"]
    assert [_entry(tables, p + PRIVATE_LAST) for p in privates] == \
        [(v << 48) | 1 for v in range(vcpus)]


# --- without KVM ---------------------------------------------------------------


def test_the_expected_values_the_program_carries_match_the_hand_computed_ones():
    layout = GuestLayout.create("4level", 64)
    program = shared_program(layout, 3, ITERATIONS)
    want = _expected_entries(3, ITERATIONS)
    checks = {check.name: check.expected for check in program.checks}
    assert checks["lock xadd ticket counter"] == want["ticket"]
    assert checks["lock cmpxchg8b loop counter"] == want["cas8b"]
    assert checks["lock bts/btr owned bits"] == want["bits"]
    assert checks["tickets drawn (sum over vCPUs)"] == want["tickets"]
    assert checks["vCPU 2 private entry"] == (2 << 48) | 1
    assert len(program.vcpu_registers) == 3


def test_owned_bits_one_iteration_by_hand():
    # c = 1: set bit 1, then clear bit 5 (vCPU 0); vCPU 1 does the same on bits 9 and 13.
    assert owned_bits(0, 1, 1) == 0b10
    assert owned_bits(0xFF, 1, 1) == 0xDF
    assert owned_bits(0, 2, 1) == 0x0202
    assert owned_bits(0xFFFF, 2, ITERATIONS) == 0x1E1E


def test_shared_program_refuses_what_it_cannot_run():
    with pytest.raises(UsageError, match="64-bit code"):
        shared_program(GuestLayout.create("4level", 32), 2, 10)
    with pytest.raises(UsageError, match="vcpus"):
        shared_program(GuestLayout.create("4level", 64), 9, 10)


def test_xadd_encoding_and_the_whole_loop_against_capstone():
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    a = Assembler(64)
    a.xadd(8, RAX, R13, 8)
    a.xadd(4, RCX, R8, 0, lock=False)
    a.xadd(1, RAX, R13, 0x20)
    text = [f"{i.mnemonic} {i.op_str}" for i in md.disasm(a.assemble(), 0)]
    assert text == ["lock xadd qword ptr [r13 + 8], rax", "xadd dword ptr [r8], ecx",
                    "lock xadd byte ptr [r13 + 0x20], al"]
    program = shared_program(GuestLayout.create("4level", 64), 2, 5)
    decoded = list(md.disasm(program.code, 0))
    assert sum(len(i.bytes) for i in decoded) == len(program.code)
    locked = [f"{i.mnemonic} {i.op_str}" for i in decoded if i.mnemonic.startswith("lock")]
    assert locked == ["lock xadd qword ptr [r13], rax", "lock xadd qword ptr [r13 + 8], rax",
                      "lock cmpxchg qword ptr [r13 + 0x10], rcx",
                      "lock cmpxchg8b qword ptr [r13 + 0x18]",
                      "lock bts qword ptr [r13 + 0x20], rax",
                      "lock btr qword ptr [r13 + 0x20], rax"]
    assert decoded[-1].mnemonic == "hlt"


def _record(gpa: int, value: int, old: int = 0) -> WriteRecord:
    return WriteRecord(gpa=gpa, offset=0, size=8, value=value, old=old)


def test_commit_ledger_values_by_hand():
    initial = (7).to_bytes(8, "little") + (9).to_bytes(8, "little")
    ledger = smp.CommitLedger(initial, 0x1000, 8, vcpus=2)
    assert ledger.mark() == 0
    assert ledger.values(0x1000, 0) == [7]
    ledger.record((_record(0x1000, 10),))          # 1
    ledger.record((_record(0x1008, 20),))          # 2 (another entry)
    ledger.record((_record(0x1000, 11),))          # 3
    assert ledger.mark() == 3
    # Before mark 1: the initial value only (fewer than two recorded); then 10, 11.
    assert ledger.values(0x1000, 0) == [7, 10, 11]
    # Up to mark 3, two values were recorded (10, 11): those two, nothing after.
    assert ledger.values(0x1000, 3) == [10, 11]
    ledger.record((_record(0x1000, 12),))          # 4
    assert ledger.values(0x1000, 3) == [10, 11, 12]
    assert ledger.values(0x1008, 1) == [9, 20]
    # A partial write: only the byte it covers (byte 4, the 0x11) changes.
    ledger.record((WriteRecord(gpa=0x1008, offset=4, size=1, value=0xAB, old=0x1122334455),))
    assert ledger.values(0x1008, 5)[-1] == 0xAB22334455


# --- under KVM -----------------------------------------------------------------


@pytest.mark.parametrize("vcpus", [2, 4, 8])
def test_vcpus_hammer_shared_entries_and_nothing_is_lost(kvm, vcpus):
    require_mode(kvm, "4level", 64)
    layout = GuestLayout.create("4level", 64)
    program = shared_program(layout, vcpus, HAMMER_ITERATIONS)
    report = smp.run_smp(kvm, layout, program, limits=RunLimits(timeout=120))
    details = "\n".join(d.describe() for d in report.disagreements)
    assert report.stop is StopReason.HALTED, report.detail
    assert report.disagreement_count == 0, details
    assert len(report.vcpus) == vcpus
    assert all(vcpu.stop is StopReason.HALTED for vcpu in report.vcpus)
    loops = vcpus * HAMMER_ITERATIONS
    families = report.families
    assert families["xadd"] == 2 * loops
    assert families["bts"] == families["btr"] == loops
    assert families["mov"] == 2 * loops
    assert families["cmpxchg"] >= loops and families["cmpxchg8b"] >= loops
    assert report.writes == sum(families.values())
    assert report.raced <= report.writes
    _assert_final_entries(report.final_tables, vcpus, HAMMER_ITERATIONS)
    assert report.checks_hold and report.ok
    # Outside the entries the program names, the pages are untouched.
    named = {SHARED_TICKET, SHARED_WEIGHTED, SHARED_CAS, SHARED_CAS8B, SHARED_BITS}
    named |= {PRIVATE_BASE + v * PRIVATE_STRIDE + o for v in range(vcpus)
              for o in (PRIVATE_LAST, PRIVATE_TICKETS)}
    for offset in range(0, layout.monitored_size, 8):
        if offset not in named:
            assert _entry(report.final_tables, offset) == _entry(report.initial_tables, offset)
    if vcpus >= 4:
        # The vCPUs really interleaved: some retry loop failed or some write raced.
        retries = families["cmpxchg"] + families["cmpxchg8b"] - 2 * loops
        assert retries + report.raced > 0


def test_unmonitored_vcpus_agree_with_the_expected_entries_and_the_monitored_run(kvm):
    require_mode(kvm, "4level", 64)
    layout = GuestLayout.create("4level", 64)
    program = shared_program(layout, 4, ITERATIONS, seed=5)
    limits = RunLimits(timeout=120)
    reference = smp.run_smp(kvm, layout, program, monitored=False, limits=limits)
    assert reference.stop is StopReason.HALTED, reference.detail
    assert reference.writes == 0 and reference.steps == 0
    _assert_final_entries(reference.final_tables, 4, ITERATIONS)
    monitored = smp.run_smp(kvm, layout, program, limits=limits)
    assert monitored.ok, monitored.detail
    assert monitored.initial_tables == reference.initial_tables
    assert smp.tables_equal_outside(program, layout, monitored.final_tables,
                                    reference.final_tables)


class _OffByOneXadd(PtWriteHandler):
    """A handler whose XADD hands the guest back its old value plus one."""

    def handle_ept_write(self, vcpu, event):
        result = super().handle_ept_write(vcpu, event)
        if result.status is Status.EMULATED and b"\x0f\xc1" in event.code[:4]:
            regs = dict(result.regs)
            regs["rax"] = (regs["rax"] + 1) & U64
            result = type(result)(status=result.status, writes=result.writes,
                                  entries=result.entries, regs=regs,
                                  undefined_flags=result.undefined_flags,
                                  instructions=result.instructions)
        return result


def test_a_wrong_handler_is_caught_on_every_vcpu_and_the_guest_follows_it(kvm, monkeypatch):
    require_mode(kvm, "4level", 64)
    monkeypatch.setattr(smp, "PtWriteHandler", _OffByOneXadd)
    layout = GuestLayout.create("4level", 64)
    vcpus, iterations = 2, 10
    program = shared_program(layout, vcpus, iterations)
    report = smp.run_smp(kvm, layout, program, limits=RunLimits(timeout=60))
    assert report.stop is StopReason.HALTED, report.detail
    # Every XADD disagrees with KVM (RAX), on both vCPUs, whatever the interleaving.
    assert report.disagreement_count == 2 * vcpus * iterations
    assert all(vcpu.disagreement_count == 2 * iterations for vcpu in report.vcpus)
    # (A raced one also shows the bytes and flags KVM computed from the older value.)
    assert all("regs.rax" in {m.key for m in d.mismatches} for d in report.disagreements)
    # The vCPUs continued on the handler's registers: each ticket drawn is one too many.
    total = vcpus * iterations
    drawn = sum(_entry(report.final_tables, PRIVATE_BASE + v * PRIVATE_STRIDE + PRIVATE_TICKETS)
                for v in range(vcpus))
    assert drawn & U64 == (_expected_entries(vcpus, iterations)["tickets"] + total) & U64
    # Memory is the handler's commit, which is right: the counters are exact.
    assert _entry(report.final_tables, SHARED_TICKET) == \
        _expected_entries(vcpus, iterations)["ticket"]
    assert not report.ok


def _spin_or_fault() -> GuestProgram:
    """vCPU 0 spins forever; vCPU 1 executes UD2 (an empty IDT: a triple fault)."""
    a = Assembler(64)
    a.alu_rr("and", R8, R8, w=True)
    a.jnz("fault")
    a.label("spin")
    a.jmp("spin")
    a.label("fault")
    a.ud2()
    return GuestProgram(name="spin-or-fault", code=a.assemble(),
                        vcpu_registers=({"r8": 0}, {"r8": 1}))


@pytest.mark.parametrize("monitored", [True, False], ids=["monitored", "unmonitored"])
def test_one_vcpu_triple_faulting_stops_the_others(kvm, monitored):
    require_mode(kvm, "4level", 64)
    layout = GuestLayout.create("4level", 64)
    report = smp.run_smp(kvm, layout, _spin_or_fault(), monitored=monitored,
                         limits=RunLimits(timeout=30))
    assert report.stop is StopReason.TRIPLE_FAULT, report.detail
    assert report.detail.startswith("vCPU 1:")
    assert report.vcpus[0].stop is StopReason.STOPPED
    assert report.elapsed < 10


def test_spinning_vcpus_end_at_the_time_bound(kvm):
    require_mode(kvm, "4level", 64)
    layout = GuestLayout.create("4level", 64)
    a = Assembler(64)
    a.label("spin")
    a.jmp("spin")
    program = GuestProgram(name="spin", code=a.assemble(), vcpu_registers=({}, {}, {}))
    report = smp.run_smp(kvm, layout, program, monitored=False, limits=RunLimits(timeout=1))
    assert report.stop is StopReason.TIMEOUT, report.detail
    assert 1 <= report.elapsed < 1 + smp.JOIN_GRACE
    assert len(report.vcpus) == 3


def test_machine_vcpu_count_is_checked(kvm):
    layout = GuestLayout.create("4level", 64)
    with pytest.raises(UsageError, match="vcpus: 9"):
        GuestMachine(kvm, layout, shared_program(layout, 2, 1), monitored=True, vcpus=9)
    with pytest.raises(UsageError, match="built for 2 vCPUs, not 3"):
        GuestMachine(kvm, layout, shared_program(layout, 2, 1), monitored=True, vcpus=3)


def test_cli_vcpus(kvm, capsys):
    require_mode(kvm, "4level", 64)
    status = main(["kvm", "run", "--vcpus", "2", "--iterations", "20"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "2 vCPUs x 20 iterations" in out
    assert "disagreements: 0" in out
    assert "final entries: 8 of 8 as computed from the program" in out
    assert "end: halted" in out
    assert "unmonitored run (2 vCPUs" in out and "final entries as expected" in out


@pytest.mark.parametrize("extra", [["--program", "kernel"], ["--save-fixture", "x.json"],
                                   ["--code-bits", "32"], ["--vcpus", "0"]])
def test_cli_vcpus_refusals_are_one_line(extra, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    arguments = ["kvm", "run", "--vcpus", "2", *extra]
    try:
        status = main(arguments)
    except SystemExit as error:  # argparse's own refusals
        status = error.code
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1, err
    assert not (tmp_path / "x.json").exists()
