"""Sequential attribution with a guaranteed error: texts arrive one at a time, and a verdict comes as
soon as the evidence allows.

**Naming a model.** Candidates 1..K each give the texts read so far a likelihood L_i (the product over
texts). If model j wrote them (texts independent given their source), L_i / L_j is a nonnegative
martingale of mean at most 1 for every i, so by Ville's inequality the chance that it *ever* reaches
(K − 1) / error is at most error / (K − 1). The rule names model i at the first text after which
L_i / L_j ≥ (K − 1) / error for every j ≠ i; the chance of ever naming a wrong model is then at most
``error`` (a union over the K − 1 wrong candidates), at any stopping time, however long the stream.
Exact likelihoods (the white-box method) carry the guarantee as stated. A black-box attributor's
calibrated probabilities stand in for likelihoods (with equal priors p(i | x) / p(j | x) = L_i / L_j
when the calibration is exact): its guarantee holds as far as its calibration does, which the reports
check against the observed misattribution rate.

**Unknown.** Texts from a source outside the library break the martingale argument (no candidate is
the truth), so the rule alone may name a model. The analytic open-set test runs beside it: after n
texts, a candidate whose pooled discrepancy z lies beyond the two-sided level a_n = error · 6 / (π² n²)
is rejected; the leader is named only while it is not, and every candidate rejected is ``unknown``.
The a_n sum to ``error``, so the true model of a stream is ever rejected (which can delay its name or
make the stream ``unknown``) with probability at most ``error``, as far as z is normal (its moments
are exact; its normality is the central limit's). A stream that reaches neither verdict is
*undecided after n texts*.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

UNKNOWN = -1  # verdict labels besides a candidate's index
UNDECIDED = -2
ERRORS = (0.05, 0.01, 0.001)  # the error levels the reports measure


def naming_bound(k: int, error: float) -> float:
    """log of (K − 1) / error: the log-likelihood lead over every other candidate that names a model."""
    if k < 2 or not 0 < error < 1:
        raise ValueError(f"need at least 2 candidates and 0 < error < 1, got {k} and {error}")
    return math.log((k - 1) / error)


def unknown_level(n: int, error: float) -> float:
    """The two-sided level the open-set test spends after the n-th text (they sum to ``error``)."""
    return error * 6 / (math.pi**2 * n**2)


@dataclass(frozen=True)
class Verdict:
    """A stream's verdict: ``label`` (a candidate's index, :data:`UNKNOWN` or :data:`UNDECIDED`) and
    the texts read when it came (the stream's length when undecided)."""

    label: int
    texts: int

    def named(self) -> bool:
        return self.label >= 0


def decide(
    log_scores: np.ndarray,
    error: float,
    centred: np.ndarray | None = None,
    variance: np.ndarray | None = None,
) -> Verdict:
    """The verdict of one stream: ``log_scores`` (n, K), each text's log-likelihood (or log calibrated
    probability) under each candidate, in arrival order. ``centred`` and ``variance`` (n, K): each
    text's log-likelihood plus the candidate's entropy, and its variance of log p (the analytic test's
    parts); without them a stream is never ``unknown``."""
    scores = np.asarray(log_scores, dtype=np.float64)
    n, k = scores.shape
    bound = naming_bound(k, error)
    lead = _leads(np.cumsum(scores, axis=0))
    ahead = lead[:, 1] >= bound
    first_unknown = n
    if centred is not None and variance is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.cumsum(centred, axis=0) / np.sqrt(np.cumsum(variance, axis=0))
        limits = norm.isf(np.array([unknown_level(t, error) for t in range(1, n + 1)]) / 2)
        rejected = np.where(np.isnan(z), 0.0, np.abs(z)) > limits[:, None]
        hits = np.flatnonzero(rejected.all(axis=1))
        first_unknown = int(hits[0]) if len(hits) else n
        ahead &= ~rejected[np.arange(n), lead[:, 0].astype(np.int64)]  # the leader must fit its own texts
    named = np.flatnonzero(ahead)
    first_named = int(named[0]) if len(named) else n
    if first_named < n and first_named <= first_unknown:
        return Verdict(int(lead[first_named, 0]), first_named + 1)
    if first_unknown < n:
        return Verdict(UNKNOWN, first_unknown + 1)
    return Verdict(UNDECIDED, n)


def _leads(cumulative: np.ndarray) -> np.ndarray:
    """Per row: (index of the best column, its lead over the best other column); an all -inf row
    leads by 0, a row where only the best is finite by +inf."""
    order = np.argsort(-cumulative, axis=1, kind="stable")
    best = order[:, 0]
    rows = np.arange(len(cumulative))
    top, second = cumulative[rows, best], cumulative[rows, order[:, 1]]
    with np.errstate(invalid="ignore"):
        lead = np.where(np.isneginf(top), 0.0, top - second)
    return np.stack([best.astype(np.float64), lead], axis=1)


def streams(y: np.ndarray, length: int, seed: int) -> list[np.ndarray]:
    """Disjoint streams of ``length`` rows of one class each, in a random arrival order (per class its
    rows shuffled, then cut; the rest dropped)."""
    rng = np.random.default_rng(seed)
    out = []
    for label in np.unique(y):
        rows = np.flatnonzero(y == label)
        rows = rows[rng.permutation(len(rows))]
        out += [rows[i : i + length] for i in range(0, len(rows) - length + 1, length)]
    return out


class Sequential:
    """The test as texts arrive: :meth:`add` each text's scores and get the verdict once there is one
    (None before); the same verdicts :func:`decide` gives on the whole stream."""

    def __init__(self, k: int, error: float) -> None:
        self.bound = naming_bound(k, error)
        self.error = error
        self.texts = 0
        self.total = np.zeros(k)
        self.centred = np.zeros(k)
        self.variance = np.zeros(k)
        self.lead = 0.0

    def add(
        self, log_scores: np.ndarray, centred: np.ndarray | None = None, variance: np.ndarray | None = None
    ) -> Verdict | None:
        """One more text: its log score under each candidate (and the analytic test's parts)."""
        self.texts += 1
        self.total = self.total + np.asarray(log_scores, dtype=np.float64)
        best, lead = _leads(self.total[None, :])[0]
        self.lead = float(lead)
        if centred is None or variance is None:
            return Verdict(int(best), self.texts) if lead >= self.bound else None
        self.centred = self.centred + centred
        self.variance = self.variance + variance
        with np.errstate(divide="ignore", invalid="ignore"):
            z = self.centred / np.sqrt(self.variance)
        rejected = np.where(np.isnan(z), 0.0, np.abs(z)) > norm.isf(unknown_level(self.texts, self.error) / 2)
        if lead >= self.bound and not rejected[int(best)]:
            return Verdict(int(best), self.texts)
        return Verdict(UNKNOWN, self.texts) if rejected.all() else None


Scores = tuple[np.ndarray, np.ndarray | None, np.ndarray | None]


def attribute_stream(
    texts: Iterable[str], score: Callable[[str], Scores], k: int, error: float
) -> tuple[Verdict, float]:
    """Read ``texts`` (lazily: reading stops at the verdict) and score each with ``score`` (its log
    scores under the K candidates, and the analytic test's parts or None); returns the verdict and the
    best candidate's lead in nats when it came."""
    test = Sequential(k, error)
    for text in texts:
        verdict = test.add(*score(text))
        if verdict is not None:
            return verdict, test.lead
    return Verdict(UNDECIDED, test.texts), test.lead
