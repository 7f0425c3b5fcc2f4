"""Run a stage's independent jobs (one per model) in worker processes, ``[run] workers`` at a time.

Each job runs with ``[run] threads`` torch threads in its own process, so its numbers do not depend
on how jobs are scheduled: two 1-thread workers give the same weights as one, only sooner. With
one worker, jobs run in this process and show their own progress bars.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any


def run_jobs(workers: int, fn: Callable[..., Any], jobs: Sequence[tuple], label: str) -> list[Any]:
    """``[fn(*job) for job in jobs]``, in ``workers`` processes when more than one; results in order."""
    if workers <= 1 or len(jobs) <= 1:
        results = []
        for i, job in enumerate(jobs, 1):
            print(f"[{label} {i}/{len(jobs)}] {job[1]}", flush=True)
            results.append(fn(*job, progress=True))
        return results
    results: list[Any] = [None] * len(jobs)
    start = time.time()
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch thread pools
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(fn, *job, progress=False): i for i, job in enumerate(jobs)}
        for done, future in enumerate(as_completed(futures), 1):
            i = futures[future]
            results[i] = future.result()
            print(f"[{label} {done}/{len(jobs)} done after {time.time() - start:.0f}s] {jobs[i][1]}", flush=True)
    return results
