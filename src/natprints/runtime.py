"""Where and how stages compute: device, torch threads, quiet Hugging Face logging, loading a
causal LM from a directory, the job executor that fans a stage out over worker processes, and the
per-stage wall-time and memory record.

Each job runs with ``[run] threads`` torch threads in its own process, so its numbers do not depend
on how jobs are scheduled: two 1-thread workers give the same weights as one, only sooner. With
one worker, jobs run in this process and show their own progress bars.
"""

from __future__ import annotations

import multiprocessing
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from natprints.errors import NatprintsError

if TYPE_CHECKING:
    from natprints.config import Config


def resolve_device(setting: str) -> str:
    """``auto``: CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise NatprintsError("device = 'cuda' but no CUDA device is available")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def use_autocast(cfg: Config, device: str) -> bool:
    """bf16 autocast on CUDA; fp32 on CPU, where bf16 autocast measured far slower (see make bench)."""
    if cfg.run.train_dtype == "auto":
        return device == "cuda"
    return cfg.run.train_dtype == "bf16"


def quiet_transformers() -> None:
    """No per-file progress bars from transformers' save/load: the stages draw their own."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def setup_torch(cfg: Config) -> str:
    """Threads, quiet transformers and deterministic kernels for a stage; returns the device."""
    import torch

    quiet_transformers()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return resolve_device(cfg.run.device)


def load_lm(directory: Path | str, *, verify: bool = True, device: str = "cpu") -> Any:
    """A causal LM directory (a zoo model or any Hugging Face one) in fp32, for inference.

    With ``verify``, the weights are checked against the hashes of any manifest at or up to two
    levels above the directory first (a zoo model, its init, its checkpoints).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from natprints.lineage.models import inspect_model, model_digest

    info = inspect_model(directory)
    if verify:
        model_digest(info)
    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(info.path), dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unreadable or foreign dirs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights only" in first.lower() or "pickle" in first.lower():
            # never pass on a library's advice to load the file unsafely
            first = "its weights file is corrupt or holds pickled objects, which natprints does not load"
        raise NatprintsError(f"cannot load model at {info.path}: {first}") from None
    return model.to(device).eval()


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


@contextmanager
def stage_timer(cfg: Config, stage: str) -> Iterator[StageRun]:
    """Time the body; when it sets ``did_work``, record wall seconds and peak RSS for ``stage``."""
    from natprints.records import read_timings, write_timings

    run = StageRun()
    start = time.perf_counter()
    yield run
    if not run.did_work:
        return
    timings = read_timings(cfg.paths.reports)
    timings[stage] = {
        "wall_s": round(time.perf_counter() - start, 1),
        "peak_rss_mb": _peak_rss_mb(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "workers": cfg.run.workers,
        "threads": cfg.run.threads,
    }
    write_timings(cfg.paths.reports, timings)
