"""`train_dtype = "auto"`: fp32 on a CPU, bf16 autocast on CUDA, never chosen by a timing."""

from __future__ import annotations

import json

from natprints import runtime
from natprints.config import Config
from natprints.zoo.stage import use_autocast


def _cfg(**run) -> Config:
    return Config.model_validate({"run": {"name": "dtype", **run}})


def test_auto_is_fp32_on_a_cpu_and_bf16_on_cuda(fresh_home):
    assert use_autocast(_cfg(), "cpu") is False
    assert use_autocast(_cfg(), "cuda") is True
    assert not (fresh_home / "models").exists()  # nothing measured, nothing written


def test_explicit_dtype_wins_on_either_device():
    assert use_autocast(_cfg(train_dtype="fp32"), "cpu") is False
    assert use_autocast(_cfg(train_dtype="fp32"), "cuda") is False
    assert use_autocast(_cfg(train_dtype="bf16"), "cpu") is True


def test_no_timing_can_choose_numerics():
    assert not hasattr(runtime, "train_dtype_choice") and not hasattr(runtime, "_measure_train_step")


def test_every_smoke_model_records_dtype_and_cpu_kind(smoke_home):
    manifests = sorted((smoke_home / "models" / "smoke" / "zoo").glob("*/manifest.json"))
    assert manifests
    for manifest in manifests:
        fields = json.loads(manifest.read_text())
        assert fields["train_dtype"] == "fp32" and "train_dtype_choice" not in fields
        assert fields["machine"]["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX")
    assert not (smoke_home / "models" / "smoke" / "train_dtype.json").exists()
