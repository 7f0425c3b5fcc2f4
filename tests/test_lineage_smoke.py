"""Lineage on the smoke zoo: what the methods find on real (tiny) trained and derived models."""

import json

import pandas as pd
import pytest

from tests.test_zoo import BASE, GPT2, GPTNEOX, INIT1, SEED1

SEED2 = "xs-lr3e-3-bs8-init2-data2"
TRAINED = [BASE, SEED1, SEED2, INIT1]
INIT_SEED = {BASE: 0, SEED1: 1, SEED2: 2, INIT1: 1}


def _seedprints(cfg) -> pd.DataFrame:
    df = pd.read_csv(cfg.paths.reports / "lineage.csv")
    assert list(df.columns) == ["model_a", "model_b", "method", "score", "log10_p", "related", "verdict"]
    sp = df[df["method"] == "seedprints"]
    both = pd.concat([sp, sp.rename(columns={"model_a": "model_b", "model_b": "model_a"})])
    return both.set_index(["model_a", "model_b"])


def test_same_seed_pairs_detected_and_different_seeds_not(smoke_cfg):
    sp = _seedprints(smoke_cfg)
    alpha = smoke_cfg.lineage.alpha
    for model in TRAINED:
        # each init against its own trained model, and the trained model against its derived one
        assert sp.loc[(f"{model}@init", model), "log10_p"] < -2
        if model != INIT1:
            assert sp.loc[(model, f"{model}+kjv"), "log10_p"] < -2
    # the data-order-only variant shares its seed lineage with the seed-1 model (calibrated threshold)
    assert sp.loc[(INIT1, SEED1), "verdict"] == "related"
    for a in TRAINED:
        for b in TRAINED:
            if a < b and INIT_SEED[a] != INIT_SEED[b]:
                # two trained models: judged against the calibrated z threshold, not the analytic p
                assert sp.loc[(a, b), "verdict"] == "unrelated", (a, b)
                assert 10 ** sp.loc[(f"{a}@init", f"{b}@init"), "log10_p"] > alpha, (a, b)
                assert sp.loc[(f"{a}@init", b), "verdict"] == "unrelated", (a, b)


def test_calibrated_threshold_recorded(smoke_cfg):
    summary = json.loads((smoke_cfg.paths.reports / "lineage.json").read_text())
    calibration = summary["seedprints"]["calibration"]
    sp = _seedprints(smoke_cfg)
    # the other families (init seed 0) are trained models too; derive covers the seed condition only
    trained = list(TRAINED) + [f"{m}+kjv" for m in TRAINED if m != INIT1] + [GPT2, GPTNEOX]
    seed = {**INIT_SEED, **{f"{m}+kjv": s for m, s in INIT_SEED.items()}, GPT2: 0, GPTNEOX: 0}
    unrelated = {tuple(sorted((a, b))) for a in trained for b in trained if seed[a] != seed[b]}
    assert calibration["pairs"] == len(unrelated) and calibration["target_fpr"] == smoke_cfg.lineage.alpha
    z = [sp.loc[pair, "score"] for pair in unrelated]
    assert calibration["threshold"] == pytest.approx(max(z))  # fewer than 1 / alpha pairs: the largest z
