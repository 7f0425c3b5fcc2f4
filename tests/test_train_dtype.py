"""`train_dtype = "auto"` on a CPU: bf16 autocast only when a measured step is clearly faster, once per run."""

from __future__ import annotations

import json

import pytest

from natprints import runtime
from natprints.config import Config, load_config
from tests.conftest import SMOKE


def _cfg(**run) -> Config:
    return Config.model_validate({"run": {"name": "dtype", **run}})


def test_auto_takes_bf16_only_from_the_threshold_and_keeps_its_choice(fresh_home, monkeypatch):
    cfg = _cfg()
    monkeypatch.setattr(runtime, "_measure_train_step", lambda cfg: {"fp32": 1.0, "bf16": 0.85})
    assert runtime.use_autocast(cfg, "cpu") is False  # 1.18x is below 1.25x
    path = cfg.paths.models / "train_dtype.json"
    recorded = json.loads(path.read_text())
    assert recorded["train_dtype"] == "fp32" and recorded["bf16_speedup"] == pytest.approx(1 / 0.85, abs=1e-3)
    assert recorded["min_speedup"] == runtime.BF16_MIN_SPEEDUP == 1.25 and "cpu_capability" in recorded["machine"]
    monkeypatch.setattr(runtime, "_measure_train_step", lambda cfg: {"fp32": 1.0, "bf16": 0.5})
    assert runtime.use_autocast(cfg, "cpu") is False  # decided once per run: resumes and workers agree
    path.unlink()
    assert runtime.use_autocast(cfg, "cpu") is True  # 2x
    assert json.loads(path.read_text())["train_dtype"] == "bf16-autocast"


def test_explicit_dtype_and_cuda_need_no_measurement(fresh_home, monkeypatch):
    def refuse(cfg):
        raise AssertionError("measured")

    monkeypatch.setattr(runtime, "_measure_train_step", refuse)
    assert runtime.use_autocast(_cfg(train_dtype="fp32"), "cpu") is False
    assert runtime.use_autocast(_cfg(train_dtype="bf16"), "cpu") is True
    assert runtime.use_autocast(_cfg(), "cuda") is True
    assert not (fresh_home / "models").exists()


def test_the_measurement_times_both_dtypes_of_the_base_model(fresh_home):
    seconds = runtime._measure_train_step(load_config(SMOKE), reps=1)
    assert set(seconds) == {"fp32", "bf16"} and all(0 < s < 60 for s in seconds.values())


def test_every_smoke_model_records_the_runs_choice(smoke_home):
    choice = json.loads((smoke_home / "models" / "smoke" / "train_dtype.json").read_text())
    for manifest in (smoke_home / "models" / "smoke" / "zoo").glob("*/manifest.json"):
        fields = json.loads(manifest.read_text())
        assert fields["train_dtype_choice"] == choice and fields["train_dtype"] == choice["train_dtype"]
