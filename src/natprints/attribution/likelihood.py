"""White-box attribution: which known model wrote these texts, from each model's exact log-likelihood.

The zoo's texts are ancestral samples of known models, so scoring a text under every candidate (with
the sampling transform it was drawn with) gives the Bayes posterior with equal priors: the ceiling
that no text classifier beats. The candidates may be of any causal-LM family, each reading the text
with its own tokenizer (the one saved in its directory, else a shared one): the score is
log p(continuation string | prompt string) under that model, so models with different vocabularies
compete on the same string. Models are loaded one at a time. The open set is the analytic
(Fast-DetectGPT) test of each model, two-sided: a model is rejected when its discrepancy
z = (loglik + sum H) / sqrt(sum Var) lies beyond ``norm.ppf(1 - alpha / 2)`` either way (the text is
less likely, or more likely, than that model's own samples are: human prose a small model predicts
well is the second kind), and the label is ``unknown`` when every model is rejected. Given a
background model (a run's reference LM) and each model's limits (:func:`ceiling.joint_thresholds`,
calibrated on its own texts), the open set is the joint test instead: the best model's log-likelihood
ratio against the background per token and its z, joined by Fisher's method; ``unknown`` when the
best model is rejected. Pooling treats all texts as from one source: their log-likelihoods, z
numerators and variances add up to one verdict.

How each tokenizer reads the boundary between prompt and text: :mod:`natprints.likelihood.strings`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np

from natprints.attribution.attributor import UNKNOWN, Prediction
from natprints.errors import NatprintsError
from natprints.likelihood.strings import Candidate, encode_for, load_candidates, reads_back, score_pairs

if TYPE_CHECKING:
    from natprints.attribution.attributor import Attributor
    from natprints.attribution.ceiling import JointLimit


@dataclass
class LikelihoodPrediction(Prediction):
    """A :class:`Prediction` from log-likelihoods, with each model's log-likelihood and discrepancy z.

    ``loglik`` and ``z`` are keyed by model label; ``tokens`` counts the tokens scored under the best
    model (``model_tokens``: under each model's own tokenizer), ``texts`` the texts behind the verdict
    (more than one when pooled). ``alpha`` is the open-set test's level.
    """

    loglik: dict[str, float]
    z: dict[str, float]
    tokens: int
    texts: int
    alpha: float
    model_tokens: dict[str, int] = field(default_factory=dict)  # tokens scored under each model's tokenizer
    # the analytic test's parts per model: log-likelihood plus entropy, and the variance of log p
    centred: dict[str, float] = field(default_factory=dict, repr=False)
    variance: dict[str, float] = field(default_factory=dict, repr=False)
    # where the texts came with their sampled token ids: how many of them each model scored as those ids
    # (its tokenizer reads them back as the text); the rest it re-tokenized. Empty when none came with ids.
    as_sampled: dict[str, int] = field(default_factory=dict)
    # the open-set test behind `unknown`: "analytic" (every model's z), or "joint" (the best model's ratio
    # against a background model and its z); the joint test's statistic (above 0: unknown) and threshold
    open_set: str = "analytic"
    joint: float | None = None
    joint_threshold: float | None = None

    @property
    def rejected(self) -> list[str]:
        """The models the open-set test rejects: with the analytic test, those whose own samples would be
        this far from typical less than ``alpha`` of the time; with the joint test, the best model or none."""
        if self.open_set == "joint":
            return [self.best_model] if self.unknown else []
        return [m for m, z in self.z.items() if _atypical(z, self.alpha)]

    def to_dict(self) -> dict[str, Any]:
        """The attributor's fields plus per-model log-likelihood and z (null where not finite)."""
        return {
            **super().to_dict(),
            "loglik": {m: _finite(v) for m, v in self.loglik.items()},
            "z": {m: _finite(v) for m, v in self.z.items()},
            "rejected": self.rejected,
            "alpha": self.alpha,
            "open_set": self.open_set,
            **(
                {"joint_statistic": _finite(self.joint), "joint_threshold": self.joint_threshold}
                if self.open_set == "joint"
                else {}
            ),
            "tokens": self.tokens,
            "model_tokens": self.model_tokens,
            "texts": self.texts,
            **({"scored_as_sampled_ids": self.as_sampled} if self.as_sampled else {}),
        }

    def scored_line(self) -> str:
        """What each model scored, where the texts came with their sampled ids; else empty."""
        if not self.as_sampled:
            return ""
        counts = self.as_sampled.values()
        if all(n in (0, self.texts) for n in counts):
            models = sum(1 for n in counts if n == self.texts)
            return f"; the given token ids scored by {models} of {len(counts)} models, re-tokenized by the rest"
        shares = ", ".join(f"{m} {n}/{self.texts}" for m, n in self.as_sampled.items())
        return f"; texts scored as their given token ids: {shares} (re-tokenized otherwise)"


_BACKGROUND = "\0background"  # the background model's key among the readers (no directory is so named)


def _atypical(z: float, alpha: float) -> bool:
    """The two-sided test at level ``alpha``; an undefined z (zero variance) is never rejected."""
    return not math.isnan(z) and abs(z) > NormalDist().inv_cdf(1 - alpha / 2)


def _finite(value: float) -> float | None:
    """JSON has no infinities: an impossible text (-inf) or an undefined z (nan) is null."""
    return value if math.isfinite(value) else None


def attribute_by_likelihood(
    texts: Sequence[str],
    model_dirs: Mapping[str, Path | str] | Mapping[str, Candidate],
    tokenizer: Any = None,
    *,
    prompts: Sequence[str] | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    alpha: float = 0.05,
    pool: bool = False,
    device: str = "auto",
    batch_size: int = 64,
    top: int = 3,
    progress: bool = False,
    loaded: dict[str, Any] | None = None,
    token_logprobs: dict[str, list[list[float]]] | None = None,
    sampled: Sequence[Sequence[int] | None] | None = None,
    segmentations: int = 0,
    background: Candidate | None = None,
    joint: Mapping[str, JointLimit] | None = None,
) -> list[LikelihoodPrediction] | LikelihoodPrediction:
    """Attribute each text (or, with ``pool``, all of them together) to the model most likely to have written it.

    ``model_dirs`` maps labels to causal-LM directories (or :func:`load_candidates`' candidates); each
    reads the texts with the tokenizer in its directory, else ``tokenizer``. ``prompts`` gives each
    text's prompt (default: none, see the module's note on the boundary). ``temperature``, ``top_k`` and
    ``top_p`` are the transform the texts were sampled with. Returns one :class:`LikelihoodPrediction`
    per text in order, or one when ``pool``; ``top`` candidates each. ``loaded``: a dict that keeps
    each model loaded between calls (label -> model), for texts that arrive one at a time.
    ``token_logprobs``: a dict filled with label -> each text's per-token log-probabilities (an
    evidence bundle's scores). ``sampled``: each text's sampled token ids where its source recorded
    them (None where not): a model whose tokenizer reads them back as the text scores those ids, not a
    re-tokenization, and each prediction says how many texts each model scored so. ``segmentations``:
    rank the models by each re-tokenized text's probability summed over its most probable segmentations
    (:mod:`natprints.likelihood.segmentations`, this beam; 0: its canonical path alone); the open-set
    test still reads the canonical path, whose per-token moments it has. ``background`` and ``joint``
    (both or neither): the background model and each label's limit of the joint open-set test, for
    pools of as many texts as each verdict reads (one, or all with ``pool``).
    """
    import torch
    from tqdm.auto import tqdm

    from natprints.likelihood.scorer import as_scorer
    from natprints.runtime import load_lm, resolve_device

    if not texts:
        raise NatprintsError("likelihood attribution needs at least one text")
    if prompts is not None and len(prompts) != len(texts):
        raise NatprintsError(f"likelihood attribution: {len(prompts)} prompts for {len(texts)} texts")
    if sampled is not None and len(sampled) != len(texts):
        raise NatprintsError(f"likelihood attribution: {len(sampled)} token id lists for {len(texts)} texts")
    if not temperature > 0 or top_k < 0 or not 0 < top_p <= 1:
        raise NatprintsError(
            f"need temperature > 0, top_k >= 0 and 0 < top_p <= 1, got {temperature}, {top_k} and {top_p}"
        )
    if not 0 < alpha < 1 or top < 1 or batch_size < 1 or segmentations < 0:
        raise NatprintsError(
            f"need 0 < alpha < 1, top >= 1, batch_size >= 1 and segmentations >= 0, got {alpha}, {top}, "
            f"{batch_size} and {segmentations}"
        )
    candidates = (
        dict(model_dirs)
        if model_dirs and all(isinstance(c, Candidate) for c in model_dirs.values())
        else load_candidates(model_dirs, tokenizer)
    )
    if (background is None) != (joint is None):
        raise NatprintsError("the joint open-set test needs both a background model and each model's limit")
    if joint is not None and set(joint) != set(candidates):
        raise NatprintsError(f"the joint open-set test has limits for {sorted(joint)}, not {sorted(candidates)}")
    readers = dict(candidates) if background is None else {**candidates, _BACKGROUND: background}
    # every text checked under every model (one encoding per tokenizer) before any model is loaded
    pairs, errors, as_sampled = encode_for(readers, texts, prompts, [f"text {i}" for i in range(len(texts))], sampled)
    if errors:
        raise NatprintsError(next(iter(errors.values())))
    device = resolve_device(device)
    transform = dict(temperature=temperature, top_k=top_k, top_p=top_p, batch_size=batch_size, device=device)
    labels = list(candidates)
    n, k = len(texts), len(labels)
    loglik, entropy, variance, ranking = (np.zeros((n, k)) for _ in range(4))
    tokens = np.zeros((n, k), dtype=np.int64)
    for j, label in enumerate(tqdm(labels, desc="likelihood", unit="model", disable=None if progress else True)):
        candidate = candidates[label]
        lm = loaded.get(label) if loaded is not None else None
        if lm is None:
            lm = as_scorer(load_lm(candidate.info.path, device=device))
            if loaded is not None:
                loaded[label] = lm
        scores = score_pairs(
            lm,
            pairs[label],
            end_id=candidate.pad,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            batch_size=batch_size,
            device=device,
        )
        readable = [
            reads_back(candidate.tokenizer, ids, text) for ids, text in zip(pairs[label][1], texts, strict=True)
        ]
        loglik[:, j], entropy[:, j], variance[:, j], tokens[:, j] = (
            np.where(readable, scores.loglik, -np.inf),  # a text its tokenizer cannot read back: p = 0
            scores.entropy,
            scores.variance,
            scores.tokens,
        )
        ranking[:, j] = loglik[:, j]
        if segmentations:
            strings = _over_segmentations(lm, candidate, pairs[label], as_sampled[label], segmentations, transform)
            for i, value in strings.items():
                ranking[i, j] = value if readable[i] else -np.inf
        if token_logprobs is not None:
            token_logprobs[label] = [t.tolist() for t in scores.token_logprobs]
        del lm, scores
        if device == "cuda" and loaded is None:
            torch.cuda.empty_cache()
    reference = np.zeros(n)
    if background is not None:
        lm = as_scorer(load_lm(background.info.path, device=device))
        options = dict(temperature=temperature, top_k=top_k, top_p=top_p, batch_size=batch_size, device=device)
        reference = score_pairs(lm, pairs[_BACKGROUND], end_id=background.pad, **options).loglik
        del lm
    given = sampled is not None and any(ids is not None for ids in sampled)
    if pool:
        parts = (loglik.sum(0), entropy.sum(0), variance.sum(0), tokens.sum(0))
        p = _predict(labels, *parts, n, alpha, top, ranking.sum(0), joint, float(reference.sum()))
        p.as_sampled = {m: sum(as_sampled[m]) for m in labels} if given else {}
        return p
    out = [
        _predict(labels, loglik[i], entropy[i], variance[i], tokens[i], 1, alpha, top, ranking[i], joint, reference[i])
        for i in range(n)
    ]
    for i, p in enumerate(out):
        if sampled is not None and sampled[i] is not None:
            p.as_sampled = {m: int(as_sampled[m][i]) for m in labels}
    return out


def _over_segmentations(
    lm: Any, candidate: Candidate, pairs: tuple, as_sampled: Sequence[bool], beam: int, transform: dict
) -> dict[int, float]:
    """Text index -> its log p summed over its most probable segmentations, for the texts this model
    read as a re-tokenization (none where its tokenizer's pieces have no bytes to search)."""
    from natprints.likelihood.segmentations import score_segmentations, string_reader

    surf, tokenize = string_reader(candidate.tokenizer)
    rows = [i for i, ids in enumerate(pairs[1]) if ids and not as_sampled[i]]
    if surf is None or not rows:
        return {}
    scores = score_segmentations(
        lm,
        surf,
        tokenize,
        [pairs[0][i] for i in rows],
        [pairs[1][i] for i in rows],
        pad_id=candidate.pad,
        beam=beam,
        **transform,
    )
    return {i: s.loglik for i, s in zip(rows, scores, strict=True)}


def _ranked(log_scores: np.ndarray, top: int) -> tuple[np.ndarray, list[int]]:
    """Softmax of summed log scores (equal priors; -inf columns get 0, an all -inf row is uniform), best first."""
    from natprints.stats import posterior

    proba = posterior(np.asarray(log_scores, dtype=np.float64)[None, :])[0]
    return proba, np.argsort(-proba, kind="stable")[:top].tolist()


def _predict(
    labels: list[str],
    loglik: np.ndarray,
    entropy: np.ndarray,
    variance: np.ndarray,
    tokens: np.ndarray,
    texts: int,
    alpha: float,
    top: int,
    ranking: np.ndarray,
    joint: Mapping[str, JointLimit] | None = None,
    background: float = 0.0,
) -> LikelihoodPrediction:
    """``loglik``: the scored paths' (the open-set test's, with their moments); ``ranking``: what the
    models are ranked by (the same, or the strings' probabilities over their segmentations); ``joint``:
    each label's joint-test limit, ``background`` the background model's log-likelihood of the texts."""
    proba, order = _ranked(ranking, top)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (loglik + entropy) / np.sqrt(variance)
    best = labels[order[0]]
    statistic = threshold = None
    if joint is None:
        unknown = all(_atypical(float(v), alpha) for v in z)
    else:
        ratio = (float(loglik[order[0]]) - background) / max(int(tokens[order[0]]), 1)
        statistic, threshold = joint[best].statistic(ratio, float(z[order[0]])), joint[best].threshold
        unknown = statistic > 0
    return LikelihoodPrediction(
        label=UNKNOWN if unknown else best,
        probability=float(proba[order[0]]),
        best_model=best,
        top=[(labels[i], float(proba[i])) for i in order],
        unknown=unknown,
        loglik={m: float(v) for m, v in zip(labels, ranking, strict=True)},
        z={m: float(v) for m, v in zip(labels, z, strict=True)},
        tokens=int(tokens[order[0]]),
        texts=texts,
        alpha=alpha,
        model_tokens={m: int(t) for m, t in zip(labels, tokens, strict=True)},
        centred={m: float(v) for m, v in zip(labels, loglik + entropy, strict=True)},
        variance={m: float(v) for m, v in zip(labels, variance, strict=True)},
        open_set="analytic" if joint is None else "joint",
        joint=statistic,
        joint_threshold=threshold,
    )


def attribute_pooled(texts: Sequence[str], attributor: Attributor, top: int = 3) -> Prediction:
    """One verdict for texts of one source from a black-box attributor.

    The per-text log calibrated probabilities add up (equal priors, texts independent given the
    source) and the probability is their softmax. ``unknown`` by the attributor's outsider test on the
    pool (its texts' mean detector score), or, for an attributor without one, its single-text threshold
    on that pooled probability.
    """
    if not texts:
        raise NatprintsError("pooling needs at least one text")
    with np.errstate(divide="ignore"):
        log_scores = np.log(attributor.predict_proba(texts)).sum(axis=0)
    proba, order = _ranked(log_scores, max(top, 1))
    labels = attributor.labels
    p = float(proba[order[0]])
    unknown = attributor.rejects(texts, order[0], p)
    return Prediction(
        label=UNKNOWN if unknown else labels[order[0]],
        probability=p,
        best_model=labels[order[0]],
        top=[(labels[i], float(proba[i])) for i in order],
        unknown=unknown,
    )
