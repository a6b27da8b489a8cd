"""``ptemu replay``: exit statuses, human and JSON output, progress bar, corpus default.

Fixtures are written into tmp_path. The traces are the hand-worked PAE write
of tests/fixtures_format/test_fixture_replay.py: `mov [eax+4], ecx` (89 48 04)
then `mov [eax], edx` (89 10) on the PTE at GPA 0x3ff0.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import ptemu.cli.replay as replay_cli
from ptemu.cli import main
from ptemu.handler import PtWriteHandler

Document = dict[str, Any]

PAE_EVENT: Document = {
    "gpa": "0x3ff4", "gla": "0xc0003ff4",
    "regs": {"rip": "0xc1001234", "rax": "0xc0003ff0", "rcx": "0x1", "rdx": "0x5063"},
    "code": "89 48 04 89 10 c3",
    "expect": {
        "status": "emulated",
        "writes": [
            {"gpa": "0x3ff0", "offset": 4, "size": 4, "value": "0x1", "old": "0x0"},
            {"gpa": "0x3ff0", "offset": 0, "size": 4, "value": "0x5063", "old": "0x100000000"},
        ],
        "entries": [{"gpa": "0x3ff0", "state": "complete", "old": "0x0", "new": "0x100005063"}],
        "regs": {"rip": "0xc1001239"},
    },
}


def document(name: str = "cli/pae", events: int = 1) -> Document:
    return {"ptemu_fixture": 1, "name": name, "source": "hand-written", "paging": "pae",
            "code_bits": 32, "memory": [],
            "events": [copy.deepcopy(PAE_EVENT) for _ in range(events)]}


def other_entry_event(expect: Document) -> Document:
    """The same two stores on the neighbouring entry (GPA 0x3fe8)."""
    event = copy.deepcopy(PAE_EVENT)
    event.update(gpa="0x3fec", gla="0xc0003fec", expect=expect)
    event["regs"]["rax"] = "0xc0003fe8"
    return event


def write(path: Path, doc: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc, encoding="utf-8")
    return path


# -- unusable input: exit 2, one line on stderr, nothing on stdout ------------------

UNUSABLE: dict[str, tuple[object, str]] = {
    "not-json": ('{"ptemu_fixture": 1,', ("not JSON: Expecting property name enclosed in "
                                          "double quotes at line 1 column 21")),
    "wrong-version": (dict(document(), ptemu_fixture=2),
                      ("key 'ptemu_fixture': unsupported fixture version 2 "
                       "(this ptemu reads version 1)")),
    "missing-key": ({k: v for k, v in document().items() if k != "memory"},
                    "key 'memory': missing key"),
    "unknown-paging": (dict(document(), paging="4lvl"),
                       ("key 'paging': unknown paging mode '4lvl' "
                        "(expected one of legacy, pae, 4level, 5level)")),
    "event-key": (dict(document(), events=[{k: v for k, v in PAE_EVENT.items()
                                            if k != "code"}]),
                  "event 0: key 'code': missing key"),
}


@pytest.mark.parametrize(("doc", "message"), list(UNUSABLE.values()), ids=list(UNUSABLE))
def test_unusable_fixture_exits_2_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], doc: object, message: str) -> None:
    good = write(tmp_path / "a_good.json", document())
    bad = write(tmp_path / "b_bad.json", doc)
    assert main(["replay", str(good), str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # every file is checked before anything runs
    assert captured.err == f"ptemu replay: {bad}: {message}\n"


def test_missing_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err == f"ptemu replay: no such file or folder: {tmp_path}/absent\n"


def test_folder_without_fixtures_exits_2(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"ptemu replay: no *.json or *.jsonl fixture files under {tmp_path}\n"


def test_bad_policy_option_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["replay", "--policy", "lenient"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'lenient'" in err


# -- human output --------------------------------------------------------------------


def test_all_pass_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "b.json", document("cli/b", events=1))
    write(tmp_path / "sub/a.json", document("cli/a", events=1))
    assert main(["replay", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    # Files in path order: b.json sorts before sub/a.json.
    assert captured.out == "cli/b  1 event  PASS\ncli/a  1 event  PASS\n2 passed, 0 failed\n"
    assert captured.err == ""


def test_mismatch_exits_1_and_names_event_key_and_hex_values(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = document("cli/wrong", events=2)
    # The expectation of the second event forgets that coalescing moves rip
    # past both halves (3 + 2 bytes).
    doc["events"][1] = other_entry_event({"status": "emulated",
                                          "regs": {"rip": "0xc1001237"}})
    path = write(tmp_path / "wrong.json", doc)
    assert main(["replay", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "cli/wrong  2 events  FAIL"
    assert out[1] == "  event 1: regs.rip: expected 0xc1001237, actual 0xc1001239"
    assert out[-1] == "1 passed, 1 failed"
    assert len(out) == 3


def test_no_coalesce_on_a_coalesced_recording_is_not_compared(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The expectations were recorded with coalescing (no capture.coalesce key):
    # under --no-coalesce they cannot hold, so the events run but are not compared.
    path = write(tmp_path / "pae.json", document())
    assert main(["replay", "--no-coalesce", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "cli/pae  1 event  NOT COMPARED (recorded with coalescing, replayed without)",
        ("1 events not compared: their fixtures were recorded under another policy or "
         "coalescing, and their expectations hold only under those"),
        "0 passed, 0 failed",
    ]


NOT_COALESCED_EXPECT: Document = {
    # `mov [eax+4], ecx` alone (3 bytes): the high half, the entry left partial.
    "status": "emulated",
    "writes": [{"gpa": "0x3ff0", "offset": 4, "size": 4, "value": "0x1", "old": "0x0"}],
    "entries": [{"gpa": "0x3ff0", "state": "partial"}],
    "regs": {"rip": "0xc1001237"},
}


def test_a_recording_without_coalescing_replays_without_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = dict(document(), capture={"tool": "ptemu capture", "coalesce": False})
    doc["events"][0]["expect"] = copy.deepcopy(NOT_COALESCED_EXPECT)
    path = write(tmp_path / "pae.json", doc)
    assert main(["replay", str(path)]) == 0             # its own setting by default
    assert main(["replay", "--no-coalesce", str(path)]) == 0
    assert capsys.readouterr().out == "cli/pae  1 event  PASS\n1 passed, 0 failed\n" * 2


def test_policy_unlike_the_recording_is_not_compared_and_json_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "pae.json", document())     # recorded under strict
    assert main(["replay", "--json", "--policy", "hvmi", str(path)]) == 0
    event, summary = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (event["outcome"], event["ok"], event["mismatches"]) == ("not-compared", True, [])
    assert event["not_compared"] == "recorded under policy strict, replayed under hvmi"
    assert event["status"] == "emulated"                 # it ran
    assert summary == {"passed": 0, "failed": 0, "errors": 0, "unchecked": 0,
                       "not_compared": 1, "events": 1}
    # The same policy as recorded compares as usual.
    assert main(["replay", "--policy", "strict", str(path)]) == 0
    assert capsys.readouterr().out == "cli/pae  1 event  PASS\n1 passed, 0 failed\n"


def test_event_less_fixture_is_refused_by_replay(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path / "a.json", document())
    image = write(tmp_path / "b.json", dict(document(), events=[]))
    assert main(["replay", str(good), str(image)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"ptemu replay: {image}: no events to replay (a fixture with an "
                            "empty 'events' list is a memory image: walk it with ptemu walk)\n")


def test_names_from_files_cannot_forge_output(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "evil.json", document("x  1 event  PASS\n\x1b[2Jforged\ud800"))
    assert main(["replay", str(path)]) == 0
    out = capsys.readouterr().out
    assert out == ("x  1 event  PASS\\n\\x1b[2Jforged\\ud800  1 event  PASS\n"
                   "1 passed, 0 failed\n")


def test_harness_error_is_reported_apart_and_exits_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> object:
        raise RuntimeError("boom")

    monkeypatch.setattr(PtWriteHandler, "handle_ept_write", boom)
    path = write(tmp_path / "pae.json", document(events=2))
    assert main(["replay", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "cli/pae  2 events  ERROR",
        "  event 0: error: RuntimeError: boom",
        "  event 1: error: not run: event 0 raised",
        "2 events raised in the harness (errors, not mismatches)",
        "0 passed, 0 failed",
    ]


def test_events_without_expect_are_counted_apart(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = document()
    del doc["events"][0]["expect"]
    path = write(tmp_path / "capture.json", doc)
    assert main(["replay", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "cli/pae  1 event  UNCHECKED",
        "1 events have no expect (not compared)",
        "0 passed, 0 failed",
    ]


def test_policy_option_overrides_the_fixture(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    original = PtWriteHandler.__init__

    def recording(self: PtWriteHandler, *args: Any, **kwargs: Any) -> None:
        seen.append(str(kwargs["policy"]))
        original(self, *args, **kwargs)

    monkeypatch.setattr(PtWriteHandler, "__init__", recording)
    path = write(tmp_path / "pae.json", dict(document(), policy="hvmi"))
    assert main(["replay", str(path)]) == 0
    assert main(["replay", "--policy", "strict", str(path)]) == 0
    assert seen == ["hvmi", "strict"]


# -- JSON Lines ----------------------------------------------------------------------


def test_json_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = document(events=2)
    doc["events"][1] = other_entry_event({"regs": {"rip": "0xc1001237"}})
    path = write(tmp_path / "pae.json", doc)
    assert main(["replay", "--json", str(path)]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    first, second, summary = lines
    assert first == {
        "fixture": "cli/pae", "path": str(path), "event": 0, "outcome": "pass",
        "status": "emulated",
        "writes": [
            {"gpa": "0x3ff0", "offset": 4, "size": 4, "value": "0x1", "old": "0x0"},
            {"gpa": "0x3ff0", "offset": 0, "size": 4, "value": "0x5063", "old": "0x100000000"},
        ],
        "entries": [{"gpa": "0x3ff0", "state": "complete", "old": "0x0", "new": "0x100005063"}],
        "regs": {"rip": "0xc1001239"},
        "ok": True, "mismatches": [], "error": None,
    }
    assert (second["event"], second["ok"], second["outcome"]) == (1, False, "fail")
    assert second["mismatches"] == [
        {"key": "regs.rip", "expected": "0xc1001237", "actual": "0xc1001239"}]
    assert summary == {"passed": 1, "failed": 1, "errors": 0, "unchecked": 0,
                       "not_compared": 0, "events": 2}


def test_json_error_event(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> object:
        raise ValueError("bad")

    monkeypatch.setattr(PtWriteHandler, "handle_ept_write", boom)
    path = write(tmp_path / "pae.json", document())
    assert main(["replay", "--json", str(path)]) == 1
    event, summary = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (event["outcome"], event["ok"], event["status"], event["error"]) == (
        "error", False, None, "ValueError: bad")
    assert (event["writes"], event["entries"], event["regs"]) == ([], [], {})
    assert summary == {"passed": 0, "failed": 0, "errors": 1, "unchecked": 0,
                       "not_compared": 0, "events": 1}


# -- no PATH: the shipped corpus -------------------------------------------------------


def test_no_path_replays_the_shipped_corpus(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "corpus/pae/one.json", document("corpus/one"))
    monkeypatch.setattr(replay_cli, "corpus_path", lambda: tmp_path / "corpus")
    assert main(["replay"]) == 0
    assert capsys.readouterr().out == "corpus/one  1 event  PASS\n1 passed, 0 failed\n"


# -- progress bar ----------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run_with_stderr(monkeypatch: pytest.MonkeyPatch, stderr: io.StringIO,
                     argv: list[str]) -> int:
    monkeypatch.setattr(sys, "stderr", stderr)
    return main(argv)


def test_progress_bar_only_on_a_terminal_above_a_few_hundred_events(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    many = write(tmp_path / "many/t.json", document(events=replay_cli.PROGRESS_MIN_EVENTS + 1))
    few = write(tmp_path / "few/t.json", document(events=replay_cli.PROGRESS_MIN_EVENTS))
    terminal = _Terminal()
    assert _run_with_stderr(monkeypatch, terminal, ["replay", "--no-coalesce", str(many)]) in (0, 1)
    shown = terminal.getvalue()
    total = replay_cli.PROGRESS_MIN_EVENTS + 1
    assert f"] {total}/{total} events" in shown
    assert shown.endswith("\r\x1b[K")  # cleared before the summary line
    out = capsys.readouterr().out
    assert out.splitlines()[-1].endswith("failed") and "[#" not in out

    quiet_terminal = _Terminal()
    _run_with_stderr(monkeypatch, quiet_terminal, ["replay", str(few)])
    assert quiet_terminal.getvalue() == ""
    pipe = io.StringIO()
    _run_with_stderr(monkeypatch, pipe, ["replay", str(many)])
    assert pipe.getvalue() == ""


# -- the console script ------------------------------------------------------------------


def _console_script() -> str:
    script = shutil.which("ptemu", path=str(Path(sys.executable).parent)) or shutil.which("ptemu")
    if script is None:
        pytest.fail("the `ptemu` console script is not installed (pip install -e .)")
    return script


def test_console_script_replays_and_reports(tmp_path: Path) -> None:
    path = write(tmp_path / "pae.json", document())
    done = subprocess.run([_console_script(), "replay", str(path)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (
        0, "cli/pae  1 event  PASS\n1 passed, 0 failed\n", "")


def test_console_script_unusable_input_has_no_traceback(tmp_path: Path) -> None:
    path = write(tmp_path / "v2.json", dict(document(), ptemu_fixture=2))
    done = subprocess.run([_console_script(), "replay", str(path)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (f"ptemu replay: {path}: key 'ptemu_fixture': unsupported fixture "
                           "version 2 (this ptemu reads version 1)\n")
