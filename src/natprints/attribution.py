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
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from natprints import features
from natprints.artifacts import (
    atomic_write_json,
    atomic_write_text,
    git_revision,
    hash_obj,
    package_versions,
    read_manifest,
    sha256_file,
    verify_files,
)
from natprints.attributor import (
    Attributor,
    apply_temperature,
    choose_threshold,
    fit_temperature,
    save_attributor,
)
from natprints.config import Config
from natprints.errors import NatprintsError
from natprints.stats import classification_summary

EXPERIMENTS_VERSION = 1  # bump when the records change meaning: cached results are then redone
CONDITION_ORDER = ("seed", "init", "data_order", "size", "lr", "batch_size", "all")
NULL_CONDITION = "null"
BASELINE = ("word1", "logreg")
EXPLAIN = ("word12", "logreg")
# Defaults for settings that have no config key (yet).
CALIBRATION_FRACTION = 0.15  # share of prompts held out from training to calibrate attributors
OPEN_SET_MAX_HELD_OUT = 3  # zoo models left out, one at a time, to measure open-set rejection
# One thread for BLAS and OpenMP (XGBoost, scikit-learn): on a busy 2-core CPU two spinning threads
# made XGBoost up to 100x slower, and one is bit-for-bit repeatable. The sentence encoder, which is
# compute-bound, uses `run.threads` (0 = every core).
THREADS = 1
# Trees and the MLP see only the columns with the highest ANOVA F score (see features.TopFeatures).
XGB_FEATURES = 2000
MLP_FEATURES = 5000
RESULTS_FILE = "results.jsonl"
ACCURACY_FILE = "accuracy.csv"
EXPERIMENTS_MANIFEST = "experiments.json"
REQUIRED_COLUMNS = ("sample_id", "model_id", "prompt_id", "text", "token_ids", "sampling_seed")
ACCURACY_COLUMNS = (
    "condition",
    "featurizer",
    "classifier",
    "pipeline",
    "n_classes",
    "n_train",
    "n_test",
    "chance",
    "accuracy",
    "ci_low",
    "ci_high",
    "macro_f1",
    "p_value",
    "best",
)
FEATURIZER_ORDER = ("word1", "word12", "char14", "embed", "union")
CLASSIFIER_ORDER = ("logreg", "svm", "xgb", "mlp")

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- inputs ---------------------------------------------------------------------------------------


@dataclass
class ConditionData:
    """One condition's texts: ``label`` indexes ``labels`` (model ids taken from the data)."""

    name: str
    labels: list[str]
    frame: pd.DataFrame
    inputs: dict[str, str]  # input file (relative to the generated dir) -> sha256


def _read_generated(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise NatprintsError(f"generated file missing: {path} (run `natprints generate`)")
    try:
        frame = pd.read_parquet(path, columns=list(REQUIRED_COLUMNS))
    except (OSError, ValueError, KeyError) as exc:
        raise NatprintsError(f"{path}: unreadable generated file or missing columns ({exc})") from None
    if frame.empty:
        raise NatprintsError(f"{path}: no generated texts")
    return frame


def load_conditions(cfg: Config) -> dict[str, ConditionData]:
    """Read the generated corpora as one :class:`ConditionData` per condition, plus the null control."""
    gen_dir = cfg.paths.generated
    manifest = read_manifest(gen_dir, "generated corpora")
    if manifest.get("complete") is False:
        raise NatprintsError(f"generated corpora at {gen_dir} are incomplete; rerun `natprints generate`")
    if manifest.get("files"):
        verify_files(gen_dir, manifest, "generated corpora")
    models = manifest.get("models")
    conditions = manifest.get("conditions")
    if not isinstance(models, dict) or not isinstance(conditions, dict):
        raise NatprintsError(f"{gen_dir}/manifest.json lacks 'models' or 'conditions'")
    frames: dict[str, pd.DataFrame] = {}
    inputs: dict[str, str] = {}

    def model_frame(model_id: str) -> pd.DataFrame:
        if model_id not in frames:
            entry = models.get(model_id)
            if not isinstance(entry, dict) or "file" not in entry:
                raise NatprintsError(f"{gen_dir}/manifest.json: condition lists unknown model {model_id!r}")
            frame = _read_generated(gen_dir / entry["file"])
            found = set(frame["model_id"].astype(str))
            if found != {model_id}:
                raise NatprintsError(
                    f"{gen_dir / entry['file']}: holds texts of {sorted(found)}, manifest says {model_id!r}"
                )
            frames[model_id] = frame
            inputs[entry["file"]] = sha256_file(gen_dir / entry["file"])
        return frames[model_id]

    out: dict[str, ConditionData] = {}
    names = [c for c in CONDITION_ORDER if c in conditions] + sorted(set(conditions) - set(CONDITION_ORDER))
    for name in names:
        ids = sorted(dict.fromkeys(str(m) for m in conditions[name]))
        if len(ids) < 2:
            continue  # one model is not a classification problem
        frame = pd.concat([model_frame(m) for m in ids], ignore_index=True)
        files = {models[m]["file"]: inputs[models[m]["file"]] for m in ids}
        out[name] = _condition(name, frame, "model_id", files)
    null = manifest.get("null_control")
    if isinstance(null, dict) and "file" in null:
        base_id = str(null["model_id"])
        base = model_frame(base_id)
        other = _read_generated(gen_dir / null["file"])
        files = {models[base_id]["file"]: inputs[models[base_id]["file"]]}
        files[null["file"]] = sha256_file(gen_dir / null["file"])
        both = pd.concat([base, other], ignore_index=True)
        # The two classes are one model sampled with two seeds: the label is model@seed, from the data.
        both["null_label"] = both["model_id"].astype(str) + "@seed" + both["sampling_seed"].astype(str)
        if both["null_label"].nunique() != 2:
            raise NatprintsError(f"{gen_dir}: the null control needs the base model under two sampling seeds")
        out[NULL_CONDITION] = _condition(NULL_CONDITION, both, "null_label", files)
    if not out:
        raise NatprintsError(f"{gen_dir}: no condition with two or more models to attribute")
    return out


def _condition(name: str, frame: pd.DataFrame, label_column: str, files: dict[str, str]) -> ConditionData:
    labels = sorted(frame[label_column].astype(str).unique())
    index = {m: i for i, m in enumerate(labels)}
    frame = frame.assign(label=frame[label_column].astype(str).map(index).astype(np.int64))
    frame = frame.sort_values(["label", "prompt_id", "sample_id"], kind="stable").reset_index(drop=True)
    return ConditionData(name=name, labels=labels, frame=frame, inputs=dict(sorted(files.items())))


def split_prompts(prompt_ids: Iterable[str], test_fraction: float, cal_fraction: float, seed: int) -> dict[str, str]:
    """Assign each prompt to ``train``, ``cal`` or ``test``: every continuation of a prompt goes together."""
    prompts = sorted(set(map(str, prompt_ids)))
    order = np.random.default_rng(seed).permutation(len(prompts))
    n = len(prompts)
    n_test = min(max(1, round(test_fraction * n)), max(n - 1, 0))
    n_cal = min(max(1, round(cal_fraction * n)), max(n - n_test - 1, 0)) if cal_fraction > 0 else 0
    split = {}
    for rank, i in enumerate(order):
        split[prompts[i]] = "test" if rank < n_test else "cal" if rank < n_test + n_cal else "train"
    return split


# --- pipelines ------------------------------------------------------------------------------------


def make_classifier(name: str, seed: int = 0) -> Any:
    """A fresh classifier by its config name, with settings sized for a 2-core CPU run."""
    if name == "logreg":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=4.0, max_iter=500)
    if name == "svm":
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.svm import LinearSVC

        return CalibratedClassifierCV(LinearSVC(C=0.5, random_state=seed), method="sigmoid", cv=3)
    if name == "xgb":
        from sklearn.pipeline import Pipeline

        xgb = features.LabelXGBClassifier(
            n_estimators=60,
            max_depth=4,
            learning_rate=0.3,
            max_bin=32,
            colsample_bynode=0.3,
            n_jobs=THREADS,
            random_state=seed,
        )
        return Pipeline([("select", features.TopFeatures(XGB_FEATURES)), ("xgb", xgb)])
    if name == "mlp":
        from sklearn.neural_network import MLPClassifier
        from sklearn.pipeline import Pipeline

        mlp = MLPClassifier(
            hidden_layer_sizes=(64,),
            alpha=1e-3,
            early_stopping=True,
            n_iter_no_change=5,
            max_iter=40,
            random_state=seed,
        )
        return Pipeline([("select", features.TopFeatures(MLP_FEATURES)), ("mlp", mlp)])
    raise ValueError(f"unknown classifier {name!r}")


@dataclass
class _Setup:
    cfg: Config
    split: dict[str, str]
    tokenizer: Any
    progress: bool
    timings: dict[str, float] = field(default_factory=dict)

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
        )


def _pipeline(featurizer: Any, classifier: Any) -> Any:
    from sklearn.pipeline import Pipeline

    return Pipeline([("features", featurizer), ("classifier", classifier)])


def _fit(setup: _Setup, feat: str, clf: str, train: pd.DataFrame, texts: Callable | None = None) -> Any:
    """Fit one (featurizer, classifier) pipeline on ``train`` only."""
    texts = texts or _full_texts
    pipe = _pipeline(setup.featurizer(feat), make_classifier(clf, setup.settings.split_seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*(converge|iterations).*")
        pipe.fit(texts(train), train["label"].to_numpy())
    return pipe


def _fit_predict(
    setup: _Setup, feat: str, clf: str, train: pd.DataFrame, test: pd.DataFrame, texts: Callable | None = None
) -> tuple[Any, np.ndarray]:
    """Fit on ``train`` only, then predict ``test``."""
    pipe = _fit(setup, feat, clf, train, texts)
    return pipe, np.asarray(pipe.predict((texts or _full_texts)(test)), dtype=np.int64)


def _full_texts(frame: pd.DataFrame) -> list[str]:
    return frame["text"].tolist()


# --- one condition --------------------------------------------------------------------------------


def _parts(data: ConditionData, split: dict[str, str]) -> dict[str, pd.DataFrame]:
    where = data.frame["prompt_id"].astype(str).map(split).fillna("train")
    return {s: data.frame[where == s].reset_index(drop=True) for s in ("train", "cal", "test")}


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
    setup: _Setup, data: ConditionData, parts: dict[str, pd.DataFrame]
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
    bar = tqdm(total=len(feats) * len(clfs), desc=f"attribution {data.name}", disable=not setup.progress)
    for feat in feats:
        start = time.perf_counter()
        featurizer = setup.featurizer(feat)
        x_train = featurizer.fit_transform(train["text"].tolist())
        x_test = featurizer.transform(test["text"].tolist())
        x_cal = featurizer.transform(cal["text"].tolist()) if len(cal) else None
        feat_seconds = time.perf_counter() - start
        for clf in clfs:
            start = time.perf_counter()
            classifier = make_classifier(clf, setup.settings.split_seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=UserWarning)
                warnings.filterwarnings("ignore", message=".*(converge|iterations).*")
                classifier.fit(x_train, y_train)
            y_pred = np.asarray(classifier.predict(x_test), dtype=np.int64)
            fitted[feat, clf] = _pipeline(featurizer, classifier)
            if x_cal is not None:
                cal_proba[feat, clf] = np.asarray(classifier.predict_proba(x_cal))
            records.append(_pipeline_record(data, feat, clf, len(train), y_test, y_pred))
            # Timings go to the stage manifest, not the records, so that reruns give identical records.
            setup.timings[f"{data.name}/{feat}+{clf}"] = round(feat_seconds + time.perf_counter() - start, 2)
            bar.update(1)
    bar.close()
    best = best_record(records)
    for r in records:
        r["best"] = r is best
    return records, fitted, cal_proba


def _order_key(record: dict[str, Any]) -> tuple[int, int]:
    f, c = record["featurizer"], record["classifier"]
    return (
        FEATURIZER_ORDER.index(f) if f in FEATURIZER_ORDER else 99,
        CLASSIFIER_ORDER.index(c) if c in CLASSIFIER_ORDER else 99,
    )


def best_record(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The best pipeline: highest accuracy, then macro-F1, then the simpler (earlier) pipeline."""
    ranked = sorted(records, key=lambda r: (-r["accuracy"], -r["macro_f1"], _order_key(r)))
    return ranked[0]


def _truncated(setup: _Setup, frame: pd.DataFrame, n_tokens: int) -> list[str]:
    """The first ``n_tokens`` generated tokens of each text (0 = all), decoded as the generator did."""
    if n_tokens <= 0:
        return frame["text"].tolist()
    out = frame["text"].tolist()
    cut = [i for i, ids in enumerate(frame["token_ids"]) if len(ids) > n_tokens]
    decoded = setup.tokenizer.batch_decode([[int(t) for t in frame["token_ids"].iloc[i][:n_tokens]] for i in cut])
    for i, text in zip(cut, decoded, strict=True):
        out[i] = text
    return out


def _evidence(
    setup: _Setup, data: ConditionData, parts: dict[str, pd.DataFrame], grid: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Accuracy against tokens shown and against training-set size, for the best and the baseline."""
    train, test = parts["train"], parts["test"]
    best = next(r for r in grid if r["best"])
    pipelines = [(best["featurizer"], best["classifier"])]
    if BASELINE not in pipelines:
        pipelines.append(BASELINE)
    by_pipeline = {(r["featurizer"], r["classifier"]): r for r in grid}
    max_tokens = int(max(len(t) for t in data.frame["token_ids"]))
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

                _, y_pred = _fit_predict(setup, feat, clf, train, test, texts)
            records.append(_evidence_record(data, feat, clf, role, "tokens", n_tokens, len(train), y_test, y_pred))
        for fraction in setup.settings.evidence_train_fractions:
            keep = set(prompt_order[: max(1, math.ceil(fraction * len(prompt_order)))])
            subset = train[train["prompt_id"].astype(str).isin(keep)]
            if len(keep) == len(prompt_order) and (feat, clf) in by_pipeline:
                y_pred = np.asarray(by_pipeline[feat, clf]["y_pred"])
            elif subset["label"].nunique() < len(data.labels):
                continue  # too few prompts to see every model
            else:
                _, y_pred = _fit_predict(setup, feat, clf, subset, test)
            records.append(
                _evidence_record(data, feat, clf, role, "train_fraction", fraction, len(subset), y_test, y_pred)
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
    setup: _Setup, data: ConditionData, parts: dict[str, pd.DataFrame], fitted: dict[tuple[str, str], Any]
) -> list[dict[str, Any]]:
    """Per model, the word n-grams whose logistic-regression weights most favour it."""
    train = parts["train"]
    pipe = fitted.get(EXPLAIN) or _fit_predict(setup, *EXPLAIN, train, parts["test"])[0]
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


def _calibrate(
    setup: _Setup, pipe: Any, labels: list[str], cal: pd.DataFrame, raw_cal: np.ndarray | None
) -> Attributor:
    """Temperature and open-set threshold, both chosen on the held-out calibration prompts."""
    if raw_cal is None:
        raw_cal = np.asarray(pipe.predict_proba(cal["text"].tolist())) if len(cal) else np.zeros((0, len(labels)))
    attributor = Attributor(pipeline=pipe, labels=labels)
    y_cal = cal["label"].to_numpy()
    attributor.temperature = fit_temperature(raw_cal, y_cal) if len(cal) else 1.0
    best = apply_temperature(raw_cal, attributor.temperature).max(axis=1) if len(cal) else np.zeros(0)
    attributor.threshold = choose_threshold(best, setup.settings.open_set_reject_rate)
    return attributor


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
    }


def _without(frame: pd.DataFrame, held: int) -> pd.DataFrame:
    """Drop one class and renumber the others 0..k-2, keeping their order."""
    sub = frame[frame["label"] != held]
    return sub.assign(label=sub["label"].where(sub["label"] < held, sub["label"] - 1).astype(np.int64))


def _open_set(
    setup: _Setup, data: ConditionData, parts: dict[str, pd.DataFrame], best: dict[str, Any]
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


def run_condition(setup: _Setup, data: ConditionData) -> tuple[list[dict[str, Any]], Attributor | None]:
    """All records of one condition, and its calibrated best pipeline (none for the null control)."""
    parts = _parts(data, setup.split)
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
    if data.name == NULL_CONDITION:
        return records, None
    best = next(r for r in grid if r["best"])
    key = (best["featurizer"], best["classifier"])
    attributor = _calibrate(setup, fitted[key], data.labels, cal, cal_proba.get(key))
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
    records += _open_set(setup, data, parts, best) if data.name == "all" else []
    return records, attributor


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
            "classifiers": {c: repr(make_classifier(c, cfg.attribution.split_seed)) for c in CLASSIFIER_ORDER},
            "threads": THREADS,
            "condition": data.name,
            "labels": data.labels,
            "inputs": data.inputs,
        }
    )


def _stage_key(cfg: Config, conditions: dict[str, ConditionData]) -> str:
    return hash_obj({"run": cfg.run.name, "conditions": {n: _condition_key(cfg, d) for n, d in conditions.items()}})


def _load_tokenizer(cfg: Config) -> Any:
    """The run's tokenizer, the one the generator decoded continuations with."""
    from transformers import PreTrainedTokenizerFast

    path = cfg.paths.tokenizer
    if not (path / "tokenizer.json").is_file():
        raise NatprintsError(f"no tokenizer at {path}; run `natprints data` first")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def experiments_up_to_date(cfg: Config, conditions: dict[str, ConditionData] | None = None) -> bool:
    """True when the stage's outputs exist, verify, and were made from this config and these inputs."""
    reports = cfg.paths.reports
    path = reports / EXPERIMENTS_MANIFEST
    if not path.is_file():
        return False
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        verify_files(reports, manifest, "experiment results")
    except (ValueError, NatprintsError):
        return False
    conditions = conditions if conditions is not None else load_conditions(cfg)
    if manifest.get("key") != _stage_key(cfg, conditions):
        return False
    return all(
        (cfg.paths.attributors / name / "manifest.json").is_file() for name in conditions if name != NULL_CONDITION
    )


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
        if saved.get("key") == key and (
            name == NULL_CONDITION or (cfg.paths.attributors / name / "manifest.json").is_file()
        ):
            return saved["records"], saved.get("seconds", {})
    except (ValueError, KeyError):
        pass
    return None


def _condition_job(
    cfg: Config, name: str, data: ConditionData, split: dict[str, str], key: str, progress: bool = True
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Run one condition (in a worker process or here), save its attributor and cache its records."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=THREADS):
        setup = _Setup(cfg=cfg, split=split, tokenizer=_load_tokenizer(cfg), progress=progress)
        start = time.perf_counter()
        done, attributor = run_condition(setup, data)
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
    setup = _Setup(cfg=cfg, split={}, tokenizer=None, progress=progress)
    setup.featurizer("embed").fit(texts).transform(texts)
    return len(texts)


EMBED_CHUNK = 2048  # texts per embedding job of the experiments stage


def _prefill_embeddings(cfg: Config, pending: dict[str, ConditionData]) -> None:
    """Embed every full text of the pending conditions once, split over the run's workers."""
    if not {"embed", "union"} & set(cfg.attribution.featurizers):
        return
    from natprints.parallel import run_jobs

    texts = sorted({t for data in pending.values() for t in _full_texts(data.frame)})
    # Fixed chunks, not one per worker: each text is embedded in the same batch whatever `workers` is.
    chunks = [texts[i : i + EMBED_CHUNK] for i in range(0, len(texts), EMBED_CHUNK)]
    jobs = [(cfg, f"embeddings {i + 1}/{len(chunks)}", chunk) for i, chunk in enumerate(chunks)]
    run_jobs(cfg.run.workers, _embed_job, jobs, "embed")


def _run_experiments(cfg: Config, *, force: bool, progress: bool, log: Log) -> None:
    """Conditions run ``[run] workers`` at a time, largest first; records keep the condition order."""
    from natprints.parallel import run_jobs

    started = time.perf_counter()
    conditions = load_conditions(cfg)
    if not force and experiments_up_to_date(cfg, conditions):
        log(f"experiments for run '{cfg.run.name}' are up to date")
        return
    prompts = pd.concat([d.frame["prompt_id"] for d in conditions.values()]).astype(str)
    split = split_prompts(prompts, cfg.attribution.test_fraction, CALIBRATION_FRACTION, cfg.attribution.split_seed)
    keys = {name: _condition_key(cfg, data) for name, data in conditions.items()}
    results = {} if force else {name: _cached_condition(cfg, name, keys[name]) for name in conditions}
    pending = {name: data for name, data in conditions.items() if results.get(name) is None}
    if pending:
        _prefill_embeddings(cfg, pending)
        order = sorted(pending, key=lambda name: -len(pending[name].frame))
        jobs = [(cfg, name, pending[name], split, keys[name]) for name in order]
        results.update(zip(order, run_jobs(cfg.run.workers, _condition_job, jobs, "condition"), strict=True))
    records = [r for name in conditions for r in results[name][0]]
    seconds = {name: results[name][1] for name in conditions}
    write_results(cfg.paths.reports, records)
    fields = {
        "stage": "experiments",
        "run": cfg.run.name,
        "key": _stage_key(cfg, conditions),
        "config_hash": cfg.hash(),
        "inputs": {f: h for d in conditions.values() for f, h in d.inputs.items()},
        "conditions": list(conditions),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "seconds": seconds,
        "package_versions": package_versions(),
        "git_revision": git_revision(),
    }
    reports = cfg.paths.reports
    fields["files"] = {f: sha256_file(reports / f) for f in (RESULTS_FILE, ACCURACY_FILE)}
    atomic_write_json(reports / EXPERIMENTS_MANIFEST, fields)


# --- records and tables ---------------------------------------------------------------------------


def write_results(reports: Path, records: list[dict[str, Any]]) -> None:
    """Write ``results.jsonl`` (every record) and ``accuracy.csv`` (the pipeline records)."""
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    atomic_write_text(reports / RESULTS_FILE, lines)
    atomic_write_text(reports / ACCURACY_FILE, accuracy_table(records).to_csv(index=False, float_format="%.6g"))


def load_records(reports: Path | str) -> list[dict[str, Any]]:
    """Read ``results.jsonl``; a missing file means the experiments stage has not run."""
    path = Path(reports) / RESULTS_FILE
    if not path.is_file():
        raise NatprintsError(f"no attribution results at {path} (run `natprints experiments`)")
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except ValueError as exc:
        raise NatprintsError(f"{path}: corrupt results ({exc})") from None


def accuracy_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per (condition, featurizer, classifier), straight from the pipeline records."""
    rows = [{c: r[c] for c in ACCURACY_COLUMNS} for r in records if r.get("kind") == "pipeline"]
    return pd.DataFrame(rows, columns=list(ACCURACY_COLUMNS))
