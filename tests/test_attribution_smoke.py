"""Attribution on the smoke run's real generated corpora: tables, null control, saved attributors."""

import json

import numpy as np
import pandas as pd
import pytest

from natprints import attribute
from tests.conftest import SMOKE, run_cli
from tests.test_zoo import BASE, SEED1

SEED2 = "xs-lr3e-3-bs8-init2-data2"


def test_accuracy_table_covers_every_condition_and_pipeline(smoke_cfg):
    acc = pd.read_csv(smoke_cfg.paths.reports / "accuracy.csv", keep_default_na=False)
    assert set(acc["condition"]) == {"seed", "init", "arch", "all", "null_control"}
    for condition, rows in acc.groupby("condition"):
        # 6 featurizers x 5 classifiers, less naive Bayes on embeddings (2), plus the ceiling, the reference
        # LMs and their product with the best pipeline (combine_reference)
        assert len(rows) == 6 * 5 - 2 + 3, condition
        assert "combined+product" in set(rows["pipeline"]), condition
        assert rows["best"].sum() == 1
        assert set(rows.loc[rows["white_box"], "pipeline"]) == {"likelihood+bayes"}
    seed = acc[acc["condition"] == "seed"]
    assert (seed["n_classes"] == 3).all() and (seed["chance"].round(6) == round(1 / 3, 6)).all()
    assert ((acc["ci_low"] <= acc["accuracy"]) & (acc["accuracy"] <= acc["ci_high"])).all()


def test_null_control_lands_at_chance(smoke_cfg):
    acc = pd.read_csv(smoke_cfg.paths.reports / "accuracy.csv", keep_default_na=False)
    null = acc[(acc["condition"] == "null_control") & ~acc["white_box"]]
    assert (null["n_classes"] == 2).all()
    # The same model sampled twice. Thirty black-box rows on 16 test texts each: one or two 95%
    # intervals miss chance by luck alone, so a leak shows as many misses and a high mean, not as a few.
    misses = ((null["ci_low"] > 0.5) | (null["ci_high"] < 0.5)).sum()
    assert misses <= 4 and 0.35 <= null["accuracy"].mean() <= 0.65
    # Both classes are the same model: their likelihoods tie, and the ceiling is exactly chance.
    ceiling = acc[(acc["condition"] == "null_control") & (acc["pipeline"] == "likelihood+bayes")]
    assert ceiling["accuracy"].tolist() == [0.5]


def test_ceiling_share_recomputes_from_the_table(smoke_cfg):
    acc = pd.read_csv(smoke_cfg.paths.reports / "accuracy.csv")
    for condition, rows in acc[acc["condition"] != "null_control"].groupby("condition"):
        ceiling = rows.loc[rows["pipeline"] == "likelihood+bayes", "accuracy"].item()
        assert (rows["ceiling"] == ceiling).all()
        share = (rows["accuracy"] - rows["chance"]) / (ceiling - rows["chance"])
        assert np.allclose(rows["ceiling_share"], share, atol=1e-5), condition
        # The exact likelihood attributor is at least as good as any text classifier, up to sampling noise.
        assert ceiling >= rows["accuracy"].max() - 0.15, condition


def test_ceiling_is_the_argmax_of_the_stored_likelihoods(smoke_cfg):
    from natprints.likelihood.stage import load_scores

    records = [json.loads(line) for line in (smoke_cfg.paths.reports / "results.jsonl").read_text().splitlines()]
    scores = load_scores(smoke_cfg)
    for r in records:
        if r["kind"] != "posteriors" or r["role"] != "ceiling" or r["condition"] == "null_control":
            continue
        loglik = np.array([[scores[m].loc[sid, "loglik"] for m in r["labels"]] for sid in r["sample_ids"]])
        expected = loglik - loglik.max(axis=1, keepdims=True)
        expected -= np.log(np.exp(expected).sum(axis=1, keepdims=True))
        np.testing.assert_allclose(np.array(r["log_posterior"]), expected, atol=6e-6)
        pipeline = next(
            p
            for p in records
            if p["kind"] == "pipeline" and p["condition"] == r["condition"] and p["pipeline"] == "likelihood+bayes"
        )
        assert pipeline["y_pred"] == loglik.argmax(axis=1).tolist()


def test_pooled_accuracy_recomputes_from_stored_posteriors(smoke_cfg):
    from natprints.attribution.ceiling import pool_groups

    records = [json.loads(line) for line in (smoke_cfg.paths.reports / "results.jsonl").read_text().splitlines()]
    pooled = pd.read_csv(smoke_cfg.paths.reports / "pooled.csv")
    checked = 0
    for r in records:
        if r["kind"] != "posteriors":
            continue
        y, scores = np.array(r["y_true"]), np.array(r["log_posterior"])
        for k in (1, 2, 4):
            groups = pool_groups(y, k, seed=0)
            if not groups:
                continue
            correct = np.mean([scores[g].sum(axis=0).argmax() == y[g[0]] for g in groups])
            row = pooled[(pooled["condition"] == r["condition"]) & (pooled["role"] == r["role"]) & (pooled["k"] == k)]
            assert row["accuracy"].item() == pytest.approx(correct, abs=1e-6)
            checked += 1
    assert checked >= 4 * 3 * 2


def test_open_set_false_rejections_stay_within_alpha(smoke_cfg):
    """Known models' texts wrongly called unknown by the likelihood margin test: within the binomial
    interval of alpha (the smoke run's few texts make the interval wide; the default run states it)."""
    from natprints.stats import wilson_interval

    records = [json.loads(line) for line in (smoke_cfg.paths.reports / "results.jsonl").read_text().splitlines()]
    rows = [r for r in records if r["kind"] == "open_set_likelihood" and r["method"] == "margin" and r["k"] == 1]
    assert rows and {r["held_out_model"] for r in rows if r["condition"] == "seed"} == {BASE, SEED1, SEED2}
    known = sum(r["n_known"] for r in rows)
    rejected = sum(r["known_rejected_n"] for r in rows)
    low, _ = wilson_interval(rejected, known, confidence=0.99)
    assert low <= rows[0]["alpha"]
    assert all(0 <= r["unknown_rejected_n"] <= r["n_unknown"] for r in rows)


def test_outsiders_are_scored_and_tested_against_the_known_models(smoke_cfg):
    """Human continuations and junk of the test prompts: every test, every pool size, with counts that
    add up, the analytic test two-sided, and junk (uniform tokens) called `unknown` by the analytic test
    whatever the pool (the margin test reads only how far the best model leads, which junk does not
    shorten)."""
    from scipy.stats import norm

    from natprints.conditions import load_conditions, open_set_applies, run_split
    from natprints.likelihood.stage import load_scores
    from natprints.stats import roc_summary

    records = [json.loads(line) for line in (smoke_cfg.paths.reports / "results.jsonl").read_text().splitlines()]
    rows = [r for r in records if r["kind"] == "open_set_outsiders"]
    conditions = load_conditions(smoke_cfg)
    applies = {name for name, data in conditions.items() if open_set_applies(data)}
    assert {r["condition"] for r in rows} == applies
    assert {(r["method"], r["source"]) for r in rows if r["k"] == 1} == {
        (m, s) for m in ("analytic", "margin", "background", "joint", "attributor") for s in ("human", "junk")
    }
    split = run_split(smoke_cfg, conditions)
    seed = conditions["seed"]
    test = seed.frame[seed.frame["prompt_id"].astype(str).map(split) == "test"]
    prompts = sorted(set(test["prompt_id"].astype(str)))
    for r in rows:
        assert r["n_outsider"] == len(prompts) // r["k"] and 0 <= r["outsider_rejected_n"] <= r["n_outsider"]
        assert r["n_known"] > 0 and 0 <= r["known_rejected_n"] <= r["n_known"]
        if r["method"] in ("analytic", "joint") and r["source"] == "junk":
            assert r["outsider_rejected_n"] == r["n_outsider"] and r["auroc"] == 1.0
    # the analytic test on single human texts, recomputed from the scores: two-sided |z| beyond the level
    scores = load_scores(smoke_cfg)
    members = [str(seed.frame.loc[seed.frame["label"] == j, "model_id"].iloc[0]) for j in range(len(seed.labels))]
    z = np.stack(
        [
            [
                (row.loglik + row.entropy_sum) / np.sqrt(row.variance_sum)
                for row in scores[m].loc[[f"human:{p}" for p in prompts]].itertuples()
            ]
            for m in members
        ],
        axis=1,
    )
    limit = norm.ppf(1 - smoke_cfg.likelihood.open_set_alpha / 2)
    row = next(
        r for r in rows if (r["condition"], r["method"], r["source"], r["k"]) == ("seed", "analytic", "human", 1)
    )
    assert row["outsider_rejected_n"] == int((np.abs(z) > limit).all(axis=1).sum())
    assert roc_summary(np.array([0.0, 1.0]), np.array([2.0, 3.0]))["auroc"] == 1.0
    # the background test on single human texts, recomputed: each text's best model's log-likelihood ratio
    # per token against the reference LM, below that model's threshold from its own calibration and
    # training-split texts
    from natprints.attribution import ceiling
    from natprints.conditions import split_parts
    from natprints.reference.stage import BACKGROUND
    from natprints.reference.stage import _manifest as reference_manifest

    background = load_scores(smoke_cfg, reference_manifest(smoke_cfg))[BACKGROUND]
    cal = split_parts(seed, split)["cal"]
    cal_ids, human_ids = cal["sample_id"].astype(str).tolist(), [f"human:{p}" for p in prompts]

    def columns(ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        loglik = np.stack([scores[m].loc[ids, "loglik"].to_numpy() for m in members], axis=1)
        return loglik, background.loc[ids, "loglik"].to_numpy(), scores[members[0]].loc[ids, "events"].to_numpy()

    known = list(range(len(members)))
    lik = smoke_cfg.likelihood
    train = split_parts(seed, split)["train"]
    train_ids = train["sample_id"].astype(str).tolist()
    mine = [scores[members[j]].loc[i] for i, j in zip(train_ids, train["label"], strict=True)]
    loglik, bg, events = columns(cal_ids)
    train_loglik = np.full((len(train), len(members)), np.nan)
    train_loglik[np.arange(len(train)), train["label"].to_numpy()] = [row["loglik"] for row in mine]
    limits = ceiling.background_thresholds(
        np.vstack([loglik, train_loglik]),
        np.concatenate([bg, background.loc[train_ids, "loglik"].to_numpy()]),
        np.concatenate([events, [row["events"] for row in mine]]),
        np.concatenate([cal["label"].to_numpy(), train["label"].to_numpy()]),
        known, 1, lik.open_set_alpha, lik.open_set_resamples, smoke_cfg.attribution.split_seed,
    )  # fmt: skip
    statistic = ceiling.background_statistic(
        *columns(human_ids), [np.array([i]) for i in range(len(prompts))], known, limits
    )
    row = next(
        r for r in rows if (r["condition"], r["method"], r["source"], r["k"]) == ("seed", "background", "human", 1)
    )
    assert row["outsider_rejected_n"] == int((statistic > 0).sum())
    summary = json.loads((smoke_cfg.paths.reports / "summary.json").read_text())
    assert len(summary["conditions"]["seed"]["open_set_outsiders"]) == len(
        [r for r in rows if r["condition"] == "seed"]
    )
    assert (smoke_cfg.paths.reports / "figures" / "open_set_roc.png").is_file()
    assert "### Open set: texts none of the models wrote" in (smoke_cfg.paths.reports / "index.md").read_text()


def test_moments_are_scored_only_for_the_open_set_texts(smoke_cfg, tmp_path):
    """Entropy and variance exist exactly for the test texts of conditions with an open-set test and,
    under each model, its own calibration and first-sample training texts there (the joint test's
    calibration); a row that comes to need them is scored again, and a cached complete row is not."""
    import shutil

    from natprints.conditions import first_samples, load_conditions, open_set_applies, run_split
    from natprints.likelihood.stage import STRING, load_scores, score_model, scoring_rows

    conditions = load_conditions(smoke_cfg)
    split = run_split(smoke_cfg, conditions)
    expected: dict[str, set[str]] = {}
    for data in conditions.values():
        where = data.frame["prompt_id"].astype(str).map(split)
        tested = data.frame[where == "test"]
        own = data.frame[(where == "cal") | ((where == "train") & first_samples(data.frame, smoke_cfg))]
        for model_id in data.frame["model_id"].astype(str).unique():
            ids = set(tested["sample_id"].astype(str)) if open_set_applies(data) else set()
            if open_set_applies(data):  # the human continuation and junk of each test prompt, its own texts
                ids |= {f"{source}:{p}" for source in ("human", "junk") for p in tested["prompt_id"].astype(str)}
                ids |= set(own.loc[own["model_id"].astype(str) == model_id, "sample_id"].astype(str))
            expected.setdefault(model_id, set()).update(ids)
    assert not open_set_applies(conditions["null_control"])
    for model_id, table in load_scores(smoke_cfg).items():
        with_moments = set(table.loc[table["entropy_sum"].notna(), "sample_id"])
        assert with_moments == expected[model_id] and with_moments, model_id
        lacking = table[table["entropy_sum"].isna()]
        assert len(lacking) and lacking["token_entropy"].isna().all() and lacking["variance_sum"].isna().all()
    rows = scoring_rows(smoke_cfg, conditions, canonical=True, outsiders=True, own_train=True)[BASE]  # as the stage
    path = tmp_path / f"{BASE}.parquet"
    shutil.copy(smoke_cfg.paths.likelihood / f"{BASE}.parquet", path)
    assert score_model(smoke_cfg, smoke_cfg.paths.zoo / BASE, rows, path, progress=False) == 0
    wanted = rows.assign(moments=True)
    strings = rows["sample_id"].str.endswith(STRING)  # a sum over paths has no moments to score
    assert strings.any()
    rescoring = (~rows["moments"] & ~strings).sum()
    assert score_model(smoke_cfg, smoke_cfg.paths.zoo / BASE, wanted, path, progress=False) == rescoring
    rescored = pd.read_parquet(path).set_index("row_key")
    assert len(rescored) == len(rows)
    assert rescored["entropy_sum"].notna().sum() == (~strings).sum()
    before = load_scores(smoke_cfg)[BASE].set_index("row_key")
    assert rescored.loc[before.index, "loglik"].tolist() == before["loglik"].tolist()


def test_each_model_scores_its_own_training_texts_for_the_background_thresholds(smoke_cfg):
    """The background test's thresholds come from each model's own calibration *and* training-split
    texts: the likelihood stage scores a model's own training texts (no other model's), the reference LM
    all of them, and the thresholds are the alpha-quantiles over both."""
    from natprints.attribution import ceiling
    from natprints.attribution.grid import Setup
    from natprints.attribution.whitebox import _background_thresholds, background_views, likelihood_views
    from natprints.conditions import load_conditions, open_set_applies, run_split, split_parts
    from natprints.likelihood.stage import load_scores
    from natprints.reference.stage import BACKGROUND, _manifest

    conditions = load_conditions(smoke_cfg)
    split = run_split(smoke_cfg, conditions)
    scores, refs = load_scores(smoke_cfg), load_scores(smoke_cfg, _manifest(smoke_cfg))
    train_ids = {}
    for data in conditions.values():
        train = split_parts(data, split)["train"]
        for model_id, rows in train.groupby("model_id"):
            ids = set(rows["sample_id"].astype(str))
            if open_set_applies(data):
                assert ids <= set(scores[str(model_id)].index) and ids <= set(refs[BACKGROUND].index)
            train_ids.setdefault(str(model_id), set()).update(ids)
    for model_id, ids in train_ids.items():  # never another model's training texts
        others = set().union(*(v for m, v in train_ids.items() if m != model_id)) - ids
        assert not others & set(scores[model_id].index), model_id
    data = conditions["seed"]
    views = likelihood_views(smoke_cfg, data, split, scores)
    views |= background_views(data, split, views, refs)
    own = views["own_train"]
    labels = (~np.isnan(own.loglik)).argmax(axis=1)
    assert (np.isnan(own.loglik).sum(axis=1) == len(data.labels) - 1).all()
    assert sorted(np.bincount(labels)) == sorted(np.bincount(split_parts(data, split)["train"]["label"]))
    setup = Setup(smoke_cfg, split=split, tokenizer=None, progress=False)
    parts = split_parts(data, split)
    y_cal = parts["cal"]["label"].to_numpy()
    known = list(range(len(data.labels)))
    both = _background_thresholds(setup, views, y_cal, known, 1)
    cal_only = _background_thresholds(setup, {k: v for k, v in views.items() if k != "own_train"}, y_cal, known, 1)
    settings = smoke_cfg.likelihood
    ratio = (own.loglik[np.arange(len(labels)), labels] - views["bg_train"].loglik[:, 0]) / own.events
    cal = views["cal"]
    cal_ratio = (cal.loglik[np.arange(len(y_cal)), y_cal] - views["bg_cal"].loglik[:, 0]) / cal.events
    for j in known:
        pooled = np.concatenate([cal_ratio[y_cal == j], ratio[labels == j]])
        assert pooled.min() <= both[j] <= pooled.max()  # a quantile of bootstrap pools of one text
    assert both != cal_only
    expected = ceiling.background_thresholds(
        np.vstack([cal.loglik, own.loglik]),
        np.concatenate([views["bg_cal"].loglik[:, 0], views["bg_train"].loglik[:, 0]]),
        np.concatenate([cal.events, own.events]),
        np.concatenate([y_cal, labels]),
        known,
        1,
        settings.open_set_alpha,
        settings.open_set_resamples,
        smoke_cfg.attribution.split_seed,
    )
    assert both == expected


def test_joint_test_rejects_own_pools_at_alpha_and_catches_all_junk(smoke_cfg):
    """The joint test, recomputed from the views: its thresholds keep each model's own single texts'
    rejections at alpha (the (1 - alpha)-quantile of -log p_background - log p_analytic), it catches
    all junk, and its counts are those the report's rows hold."""
    from scipy.stats import norm

    from natprints.attribution import ceiling
    from natprints.attribution.grid import Setup
    from natprints.attribution.whitebox import _joint_thresholds, _own_texts, background_views, likelihood_views
    from natprints.conditions import load_conditions, run_split, split_parts
    from natprints.errors import NatprintsError
    from natprints.likelihood.stage import load_scores
    from natprints.reference.stage import _manifest

    conditions = load_conditions(smoke_cfg)
    split = run_split(smoke_cfg, conditions)
    scores, refs = load_scores(smoke_cfg), load_scores(smoke_cfg, _manifest(smoke_cfg))
    data = conditions["seed"]
    views = likelihood_views(smoke_cfg, data, split, scores)
    views |= background_views(data, split, views, refs)
    setup = Setup(smoke_cfg, split=split, tokenizer=None, progress=False)
    y_cal = split_parts(data, split)["cal"]["label"].to_numpy()
    known = list(range(len(data.labels)))
    alpha = smoke_cfg.likelihood.open_set_alpha
    limits = _joint_thresholds(setup, views, y_cal, known, 1)
    own, background, y = _own_texts(views, y_cal)
    assert len(own.sample_ids) > len(y_cal)  # the training-split texts are in, with their moments
    rows = np.arange(len(y))
    assert not np.isnan(own.entropy[rows, y]).any() and not np.isnan(own.variance[rows, y]).any()
    for j in known:
        mine = np.flatnonzero(y == j)
        limit = limits[j]
        # Gamma(2, 1)'s 0.95-quantile is 4.74 for independent uniform p-values
        assert 3.5 < limit.threshold < 6.5 and len(limit.ratios) == smoke_cfg.likelihood.open_set_resamples
        # each own text, as a pool of one: Fisher's sum above the threshold at most about alpha of the time
        ratio = (own.loglik[mine, j] - background[mine]) / own.events[mine]
        z = (own.loglik[mine, j] + own.entropy[mine, j]) / np.sqrt(own.variance[mine, j])
        fisher = -np.log(limit.p_background(ratio)) - np.log(2 * norm.sf(np.abs(z)))
        assert (fisher > limit.threshold).mean() <= 2 * alpha + 1 / len(mine)
    outsiders = views["outsiders"]
    sources = np.array([sid.split(":", 1)[0] for sid in outsiders.sample_ids])
    singles = [np.array([i]) for i in range(len(sources))]
    statistic = ceiling.joint_statistic(outsiders, views["bg_outsiders"].loglik[:, 0], singles, known, limits)
    assert (statistic[sources == "junk"] > 0).all()
    records = [json.loads(line) for line in (smoke_cfg.paths.reports / "results.jsonl").read_text().splitlines()]
    row = next(
        r
        for r in records
        if r["kind"] == "open_set_outsiders"
        and (r["condition"], r["method"], r["source"], r["k"]) == ("seed", "joint", "human", 1)
    )
    assert row["outsider_rejected_n"] == int((statistic[sources == "human"] > 0).sum()) > 0
    with pytest.raises(NatprintsError, match="joint open-set test needs the moments"):
        blank = np.full_like(own.entropy, np.nan)
        bare = ceiling.LikelihoodView(own.sample_ids, own.loglik, {}, blank, blank, own.events)
        ceiling.joint_thresholds(bare, background, y, known, 1, alpha, 10, 0)


def test_kl_table_is_zero_on_the_diagonal_and_not_negative(smoke_cfg):
    kl = pd.read_csv(smoke_cfg.paths.reports / "kl.csv")
    same = kl[kl["model_a"] == kl["model_b"]]
    assert (same["kl_per_token"] == 0).all() and len(same) == 6  # the six models of `all`
    other = kl[kl["model_a"] != kl["model_b"]]
    assert (other["kl_per_token"] + 3 * other["se"] >= 0).all()


def test_saved_attributor_classifies_generated_text(smoke_cfg):
    text = pd.read_parquet(smoke_cfg.paths.generated / f"{SEED1}.parquet")["text"].iloc[0]
    preds = attribute([text], smoke_cfg.paths.attributors / "seed", top_k=3)
    assert len(preds) == 1 and len(preds[0].top) == 3
    labels = {model for model, _ in preds[0].top}
    assert BASE in labels and SEED1 in labels


def test_attribute_cli_json_and_per_input_errors(smoke_home, tmp_path):
    good = tmp_path / "a.txt"
    good.write_text("The state of the Union is strong and the Congress")
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    proc = run_cli(
        "attribute",
        str(good),
        str(empty),
        str(tmp_path / "missing.txt"),
        "--config",
        str(SMOKE),
        "--condition",
        "seed",
        "--json",
        home=smoke_home,
        check=False,
    )
    assert proc.returncode == 1
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["input"] == str(good) and lines[0]["label"] in (lines[0]["best_model"], "unknown")
    assert "error" in lines[1] and "error" in lines[2]
    assert "Traceback" not in proc.stderr


def test_combined_is_the_product_of_the_reference_and_best_posteriors(smoke_home):
    """combined+product: argmax of log p_reflm + log p_best, recomputed from the stored posteriors."""
    records = [json.loads(line) for line in (smoke_home / "reports" / "smoke" / "results.jsonl").open()]
    for condition in ("seed", "null_control"):
        post = {r["role"]: r for r in records if r["kind"] == "posteriors" and r["condition"] == condition}
        combined = next(
            r
            for r in records
            if r["kind"] == "pipeline" and r["condition"] == condition and r["pipeline"] == "combined+product"
        )
        best = next(r for r in records if r["kind"] == "pipeline" and r["condition"] == condition and r["best"])
        assert combined["members"] == ["reflm+lm", best["pipeline"]] and not combined["white_box"]
        total = np.array(post["reflm"]["log_posterior"]) + np.array(post["best"]["log_posterior"])
        assert combined["y_pred"] == total.argmax(axis=1).tolist()
        assert np.allclose(np.exp(post["combined"]["log_posterior"]).sum(axis=1), 1.0, atol=1e-5)


def test_string_ceiling_scores_the_canonical_tokenization_and_agrees_on_a_shared_tokenizer(smoke_cfg):
    """Test texts whose re-tokenization differs are scored again as those ids (no end event); on the
    smoke zoo's one tokenizer the string-level ceiling sits inside the token-level one's interval."""
    from natprints.corpus import load_tokenizer
    from natprints.likelihood.stage import CANONICAL, load_scores
    from natprints.records import load_records

    records = load_records(smoke_cfg.paths.reports)
    strings = {r["condition"]: r for r in records if r["kind"] == "string_ceiling"}
    assert set(strings) == {"seed", "init", "arch", "all"}
    for r in strings.values():
        assert r["agrees"], r
        assert 0.2 < r["differs"] < 1.0 and r["n_differs"] == round(r["differs"] * r["n_test"])
        assert set(r["differs_by_model"]) == set(r["labels"])
    tokenizer = load_tokenizer(smoke_cfg.paths.tokenizer)
    generated = pd.read_parquet(smoke_cfg.paths.generated / f"{BASE}.parquet").set_index("sample_id")
    scores = load_scores(smoke_cfg)[BASE]
    canonical = scores[scores["sample_id"].str.endswith(CANONICAL)]
    assert len(canonical) > 0
    for row in canonical.head(5).itertuples():
        sample_id = row.sample_id[: -len(CANONICAL)]
        text = generated.loc[sample_id, "text"] if sample_id in generated.index else None
        if text is None:
            continue  # another model's text, scored by the base model
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids != list(generated.loc[sample_id, "token_ids"]) and row.events == len(ids) and not row.ends_with_eos
        assert row.loglik == pytest.approx(float(np.sum(row.token_logprobs)))


def test_strings_over_their_segmentations_score_at_least_their_canonical_path(smoke_cfg):
    """Every test text is scored as a string over its most probable segmentations: never below its
    canonical path, which brings the true model's score back toward the path it sampled."""
    from natprints.likelihood.stage import CANONICAL, STRING, load_scores
    from natprints.records import load_records

    assert smoke_cfg.likelihood.segmentation_beam == 8
    records = load_records(smoke_cfg.paths.reports)
    for r in (r for r in records if r["kind"] == "string_ceiling"):
        assert r["agrees_segmented"], r
        assert 0 <= r["true_gap_segmented"] < r["true_gap_canonical"], r
    scores = load_scores(smoke_cfg)[BASE]
    ids = scores["sample_id"].astype(str)
    strings = scores[ids.str.endswith(STRING)].set_index(ids[ids.str.endswith(STRING)].str[: -len(STRING)])
    assert len(strings) > 0 and (strings["events"] >= 1).all() and (strings["events"] > 1).mean() > 0.5
    for sample_id, row in strings.iterrows():
        key = sample_id + CANONICAL if sample_id + CANONICAL in scores.index else sample_id
        canonical = scores.loc[key]
        path = float(
            np.sum(canonical["token_logprobs"][: len(canonical["token_logprobs"]) - int(canonical["ends_with_eos"])])
        )
        assert row["loglik"] >= path - 1e-3, sample_id


def test_summary_json_holds_each_condition_and_the_lineage_headline(smoke_cfg):
    summary = json.loads((smoke_cfg.paths.reports / "summary.json").read_text())
    assert summary["config_hash"] == smoke_cfg.hash()
    assert set(summary["conditions"]) == {"seed", "init", "arch", "all", "null_control"}
    acc = pd.read_csv(smoke_cfg.paths.reports / "accuracy.csv", keep_default_na=False)
    for condition, entry in summary["conditions"].items():
        ceiling = acc[(acc["condition"] == condition) & (acc["pipeline"] == "likelihood+bayes")]
        assert entry["ceiling"]["accuracy"] == pytest.approx(ceiling["accuracy"].item(), abs=1e-5)  # csv: 6 digits
        best = acc[(acc["condition"] == condition) & (acc["best"].astype(str) == "True")]
        assert entry["best"]["pipeline"] == best["pipeline"].item()
        assert entry["best"]["selected_on"] == "calibration split"
        assert entry["reference_lms"]["accuracy"] == pytest.approx(
            acc[(acc["condition"] == condition) & (acc["pipeline"] == "reflm+lm")]["accuracy"].item(), abs=1e-5
        )
        # over 5 prompt splits: the ceiling on each split's scored test texts, the pipelines refit, the
        # reference LMs fine-tuned anew
        assert set(entry["splits"]) == {"ceiling", "best", "baseline", "reference"}
        assert entry["splits"]["ceiling"]["splits"] == entry["splits"]["reference"]["splits"] == 5
        first = entry["reference_lms"]["accuracy"]
        assert entry["splits"]["reference"]["min"] <= first <= entry["splits"]["reference"]["max"]
        assert entry["splits"]["ceiling"]["min"] <= entry["ceiling"]["accuracy"] <= entry["splits"]["ceiling"]["max"]
    assert summary["conditions"]["null_control"]["verdict"] in ("at chance", "failed")
    lineage = json.loads((smoke_cfg.paths.reports / "lineage.json").read_text())
    assert summary["lineage"]["seedprints"]["auc"] == lineage["methods"]["seedprints"]["auc"]


def test_reference_lms_are_fine_tuned_and_scored_on_every_repeated_split(smoke_cfg):
    """Each further split: every candidate's reference LM fine-tuned on that split's training texts, and
    the split's `reference` figure the argmax of their scores of its test texts."""
    from natprints.conditions import load_conditions, repeat_seeds, repeat_split, split_parts
    from natprints.likelihood.stage import load_scores
    from natprints.reference.stage import _manifest, reference_dir, split_id
    from natprints.reports.tables import split_table

    records = [json.loads(line) for line in (smoke_cfg.paths.reports / "results.jsonl").read_text().splitlines()]
    refs = load_scores(smoke_cfg, _manifest(smoke_cfg))
    conditions = load_conditions(smoke_cfg)
    seeds = repeat_seeds(smoke_cfg)
    assert seeds == [1, 2, 3, 4]
    for model_id in {m for d in conditions.values() for m in d.frame["model_id"].astype(str)}:
        for seed in seeds:
            assert (reference_dir(smoke_cfg) / split_id(model_id, seed) / "model.safetensors").exists()
    repeats = [r for r in records if r["kind"] == "split_repeat" and r["condition"] in conditions]
    assert len(repeats) == len(seeds) * len(conditions)
    for r in repeats:
        data = conditions[r["condition"]]
        test = split_parts(data, repeat_split(data.frame["prompt_id"], smoke_cfg, r["split_seed"]))["test"]
        scorer = {j: str(data.frame.loc[data.frame["label"] == j, "model_id"].iloc[0]) for j in range(len(data.labels))}
        ids = test["sample_id"].astype(str)
        loglik = np.column_stack([refs[split_id(scorer[j], r["split_seed"])].loc[ids, "loglik"] for j in scorer])
        right = loglik.argmax(axis=1) == test["label"].to_numpy()
        assert r["reference"] == {"accuracy": pytest.approx(right.mean()), "n_test": len(test)}
    table = split_table(records)
    rows = table[table["role"] == "reference"]
    assert set(rows["condition"]) == set(conditions) and (rows["pipeline"] == "reflm+lm").all()
    assert (rows["splits"] == 5).all()


def test_likelihood_cli_on_a_runs_zoo_gives_the_reports_joint_verdicts(smoke_home, smoke_cfg, tmp_path):
    """`attribute --method likelihood` on the run's zoo decides `unknown` with the joint test against
    the run's reference LM: the human continuations and junk of `seed`'s test prompts, given as JSONL
    records with their prompt and sampled ids, are called `unknown` as often as the report's k = 1 rows
    say (to one text: the stage also scores a paragraph's end), with the threshold the run's own texts
    give; the pooled human texts are `unknown`, a pool of one model's own texts is that model; a bundle
    of such verdicts verifies; `--models` keeps the analytic test."""
    from dataclasses import replace

    from natprints.attribution.verdicts import Request, attribute_files, verify_bundle
    from natprints.attribution.whitebox import run_joint_limits
    from natprints.conditions import load_conditions, run_split, split_parts
    from natprints.generate.stage import build_prompts, outsider_texts

    conditions = load_conditions(smoke_cfg, declared=True)
    test = split_parts(conditions["seed"], run_split(smoke_cfg, conditions))["test"]
    strangers = outsider_texts(smoke_cfg, test["prompt_id"].astype(str).unique())
    prompts = build_prompts(smoke_cfg).set_index("prompt_id")["prompt"]
    records = [json.loads(line) for line in (smoke_cfg.paths.reports / "results.jsonl").read_text().splitlines()]
    limits = run_joint_limits(smoke_cfg, "seed", 1, smoke_cfg.likelihood.open_set_alpha)

    def cli(*args: str) -> list[dict]:
        base = ("attribute", "--method", "likelihood", "--config", str(SMOKE), "--condition", "seed", "--json")
        proc = run_cli(*base, *args, home=smoke_home)
        return [json.loads(line) for line in proc.stdout.splitlines()]

    def jsonl(name: str, rows: pd.DataFrame) -> str:
        path = tmp_path / f"{name}.jsonl"
        lines = [
            json.dumps({"text": r.text, "prompt": prompts[str(r.prompt_id)], "token_ids": list(map(int, r.token_ids))})
            for r in rows.itertuples()
        ]
        path.write_text("\n".join(lines) + "\n")
        return str(path)

    every = cli("--jsonl", jsonl("strangers", strangers))
    assert len(every) == len(strangers)
    for source in ("human", "junk"):
        verdicts = [v for v, s in zip(every, strangers["source"], strict=True) if s == source]
        row = next(
            r
            for r in records
            if r["kind"] == "open_set_outsiders"
            and (r["condition"], r["method"], r["source"], r["k"]) == ("seed", "joint", source, 1)
        )
        assert {v["open_set"] for v in verdicts} == {"joint"}
        assert all(v["joint_threshold"] == limits[v["best_model"]].threshold for v in verdicts)
        assert all(v["unknown"] == (v["joint_statistic"] > 0) for v in verdicts)
        # the stage scores a paragraph's end as the model's EOS where it ends within the budget; a text
        # given alone has no end event: a verdict near its threshold may differ
        assert abs(sum(v["unknown"] for v in verdicts) - row["outsider_rejected_n"]) <= 1
        assert sum(v["unknown"] for v in verdicts) > 0

    # the rest in this process (the same code as the CLI, without a start-up each)
    def attribute(files: list[str], **options) -> list[dict]:
        lines: list[str] = []
        request = Request(method="likelihood", config=SMOKE, condition="seed", as_json=True, **options)
        assert attribute_files(files, request, out=lines.append, err=lambda _: None) == 0
        return [json.loads(line) for text in lines for line in text.splitlines()]

    (pooled,) = attribute([jsonl("human", strangers[strangers["source"] == "human"])], jsonl=True, pool=True)
    assert pooled["unknown"] and pooled["texts"] == len(prompts[prompts.index.isin(test["prompt_id"].astype(str))])
    (mine,) = attribute([jsonl("own", test[test["model_id"] == SEED2].head(4))], jsonl=True, pool=True)
    assert mine["label"] == SEED2 and not mine["unknown"] and mine["joint_statistic"] < 0
    files = []
    for i, text in enumerate(strangers.loc[strangers["source"] == "junk", "text"].head(2)):
        files.append(tmp_path / f"junk{i}.txt")
        files[-1].write_text(text)
    bundle = tmp_path / "evidence.json"
    attribute(list(map(str, files)), bundle=bundle)
    recorded = json.loads(bundle.read_text())["request"]["open_set"]
    assert recorded == {"test": "joint", "run": "smoke", "condition": "seed"}
    assert verify_bundle(bundle).startswith("verified: 2 inputs and 4 models")
    analytic = Request(
        method="likelihood", models=tuple(smoke_cfg.paths.zoo / m for m in limits), tokenizer=smoke_cfg.paths.tokenizer
    )
    lines: list[str] = []
    attribute_files([str(files[0])], replace(analytic, as_json=True), out=lines.append, err=lines.append)
    assert json.loads(lines[0])["open_set"] == "analytic"


def test_the_saved_attributor_decides_unknown_with_its_outsider_test(smoke_cfg, smoke_home, tmp_path):
    """The saved `seed` attributor carries its outsider test: its verdicts on the human continuations and
    junk of the test prompts are the report's k = 1 attributor rows, on the test texts the attributor
    record's; `attribute` warns where one text can never be `unknown`, and names the detector in a
    pooled `unknown` line."""
    from natprints.attribution.attributor import OUTSIDER_ARRAYS, OUTSIDER_FIELDS, load_attributor
    from natprints.attribution.likelihood import attribute_pooled
    from natprints.attribution.verdicts import Request, attribute_files
    from natprints.conditions import load_conditions, run_split, split_parts
    from natprints.generate.stage import outsider_texts

    directory = smoke_cfg.paths.attributors / "seed"
    model = load_attributor(directory)
    assert model.outsider is not None
    assert (directory / OUTSIDER_FIELDS).is_file() and (directory / OUTSIDER_ARRAYS).is_file()
    conditions = load_conditions(smoke_cfg, declared=True)
    test = split_parts(conditions["seed"], run_split(smoke_cfg, conditions))["test"]
    strangers = outsider_texts(smoke_cfg, test["prompt_id"].astype(str).unique())
    records = [json.loads(line) for line in (smoke_cfg.paths.reports / "results.jsonl").read_text().splitlines()]
    for source in ("human", "junk"):
        verdicts = model.predict(strangers.loc[strangers["source"] == source, "text"].tolist())
        row = next(
            r
            for r in records
            if r["kind"] == "open_set_outsiders"
            and (r["condition"], r["method"], r["source"], r["k"]) == ("seed", "attributor", source, 1)
        )
        assert sum(p.unknown for p in verdicts) == row["outsider_rejected_n"]
    record = next(r for r in records if r["kind"] == "attributor" and r["condition"] == "seed")
    assert record["open_set"] == "outsider"
    verdicts = model.predict(test["text"].tolist())
    assert [i for i, p in enumerate(verdicts) if p.unknown] == record["unknown_rows"]
    # 4 calibration texts a model, under the 39 one text needs at alpha 0.05: no single text is
    # `unknown` (the report's k = 1 rows say 0), `attribute` warns so, and a pool of the junk is
    junk = strangers.loc[strangers["source"] == "junk", "text"].tolist()
    assert model.outsider.blind(1) == [0, 1, 2] and attribute_pooled(junk, model).unknown
    paths = []
    for i, text in enumerate(junk):
        (tmp_path / f"junk{i}.txt").write_text(text)
        paths.append(str(tmp_path / f"junk{i}.txt"))
    errors: list[str] = []
    request = Request(config=SMOKE, condition="seed")
    assert attribute_files(paths[:1], request, out=lambda _: None, err=errors.append) == 0  # as the CLI, in process
    assert [e.split(" calibration texts of")[0] for e in errors] == ["warning: the outsider test has fewer than 39"]
    proc = run_cli("attribute", *paths, "--pool", "--config", str(SMOKE), "--condition", "seed", home=smoke_home)
    assert proc.stdout.startswith(f"pooled ({len(junk)} texts): unknown (best")
    assert "unlike its own texts to the outsider detector at alpha 0.05" in proc.stdout
