"""Evidence curves: a pipeline's accuracy when it reads only the first n tokens of each text."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from natprints.attribution.grid import BASELINE, Setup, fit_predict, warn
from natprints.conditions import (
    ConditionData,
)
from natprints.stats import classification_summary


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


def too_few(clf: str, labels: pd.Series, k: int) -> str | None:
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


def evidence_records(
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
            records.append(evidence_record(data, feat, clf, role, setup.unit, n_tokens, len(train), y_test, y_pred))
        for fraction in setup.settings.evidence_train_fractions:
            keep = set(prompt_order[: max(1, math.ceil(fraction * len(prompt_order)))])
            subset = train[train["prompt_id"].astype(str).isin(keep)]
            if len(keep) == len(prompt_order) and (feat, clf) in by_pipeline:
                y_pred = np.asarray(by_pipeline[feat, clf]["y_pred"])
            elif reason := too_few(clf, subset["label"], len(data.labels)):
                warn(f"{data.name}: evidence point train_fraction = {fraction:g} of {feat}+{clf} left out: {reason}")
                continue
            else:
                _, y_pred = fit_predict(setup, feat, clf, subset, test)
            records.append(
                evidence_record(data, feat, clf, role, "train_fraction", fraction, len(subset), y_test, y_pred)
            )
        for samples in setup.settings.evidence_train_samples:
            subset = train[train["sample_index"] < samples]
            if len(subset) == len(train) and (feat, clf) in by_pipeline:
                y_pred = np.asarray(by_pipeline[feat, clf]["y_pred"])
            else:
                _, y_pred = fit_predict(setup, feat, clf, subset, test)
            records.append(
                evidence_record(data, feat, clf, role, "train_samples", samples, len(subset), y_test, y_pred)
            )
    return records


def evidence_record(
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
