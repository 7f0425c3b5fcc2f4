"""Timing helpers shared by every bench section: medians after warm-up, profiler top entries."""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def measure(fn: Callable[[], Any], *, reps: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``reps`` times; the median and every run in seconds."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(runs), "runs_s": [round(r, 6) for r in runs]}


def interleaved(fns: dict[str, Callable[[], Any]], *, reps: int = 5, warmup: int = 1) -> dict[str, dict[str, Any]]:
    """Time several contenders round-robin (A B A B ...), so a slow patch on a shared machine hits both:
    :func:`rounds` with each contender one unit."""
    return rounds({name: [fn] for name, fn in fns.items()}, reps=reps, warmup=warmup)


def rounds(
    units: dict[str, Sequence[Callable[[], Any]]], *, reps: int = 5, warmup: int = 1
) -> dict[str, dict[str, Any]]:
    """Time contenders in fine turns. Each contender is a list of units (the parts of one job); a round
    runs unit j of every contender before unit j + 1 of any, and a contender's round time is the sum of
    its units' times: ``median_s`` and, one entry per round, ``runs_s``.

    On a shared machine whose speed drifts by ~10% over seconds, whole-job turns leave that drift in a
    ratio of medians; sub-second turns put every contender in the same patch, and the per-round ratio
    (:func:`paired_ratio`) compares them within a patch.
    """
    sizes = {len(parts) for parts in units.values()}
    if len(sizes) > 1:
        raise ValueError(f"rounds: every contender needs the same number of units, got {sorted(sizes)}")
    n_units = sizes.pop() if sizes else 0
    for parts in units.values():
        for _ in range(warmup):
            for unit in parts:
                unit()
    runs: dict[str, list[float]] = {name: [] for name in units}
    for _ in range(reps):
        spent = dict.fromkeys(units, 0.0)
        for j in range(n_units):
            for name, parts in units.items():
                t0 = time.perf_counter()
                parts[j]()
                spent[name] += time.perf_counter() - t0
        for name, seconds in spent.items():
            runs[name].append(seconds)
    return {name: {"median_s": statistics.median(r), "runs_s": [round(x, 6) for x in r]} for name, r in runs.items()}


def paired_ratio(timed: dict[str, dict[str, Any]], name: str, baseline: str) -> float:
    """``name``'s speed relative to ``baseline``: the median over rounds of time(baseline) / time(name)."""
    pairs = zip(timed[name]["runs_s"], timed[baseline]["runs_s"], strict=True)
    return statistics.median(base / own for own, base in pairs)


def python_profile(fn: Callable[[], Any], top: int = 8) -> list[str]:
    """cProfile's top entries by cumulative time, as plain lines for the bench notes."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    lines = [ln.rstrip() for ln in out.getvalue().splitlines()]
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    return [ln for ln in lines[start : start + top + 1] if ln.strip()]


def torch_profile(fn: Callable[[], Any], top: int = 8, shares: dict[str, float] | None = None) -> list[str]:
    """torch.profiler's top operators by self CPU time, as plain lines for the bench notes.

    When ``shares`` is given, it is filled with every operator's fraction of the total self CPU time.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    averages = prof.key_averages()
    if shares is not None:
        total = sum(e.self_cpu_time_total for e in averages) or 1.0
        shares.update({e.key: e.self_cpu_time_total / total for e in averages})
    table = averages.table(sort_by="self_cpu_time_total", row_limit=top)
    return [ln.rstrip() for ln in table.splitlines() if ln.strip() and not set(ln.strip()) <= {"-", " "}]
