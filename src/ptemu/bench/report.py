"""Assemble and print `ptemu bench`'s figures."""

from __future__ import annotations

from collections import Counter
from typing import IO, Any

from ptemu.bench.measure import (
    HandlerRunner,
    decode_cache_scaling,
    measure,
    naive_runner,
    pending_state_scaling,
)
from ptemu.bench.monitor_bench import render_monitor, run_monitor_benchmark
from ptemu.bench.workload import corpus_events, kernel_mix

PENDING_SIZES = (1, 1_000, 1_000_000)
DECODE_CACHE_SIZES = (1, 4_095)


def run_benchmark(*, events: int, rounds: int, naive_events: int, scaling: bool,
                  progress: IO[str] | None = None, monitor: bool = True) -> dict[str, Any]:
    """Measure every engine on the same kernel-like mix; a JSON-able report.

    With `monitor`, also the translation monitor's figures (`monitor_bench`):
    leaf writes with a whole 4-level space of 102,400 pages watched against the
    handler alone, and upper-level replaces against their subtree's size.
    """
    def say(text: str) -> None:
        if progress is not None:
            print(text, file=progress, flush=True)

    say("loading corpus events...")
    pool = corpus_events()
    mix = kernel_mix(pool, events)
    say(f"{len(mix)} events; measuring the handler's engines...")
    fast = measure({"unicorn": HandlerRunner("unicorn"), "auto": HandlerRunner("auto")},
                   mix, rounds)
    say("measuring the naive pipeline...")
    naive_mix = kernel_mix(pool, naive_events, seed=1)
    # The naive pipeline interleaved with the Unicorn handler on its own sample,
    # so the two are compared under the same machine load.
    slow = measure({"naive": naive_runner(), "unicorn-same-sample": HandlerRunner("unicorn")},
                   naive_mix, rounds, warmup=5)
    figures = {f.name: f for f in (*fast, *slow)}
    baseline = figures["naive"].events_per_second
    engines = []
    for name in ("naive", "unicorn", "auto"):
        figure = figures[name]
        engines.append({"engine": name, "events": figure.events,
                        "events_per_second": round(figure.events_per_second),
                        "median_us": round(figure.median_us, 2),
                        "p99_us": round(figure.p99_us, 2),
                        "ratio_to_naive": round(figure.events_per_second / baseline, 1)})
    same = figures["unicorn-same-sample"]
    report: dict[str, Any] = {
        "mix": dict(Counter(event.family for event in mix)),
        "paging_modes": dict(Counter(event.paging for event in mix)),
        "engines": engines,
        "unicorn_vs_naive_same_sample": round(same.events_per_second / baseline, 1),
    }
    if scaling:
        probe = [event for event in mix if event.family == "mov"][:500] or mix[:500]
        say("scaling with pending write state...")
        report["pending_state_scaling"] = [
            {"pending_entries": size, "median_us": round(us, 2)}
            for size, us in pending_state_scaling("auto", PENDING_SIZES, probe)]
        say("scaling with the decode cache...")
        report["decode_cache_scaling"] = [
            {"cached_instructions": size, "median_us": round(us, 2)}
            for size, us in decode_cache_scaling("auto", DECODE_CACHE_SIZES, probe)]
    if monitor:
        say("measuring the translation monitor...")
        report["monitor"] = run_monitor_benchmark(rounds=rounds)
    return report


def render_text(report: dict[str, Any]) -> str:
    """The human table."""
    lines = ["engine    events/s   median us   p99 us   x naive"]
    for row in report["engines"]:
        lines.append(f"{row['engine']:<8} {row['events_per_second']:>9} {row['median_us']:>11} "
                     f"{row['p99_us']:>8} {row['ratio_to_naive']:>9}")
    lines.append(f"mix: {_counts(report['mix'])}")
    lines.append(f"paging modes: {_counts(report['paging_modes'])}")
    if "pending_state_scaling" in report:
        lines.append("event cost with pending entries: " + ", ".join(
            f"{row['pending_entries']}: {row['median_us']} us"
            for row in report["pending_state_scaling"]))
        lines.append("event cost with cached instructions: " + ", ".join(
            f"{row['cached_instructions']}: {row['median_us']} us"
            for row in report["decode_cache_scaling"]))
    if "monitor" in report:
        lines.extend(render_monitor(report["monitor"]))
    machine = report.get("machine")
    if machine:
        lines.append(f"machine: {machine['processor']}, {machine['platform']}, "
                     f"Python {machine['python']}")
    return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items(),
                                                                 key=lambda item: -item[1]))
