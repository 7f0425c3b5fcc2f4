from pathlib import Path

import pytest

from natprints.config import Config, check_run_lock, load_config
from natprints.errors import NatprintsError
from tests.conftest import SMOKE, run_cli


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_and_smoke_load():
    cfg = load_config(SMOKE)
    assert cfg.run.name == "smoke"
    assert cfg.train.size == "xs" and cfg.conditions.seed == [1, 2]
    assert load_config("configs/default.toml").run.name == "default"


def test_workers_auto_is_the_default_and_fills_the_cores(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    run = Config.model_validate({"run": {"name": "x", "threads": 1}}).run
    assert run.workers == "auto" and run.worker_count() == 16
    assert Config.model_validate({"run": {"name": "x", "threads": 4}}).run.worker_count() == 4
    assert Config.model_validate({"run": {"name": "x", "threads": 32}}).run.worker_count() == 1
    assert Config.model_validate({"run": {"name": "x"}}).run.worker_count() == 1  # threads 0: torch takes every core
    assert Config.model_validate({"run": {"name": "x", "threads": 1, "workers": 3}}).run.worker_count() == 3
    assert load_config("configs/default.toml").run.workers == "auto"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[run]\nname = "x"\n[train]\nstepz = 3\n', "unknown key 'train.stepz'"),
        ('[run]\nname = "x"\n[trian]\nsteps = 3\n', "unknown key 'trian'"),
        ('[run]\nname = "x"\n[train]\nsteps = "many"\n', "'train.steps'"),
        ('[run]\nname = "x"\n[train]\nsteps = "40"\n', "'train.steps': Input should be a valid integer"),
        ('[run]\nname = "x"\n[train]\nsteps = true\n', "'train.steps': Input should be a valid integer"),
        ('[run]\nname = "x"\n[likelihood]\npool_sizes = [0]\n', "'likelihood.pool_sizes"),
        ('[run]\nname = "x"\n[reference]\nepochs = 0\n', "'reference.epochs'"),
        ('[run]\nname = "x"\n[corpus]\nsource = "gutenberg"\n', "'corpus.source'"),
        ('[run]\nname = "x"\n[conditions]\nsize = ["huge"]\n', "unknown size preset 'huge'"),
        ("[train]\nsteps = 3\n", "missing key 'run'"),
        ('[run]\nname = "x"\n[generate]\nseed = 1\nnull_seed = 1\n', "null_seed must differ"),
        ('[run]\nname = "x"\nworkers = 0\n', "'run.workers"),
        ('[run]\nname = "x"\nworkers = "all"\n', "'run.workers"),
    ],
)
def test_bad_config_is_one_line_naming_key_and_file(tmp_path, body, message):
    path = write(tmp_path, body)
    with pytest.raises(NatprintsError) as err:
        load_config(path)
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text


def test_cli_bad_config_exits_nonzero_without_traceback(tmp_path):
    path = write(tmp_path, '[run]\nname = "x"\n[train]\nstepz = 3\n')
    proc = run_cli("data", "--config", str(path), home=tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {path}: unknown key 'train.stepz'"
    assert "Traceback" not in proc.stderr


def test_run_name_reused_with_changed_config_is_refused(fresh_home):
    cfg = Config.model_validate({"run": {"name": "r"}})
    check_run_lock(cfg, "a.toml")
    check_run_lock(cfg, "a.toml")  # same config: fine
    changed = Config.model_validate({"run": {"name": "r"}, "train": {"steps": 7}})
    with pytest.raises(
        NatprintsError, match=r"run 'r' already exists with a different config \(changed: train.steps\)"
    ):
        check_run_lock(changed, "b.toml")
    assert (fresh_home / "models" / "r" / "run.json").is_file()  # the old run is left as it was


def test_missing_stage_says_which_command_to_run(tmp_path):
    proc = run_cli("zoo", "--config", str(SMOKE), home=tmp_path, check=False)
    assert proc.returncode == 1
    assert "run `natprints data` first" in proc.stderr
    proc = run_cli("generate", "--config", str(SMOKE), home=tmp_path, check=False)
    assert "run `natprints zoo` first" in proc.stderr
