"""natprints.attribution.sequential: the stopping rule, its guarantee, and its `unknown`."""

from __future__ import annotations

import math

import numpy as np
import pytest

from natprints.attribution.sequential import (
    UNDECIDED,
    UNKNOWN,
    Verdict,
    decide,
    naming_bound,
    streams,
    unknown_level,
)


def test_a_model_is_named_once_its_lead_reaches_the_bound():
    assert naming_bound(3, 0.01) == pytest.approx(math.log(200))
    # each text: model 0 leads model 1 by 2 nats and model 2 by 3; the bound (5.3) falls at the third
    scores = np.tile([0.0, -2.0, -3.0], (5, 1))
    assert decide(scores, 0.01) == Verdict(0, 3)
    assert decide(scores, 0.05) == Verdict(0, 2)  # log(40) = 3.7: two texts lead by 4
    assert decide(scores[:2], 0.01) == Verdict(UNDECIDED, 2)
    # a text impossible under every model but one names it at once; impossible under all names none
    assert decide(np.array([[-1.0, -np.inf, -np.inf]]), 0.001) == Verdict(0, 1)
    assert decide(np.full((3, 3), -np.inf), 0.05) == Verdict(UNDECIDED, 3)
    with pytest.raises(ValueError, match="at least 2 candidates"):
        naming_bound(1, 0.01)


def test_the_unknown_levels_spend_the_error_and_catch_atypical_streams():
    assert sum(unknown_level(n, 0.01) for n in range(1, 200_000)) == pytest.approx(0.01, rel=1e-4)
    loglik = np.zeros((4, 3))
    variance = np.ones((4, 3))
    # every model's z = +4 per text: pooled z grows as 4 sqrt(n); the level after n texts is 2 sqrt(n)-ish
    assert decide(loglik, 0.01, np.full((4, 3), 4.0), variance) == Verdict(UNKNOWN, 1)
    # typical for model 1 (centred 0): never unknown
    centred = np.full((4, 3), 4.0)
    centred[:, 1] = 0.0
    assert decide(loglik, 0.01, centred, variance) == Verdict(UNDECIDED, 4)


def test_the_guarantee_holds_at_any_stopping_time():
    """Streams drawn from known categorical 'models' that are close: over 4,000 streams of 60 texts,
    the share that ever names a wrong model stays below the error (Ville's bound), while most streams
    are named correctly."""
    rng = np.random.default_rng(0)
    models = np.array([[0.4, 0.3, 0.2, 0.1], [0.3, 0.4, 0.1, 0.2], [0.25, 0.25, 0.25, 0.25]])
    logp = np.log(models)
    error, n_streams, length = 0.05, 4000, 60
    wrong = right = 0
    for s in range(n_streams):
        truth = s % 3
        draws = rng.choice(4, size=length, p=models[truth])
        verdict = decide(logp[:, draws].T, error)
        wrong += verdict.named() and verdict.label != truth
        right += verdict.label == truth
    assert wrong / n_streams <= error  # measured 0.020
    assert right / n_streams > 0.7  # measured 0.757 (the rest undecided after 60 texts)


def test_streams_are_disjoint_and_of_one_source():
    y = np.array([0] * 7 + [1] * 5)
    out = streams(y, 3, seed=0)
    assert [len(s) for s in out] == [3, 3, 3]
    assert all(len(set(y[s])) == 1 for s in out)
    assert len(np.unique(np.concatenate(out))) == 9


def test_texts_added_one_at_a_time_reach_the_verdicts_of_the_whole_stream():
    from natprints.attribution.sequential import Sequential

    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        scores = rng.normal(size=(n, 3)) * 2
        centred, variance = rng.normal(size=(n, 3)) * 3, rng.uniform(0.5, 2, size=(n, 3))
        for parts in ((None, None), (centred, variance)):
            test = Sequential(3, 0.05)
            online = next(
                (
                    v
                    for i in range(n)
                    if (v := test.add(scores[i], *(None if p is None else p[i] for p in parts))) is not None
                ),
                Verdict(UNDECIDED, n),
            )
            assert online == decide(scores, 0.05, *parts)


def test_a_leader_its_own_test_rejects_is_not_named():
    # model 0 leads by 10 nats a text, but its discrepancy is +10 per text: too likely for its samples
    scores = np.tile([0.0, -10.0, -10.0], (3, 1))
    centred = np.tile([10.0, 0.0, 0.0], (3, 1))
    assert decide(scores, 0.01) == Verdict(0, 1)
    assert decide(scores, 0.01, centred, np.ones((3, 3))) == Verdict(UNDECIDED, 3)
    centred[:, 1:] = 10.0  # every model rejected: unknown
    assert decide(scores, 0.01, centred, np.ones((3, 3))) == Verdict(UNKNOWN, 1)
