"""Attribution experiments: can a classifier tell, from generated text, which zoo model wrote it?

For each condition (models differing in one training factor) and the null control, every
(featurizer, classifier) pipeline is fit on the training prompts only and scored on the test
prompts. The stage writes tidy records to ``reports/<run>/results.jsonl`` (with predictions and
confusion matrices, so every table can be recomputed), ``reports/<run>/accuracy.csv``, evidence
curves, explanations, open-set measurements, and the best pipeline per condition as an attributor
under ``models/<run>/attributors/<condition>/``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from natprints.artifacts import Manifest, atomic_write_json, hash_obj
from natprints.attribution import ceiling, features, sequential
from natprints.attribution.attributor import (
    Attributor,
    apply_temperature,
    choose_threshold,
    fit_temperature,
    save_attributor,
    text_digest,
)
from natprints.attribution.ceiling import LikelihoodView
from natprints.attribution.estimators import THREADS, compatible, make_classifier, quiet_fit
from natprints.conditions import (
    CALIBRATION_FRACTION,
    ConditionData,
    load_conditions,
    open_set_applies,
    run_split,
    split_parts,
    split_prompts,
)
from natprints.config import CLASSIFIERS, FEATURIZERS, NULL_CONDITION, Config
from natprints.corpus import load_tokenizer
from natprints.errors import NatprintsError
from natprints.likelihood.stage import likelihood_key, load_scores
from natprints.records import write_results
from natprints.reference.head import load_head
from natprints.reference.stage import _manifest as reference_manifest
from natprints.reference.stage import reference_key, subset_id
from natprints.runtime import StageResult, output_changed, run_jobs
from natprints.stats import classification_summary, log_posterior, roc_summary

# 2: the null control is named `null_control` in every record (pandas reads `null` as NaN).
# 3: a length-only control per condition; the string-level ceiling (canonical tokenization).
EXPERIMENTS_VERSION = 6  # bump when the records change meaning: cached results are then redone
BASELINE = ("word1", "logreg")
# The white-box attributor: every candidate model's exact likelihood of the text (the ceiling).
CEILING = ("likelihood", "bayes")
# Black-box generative: per-candidate LMs fine-tuned from the auditor's own reference LM.
REFERENCE = ("reflm", "lm")
# Black-box discriminative: a classification head on the reference LM, fine-tuned per condition.
HEAD = ("reflm", "head")
# Black-box, both kinds: the reference LMs' posterior times the best pipeline's calibrated one.
COMBINED = ("combined", "product")
OPEN_SET_POOLS = (1, 4, 16)  # texts per pool in the open-set test of the likelihood attributor
EXPLAIN = ("word12", "logreg")
# A default for a setting that has no config key (yet).
OPEN_SET_MAX_HELD_OUT = 3  # zoo models left out, one at a time, to measure open-set rejection
EXPERIMENTS_MANIFEST = "experiments.json"

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- pipelines ------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What every pipeline fit of a run shares: its config, prompt split, tokenizer and fit timings."""

    cfg: Config
    split: dict[str, str]
    tokenizer: Any  # None for texts the run did not generate: evidence is then counted in words
    progress: bool
    timings: dict[str, float] = field(default_factory=dict)
    open_set: tuple[str, ...] = ("all",)  # the conditions whose models are left out one at a time

    @property
    def unit(self) -> str:
        """What the evidence curve counts: generated tokens, or words of texts without them."""
        return "words" if self.tokenizer is None else "tokens"

    @property
    def settings(self) -> Any:
        return self.cfg.attribution

    def featurizer(self, name: str) -> Any:
        return features.make_featurizer(
            name,
            max_features=self.settings.max_features,
            cache_dir=self.cfg.paths.cache / "embeddings",
            embed_batch_size=self.settings.embed_batch_size,
            device=self.cfg.run.device,
            threads=self.cfg.run.threads,
            tokenizer=self.tokenizer_json,
        )

    @property
    def tokenizer_json(self) -> str:
        path = self.cfg.paths.tokenizer / "tokenizer.json"
        return path.read_text(encoding="utf-8") if path.is_file() else ""


def _pipeline(featurizer: Any, classifier: Any) -> Any:
    from sklearn.pipeline import Pipeline

    return Pipeline([("features", featurizer), ("classifier", classifier)])


def _fit(setup: Setup, feat: str, clf: str, train: pd.DataFrame, texts: Callable | None = None) -> Any:
    """Fit one (featurizer, classifier) pipeline on ``train`` only."""
    texts = texts or _full_texts
    pipe = _pipeline(setup.featurizer(feat), make_classifier(clf, setup.settings.split_seed))
    with quiet_fit():
        pipe.fit(texts(train), train["label"].to_numpy())
    return pipe


def fit_predict(
    setup: Setup, feat: str, clf: str, train: pd.DataFrame, test: pd.DataFrame, texts: Callable | None = None
) -> tuple[Any, np.ndarray]:
    """Fit on ``train`` only, then predict ``test``."""
    pipe = _fit(setup, feat, clf, train, texts)
    return pipe, np.asarray(pipe.predict((texts or _full_texts)(test)), dtype=np.int64)


def _full_texts(frame: pd.DataFrame) -> list[str]:
    return frame["text"].tolist()


# --- one condition --------------------------------------------------------------------------------


def _pipeline_record(
    data: ConditionData, feat: str, clf: str, n_train: int, y_true: np.ndarray, y_pred: np.ndarray, **extra: Any
) -> dict[str, Any]:
    k = len(data.labels)
    return {
        "kind": "pipeline",
        "condition": data.name,
        "featurizer": feat,
        "classifier": clf,
        "pipeline": f"{feat}+{clf}",
        "labels": data.labels,
        "n_classes": k,
        "n_train": n_train,
        **classification_summary(y_true, y_pred, k),
        "y_true": y_true.tolist(),
        "y_pred": y_pred.tolist(),
        **extra,
    }


def _run_grid(
    setup: Setup, data: ConditionData, parts: dict[str, pd.DataFrame]
) -> tuple[list[dict[str, Any]], dict[tuple[str, str], Any], dict[tuple[str, str], np.ndarray]]:
    """Every (featurizer, classifier) of the config: records, fitted pipelines, calibration probas.

    A featurizer is fit once on the training texts and shared by the pipelines built on it, which
    is the same as fitting each pipeline alone (featurizers are deterministic given their input).
    """
    from tqdm import tqdm

    train, cal, test = parts["train"], parts["cal"], parts["test"]
    y_train, y_test = train["label"].to_numpy(), test["label"].to_numpy()
    records, fitted, cal_proba = [], {}, {}
    feats, clfs = setup.settings.featurizers, setup.settings.classifiers
    pairs = sum(compatible(f, c) for f in feats for c in clfs)
    bar = tqdm(total=pairs, desc=f"attribution {data.name}", disable=not setup.progress)
    for feat in feats:
        start = time.perf_counter()
        featurizer = setup.featurizer(feat)
        x_train = featurizer.fit_transform(train["text"].tolist())
        x_test = featurizer.transform(test["text"].tolist())
        x_cal = featurizer.transform(cal["text"].tolist()) if len(cal) else None
        feat_seconds = time.perf_counter() - start
        for clf in clfs:
            if not compatible(feat, clf):
                continue
            start = time.perf_counter()
            classifier = make_classifier(clf, setup.settings.split_seed)
            with quiet_fit():
                classifier.fit(x_train, y_train)
            y_pred = np.asarray(classifier.predict(x_test), dtype=np.int64)
            fitted[feat, clf] = _pipeline(featurizer, classifier)
            cal_accuracy = None
            if x_cal is not None:
                cal_proba[feat, clf] = np.asarray(classifier.predict_proba(x_cal))
                y_cal_pred = np.asarray(classifier.predict(x_cal), dtype=np.int64)
                cal_accuracy = float((y_cal_pred == cal["label"].to_numpy()).mean())
            records.append(
                _pipeline_record(data, feat, clf, len(train), y_test, y_pred, n_cal=len(cal), cal_accuracy=cal_accuracy)
            )
            # Timings go to the stage manifest, not the records, so that reruns give identical records.
            setup.timings[f"{data.name}/{feat}+{clf}"] = round(feat_seconds + time.perf_counter() - start, 2)
            bar.update(1)
    bar.close()
    best = best_record(records)
    for r in records:
        r["best"] = r is best
        r["selected_by"] = "calibration" if r.get("cal_accuracy") is not None else "fixed"
    return records, fitted, cal_proba


def length_features(frame: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """Each text's length only: characters, words and, where the frame has them, generated tokens
    (else UTF-8 bytes), on a log scale."""
    texts = frame["text"].astype(str).tolist()
    columns = {"characters": [len(t) for t in texts], "words": [len(t.split()) for t in texts]}
    if "token_ids" in frame.columns:
        columns["tokens"] = [len(ids) for ids in frame["token_ids"]]
    else:
        columns["bytes"] = [len(t.encode("utf-8")) for t in texts]
    return list(columns), np.log1p(np.asarray(list(columns.values()), dtype=np.float64).T)


def _length_control(data: ConditionData, parts: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """Logistic regression on the texts' lengths alone: at chance unless length gives the source away."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, test = parts["train"], parts["test"]
    names, x_train = length_features(train)
    _, x_test = length_features(test)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    with quiet_fit():
        model.fit(x_train, train["label"].to_numpy())
    y_test = test["label"].to_numpy()
    summary = classification_summary(y_test, np.asarray(model.predict(x_test), dtype=np.int64), len(data.labels))
    return {
        "kind": "length_control",
        "condition": data.name,
        "pipeline": "length+logreg",
        "features": names,
        "labels": data.labels,
        "n_classes": len(data.labels),
        "n_train": len(train),
        **summary,
        # above chance beyond its interval: length alone tells the sources apart
        "leaks": bool(summary["ci_low"] > summary["chance"]),
    }


def _order_key(record: dict[str, Any]) -> tuple[int, int]:
    f, c = record["featurizer"], record["classifier"]
    return (
        FEATURIZERS.index(f) if f in FEATURIZERS else 99,
        CLASSIFIERS.index(c) if c in CLASSIFIERS else 99,
    )


def best_record(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The best pipeline, chosen without looking at the test texts: the highest accuracy on the
    calibration split, ties to the simpler (earlier) pipeline. The test accuracy reported for it is
    then an unbiased estimate; taking the highest *test* accuracy of ~30 pipelines is not (the null
    control's maximum sat at p = 0.009 when it was chosen that way). Without calibration texts: the
    unigram baseline, fixed in advance."""
    if all(r.get("cal_accuracy") is not None for r in records):
        return sorted(records, key=lambda r: (-r["cal_accuracy"], _order_key(r)))[0]
    fixed = [r for r in records if (r["featurizer"], r["classifier"]) == BASELINE]
    return fixed[0] if fixed else min(records, key=_order_key)


def _lengths(setup: Setup, frame: pd.DataFrame) -> list[int]:
    """Each text's length in the evidence curve's unit."""
    if setup.tokenizer is None:
        return [len(t.split()) for t in frame["text"]]
    return [len(ids) for ids in frame["token_ids"]]


def _truncated(setup: Setup, frame: pd.DataFrame, n_tokens: int) -> list[str]:
    """The first ``n_tokens`` generated tokens of each text (0 = all), decoded as the generator did;
    without a tokenizer, the first ``n_tokens`` whitespace-separated words."""
    if n_tokens <= 0:
        return frame["text"].tolist()
    if setup.tokenizer is None:
        return [" ".join(t.split()[:n_tokens]) for t in frame["text"]]
    out = frame["text"].tolist()
    cut = [i for i, ids in enumerate(frame["token_ids"]) if len(ids) > n_tokens]
    decoded = setup.tokenizer.batch_decode([[int(t) for t in frame["token_ids"].iloc[i][:n_tokens]] for i in cut])
    for i, text in zip(cut, decoded, strict=True):
        out[i] = text
    return out


def _too_few(clf: str, labels: pd.Series, k: int) -> str | None:
    """Why ``clf`` cannot fit on so few training texts, or None: every model needs a text, the SVM
    calibrates over 3 folds, the MLP stops early on a tenth of the texts that must hold 2."""
    counts = labels.value_counts()
    per_model = int(counts.min()) if len(counts) == k else 0
    if per_model < 1:
        return "no training text for some model"
    if clf == "svm" and per_model < 3:
        return f"{per_model} training text(s) per model, the svm's 3-fold calibration needs 3"
    if clf == "mlp" and math.ceil(0.1 * len(labels)) < 2:
        return f"{len(labels)} training texts, the mlp's early-stopping tenth needs 2 (11 texts)"
    return None


def _evidence(
    setup: Setup, data: ConditionData, parts: dict[str, pd.DataFrame], grid: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Accuracy against tokens shown and against training-set size, for the best and the baseline."""
    train, test = parts["train"], parts["test"]
    best = next(r for r in grid if r["best"])
    pipelines = [(best["featurizer"], best["classifier"])]
    if BASELINE not in pipelines:
        pipelines.append(BASELINE)
    by_pipeline = {(r["featurizer"], r["classifier"]): r for r in grid}
    max_tokens = max(_lengths(setup, data.frame))
    train_prompts = sorted(train["prompt_id"].astype(str).unique())
    shuffle = np.random.default_rng(setup.settings.split_seed).permutation(len(train_prompts))
    prompt_order = [train_prompts[i] for i in shuffle]
    records = []
    y_test = test["label"].to_numpy()
    for feat, clf in pipelines:
        role = "best" if (feat, clf) == pipelines[0] else "baseline"
        for n_tokens in setup.settings.evidence_tokens:
            full = n_tokens <= 0 or n_tokens >= max_tokens
            if full and (feat, clf) in by_pipeline:
                y_pred = np.asarray(by_pipeline[feat, clf]["y_pred"])
            else:
                n = 0 if full else n_tokens

                def texts(f: pd.DataFrame, n: int = n) -> list[str]:
                    return _truncated(setup, f, n)

                _, y_pred = fit_predict(setup, feat, clf, train, test, texts)
            records.append(_evidence_record(data, feat, clf, role, setup.unit, n_tokens, len(train), y_test, y_pred))
        for fraction in setup.settings.evidence_train_fractions:
            keep = set(prompt_order[: max(1, math.ceil(fraction * len(prompt_order)))])
            subset = train[train["prompt_id"].astype(str).isin(keep)]
            if len(keep) == len(prompt_order) and (feat, clf) in by_pipeline:
                y_pred = np.asarray(by_pipeline[feat, clf]["y_pred"])
            elif reason := _too_few(clf, subset["label"], len(data.labels)):
                _stderr(f"{data.name}: evidence point train_fraction = {fraction:g} of {feat}+{clf} left out: {reason}")
                continue
            else:
                _, y_pred = fit_predict(setup, feat, clf, subset, test)
            records.append(
                _evidence_record(data, feat, clf, role, "train_fraction", fraction, len(subset), y_test, y_pred)
            )
        for samples in setup.settings.evidence_train_samples:
            subset = train[train["sample_index"] < samples]
            if len(subset) == len(train) and (feat, clf) in by_pipeline:
                y_pred = np.asarray(by_pipeline[feat, clf]["y_pred"])
            else:
                _, y_pred = fit_predict(setup, feat, clf, subset, test)
            records.append(
                _evidence_record(data, feat, clf, role, "train_samples", samples, len(subset), y_test, y_pred)
            )
    return records


def _evidence_record(
    data: ConditionData,
    feat: str,
    clf: str,
    role: str,
    axis: str,
    value: float,
    n_train: int,
    y_true: np.ndarray,
    y_pred: np.ndarray,
) -> dict[str, Any]:
    summary = classification_summary(y_true, y_pred, len(data.labels))
    summary.pop("confusion")
    return {
        "kind": "evidence",
        "condition": data.name,
        "featurizer": feat,
        "classifier": clf,
        "pipeline": f"{feat}+{clf}",
        "role": role,
        "axis": axis,
        "value": value,
        "n_classes": len(data.labels),
        "n_train": n_train,
        **summary,
    }


def _explanations(
    setup: Setup, data: ConditionData, parts: dict[str, pd.DataFrame], fitted: dict[tuple[str, str], Any]
) -> list[dict[str, Any]]:
    """Per model, the word n-grams whose logistic-regression weights most favour it."""
    train = parts["train"]
    pipe = fitted.get(EXPLAIN) or fit_predict(setup, *EXPLAIN, train, parts["test"])[0]
    vectorizer, model = pipe.named_steps["features"], pipe.named_steps["classifier"]
    names = vectorizer.get_feature_names_out()
    coef = np.asarray(model.coef_)
    if coef.shape[0] == 1:  # binary: one row for class 1
        coef = np.vstack([-coef[0], coef[0]])
    present = vectorizer.transform(train["text"].tolist()) > 0
    y = train["label"].to_numpy()
    records = []
    for i, model_id in enumerate(data.labels):
        mine, rest = present[y == i], present[y != i]
        share_mine = np.asarray(mine.mean(axis=0)).ravel() if mine.shape[0] else np.zeros(len(names))
        share_rest = np.asarray(rest.mean(axis=0)).ravel() if rest.shape[0] else np.zeros(len(names))
        top = np.argsort(-coef[i], kind="stable")[: setup.settings.top_ngrams]
        records.append(
            {
                "kind": "explanation",
                "condition": data.name,
                "pipeline": "+".join(EXPLAIN),
                "model_id": model_id,
                "ngrams": [
                    {
                        "ngram": str(names[j]),
                        "weight": round(float(coef[i, j]), 6),
                        "share_model": round(float(share_mine[j]), 6),
                        "share_rest": round(float(share_rest[j]), 6),
                    }
                    for j in top
                ],
            }
        )
    return records


def _calibrate(setup: Setup, pipe: Any, labels: list[str], cal: pd.DataFrame, raw_cal: np.ndarray | None) -> Attributor:
    """Temperature and open-set threshold, both chosen on the held-out calibration prompts."""
    if raw_cal is None:
        raw_cal = np.asarray(pipe.predict_proba(cal["text"].tolist())) if len(cal) else np.zeros((0, len(labels)))
    attributor = Attributor(pipeline=pipe, labels=labels)
    y_cal = cal["label"].to_numpy()
    attributor.temperature = fit_temperature(raw_cal, y_cal) if len(cal) else 1.0
    best = apply_temperature(raw_cal, attributor.temperature).max(axis=1) if len(cal) else np.zeros(0)
    attributor.threshold = choose_threshold(best, setup.settings.open_set_reject_rate)
    return attributor


def seen_texts(parts: dict[str, pd.DataFrame]) -> dict[str, frozenset[str]]:
    """Part name -> the digests of its texts (:func:`~natprints.attribution.attributor.text_digest`):
    what a saved attributor learned or was calibrated on, for `attribute`'s warning."""
    return {part: frozenset(text_digest(t) for t in frame["text"]) for part, frame in parts.items()}


def _attributor_record(
    data: ConditionData, best: dict[str, Any], attributor: Attributor, test: pd.DataFrame, n_cal: int
) -> dict[str, Any]:
    proba = attributor.predict_proba(test["text"].tolist())
    y = test["label"].to_numpy()
    top = proba.argmax(axis=1)
    accepted = proba.max(axis=1) >= attributor.threshold
    return {
        "kind": "attributor",
        "condition": data.name,
        "pipeline": best["pipeline"],
        "featurizer": best["featurizer"],
        "classifier": best["classifier"],
        "labels": data.labels,
        "n_cal": n_cal,
        "temperature": attributor.temperature,
        "threshold": attributor.threshold,
        "n_test": len(y),
        "accuracy": float((top == y).mean()) if len(y) else 0.0,
        "known_rejected": float(1 - accepted.mean()) if len(y) else 0.0,
        "accepted_accuracy": float((top == y)[accepted].mean()) if accepted.any() else 0.0,
        # per test text: the calibrated verdict and its probability (reliability diagram, `unknown` column)
        "y_true": y.tolist(),
        "y_pred": top.tolist(),
        "confidence": [round(float(c), 6) for c in proba.max(axis=1)],
    }


def _repeated_splits(
    setup: Setup, data: ConditionData, best: tuple[str, str], views: dict[str, LikelihoodView] | None
) -> list[dict[str, Any]]:
    """The headline figures on further prompt splits (seeds ``split_seed + 1``, ...): the best
    pipeline, as chosen on the run's split, and the baseline, each refit on the split's training
    texts and scored on its test texts; the ceiling on the split's test texts that the likelihood
    stage scored (the run's test and calibration texts: the ceiling learns nothing, so any of its
    texts is a test text). The reference LMs are not repeated: each split would fine-tune them anew."""
    settings = setup.settings
    scored = ceiling.concat_views(views["test"], views["cal"]) if views and "cal" in views else None
    row_of = {str(sid): i for i, sid in enumerate(scored.sample_ids)} if scored is not None else {}
    out = []
    for seed in range(settings.split_seed + 1, settings.split_seed + settings.splits):
        split = split_prompts(data.frame["prompt_id"], settings.test_fraction, CALIBRATION_FRACTION, seed)
        parts = split_parts(data, split)
        train, test = parts["train"], parts["test"]
        y = test["label"].to_numpy()
        record: dict[str, Any] = {
            "kind": "split_repeat",
            "condition": data.name,
            "split_seed": seed,
            "n_train": len(train),
            "n_test": len(test),
            "chance": 1.0 / len(data.labels),
        }
        for role, (feat, clf) in (("best", best), ("baseline", BASELINE)):
            if feat not in settings.featurizers or clf not in settings.classifiers or not compatible(feat, clf):
                continue
            if _too_few(clf, train["label"], len(data.labels)) or test.empty:
                continue
            predicted = fit_predict(setup, feat, clf, train, test)[1]
            record[role] = {"pipeline": f"{feat}+{clf}", "accuracy": float((predicted == y).mean())}
        rows = [row_of[sid] for sid in test["sample_id"].astype(str) if sid in row_of]
        if rows:
            labels = data.frame.set_index(data.frame["sample_id"].astype(str))["label"]
            truth = labels.loc[scored.sample_ids[rows].astype(str)].to_numpy()
            right = ceiling.bayes_predict(scored.loglik[rows]) == truth
            record["ceiling"] = {"accuracy": float(right.mean()), "n_test": len(rows)}
        out.append(record)
    return out


def _without(frame: pd.DataFrame, held: int) -> pd.DataFrame:
    """Drop one class and renumber the others 0..k-2, keeping their order."""
    sub = frame[frame["label"] != held]
    return sub.assign(label=sub["label"].where(sub["label"] < held, sub["label"] - 1).astype(np.int64))


def _open_set(
    setup: Setup, data: ConditionData, parts: dict[str, pd.DataFrame], best: dict[str, Any]
) -> list[dict[str, Any]]:
    """Leave one zoo model out: the share of its texts called `unknown` vs known texts rejected."""
    k = len(data.labels)
    if k < 3 or OPEN_SET_MAX_HELD_OUT <= 0:
        return []
    records = []
    for held in sorted({int(i) for i in np.linspace(0, k - 1, min(k, OPEN_SET_MAX_HELD_OUT)).round()}):
        known = [i for i in range(k) if i != held]
        train, cal = _without(parts["train"], held), _without(parts["cal"], held)
        pipe = _fit(setup, best["featurizer"], best["classifier"], train)
        attributor = _calibrate(setup, pipe, [data.labels[i] for i in known], cal, None)
        test = parts["test"]
        best_p = attributor.predict_proba(test["text"].tolist()).max(axis=1)
        rejected = best_p < attributor.threshold
        is_held = (test["label"] == held).to_numpy()
        records.append(
            {
                "kind": "open_set",
                "condition": data.name,
                "pipeline": best["pipeline"],
                "held_out_model": data.labels[held],
                "threshold": attributor.threshold,
                "target_reject_rate": setup.settings.open_set_reject_rate,
                "n_unknown": int(is_held.sum()),
                "n_known": int((~is_held).sum()),
                "unknown_rejected": float(rejected[is_held].mean()) if is_held.any() else 0.0,
                "known_rejected": float(rejected[~is_held].mean()) if (~is_held).any() else 0.0,
            }
        )
    return records


def run_condition(
    setup: Setup, data: ConditionData, views: dict[str, LikelihoodView] | None = None
) -> tuple[list[dict[str, Any]], Attributor | None]:
    """All records of one condition, and its calibrated best pipeline (none for the null control).

    ``views``: the condition's likelihood scores of its test and cal texts (the white-box ceiling);
    without them the records are the black-box pipelines' only.
    """
    parts = split_parts(data, setup.split)
    train, cal, test = parts["train"], parts["cal"], parts["test"]
    missing = [data.labels[i] for i in range(len(data.labels)) if not (train["label"] == i).any()]
    if missing or test.empty:
        raise NatprintsError(f"condition {data.name}: too few prompts to split (no training texts of {missing})")
    records: list[dict[str, Any]] = [
        {
            "kind": "split",
            "condition": data.name,
            "labels": data.labels,
            "n_train": len(train),
            "n_cal": len(cal),
            "n_test": len(test),
            "prompts": {s: int(parts[s]["prompt_id"].nunique()) for s in parts},
            "test_sample_ids": test["sample_id"].astype(str).tolist(),
        }
    ]
    grid, fitted, cal_proba = _run_grid(setup, data, parts)
    records += grid
    records.append(_length_control(data, parts))
    best = next(r for r in grid if r["best"])
    key = (best["featurizer"], best["classifier"])
    test_texts = test["text"].tolist()
    black_box = (
        {"baseline": (BASELINE, np.asarray(fitted[BASELINE].predict_proba(test_texts)))} if BASELINE in fitted else {}
    )
    records += _repeated_splits(setup, data, key, views)
    if data.name == NULL_CONDITION:
        black_box["best"] = (key, np.asarray(fitted[key].predict_proba(test_texts)))
        return records + _white_box(setup, data, parts, views, black_box), None
    attributor = _calibrate(setup, fitted[key], data.labels, cal, cal_proba.get(key))
    attributor.seen = seen_texts({"train": train, "cal": cal})
    black_box["best"] = (key, attributor.predict_proba(test_texts))
    attributor.meta = {
        "condition": data.name,
        "featurizer": best["featurizer"],
        "classifier": best["classifier"],
        "pipeline": best["pipeline"],
        "test_accuracy": best["accuracy"],
    }
    records.append(_attributor_record(data, best, attributor, test, len(cal)))
    explanations = _explanations(setup, data, parts, fitted)
    fitted.clear()  # free the other pipelines before the refits below
    records += _evidence(setup, data, parts, grid)
    records += explanations
    records += _open_set(setup, data, parts, best) if data.name in setup.open_set else []
    records += _attributor_outsiders(setup, data, parts, attributor, black_box["best"][1])
    records += _white_box(setup, data, parts, views, black_box)
    return records, attributor


# --- `unknown` against outsiders: human continuations and junk ----------------------------------


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


def _attributor_outsiders(
    setup: Setup, data: ConditionData, parts: dict[str, pd.DataFrame], attributor: Attributor, proba: np.ndarray
) -> list[dict[str, Any]]:
    """The saved attributor (every model of the condition known) on the human continuations and junk
    of the test prompts: pools of k texts whose pooled calibrated probability stays below its
    threshold are ``unknown``, as `natprints attribute --pool` calls them. ``proba``: its calibrated
    probabilities of the condition's test texts."""
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

    def statistic(scores: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
        if not groups:
            return np.zeros(0)
        sums = np.stack([scores[g].sum(axis=0) for g in groups])
        return -np.exp(log_posterior(sums).max(axis=1))  # minus the pooled verdict's probability

    seed = setup.settings.split_seed
    y = test["label"].to_numpy()
    records = []
    for k in OPEN_SET_POOLS:
        known = statistic(known_log, ceiling.pool_groups(y, k, seed))
        if not len(known):
            continue
        for source in OUTSIDERS:
            groups = _outsider_groups(sources, source, k, seed)
            if groups:
                outsider = statistic(outsider_log, groups)
                # rejected when the probability is below the threshold, i.e. -p above -threshold
                limit = -attributor.threshold
                records.append(_outsider_record(data, "attributor", source, k, limit, known, outsider))
    return records


# --- white-box: the ceiling, pooled evidence, the open-set test ----------------------------------


def _white_box(
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
    max_tokens = int(max(len(t) for t in data.frame["token_ids"]))
    records: list[dict[str, Any]] = []
    log_scores: dict[str, tuple[tuple[str, str], np.ndarray]] = {}
    n_train = len(parts["train"])
    for role, key, name, white in (
        ("ceiling", CEILING, "test", True),
        ("reflm", REFERENCE, "ref_test", False),
        ("head", HEAD, "head_test", False),
    ):
        if name not in views:
            continue
        view = views[name]
        record = _pipeline_record(data, *key, 0 if white else n_train, y_test, ceiling.bayes_predict(view.loglik))
        records.append(record | {"best": False, "white_box": white})
        for n_tokens in setup.settings.evidence_tokens:
            full = n_tokens <= 0 or n_tokens >= max_tokens
            if not full and not view.prefix:
                continue  # a classifier of whole texts
            y_pred = ceiling.bayes_predict(view.loglik if full else view.prefix[n_tokens])
            records.append(_evidence_record(data, *key, role, "tokens", n_tokens, n_train, y_test, y_pred))
        log_scores[role] = (key, log_posterior(view.loglik))
    train = parts["train"]
    for role, key, name in (("reflm", REFERENCE, "ref_test"), ("head", HEAD, "head_test")):
        for samples in setup.settings.evidence_train_samples if name in views else []:
            view = views.get(f"{name}@{samples}", views[name])  # absent: the full training split
            n = int((train["sample_index"] < samples).sum())
            y_pred = ceiling.bayes_predict(view.loglik)
            records.append(_evidence_record(data, *key, role, "train_samples", samples, n, y_test, y_pred))
    for role, (key, proba) in black_box.items():
        log_scores[role] = (key, np.log(np.clip(np.asarray(proba, dtype=np.float64), 1e-300, 1.0)))
    if setup.settings.combine_reference and "reflm" in log_scores and "best" in log_scores:
        # a product of experts with equal weights (no weight is fit): log p_reflm + log p_best, renormalized
        combined = log_posterior(log_scores["reflm"][1] + log_scores["best"][1])
        members = ["+".join(REFERENCE), "+".join(black_box["best"][0])]
        record = _pipeline_record(data, *COMBINED, n_train, y_test, ceiling.bayes_predict(combined), members=members)
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
                "log_posterior": np.round(scores, 6).tolist(),
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
            record = _sequential_record(data, "ceiling", "+".join(CEILING), "human", error, verdicts, None, length)
            records.append(record)
        left_out = []
        for held in range(k):
            known = [i for i in range(k) if i != held]
            for f, t in zip(flows, truth, strict=True):
                if t == held:
                    rows = np.ix_(f, known)
                    left_out.append(sequential.decide(test.loglik[rows], error, centred[rows], test.variance[rows]))
        case = "left-out model"
        records.append(_sequential_record(data, "ceiling", "+".join(CEILING), case, error, left_out, None, length))
    return records


def _string_ceiling(data: ConditionData, parts: dict[str, pd.DataFrame], view: ceiling.StringView) -> dict[str, Any]:
    """The ceiling on strings: the Bayes attributor scoring each test text as its canonical
    tokenization, against scoring the ids it was sampled as (both without the end event), with how
    often the two tokenizations differ per model."""
    y = parts["test"]["label"].to_numpy()
    k = len(data.labels)
    token = classification_summary(y, ceiling.bayes_predict(view.sampled), k)
    string = classification_summary(y, ceiling.bayes_predict(view.canonical), k)
    on = view.differs
    true_rank = {
        name: float((ceiling.bayes_predict(scores[on]) == y[on]).mean()) if on.any() else float("nan")
        for name, scores in (("token", view.sampled), ("string", view.canonical))
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
    }


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


def _likelihood_statistics(
    view: LikelihoodView, pools: list[np.ndarray], known: list[int], thresholds: dict[int, float]
) -> dict[str, np.ndarray]:
    """Per pool, each likelihood test's statistic (above its limit: ``unknown``)."""
    return {
        "margin": ceiling.margin_statistic(view.loglik, pools, known, thresholds),
        "analytic": ceiling.analytic_statistic(view, pools, known),
    }


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

        limits = {"margin": 0.0, "analytic": float(norm.ppf(1 - alpha / 2))}
        known = _likelihood_statistics(views["test"], groups, known_models, thresholds)
        for source in OUTSIDERS:
            pools = _outsider_groups(sources, source, k, seed)
            if not pools:
                continue
            outsider = _likelihood_statistics(outsiders, pools, known_models, thresholds)
            for method, limit in limits.items():
                record = _outsider_record(data, method, source, k, limit, known[method], outsider[method])
                records.append(record | {"alpha": alpha})
    return records


# --- the stage ------------------------------------------------------------------------------------


def _condition_key(cfg: Config, data: ConditionData) -> str:
    return hash_obj(
        {
            "version": EXPERIMENTS_VERSION,
            "attribution": cfg.attribution.model_dump(mode="json"),
            "device": cfg.run.device,
            "calibration_fraction": CALIBRATION_FRACTION,
            "open_set_max_held_out": OPEN_SET_MAX_HELD_OUT,
            # Estimator settings live in code: their reprs make a changed setting redo the work.
            "classifiers": {c: repr(make_classifier(c, cfg.attribution.split_seed)) for c in CLASSIFIERS},
            "threads": THREADS,
            "condition": data.name,
            "labels": data.labels,
            "inputs": data.inputs,
            "likelihood": {"settings": cfg.likelihood.model_dump(mode="json"), "scores": likelihood_key(cfg)},
            "reference": reference_key(cfg),
        }
    )


def _stage_key(cfg: Config, conditions: dict[str, ConditionData]) -> str:
    return hash_obj({"run": cfg.run.name, "conditions": {n: _condition_key(cfg, d) for n, d in conditions.items()}})


def _manifest(cfg: Config) -> Manifest:
    return Manifest(cfg.paths.reports, "experiment results", EXPERIMENTS_MANIFEST)


def experiments_up_to_date(cfg: Config, conditions: dict[str, ConditionData] | None = None) -> bool:
    """True when the stage's outputs exist, verify, and were made from this config and these inputs."""
    conditions = conditions if conditions is not None else load_conditions(cfg)
    if not _manifest(cfg).is_current(_stage_key(cfg, conditions)):
        return False
    return all(attributor_intact(cfg, name) for name in conditions if name != NULL_CONDITION)


def attributor_intact(cfg: Config, name: str) -> bool:
    """The condition's saved attributor exists and every file of it matches its manifest hash (a
    damaged one is rebuilt by the stage, not reported as up to date)."""
    manifest = Manifest(cfg.paths.attributors / name, f"attributor {name}")
    try:
        return manifest.exists() and not manifest.mismatched()
    except NatprintsError:
        return False


def run_experiments(cfg: Config, *, force: bool = False, progress: bool = True, log: Log = _stderr) -> None:
    """The `experiments` stage: every condition's pipelines, records, tables and attributors.

    Idempotent: does nothing when its outputs match the config and the generated inputs. Resumable:
    each finished condition is kept under ``models/<run>/experiments/`` and not redone.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=THREADS):
        _run_experiments(cfg, force=force, progress=progress, log=log)


def _cached_condition(cfg: Config, name: str, key: str) -> tuple[list[dict[str, Any]], dict[str, float]] | None:
    """A finished condition's records and timings, when its cache matches ``key``."""
    cached = cfg.paths.models / "experiments" / f"{name}.json"
    if not cached.is_file():
        return None
    try:
        saved = json.loads(cached.read_text(encoding="utf-8"))
        if saved.get("key") == key and (name == NULL_CONDITION or attributor_intact(cfg, name)):
            return saved["records"], saved.get("seconds", {})
    except (ValueError, KeyError):
        pass
    return None


def _condition_job(
    cfg: Config,
    name: str,
    data: ConditionData,
    split: dict[str, str],
    key: str,
    views: dict[str, LikelihoodView] | None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Run one condition (in a worker process or here), save its attributor and cache its records."""
    from threadpoolctl import threadpool_limits

    # the full texts are in the cache already (_prefill_embeddings); the evidence curves' cut texts are
    # embedded here but not stored, so the cache is the same whatever order the conditions ran in
    with threadpool_limits(limits=THREADS), features.read_only_cache():
        # the run's tokenizer, the one the generator decoded continuations with
        setup = Setup(cfg=cfg, split=split, tokenizer=load_tokenizer(cfg.paths.tokenizer), progress=progress)
        start = time.perf_counter()
        done, attributor = run_condition(setup, data, views)
    if attributor is not None:
        # A saved attributor embeds user texts without writing them to the run's cache.
        params = attributor.pipeline.get_params(deep=True)
        attributor.pipeline.set_params(**{k: None for k in params if k.endswith("cache_dir")})
        save_attributor(
            cfg.paths.attributors / name,
            attributor,
            {
                "run": cfg.run.name,
                "condition": name,
                "config_hash": cfg.hash(),
                "condition_key": key,
                "inputs": data.inputs,
            },
        )
    wall = round(time.perf_counter() - start, 1)
    seconds = {
        "condition": wall,
        **{k.split("/", 1)[1]: v for k, v in setup.timings.items() if k.startswith(f"{name}/")},
    }
    atomic_write_json(
        cfg.paths.models / "experiments" / f"{name}.json", {"key": key, "records": done, "seconds": seconds}
    )
    _stderr(f"condition {name}: {len(data.labels)} models, done in {wall:.1f}s")
    return done, seconds


def _embed_job(cfg: Config, label: str, texts: list[str], progress: bool = True) -> int:
    """Embed ``texts`` into the run's embedding cache (so condition workers only read it)."""
    setup = Setup(cfg=cfg, split={}, tokenizer=None, progress=progress)
    setup.featurizer("embed").fit(texts).transform(texts)
    return len(texts)


EMBED_CHUNK = 2048  # texts per embedding job of the experiments stage


def _prefill_embeddings(cfg: Config, pending: dict[str, ConditionData]) -> None:
    """Embed every full text of the pending conditions once, split over the run's workers."""
    if not {"embed", "union"} & set(cfg.attribution.featurizers):
        return
    texts = sorted({t for data in pending.values() for t in _full_texts(data.frame)})
    # Fixed chunks, not one per worker: each text is embedded in the same batch whatever `workers` is.
    chunks = [texts[i : i + EMBED_CHUNK] for i in range(0, len(texts), EMBED_CHUNK)]
    jobs = [(cfg, f"embeddings {i + 1}/{len(chunks)}", chunk) for i, chunk in enumerate(chunks)]
    run_jobs(cfg.run.worker_count(), _embed_job, jobs, "embed")


def _views(
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
    return views


def _ref_views(
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
        for tag in [name, *(f"{name}@s{n}" for n in cfg.attribution.evidence_train_samples)]:
            head = load_head(cfg.paths.reference_scores, tag)
            if head is not None:
                view = "head_test" + tag[len(name) :].replace("@s", "@")
                out[name][view] = _head_view(parts["test"], head)
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


def _run_experiments(cfg: Config, *, force: bool, progress: bool, log: Log) -> None:
    """Conditions run ``[run] workers`` at a time, largest first; records keep the condition order."""
    started = time.perf_counter()
    conditions = load_conditions(cfg)
    if not force and experiments_up_to_date(cfg, conditions):
        log(f"experiments for run '{cfg.run.name}' are up to date")
        return
    split = run_split(cfg, conditions)
    keys = {name: _condition_key(cfg, data) for name, data in conditions.items()}
    results = {} if force else {name: _cached_condition(cfg, name, keys[name]) for name in conditions}
    pending = {name: data for name, data in conditions.items() if results.get(name) is None}
    if pending:
        _prefill_embeddings(cfg, pending)
        order = sorted(pending, key=lambda name: -len(pending[name].frame))
        scores = load_scores(cfg) if likelihood_key(cfg) is not None else None
        if scores is None:
            log("no likelihood scores (run `natprints likelihood`): the tables carry no ceiling")
        views = {name: _views(cfg, pending[name], split, scores) for name in order} if scores else {}
        refs = load_scores(cfg, reference_manifest(cfg)) if reference_key(cfg) is not None else None
        for name, view in _ref_views(cfg, pending, split, refs).items():
            views.setdefault(name, {}).update(view)
        jobs = [(cfg, name, pending[name], split, keys[name], views.get(name)) for name in order]
        results.update(zip(order, run_jobs(cfg.run.worker_count(), _condition_job, jobs, "condition"), strict=True))
    records = [r for name in conditions for r in results[name][0]]
    seconds = {name: results[name][1] for name in conditions}
    manifest = _manifest(cfg)
    manifest.invalidate()
    files = write_results(cfg.paths.reports, records)
    fields = {
        "stage": "experiments",
        "run": cfg.run.name,
        "config_hash": cfg.hash(),
        "inputs": {f: h for d in conditions.values() for f, h in d.inputs.items()},
        "conditions": list(conditions),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "seconds": seconds,
    }
    manifest.write(_stage_key(cfg, conditions), fields, files)


# --- records and tables ---------------------------------------------------------------------------


def run(cfg: Config, *, force: bool = False) -> StageResult:
    """The `experiments` stage: every condition's tables and attributors, and each best pipeline's line."""
    from natprints.records import accuracy_table, load_records

    with output_changed(cfg.paths.reports / "experiments.json") as changed:
        run_experiments(cfg, force=force)
    table = accuracy_table(load_records(cfg.paths.reports))
    lines = [
        f"{row.condition}: {row.pipeline} accuracy {row.accuracy:.3f} "
        f"[{row.ci_low:.3f}, {row.ci_high:.3f}], chance {row.chance:.3f}, p = {row.p_value:.2g}"
        for row in table[table["best"]].itertuples()
    ]
    return StageResult(changed(), (*lines, f"wrote {cfg.paths.reports / 'accuracy.csv'} and {cfg.paths.attributors}/"))
