"""Per-stage wall time and peak memory, kept in ``reports/<run>/timings.json``.

A stage's entry is replaced only when the stage did work, so a rerun that finds its outputs up to
date does not overwrite the measurement of the run that made them.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from natprints.artifacts import atomic_write_json
from natprints.config import Config

TIMINGS = "timings.json"
STAGE_ORDER = ("data", "zoo", "generate", "derive", "lineage", "experiments", "report")


@dataclass
class StageRun:
    did_work: bool = False


@contextmanager
def output_changed(path: Path) -> Iterator[Callable[[], bool]]:
    """Yields a function telling, once the body is done, whether it (re)wrote ``path``."""

    def stamp() -> int | None:
        return path.stat().st_mtime_ns if path.is_file() else None

    before = stamp()
    yield lambda: stamp() != before


def _peak_rss_mb() -> float:
    """Peak resident memory of this process and of its finished worker processes (Linux: KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, workers) / 1024, 1)


def read_timings(cfg: Config) -> dict:
    path = cfg.paths.reports / TIMINGS
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@contextmanager
def stage_timer(cfg: Config, stage: str) -> Iterator[StageRun]:
    """Time the body; when it sets ``did_work``, record wall seconds and peak RSS for ``stage``."""
    run = StageRun()
    start = time.perf_counter()
    yield run
    if not run.did_work:
        return
    timings = read_timings(cfg)
    timings[stage] = {
        "wall_s": round(time.perf_counter() - start, 1),
        "peak_rss_mb": _peak_rss_mb(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "workers": cfg.run.workers,
        "threads": cfg.run.threads,
    }
    atomic_write_json(cfg.paths.reports / TIMINGS, timings)


def render_timings(cfg: Config) -> str:
    timings = read_timings(cfg)
    if not timings:
        return ""
    lines = [
        "## Stage timings",
        "",
        "Wall time and peak resident memory of the last invocation of each stage that did work "
        "(`reports/<run>/timings.json`).",
        "",
        "| stage | wall time (min) | peak RSS (MB) | workers × threads |",
        "|---|---:|---:|---|",
    ]
    total = 0.0
    for stage in [s for s in STAGE_ORDER if s in timings]:
        t = timings[stage]
        total += t["wall_s"]
        lines.append(
            f"| {stage} | {t['wall_s'] / 60:.1f} | {t['peak_rss_mb']:,.0f} | {t['workers']} × {t['threads']} |"
        )
    lines.append(f"| **total** | **{total / 60:.1f}** | | |")
    return "\n".join(lines) + "\n"
