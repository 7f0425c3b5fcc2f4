"""The statistics of the accuracy tables: Wilson intervals, binomial tests against chance, F1.

Everything a table shows is computed here from stored predictions, so a table can always be
recomputed from the records on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import binomtest

from natprints.errors import NatprintsError


def log_posterior(loglik: np.ndarray) -> np.ndarray:
    """(texts, models) log-likelihoods (or log scores) -> log posterior over the models, equal priors.

    A model under which a text is impossible (-inf) gets -inf. A text impossible under every model
    carries no evidence: its row is the prior, uniform (its argmax is then model 0, so count such rows
    apart when scoring accuracy). NaN or +inf entries, or another shape, are errors.
    """
    loglik = np.asarray(loglik, dtype=np.float64)
    if loglik.ndim != 2:
        raise NatprintsError(f"posterior: expected a (texts, models) array, got shape {loglik.shape}")
    if np.isnan(loglik).any() or np.isposinf(loglik).any():
        raise NatprintsError("posterior: log-likelihoods hold NaN or +inf")
    top = loglik.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    shifted = np.where(np.isneginf(loglik).all(axis=1, keepdims=True), 0.0, loglik - top)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def posterior(loglik: np.ndarray) -> np.ndarray:
    """The posterior itself (rows sum to 1): ``exp`` of :func:`log_posterior`."""
    return np.exp(log_posterior(loglik))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when there are no trials."""
    if n <= 0:
        return 0.0, 1.0
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def binomial_p_value(successes: int, n: int, chance: float) -> float:
    """One-sided exact binomial test: P(X >= successes) when every guess is right with ``chance``."""
    if n <= 0:
        return 1.0
    return float(binomtest(int(successes), int(n), chance, alternative="greater").pvalue)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts with rows = true class, columns = predicted class."""
    out = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(out, (y_true, y_pred), 1)
    return out


def macro_f1(matrix: np.ndarray) -> float:
    """Unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN); 0 for a class never seen."""
    tp = np.diag(matrix).astype(np.float64)
    denom = matrix.sum(axis=0) + matrix.sum(axis=1)
    return float(np.mean(np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)))


def classification_summary(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, n_classes: int
) -> dict[str, Any]:
    """Accuracy with its 95% Wilson interval, the p-value against chance = 1/k, macro-F1, confusion.

    Labels are class indices 0..k-1; the confusion matrix is rows = true, columns = predicted.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    n = int(y_true.size)
    correct = int((y_true == y_pred).sum())
    chance = 1.0 / n_classes
    low, high = wilson_interval(correct, n)
    matrix = confusion(y_true, y_pred, n_classes)
    return {
        "n_test": n,
        "n_correct": correct,
        "chance": chance,
        "accuracy": correct / n if n else 0.0,
        "ci_low": low,
        "ci_high": high,
        "p_value": binomial_p_value(correct, n, chance),
        "macro_f1": macro_f1(matrix),
        "confusion": matrix.tolist(),
    }


def roc_summary(negatives: np.ndarray, positives: np.ndarray, points: int = 41) -> dict[str, Any]:
    """How well a score that is larger for ``positives`` separates them from ``negatives``: the area
    under the ROC curve (ties count half; None when either side is empty) and the curve itself as
    ``roc_fpr`` / ``roc_tpr`` lists, thinned to at most ``points`` corners, rounded to 4 decimals."""
    from sklearn.metrics import roc_auc_score, roc_curve

    negatives, positives = np.asarray(negatives, dtype=np.float64), np.asarray(positives, dtype=np.float64)
    if not len(negatives) or not len(positives):
        return {"auroc": None, "roc_fpr": [], "roc_tpr": []}
    scores = np.nan_to_num(np.concatenate([negatives, positives]), posinf=1e300, neginf=-1e300)
    truth = np.r_[np.zeros(len(negatives)), np.ones(len(positives))]
    fpr, tpr, _ = roc_curve(truth, scores)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(points, len(fpr))).round().astype(int))
    return {
        "auroc": round(float(roc_auc_score(truth, scores)), 6),
        "roc_fpr": np.round(fpr[keep], 4).tolist(),
        "roc_tpr": np.round(tpr[keep], 4).tolist(),
    }
