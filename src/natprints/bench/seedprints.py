"""SeedPrints' Kendall tau: the per-column O(N log N) tau-b against the O(N^2) pair count it replaced.

Both compute Kendall's tau-b of every column of two N x k feature arrays, on the same random
features at the authors' scale (N = 2000 inputs, k = 128 kept dimensions), after a softmax over
the dimensions as SeedPrints applies it. The baseline is the previous implementation, copied here
unchanged: the sign of every pair's difference, N(N-1)/2 pairs per column. Each figure is the
median of ``reps`` round-robin repetitions; the first call of each (the equality check) warms up.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from natprints.bench.timing import interleaved
from natprints.lineage.seedprints import kendall_tau_columns

N_INPUTS = 2000
COLUMNS = 128
TOLERANCE = 1e-12
_TAU_CHUNK_ELEMENTS = 1 << 22  # bound on pairs x columns held at once by the baseline


def kendall_tau_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The O(N^2) baseline: tau-b from the signs of all pairs' differences (NaN if a column is constant)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n, cols = a.shape
    iu, ju = np.triu_indices(n, 1)
    out = np.full(cols, np.nan)
    if len(iu) == 0:
        return out
    chunk = max(1, _TAU_CHUNK_ELEMENTS // len(iu))
    for start in range(0, cols, chunk):
        sl = slice(start, start + chunk)
        da = np.sign(a[iu, sl] - a[ju, sl])
        db = np.sign(b[iu, sl] - b[ju, sl])
        numerator = (da * db).sum(axis=0)
        denominator = np.sqrt(np.count_nonzero(da, axis=0) * np.count_nonzero(db, axis=0).astype(np.float64))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[sl] = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)
    return out


def _features(n: int, cols: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two related random feature arrays, softmaxed over the columns at temperature 10."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(n, cols))
    out = []
    for _ in range(2):
        x = (shared + rng.normal(size=(n, cols))) / 10.0
        e = np.exp(x - x.max(axis=1, keepdims=True))
        out.append(e / e.sum(axis=1, keepdims=True))
    return out[0], out[1]


def bench_seedprints(reps: int = 3, *, n_inputs: int = N_INPUTS, columns: int = COLUMNS) -> dict[str, Any]:
    """Time the O(N log N) tau against the O(N^2) baseline at N x k; check they agree to 1e-12."""
    a, b = _features(n_inputs, columns, seed=0)
    ours, baseline = kendall_tau_columns(a, b), kendall_tau_pairs(a, b)
    diff = float(np.max(np.abs(ours - baseline)))
    timed = interleaved(
        {"ours": lambda: kendall_tau_columns(a, b), "baseline": lambda: kendall_tau_pairs(a, b)},
        reps=reps,
        warmup=0,  # the equality check above ran each once
    )
    ours_s, baseline_s = timed["ours"]["median_s"], timed["baseline"]["median_s"]
    return {
        "results": {
            "seedprints_tau_s": round(ours_s, 4),
            "seedprints_tau_baseline_s": round(baseline_s, 3),
            "seedprints_tau_speedup": round(baseline_s / ours_s, 1),
            "seedprints_tau_agree": bool(diff <= TOLERANCE),
            "seedprints_tau_max_diff": diff,
        },
        "notes": [
            f"Kendall tau-b of {columns} columns over N = {n_inputs} inputs (one SeedPrints pair at the "
            "authors' scale), median of reps after one untimed call each",
            "ours: scipy.stats.kendalltau along the columns, O(N log N) per column; baseline: the previous "
            "O(N^2) count over all pairs",
            f"agreement: max |tau difference| {diff:.1e} (tolerance {TOLERANCE:g})",
        ],
        "profile": [],
    }
