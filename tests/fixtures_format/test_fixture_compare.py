"""compare_event: which keys are compared, how, and how mismatches read.

Results here are built by hand from ptemu.results records (no handler): the
test is about the comparison rules of docs/fixture-format.md.
"""

from __future__ import annotations

from ptemu.fixtures import Expectation, Mismatch, compare_event, render_entry, render_write
from ptemu.results import EntryResult, EventResult, WriteRecord
from ptemu.status import EntryState, Status

HIGH = WriteRecord(gpa=0x3FF0, offset=4, size=4, value=0x1, old=0x0)
LOW = WriteRecord(gpa=0x3FF0, offset=0, size=4, value=0x5063, old=0x1_0000_0000)
PARTIAL = EntryResult(gpa=0x3FF0, state=EntryState.PARTIAL)
COMPLETE = EntryResult(gpa=0x3FF0, state=EntryState.COMPLETE, old=0x0, new=0x1_0000_5063)
BEFORE = {"rip": 0xC1001234, "rax": 0xC0003FF0, "rcx": 0x1}

# Arithmetic flags: CF PF AF ZF SF OF (SDM vol. 1, 3.4.3.1).
CF, PF, AF, ZF, SF, OF = 0x1, 0x4, 0x10, 0x40, 0x80, 0x800


def result(**fields: object) -> EventResult:
    values: dict[str, object] = {"status": Status.EMULATED, "writes": (HIGH,),
                                 "entries": (PARTIAL,), "regs": {"rip": 0xC1001237}}
    values.update(fields)
    return EventResult(**values)  # type: ignore[arg-type]


def test_empty_expectation_compares_nothing() -> None:
    actual = result(status=Status.REJECTED, writes=(), entries=(), regs={})
    assert compare_event(Expectation(), actual) == ()


def test_matching_expectation_has_no_mismatch() -> None:
    expect = Expectation(status=Status.EMULATED, writes=(HIGH,), entries=(PARTIAL,),
                         regs={"rip": 0xC1001237})
    assert compare_event(expect, result(), before=BEFORE) == ()
    assert compare_event(expect, result()) == ()


def test_status_mismatch() -> None:
    mismatches = compare_event(Expectation(status=Status.EMULATED),
                               result(status=Status.UNSUPPORTED))
    assert mismatches == (Mismatch("status", "emulated", "unsupported"),)
    assert str(mismatches[0]) == "status: expected emulated, actual unsupported"


def test_keys_left_out_are_not_compared() -> None:
    wrong = result(writes=(LOW,), entries=(COMPLETE,), regs={"rip": 0, "rax": 5})
    assert compare_event(Expectation(status=Status.EMULATED), wrong) == ()


def test_write_value_mismatch_renders_both_records_in_hex() -> None:
    expected = WriteRecord(gpa=0x3FF0, offset=4, size=4, value=0x2, old=0x0)
    (mismatch,) = compare_event(Expectation(writes=(expected,)), result())
    assert mismatch.key == "writes[0]"
    assert mismatch.expected == "{gpa=0x3ff0 offset=4 size=4 value=0x2 old=0x0}"
    assert mismatch.actual == "{gpa=0x3ff0 offset=4 size=4 value=0x1 old=0x0}"


def test_writes_compared_whole_extra_record_is_a_mismatch() -> None:
    (mismatch,) = compare_event(Expectation(writes=(HIGH,)), result(writes=(HIGH, LOW)))
    assert mismatch == Mismatch("writes[1]", "(none)", render_write(LOW))


def test_writes_compared_whole_missing_record_is_a_mismatch() -> None:
    (mismatch,) = compare_event(Expectation(writes=(HIGH, LOW)), result())
    assert mismatch == Mismatch("writes[1]", render_write(LOW), "(none)")


def test_writes_order_matters() -> None:
    mismatches = compare_event(Expectation(writes=(LOW, HIGH)), result(writes=(HIGH, LOW)))
    assert [m.key for m in mismatches] == ["writes[0]", "writes[1]"]


def test_empty_writes_expected_but_some_made() -> None:
    (mismatch,) = compare_event(Expectation(writes=()), result())
    assert mismatch == Mismatch("writes[0]", "(none)", render_write(HIGH))


def test_entry_state_and_values() -> None:
    assert compare_event(Expectation(entries=(COMPLETE,)), result(entries=(COMPLETE,))) == ()
    (state,) = compare_event(Expectation(entries=(COMPLETE,)), result())
    assert state == Mismatch("entries[0]", "{gpa=0x3ff0 state=complete old=0x0 new=0x100005063}",
                             "{gpa=0x3ff0 state=partial}")
    other_new = EntryResult(gpa=0x3FF0, state=EntryState.COMPLETE, old=0x0, new=0x5063)
    (value,) = compare_event(Expectation(entries=(COMPLETE,)), result(entries=(other_new,)))
    assert value.key == "entries[0]"
    assert value.actual == "{gpa=0x3ff0 state=complete old=0x0 new=0x5063}"


def test_entry_gpa_mismatch() -> None:
    elsewhere = EntryResult(gpa=0x3FF8, state=EntryState.PARTIAL)
    (mismatch,) = compare_event(Expectation(entries=(PARTIAL,)), result(entries=(elsewhere,)))
    assert mismatch == Mismatch("entries[0]", render_entry(PARTIAL), render_entry(elsewhere))


def test_register_value_mismatch() -> None:
    (mismatch,) = compare_event(Expectation(regs={"rip": 0xC1001239}), result(), before=BEFORE)
    assert mismatch == Mismatch("regs.rip", "0xc1001239", "0xc1001237")


def test_register_changed_but_not_expected_is_a_mismatch() -> None:
    actual = result(regs={"rip": 0xC1001237, "rcx": 0x0})
    for before in (BEFORE, None):
        (mismatch,) = compare_event(Expectation(regs={"rip": 0xC1001237}), actual, before=before)
        assert mismatch == Mismatch("regs.rcx", "(unchanged)", "0x0")


def test_register_expected_but_left_alone_is_a_mismatch() -> None:
    expect = Expectation(regs={"rip": 0xC1001237, "rax": 0xABC067})
    (mismatch,) = compare_event(expect, result(), before=BEFORE)
    assert mismatch == Mismatch("regs.rax", "0xabc067", "(unchanged)")


def test_register_listed_with_its_old_value_equals_unchanged_when_before_is_known() -> None:
    expect = Expectation(regs={"rip": 0xC1001237, "rcx": 0x1})
    assert compare_event(expect, result(), before=BEFORE) == ()
    # Without the state before the event, the sets of names must be equal.
    (mismatch,) = compare_event(expect, result())
    assert mismatch == Mismatch("regs.rcx", "0x1", "(unchanged)")


def test_rflags_compared_outside_undefined_flags() -> None:
    # AND defines CF=OF=0, SF, ZF, PF; AF is undefined (SDM vol. 2, AND).
    expect = Expectation(regs={"rip": 0xC1001237, "rflags": 0x2 | ZF | PF | AF})
    same_defined = result(regs={"rip": 0xC1001237, "rflags": 0x2 | ZF | PF},
                          undefined_flags=AF)
    assert compare_event(expect, same_defined, before=BEFORE) == ()
    other_defined = result(regs={"rip": 0xC1001237, "rflags": 0x2 | PF | AF},
                           undefined_flags=AF)
    (mismatch,) = compare_event(expect, other_defined, before=BEFORE)
    assert mismatch == Mismatch("regs.rflags", "0x56", "0x16")


def test_rflags_change_only_in_undefined_bits_equals_unchanged() -> None:
    # The capture's CPU set AF (undefined) and nothing else: the handler left
    # rflags alone. Compared outside the undefined mask, both are 0x2.
    expect = Expectation(regs={"rip": 0xC1001237, "rflags": 0x2 | AF})
    actual = result(undefined_flags=AF)
    assert compare_event(expect, actual, before=BEFORE) == ()


def test_rflags_defined_change_missing_from_result() -> None:
    expect = Expectation(regs={"rip": 0xC1001237, "rflags": 0x2 | CF})
    (mismatch,) = compare_event(expect, result(), before=BEFORE)
    assert mismatch == Mismatch("regs.rflags", "0x3", "(unchanged)")


def test_rflags_default_before_is_0x2() -> None:
    # The event left rflags out: it was 0x2 (format: rflags defaults to 0x2),
    # so an expectation listing rflags=0x2 means "unchanged".
    expect = Expectation(regs={"rip": 0xC1001237, "rflags": 0x2})
    assert compare_event(expect, result(), before=BEFORE) == ()


def test_all_mismatches_reported_together() -> None:
    expect = Expectation(status=Status.REJECTED, writes=(), entries=(), regs={})
    keys = [m.key for m in compare_event(expect, result(), before=BEFORE)]
    assert keys == ["status", "writes[0]", "entries[0]", "regs.rip"]


def test_render_entry_complete_and_partial() -> None:
    assert render_entry(COMPLETE) == "{gpa=0x3ff0 state=complete old=0x0 new=0x100005063}"
    assert render_entry(PARTIAL) == "{gpa=0x3ff0 state=partial}"
    assert render_write(LOW) == "{gpa=0x3ff0 offset=0 size=4 value=0x5063 old=0x100000000}"
