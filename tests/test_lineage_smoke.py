"""Lineage on the smoke zoo: what the methods find on real (tiny) trained and derived models."""

import pandas as pd

from tests.test_zoo import BASE, INIT1, SEED1

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
    # the data-order-only variant shares its seed lineage with the seed-1 model
    assert sp.loc[(INIT1, SEED1), "verdict"] == "related"
    for a in TRAINED:
        for b in TRAINED:
            if a < b and INIT_SEED[a] != INIT_SEED[b]:
                assert 10 ** sp.loc[(a, b), "log10_p"] > alpha, (a, b)
                assert 10 ** sp.loc[(f"{a}@init", f"{b}@init"), "log10_p"] > alpha, (a, b)
