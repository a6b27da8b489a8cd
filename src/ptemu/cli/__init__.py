"""The `ptemu` command: one dispatcher, one module per subcommand.

Each subcommand module exposes ``register(subparsers)``, which adds its parser
and sets ``run=`` to a function ``(args) -> int`` returning the exit status; a
nested subcommand also sets ``command_name=`` (``"kvm run"``) for messages.
Errors a user makes (bad arguments, malformed files) print one line on stderr,
``ptemu SUBCOMMAND: what: why``, and exit with status 2, never a traceback.
Echoed values are escaped and cut (`ptemu.values.shown`), so no input can
forge a second line. Numbers follow `ptemu.cli.options`: hex with ``0x`` for
addresses and values, decimal for counts.

Exit statuses, the same in every subcommand: 0 success; 1 a check failed (a
replay mismatch, a KVM disagreement); 2 unusable input; 3 a KVM guest did not
finish; 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ptemu.errors import PtemuError
from ptemu.values import escaped, shown

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "ptemu.cli.replay",
    "ptemu.cli.paging",
    "ptemu.cli.monitor",
    "ptemu.cli.capture",
    "ptemu.cli.bench",
    "ptemu.cli.kvm",
)
"""Subcommand modules, in the order `ptemu --help` lists them."""

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_USAGE = 2
EXIT_GUEST = 3
EXIT_INTERRUPTED = 130

MESSAGE_CHARS = 400
"""A generated message longer than this (argparse listing unrecognized
arguments, say) is cut: an error is one readable line."""


def one_line(message: str) -> str:
    """`message` escaped (no newline, no terminal escape) and cut to `MESSAGE_CHARS`."""
    text = escaped(message)
    return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS] + "..."


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, ``ptemu SUBCOMMAND: what: why``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {one_line(message.removeprefix('argument '))}\n")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        # argparse echoes a bad choice with repr(), uncut; show it escaped and cut.
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(str(choice) for choice in action.choices)
            raise argparse.ArgumentError(
                action, f"invalid choice: {shown(str(value))} (choose from {choices})")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to render `--help` in the docs)."""
    parser = _Parser(
        prog="ptemu",
        description="x86 page-table write emulator for hypervisor memory introspection",
        epilog="Addresses and values are hex with 0x (0x1000); counts are decimal. Exit "
               "status: 0 success, 1 a check failed, 2 unusable input (one line on stderr), "
               "3 a KVM guest did not finish.",
    )
    from ptemu import __version__

    parser.add_argument("--version", action="version", version=f"ptemu {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue  # that subcommand is not part of this build
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ptemu` console script; returns the exit status."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    name = getattr(args, "command_name", None) or args.command
    if extras:
        # argparse hands positionals that follow an option (`walk FILE --cr3 X GLA`)
        # back as extras when an earlier positional is optional; a subcommand that
        # takes them names its list in `more_operands`. Anything else is an error.
        collect = getattr(args, "more_operands", None)
        if collect is None or any(item.startswith("-") for item in extras):
            parser.exit(EXIT_USAGE, f"ptemu {name}: unrecognized arguments: "
                                    f"{shown(' '.join(extras))}\n")
        getattr(args, collect).extend(extras)
    try:
        status: int = args.run(args)
    except PtemuError as error:
        print(f"ptemu {name}: {one_line(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # `ptemu replay --json | head` closed the pipe: not an error of ours.
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return status


if __name__ == "__main__":
    sys.exit(main())
