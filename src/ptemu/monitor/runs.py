"""Run algebra: build maximal affine runs, clip them, and diff two run lists.

Runs here are plain ``(start, end, state)`` tuples over one address space's
flat linear addresses (4-/5-level addresses truncated to the linear-address
width, so the space is one interval); `ptemu.monitor.translation.Run` is
their public, canonical form. A subtree's translation is built by appending
runs in address order; `append_run` merges a run into the previous one when it
continues it affinely with the same attributes and page size, so a large page
or a whole unmapped subtree stays one run.
"""

from __future__ import annotations

from bisect import bisect_right

from ptemu.monitor.translation import Translation, TranslationState

RawRun = tuple[int, int, TranslationState]
"""``(start, end, state)`` on flat linear addresses."""


def continues(previous: RawRun, state: TranslationState) -> bool:
    """Whether `state`, starting where `previous` ends, extends it as one run."""
    start, end, before = previous
    if before is None or state is None:
        return before is None and state is None
    if isinstance(before, Translation) and isinstance(state, Translation):
        return (state.page_size == before.page_size
                and state.frame == before.frame + (end - start)
                and state.attributes() == before.attributes())
    return before == state


def append_run(runs: list[RawRun], start: int, end: int, state: TranslationState) -> None:
    """Append ``[start, end)`` to `runs` (address order), merging with the last run."""
    if runs:
        last = runs[-1]
        if last[1] == start and continues(last, state):
            runs[-1] = (last[0], end, last[2])
            return
    runs.append((start, end, state))


def same_at(a: RawRun, b: RawRun, gla: int) -> bool:
    """Whether runs `a` and `b` translate the page at `gla` identically (page size aside)."""
    first, second = a[2], b[2]
    if isinstance(first, Translation) and isinstance(second, Translation):
        return (first.frame + (gla - a[0]) == second.frame + (gla - b[0])
                and first.attributes() == second.attributes())
    return first == second


def clip(runs: list[RawRun], start: int, end: int) -> list[RawRun]:
    """The part of `runs` inside ``[start, end)``, frames shifted where a run is cut."""
    out: list[RawRun] = []
    for run_start, run_end, state in runs:
        low, high = max(run_start, start), min(run_end, end)
        if low >= high:
            continue
        if isinstance(state, Translation):
            state = state.shifted(low - run_start)
        out.append((low, high, state))
    return out


Difference = tuple[int, int, list[RawRun], list[RawRun]]
"""A changed range ``[start, end)`` with its old and its new runs."""


def diff(old: list[RawRun], new: list[RawRun]) -> list[Difference]:
    """Maximal contiguous ranges where `old` and `new` translate differently.

    Both lists must cover the same addresses (in order, gaps allowed); a gap
    separates changes. Each difference carries both sides clipped to it.
    """
    changed: list[tuple[int, int]] = []
    i = j = 0
    while i < len(old) and j < len(new):
        a, b = old[i], new[j]
        low, high = max(a[0], b[0]), min(a[1], b[1])
        if low < high and not same_at(a, b, low):
            if changed and changed[-1][1] == low:
                changed[-1] = (changed[-1][0], high)
            else:
                changed.append((low, high))
        if a[1] <= b[1]:
            i += 1
        if b[1] <= a[1]:
            j += 1
    old_parts = _clip_each(old, changed)
    new_parts = _clip_each(new, changed)
    return [(s, e, o, n) for (s, e), o, n in zip(changed, old_parts, new_parts, strict=True)]


def _clip_each(runs: list[RawRun], ranges: list[tuple[int, int]]) -> list[list[RawRun]]:
    """`clip` of `runs` to each of the sorted, disjoint `ranges`, in one pass."""
    out: list[list[RawRun]] = []
    i = 0
    for start, end in ranges:
        while i < len(runs) and runs[i][1] <= start:
            i += 1
        k = i
        part: list[RawRun] = []
        while k < len(runs) and runs[k][0] < end:
            run_start, run_end, state = runs[k]
            low, high = max(run_start, start), min(run_end, end)
            if isinstance(state, Translation):
                state = state.shifted(low - run_start)
            part.append((low, high, state))
            k += 1
        out.append(part)
    return out


def intersect(intervals: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """The parts of sorted, disjoint `intervals` inside ``[start, end)``."""
    out = []
    # Intervals are sorted and disjoint, so their ends are sorted too.
    first = bisect_right(intervals, start, key=_end)
    for low, high in intervals[first:]:
        if low >= end:
            break
        out.append((max(low, start), min(high, end)))
    return out


def overlaps(intervals: list[tuple[int, int]], start: int, end: int) -> bool:
    """Whether any of sorted, disjoint `intervals` meets ``[start, end)``."""
    first = bisect_right(intervals, start, key=_end)
    return first < len(intervals) and intervals[first][0] < end


def _end(interval: tuple[int, int]) -> int:
    return interval[1]


def union(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint, merged form of `intervals` (empty ones dropped)."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(i for i in intervals if i[0] < i[1]):
        if merged and low <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged
