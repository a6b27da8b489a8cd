"""``ptemu capture -o X.jsonl`` and ``ptemu kvm run --save-fixture X.jsonl`` write the
streamed form, which loads to the same events as the JSON form of the same run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ptemu.cli import main
from ptemu.fixtures import load_fixture

SPEC = Path(__file__).resolve().parents[2] / "tools/corpus/capture_specs/pae-set-pte-example.json"


def test_capture_writes_either_form(tmp_path: Path) -> None:
    assert main(["capture", str(SPEC), "-o", str(tmp_path / "c.json")]) == 0
    assert main(["capture", str(SPEC), "-o", str(tmp_path / "c.jsonl")]) == 0
    lines = (tmp_path / "c.jsonl").read_text("utf-8").splitlines()
    assert json.loads(lines[0])["stream"] is True and len(lines) == 2
    whole, streamed = load_fixture(tmp_path / "c.json"), load_fixture(tmp_path / "c.jsonl")
    assert streamed.events == whole.events and streamed.memory_regions == whole.memory_regions
    assert main(["replay", str(tmp_path / "c.jsonl")]) == 0


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                    reason="needs /dev/kvm (read-write) for ptemu kvm run")
def test_kvm_run_saves_a_stream(tmp_path: Path) -> None:
    target = tmp_path / "k.jsonl"
    assert main(["kvm", "run", "--iterations", "2", "--no-compare",
                 "--save-fixture", str(target)]) == 0
    lines = target.read_text("utf-8").splitlines()
    assert json.loads(lines[0])["stream"] is True
    assert len(load_fixture(target).events) == len(lines) - 1 > 0
    assert main(["replay", str(target)]) == 0
