"""SeedPrints: the statistic against scipy, detection on tiny Llama models, the cache, input errors."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau, norm
from transformers import LlamaConfig, LlamaForCausalLM

from natprints.artifacts import Manifest
from natprints.config import LineageSettings
from natprints.errors import NatprintsError
from natprints.lineage import seedprints as sp
from natprints.lineage.models import inspect_model, model_digest

VOCAB = 300


def new_model(seed: int, hidden: int = 64, layers: int = 2) -> LlamaForCausalLM:
    """A tiny untrained Llama from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def tiny_model(path: Path, seed: int, steps: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A tiny Llama from ``torch.manual_seed(seed)``, optionally trained a few AdamW steps."""
    model = new_model(seed, hidden, layers)
    if steps:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(1000 + seed)
        for _ in range(steps):
            batch = torch.randint(0, VOCAB, (8, 32), generator=generator)
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "init0": tiny_model(root / "init0", 0),
        "init1": tiny_model(root / "init1", 1),
        "init2": tiny_model(root / "init2", 2),
        "trained0": tiny_model(root / "trained0", 0, steps=30),
        "trained1": tiny_model(root / "trained1", 1, steps=30),
        "wide": tiny_model(root / "wide", 0, hidden=96),
    }


def direct_test(a: np.ndarray, b: np.ndarray, k: int, temperature: float) -> tuple[int, float, float]:
    """The method as described, one dimension at a time with scipy: (|S|, z, log10 p)."""
    kept = sorted(set(np.argsort(a.mean(0))[:k]) & set(np.argsort(b.mean(0))[:k]))
    sa = np.exp(a[:, kept] / temperature)
    sa /= sa.sum(1, keepdims=True)
    sb = np.exp(b[:, kept] / temperature)
    sb /= sb.sum(1, keepdims=True)
    taus = [kendalltau(sa[:, j], sb[:, j]).statistic for j in range(len(kept))]
    n = len(a)
    sd = math.sqrt(2 * (2 * n + 5) / (9 * n * (n - 1)))
    z = float(np.mean(taus)) * math.sqrt(len(kept)) / sd
    return len(kept), z, math.log10(norm.sf(z))


def test_kendall_tau_matches_scipy_with_and_without_ties():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(25, 7))
    b = a + rng.normal(scale=1.5, size=a.shape)
    ours = sp.kendall_tau_columns(a, b)
    ties_a, ties_b = rng.integers(0, 4, size=(25, 5)), rng.integers(0, 3, size=(25, 5))
    ours_ties = sp.kendall_tau_columns(ties_a, ties_b)
    for j in range(a.shape[1]):
        assert ours[j] == pytest.approx(kendalltau(a[:, j], b[:, j]).statistic, abs=1e-12)
    for j in range(ties_a.shape[1]):
        assert ours_ties[j] == pytest.approx(kendalltau(ties_a[:, j], ties_b[:, j]).statistic, abs=1e-12)
    assert np.isnan(sp.kendall_tau_columns(np.ones((5, 1)), rng.normal(size=(5, 1))))[0]


def test_z_statistic_matches_direct_scipy_computation():
    rng = np.random.default_rng(1)
    shared = rng.normal(size=(40, 12))
    a = shared + 0.8 * rng.normal(size=shared.shape)
    b = shared + 0.8 * rng.normal(size=shared.shape)
    a[:, :5] -= 3.0  # a common "disliked" block so that the intersection is not empty
    b[:, :5] -= 3.0
    result = sp.seedprints_test(a, b, k=6, temperature=10.0)
    kept, z, log10_p = direct_test(a, b, k=6, temperature=10.0)
    assert result.kept == kept >= 2
    assert result.z == pytest.approx(z, rel=1e-10)
    assert result.log10_p == pytest.approx(log10_p, rel=1e-9)
    assert result.same_lineage == (log10_p < -2)


def test_temperature_reaches_the_statistic():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(30, 10))
    b = a + rng.normal(size=a.shape)
    at_10 = sp.seedprints_test(a, b, k=10, temperature=10.0)
    at_01 = sp.seedprints_test(a, b, k=10, temperature=0.1)
    assert at_10.z == pytest.approx(direct_test(a, b, 10, 10.0)[1])
    assert at_01.z == pytest.approx(direct_test(a, b, 10, 0.1)[1])
    assert at_10.z != pytest.approx(at_01.z)


def test_extreme_evidence_does_not_underflow():
    features = np.random.default_rng(3).normal(size=(128, 64))
    result = sp.seedprints_test(features, features, k=16)
    assert result.tau_bar == pytest.approx(1.0)
    assert result.kept == 16
    assert math.isfinite(result.log10_p) and result.log10_p < -300  # p itself underflows to 0.0
    assert result.log10_p == pytest.approx(norm.logsf(result.z) / math.log(10))


def test_disjoint_disliked_sets_give_no_evidence():
    a = np.zeros((20, 8)) + np.random.default_rng(4).normal(scale=0.01, size=(20, 8))
    b = a.copy()
    a[:, :4] -= 5.0
    b[:, 4:] -= 5.0
    result = sp.seedprints_test(a, b, k=4)
    assert result.kept == 0
    assert result.log10_p == 0.0 and result.p == 1.0
    assert not result.same_lineage
    assert result.to_dict()["z"] is None


def test_random_inputs_are_seeded_and_within_vocab():
    x = sp.random_inputs(VOCAB, 16, 32, seed=5)
    assert x.shape == (16, 32)
    assert int(x.min()) >= 0 and int(x.max()) < VOCAB
    assert torch.equal(x, sp.random_inputs(VOCAB, 16, 32, seed=5))
    assert not torch.equal(x, sp.random_inputs(VOCAB, 16, 32, seed=6))


def test_same_seed_detected_different_seed_not(models):
    def log10_p(a: str, b: str) -> float:
        return sp.seedprints_compare(models[a], models[b], device="cpu").log10_p

    assert log10_p("init0", "init0") < -100
    assert log10_p("init0", "trained0") < -2
    assert log10_p("init1", "trained1") < -2
    for a, b in [("init0", "init1"), ("init0", "init2"), ("init1", "init2"), ("trained0", "trained1")]:
        assert log10_p(a, b) > -2, (a, b)
    assert log10_p("init0", "trained1") > -2


def test_features_are_cached_per_model(models, tmp_path, monkeypatch):
    settings = LineageSettings(seedprints_inputs=16, seedprints_seq_len=8)
    first = sp.model_features(models["init0"], settings, cache_dir=tmp_path, device="cpu")
    assert first.shape == (16, 64)
    assert len(list((tmp_path / "seedprints").glob("*.npz"))) == 1

    def no_forward(*args, **kwargs):
        raise AssertionError("cached features were recomputed")

    monkeypatch.setattr(sp, "compute_features", no_forward)
    again = sp.model_features(models["init0"], settings, cache_dir=tmp_path, device="cpu")
    np.testing.assert_array_equal(first, again)
    monkeypatch.undo()
    other = LineageSettings(seedprints_inputs=16, seedprints_seq_len=8, seedprints_seed=1)
    shifted = sp.model_features(models["init0"], other, cache_dir=tmp_path, device="cpu")
    assert len(list((tmp_path / "seedprints").glob("*.npz"))) == 2
    assert not np.array_equal(first, shifted)


def test_hidden_size_mismatch_names_what_differs(models):
    with pytest.raises(NatprintsError, match="hidden_size 64 vs 96"):
        sp.seedprints_compare(models["init0"], models["wide"], device="cpu")


def test_seq_len_beyond_positions_is_an_error(models):
    with pytest.raises(NatprintsError, match="max_position_embeddings 128"):
        sp.model_features(models["init0"], LineageSettings(seedprints_seq_len=500), device="cpu")


def test_bad_model_directories(tmp_path, models):
    with pytest.raises(NatprintsError, match="not found"):
        inspect_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NatprintsError, match="no config.json"):
        inspect_model(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NatprintsError, match="not a model directory"):
        inspect_model(tmp_path / "file")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{nope")
    with pytest.raises(NatprintsError, match="not valid JSON"):
        inspect_model(tmp_path / "badjson")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(
        json.dumps({"hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 9})
    )
    with pytest.raises(NatprintsError, match="no model.safetensors"):
        inspect_model(tmp_path / "noweights")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "config.json").write_text((models["init0"] / "config.json").read_text())
    (tmp_path / "garbage" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(NatprintsError, match="cannot load model"):
        sp.model_features(tmp_path / "garbage", device="cpu")


def test_tampered_weights_fail_manifest_check(tmp_path):
    model = tiny_model(tmp_path / "m", 0)
    Manifest(model, "model").write("test", {"model_id": "m"}, ["config.json", "model.safetensors"])
    model_digest(inspect_model(model))  # untouched: fine
    other = tiny_model(tmp_path / "other", 1)
    (model / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(NatprintsError, match="does not match the hash"):
        sp.model_features(model, device="cpu")
