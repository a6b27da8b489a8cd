"""The README is the front door: its examples are real output, its test list is complete.

Every ``console`` block command of the README whose output is deterministic
(`ptemu entry`, `ptemu walk`, `ptemu replay` of a shipped file, `ptemu monitor`,
the handler example) is run as a user runs it, from the repository root, and its output
must be the README's text exactly. Commands whose output holds timings or a
machine (`ptemu kvm run`, `ptemu bench`) or needs a file the README does not
make (`/tmp/bad.json`) are left out by name below.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RUN = ("ptemu entry ", "ptemu walk ", "ptemu replay src/", "ptemu replay --policy ",
       "ptemu monitor ", "python docs/examples/handler_example.py")
"""Prefixes of the commands that are run; any other `$` line is not."""


def _examples() -> list[tuple[str, str]]:
    """(command, expected output) for every runnable `$` line of a console block."""
    text = README.read_text(encoding="utf-8")
    examples = []
    for block in re.findall(r"```console\n(.*?)```", text, re.DOTALL):
        lines = block.splitlines()
        for index, line in enumerate(lines):
            if not line.startswith("$ ") or not line[2:].startswith(RUN):
                continue
            output = []
            for following in lines[index + 1:]:
                if following.startswith("$ "):
                    break
                output.append(following)
            examples.append((line[2:], "\n".join(output) + "\n"))
    return examples


EXAMPLES = _examples()


def test_the_readme_has_the_examples_this_test_runs() -> None:
    commands = [command.split()[1] for command, _ in EXAMPLES]
    for name in ("entry", "walk", "replay", "monitor", "docs/examples/handler_example.py"):
        assert name in commands


@pytest.mark.parametrize(("command", "expected"), EXAMPLES, ids=[c for c, _ in EXAMPLES])
def test_readme_example_is_real_output(command: str, expected: str) -> None:
    argv = shlex.split(command)
    if argv[0] == "ptemu":
        script = (shutil.which("ptemu", path=str(Path(sys.executable).parent))
                  or shutil.which("ptemu"))
        assert script is not None, "the `ptemu` console script is not installed"
        argv[0] = script
    else:
        argv[0] = sys.executable
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.stderr == ""
    assert done.stdout == expected


def test_the_test_layout_names_every_test_folder() -> None:
    development = README.read_text(encoding="utf-8").split("## Development", 1)[1]
    folders = sorted(path.name for path in (ROOT / "tests").iterdir()
                     if path.is_dir() and not path.name.startswith((".", "_")))
    missing = [name for name in folders if f"`tests/{name}`" not in development]
    assert missing == [], f"README's Development section does not name tests/{missing}"


def test_the_readme_says_how_to_set_up_for_linting() -> None:
    development = README.read_text(encoding="utf-8").split("## Development", 1)[1]
    for command in ("pip install -e '.[test,dev]'", "ruff check src tests", "mypy"):
        assert command in development
