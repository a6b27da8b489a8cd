"""The corpus builder: ``--check`` against the shipped corpus, writing into a
folder and checking it, the entry points, and argument placement."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from ptemu_corpus import build
from ptemu_corpus.entries import KernelValues
from ptemu_corpus.kernel_args import CallTarget, parse_params, place_args
from ptemu_corpus.paths import CORPUS, ROOT

from ptemu.fixtures import find_fixtures


def test_the_shipped_corpus_is_what_the_builder_makes(capsys: pytest.CaptureFixture[str]) -> None:
    status = build.main(["--check"])
    out = capsys.readouterr().out
    assert status == 0, out
    shipped = len(list(find_fixtures([CORPUS])))
    assert f"is up to date: {shipped} traces" in out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "pae").mkdir()
    (folder / "pae" / "dropped-trace.json").write_text("{}")
    assert build.main(["--corpus", str(folder)]) == 0
    return folder


def test_a_write_replaces_the_folder_and_then_checks_clean(
        built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert not (built / "pae" / "dropped-trace.json").exists()
    names = sorted(p.relative_to(built).as_posix() for p in built.rglob("*.json"))
    assert names == sorted(p.relative_to(CORPUS).as_posix() for p in CORPUS.rglob("*.json"))
    capsys.readouterr()
    assert build.main(["--check", "--corpus", str(built)]) == 0


def test_check_names_changed_and_stale_files(built: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    changed = built / "legacy" / "mov-sizes-and-immediates.json"
    original = changed.read_text()
    stale = built / "4level" / "not-built-here.json"
    try:
        changed.write_text(original.replace('"emulated"', '"rejected"', 1))
        stale.write_text("{}")
        capsys.readouterr()
        assert build.main(["--check", "--corpus", str(built)]) == 1
        out = capsys.readouterr().out.splitlines()
        assert f"would write {changed}" in out
        assert f"would delete {stale}" in out
    finally:
        changed.write_text(original)
        stale.unlink(missing_ok=True)


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "tools.corpus.build_corpus", "--help"],
    [sys.executable, "tools/corpus/build_corpus.py", "--help"],
    [sys.executable, "-m", "tools.corpus.extract_kernel_writers", "--help"],
    [sys.executable, "tools/corpus/extract_kernel_writers.py", "--help"],
])
def test_entry_points_start(command: list[str]) -> None:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m tools.corpus.")


def test_pae_arguments_follow_regparm3() -> None:
    # i386 regparm(3): ptep in eax; the 8-byte entry in ecx:edx (edx the low half).
    record = {"function": "pae_set", "prototype": "void pae_set(pte_t *ptep, pte_t pte)",
              "args": ["eax", "ecx:edx"], "arg_names": []}
    params = parse_params(record)
    assert [(p.name, p.ctype, p.pointer, p.level) for p in params] == [
        ("ptep", "pte_t", True, "pte"), ("pte", "pte_t", False, "pte")]
    target = CallTarget("pae", "pte", 0xC1234000, 8, 0xC2000000, 0xC2000800)
    regs, stack = place_args(record, params, {"entry": 0x80000000_12345067}, 3, target,
                             KernelValues("pae", random.Random(1)), random.Random(2))
    assert regs == {"rax": 0xC1234018, "rdx": 0x12345067, "rcx": 0x80000000}
    assert stack == []


def test_stack_arguments_are_words_above_the_return_address() -> None:
    record = {"function": "pmdp_set_access_flags",
              "prototype": "int pmdp_set_access_flags(struct vm_area_struct *vma, "
                           "unsigned long address, pmd_t *pmdp, pmd_t entry, int dirty)",
              "args": ["eax", "edx", "ecx", "[esp+8]:[esp+4]", "[esp+12]"], "arg_names": []}
    target = CallTarget("pae", "pmd", 0xC1234000, 8, 0xC2000000, 0xC2000800)
    regs, stack = place_args(record, parse_params(record),
                             {"entry": 0x80000000_000200E3, "dirty": 1}, 1, target,
                             KernelValues("pae", random.Random(1)), random.Random(2))
    assert regs["rax"] == 0xC2000000 and regs["rcx"] == 0xC1234008
    assert stack == [0x000200E3, 0x80000000, 1]
