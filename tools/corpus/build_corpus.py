#!/usr/bin/env python3
"""Rebuild ptemu's fixture corpus (src/ptemu/corpus/): the ``build`` command of
the corpus tools (tools/corpus/ptemu_corpus/build.py).

Run from the repository root::

    python -m tools.corpus.build_corpus            # rebuild (a few seconds)
    python -m tools.corpus.build_corpus --check    # rebuild in memory, diff with the files
    sudo python -m tools.corpus.build_corpus --from-debian   # extract from Debian first

``python tools/corpus/build_corpus.py`` works too.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _path in (_HERE.parents[1] / "src", _HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from ptemu_corpus.build import main

if __name__ == "__main__":
    sys.exit(main())
