"""Kernel page-table writers driven under KVM: record selection, the driver
table, and real runs (hand-made records, then the corpus's Debian records)."""

from __future__ import annotations

import fnmatch
import struct
import tomllib
from pathlib import Path, PurePosixPath

import pytest

from conftest import require_mode
from ptemu.errors import UsageError
from ptemu.kvm.catalog import writer_files
from ptemu.kvm.kernel import kernel_program, load_kernel_writers, select_writers
from ptemu.kvm.layout import GuestLayout
from ptemu.kvm.runner import RunLimits, StopReason, run_guest


def _record(function, prototype, args, code, *, code_bits=64, paging="4level",
            modes=("4level", "5level"), address=0xFFFFFFFF8107E5D0, listing=(), calls=()):
    return {
        "function": function, "kernel_release": "test-kernel", "paging": paging,
        "code_bits": code_bits, "address": f"{address:#x}", "prototype": prototype,
        "args": list(args), "arg_names": [],
        "runtime": [{"profile": "+".join(modes), "paging_modes": list(modes),
                     "bytes": code.hex(), "disassembly": list(listing),
                     "calls": [{"offset": 0, "target": t} for t in calls],
                     "external_jumps": []}],
    }


SET_PTE = _record("native_set_pte", "void native_set_pte(pte_t *ptep, pte_t pte)",
                  ["rdi", "rsi"], bytes.fromhex("488937c3"))            # mov [rdi], rsi; ret
CLEAR_YOUNG = _record(
    "ptep_test_and_clear_young",
    "int ptep_test_and_clear_young(struct vm_area_struct *vma, unsigned long addr, "
    "pte_t *ptep)", ["rdi", "rsi", "rdx"],
    bytes.fromhex("f0480fba3205" "0f92c0" "0fb6c0" "c3"),  # lock btr qword [rdx], 5; setb al;
    address=0xFFFFFFFF81089C20)                             # movzx eax, al; ret
FLUSHING = _record("ptep_clear_flush", "pte_t ptep_clear_flush(struct vm_area_struct *vma, "
                   "unsigned long address, pte_t *ptep)", ["rdi", "rsi", "rdx"], b"\xc3",
                   calls=("flush_tlb_mm_range",), address=0xFFFFFFFF81089D00)
READS_GLOBAL = _record(
    "reads_unknown", "void reads_unknown(pte_t *ptep)", ["rdi"], b"\xc3",
    listing=[("+0x000: 48 8b 05 f4 22 3a 01           mov rax, qword ptr [rip + 0x13a22f4]"
              "  ; some_global")], address=0xFFFFFFFF81089E00)
PAE_SET = _record(  # 686-pae style: PTE high half first, then low (regparm: eax, ecx:edx)
    "pae_set_pte", "void pae_set_pte(pte_t *ptep, pte_t pte)", ["eax", "ecx:edx"],
    bytes.fromhex("894804" "8910" "c3"), code_bits=32, paging="pae", modes=("pae",),
    address=0xC1069320)


def test_selection_keeps_self_contained_writers_and_says_why_not():
    layout = GuestLayout.create("4level", 64)
    chosen = select_writers([SET_PTE, CLEAR_YOUNG, FLUSHING, READS_GLOBAL, PAE_SET], layout)
    assert [w.function for w in chosen.writers] == ["native_set_pte",
                                                    "ptep_test_and_clear_young"]
    reasons = dict(chosen.skipped)
    assert "flush_tlb_mm_range" in reasons["ptep_clear_flush (test-kernel, 4level+5level)"]
    assert "some_global" in reasons["reads_unknown (test-kernel, 4level+5level)"]
    assert not any(label.startswith("pae_set_pte") for label in reasons)  # other code size
    young = chosen.writers[1]
    assert [(p.name, p.points_to_entry) for p in young.parameters] == [
        ("vma", False), ("addr", False), ("ptep", True)]


def test_pae_writers_run_in_compatibility_mode_only_with_8_byte_entries():
    assert [w.function for w in select_writers([PAE_SET], GuestLayout.create("4level", 32))
            .writers] == ["pae_set_pte"]
    assert select_writers([PAE_SET], GuestLayout.create("legacy", 32)).writers == ()


def test_driver_table_holds_targets_and_monitored_entry_pointers():
    layout = GuestLayout.create("4level", 64)
    program = kernel_program(layout, select_writers([SET_PTE, CLEAR_YOUNG], layout), 5)
    records = [struct.unpack_from("<7Q", program.heap, 56 * i) for i in range(10)]
    assert [r[6] for r in records] == [0xFFFFFFFF8107E5D0, 0xFFFFFFFF81089C20] * 5
    for rdi, _rsi, rdx, *_ in records[::2]:
        assert layout.is_monitored(rdi - layout.direct_map) and rdi % 8 == 0
    for _rdi, _rsi, rdx, *_ in records[1::2]:
        assert layout.is_monitored(rdx - layout.direct_map) and rdx % 8 == 0
    assert 0xFFFFFFFF8107E000 in program.pages and 0xFFFFFFFF81089000 in program.pages
    assert program.pages[0xFFFFFFFF8107E000][0x5D0:0x5D4] == bytes.fromhex("488937c3")


def test_no_usable_writer_is_a_usage_error():
    layout = GuestLayout.create("4level", 64)
    with pytest.raises(UsageError, match="no kernel writer can run"):
        kernel_program(layout, select_writers([FLUSHING], layout), 5)


def test_the_debian_records_are_installed_with_the_package():
    # The installed `ptemu kvm run --program kernel` reads them from the package,
    # not from the source tree's tools/ (which a `pip install .` does not copy).
    files = writer_files()
    assert files and files[0].is_file()
    assert str(files[0]).replace("\\", "/").endswith("ptemu/kvm/data/kernel_writers.json")
    records = load_kernel_writers(files[0])
    assert {r["flavour"] for r in records} == {"amd64", "686-pae", "686"}
    assert {r["paging"] for r in records} == {"4level", "pae", "legacy"}
    # native_set_pte of amd64 is `mov [rdi], rsi; ret` at run time (the record's
    # runtime bytes, ftrace and return-thunk sites patched).
    set_pte = next(r for r in records
                   if r["flavour"] == "amd64" and r["function"] == "native_set_pte")
    assert set_pte["runtime"][0]["bytes"].startswith("488937")


def test_the_records_are_package_data():
    # `pip install .` copies only the files pyproject's package-data names; the
    # records must be among them (a fresh venv then runs `ptemu kvm run
    # --program kernel` without the source tree).
    root = Path(__file__).resolve().parents[2]
    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["ptemu"]
    relative = PurePosixPath("kvm/data/kernel_writers.json")
    assert (root / "src" / "ptemu" / relative).is_file()
    assert any(fnmatch.fnmatch(str(relative), pattern) for pattern in patterns), patterns


def test_unreadable_records_file(tmp_path):
    bad = tmp_path / "kernel_writers.json"
    bad.write_text("{")
    with pytest.raises(UsageError, match="cannot read kernel writers"):
        load_kernel_writers(bad)


@pytest.mark.parametrize(("bits", "records"), [(64, [SET_PTE, CLEAR_YOUNG]), (32, [PAE_SET])])
def test_hand_made_writers_under_kvm(kvm, bits, records):
    require_mode(kvm, "4level", bits)
    layout = GuestLayout.create("4level", bits)
    program = kernel_program(layout, select_writers(records, layout), 40, seed=11)
    report = run_guest(kvm, layout, program, limits=RunLimits(timeout=30))
    assert report.stop is StopReason.HALTED, report.detail
    assert report.disagreement_count == 0, [d.describe() for d in report.disagreements]
    assert report.writes >= 40
    reference = run_guest(kvm, layout, program, monitored=False)
    assert report.final_tables == reference.final_tables


@pytest.mark.parametrize("bits", [64, 32])
def test_debian_kernel_writers_under_kvm(kvm, bits):
    files = writer_files()
    assert files, "ptemu/kvm/data/kernel_writers.json is not installed with the package"
    require_mode(kvm, "4level", bits)
    layout = GuestLayout.create("4level", bits)
    chosen = select_writers(load_kernel_writers(files[0]), layout)
    if not chosen.writers:
        pytest.skip(f"{files[0]} has no writer that runs in 4level with {bits}-bit code")
    program = kernel_program(layout, chosen, 30, seed=3)
    report = run_guest(kvm, layout, program, limits=RunLimits(timeout=30))
    assert report.stop is StopReason.HALTED, report.detail
    assert report.disagreement_count == 0, [d.describe() for d in report.disagreements]
    assert report.writes > 0
    reference = run_guest(kvm, layout, program, monitored=False)
    assert report.final_tables == reference.final_tables
