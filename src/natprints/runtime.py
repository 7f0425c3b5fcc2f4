"""Where and how stages compute: device, torch threads, quiet Hugging Face logging, loading a
causal LM from a directory, the job executor that fans a stage out over worker processes or Ray
tasks, the per-run lock, and the per-stage wall-time and memory record.

Each job runs with ``[run] threads`` torch threads in its own process, so its numbers do not depend
on how jobs are scheduled: two 1-thread workers give the same weights as one, only sooner, and Ray
tasks the same as local workers. With one local worker, jobs run in this process and show their own
progress bars. No executor leaves a worker behind when its parent is killed, kill -9 included.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import multiprocessing
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from natprints.errors import NatprintsError, first_line

if TYPE_CHECKING:
    from natprints.config import Config, RunSettings


def resolve_device(setting: str) -> str:
    """``auto``: CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise NatprintsError("device = 'cuda' but no CUDA device is available")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


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

    from natprints.modeldir import inspect_model, model_digest

    info = inspect_model(directory)
    if verify:
        model_digest(info)
    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(info.path), dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unreadable or foreign dirs
        first = first_line(exc)
        if "weights only" in first.lower() or "pickle" in first.lower():
            # never pass on a library's advice to load the file unsafely
            first = "its weights file is corrupt or holds pickled objects, which natprints does not load"
        raise NatprintsError(f"cannot load model at {info.path}: {first}") from None
    return model.to(device).eval()


class Job(NamedTuple):
    """One unit of a stage's work: its name (in the progress lines and in errors) and ``fn``'s arguments."""

    name: str
    args: tuple


def run_jobs(run: RunSettings | int, fn: Callable[..., Any], jobs: Sequence[Job], label: str) -> list[Any]:
    """``[fn(*job.args) for job in jobs]`` on the run's executor; results in job order.

    ``run`` is the run's ``[run]`` settings, or (as the stages pass it) its worker count, in which case
    the settings come from the :class:`~natprints.config.Config` every stage passes as its jobs' first
    argument. ``executor = "local"``: ``workers`` processes of this machine, or this process when one
    worker or one job is left; ``"ray"``: one Ray task per job (see :func:`ray_session`). Either way a
    line per finished job gives done/total and an ETA, and a killed parent leaves no worker behind.
    """
    settings = _run_settings(run, jobs)
    workers = run if isinstance(run, int) else settings.worker_count() if settings else 1
    if not jobs:
        return []
    progress = JobProgress(label, len(jobs))
    if settings is not None and settings.executor == "ray":
        return _run_ray(settings, fn, jobs, progress)
    if workers <= 1 or len(jobs) <= 1:
        results = []
        for i, job in enumerate(jobs, 1):
            print(f"[{label} {i}/{len(jobs)}] {job.name}", flush=True)
            results.append(fn(*job.args, progress=True))
            progress.finished(job.name)
        return results
    return _run_local(workers, fn, jobs, progress)


def _run_settings(run: RunSettings | int, jobs: Sequence[Job]) -> RunSettings | None:
    from natprints.config import Config, RunSettings

    if isinstance(run, RunSettings):
        return run
    first = jobs[0].args[0] if jobs and jobs[0].args else None
    return first.run if isinstance(first, Config) else None


class JobProgress:
    """One line per finished job: ``[label done/total, elapsed, ETA] job``."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self.start = time.perf_counter()

    def finished(self, name: object) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        print(
            f"[{self.label} {self.done}/{self.total} done, {_duration(elapsed)} elapsed, ETA {_duration(eta)}] {name}",
            flush=True,
        )


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


# -- the local executor: worker processes that die with their parent ---------------------------------

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _worker_init(parent: int) -> None:
    """Runs first in every local worker: die with the parent, even on its kill -9, and leave Ctrl-C to
    the parent (which stops the workers itself)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Workers draw no progress bars, so tqdm needs no lock shared between processes: its default one
    # is a named semaphore that a killed worker leaves behind, and that multiprocessing then reports
    # as leaked below the line saying how to resume.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the kernel kills us when the parent dies
        except (OSError, AttributeError):
            pass  # the watchdog below still ends us
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="natprints-parent-watchdog", daemon=True).start()


def _watch_parent(parent: int, every: float = 1.0) -> None:
    """The fallback where no death signal exists: exit once this process has been re-parented."""
    while True:
        time.sleep(every)
        if os.getppid() != parent:
            os._exit(1)


# This process's local workers. Inside `shared_workers()` (a stage, under `stage_timer`) they are kept
# from one `run_jobs` call to the next: a stage that fans out several kinds of job (`reference`:
# fine-tunes, scores, heads, encoders) starts its workers once, not once per kind (each start imports
# torch and the rest anew, about 3 s a worker). Elsewhere each call's workers end with it. Spawned on
# demand, up to the worker count; discarded when a job fails or Ctrl-C stops them.
_local_pool: dict[int, ProcessPoolExecutor] = {}
_sharing = 0  # how many `shared_workers()` blocks are open


@contextmanager
def shared_workers() -> Iterator[None]:
    """Within the block, `run_jobs` calls share this process's local workers; they end with it."""
    global _sharing
    _sharing += 1
    try:
        yield
    finally:
        _sharing -= 1
        if not _sharing:
            close_local_workers()


def _pool(workers: int) -> ProcessPoolExecutor:
    pool = _local_pool.get(workers)
    if pool is None or getattr(pool, "_broken", False) or getattr(pool, "_shutdown_thread", False):
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch thread pools
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),))
        _local_pool[workers] = pool
    return pool


def close_local_workers() -> None:
    """End this process's local workers (they end with it anyway)."""
    for pool in _local_pool.values():
        pool.shutdown(wait=True)
    _local_pool.clear()


def _run_local(workers: int, fn: Callable[..., Any], jobs: Sequence[Job], progress: JobProgress) -> list[Any]:
    from concurrent.futures.process import BrokenProcessPool

    results: list[Any] = [None] * len(jobs)
    pool = _pool(workers)
    try:
        futures = {pool.submit(fn, *job.args, progress=False): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            i = futures[future]
            try:
                results[i] = future.result()
            except BrokenProcessPool:
                raise NatprintsError(
                    f"a {progress.label} worker process died (killed, or out of memory?) during {jobs[i].name}; "
                    "rerun the command to resume"
                ) from None
            progress.finished(jobs[i].name)
    except BaseException:  # an error or Ctrl-C: stop the other jobs now rather than let them run on
        _local_pool.pop(workers, None)
        _kill_pool(pool)
        raise
    if not _sharing:
        _local_pool.pop(workers, None)
        pool.shutdown(wait=True)
    return results


def _kill_pool(pool: ProcessPoolExecutor) -> None:
    """Kill the pool's workers, drop its queued jobs, and wait for its manager thread to wind up."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    manager = getattr(pool, "_executor_manager_thread", None)
    for process in processes:
        with suppress(OSError, ValueError):
            process.kill()
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with suppress(OSError, ValueError, AssertionError):
            process.join(timeout=5)
    if manager is not None:
        manager.join(timeout=10)


# -- the Ray executor ------------------------------------------------------------------------------

REAPER_TOKEN = "NATPRINTS_RAY_REAPER_TOKEN"  # marks every process of a local Ray instance we started
_ray_state: dict[str, Any] = {}


def ray_session(run: RunSettings) -> Any:
    """This process's Ray connection, made on first use and kept until exit (Ray shuts it down).

    ``ray_address`` empty: start a local instance with ``workers * threads`` CPUs, and a reaper process
    that kills every process of it once this process is gone, kill -9 included. ``"auto"`` or
    ``ray://host:port``: join that cluster (a job's tasks die with their driver there). Then check that
    every node sees the run's root (:func:`check_shared_storage`).
    """
    try:
        import ray
    except ImportError:
        raise NatprintsError("executor = 'ray' needs Ray: pip install 'natprints[ray]'") from None
    if ray.is_initialized():
        return ray
    from natprints.config import HOME_VARIABLE, home

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline: no usage report
    root = home().resolve()
    env = {HOME_VARIABLE: str(root)}
    env.update({k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ})
    options: dict[str, Any] = {
        "runtime_env": {"env_vars": env},
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": True,
    }
    start = time.perf_counter()
    try:
        if run.ray_address:
            ray.init(address=run.ray_address, **options)
            how = f"joined the Ray cluster at {run.ray_address}"
        else:
            token = secrets.token_hex(16)
            _ray_state["reaper"] = _start_reaper(token)
            os.environ[REAPER_TOKEN] = token  # inherited by the instance's processes, and theirs
            try:
                # "local": a new instance even when RAY_ADDRESS or the last `ray start` on this machine
                # (its address file outlives it) names another cluster, which ray.init() would join
                ray.init(address="local", num_cpus=run.worker_count() * max(run.threads, 1), **options)
            finally:
                os.environ.pop(REAPER_TOKEN, None)
            how = "started a local Ray instance"
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError, ... with long texts
        first = first_line(exc)
        where = f"join the Ray cluster at {run.ray_address!r}" if run.ray_address else "start a local Ray instance"
        hint = ""
        if run.ray_address and not os.environ.get("RAY_AUTH_MODE"):
            hint = " (a cluster `ray start` made since Ray 2.59 wants its token: set RAY_AUTH_MODE=token)"
        raise NatprintsError(f"cannot {where}: {first}{hint}") from None
    nodes = _job_nodes(ray)
    check_shared_storage(root, lambda probe, args: _on_every_node(ray, nodes, probe, args))
    resources = ray.cluster_resources()
    print(
        f"ray: {how} ({len(nodes)} node(s), {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs) "
        f"and checked that every node sees {root}, in {time.perf_counter() - start:.1f}s",
        flush=True,
    )
    return ray


_FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "HF_HOME")


def _job_nodes(ray: Any) -> list[dict]:
    """The live nodes that can run a job (those with CPUs or GPUs)."""
    return [
        n
        for n in ray.nodes()
        if n.get("Alive") and (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)
    ]


def _on_every_node(ray: Any, nodes: list[dict], fn: Callable[..., Any], args: tuple) -> list[Any]:
    """``fn(*args)`` once on each node, pinned there; the results in node order."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(fn)
    refs = [
        remote.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            n["NodeManagerAddress"], *args
        )
        for n in nodes
    ]
    return ray.get(refs)


def storage_probe(node: str, directory: str, token: str) -> tuple[str, str | None]:
    """Run on a node: read the driver's probe file, write this node's. Returns (node, what it read)."""
    probe = Path(directory)
    try:
        seen = (probe / "driver").read_text(encoding="utf-8")
    except OSError:
        seen = None
    with suppress(OSError):
        (probe / f"node-{node}").write_text(token, encoding="utf-8")
    return node, seen


def check_shared_storage(root: Path, on_every_node: Callable[[Callable[..., Any], tuple], list[Any]]) -> None:
    """Refuse to start when some node does not see the run's root: each node reads a file the driver
    wrote under it, and the driver reads a file each node wrote."""
    token = secrets.token_hex(8)
    probe = root / f".natprints-storage-probe-{token}"
    probe.mkdir(parents=True, exist_ok=True)
    try:
        (probe / "driver").write_text(token, encoding="utf-8")
        for node, seen in on_every_node(storage_probe, (str(probe), token)):
            back = probe / f"node-{node}"
            if seen != token or not back.is_file() or back.read_text(encoding="utf-8") != token:
                raise NatprintsError(
                    f"Ray node {node} does not see the run root {root} (a probe file written there by one side "
                    f"was not read by the other): put {root} on storage every node mounts at the same path, "
                    "or set NATPRINTS_HOME to such a directory"
                )
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _start_reaper(token: str) -> subprocess.Popen:
    """A small process that outlives this one and kills every process of the Ray instance once this one
    is gone: its standard input closes when this process exits, however."""
    code = "import sys; from natprints.runtime import reap; reap(sys.argv[1])"
    return subprocess.Popen(
        [sys.executable, "-c", code, token],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # neither Ctrl-C at the terminal nor a kill of our group reaches it
    )


def reap(token: str, *, within: float = 20.0, every: float = 2.0) -> None:
    """The reaper's body: while the parent lives, note its descendants and the token's processes every
    ``every`` seconds; once it has exited, SIGKILL those and their descendants until none is left.

    The token alone does not find them all: Ray's agents rename themselves (setproctitle), which can
    overwrite the environment that ``/proc/<pid>/environ`` shows, so a process is also known by its
    ancestry, noted while the parent was alive (a pid with its start time, so a reused pid is spared).
    """
    import select

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent, stdin = os.getppid(), sys.stdin.fileno()
    known: dict[int, int] = {}  # pid -> start time (clock ticks after boot)
    while True:
        known.update(_instance_processes(token, parent, known))
        ready, _, _ = select.select([stdin], [], [], every)
        if ready and not os.read(stdin, 65536):  # end of file: the parent has exited
            break
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        victims = _instance_processes(token, None, known)  # the parent's pid may be anyone's now
        if not victims:
            return
        known.update(victims)
        for pid in victims:
            with suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _process_table() -> dict[int, tuple[int, int]]:
    """Live processes (Linux /proc, zombies left out): pid -> (parent pid, start time)."""
    table = {}
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = path.read_text().rsplit(")", 1)[1].split()  # after the command name: state, ppid, ...
        except (OSError, IndexError):
            continue
        if fields[0] not in ("Z", "X"):
            table[int(path.parent.name)] = (int(fields[1]), int(fields[19]))
    return table


def _instance_processes(token: str, parent: int | None, known: dict[int, int]) -> dict[int, int]:
    """pid -> start time of the live processes of the instance: those carrying ``token`` in their
    environment, the ``known`` ones still running (same start time), and the descendants of all of
    them and of ``parent`` (when given: it is still alive); this process excluded."""
    table = _process_table()
    found = {pid: table[pid][1] for pid in _pids_with_env(REAPER_TOKEN, token) if pid in table}
    found.update({pid: start for pid, start in known.items() if pid in table and table[pid][1] == start})
    roots = set(found) | ({parent} if parent is not None else set())
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found[child] = table[child][1]
                stack.append(child)
    found.pop(os.getpid(), None)
    if parent is not None:
        found.pop(parent, None)  # the parent ends on its own; its pid is soon free for anyone
    return found


def _pids_with_env(name: str, value: str) -> list[int]:
    """Processes (Linux /proc) whose environment holds ``name=value``."""
    entry = f"{name}={value}".encode()
    pids = []
    for path in Path("/proc").glob("[0-9]*/environ"):
        try:
            if entry in path.read_bytes().split(b"\0"):
                pids.append(int(path.parent.name))
        except (OSError, ValueError):
            continue
    return pids


def _ray_call(fn: Callable[..., Any], args: tuple) -> Any:
    return fn(*args, progress=False)


def _run_ray(run: RunSettings, fn: Callable[..., Any], jobs: Sequence[Job], progress: JobProgress) -> list[Any]:
    """One Ray task per job, ``num_cpus = threads`` each (and one GPU when the jobs run on CUDA)."""
    ray = ray_session(run)
    from ray.exceptions import RayTaskError

    progress.start = time.perf_counter()  # the ETA counts from the first task, not from Ray's start-up

    gpus = run.device == "cuda" or (run.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)
    task = ray.remote(_ray_call).options(num_cpus=max(run.threads, 1), num_gpus=int(gpus), max_retries=0)
    refs = {task.remote(fn, job.args): i for i, job in enumerate(jobs)}
    results: list[Any] = [None] * len(jobs)
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            i = refs[ready[0]]
            try:
                results[i] = ray.get(ready[0])
            except RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                raise cause from (None if isinstance(cause, NatprintsError) else exc)
            except ray.exceptions.RayError as exc:  # a worker or node died: killed, out of memory, lost
                first = first_line(exc)
                raise NatprintsError(
                    f"Ray lost the {progress.label} job {jobs[i].name} ({first}); rerun the command to resume"
                ) from None
            progress.finished(jobs[i].name)
    except BaseException:
        for ref in pending:
            with suppress(Exception):
                ray.cancel(ref, force=True)
        raise
    return results


BUSY_LOCK = ".lock"  # models/<run>/.lock: held (flock) by the one process writing the run


@contextmanager
def exclusive_run(cfg: Config, *, wait: bool = False) -> Iterator[None]:
    """Hold the run's lock for the body: one writing process per run. Another holder is an error
    naming its pid ("run NAME is busy (pid N)"), or, with ``wait``, something to wait for. The kernel
    drops the lock when its holder exits, kill -9 included, so a stale lock file means nothing."""
    path = cfg.paths.models / BUSY_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # not inherited by children (PEP 446)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy = f"run {cfg.run.name} is busy (pid {_lock_holder(fd)})"
            if not wait:
                raise NatprintsError(f"{busy}; wait for it to finish, or rerun with --wait") from None
            print(f"{busy}; waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _lock_holder(fd: int, patience: float = 1.0) -> str:
    """The pid the lock's holder wrote (it writes right after taking the lock: allow it a moment)."""
    deadline = time.monotonic() + patience
    while True:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit() or time.monotonic() > deadline:
            return text or "unknown"
        time.sleep(0.05)


@dataclass
class StageRun:
    did_work: bool = False
    current: bool = True


@dataclass(frozen=True)
class StageResult:
    """What every stage's ``run`` returns: whether it did work (a stage whose outputs were current did
    none, and its recorded time stays), and the lines that say what it did."""

    did_work: bool
    lines: tuple[str, ...]
    current: bool = True  # False: the stage is off in this config, or stopped short; its outputs are not current


@contextmanager
def output_changed(path: Path) -> Iterator[Callable[[], bool]]:
    """Yields a function telling, once the body is done, whether it (re)wrote ``path``."""

    def stamp() -> int | None:
        return path.stat().st_mtime_ns if path.is_file() else None

    before = stamp()
    yield lambda: stamp() != before


def _peak_rss_mb() -> float:
    """Peak resident memory of this process and of its finished worker processes (Linux: KiB; the
    stage's local workers are ended before this is read)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, workers) / 1024, 1)


@contextmanager
def stage_timer(cfg: Config, stage: str) -> Iterator[StageRun]:
    """Time the body; when it sets ``did_work``, record wall seconds and peak RSS for ``stage``. A stage
    found up to date under another config than the one it last ran under (a setting it does not read
    changed) keeps its time and revision, and records the config it is now current under."""
    from natprints.records import read_timings, write_timings

    run = StageRun()
    start = time.perf_counter()
    with shared_workers():  # the stage's workers end with it, so their peak memory is counted below
        yield run
    if not run.did_work:
        if not run.current:
            return
        timings = read_timings(cfg.paths.reports)
        if stage in timings and timings[stage].get("config_hash") not in (None, cfg.hash()):
            timings[stage]["config_hash"] = cfg.hash()
            write_timings(cfg.paths.reports, timings)
        return
    from natprints.artifacts import git_revision

    revision = git_revision()
    timings = read_timings(cfg.paths.reports)
    timings[stage] = {
        "wall_s": round(time.perf_counter() - start, 1),
        # which code and config made the stage's output: a report says where it came from
        "git_revision": revision.removesuffix("+dirty"),
        "tree_clean": None if revision == "unknown" else not revision.endswith("+dirty"),
        "config_hash": cfg.hash(),
        "peak_rss_mb": _peak_rss_mb(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "workers": cfg.run.worker_count(),
        "threads": cfg.run.threads,
        "executor": cfg.run.executor,  # under Ray, peak RSS covers this process and its local workers only
    }
    write_timings(cfg.paths.reports, timings)
