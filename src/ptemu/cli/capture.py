"""``ptemu capture DESCRIPTION.json -o FIXTURE.json``: make a fixture from real execution.

Runs the description's code in Unicorn with paging on and writes a fixture
whose expectations are what the code really stored (docs/capture.md). A bad
description is a one-line error with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ptemu.errors import UsageError

EXIT_OK = 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``capture`` subcommand."""
    parser = subparsers.add_parser(
        "capture",
        help="run guest code with paging on and record its page-table writes as a fixture",
        description="Build the guest a description asks for (its page tables, the code at "
                    "its real linear addresses, the page-table pages to monitor), run the code "
                    "in Unicorn with paging enabled and write every store that lands on a "
                    "monitored page as a fixture event, with the expectation taken from what "
                    "the execution did. The input format is in docs/capture.md.")
    parser.add_argument("description", metavar="DESCRIPTION.json",
                        help="the capture description (JSON)")
    parser.add_argument("-o", "--output", metavar="FIXTURE.json",
                        help="where to write the fixture (default: standard output)")
    parser.add_argument("--no-coalesce", action="store_true",
                        help="record a PAE entry's second 4-byte half as its own event "
                             "(overrides the description's 'coalesce')")
    parser.add_argument("--policy", choices=("strict", "hvmi"),
                        help="write-state policy for 'entries' (overrides the description)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Capture one description; raise `UsageError` on bad input."""
    import dataclasses

    from ptemu.capture import capture, dump_fixture, load_description
    from ptemu.status import Policy

    path = Path(args.description)
    if not path.is_file():
        raise UsageError(f"{path}: no such description file")
    spec = load_description(path)
    if args.no_coalesce:
        spec = dataclasses.replace(spec, coalesce=False)
    if args.policy is not None:
        spec = dataclasses.replace(spec, policy=Policy(args.policy))
    text = dump_fixture(capture(spec))
    if args.output is None:
        sys.stdout.write(text)
        return EXIT_OK
    target = Path(args.output)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    except OSError as error:
        raise UsageError(f"{target}: cannot write: {error.strerror}") from None
    events = text.count('"expect"')
    print(f"{target}: {spec.name}: {events} event{'' if events == 1 else 's'}", file=sys.stderr)
    return EXIT_OK
