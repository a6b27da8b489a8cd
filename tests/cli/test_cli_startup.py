"""Start-up: building the parser imports no subcommand's heavy machinery."""

from __future__ import annotations

import subprocess
import sys

import ptemu.cli.kvm as kvm_cli
from ptemu.kvm.runner import RunLimits


def test_kvm_option_defaults_are_the_runners() -> None:
    assert (kvm_cli._DEFAULT_MAX_EXITS, kvm_cli._DEFAULT_TIMEOUT) == \
        (RunLimits().max_exits, RunLimits().timeout)


def test_building_the_parser_does_not_import_the_kvm_runner() -> None:
    code = ("import sys; from ptemu.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('ptemu.kvm.runner', 'ptemu.kvm.smp', 'ptemu.kvm.capture') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"
