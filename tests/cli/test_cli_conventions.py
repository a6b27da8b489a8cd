"""The conventions every subcommand keeps (README, "Conventions"), on the installed command.

* Addresses and values are hex with ``0x``; a number without it is refused,
  never read as decimal. Counts (a level, iterations, pages, events) are
  decimal ASCII digits. Non-ASCII digits and absurdly long numbers are refused.
* Unusable input: exit status 2, one line on stderr starting with
  ``ptemu SUBCOMMAND:``, nothing on stdout; echoed values escaped and cut.
* One vocabulary: ``ps`` is the PS flag, ``page_bytes`` a page size, in
  ``entry`` and ``walk`` alike; ``--paging`` names the paging mode everywhere.

Nothing here needs /dev/kvm: the ``kvm run`` cases are refused while the
arguments are read, before any device is opened.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def ptemu(*argv: str | bytes | Path) -> subprocess.CompletedProcess[str]:
    """Run the installed `ptemu` console script, as a user does."""
    script = shutil.which("ptemu", path=str(Path(sys.executable).parent)) or shutil.which("ptemu")
    if script is None:
        pytest.fail("the `ptemu` console script is not installed (pip install -e .)")
    args = [arg if isinstance(arg, bytes) else str(arg) for arg in argv]
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=120,
                          check=False, encoding="utf-8", errors="strict")


def one_error_line(done: subprocess.CompletedProcess[str], command: str) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.endswith("\n"), done.stderr
    assert done.stderr.startswith(f"ptemu {command}: "), done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr.rstrip("\n")


WALK_IMAGE = "walk-4level.json"
DOCS_WALK = Path(__file__).resolve().parents[2] / "docs" / "examples" / WALK_IMAGE

# (subcommand words, argv with {} where the number goes, option name in the message)
HEX_ARGUMENTS = [
    (["entry"], ["--paging", "4level", "--level", "1", "{}"], "VALUE"),
    (["walk"], [str(DOCS_WALK), "--cr3", "{}", "0x0"], "--cr3"),
    (["walk"], [str(DOCS_WALK), "--cr3", "0x1000", "{}"], "GLA"),
    (["walk"], ["--image", str(DOCS_WALK), "--paging", "pae", "--base", "{}", "--cr3", "0x0",
                "0x0"], "--base"),
]
COUNT_ARGUMENTS = [
    (["entry"], ["--paging", "4level", "--level", "{}", "0x1"], "--level"),
    (["entry"], ["--paging", "4level", "--level", "1", "--maxphyaddr", "{}", "0x1"],
     "--maxphyaddr"),
    (["kvm", "run"], ["--iterations", "{}"], "--iterations"),
    (["kvm", "run"], ["--pages", "{}"], "--pages"),
    (["kvm", "run"], ["--seed", "{}"], "--seed"),
    (["kvm", "run"], ["--show", "{}"], "--show"),
    (["kvm", "run"], ["--max-exits", "{}"], "--max-exits"),
    (["kvm", "run"], ["--code-bits", "{}"], "--code-bits"),
    (["bench"], ["--events", "{}"], "--events"),
    (["bench"], ["--rounds", "{}"], "--rounds"),
    (["bench"], ["--naive-events", "{}"], "--naive-events"),
]


def _argv(words: list[str], template: list[str], value: str) -> list[str]:
    return [*words, *(value if part == "{}" else part for part in template)]


def _ids(cases: list[tuple[list[str], list[str], str]]) -> list[str]:
    return [" ".join(words) + " " + option for words, _, option in cases]


# -- hex needs 0x -------------------------------------------------------------------------


@pytest.mark.parametrize(("words", "template", "option"), HEX_ARGUMENTS, ids=_ids(HEX_ARGUMENTS))
def test_decimal_looking_address_is_refused_not_read_as_decimal(
        words: list[str], template: list[str], option: str) -> None:
    line = one_error_line(ptemu(*_argv(words, template, "1000")), " ".join(words))
    # 1000 decimal is 0x3e8: the message offers both readings and takes neither.
    assert line == (f"ptemu {' '.join(words)}: {option}: '1000' has no 0x: ptemu reads "
                    "addresses and values only as hex (write 0x1000 for hex, or 0x3e8 for "
                    "decimal 1000)")


@pytest.mark.parametrize("text", ["²", "١٢٣", "０x１０", "0x1_000", " 0x10", "+0x10", "0x",
                                  "1e3", "0b101", "0o17", "ten"])
def test_other_spellings_of_an_address_are_refused(text: str) -> None:
    line = one_error_line(ptemu("walk", str(DOCS_WALK), "--cr3", "0x1000", text), "walk")
    assert line.startswith("ptemu walk: GLA: ")
    assert "is not a hex number (write 0x and the digits 0-9, a-f" in line


@pytest.mark.parametrize(("words", "template", "option"), HEX_ARGUMENTS, ids=_ids(HEX_ARGUMENTS))
def test_non_ascii_digits_are_refused_in_every_address(
        words: list[str], template: list[str], option: str) -> None:
    line = one_error_line(ptemu(*_argv(words, template, "0x١٢٣")), " ".join(words))
    assert line == (f"ptemu {' '.join(words)}: {option}: '0x١٢٣' is not a hex number "
                    "(write 0x and the digits 0-9, a-f, e.g. 0x1000)")


def test_the_entry_from_the_issue_is_refused_not_decoded_as_decimal() -> None:
    # `ptemu entry --paging 4level --level 1 8000000012345067` used to exit 0 and
    # decode 0x1c6bf526f05eeb.
    line = one_error_line(ptemu("entry", "--paging", "4level", "--level", "1",
                                "8000000012345067"), "entry")
    assert "'8000000012345067' has no 0x" in line and "0x1c6bf526f05eeb" in line


def test_an_absurdly_long_number_is_refused_before_conversion() -> None:
    line = one_error_line(ptemu("entry", "--paging", "4level", "--level", "1",
                                "0x" + "0" * 100_000 + "1"), "entry")
    assert "is too long for a number (100003 characters" in line
    assert len(line) < 300                                 # the value is cut, not echoed


def test_a_value_wider_than_its_field_is_refused_in_hex() -> None:
    line = one_error_line(ptemu("walk", str(DOCS_WALK), "--cr3", "0x1000",
                                "0x10000000000000000"), "walk")
    assert line == ("ptemu walk: GLA: 0x10000000000000000 does not fit in 64 bits "
                    "(at most 0xffffffffffffffff)")


def test_hex_with_0x_is_accepted_in_either_case() -> None:
    upper = ptemu("entry", "--paging", "4level", "--level", "1", "0X8000000012345067")
    lower = ptemu("entry", "--paging", "4level", "--level", "1", "0x8000000012345067")
    assert upper.returncode == lower.returncode == 0
    assert upper.stdout == lower.stdout and "value: 0x8000000012345067" in upper.stdout


# -- counts are decimal -------------------------------------------------------------------


@pytest.mark.parametrize("text", ["0x10", "²", "١٢", "１２", "1_0", "+1", "1.0", ""])
def test_a_count_is_decimal_ascii_only(text: str) -> None:
    line = one_error_line(ptemu("entry", "--paging", "4level", "--level", text, "0x1"), "entry")
    hint = " (counts are decimal, without 0x)" if text == "0x10" else ""
    assert line == (f"ptemu entry: --level: '{text}' is not a count: write decimal digits "
                    f"0-9{hint}")


@pytest.mark.parametrize("text", ["0x10", "١٢"])
@pytest.mark.parametrize(("words", "template", "option"), COUNT_ARGUMENTS,
                         ids=_ids(COUNT_ARGUMENTS))
def test_every_count_option_is_decimal(words: list[str], template: list[str], option: str,
                                       text: str) -> None:
    line = one_error_line(ptemu(*_argv(words, template, text)), " ".join(words))
    assert line.startswith(f"ptemu {' '.join(words)}: {option}: '{text}' is not a count")


def test_a_negative_count_is_one_line_too() -> None:
    # "-1" reaches the count parser (no option of kvm run looks like a number).
    line = one_error_line(ptemu("kvm", "run", "--iterations", "-1"), "kvm run")
    assert line == "ptemu kvm run: --iterations: '-1' is not a count: write decimal digits 0-9"


def test_a_count_out_of_range_names_the_range() -> None:
    line = one_error_line(ptemu("kvm", "run", "--pages", "65"), "kvm run")
    assert line == "ptemu kvm run: --pages: 65 is not in 1..64"


# -- one line, escaped and cut --------------------------------------------------------------


def test_echoed_values_are_escaped_and_cut_to_80_characters() -> None:
    value = "\x1b[31m" + "x\n" * 200
    line = one_error_line(ptemu("entry", "--paging", "4level", "--level", "1", value), "entry")
    shown = line.split("VALUE: ", 1)[1].split(" is ", 1)[0]
    assert shown.startswith("'\\x1b[31mx\\nx\\n") and shown.endswith("...'")
    assert len(shown) == 80 + len("''...")
    assert "\x1b" not in line


def test_an_undecodable_argument_does_not_crash_the_message() -> None:
    # A byte that is not UTF-8 reaches Python as a lone surrogate ('\udcff').
    line = one_error_line(ptemu("entry", "--paging", "4level", "--level", "1", b"0x\xff"),
                          "entry")
    assert "VALUE: '0x\\udcff' is not a hex number" in line


def test_an_invalid_choice_is_cut_too() -> None:
    line = one_error_line(ptemu("entry", "--paging", "p" * 500, "--level", "1", "0x1"), "entry")
    assert line == ("ptemu entry: --paging: invalid choice: '" + "p" * 80 + "...' "
                    "(choose from legacy, pae, 4level, 5level)")


@pytest.mark.parametrize(("argv", "command"), [
    (["replay", "/nonexistent/trace.json"], "replay"),
    (["replay", "--engine", "qemu"], "replay"),
    (["entry", "--paging", "pae", "--level", "4", "0x1"], "entry"),
    (["walk", "--cr3", "0x0"], "walk"),
    (["capture", "/nonexistent/description.json"], "capture"),
    (["bench", "--bogus"], "bench"),
    (["kvm", "run", "--paging", "6level"], "kvm run"),
    (["kvm", "probe", "--bogus"], "kvm probe"),
])
def test_every_error_line_names_its_subcommand(argv: list[str], command: str) -> None:
    one_error_line(ptemu(*argv), command)


# -- replay: exit codes, names from files ----------------------------------------------------


def _fixture(tmp_path: Path, name: str, rip_after: str) -> Path:
    """One PAE event, `mov [eax+4], ecx ; mov [eax], edx` coalesced (hand-worked in
    tests/cli/test_cli_replay.py): rip moves by 3 + 2 bytes to 0xc1001239."""
    document = {
        "ptemu_fixture": 1, "name": name, "paging": "pae", "code_bits": 32, "memory": [],
        "events": [{
            "gpa": "0x3ff4", "gla": "0xc0003ff4", "code": "89 48 04 89 10 c3",
            "regs": {"rip": "0xc1001234", "rax": "0xc0003ff0", "rcx": "0x1", "rdx": "0x5063"},
            "expect": {"status": "emulated", "regs": {"rip": rip_after}}}],
    }
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def test_replay_exit_codes_0_1_2(tmp_path: Path) -> None:
    assert ptemu("replay", _fixture(tmp_path, "ok", "0xc1001239")).returncode == 0
    wrong = ptemu("replay", _fixture(tmp_path, "wrong", "0xc1001237"))
    assert wrong.returncode == 1
    assert "  event 0: regs.rip: expected 0xc1001237, actual 0xc1001239" in wrong.stdout
    one_error_line(ptemu("replay", tmp_path / "absent.json"), "replay")


def test_replay_prints_a_hostile_fixture_name_escaped(tmp_path: Path) -> None:
    name = "evil\n1 passed, 0 failed\x1b[2J\ud800"
    done = ptemu("replay", _fixture(tmp_path, name, "0xc1001239"))
    assert done.returncode == 0
    assert done.stdout == ("evil\\n1 passed, 0 failed\\x1b[2J\\ud800  1 event  PASS\n"
                           "1 passed, 0 failed\n")


def test_replay_under_another_policy_is_not_compared(tmp_path: Path) -> None:
    # Recorded under strict (no policy key); the wrong rip is not reported under
    # hvmi, because nothing is compared there.
    done = ptemu("replay", "--policy", "hvmi", _fixture(tmp_path, "p", "0xc1001237"))
    assert done.returncode == 0
    assert done.stdout.splitlines()[0] == ("p  1 event  NOT COMPARED (recorded under policy "
                                           "strict, replayed under hvmi)")
    assert done.stdout.splitlines()[-1] == "0 passed, 0 failed"


# -- one vocabulary ---------------------------------------------------------------------


def test_entry_and_walk_json_share_keys() -> None:
    # A 2 MiB PDE (PS = bit 7 set): 'ps' is the flag, 'page_bytes' the size.
    entry = json.loads(ptemu("entry", "--paging", "4level", "--level", "2", "0x200083",
                             "--json").stdout)
    assert entry["ps"] is True and entry["page_bytes"] == "0x200000"
    assert "page_size" not in entry
    walk = json.loads(ptemu("walk", str(DOCS_WALK), "--cr3", "0x1000", "0xffff888012345ff8",
                            "--json").stdout)
    assert walk["page_bytes"] == "0x1000" and "page_size" not in walk
    text = ptemu("entry", "--paging", "4level", "--level", "2", "0x200083").stdout
    assert "ps: yes" in text.splitlines() and "page_size" not in text


def test_kvm_takes_paging_like_the_other_subcommands() -> None:
    helped = ptemu("kvm", "run", "--help")
    assert helped.returncode == 0
    assert "--paging MODE" in helped.stdout and "--mode" not in helped.stdout
    # The old spelling is still read (and checked like --paging).
    line = one_error_line(ptemu("kvm", "run", "--mode", "6level"), "kvm run")
    assert "--mode: invalid choice: '6level'" in line


@pytest.mark.parametrize("words", [["kvm"], ["kvm", "run"], ["kvm", "probe"]])
def test_kvm_help_has_a_description_and_no_rest_markup(words: list[str]) -> None:
    done = ptemu(*words, "--help")
    assert done.returncode == 0
    usage, _, rest = done.stdout.partition("\n\n")
    assert usage.startswith("usage: ptemu " + " ".join(words))
    description = rest.split("\n\n", 1)[0]
    assert len(description) > 60 and not description.startswith(("positional", "options"))
    assert "``" not in done.stdout and "`" not in done.stdout


# -- capture: names the file, creates no folder ----------------------------------------------


def test_capture_errors_name_the_file_and_no_folder_is_created(tmp_path: Path) -> None:
    description = tmp_path / "desc.json"
    description.write_text('{"name": "x", "paging": "3level"}', encoding="utf-8")
    line = one_error_line(ptemu("capture", description), "capture")
    assert line.startswith(f"ptemu capture: {description}: paging: unknown paging mode")
    description.write_bytes(b"\xff{}")
    line = one_error_line(ptemu("capture", description), "capture")
    assert line == f"ptemu capture: {description}: not UTF-8: bad byte at offset 0"
    target = tmp_path / "missing" / "out.json"
    line = one_error_line(ptemu("capture", description, "-o", target), "capture")
    assert line == (f"ptemu capture: -o {target}: no such folder {tmp_path / 'missing'} "
                    "(ptemu capture creates no folders)")
    assert not target.parent.exists()


def test_help_documents_the_conventions_and_the_replay_rule() -> None:
    top = " ".join(ptemu("--help").stdout.split())
    assert "Addresses and values are hex with 0x (0x1000); counts are decimal." in top
    replay = " ".join(ptemu("replay", "--help").stdout.split())
    assert "a fixture recorded under another policy is run but not compared" in replay
    assert "a PAE fixture recorded with coalescing is then run but not compared" in replay
