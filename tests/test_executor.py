"""The job executors and one run at a time: the executor keys, Ray against the local executor (byte
for byte), the shared-storage check, the per-run lock, Ctrl-C's resume line, no worker left after a
kill -9 of the parent under either executor, and the paper-scale config."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from natprints.config import check_run_lock, load_config
from natprints.errors import NatprintsError
from natprints.runtime import check_shared_storage, exclusive_run, storage_probe
from tests.conftest import ROOT, SMOKE, copy_stage, run_cli

PAPER = ROOT / "configs" / "paper.toml"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _smoke_variant(path: Path, run_extra: str = "", **replace: str) -> Path:
    """The smoke config with keys added to [run] and ``old=new`` line replacements."""
    text = SMOKE.read_text().replace("[run]\n", f"[run]\n{run_extra}", 1)
    for old, new in replace.items():
        assert f"\n{old}\n" in text, old
        text = text.replace(f"\n{old}\n", f"\n{new}\n", 1)
    path.write_text(text)
    return path


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("run", "message"),
    [
        ('threads = 1\nexecutor = "dask"\n', r"'run\.executor': Input should be 'local' or 'ray'"),
        ('threads = 1\nexecutor = "ray"\nray_address = "x"\n', r"'run\.ray_address': must be '' \(a local Ray"),
        ('threads = 1\nray_address = "auto"\n', r"'run': ray_address is only used with executor = 'ray'"),
        ('threads = 0\nexecutor = "ray"\n', r"'run': executor = 'ray' needs threads >= 1"),
    ],
)
def test_executor_keys_are_validated(tmp_path, run, message):
    path = tmp_path / "bad.toml"
    path.write_text(f"[run]\nname = 't'\n{run}")
    with pytest.raises(NatprintsError, match=message):
        load_config(path)


@pytest.mark.parametrize("address", ["", "auto", "ray://head.example:10001", "10.0.0.5:6379"])
def test_ray_addresses_accepted(tmp_path, address):
    path = tmp_path / "ok.toml"
    path.write_text(f"[run]\nname = 't'\nthreads = 2\nexecutor = 'ray'\nray_address = '{address}'\n")
    assert load_config(path).run.ray_address == address


def test_executor_does_not_lock_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("NATPRINTS_HOME", str(tmp_path))
    path = tmp_path / "run.toml"
    path.write_text("[run]\nname = 't'\nthreads = 1\n")
    check_run_lock(load_config(path), path)
    path.write_text("[run]\nname = 't'\nthreads = 1\nexecutor = 'ray'\nray_address = 'auto'\n")
    check_run_lock(load_config(path), path)  # where the jobs run changes no result
    path.write_text("[run]\nname = 't'\nthreads = 2\nexecutor = 'ray'\n")
    with pytest.raises(NatprintsError, match=r"changed: run\.threads"):
        check_run_lock(load_config(path), path)


# --- the local workers ----------------------------------------------------------------------------


def _worker_pid(_: int, progress: bool) -> int:
    return os.getpid()


def test_a_stages_job_kinds_share_its_workers_which_end_with_the_stage(tmp_path, monkeypatch):
    """Two `run_jobs` calls of one stage run on the same two worker processes (started once: each
    start imports torch anew); the stage's end stops them, so its peak memory counts them. Outside a
    stage (a library call), a call's workers end with it."""
    import multiprocessing

    from natprints.runtime import Job, run_jobs, stage_timer

    monkeypatch.setenv("NATPRINTS_HOME", str(tmp_path))
    cfg = load_config(SMOKE)
    jobs = [Job(str(i), (i,)) for i in range(6)]
    with stage_timer(cfg, "zoo") as timer:
        first = run_jobs(2, _worker_pid, jobs, "first")
        second = run_jobs(2, _worker_pid, jobs[:3], "second")
        assert len(set(first)) <= 2 and set(second) <= set(first) and os.getpid() not in first
        assert {p.pid for p in multiprocessing.active_children()} >= set(first)
        timer.did_work = True
    assert not set(first) & {p.pid for p in multiprocessing.active_children()}
    alone = run_jobs(2, _worker_pid, jobs, "alone")
    assert os.getpid() not in alone and not set(alone) & {p.pid for p in multiprocessing.active_children()}
    assert json.loads((cfg.paths.reports / "timings.json").read_text())["zoo"]["peak_rss_mb"] > 0


# --- the paper-scale config -------------------------------------------------------------------------


def test_paper_config_validates_and_its_models_build():
    import torch
    from transformers import LlamaForCausalLM

    from natprints.zoo.spec import condition_members, zoo_specs
    from natprints.zoo.train import llama_config

    cfg = load_config(PAPER)
    assert (cfg.run.executor, cfg.run.device, cfg.run.train_dtype) == ("ray", "auto", "auto")
    specs = {model_id: spec for model_id, (spec, _) in zoo_specs(cfg).items()}
    assert len({s.init_seed for s in specs.values()}) >= 4
    assert len({s.data_seed for s in specs.values()}) >= 2
    assert len({s.size for s in specs.values()}) == 2
    assert len({s.lr for s in specs.values()}) == 2
    assert set(condition_members(cfg)) >= {"seed", "init", "data_order", "size", "lr", "all"}
    base = cfg.sizes[cfg.train.size]
    assert (base.num_layers, base.hidden_size) == (12, 768)
    params = {}
    for spec in specs.values():
        config = llama_config(cfg.sizes[spec.size], cfg.tokenizer.vocab_size, spec.seq_len, 0)
        with torch.device("meta"):  # the architecture, without allocating or initializing weights
            model = LlamaForCausalLM(config)
        assert model.config.num_hidden_layers == cfg.sizes[spec.size].num_layers
        params[spec.size] = sum(p.numel() for p in model.parameters())
    # 12 x (4 x 768^2 + 3 x 768 x 2048) + 2 x 32000 x 768 + norms: the SeedPrints toy scale
    assert 130e6 < params["toy-768"] < 140e6 and params["toy-512"] < params["toy-768"]


# --- the shared-storage check ---------------------------------------------------------------------


def test_shared_storage_check(tmp_path):
    root = tmp_path / "shared"

    def same_disk(probe, args):  # every node mounts the run root: the check passes and cleans up
        return [probe(node, *args) for node in ("10.0.0.1", "10.0.0.2")]

    check_shared_storage(root, same_disk)
    assert list(root.iterdir()) == []

    def one_local_disk(probe, args):  # node 10.0.0.2 has its own disk at the same path
        directory, token = args
        local = tmp_path / "node-local" / Path(directory).name
        local.mkdir(parents=True)
        return [probe("10.0.0.1", directory, token), storage_probe("10.0.0.2", str(local), token)]

    with pytest.raises(NatprintsError, match=r"^Ray node 10\.0\.0\.2 does not see the run root .*shared"):
        check_shared_storage(root, one_local_disk)


# --- one run at a time, Ctrl-C, kill -9 -----------------------------------------------------------


def test_busy_run_is_refused_and_waited_for(tmp_path, monkeypatch):
    monkeypatch.setenv("NATPRINTS_HOME", str(tmp_path))
    cfg = load_config(SMOKE)
    with exclusive_run(cfg):
        proc = run_cli("zoo", "--config", str(SMOKE), home=tmp_path, check=False)
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines() == [
            f"error: run smoke is busy (pid {os.getpid()}); wait for it to finish, or rerun with --wait"
        ]
        waiting = _start_cli(tmp_path, "clean", "--config", str(SMOKE), "--wait", "--yes")
        _wait_for(lambda: "waiting for it" in waiting.stderr_text(), 30, "the waiting line")
        assert waiting.poll() is None  # still waiting while the lock is held
    assert waiting.wait(timeout=60) == 0  # and it ran once the lock was released
    assert f"removed {tmp_path / 'models' / 'smoke'}" in waiting.stdout_text()


class _Cli(subprocess.Popen):
    """`natprints ARGS` in the background, in a session of its own, with its output in files."""

    def stderr_text(self) -> str:
        return Path(self.err_path).read_text()

    def stdout_text(self) -> str:
        return Path(self.out_path).read_text()


def _start_cli(home: Path, *args: str) -> _Cli:
    env = {**os.environ, "NATPRINTS_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out, err = home / f".cli-{time.monotonic_ns()}.out", home / f".cli-{time.monotonic_ns()}.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = _Cli(
            [sys.executable, "-c", "from natprints.cli import main; main()", *args],
            cwd=ROOT,
            env=env,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,  # its session id is its pid: every process it starts can be found
            # as from a terminal: Ctrl-C is live even when this test runs with SIGINT ignored (a
            # background job of a non-interactive shell), which the child would inherit
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    proc.out_path, proc.err_path = out, err
    return proc


def _session(sid: int) -> dict[int, str]:
    """Live (non-zombie) processes of session ``sid``: pid -> command line."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state, ppid, pgrp, session, ...
            found[int(stat.parent.name)] = cmdline.strip()
    return found


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        time.sleep(0.2)


WORKER_MARK = {"local": "multiprocessing.spawn import spawn_main", "ray": "ray::_ray_call"}


@pytest.fixture
def long_zoo(tmp_path, smoke_data_home) -> tuple[Path, Path]:
    """A scratch home with the smoke corpus and a smoke config whose models train for long."""
    copy_stage(smoke_data_home, tmp_path, "data", "corpus", "smoke")
    config = _smoke_variant(
        tmp_path / "long.toml", **{"steps = 40": "steps = 5000", "resume_every = 10": "resume_every = 1000"}
    )
    return tmp_path, config


def _start_training(home: Path, config: Path, executor: str) -> _Cli:
    """`natprints zoo` with two workers, returned once both train (their models' inits are on disk)."""
    proc = _start_cli(home, "zoo", "--config", str(config))
    zoo = home / "models" / "smoke" / "zoo"

    def training() -> bool:
        assert proc.poll() is None, proc.stderr_text()
        workers = [c for c in _session(proc.pid).values() if WORKER_MARK[executor] in c]
        return len(workers) >= 2 and len(list(zoo.glob("*/init/model.safetensors"))) >= 2

    _wait_for(training, 180, f"two {executor} workers training")
    return proc


@linux_only
@pytest.mark.process_faults
def test_ctrl_c_prints_the_resume_line_and_stops_the_workers(long_zoo):
    home, config = long_zoo
    proc = _start_training(home, config, "local")
    second = run_cli("generate", "--config", str(config), home=home, check=False)
    assert second.returncode == 1
    assert f"error: run smoke is busy (pid {proc.pid})" in second.stderr
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=180) == 130  # generous: shared CPUs
    assert proc.stderr_text().strip().splitlines()[-1] == (
        f"interrupted; rerun `natprints zoo --config {config}` to resume"
    )
    _wait_for(lambda: not _session(proc.pid), 15, "the workers to exit")


@linux_only
@pytest.mark.process_faults
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_kill_9_of_the_parent_leaves_no_worker(long_zoo, executor, monkeypatch):
    """Under Ray too: the dashboard and runtime-env agents rename themselves, which can hide the
    reaper's token in their environment; the reaper also knows them by their ancestry."""
    home, config = long_zoo
    if executor == "ray":
        text = config.read_text().replace("[run]\n", '[run]\nexecutor = "ray"\n', 1)
        config.write_text(text)
        # ray_address = "" starts an instance of its own, never the cluster the environment names
        monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    started = time.time()
    proc = _start_training(home, config, executor)
    before = _session(proc.pid)
    assert sum(WORKER_MARK[executor] in c for c in before.values()) >= 2
    proc.kill()
    proc.wait(timeout=10)
    _wait_for(lambda: not _session(proc.pid), 20, f"every process of the killed run to exit: {_session(proc.pid)}")
    if executor == "ray":  # the reaper that cleaned up (a session of its own) is gone as well
        _wait_for(lambda: not _reapers_since(started), 20, "the reaper to exit")


def _reapers_since(t0: float) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline", "create_time", "status"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        recent = p.info["create_time"] >= t0 - 1
        if "natprints.runtime import reap" in cmdline and recent and p.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(p.pid)
    return out


# --- results do not depend on the run's name, its worker count or its executor ----------------------


def _weights(home: Path, run: str) -> dict[str, str]:
    zoo = home / "models" / run / "zoo"
    return {str(p.relative_to(zoo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in zoo.rglob("*.safetensors")}


def test_another_run_name_and_one_worker_train_the_same_weights_and_texts(tmp_path, smoke_home):
    """The smoke run trains with two workers; the same config under another run name with one worker
    (jobs in the parent process) trains byte-identical weights, inits and checkpoints, and samples the
    same texts: nothing but the config and the kind of CPU decides a number. Three of the smoke run's
    models, of two families (a model's weights depend on its own spec only)."""
    import pandas as pd

    families = next(line for line in SMOKE.read_text().splitlines() if line.startswith("arch = "))
    replace = {
        'name = "smoke"': 'name = "again"',
        "workers = 2": "workers = 1",
        "seed = [1, 2]": "seed = [1]",
        "init = [1]": "init = []",
        families: 'arch = ["gpt2"]',
    }
    config = _smoke_variant(tmp_path / "again.toml", **replace)
    for stage in ("data", "zoo", "generate"):
        run_cli(stage, "--config", str(config), home=tmp_path)
    mine, smoke = _weights(tmp_path, "again"), _weights(smoke_home, "smoke")
    assert len(mine) == 3 * 4  # three models: final weights, init and two checkpoints each
    assert mine == {name: smoke[name] for name in mine}
    generated = sorted((tmp_path / "data" / "generated" / "again").glob("*.parquet"))
    assert len(generated) == 3  # one file per model (the null control is in null/)
    for path in generated:
        theirs = smoke_home / "data" / "generated" / "smoke" / path.name
        pd.testing.assert_frame_equal(pd.read_parquet(path), pd.read_parquet(theirs))


# --- Ray against the local executor ---------------------------------------------------------------


# Files that record when, where or how fast a run went (or the config file's path), not what it made.
VOLATILE_FILES = {".lock", "run.json", "timings.json", "zoo.md", "index.md"}
VOLATILE_KEYS = {
    "seconds",
    "wall_s",
    "wall_seconds",
    "features_s",
    "train_seconds",
    "tokens_per_second",
    "git_revision",
    "config_hash",
    "created_at",
    "finished_at",
    "machine",
    "package_versions",
}


def _stable(value: object) -> object:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _artifact_digests(home: Path) -> dict[str, object]:
    """Every artifact of the smoke run under ``home`` (models, data, reports): the sha256 of its bytes;
    for a manifest, the file hashes it records and its key; for other JSON, its content with the home
    directory and the keys of :data:`VOLATILE_KEYS` left out."""
    out: dict[str, object] = {}
    roots = [home / "models" / "smoke", home / "reports" / "smoke", home / "data" / "cache"]
    roots += sorted(d / "smoke" for d in (home / "data").iterdir() if d.name not in ("corpus", "cache"))
    for root in roots:
        for path in sorted(root.rglob("*")):
            if not path.is_file() or path.name in VOLATILE_FILES:
                continue
            value: object
            if path.name == "manifest.json" or path.name.endswith(".manifest.json"):
                manifest = json.loads(path.read_text())
                value = {"files": manifest["files"], "key": manifest.get("key")}
            elif path.suffix in (".json", ".jsonl"):
                text = path.read_text().replace(str(home), "<home>")
                lines = text.splitlines() if path.suffix == ".jsonl" else [text]
                value = [_stable(json.loads(line)) for line in lines]
            else:
                value = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(home))] = value
    return out


@contextmanager
def _ray_head(log: Path, cpus: int) -> Iterator[str]:
    """A Ray cluster of one node, as `ray start --head` makes it (its output in ``log``): yields its
    GCS address once it is up, then kills every process of it."""
    import psutil

    with socket.socket() as probe:  # a free port for the GCS
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--num-cpus={cpus}"]
    command += [f"--port={port}", "--include-dashboard=false", "--disable-usage-stats"]
    with log.open("w") as out:
        head = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    found = None
    try:
        deadline = time.monotonic() + 120
        while not (found := re.search(r"ray start --address='([^']+)'", log.read_text())):
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield found.group(1)
    finally:
        with suppress(psutil.NoSuchProcess):
            processes = [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
            for process in processes:
                with suppress(psutil.NoSuchProcess):
                    process.kill()
            psutil.wait_procs(processes, timeout=30)
        # `ray start` records its address for a later ray.init() on this machine: forget a dead cluster
        latest = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")
        with suppress(OSError):
            if found and latest.read_text().strip() == found.group(1):
                latest.unlink()


# One stage of each kind of job on Ray: training, sampling, scoring, embedding and fitting conditions.
# derive and reference train and score with the same jobs; lineage and report run no jobs.
RAY_STAGES = ("zoo", "generate", "likelihood", "experiments")


def test_ray_executor_writes_the_local_executors_artifacts(tmp_path, smoke_home, monkeypatch):
    """The smoke pipeline's stages of every job kind on a Ray cluster they join by address (one head
    started for the test, as `ray start` makes it): every artifact they write equals the local
    executor's, byte for byte (JSON records up to their timings and provenance). The reference stage's
    output, which `experiments` reads, is the local run's. The local instance a run starts itself is in
    the kill -9 test."""
    copy_stage(smoke_home, tmp_path, "data", "corpus", "smoke")
    copied = [("models", "smoke", "reference"), ("data", "reference", "smoke")]
    for parts in copied:
        copy_stage(smoke_home, tmp_path, *parts)
    # `ray start` enables token authentication (Ray >= 2.59) and wants a token it finds, not one it makes:
    # the test's own (as Ray generates them), so no token left in ~/.ray by an earlier run is needed
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    with _ray_head(tmp_path / "ray-head.log", cpus=2) as address:
        config = _smoke_variant(tmp_path / "smoke-ray.toml", run_extra=f'executor = "ray"\nray_address = "{address}"\n')
        for stage in RAY_STAGES:
            proc = run_cli(stage, "--config", str(config), home=tmp_path)
            assert f"ray: joined the Ray cluster at {address} (1 node(s), 2 CPUs," in proc.stdout, stage
    copied_prefixes = tuple(str(Path(*parts)) + "/" for parts in copied)
    ray = {k: v for k, v in _artifact_digests(tmp_path).items() if not k.startswith(copied_prefixes)}
    local = _artifact_digests(smoke_home)
    kinds = {str(Path(k).parent) for k in ray}
    assert kinds >= {"models/smoke/attributors/seed", "reports/smoke", "data/generated/smoke", "data/likelihood/smoke"}
    assert any(k.startswith("models/smoke/zoo/") for k in ray) and any(k.startswith("data/cache/") for k in ray)
    assert len(ray) > 80 and set(ray) <= set(local)
    assert [k for k in ray if ray[k] != local[k]] == []


def test_a_stage_up_to_date_under_a_new_config_records_that_config(fresh_home):
    """A setting one stage reads changes the run's config hash; the stages it does not touch stay up to
    date and keep their time and revision, now under the new hash (a committed report then says which
    config all its stages are current under). A stage that is off says nothing."""
    from natprints.config import load_config
    from natprints.records import read_timings, write_timings
    from natprints.runtime import stage_timer

    cfg = load_config(ROOT / "configs" / "smoke.toml")
    old = {"wall_s": 12.5, "git_revision": "abc", "tree_clean": True, "config_hash": "0" * 64}
    cfg.paths.reports.mkdir(parents=True)
    write_timings(cfg.paths.reports, {"zoo": dict(old), "reference": dict(old)})
    with stage_timer(cfg, "zoo") as timer:
        timer.did_work = False
    with stage_timer(cfg, "reference") as timer:
        timer.did_work, timer.current = False, False
    timings = read_timings(cfg.paths.reports)
    assert timings["zoo"] == old | {"config_hash": cfg.hash()}
    assert timings["reference"] == old
