"""``build``: rebuild ptemu's fixture corpus (src/ptemu/corpus/, the repository's fixtures/).

Every trace but a handful is made by ``ptemu capture``: the code runs in
Unicorn with paging on, at its real addresses, and the fixture's expectations
are what the execution stored and the registers it left (docs/capture.md).
Four groups: the Debian kernels' page-table writers (`kernel_traces`, from
``src/ptemu/kvm/data/kernel_writers.json``), synthetic snippets
(`synthetic64`, `synthetic32`), hand-written refusals (`handwritten`) and
guests that edit the hierarchy their own CR3 roots (`own_hierarchy`, the
input of ``ptemu monitor``).
Every fixture carries the paging structures its capture ran under
(``include_page_tables``), so ``ptemu walk`` works on each of them.

The build is deterministic (fixed seeds, fixed order, stable JSON) and takes
a few seconds. ``--check`` builds in memory and lists what would change;
``--from-debian`` first extracts the kernel functions from Debian's packages
(`extract`: root, network, ~2.6 GB of downloads).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import corpus
from .extract import add_arguments, run_extraction
from .paths import CORPUS, KERNEL_WRITERS, ROOT

PROG = "python -m tools.corpus.build_corpus"


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: 0 when written (or up to date with --check)."""
    parser = argparse.ArgumentParser(prog=PROG, description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--kernel-writers", type=Path, default=KERNEL_WRITERS,
                        help="the extracted kernel functions (default: %(default)s)")
    parser.add_argument("--corpus", type=Path, default=CORPUS,
                        help="the corpus folder to write or check (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="build in memory and report files that would change; write nothing "
                             "(exit status 1 if any)")
    parser.add_argument("--from-debian", action="store_true",
                        help="first extract the kernel functions from Debian's packages into "
                             "--kernel-writers (needs root and network; see "
                             "tools/corpus/README.md)")
    group = parser.add_argument_group("extraction (with --from-debian)")
    add_arguments(group)
    args = parser.parse_args(argv)
    if args.from_debian:
        if args.check:
            parser.error("--from-debian writes the kernel functions: not with --check")
        status = run_extraction(args, args.kernel_writers)
        if status:
            return status
    rendered = corpus.render_all(corpus.all_traces(args.kernel_writers), args.corpus)
    if args.check:
        difference = corpus.compare(rendered, args.corpus)
        for path in difference.changed:
            print(f"would write {_shown(path)}")
        for path in difference.stale:
            print(f"would delete {_shown(path)}")
        if difference.empty:
            print(f"{_shown(args.corpus)} is up to date: "
                  f"{corpus.summary(rendered, args.corpus)}")
        return 0 if difference.empty else 1
    corpus.write(rendered, args.corpus)
    print(f"wrote {corpus.summary(rendered, args.corpus)} to {_shown(args.corpus)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
