#!/usr/bin/env python3
"""Extract the instruction bytes of Linux's out-of-line page-table writers from
Debian's kernel packages: the ``extract`` command of the corpus tools
(tools/corpus/ptemu_corpus/extract.py; see tools/corpus/README.md).

Run from the repository root (root, network, ~2.6 GB of downloads)::

    sudo python -m tools.corpus.extract_kernel_writers    # -> src/ptemu/kvm/data/kernel_writers.json

``python tools/corpus/extract_kernel_writers.py`` works too.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _path in (_HERE.parents[1] / "src", _HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from ptemu_corpus.extract import main

if __name__ == "__main__":
    sys.exit(main())
