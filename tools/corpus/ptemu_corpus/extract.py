"""``extract``: the instruction bytes of Linux's out-of-line page-table writers,
from Debian's kernel packages, into ``kernel_writers.json``.

Steps (each cached under ``--work-dir``): pick the kernel ABI and packages
(`debian.choose_abi`), download them and stream out the vmlinuz, config,
System.map and debug vmlinux (`debian.fetch`), decompress the vmlinuz
(`vmlinuz`), then describe every candidate function (`writers`). Only function
bytes are written, never a kernel image. See tools/corpus/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ptemu.errors import UsageError

from .debian import FLAVOURS, choose_abi, fetch, prepare_apt
from .errors import ExtractError
from .paths import DEFAULT_WORK_DIR, KERNEL_WRITERS, inside_git_repository
from .writers import DEFAULT_MAX_SIZE, describe_flavour

SCRIPT_NAME = "python -m tools.corpus.extract_kernel_writers"


def extract(out: Path, *, work_dir: Path = DEFAULT_WORK_DIR, abi: str | None = None,
            flavour_names: Sequence[str] = (), max_size: int = DEFAULT_MAX_SIZE,
            update: bool = True) -> list[dict[str, Any]]:
    """Fetch the packages, describe every candidate, write `out`; return the
    per-flavour summaries. Raises `ExtractError` (or `UsageError` for an ELF
    file that cannot be read) with the step that failed."""
    flavours = [f for f in FLAVOURS if not flavour_names or f.name in flavour_names]
    work = work_dir.resolve()
    if inside_git_repository(work):
        raise ExtractError(f"--work-dir {work} is inside a git repository; kernel images "
                           "must not go into a repository")
    prepare_apt(not update, any(f.arch == "i386" for f in flavours))
    all_records: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    for packages in choose_abi(flavours, abi):
        files = fetch(packages, work)
        records, summary = describe_flavour(packages, files, max_size)
        all_records.extend(records)
        summaries.append(summary)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(all_records, indent=1) + "\n")
    print_summaries(summaries)
    print(f"wrote {len(all_records)} functions to {out}")
    return summaries


def print_summaries(summaries: Sequence[dict[str, Any]]) -> None:
    """For each flavour: packages, config, functions written, left out and inlined."""
    for s in summaries:
        print(f"{s['flavour']}: {s['package']} + {s['dbg_package']} {s['version']}; "
              f"x86_nops[5] = {s['nop5']}")
        print("  config: " + " ".join(f"{k.removeprefix('CONFIG_')}={v}"
                                      for k, v in s["config"].items()))
        print("  written: " + ", ".join(f"{n} ({sz} B)" for n, sz in s["functions"].items()))
        for name, why in s["skipped"].items():
            print(f"  left out: {name}: {why}")
        print(f"  not out of line (inlined or absent): {', '.join(s['absent'])}")


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The extraction's options (shared with ``build_corpus --from-debian``)."""
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                        help=f"scratch directory for .deb files and images "
                             f"(default {DEFAULT_WORK_DIR}); must be outside the repository")
    parser.add_argument("--abi", help="kernel ABI to use, e.g. 6.1.0-50 (default: the newest "
                        "one every flavour has image and -dbg packages for)")
    parser.add_argument("--flavour", action="append", choices=[f.name for f in FLAVOURS],
                        help="flavour(s) to extract (repeatable; default all three)")
    parser.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE,
                        help=f"skip functions larger than this many bytes "
                             f"(default {DEFAULT_MAX_SIZE})")
    parser.add_argument("--no-update", action="store_true",
                        help="do not run dpkg --add-architecture / apt-get update")


def run_extraction(args: argparse.Namespace, out: Path) -> int:
    """`extract` with parsed options; 0, or 1 after one ``error:`` line."""
    try:
        extract(out, work_dir=args.work_dir, abi=args.abi, flavour_names=args.flavour or (),
                max_size=args.max_size, update=not args.no_update)
    except (ExtractError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog=SCRIPT_NAME,
        description="Extract the out-of-line page-table writer functions of Debian's kernels "
                    "(amd64, 686-pae, 686) into a small JSON file. Needs root for apt and "
                    "network access to Debian's archive; ~2.6 GB of downloads.",
        epilog="Downloads and extracted images stay under --work-dir; only function bytes go "
               "into --out.")
    parser.add_argument("--out", type=Path, default=KERNEL_WRITERS,
                        help="JSON file to write (default: the package's copy, %(default)s)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_extraction(args, args.out)
