"""SeedPrints: the statistic against an O(N^2) reference and scipy, its calibration on noise, the
settings and verdict rules, detection on tiny Llama models, the cache, input errors."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binom, kendalltau, norm
from transformers import LlamaConfig, LlamaForCausalLM

from natprints.artifacts import Manifest
from natprints.config import LineageSettings, load_config
from natprints.errors import NatprintsError
from natprints.lineage import seedprints as sp
from natprints.modeldir import inspect_model, model_digest

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


def kendall_tau_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The O(N^2) reference: tau-b from the signs of every pair's differences (NaN if constant)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    iu, ju = np.triu_indices(len(a), 1)
    if len(iu) == 0:
        return np.full(a.shape[1], np.nan)
    da, db = np.sign(a[iu] - a[ju]), np.sign(b[iu] - b[ju])
    numerator = (da * db).sum(axis=0)
    denominator = np.sqrt(np.count_nonzero(da, axis=0) * np.count_nonzero(db, axis=0).astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


@pytest.mark.parametrize("n", [2, 3, 17, 300])
def test_kendall_tau_equals_the_pairwise_reference(n):
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, 6))
    b = a + rng.normal(scale=1.5, size=a.shape)  # no ties
    ties_a, ties_b = rng.integers(0, 4, size=(n, 6)), rng.integers(0, 3, size=(n, 6))
    ties_a[:, 0] = 2  # a constant column: NaN
    ties_b[:, 1] = 1
    mixed_a, mixed_b = np.round(a, 1), b  # ties in one variable only
    for x, y in [(a, b), (ties_a, ties_b), (mixed_a, mixed_b), (ties_a, a)]:
        ours, reference = sp.kendall_tau_columns(x, y), kendall_tau_pairs(x, y)
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(reference))
        np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-12)
    assert np.isnan(sp.kendall_tau_columns(ties_a, ties_b)[:2]).all()
    assert np.isnan(sp.kendall_tau_columns(np.ones((1, 3)), np.ones((1, 3)))).all()  # no pairs at all


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


def test_p_reported_both_ways_and_verdicts_use_one_sided():
    rng = np.random.default_rng(5)
    shared = rng.normal(size=(60, 16))
    a, b = shared + rng.normal(size=shared.shape), shared + rng.normal(size=shared.shape)
    for x, y in [(a, b), (a, -b), (a, rng.normal(size=a.shape))]:
        r = sp.seedprints_test(x, y, k="all")
        assert r.log10_p == pytest.approx(norm.logsf(r.z) / math.log(10), abs=1e-12)
        assert r.log10_p_two_sided == pytest.approx(min(0.0, math.log10(2 * norm.sf(abs(r.z)))), abs=1e-12)
        d = r.to_dict()
        assert d["p_one_sided"] == pytest.approx(norm.sf(r.z)) and d["log10_p_one_sided"] == r.log10_p
        assert d["p_two_sided"] == pytest.approx(min(1.0, 2 * norm.sf(abs(r.z))))
    # z = 2.4: one-sided p = 0.0082 < 0.01 <= two-sided p = 0.0164; the verdict follows the one-sided p
    between = sp.SeedPrintsResult(100, 16, 16, 0.1, 2.4, math.log10(norm.sf(2.4)), math.log10(2 * norm.sf(2.4)), 0.01)
    assert between.p_one_sided < 0.01 <= between.p_two_sided
    assert between.same_lineage
    assert sp.seedprints_verdict(between, with_init=True, threshold=None) == ("related", "analytic")


def test_verdict_rules_for_trained_pairs():
    r = sp.SeedPrintsResult(100, 16, 16, 0.1, 4.0, -4.5, -4.2, 0.01)
    assert sp.seedprints_verdict(r, with_init=True, threshold=5.0) == ("related", "analytic")  # threshold unused
    assert sp.seedprints_verdict(r, with_init=False, threshold=None) == ("uncalibrated", "uncalibrated")
    assert sp.seedprints_verdict(r, with_init=False, threshold=5.0) == ("unrelated", "calibrated")
    assert sp.seedprints_verdict(r, with_init=False, threshold=3.9) == ("related", "calibrated")
    assert sp.seedprints_verdict(r, with_init=False, threshold=4.0) == ("unrelated", "calibrated")  # z must exceed
    none = sp.SeedPrintsResult(100, 16, 1, math.nan, math.nan, 0.0, 0.0, 0.01)
    assert sp.seedprints_verdict(none, with_init=False, threshold=-10.0) == ("unrelated", "calibrated")


def test_calibrated_threshold_is_the_quantile_of_unrelated_z():
    z = np.random.default_rng(6).normal(size=500)
    threshold = sp.calibrate_threshold(z, 0.01)
    assert threshold in z  # an observed z
    assert (z > threshold).sum() <= 0.01 * len(z) and (z >= threshold).sum() > 0.01 * len(z) - 1
    assert threshold == pytest.approx(np.quantile(z, 0.99), abs=0.1)
    assert sp.calibrate_threshold(z[:40], 0.01) == z[:40].max()  # fewer than 1 / FPR pairs: their maximum
    assert sp.calibrate_threshold([np.nan, 1.0, 2.0], 0.05) == 2.0
    assert sp.calibrate_threshold([], 0.01) is None and sp.calibrate_threshold([np.nan], 0.01) is None


def test_leave_one_seed_out_counts_held_out_pairs():
    seeds = range(5)
    pairs = [(i, j) for i in seeds for j in seeds if i < j]
    z = np.array([10.0 if 4 in p else float(i) for i, p in enumerate(pairs)])  # seed 4's pairs stand out
    out = sp.leave_one_seed_out(z, [p[0] for p in pairs], [p[1] for p in pairs], 0.01)
    assert out["seeds"] == 5 and out["folds"] == 5 and out["evaluated"] == 2 * len(pairs)
    # without seed 4 the threshold is 5 (the largest other z): seed 4's four pairs exceed it; every other
    # fold's threshold is 10 (seed 4's pairs stay in), which nothing exceeds
    assert out["false"] == 4 and out["fpr"] == pytest.approx(4 / 20)
    two = sp.leave_one_seed_out(np.array([1.0]), [0], [1], 0.01)
    assert two["folds"] == 0 and two["fpr"] is None  # with two seeds no fold has pairs to fit on


def _noise_z(rng: np.random.Generator, pairs: int, hidden: int, k: int, n: int = 128) -> np.ndarray:
    """z of SeedPrints on pairs of independent Gaussian "features": the null, exactly."""
    z = [sp.seedprints_test(rng.normal(size=(n, hidden)), rng.normal(size=(n, hidden)), k=k).z for _ in range(pairs)]
    return np.nan_to_num(np.array(z), nan=0.0)  # |S| < 2: no evidence


def test_analytic_null_is_too_narrow_at_small_kept_sets():
    """k = 16 of 64 dimensions keeps |S| = 4 on average; the softmax over S ties the per-dimension taus
    together (they share its denominator), so the mean tau varies more than the independent-tau sd says."""
    z = _noise_z(np.random.default_rng(0), pairs=300, hidden=64, k=16)
    assert np.mean(z > norm.isf(0.01)) > 0.015  # nominal 1%
    assert np.std(z) > 1.05


def test_analytic_null_is_calibrated_at_large_kept_sets():
    """k = half the hidden size: |S| = 16 on average, and the z test holds its nominal 1%."""
    pairs = 400
    z = _noise_z(np.random.default_rng(1), pairs=pairs, hidden=64, k=32)
    false = int((z > norm.isf(0.01)).sum())
    assert binom.ppf(0.005, pairs, 0.01) <= false <= binom.isf(0.005, pairs, 0.01)
    assert 0.9 < np.std(z) < 1.1


def test_k_forms():
    assert sp.resolve_k(16, 64) == 16 and sp.resolve_k(100, 64) == 64
    assert sp.resolve_k("all", 64) == 64 and sp.resolve_k(1.0, 64) == 64
    assert sp.resolve_k(0.5, 64) == 32 and sp.resolve_k(0.3, 64) == 20 and sp.resolve_k(0.001, 64) == 1
    for bad in (0, -1, 1.5, "half", True):
        with pytest.raises(NatprintsError, match="seedprints_k"):
            sp.resolve_k(bad, 64)
    features = np.random.default_rng(7).normal(size=(20, 12))
    assert sp.seedprints_test(features, features, k="all").kept == 12
    assert sp.seedprints_test(features, features, k=0.5).kept == 6


def test_settings_defaults_and_k_in_config(tmp_path):
    defaults = LineageSettings()
    assert (defaults.seedprints_inputs, defaults.seedprints_seq_len, defaults.seedprints_k) == (512, 128, "all")
    for value, parsed in [("'all'", "all"), ("24", 24), ("0.5", 0.5)]:
        (tmp_path / "c.toml").write_text(f"[run]\nname = 'x'\n[lineage]\nseedprints_k = {value}\n")
        assert load_config(tmp_path / "c.toml").lineage.seedprints_k == parsed
    for value in ("'half'", "0", "1.5", "true"):
        (tmp_path / "c.toml").write_text(f"[run]\nname = 'x'\n[lineage]\nseedprints_k = {value}\n")
        with pytest.raises(NatprintsError, match="'lineage.seedprints_k': must be a count"):
            load_config(tmp_path / "c.toml")


def test_disjoint_disliked_sets_give_no_evidence():
    a = np.zeros((20, 8)) + np.random.default_rng(4).normal(scale=0.01, size=(20, 8))
    b = a.copy()
    a[:, :4] -= 5.0
    b[:, 4:] -= 5.0
    result = sp.seedprints_test(a, b, k=4)
    assert result.kept == 0
    assert result.log10_p == 0.0 and result.p == 1.0 and result.log10_p_two_sided == 0.0
    assert not result.same_lineage
    assert result.to_dict()["z"] is None


def test_random_inputs_are_seeded_and_within_vocab():
    x = sp.random_inputs(VOCAB, 16, 32, seed=5)
    assert x.shape == (16, 32)
    assert int(x.min()) >= 0 and int(x.max()) < VOCAB
    assert torch.equal(x, sp.random_inputs(VOCAB, 16, 32, seed=5))
    assert not torch.equal(x, sp.random_inputs(VOCAB, 16, 32, seed=6))


def test_same_seed_detected_different_seed_not(models, tmp_path):
    # N below the vocabulary of 300: inputs that end in the same token are near-duplicates (see the module)
    settings = LineageSettings(seedprints_inputs=256)

    def log10_p(a: str, b: str) -> float:
        return sp.seedprints_compare(models[a], models[b], settings, cache_dir=tmp_path, device="cpu").log10_p

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

    def features(**update) -> np.ndarray:
        return sp.model_features(models["init0"], settings.model_copy(update=update), cache_dir=tmp_path, device="cpu")

    longer, more = features(seedprints_seq_len=9), features(seedprints_inputs=17)
    assert len(list((tmp_path / "seedprints").glob("*.npz"))) == 4
    assert more.shape == (17, 64) and not np.array_equal(first, longer)
    np.testing.assert_allclose(more[:16], first, atol=1e-5)  # the same first 16 inputs (one generator)
    # k and the temperature act on the pair, not on the features: they share the cache entry
    features(seedprints_k=4, seedprints_temperature=2.0)
    assert len(list((tmp_path / "seedprints").glob("*.npz"))) == 4


def test_zoo_init_directories_are_recognized(models, tmp_path):
    model = tiny_model(tmp_path / "m", 0)
    new_model(0).save_pretrained(model / "init")
    assert sp.is_init_dir(model / "init")
    assert not sp.is_init_dir(model) and not sp.is_init_dir(models["init0"])


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


def test_target_line_judges_the_held_out_false_positive_rate():
    from natprints.reports.lineage import _target_line

    target = {"goal_tpr": 0.9, "goal_fpr": 0.01, "tp": 15, "positives": 16, "fp": 0, "negatives": 198, "met": True}
    # in-sample 0 false links, held out 2 of 138 (1.4%): above 1%, so not met
    line = _target_line(target, {"evaluated": 138, "false": 2})
    assert "**FPR leave-one-seed-out 2/138 (1%)**" in line and line.endswith("— **not met**.")
    assert "in-sample over all different-seed pairs 0/198" in line
    assert _target_line(target, {"evaluated": 138, "false": 1}).endswith("— met.")
    assert _target_line({**target, "tp": 10}, {"evaluated": 138, "false": 1}).endswith("— **not met**.")
    # no held-out estimate: the in-sample verdict is labelled as such
    assert _target_line(target, {}).endswith("in-sample (no held-out estimate) — met in-sample only.")
