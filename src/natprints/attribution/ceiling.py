"""White-box attribution from likelihood scores: the Bayes ceiling, pooled evidence, the open-set test.

The zoo's texts are exact samples of known models, so a condition's models' log-likelihoods of a
text (from the `likelihood` stage) give the Bayes-optimal attributor: the argmax with equal priors.
No text classifier can beat it at that text length; every black-box pipeline is judged by the share
of the margin above chance that it reaches. Ties (only where two candidates are the same model, as
in the null control) go to the first label, so the null control's ceiling is exactly its chance.

The open-set test asks "did model M write these texts?" with a controlled false-rejection rate. Its
statistic is relative: the pooled log-likelihood margin of M over the best other known model. A
sibling outside the library is about equally far from every known model, so its margin stays near
zero, while M's own texts give a margin that grows with every token. M's threshold is the
alpha-quantile of that margin on bootstrap pools of M's own calibration-split texts; a pool is
``unknown`` when its best known model is rejected. The analytic test beside it (Fast-DetectGPT's
sampling discrepancy: the log-likelihood centred by the model's own per-position entropy and scaled
by its variance) needs no calibration texts, but an unseen sibling's text looks typical to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import norm

from natprints.conditions import ConditionData
from natprints.errors import NatprintsError


@dataclass(frozen=True)
class LikelihoodView:
    """One condition's rows scored under each of its labels' models (rows follow ``sample_ids``)."""

    sample_ids: np.ndarray
    loglik: np.ndarray  # (n, k): the whole continuation, EOS event included
    prefix: dict[int, np.ndarray]  # n tokens -> (n, k): the first n events only
    entropy: np.ndarray  # (n, k): sum over positions of the model's own entropy
    variance: np.ndarray  # (n, k): sum over positions of the variance of log p
    events: np.ndarray  # (n,): scored events per text (continuation tokens, plus EOS when it stopped)

    def analytic_z(self) -> np.ndarray:
        """(n, k) per-text discrepancy: (loglik + entropy) / sqrt(variance); ~N(0, 1) for own texts."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return (self.loglik + self.entropy) / np.sqrt(self.variance)


def condition_view(
    data: ConditionData, frame: pd.DataFrame, scores: dict[str, pd.DataFrame], prefixes: Sequence[int]
) -> LikelihoodView:
    """The rows of ``frame`` (a part of ``data.frame``) scored under the model of every label."""
    scorer = {j: str(data.frame.loc[data.frame["label"] == j, "model_id"].iloc[0]) for j in range(len(data.labels))}
    sample_ids = frame["sample_id"].astype(str).to_numpy()
    n, k = len(sample_ids), len(data.labels)
    loglik, entropy, variance = (np.zeros((n, k)) for _ in range(3))
    prefix = {p: np.zeros((n, k)) for p in prefixes}
    events = np.zeros(n, dtype=np.int64)
    for j in range(k):
        table = scores.get(scorer[j])
        if table is None:
            raise NatprintsError(f"no likelihood scores of model {scorer[j]}; rerun `natprints likelihood`")
        missing = set(sample_ids) - set(table.index)
        if missing:
            raise NatprintsError(
                f"likelihood scores of {scorer[j]} lack {len(missing)} text(s) of condition {data.name}; "
                "rerun `natprints likelihood`"
            )
        rows = table.loc[sample_ids]
        loglik[:, j] = rows["loglik"].to_numpy(dtype=np.float64)
        entropy[:, j] = rows["entropy_sum"].to_numpy(dtype=np.float64)
        variance[:, j] = rows["variance_sum"].to_numpy(dtype=np.float64)
        tokens = rows["token_logprobs"].to_numpy()
        for p in prefixes:
            prefix[p][:, j] = [float(np.sum(t[:p])) for t in tokens]
        events = rows["events"].to_numpy(dtype=np.int64)
    return LikelihoodView(sample_ids, loglik, prefix, entropy, variance, events)


def own_view(data: ConditionData, frame: pd.DataFrame, scores: dict[str, pd.DataFrame]) -> LikelihoodView | None:
    """The rows of ``frame`` each scored under its own label's model alone (every other column NaN; the
    moments NaN where not scored), or None where a model has not scored its rows: what calibrates a
    threshold on a model's own texts."""
    scorer = {j: str(data.frame.loc[data.frame["label"] == j, "model_id"].iloc[0]) for j in range(len(data.labels))}
    sample_ids = frame["sample_id"].astype(str).to_numpy()
    labels = frame["label"].to_numpy()
    loglik, entropy, variance = (np.full((len(sample_ids), len(data.labels)), np.nan) for _ in range(3))
    events = np.zeros(len(sample_ids), dtype=np.int64)
    for j, model_id in scorer.items():
        mine = labels == j
        table = scores.get(model_id)
        if table is None or not set(sample_ids[mine]) <= set(table.index):
            return None
        rows = table.loc[sample_ids[mine]]
        loglik[mine, j] = rows["loglik"].to_numpy(dtype=np.float64)
        entropy[mine, j] = rows["entropy_sum"].to_numpy(dtype=np.float64)
        variance[mine, j] = rows["variance_sum"].to_numpy(dtype=np.float64)
        events[mine] = rows["events"].to_numpy(dtype=np.int64)
    return LikelihoodView(sample_ids, loglik, {}, entropy, variance, events)


@dataclass(frozen=True)
class StringView:
    """Test texts scored two ways under each label's model, both without the end event: as the ids
    they were sampled as, and as their canonical tokenization (what a scorer of the string sees)."""

    sampled: np.ndarray  # (n, k)
    canonical: np.ndarray  # (n, k): equal to ``sampled`` where the two tokenizations agree
    differs: np.ndarray  # (n,) bool: the canonical tokenization is not the sampled one
    segmented: np.ndarray | None  # (n, k): summed over the most probable segmentations (None: not scored)


def string_view(data: ConditionData, frame: pd.DataFrame, scores: dict[str, pd.DataFrame]) -> StringView:
    """The rows of ``frame`` as a :class:`StringView`; a text has a ``<id>~canonical`` score exactly when
    its canonical tokenization differs (the likelihood stage scores those), and ``<id>~string`` scores
    where the stage searched segmentations (all of them, or the view has no ``segmented``)."""
    from natprints.likelihood.stage import CANONICAL, STRING

    scorer = {j: str(data.frame.loc[data.frame["label"] == j, "model_id"].iloc[0]) for j in range(len(data.labels))}
    sample_ids = frame["sample_id"].astype(str).to_numpy()
    lengths = np.array([len(ids) for ids in frame["token_ids"]])
    n, k = len(sample_ids), len(data.labels)
    sampled, canonical = np.zeros((n, k)), np.zeros((n, k))
    differs = np.zeros(n, dtype=bool)
    segmented: np.ndarray | None = np.zeros((n, k))
    for j in range(k):
        table = scores[scorer[j]]
        rows = table.loc[sample_ids, "token_logprobs"].to_numpy()
        sampled[:, j] = [float(np.sum(t[:m])) for t, m in zip(rows, lengths, strict=True)]
        keys = np.char.add(sample_ids.astype(str), CANONICAL)
        present = pd.Index(keys).isin(table.index)  # hashed: np.isin sorts the object arrays
        differs |= present
        canonical[:, j] = sampled[:, j]
        if present.any():
            canonical[present, j] = table.loc[keys[present], "loglik"].to_numpy(dtype=np.float64)
        strings = np.char.add(sample_ids.astype(str), STRING)
        searched = pd.Index(strings).isin(table.index)
        if segmented is not None and n and (searched | (lengths == 0)).all():  # an empty text is not searched
            segmented[:, j] = sampled[:, j]  # 0: an empty text carries no evidence
            segmented[searched, j] = table.loc[strings[searched], "loglik"].to_numpy(dtype=np.float64)
        else:
            segmented = None
    return StringView(sampled, canonical, differs, segmented)


def bayes_predict(loglik: np.ndarray) -> np.ndarray:
    """The Bayes-optimal label of each row (equal priors); ties go to the first."""
    return np.asarray(np.argmax(loglik, axis=1), dtype=np.int64)


def pool_groups(y: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Disjoint groups of ``k`` rows of one class each: per class its rows shuffled, then cut (the rest dropped)."""
    rng = np.random.default_rng(seed)
    groups = []
    for label in np.unique(y):
        rows = np.flatnonzero(y == label)
        rows = rows[rng.permutation(len(rows))]
        groups += [rows[i : i + k] for i in range(0, len(rows) - k + 1, k)]
    return groups


def pooled_predictions(log_scores: np.ndarray, groups: Sequence[np.ndarray]) -> np.ndarray:
    """One verdict per group: the argmax of the summed per-text log scores (log posteriors or log-likelihoods)."""
    if not groups:
        return np.zeros(0, dtype=np.int64)
    sums = np.stack([log_scores[g].sum(axis=0) for g in groups])
    return bayes_predict(sums)


def _margin(sums: np.ndarray, model: int) -> np.ndarray:
    """Per pool, ``model``'s summed log-likelihood minus the best other column's."""
    others = np.delete(sums, model, axis=1)
    return sums[:, model] - others.max(axis=1)


def _own_draws(y: np.ndarray, model: int, k: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, k) row indices: bootstrap pools of k of ``model``'s own texts."""
    rows = np.flatnonzero(y == model)
    if len(rows) == 0:
        raise NatprintsError(f"open set: no calibration texts of label {model}")
    return rows[rng.integers(0, len(rows), size=(resamples, k))]


def _pool_ratios(loglik: np.ndarray, background: np.ndarray, events: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Per pool of ``draws``: the summed log-likelihood (one model's column) minus the background
    model's, per event."""
    return (loglik[draws].sum(axis=1) - background[draws].sum(axis=1)) / np.maximum(events[draws].sum(axis=1), 1)


def margin_thresholds(
    loglik: np.ndarray, y: np.ndarray, known: Sequence[int], k: int, alpha: float, resamples: int, seed: int
) -> dict[int, float]:
    """Per known model M: the alpha-quantile of M's margin on bootstrap pools of k of M's own texts."""
    rng = np.random.default_rng(seed)
    columns = loglik[:, known]
    out = {}
    for position, model in enumerate(known):
        draws = _own_draws(y, model, k, resamples, rng)
        sums = columns[draws].sum(axis=1)
        out[model] = float(np.quantile(_margin(sums, position), alpha))
    return out


def margin_rejects(
    loglik: np.ndarray, groups: Sequence[np.ndarray], known: Sequence[int], thresholds: dict[int, float]
) -> np.ndarray:
    """Per pool: True when the best known model's margin is below its threshold (the pool is ``unknown``)."""
    return margin_statistic(loglik, groups, known, thresholds) > 0


def margin_statistic(
    loglik: np.ndarray, groups: Sequence[np.ndarray], known: Sequence[int], thresholds: dict[int, float]
) -> np.ndarray:
    """Per pool: the best known model's threshold minus its margin (above 0: the pool is ``unknown``)."""
    if not groups:
        return np.zeros(0)
    sums = np.stack([loglik[g][:, known].sum(axis=0) for g in groups])
    best = sums.argmax(axis=1)
    margins = np.array([_margin(sums[i : i + 1], b)[0] for i, b in enumerate(best)])
    limits = np.array([thresholds[known[b]] for b in best])
    return limits - margins


def _ratio(loglik: np.ndarray, background: np.ndarray, events: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per known model: the pooled log-likelihood of ``rows`` minus the background model's, per event."""
    return (loglik[rows].sum(axis=0) - background[rows].sum()) / max(int(events[rows].sum()), 1)


def background_thresholds(
    loglik: np.ndarray,
    background: np.ndarray,
    events: np.ndarray,
    y: np.ndarray,
    known: Sequence[int],
    k: int,
    alpha: float,
    resamples: int,
    seed: int,
) -> dict[int, float]:
    """Per known model M: the alpha-quantile of M's log-likelihood ratio against the background model
    (per event) on bootstrap pools of k of M's own texts (only M's own column of ``loglik`` is read)."""
    rng = np.random.default_rng(seed)
    out = {}
    for model in known:
        draws = _own_draws(y, model, k, resamples, rng)
        out[model] = float(np.quantile(_pool_ratios(loglik[:, model], background, events, draws), alpha))
    return out


def background_statistic(
    loglik: np.ndarray,
    background: np.ndarray,
    events: np.ndarray,
    groups: Sequence[np.ndarray],
    known: Sequence[int],
    thresholds: dict[int, float],
) -> np.ndarray:
    """Per pool: the best known model's threshold minus its log-likelihood ratio against the background
    model, per event (above 0: the pool is ``unknown``). Texts no known model wrote are about as likely
    under a model trained on the same public corpus as under the known ones; a known model's own texts
    are more likely under it than under any model that did not write them."""
    if not groups:
        return np.zeros(0)
    out = []
    for g in groups:
        ratios = _ratio(loglik[:, list(known)], background, events, g)
        best = int(np.argmax(loglik[g][:, list(known)].sum(axis=0)))
        out.append(thresholds[known[best]] - float(ratios[best]))
    return np.array(out)


def _pooled_z(centred: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """The pooled discrepancy z from summed centred log-likelihoods and variances (0 where undefined)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = centred / np.sqrt(variance)
    return np.where(np.isfinite(z), z, 0.0)


def _two_sided_p(z: np.ndarray) -> np.ndarray:
    return 2.0 * norm.sf(np.abs(z))


def _fisher(p_background: np.ndarray, p_analytic: np.ndarray) -> np.ndarray:
    """Fisher's combination of the two p-values: minus the sum of their logs (larger: less like M's own)."""
    tiny = np.finfo(float).tiny
    return -np.log(np.maximum(p_background, tiny)) - np.log(np.maximum(p_analytic, tiny))


@dataclass(frozen=True)
class JointLimit:
    """One known model's joint test: its own pools' background ratios (sorted) and the threshold on
    Fisher's combination of the two p-values."""

    ratios: np.ndarray
    threshold: float

    def p_background(self, ratio: np.ndarray) -> np.ndarray:
        """The share of the model's own pools whose ratio is at most ``ratio`` (one added each side)."""
        return (np.searchsorted(self.ratios, ratio, side="right") + 1) / (len(self.ratios) + 1)

    def statistic(self, ratio: float, z: float) -> float:
        """Fisher's sum for one pool of the model (its ratio against the background per event, its
        pooled discrepancy z; an undefined z counts as 0) minus the threshold: above 0, ``unknown``."""
        z_value = np.array([z if np.isfinite(z) else 0.0])
        return float(_fisher(self.p_background(np.array([ratio])), _two_sided_p(z_value))[0]) - self.threshold


def joint_thresholds(
    view: LikelihoodView,
    background: np.ndarray,
    y: np.ndarray,
    known: Sequence[int],
    k: int,
    alpha: float,
    resamples: int,
    seed: int,
) -> dict[int, JointLimit]:
    """Per known model M, the background and the two-sided analytic test on M alone, joined by
    Fisher's method and calibrated on M's own texts: on bootstrap pools of k of them (M's own column
    of ``view``, moments included), each pool's background p (the share of the pools whose ratio is
    no larger) and analytic p (two-sided normal), combined as -log p_background - log p_analytic, and
    the (1 - alpha)-quantile of that sum. The two statistics are nearly uncorrelated on a model's own
    pools, so the sum gathers evidence that each alone leaves below its own level; calibrating the sum
    on the same pools, rather than trusting chi-square with 4 degrees of freedom, keeps M's own pools
    rejected at rate alpha although the background p is discrete and the analytic one approximate."""
    own = np.flatnonzero(np.isin(y, list(known)))
    if np.isnan(view.entropy[own, y[own]]).any():
        raise NatprintsError(
            "the joint open-set test needs the moments of each model's own calibration texts; "
            "rerun `natprints likelihood`"
        )
    rng = np.random.default_rng(seed)
    out = {}
    for model in known:
        draws = _own_draws(y, model, k, resamples, rng)
        ratios = _pool_ratios(view.loglik[:, model], background, view.events, draws)
        centred = (view.loglik[draws, model] + view.entropy[draws, model]).sum(axis=1)
        z = _pooled_z(centred, view.variance[draws, model].sum(axis=1))
        limit = JointLimit(np.sort(ratios), 0.0)
        combined = _fisher(limit.p_background(ratios), _two_sided_p(z))
        out[model] = JointLimit(limit.ratios, float(np.quantile(combined, 1 - alpha)))
    return out


def joint_statistic(
    view: LikelihoodView,
    background: np.ndarray,
    groups: Sequence[np.ndarray],
    known: Sequence[int],
    limits: dict[int, JointLimit],
) -> np.ndarray:
    """Per pool: Fisher's combination of the best known model's background and analytic p-values
    minus its threshold (above 0: the pool is ``unknown``). Junk is caught by the analytic side (no
    model's own texts are that unlikely); human text by both: it is about as likely under a model of
    the public corpus as under the known ones, and likelier under the best known model than that
    model's own samples are."""
    if not groups:
        return np.zeros(0)
    known = list(known)
    out = []
    for g in groups:
        best = known[int(np.argmax(view.loglik[g][:, known].sum(axis=0)))]
        ratio = float(_ratio(view.loglik[:, [best]], background, view.events, g)[0])
        centred = (view.loglik[g, best] + view.entropy[g, best]).sum()
        z = _pooled_z(np.array([centred]), np.array([view.variance[g, best].sum()]))
        out.append(limits[best].statistic(ratio, float(z[0])))
    return np.array(out)


def analytic_rejects(
    view: LikelihoodView, groups: Sequence[np.ndarray], known: Sequence[int], alpha: float
) -> np.ndarray:
    """Per pool: True when every known model's pooled discrepancy z lies outside its two-sided alpha
    level: the texts are less likely *or* more likely than that model's own texts are."""
    return analytic_statistic(view, groups, known) > norm.ppf(1 - alpha / 2)


def analytic_statistic(view: LikelihoodView, groups: Sequence[np.ndarray], known: Sequence[int]) -> np.ndarray:
    """Per pool: the smallest |z| over the known models, z the pooled Fast-DetectGPT discrepancy
    (an undefined z, from zero variance, counts as 0: that model is never rejected)."""
    if not groups:
        return np.zeros(0)
    used = np.concatenate(list(groups))
    if np.isnan(view.entropy[np.ix_(used, known)]).any():
        raise NatprintsError("the analytic open-set test needs moments these scores lack; rerun `natprints likelihood`")
    centred = view.loglik + view.entropy
    out = []
    for g in groups:
        with np.errstate(divide="ignore", invalid="ignore"):
            z = centred[g][:, known].sum(axis=0) / np.sqrt(view.variance[g][:, known].sum(axis=0))
        out.append(float(np.min(np.where(np.isnan(z), 0.0, np.abs(z)))))
    return np.array(out)


def kl_per_token(view: LikelihoodView, y: np.ndarray, a: int, b: int) -> tuple[float, float, int, int]:
    """KL(a || b) per token from a's own texts: sum(log p_a - log p_b) / events, its standard error
    (ratio estimator over texts), the events and the texts it rests on. Exact in expectation: the
    texts are a's samples, so the mean log-ratio is the divergence between the two text distributions."""
    rows = np.flatnonzero(y == a)
    d = view.loglik[rows, a] - view.loglik[rows, b]
    n = view.events[rows].astype(np.float64)
    if len(rows) < 2 or n.sum() == 0:
        return float("nan"), float("nan"), int(n.sum()), len(rows)
    ratio = d.sum() / n.sum()
    se = np.sqrt(np.sum((d - ratio * n) ** 2) / (len(rows) * (len(rows) - 1))) / n.mean()
    return float(ratio), float(se), int(n.sum()), len(rows)


def concat_views(first: LikelihoodView, second: LikelihoodView) -> LikelihoodView:
    """The rows of both views, first's then second's."""
    return LikelihoodView(
        np.concatenate([first.sample_ids, second.sample_ids]),
        np.vstack([first.loglik, second.loglik]),
        {p: np.vstack([first.prefix[p], second.prefix[p]]) for p in first.prefix},
        np.vstack([first.entropy, second.entropy]),
        np.vstack([first.variance, second.variance]),
        np.concatenate([first.events, second.events]),
    )


RELATIONS = ("same init only", "same data order only", "neither", "size", "lr", "batch_size")


def relation(spec_a, spec_b) -> str | None:
    """What two model specs share: the one factor they differ in, or which of the two seeds they share."""
    if spec_a == spec_b:
        return None
    for factor in ("size", "lr", "batch_size"):
        if getattr(spec_a, factor) != getattr(spec_b, factor):
            return factor
    same_init, same_data = spec_a.init_seed == spec_b.init_seed, spec_a.data_seed == spec_b.data_seed
    return "same init only" if same_init else "same data order only" if same_data else "neither"


def kl_decomposition(
    view: LikelihoodView,
    y: np.ndarray,
    prompts: np.ndarray,
    relations: dict[tuple[int, int], str],
    *,
    n_boot: int = 1000,
    n_perm: int = 10000,
    seed: int = 0,
) -> tuple[list[dict], list[dict]]:
    """Mean symmetrized per-token KL by relation, with 95% bootstrap intervals over prompts, and
    one-sided permutation tests (over unordered pairs) that one relation's pairs are closer than another's.

    ``relations`` maps unordered pairs (a < b) to their relation; texts are grouped by prompt, so a
    bootstrap replicate resamples prompts and keeps every model's continuation of each prompt together.
    """
    rng = np.random.default_rng(seed)
    keys, index = np.unique(prompts, return_inverse=True)
    k = view.loglik.shape[1]
    d = np.zeros((k, k, len(keys)))  # d[a, b, p]: sum over a's texts of prompt p of log p_a - log p_b
    n = np.zeros((k, len(keys)))
    for a in range(k):
        rows = np.flatnonzero(y == a)
        np.add.at(n[a], index[rows], view.events[rows])
        for b in range(k):
            np.add.at(d[a, b], index[rows], view.loglik[rows, a] - view.loglik[rows, b])
    pairs = sorted(relations)
    weights = np.vstack([np.ones(len(keys)), rng.multinomial(len(keys), np.full(len(keys), 1 / len(keys)), n_boot)])
    sym = np.stack(
        [0.5 * (weights @ d[a, b] / (weights @ n[a]) + weights @ d[b, a] / (weights @ n[b])) for a, b in pairs], axis=1
    )  # (1 + n_boot, pairs): row 0 is the estimate on the data as drawn
    groups = {r: [i for i, p in enumerate(pairs) if relations[p] == r] for r in RELATIONS}
    groups = {r: g for r, g in groups.items() if g}
    summary = []
    for r, members in groups.items():
        means = sym[:, members].mean(axis=1)
        low, high = np.quantile(means[1:], [0.025, 0.975])
        summary.append(
            {
                "relation": r,
                "n_pairs": len(members),
                "kl_per_token": float(means[0]),
                "ci_low": float(low),
                "ci_high": float(high),
            }
        )
    tests = []
    for closer, farther in (
        ("same init only", "neither"),
        ("same data order only", "neither"),
        ("same init only", "same data order only"),
    ):
        if closer not in groups or farther not in groups:
            continue
        values = np.concatenate([sym[0, groups[closer]], sym[0, groups[farther]]])
        m = len(groups[closer])
        observed = values[m:].mean() - values[:m].mean()
        perms = np.array([rng.permutation(values) for _ in range(n_perm)])
        null = perms[:, m:].mean(axis=1) - perms[:, :m].mean(axis=1)
        tests.append(
            {
                "closer": closer,
                "farther": farther,
                "difference": float(observed),
                "p_value": float((1 + np.sum(null >= observed)) / (1 + n_perm)),
            }
        )
    return summary, tests
