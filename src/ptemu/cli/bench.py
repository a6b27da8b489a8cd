"""`ptemu bench`: events per second and latency of each engine, against the naive way."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any

from ptemu.cli.options import count

ENGINES = ("naive", "unicorn", "auto")
"""The naive pipeline (the baseline), the handler on Unicorn, the handler with
the fast engine in front."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench", help="benchmark the handler against the naive pipeline",
        description="Replay a kernel-like mix of corpus events (all four paging modes) "
                    "through the naive pipeline (fresh Capstone + Unicorn per event) and "
                    "ptemu's engines, interleaved in one process; print events per second, "
                    "median and p99 latency and the ratio to the naive pipeline, then how "
                    "the cost of an event scales with the handler's state.")
    parser.add_argument("--events", type=count(1, 10_000_000), default=2000, metavar="N",
                        help="events per engine and round (default 2000)")
    parser.add_argument("--rounds", type=count(1, 1000), default=3, metavar="R",
                        help="interleaved rounds (default 3)")
    parser.add_argument("--naive-events", type=count(1, 10_000_000), default=300, metavar="N",
                        help="events per round for the slow naive pipeline (default 300)")
    parser.add_argument("--no-scaling", action="store_true",
                        help="skip the state-size scaling measurements")
    parser.add_argument("--end-to-end", action="store_true",
                        help="also time whole processes: `ptemu replay` of a 20,000-event "
                        "synthetic trace against the naive script, start-up subtracted")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ptemu.bench.report import run_benchmark

    report = run_benchmark(events=args.events, rounds=args.rounds,
                           naive_events=args.naive_events, scaling=not args.no_scaling,
                           progress=sys.stderr if sys.stderr.isatty() else None)
    if args.end_to_end:
        from ptemu.bench.endtoend import run_end_to_end

        report["end_to_end"] = run_end_to_end(
            rounds=args.rounds, progress=sys.stderr if sys.stderr.isatty() else None)
    report["machine"] = {"python": platform.python_version(), "platform": platform.platform(),
                         "processor": platform.processor() or platform.machine()}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from ptemu.bench.report import render_text

        print(render_text(report))
        if args.end_to_end:
            from ptemu.bench.endtoend import render_end_to_end

            print(render_end_to_end(report["end_to_end"]))
    return 0
