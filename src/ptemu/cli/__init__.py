"""The `ptemu` command: one dispatcher, one module per subcommand.

Each subcommand module exposes ``register(subparsers)``, which adds its parser
and sets ``run=`` to a function ``(args) -> int`` returning the exit status.
Errors a user makes (bad arguments, malformed files) print one line on stderr
and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ptemu.errors import PtemuError

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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to render `--help` in the docs)."""
    parser = _Parser(
        prog="ptemu",
        description="x86 page-table write emulator for hypervisor memory introspection",
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
    args = parser.parse_args(argv)
    try:
        status: int = args.run(args)
    except PtemuError as error:
        print(f"ptemu {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # `ptemu replay --json | head` closed the pipe: not an error of ours.
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
