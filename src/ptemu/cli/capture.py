"""``ptemu capture DESCRIPTION.json -o FIXTURE.json``: make a fixture from real execution.

Runs the description's code in Unicorn with paging on and writes a fixture
whose expectations are what the code really stored (docs/capture.md). A bad
description is a one-line error with exit status 2 that names the file; so is
an ``-o`` whose folder does not exist (nothing is created but the file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ptemu.errors import UsageError
from ptemu.values import escaped

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
                        help="where to write the fixture (default: standard output); its "
                             "folder must exist; a name ending in .jsonl gets the streamed "
                             "form (a header line, then one event per line)")
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
    shown_path = escaped(str(path))
    if not path.is_file():
        raise UsageError(f"{shown_path}: no such description file")
    target = None if args.output is None else Path(args.output)
    if target is not None and not target.parent.is_dir():
        raise UsageError(f"-o {escaped(str(target))}: no such folder "
                         f"{escaped(str(target.parent))} (ptemu capture creates no folders)")
    try:
        spec = load_description(path)
        if args.no_coalesce:
            spec = dataclasses.replace(spec, coalesce=False)
        if args.policy is not None:
            spec = dataclasses.replace(spec, policy=Policy(args.policy))
        document = capture(spec)
        if target is not None and target.suffix == ".jsonl":
            from ptemu.fixtures.stream import stream_lines

            events_list = document["events"]
            assert isinstance(events_list, list)
            text = "".join(stream_lines(document, events_list))
        else:
            text = dump_fixture(document)
    except UsageError as error:
        raise UsageError(_naming(str(error), str(path))) from None
    except UnicodeDecodeError as error:
        raise UsageError(f"{shown_path}: not UTF-8: bad byte at offset {error.start}") from None
    except (ValueError, RecursionError) as error:
        # Python's own JSON limits (integers of more than 4300 digits, deep nesting).
        raise UsageError(f"{shown_path}: not JSON ptemu can read: {error}") from None
    if target is None:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        target.write_text(text, encoding="utf-8")
    except OSError as error:
        raise UsageError(f"-o {escaped(str(target))}: cannot write: {error.strerror}") from None
    events = len(document["events"]) if isinstance(document["events"], list) else 0
    print(f"{escaped(str(target))}: {escaped(spec.name)}: {events} "
          f"event{'' if events == 1 else 's'}", file=sys.stderr)
    return EXIT_OK


def _naming(message: str, path: str) -> str:
    """`message` led by the description's file name (once)."""
    if message.startswith(path + ":"):
        return message
    return f"{escaped(path)}: {message.removeprefix('capture description: ')}"
