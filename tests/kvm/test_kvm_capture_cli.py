"""Saving a KVM run as a fixture, the `ptemu kvm` command, and a host without KVM."""

from __future__ import annotations

import json

import pytest

from conftest import require_mode
from ptemu.cli import main
from ptemu.fixtures import Outcome, load_fixture, replay_fixture
from ptemu.kvm.capture import save_fixture
from ptemu.kvm.device import KvmSystem, KvmUnavailable
from ptemu.kvm.layout import GuestLayout
from ptemu.kvm.programs import stress_program
from ptemu.kvm.runner import RunLimits, run_guest


@pytest.mark.parametrize("bits", [64, 32])
def test_saved_fixture_loads_and_replays(kvm, tmp_path, bits):
    require_mode(kvm, "4level", bits)
    layout = GuestLayout.create("4level", bits)
    program = stress_program(layout, 3, seed=5)
    report = run_guest(kvm, layout, program, capture=True, limits=RunLimits(timeout=20))
    path = tmp_path / "trace.json"
    assert save_fixture(path, report, layout) == report.writes == 3 * program.writes_per_iteration
    document = json.loads(path.read_text())
    assert document["paging"] == "4level" and document["code_bits"] == bits
    assert "KVM" in document["source"]
    fixture = load_fixture(path)
    assert len(fixture.events) == report.writes
    # Expectations come from KVM alone: the first write's bytes are the MMIO data.
    first, observed = fixture.events[0], report.observed[0]
    assert first.expect is not None and first.expect.writes is not None
    record = first.expect.writes[0]
    assert first.gpa == record.gpa + record.offset == observed.gpa
    assert record.value == int.from_bytes(observed.data, "little")
    assert replay_fixture(fixture).outcome is Outcome.PASS


def test_cli_run_prints_the_summary_and_saves(kvm, tmp_path, capsys):
    require_mode(kvm, "4level", 64)
    path = tmp_path / "run.json"
    status = main(["kvm", "run", "--paging", "4level", "--iterations", "2",
                   "--save-fixture", str(path)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "exits handled: 56" in out
    assert "disagreements: 0" in out
    assert "events per second:" in out
    assert "page tables: equal to an unmonitored run" in out
    assert len(load_fixture(path).events) == 56


def test_cli_reports_a_runaway_guest_with_status_3(kvm, capsys):
    require_mode(kvm, "4level", 64)
    status = main(["kvm", "run", "--iterations", "50", "--max-exits", "300"])
    out = capsys.readouterr().out
    assert status == 3
    assert "end: exit-limit" in out


def test_cli_refuses_an_unsupported_mode_in_one_line(kvm, capsys):
    if kvm.has_la57():
        pytest.skip("this host offers LA57: 5-level paging is supported")
    status = main(["kvm", "run", "--paging", "5level"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and "LA57" in err


def test_cli_probe(kvm, capsys):
    assert main(["kvm", "probe"]) == 0
    out = capsys.readouterr().out
    assert "KVM_CAP_READONLY_MEM" in out and "4level paging, 64-bit code" in out


def test_cli_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as error:
        main(["kvm", "run", "--paging", "6level"])
    assert error.value.code == 2
    with pytest.raises(SystemExit) as error:
        main(["kvm", "run", "--iterations", "0"])
    assert error.value.code == 2
    assert "iterations" in capsys.readouterr().err


def test_missing_device_is_kvm_unavailable(tmp_path):
    missing = tmp_path / "kvm"
    with pytest.raises(KvmUnavailable, match=str(missing)):
        KvmSystem(str(missing))
