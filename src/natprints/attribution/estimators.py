"""The classifiers of the attribution grid, by config name, sized for a 2-core CPU run.

Trees and the MLP see only the columns with the highest ANOVA F score (``SelectKBest(f_classif)``):
on 50k-column TF-IDF matrices this makes them many times faster, and the MLP more accurate.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

# One thread for BLAS and OpenMP (XGBoost, scikit-learn): on a busy 2-core CPU two spinning threads
# made XGBoost up to 100x slower, and one is bit-for-bit repeatable. The sentence encoder, which is
# compute-bound, uses `run.threads` (0 = every core).
THREADS = 1
XGB_FEATURES = 2000
MLP_FEATURES = 5000


def top_features(k: int) -> Any:
    """The ``k`` columns with the highest ANOVA F score against the labels (all when fewer)."""
    from sklearn.feature_selection import SelectKBest, f_classif

    return SelectKBest(f_classif, k=k)


@contextmanager
def quiet_fit() -> Iterator[None]:
    """Fit without the warnings a small split makes expected: no convergence within the iteration
    budget, k above the column count, undefined F scores of constant columns (ranked last)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*(converge|iterations).*")
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="sklearn.feature_selection")
        yield


def compatible(featurizer: str, classifier: str) -> bool:
    """Whether the classifier can fit the featurizer's output (naive Bayes needs counts, not embeddings)."""
    return not (classifier == "nb" and featurizer in ("embed", "union"))


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

        xgb = LabelXGBClassifier(
            n_estimators=60,
            max_depth=4,
            learning_rate=0.3,
            max_bin=32,
            colsample_bynode=0.3,
            n_jobs=THREADS,
            random_state=seed,
        )
        return Pipeline([("select", top_features(XGB_FEATURES)), ("xgb", xgb)])
    if name == "nb":
        # A generative classifier: per model, a smoothed multinomial over the n-grams it writes.
        from sklearn.naive_bayes import MultinomialNB

        return MultinomialNB(alpha=0.1)
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
        return Pipeline([("select", top_features(MLP_FEATURES)), ("mlp", mlp)])
    raise ValueError(f"unknown classifier {name!r}")


class LabelXGBClassifier(ClassifierMixin, BaseEstimator):
    """Gradient-boosted trees (XGBoost ``hist``) for any labels, via one ``LabelEncoder``.

    Sparse input is accepted; XGBoost treats absent sparse entries as missing, which for TF-IDF means
    "n-gram absent". The fitted booster is kept as XGBoost JSON in the saved state (no pickle).
    """

    def __init__(
        self,
        n_estimators: int = 100,
        max_depth: int = 4,
        learning_rate: float = 0.3,
        max_bin: int = 64,
        subsample: float = 1.0,
        colsample_bynode: float = 1.0,
        n_jobs: int | None = None,
        random_state: int = 0,
    ):
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.max_bin = max_bin
        self.subsample = subsample
        self.colsample_bynode = colsample_bynode
        self.n_jobs = n_jobs
        self.random_state = random_state

    def fit(self, X: Any, y: Any) -> LabelXGBClassifier:
        import xgboost as xgb

        X, y = validate_data(self, X, y, accept_sparse="csr", dtype=np.float32)
        check_classification_targets(y)
        encoder = LabelEncoder().fit(y)
        self.classes_ = encoder.classes_
        codes = encoder.transform(y)
        k = len(self.classes_)
        if k < 2:
            self.booster_ = None  # one class: predict it
            return self
        params: dict[str, Any] = {
            "tree_method": "hist",
            "max_depth": self.max_depth,
            "eta": self.learning_rate,
            "max_bin": self.max_bin,
            "subsample": self.subsample,
            "colsample_bynode": self.colsample_bynode,
            "seed": self.random_state,
            "verbosity": 0,
        }
        if self.n_jobs is not None:
            params["nthread"] = self.n_jobs
        if k == 2:
            params["objective"] = "binary:logistic"
        else:
            params.update(objective="multi:softprob", num_class=k)
        dtrain = xgb.DMatrix(X, label=codes)
        self.booster_ = xgb.train(params, dtrain, num_boost_round=self.n_estimators)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        import xgboost as xgb

        X = validate_data(self, X, accept_sparse="csr", dtype=np.float32, reset=False)
        k = len(self.classes_)
        if self.booster_ is None:
            return np.ones((X.shape[0], 1), dtype=np.float64)
        raw = np.asarray(self.booster_.predict(xgb.DMatrix(X)), dtype=np.float64)
        if k == 2:
            raw = np.column_stack([1.0 - raw, raw])
        return raw.reshape(X.shape[0], k)

    def predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # a copy: object.__getstate__ returns __dict__ itself
        booster = state.get("booster_")
        if booster is not None and not isinstance(booster, str):
            state["booster_"] = bytes(booster.save_raw("json")).decode("utf-8")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        booster = state.get("booster_")
        if isinstance(booster, str):
            import xgboost as xgb

            restored = xgb.Booster()
            restored.load_model(bytearray(booster.encode("utf-8")))
            state = {**state, "booster_": restored}
        super().__setstate__(state)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags
