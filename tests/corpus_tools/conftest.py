"""The corpus tools live in tools/corpus/ptemu_corpus, outside the installed
package: make them importable as ``ptemu_corpus``, as their scripts do."""

from __future__ import annotations

import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools" / "corpus"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))
