"""Write the corpus: every trace rendered to its file, or compared with the files.

The corpus is ``src/ptemu/corpus/<paging>/<slug>.json``, one fixture per
trace, as `ptemu.capture.dump_fixture` writes it (stable JSON). Writing
deletes the folder's ``*.json`` first, so a trace dropped from the builder
disappears from the corpus; checking writes nothing and lists the differences.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ptemu.capture import dump_fixture

from .entries import SEED
from .guest import Trace, capture_description
from .handwritten import handwritten
from .kernel_traces import kernel_traces
from .own_hierarchy import own_hierarchy
from .synthetic32 import synthetic_legacy, synthetic_pae
from .synthetic64 import SYNTHETIC_5LEVEL, synthetic_64, synthetic_compat


def all_traces(kernel_writers: Path) -> list[Trace]:
    """Every trace of the corpus, in a fixed order with fixed seeds."""
    rng = random.Random(SEED)
    traces: list[Trace] = []
    traces += kernel_traces(kernel_writers)
    traces += synthetic_64("4level", random.Random(f"{SEED}-4level"))
    traces += [trace for trace in synthetic_64("5level", random.Random(f"{SEED}-5level"))
               if trace.name.split("/")[1] in SYNTHETIC_5LEVEL]
    traces += synthetic_compat(random.Random(f"{SEED}-compat"))
    traces += synthetic_pae(random.Random(f"{SEED}-pae"))
    traces += synthetic_legacy(random.Random(f"{SEED}-legacy"))
    traces += handwritten(rng)
    # Last, drawing from no generator: the traces above keep their values.
    traces += own_hierarchy()
    return traces


def render(trace: Trace) -> str:
    """The fixture text of one trace (captured now unless it is hand-written)."""
    fixture = trace.fixture
    if fixture is None:
        assert trace.description is not None
        fixture = capture_description(trace.description)
        if trace.finish is not None:
            fixture = trace.finish(fixture)
    return dump_fixture(fixture)


def fixture_path(corpus: Path, name: str) -> Path:
    """``<corpus>/<paging>/<slug>.json`` for a trace called ``<paging>/<slug>``."""
    if not re.fullmatch(r"(legacy|pae|4level|5level)/[A-Za-z0-9_.+-]+", name):
        raise SystemExit(f"build_corpus: trace name {name!r} is not '<paging>/<slug>'")
    return corpus / f"{name}.json"


def render_all(traces: Iterable[Trace], corpus: Path) -> dict[Path, str]:
    """Path -> text of every trace; refuses two traces with one name."""
    traces = list(traces)
    names = [trace.name for trace in traces]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SystemExit(f"build_corpus: duplicate trace names: {', '.join(duplicates)}")
    return {fixture_path(corpus, trace.name): render(trace) for trace in traces}


@dataclass(frozen=True)
class Difference:
    """Files a write would change (new or different) and files it would delete."""

    changed: tuple[Path, ...]
    stale: tuple[Path, ...]

    @property
    def empty(self) -> bool:
        return not self.changed and not self.stale


def compare(rendered: Mapping[Path, str], corpus: Path) -> Difference:
    """How the files under `corpus` differ from `rendered`."""
    existing = set(corpus.rglob("*.json"))
    changed = sorted(p for p, text in rendered.items()
                     if not p.exists() or p.read_text(encoding="utf-8") != text)
    stale = sorted(existing - set(rendered))
    return Difference(tuple(changed), tuple(stale))


def write(rendered: Mapping[Path, str], corpus: Path) -> None:
    """Replace the corpus's fixtures with `rendered`."""
    for old in corpus.rglob("*.json"):
        old.unlink()
    for path, text in rendered.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def summary(rendered: Mapping[Path, str], corpus: Path) -> str:
    """One line: traces, events and traces per paging mode."""
    events = sum(text.count('"expect"') for text in rendered.values())
    by_mode: dict[str, int] = {}
    for path in rendered:
        mode = path.relative_to(corpus).parts[0]
        by_mode[mode] = by_mode.get(mode, 0) + 1
    modes = ", ".join(f"{mode} {count}" for mode, count in sorted(by_mode.items()))
    size = sum(len(text.encode("utf-8")) for text in rendered.values())
    return f"{len(rendered)} traces ({events} events, {size / 1024:.0f} KiB): {modes}"
