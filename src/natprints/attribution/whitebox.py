"""White-box and reference-LM records of a condition: the likelihood ceiling (on sampled ids and on
strings), pooled evidence, the open set against left-out models and outsiders, sequential
attribution, the KL map, and the views of the likelihood and reference-LM scores they read."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from natprints.attribution import ceiling, sequential
from natprints.attribution.attributor import (
    Attributor,
    OutsiderTest,
)
from natprints.attribution.ceiling import LikelihoodView
from natprints.attribution.estimators import compatible
from natprints.attribution.evidence import evidence_record
from natprints.attribution.grid import FEATURIZER_APPROACHES, GENERATIVE_APPROACHES, Setup, pipeline_record
from natprints.conditions import (
    ConditionData,
    first_samples,
    open_set_applies,
    repeat_seeds,
    repeat_split,
    split_parts,
)
from natprints.config import NULL_CONDITION, Config
from natprints.errors import NatprintsError
from natprints.records import CEILING, CEILING_PIPELINE, REFERENCE, REFERENCE_PIPELINE
from natprints.reference.encoder import ENCODER_PREFIX
from natprints.reference.head import load_head
from natprints.reference.stage import split_id, subset_id
from natprints.stats import classification_summary, log_posterior, roc_summary

# Black-box discriminative: a classification head on the reference LM, fine-tuned per condition.
HEAD = ("reflm", "head")
# Black-box discriminative: the frozen sentence encoder fine-tuned end to end per condition.
ENCODER = ("minilm", "ft")
# Black-box, both kinds: the reference LMs' posterior times the best pipeline's calibrated one.
COMBINED = ("combined", "product")
# Their approaches, after the grid's in the report's comparison.
WHITE_BOX_APPROACHES = {
    REFERENCE: "reference LMs fine-tuned per model",
    HEAD: "classification head on the reference LM",
    ENCODER: "sentence encoder fine-tuned end to end",
    COMBINED: "reference LMs × best pipeline (product of posteriors)",
}
OPEN_SET_POOLS = (1, 4, 16)  # texts per pool in the open-set test of the likelihood attributor
# A default for a setting that has no config key (yet).
OPEN_SET_MAX_HELD_OUT = 3  # zoo models left out, one at a time, to measure open-set rejection


# the report's order: each generative approach after the featurizers it reads, then the rest, then the
# white-box ones
_READ = [f for f in FEATURIZER_APPROACHES if all(compatible(f, c) for c in GENERATIVE_APPROACHES)]
APPROACHES = tuple(
    dict.fromkeys(
        [
            *(FEATURIZER_APPROACHES[f] for f in _READ),
            *GENERATIVE_APPROACHES.values(),
            *FEATURIZER_APPROACHES.values(),
            *WHITE_BOX_APPROACHES.values(),
        ]
    )
)


def approach(featurizer: str, classifier: str) -> str | None:
    """The black-box approach a pipeline belongs to; None for the ceiling and the controls."""
    return (
        WHITE_BOX_APPROACHES.get((featurizer, classifier))
        or GENERATIVE_APPROACHES.get(classifier)
        or FEATURIZER_APPROACHES.get(featurizer)
    )


def without_model(frame: pd.DataFrame, held: int) -> pd.DataFrame:
    """Drop one class and renumber the others 0..k-2, keeping their order."""
    sub = frame[frame["label"] != held]
    return sub.assign(label=sub["label"].where(sub["label"] < held, sub["label"] - 1).astype(np.int64))


def _outsider_groups(sources: np.ndarray, source: str, k: int, seed: int) -> list[np.ndarray]:
    """Disjoint pools of ``k`` rows of one outsider source (shuffled by ``seed``, the rest dropped)."""
    rows = np.flatnonzero(sources == source)
    return [rows[g] for g in ceiling.pool_groups(np.zeros(len(rows), dtype=np.int64), k, seed)]


def _outsider_record(
    data: ConditionData, method: str, source: str, k: int, limit: float, known: np.ndarray, outsider: np.ndarray
) -> dict[str, Any]:
    """One open-set test against one outsider source: a pool is ``unknown`` when its statistic is
    above ``limit``; the known models' own pools are the negatives of the ROC curve."""
    return {
        "kind": "open_set_outsiders",
        "condition": data.name,
        "method": method,
        "source": source,
        "k": k,
        "n_outsider": len(outsider),
        "outsider_rejected_n": int((outsider > limit).sum()),
        "n_known": len(known),
        "known_rejected_n": int((known > limit).sum()),
        **roc_summary(known, outsider),
    }


OUTSIDER_C = 10.0  # the detector's inverse regularization
# human texts of the corpus's training split beside the training prompts' continuations: 600 of those
# alone caught 0.69-0.84 of 4-text human pools in the default run
OUTSIDER_CORPUS_TEXTS = 3000


def corpus_continuations(setup: Setup, n: int) -> list[str]:
    """Up to ``n`` human texts shaped like the continuations: paragraphs of the corpus's training split
    (drawn in a seeded order), each cut as a prompt's continuation is (the tokens after the first
    ``prompt_tokens``, at most ``new_tokens`` of them; paragraphs no longer than a prompt are passed)."""
    from natprints.corpus import read_jsonl_texts

    g = setup.cfg.generate
    paragraphs = read_jsonl_texts(setup.cfg.paths.corpus / "train.jsonl")
    order = np.random.default_rng(setup.settings.split_seed).permutation(len(paragraphs))
    out: list[str] = []
    for start in range(0, len(order), 1024):
        batch = [paragraphs[i] for i in order[start : start + 1024]]
        for ids in setup.tokenizer(batch, add_special_tokens=False)["input_ids"]:
            if len(ids) > g.prompt_tokens:
                out.append(setup.tokenizer.decode(ids[g.prompt_tokens : g.prompt_tokens + g.new_tokens]))
        if len(out) >= n:
            break
    return out[:n]


def outsider_test(setup: Setup, data: ConditionData, parts: dict[str, pd.DataFrame]) -> OutsiderTest | None:
    """The saved attributor's open set, black-box: a detector of human prose against the condition's
    texts, fitted on the run's own training-split texts against human texts of the same shape (what an
    auditor holds: the public corpus and the models' texts): the held-out paragraphs' continuations of
    the training prompts and :data:`OUTSIDER_CORPUS_TEXTS` cut from the corpus's training split;
    character 1-4-gram TF-IDF and logistic regression, classes weighted equally; calibrated on the
    calibration split at the run's reject rate. None where the run has no held-out paragraphs."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    from natprints.attribution.fastpath import export_ngram_logistic
    from natprints.attribution.features import char_tfidf
    from natprints.generate.stage import outsider_texts

    if setup.tokenizer is None or not open_set_applies(data):
        return None
    if not (setup.cfg.paths.corpus / "heldout.jsonl").is_file():
        return None
    train = parts["train"][first_samples(parts["train"], setup.cfg)]
    human = outsider_texts(setup.cfg, train["prompt_id"].astype(str).unique())
    human = human.loc[human["source"] == "human", "text"].tolist()
    human += corpus_continuations(setup, OUTSIDER_CORPUS_TEXTS)
    texts = train["text"].tolist() + human
    y = np.r_[np.zeros(len(train), dtype=np.int64), np.ones(len(human), dtype=np.int64)]
    weights = np.r_[np.full(len(train), len(human) / max(len(train), 1)), np.ones(len(human))]
    pipeline = Pipeline(
        [("features", char_tfidf((1, 4), None)), ("classifier", LogisticRegression(C=OUTSIDER_C, max_iter=2000))]
    )
    pipeline.fit(texts, y, classifier__sample_weight=weights)
    exported = export_ngram_logistic(pipeline, binary=True)
    if exported is None:
        raise NatprintsError(f"condition {data.name}: the outsider detector has no fast path to save")
    cal = parts["cal"]
    test = OutsiderTest(*exported, np.zeros(0), cal["label"].to_numpy(), setup.settings.open_set_reject_rate)
    return replace(test, own=test.scores(cal["text"].tolist()))


def attributor_outsiders(
    setup: Setup, data: ConditionData, parts: dict[str, pd.DataFrame], attributor: Attributor, proba: np.ndarray
) -> list[dict[str, Any]]:
    """The saved attributor (every model of the condition known) on the human continuations and junk
    of the test prompts: pools of k texts are ``unknown`` by its outsider test (or, without one, when
    their pooled calibrated probability stays below its threshold), as `natprints attribute --pool`
    calls them. ``proba``: its calibrated probabilities of the condition's test texts."""
    from natprints.generate.stage import OUTSIDERS, outsider_texts

    if setup.tokenizer is None or not open_set_applies(data):
        return []  # texts the run did not generate have no held-out paragraphs to continue
    if not (setup.cfg.paths.corpus / "heldout.jsonl").is_file():
        return []  # generated texts without the run's corpus (a test's synthetic run)
    test = parts["test"]
    strangers = outsider_texts(setup.cfg, test["prompt_id"].astype(str).unique())
    sources = strangers["source"].to_numpy()

    def log(p: np.ndarray) -> np.ndarray:
        return np.log(np.clip(np.asarray(p, dtype=np.float64), 1e-300, 1.0))

    known_log, outsider_log = log(proba), log(attributor.predict_proba(strangers["text"].tolist()))
    test_scores = strangers_scores = None
    if attributor.outsider is not None:
        test_scores = attributor.outsider.scores(test["text"].tolist())
        strangers_scores = attributor.outsider.scores(strangers["text"].tolist())

    def statistic(scores: np.ndarray, groups: list[np.ndarray], detector: np.ndarray | None) -> np.ndarray:
        if not groups:
            return np.zeros(0)
        sums = np.stack([scores[g].sum(axis=0) for g in groups])
        if detector is None:  # no outsider test
            return -np.exp(log_posterior(sums).max(axis=1))  # minus the pooled verdict's probability
        best = sums.argmax(axis=1)  # the pooled verdict's label (its probability is the softmax's largest)
        return np.array([attributor.outsider.statistic(detector[g], int(b)) for g, b in zip(groups, best, strict=True)])

    seed = setup.settings.split_seed
    y = test["label"].to_numpy()
    records = []
    for k in OPEN_SET_POOLS:
        known = statistic(known_log, ceiling.pool_groups(y, k, seed), test_scores)
        if not len(known):
            continue
        for source in OUTSIDERS:
            groups = _outsider_groups(sources, source, k, seed)
            if groups:
                outsider = statistic(outsider_log, groups, strangers_scores)
                # without an outsider test: rejected when the probability is below the threshold, i.e. -p
                # above -threshold
                limit = -attributor.threshold if attributor.outsider is None else 0.0
                records.append(_outsider_record(data, "attributor", source, k, limit, known, outsider))
    return records


def white_box(
    setup: Setup,
    data: ConditionData,
    parts: dict[str, pd.DataFrame],
    views: dict[str, LikelihoodView] | None,
    black_box: dict[str, tuple[tuple[str, str], np.ndarray]],
) -> list[dict[str, Any]]:
    """The likelihood attributor's records, the reference LMs', and the pooled accuracy of both and of
    ``black_box``: each from its view (``test``: the zoo's own scores; ``ref_test``: the reference LMs')."""
    if not views:
        return []
    test = parts["test"]
    y_test = test["label"].to_numpy()
    settings = setup.cfg.likelihood
    # texts of declared models have no token count of one tokenizer: their ceiling is on whole texts
    max_tokens = int(max(len(t) for t in data.frame["token_ids"])) if not data.strings else None
    records: list[dict[str, Any]] = []
    log_scores: dict[str, tuple[tuple[str, str], np.ndarray]] = {}
    n_train = len(parts["train"])
    for role, key, name, white in (
        ("ceiling", CEILING, "test", True),
        ("reflm", REFERENCE, "ref_test", False),
        ("head", HEAD, "head_test", False),
        ("minilm", ENCODER, "minilm_test", False),
    ):
        if name not in views:
            continue
        view = views[name]
        record = pipeline_record(data, *key, 0 if white else n_train, y_test, ceiling.bayes_predict(view.loglik))
        records.append(record | {"best": False, "white_box": white})
        for n_tokens in setup.settings.evidence_tokens:
            full = n_tokens <= 0 or (max_tokens is not None and n_tokens >= max_tokens)
            if not full and not view.prefix:
                continue  # a classifier of whole texts, or strings of many tokenizers
            y_pred = ceiling.bayes_predict(view.loglik if full else view.prefix[n_tokens])
            records.append(evidence_record(data, *key, role, "tokens", n_tokens, n_train, y_test, y_pred))
        log_scores[role] = (key, log_posterior(view.loglik))
    train = parts["train"]
    for role, key, name in (
        ("reflm", REFERENCE, "ref_test"),
        ("head", HEAD, "head_test"),
        ("minilm", ENCODER, "minilm_test"),
    ):
        for samples in setup.settings.evidence_train_samples if name in views else []:
            view = views.get(f"{name}@{samples}", views[name])  # absent: the full training split
            n = int((train["sample_index"] < samples).sum())
            y_pred = ceiling.bayes_predict(view.loglik)
            records.append(evidence_record(data, *key, role, "train_samples", samples, n, y_test, y_pred))
    for role, (key, proba) in black_box.items():
        log_scores[role] = (key, np.log(np.clip(np.asarray(proba, dtype=np.float64), 1e-300, 1.0)))
    if setup.settings.combine_reference and "reflm" in log_scores and "best" in log_scores:
        # a product of experts with equal weights (no weight is fit): log p_reflm + log p_best, renormalized
        combined = log_posterior(log_scores["reflm"][1] + log_scores["best"][1])
        members = [REFERENCE_PIPELINE, "+".join(black_box["best"][0])]
        record = pipeline_record(data, *COMBINED, n_train, y_test, ceiling.bayes_predict(combined), members=members)
        records.append(record | {"best": False, "white_box": False})
        log_scores["combined"] = (COMBINED, combined)
    sample_ids = test["sample_id"].astype(str).tolist()
    for role, (key, scores) in log_scores.items():
        records.append(
            {
                "kind": "posteriors",
                "condition": data.name,
                "role": role,
                "featurizer": key[0],
                "classifier": key[1],
                "pipeline": "+".join(key),
                "labels": data.labels,
                "sample_ids": sample_ids,
                "y_true": y_test.tolist(),
                "log_posterior": np.round(scores, 5).tolist(),  # 5 decimals keep results.jsonl under 5 MiB
            }
        )
        for k in settings.pool_sizes:
            groups = ceiling.pool_groups(y_test, k, setup.settings.split_seed)
            if not groups:
                continue  # fewer than k test texts per model
            y_pool = np.array([y_test[g[0]] for g in groups], dtype=np.int64)
            predicted = ceiling.pooled_predictions(scores, groups)
            summary = classification_summary(y_pool, predicted, len(data.labels))
            records.append(
                {
                    "kind": "pooled",
                    "condition": data.name,
                    "role": role,
                    "pipeline": "+".join(key),
                    "k": k,
                    "n_groups": len(groups),
                    **{m: summary[m] for m in ("n_correct", "chance", "accuracy", "ci_low", "ci_high")},
                }
            )
    if "test" not in views:
        return records
    if "string" in views:
        records.append(_string_ceiling(data, parts, views["string"]))
    if "canonical" in views:
        records.append(_segmented_ceiling(data, y_test, views["test"], views["canonical"]))
    return (
        records
        + _sequential_records(setup, data, parts, views, log_scores)
        + _likelihood_open_set(setup, data, parts, views)
        + _likelihood_outsiders(setup, data, parts, views)
        + _kl_records(setup, data, parts, views)
    )


SEQUENTIAL_STREAM = 16  # texts per stream of the sequential test (each of one source, in a random order)
# (fewer when a model has fewer test texts)


def _sequential_record(
    data: ConditionData,
    role: str,
    pipeline: str,
    case: str,
    error: float,
    verdicts: list,
    truth: list[int] | None,
    length: int,
) -> dict[str, Any]:
    """One sequential test on many streams: how each ended, and after how many texts. ``truth``: each
    stream's source (None: no candidate wrote it, so naming any is an error)."""
    truths = truth if truth is not None else [None] * len(verdicts)
    right = [v.named() and v.label == t for v, t in zip(verdicts, truths, strict=True)]
    named = [v.named() for v in verdicts]
    return {
        "kind": "sequential",
        "condition": data.name,
        "role": role,
        "pipeline": pipeline,
        "case": case,
        "error": error,
        "stream_texts": length,
        "n_streams": len(verdicts),
        "named_right": int(sum(right)),
        "named_wrong": int(sum(named) - sum(right)),
        "unknown": int(sum(v.label == sequential.UNKNOWN for v in verdicts)),
        "undecided": int(sum(v.label == sequential.UNDECIDED for v in verdicts)),
        "texts_to_verdict": [v.texts for v in verdicts if v.label != sequential.UNDECIDED],
    }


def _sequential_records(
    setup: Setup,
    data: ConditionData,
    parts: dict[str, pd.DataFrame],
    views: dict[str, LikelihoodView],
    log_scores: dict[str, tuple[tuple[str, str], np.ndarray]],
) -> list[dict[str, Any]]:
    """The sequential test (:mod:`natprints.attribution.sequential`) on streams of each model's test
    texts: the ceiling (exact likelihoods, with the open-set test beside it where the moments were
    scored), the best pipeline's calibrated attributor and the baseline; and, for the ceiling, streams no
    candidate wrote: each model left out of the library in turn, and human continuations."""
    if data.name == NULL_CONDITION:
        return []
    y = parts["test"]["label"].to_numpy()
    seed = setup.settings.split_seed
    length = min(SEQUENTIAL_STREAM, int(np.bincount(y).min()))  # a small run: one stream per model
    flows = sequential.streams(y, length, seed) if length > 0 else []
    if not flows:
        return []
    truth = [int(y[f[0]]) for f in flows]
    test = views.get("test")
    moments = test is not None and not np.isnan(test.entropy).any()
    centred = test.loglik + test.entropy if moments else None
    records = []
    for role in ("ceiling", "best", "baseline"):
        if role not in log_scores:
            continue
        key, scores = log_scores[role]
        parts_of = (centred, test.variance) if role == "ceiling" and moments else (None, None)
        for error in sequential.ERRORS:
            verdicts = [
                sequential.decide(scores[f], error, *(None if a is None else a[f] for a in parts_of)) for f in flows
            ]
            records.append(_sequential_record(data, role, "+".join(key), "known", error, verdicts, truth, length))
    if not moments or "outsiders" not in views:
        return records
    outsiders = views["outsiders"]
    human = np.array([sid.startswith("human:") for sid in outsiders.sample_ids])
    human_flows = sequential.streams(np.where(human, 0, 1), length, seed)
    human_flows = [f for f in human_flows if human[f[0]]]
    k = len(data.labels)
    for error in sequential.ERRORS:
        verdicts = [
            sequential.decide(
                outsiders.loglik[f], error, outsiders.loglik[f] + outsiders.entropy[f], outsiders.variance[f]
            )
            for f in human_flows
        ]
        if verdicts:
            record = _sequential_record(data, "ceiling", CEILING_PIPELINE, "human", error, verdicts, None, length)
            records.append(record)
        left_out = []
        for held in range(k):
            known = [i for i in range(k) if i != held]
            for f, t in zip(flows, truth, strict=True):
                if t == held:
                    rows = np.ix_(f, known)
                    left_out.append(sequential.decide(test.loglik[rows], error, centred[rows], test.variance[rows]))
        case = "left-out model"
        records.append(_sequential_record(data, "ceiling", CEILING_PIPELINE, case, error, left_out, None, length))
    return records


def _string_ceiling(data: ConditionData, parts: dict[str, pd.DataFrame], view: ceiling.StringView) -> dict[str, Any]:
    """The ceiling on strings: the Bayes attributor scoring each test text as its canonical
    tokenization, and as a string summed over its most probable segmentations (where scored), against
    scoring the ids it was sampled as (all without the end event), with how often the sampled and
    canonical tokenizations differ per model."""
    y = parts["test"]["label"].to_numpy()
    k = len(data.labels)
    token = classification_summary(y, ceiling.bayes_predict(view.sampled), k)
    string = classification_summary(y, ceiling.bayes_predict(view.canonical), k)
    on = view.differs
    ways = [("token", view.sampled), ("string", view.canonical)]
    if view.segmented is not None:
        ways.append(("segmented", view.segmented))
    true_rank = {
        name: float((ceiling.bayes_predict(scores[on]) == y[on]).mean()) if on.any() else float("nan")
        for name, scores in ways
    }
    segmented: dict[str, Any] = {}
    if view.segmented is not None and len(y):
        summary = classification_summary(y, ceiling.bayes_predict(view.segmented), k)
        own = np.arange(len(y)), y  # each text under its true model
        segmented = {
            "segmented": {key: summary[key] for key in ("accuracy", "ci_low", "ci_high", "n_correct")},
            "segmented_on_differing": true_rank["segmented"],
            # mean nats by which the true model's string score falls short of its sampled path's
            "true_gap_canonical": float(np.mean(view.sampled[own] - view.canonical[own])),
            "true_gap_segmented": float(np.mean(view.sampled[own] - view.segmented[own])),
        }
    return {
        "kind": "string_ceiling",
        "condition": data.name,
        "labels": data.labels,
        "n_test": int(len(y)),
        "differs": float(on.mean()) if len(y) else 0.0,
        "differs_by_model": {m: float(on[y == i].mean()) if (y == i).any() else 0.0 for i, m in enumerate(data.labels)},
        "n_differs": int(on.sum()),
        "token": {key: token[key] for key in ("accuracy", "ci_low", "ci_high", "n_correct")},
        "string": {key: string[key] for key in ("accuracy", "ci_low", "ci_high", "n_correct")},
        "token_on_differing": true_rank["token"],
        "string_on_differing": true_rank["string"],
        # the string-level ceiling inside the token-level one's 95% interval
        "agrees": bool(token["ci_low"] <= string["accuracy"] <= token["ci_high"]),
        **segmented,
        **(
            {"agrees_segmented": bool(token["ci_low"] <= segmented["segmented"]["accuracy"] <= token["ci_high"])}
            if segmented
            else {}
        ),
    }


def _segmented_ceiling(
    data: ConditionData, y: np.ndarray, summed: LikelihoodView, canonical: LikelihoodView
) -> dict[str, Any]:
    """The ceiling of a condition whose texts are strings only (own-tokenizer models) scored over each
    text's most probable segmentations (its headline) against its canonical tokens alone, and the nats
    by which the search raised each true model's score of its own texts."""
    k = len(data.labels)
    out: dict[str, Any] = {"kind": "segmented_ceiling", "condition": data.name, "labels": data.labels, "n_test": len(y)}
    for name, view in (("canonical", canonical), ("segmented", summed)):
        summary = classification_summary(y, ceiling.bayes_predict(view.loglik), k)
        out[name] = {key: summary[key] for key in ("accuracy", "ci_low", "ci_high", "n_correct")}
    own = np.arange(len(y)), y
    finite = np.isfinite(canonical.loglik[own])  # a text its own tokenizer cannot read back is -inf both ways
    gain, owner = (summed.loglik[own] - canonical.loglik[own])[finite], y[finite]
    out["true_gain"] = float(gain.mean()) if len(gain) else 0.0
    out["gain_by_model"] = {
        m: float(gain[owner == i].mean()) if (owner == i).any() else 0.0 for i, m in enumerate(data.labels)
    }
    return out


def _kl_records(
    setup: Setup, data: ConditionData, parts: dict[str, pd.DataFrame], views: dict[str, LikelihoodView]
) -> list[dict]:
    """Per ordered pair of the condition's models: the per-token KL divergence of their text distributions,
    estimated on the first model's own test and cal texts (only in `all`, which holds every pair); and
    its decomposition by what the two models share (init seed, data order, neither, or another factor)."""
    from natprints.zoo import zoo_specs

    if data.name != "all":
        return []
    view = ceiling.concat_views(views["test"], views["cal"])
    both = pd.concat([parts["test"], parts["cal"]], ignore_index=True)
    y = both["label"].to_numpy()
    specs = {m: spec for m, (spec, _) in zoo_specs(setup.cfg).items()}
    records = []
    relations = {}
    for a, model_a in enumerate(data.labels):
        for b, model_b in enumerate(data.labels):
            kl, se, n_tokens, n_texts = ceiling.kl_per_token(view, y, a, b)
            rel = ceiling.relation(specs[model_a], specs[model_b]) if model_a in specs and model_b in specs else None
            if a < b and rel is not None:
                relations[a, b] = rel
            records.append(
                {
                    "kind": "kl",
                    "condition": data.name,
                    "model_a": model_a,
                    "model_b": model_b,
                    "relation": rel,
                    "kl_per_token": kl,
                    "se": se,
                    "n_tokens": n_tokens,
                    "n_texts": n_texts,
                }
            )
    if relations:
        prompts = both["prompt_id"].astype(str).to_numpy()
        summary, tests = ceiling.kl_decomposition(view, y, prompts, relations, seed=setup.settings.split_seed)
        records += [{"kind": "kl_relation", "condition": data.name, **row} for row in summary]
        records += [{"kind": "kl_test", "condition": data.name, **row} for row in tests]
    return records


def _likelihood_open_set(
    setup: Setup, data: ConditionData, parts: dict[str, pd.DataFrame], views: dict[str, LikelihoodView]
) -> list[dict[str, Any]]:
    """Leave each model out of the library in turn: how often its pools are called `unknown`, and how
    often known models' pools are (the false rejections the threshold controls)."""
    if not open_set_applies(data):
        return []
    k_models = len(data.labels)
    settings = setup.cfg.likelihood
    alpha = settings.open_set_alpha
    test, cal = parts["test"], parts["cal"]
    y_test, y_cal = test["label"].to_numpy(), cal["label"].to_numpy()
    records = []
    for held in range(k_models):
        known = [i for i in range(k_models) if i != held]
        for k in OPEN_SET_POOLS:
            groups = ceiling.pool_groups(y_test, k, setup.settings.split_seed)
            if not groups:
                continue
            is_held = np.array([y_test[g[0]] == held for g in groups], dtype=bool)
            thresholds = ceiling.margin_thresholds(
                views["cal"].loglik, y_cal, known, k, alpha, settings.open_set_resamples, setup.settings.split_seed
            )
            rejected = {
                "margin": ceiling.margin_rejects(views["test"].loglik, groups, known, thresholds),
                "analytic": ceiling.analytic_rejects(views["test"], groups, known, alpha),
            }
            if "bg_test" in views:
                limits = _background_thresholds(setup, views, y_cal, known, k)
                rejected["background"] = _background_statistic(views, "test", groups, known, limits) > 0
                joint = _joint_thresholds(setup, views, y_cal, known, k)
                rejected["joint"] = _joint_statistic(views, "test", groups, known, joint) > 0
            for method, rej in rejected.items():
                records.append(
                    {
                        "kind": "open_set_likelihood",
                        "condition": data.name,
                        "method": method,
                        "held_out_model": data.labels[held],
                        "k": k,
                        "alpha": alpha,
                        "n_unknown": int(is_held.sum()),
                        "n_known": int((~is_held).sum()),
                        "unknown_rejected_n": int(rej[is_held].sum()),
                        "known_rejected_n": int(rej[~is_held].sum()),
                    }
                )
    return records


def _own_texts(views: dict[str, LikelihoodView], y_cal: np.ndarray) -> tuple[LikelihoodView, np.ndarray, np.ndarray]:
    """The texts that calibrate the background and joint tests: each model's own calibration texts
    and, where scored, its own training-split texts (``own_train``: 4 times as many; 150 calibration
    texts alone left each threshold's sampling error visible in the false rejections at 16 texts), as
    one view (read in each text's own column), their reference-LM scores and their labels."""
    cal, background, y = views["cal"], views["bg_cal"].loglik[:, 0], y_cal
    if "own_train" not in views or "bg_train" not in views:
        return cal, background, y
    train = views["own_train"]
    own = LikelihoodView(
        np.concatenate([cal.sample_ids, train.sample_ids]),
        np.vstack([cal.loglik, train.loglik]),
        {},
        np.vstack([cal.entropy, train.entropy]),
        np.vstack([cal.variance, train.variance]),
        np.concatenate([cal.events, train.events]),
    )
    y = np.concatenate([y_cal, (~np.isnan(train.loglik)).argmax(axis=1)])  # its one scored column
    return own, np.concatenate([background, views["bg_train"].loglik[:, 0]]), y


def _background_thresholds(
    setup: Setup, views: dict[str, LikelihoodView], y_cal: np.ndarray, known: list[int], k: int
) -> dict[int, float]:
    """Per known model, the background test's threshold from pools of k of its own texts (:func:`_own_texts`)."""
    settings = setup.cfg.likelihood
    own, background, y = _own_texts(views, y_cal)
    return ceiling.background_thresholds(
        own.loglik,
        background,
        own.events,
        y,
        known,
        k,
        settings.open_set_alpha,
        settings.open_set_resamples,
        setup.settings.split_seed,
    )


def _joint_thresholds(
    setup: Setup, views: dict[str, LikelihoodView], y_cal: np.ndarray, known: list[int], k: int
) -> dict[int, ceiling.JointLimit]:
    """Per known model, the joint test's limit from pools of k of its own texts (:func:`_own_texts`)."""
    settings = setup.cfg.likelihood
    own, background, y = _own_texts(views, y_cal)
    return ceiling.joint_thresholds(
        own, background, y, known, k, settings.open_set_alpha, settings.open_set_resamples, setup.settings.split_seed
    )


def _background_statistic(
    views: dict[str, LikelihoodView], part: str, pools: list[np.ndarray], known: list[int], limits: dict[int, float]
) -> np.ndarray:
    """Per pool of ``part`` (test or outsiders): the background test's statistic (above 0: ``unknown``)."""
    view, background = views[part], views[f"bg_{part}"].loglik[:, 0]
    return ceiling.background_statistic(view.loglik, background, view.events, pools, known, limits)


def _joint_statistic(
    views: dict[str, LikelihoodView],
    part: str,
    pools: list[np.ndarray],
    known: list[int],
    limits: dict[int, ceiling.JointLimit],
) -> np.ndarray:
    """Per pool of ``part`` (test or outsiders): the joint test's statistic (above 0: ``unknown``)."""
    return ceiling.joint_statistic(views[part], views[f"bg_{part}"].loglik[:, 0], pools, known, limits)


def _likelihood_statistics(
    views: dict[str, LikelihoodView],
    part: str,
    pools: list[np.ndarray],
    known: list[int],
    thresholds: dict[int, float],
    background: tuple[dict[int, float], dict[int, ceiling.JointLimit]] | None,
) -> dict[str, np.ndarray]:
    """Per pool of ``part``, each likelihood test's statistic (above its limit: ``unknown``); the
    background and joint tests where the reference LM scored the texts (``background``: their limits)."""
    view = views[part]
    out = {
        "margin": ceiling.margin_statistic(view.loglik, pools, known, thresholds),
        "analytic": ceiling.analytic_statistic(view, pools, known),
    }
    if background is not None:
        out["background"] = _background_statistic(views, part, pools, known, background[0])
        out["joint"] = _joint_statistic(views, part, pools, known, background[1])
    return out


def background_views(
    data: ConditionData, split: dict[str, str], views: dict[str, LikelihoodView], refs: dict[str, pd.DataFrame]
) -> dict[str, LikelihoodView]:
    """The condition's test, calibration and outsider texts scored under the reference LM itself, the
    background model of the likelihood open-set test (keys ``bg_test``, ``bg_cal``, ``bg_outsiders``;
    every column the same scores). Empty without those scores or without an open-set test."""
    from natprints.reference.stage import BACKGROUND

    if BACKGROUND not in refs or "outsiders" not in views:
        return {}
    scores = {m: refs[BACKGROUND] for m in data.frame["model_id"].astype(str).unique()}
    parts = split_parts(data, split)
    out = {f"bg_{s}": ceiling.condition_view(data, parts[s], scores, []) for s in ("test", "cal")}
    strangers = pd.DataFrame({"sample_id": views["outsiders"].sample_ids})
    out["bg_outsiders"] = ceiling.condition_view(data, strangers, scores, [])
    if "own_train" in views and set(views["own_train"].sample_ids) <= set(refs[BACKGROUND].index):
        own = pd.DataFrame({"sample_id": views["own_train"].sample_ids})
        out["bg_train"] = ceiling.condition_view(data, own, scores, [])
    return out


def _likelihood_outsiders(
    setup: Setup, data: ConditionData, parts: dict[str, pd.DataFrame], views: dict[str, LikelihoodView]
) -> list[dict[str, Any]]:
    """Both likelihood tests, every model of the condition known, on pools of human continuations and
    of junk: how often they are called ``unknown``, against how often the known models' own pools are."""
    from scipy.stats import norm

    from natprints.generate.stage import OUTSIDERS

    if "outsiders" not in views:
        return []
    settings, seed = setup.cfg.likelihood, setup.settings.split_seed
    alpha = settings.open_set_alpha
    known_models = list(range(len(data.labels)))
    outsiders = views["outsiders"]
    sources = np.array([sid.split(":", 1)[0] for sid in outsiders.sample_ids])
    y_test, y_cal = parts["test"]["label"].to_numpy(), parts["cal"]["label"].to_numpy()
    records = []
    for k in OPEN_SET_POOLS:
        groups = ceiling.pool_groups(y_test, k, seed)
        if not groups:
            continue
        thresholds = ceiling.margin_thresholds(
            views["cal"].loglik, y_cal, known_models, k, alpha, settings.open_set_resamples, seed
        )

        background = None
        if "bg_test" in views:
            background = (
                _background_thresholds(setup, views, y_cal, known_models, k),
                _joint_thresholds(setup, views, y_cal, known_models, k),
            )
        limits = {"margin": 0.0, "analytic": float(norm.ppf(1 - alpha / 2)), "background": 0.0, "joint": 0.0}
        known = _likelihood_statistics(views, "test", groups, known_models, thresholds, background)
        for source in OUTSIDERS:
            pools = _outsider_groups(sources, source, k, seed)
            if not pools:
                continue
            outsider = _likelihood_statistics(views, "outsiders", pools, known_models, thresholds, background)
            for method in outsider:
                limit = limits[method]
                record = _outsider_record(data, method, source, k, limit, known[method], outsider[method])
                records.append(record | {"alpha": alpha})
    return records


def likelihood_views(
    cfg: Config, data: ConditionData, split: dict[str, str], scores: dict[str, pd.DataFrame]
) -> dict[str, LikelihoodView]:
    """The condition's test and cal texts scored under each label's model, at every evidence length."""
    parts = split_parts(data, split)
    prefixes = [n for n in cfg.attribution.evidence_tokens if n > 0]
    views: dict[str, Any] = {s: ceiling.condition_view(data, parts[s], scores, prefixes) for s in ("test", "cal")}
    if data.name != NULL_CONDITION:
        views["string"] = ceiling.string_view(data, parts["test"], scores)
    if open_set_applies(data):
        from natprints.generate.stage import OUTSIDERS

        # the human continuations and junk of the test prompts (the likelihood stage scores them)
        prompts = sorted(set(parts["test"]["prompt_id"].astype(str)))
        ids = [f"{source}:{p}" for source in OUTSIDERS for p in prompts]
        views["outsiders"] = ceiling.condition_view(data, pd.DataFrame({"sample_id": ids}), scores, [])
        # each model's own training-split texts under it (the likelihood stage scores them for this test)
        train = split_parts(data, split)["train"]
        own = ceiling.own_view(data, train[first_samples(train, cfg)], scores)
        if own is not None:
            views["own_train"] = own
    return views


def declared_views(
    data: ConditionData, split: dict[str, str], scores: dict[str, pd.DataFrame]
) -> dict[str, LikelihoodView]:
    """A declared condition's test and cal texts scored as strings under each label's model (whole
    texts only: the models count tokens of different tokenizers); ``canonical``: the test texts scored
    as their canonical tokens alone (where the scores keep them)."""
    parts = split_parts(data, split)
    views = {s: ceiling.condition_view(data, parts[s], scores, []) for s in ("test", "cal")}
    if all("canonical" in table.columns for table in scores.values()):
        canonical = {m: table.assign(loglik=table["canonical"]) for m, table in scores.items()}
        views["canonical"] = ceiling.condition_view(data, parts["test"], canonical, [])
    return views


def reference_views(
    cfg: Config, pending: dict[str, ConditionData], split: dict[str, str], refs: dict[str, pd.DataFrame] | None
) -> dict[str, dict[str, LikelihoodView]]:
    """The reference-LM scores of each condition's test and cal texts (keys ``ref_test``, ``ref_cal``)."""
    if not refs:
        return {}
    prefixes = [n for n in cfg.attribution.evidence_tokens if n > 0]
    out = {}
    for name, data in pending.items():
        parts = split_parts(data, split)
        out[name] = {f"ref_{s}": ceiling.condition_view(data, parts[s], refs, prefixes) for s in ("test", "cal")}
        for samples in cfg.attribution.evidence_train_samples:
            # the reference LMs fine-tuned on the first `samples` continuations of each training prompt
            subset = {
                m: refs[subset_id(m, samples)]
                for m in data.frame["model_id"].astype(str).unique()
                if subset_id(m, samples) in refs
            }
            if subset:
                out[name][f"ref_test@{samples}"] = ceiling.condition_view(data, parts["test"], subset, [])
        for seed in repeat_seeds(cfg):
            # the reference LMs fine-tuned on a further split's training texts, on that split's tests
            tuned = {m: refs.get(split_id(m, seed)) for m in data.frame["model_id"].astype(str).unique()}
            test = split_parts(data, repeat_split(data.frame["prompt_id"], cfg, seed))["test"]
            wanted = set(test["sample_id"].astype(str))
            if all(t is not None and wanted <= set(t.index) for t in tuned.values()):
                out[name][f"ref_test#{seed}"] = ceiling.condition_view(data, test, tuned, [])
    return out


def classifier_views(
    cfg: Config, pending: dict[str, ConditionData], split: dict[str, str]
) -> dict[str, dict[str, LikelihoodView]]:
    """The reference stage's classifiers' log-probabilities of each condition's test texts, where it
    trained them: the reference-LM head (``head_test``) and the fine-tuned encoder (``minilm_test``, a
    condition of any tokenizers), each also per training-size point (``…@n``)."""
    out: dict[str, dict[str, LikelihoodView]] = {}
    for name, data in pending.items():
        test = split_parts(data, split)["test"]
        # only the classifiers this config asks for: files of an earlier config may still lie there
        kinds = [("head", "head_test")] if cfg.reference.head else []
        kinds += [(ENCODER_PREFIX, "minilm_test")] if name in cfg.reference.encoder_conditions else []
        for tag in [name, *(f"{name}@s{n}" for n in cfg.attribution.evidence_train_samples)]:
            for prefix, view in kinds:
                scores = load_head(cfg.paths.reference_scores, tag, prefix)
                if scores is not None:
                    out.setdefault(name, {})[view + tag[len(name) :].replace("@s", "@")] = _head_view(test, scores)
    return out


def _head_view(frame: pd.DataFrame, head: pd.DataFrame) -> LikelihoodView:
    """A classifier's log-probabilities of ``frame``'s texts as a view: its argmax is the verdict and
    its softmax the posterior, as for likelihoods (no prefixes: it saw whole texts only)."""
    sample_ids = frame["sample_id"].astype(str).to_numpy()
    missing = set(sample_ids) - set(head.index)
    if missing:
        raise NatprintsError(f"the classifier head lacks {len(missing)} test text(s); rerun `natprints reference`")
    scores = np.stack(head.loc[sample_ids, "log_proba"].to_numpy()).astype(np.float64)
    zeros = np.zeros_like(scores)
    return LikelihoodView(sample_ids, scores, {}, zeros, zeros, np.zeros(len(sample_ids), dtype=np.int64))


def run_joint_limits(cfg: Config, condition: str, k: int, alpha: float) -> dict[str, ceiling.JointLimit] | None:
    """Each zoo model of ``condition`` (by model id): the joint open-set test's limit for pools of
    ``k`` texts at level ``alpha``, calibrated on its own calibration and training-split texts as the
    experiments stage calibrates it; None where the condition has no open-set test or the run lacks the
    likelihood or reference-LM scores it needs."""
    from natprints.conditions import load_conditions, run_split
    from natprints.likelihood.stage import likelihood_key, load_scores
    from natprints.reference.stage import _manifest as reference_manifest
    from natprints.reference.stage import reference_key

    conditions = load_conditions(cfg, declared=True)  # the split the experiments stage draws
    data = conditions.get(condition)
    if data is None or data.strings or not open_set_applies(data):
        return None
    if likelihood_key(cfg) is None or reference_key(cfg) is None:
        return None
    split = run_split(cfg, conditions)
    views = likelihood_views(cfg, data, split, load_scores(cfg))
    views |= background_views(data, split, views, load_scores(cfg, reference_manifest(cfg)))
    if "bg_cal" not in views:
        return None
    y_cal = split_parts(data, split)["cal"]["label"].to_numpy()
    own, background, y = _own_texts(views, y_cal)
    known = list(range(len(data.labels)))
    settings = cfg.likelihood
    limits = ceiling.joint_thresholds(
        own, background, y, known, k, alpha, settings.open_set_resamples, cfg.attribution.split_seed
    )
    return {data.labels[j]: limit for j, limit in limits.items()}
