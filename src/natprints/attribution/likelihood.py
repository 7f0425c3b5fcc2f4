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
well is the second kind), and the label is ``unknown`` when every model is rejected. Pooling treats
all texts as from one source: their log-likelihoods, z numerators and variances add up to one verdict.

**The token boundary.** Without a prompt a text continues the tokenizer's BOS token (EOS where it has
none: the zoo's corpus separates paragraphs with EOS); where it stops carries no evidence (no EOS
event). With a prompt, prompt and text are tokenized apart, as a generator that continues the prompt's
tokens produced them. Byte-level BPE (the zoo's, GPT-2's, Pythia's) keeps a text's leading space in its
first token, so the pair is exact. A tokenizer that marks word starts inside tokens (SentencePiece's
"▁") reads the text as starting a new word after the prompt, which is how its decoder writes a
continuation that begins with one: decoded alone, the leading "▁" leaves no space.

A text is scored as its canonical tokenization; a sample drawn as another token sequence of the same
string scores lower than the sample itself did (the string's probability sums over every
tokenization; this scores one).
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
from natprints.errors import NatprintsError, first_line

if TYPE_CHECKING:
    from natprints.attribution.attributor import Attributor
    from natprints.modeldir import ModelInfo


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

    @property
    def rejected(self) -> list[str]:
        """The models whose own samples would be this far from typical less than ``alpha`` of the time."""
        return [m for m, z in self.z.items() if _atypical(z, self.alpha)]

    def to_dict(self) -> dict[str, Any]:
        """The attributor's fields plus per-model log-likelihood and z (null where not finite)."""
        return {
            **super().to_dict(),
            "loglik": {m: _finite(v) for m, v in self.loglik.items()},
            "z": {m: _finite(v) for m, v in self.z.items()},
            "rejected": self.rejected,
            "alpha": self.alpha,
            "tokens": self.tokens,
            "model_tokens": self.model_tokens,
            "texts": self.texts,
        }


def _atypical(z: float, alpha: float) -> bool:
    """The two-sided test at level ``alpha``; an undefined z (zero variance) is never rejected."""
    return not math.isnan(z) and abs(z) > NormalDist().inv_cdf(1 - alpha / 2)


def _finite(value: float) -> float | None:
    """JSON has no infinities: an impossible text (-inf) or an undefined z (nan) is null."""
    return value if math.isfinite(value) else None


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (an EOS string inside a text becomes EOS)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def check_tokens(ids: Sequence[int], eos_id: int | None, name: str) -> None:
    """A text must tokenize to something, and hold no EOS: it is one continuation, not several."""
    if not ids:
        raise NatprintsError(f"{name}: empty text after tokenization")
    if eos_id is not None and eos_id in ids:
        raise NatprintsError(f"{name}: holds the EOS token; give each paragraph as its own text")


@dataclass
class Candidate:
    """One model to score texts under, and the tokenizer it reads them with."""

    label: str
    info: ModelInfo
    tokenizer: Any

    @property
    def start(self) -> int:
        """The token a text without a prompt continues: BOS, else EOS."""
        tok = self.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise NatprintsError(
                f"model {self.label}: its tokenizer has neither a BOS nor an EOS token to start a text; give a prompt"
            )
        return int(start)

    @property
    def pad(self) -> int:
        """The id that pads batches (and marks the end event): EOS, else the pad or start token."""
        tok = self.tokenizer
        return next(int(i) for i in (tok.eos_token_id, tok.pad_token_id, self.start) if i is not None)

    def encode(self, text: str, prompt: str | None, name: str) -> tuple[list[int], list[int]]:
        """(context ids, text ids) for this model's tokenizer; see the module's note on the boundary."""
        ids = encode_texts(self.tokenizer, [text])[0]
        if prompt is None:
            context = [self.start]
        else:
            context = encode_texts(self.tokenizer, [prompt])[0]
            if not context:
                raise NatprintsError(f"{name}: its prompt is empty after tokenization by model {self.label}")
        check_tokens(ids, self.tokenizer.eos_token_id, name)
        return context, ids

    def check_room(self, context: Sequence[int], ids: Sequence[int], name: str) -> None:
        limit = self.info.max_positions
        if limit and len(context) + len(ids) > limit:
            raise NatprintsError(
                f"{name}: {len(context)} context + {len(ids)} text tokens exceed model {self.label}'s "
                f"context of {limit} positions"
            )


Pairs = tuple[list[list[int]], list[list[int]]]  # each text's context ids and text ids


def encode_for(
    candidates: Mapping[str, Candidate], texts: Sequence[str], prompts: Sequence[str] | None, names: Sequence[str]
) -> tuple[dict[str, Pairs], dict[int, str]]:
    """Every text tokenized for every candidate (once per tokenizer), and each failing text's first error.

    A text fails when some candidate cannot score it (empty, holding EOS, longer than its context).
    """
    by_tokenizer: dict[int, list[tuple[list[int], list[int]] | str]] = {}
    errors: dict[int, str] = {}
    out = {}
    for label, candidate in candidates.items():
        key = id(candidate.tokenizer)
        if key not in by_tokenizer:
            rows: list[tuple[list[int], list[int]] | str] = []
            for i, text in enumerate(texts):
                try:
                    rows.append(candidate.encode(text, None if prompts is None else prompts[i], names[i]))
                except NatprintsError as exc:
                    rows.append(str(exc))
            by_tokenizer[key] = rows
        rows = by_tokenizer[key]
        for i, row in enumerate(rows):
            if isinstance(row, str):
                errors.setdefault(i, row)
                continue
            try:
                candidate.check_room(*row, names[i])
            except NatprintsError as exc:
                errors.setdefault(i, str(exc))
        good = [row if not isinstance(row, str) else ([], []) for row in rows]
        out[label] = ([c for c, _ in good], [t for _, t in good])
    return out, dict(sorted(errors.items()))


def load_model_tokenizer(directory: Path | str) -> Any:
    """The tokenizer saved in a model (or tokenizer) directory, read offline; a one-line error if unusable."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not directory.is_dir() or not any(
        (directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        raise NatprintsError(f"no tokenizer at {directory} (no tokenizer.json); give --tokenizer DIR")
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a corrupt tokenizer
        first = first_line(exc)
        raise NatprintsError(f"cannot load the tokenizer at {directory}: {first}") from None


def has_tokenizer(directory: Path | str) -> bool:
    return (Path(directory) / "tokenizer.json").is_file() or (Path(directory) / "tokenizer_config.json").is_file()


def load_candidates(model_dirs: Mapping[str, Path | str], tokenizer: Any = None) -> dict[str, Candidate]:
    """Each model with the tokenizer in its own directory, else ``tokenizer`` (shared by the rest).

    A model whose vocabulary is smaller than its tokenizer's is an error naming it: its
    log-likelihoods would be of other texts. One tokenizer object per distinct tokenizer file.
    """
    from natprints.artifacts import sha256_file
    from natprints.modeldir import inspect_model

    if not model_dirs:
        raise NatprintsError("likelihood attribution needs at least one model")
    infos = {label: inspect_model(directory) for label, directory in model_dirs.items()}  # all checked first
    loaded: dict[str, Any] = {}
    out = {}
    for label, info in infos.items():
        own = info.path / "tokenizer.json"
        if has_tokenizer(info.path):
            key = sha256_file(own) if own.is_file() else str(info.path)
            if key not in loaded:
                loaded[key] = load_model_tokenizer(info.path)
            tok = loaded[key]
        elif tokenizer is not None:
            tok = tokenizer
        else:
            raise NatprintsError(f"model {label} ({info.path}) has no tokenizer of its own; give --tokenizer DIR")
        if info.vocab_size < len(tok):
            raise NatprintsError(
                f"model {label} ({info.path}) has vocab_size {info.vocab_size}, smaller than the tokenizer's "
                f"{len(tok)}: it does not read this tokenizer's ids"
            )
        out[label] = Candidate(label, info, tok)
    return out


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
) -> list[LikelihoodPrediction] | LikelihoodPrediction:
    """Attribute each text (or, with ``pool``, all of them together) to the model most likely to have written it.

    ``model_dirs`` maps labels to causal-LM directories (or :func:`load_candidates`' candidates); each
    reads the texts with the tokenizer in its directory, else ``tokenizer``. ``prompts`` gives each
    text's prompt (default: none, see the module's note on the boundary). ``temperature``, ``top_k`` and
    ``top_p`` are the transform the texts were sampled with. Returns one :class:`LikelihoodPrediction`
    per text in order, or one when ``pool``; ``top`` candidates each. ``loaded``: a dict that keeps
    each model loaded between calls (label -> model), for texts that arrive one at a time.
    ``token_logprobs``: a dict filled with label -> each text's per-token log-probabilities (an
    evidence bundle's scores).
    """
    import torch
    from tqdm.auto import tqdm

    from natprints.likelihood.scorer import as_scorer, score_texts
    from natprints.runtime import load_lm, resolve_device

    if not texts:
        raise NatprintsError("likelihood attribution needs at least one text")
    if prompts is not None and len(prompts) != len(texts):
        raise NatprintsError(f"likelihood attribution: {len(prompts)} prompts for {len(texts)} texts")
    if not temperature > 0 or top_k < 0 or not 0 < top_p <= 1:
        raise NatprintsError(
            f"need temperature > 0, top_k >= 0 and 0 < top_p <= 1, got {temperature}, {top_k} and {top_p}"
        )
    if not 0 < alpha < 1 or top < 1 or batch_size < 1:
        raise NatprintsError(f"need 0 < alpha < 1, top >= 1 and batch_size >= 1, got {alpha}, {top} and {batch_size}")
    candidates = (
        dict(model_dirs)
        if model_dirs and all(isinstance(c, Candidate) for c in model_dirs.values())
        else load_candidates(model_dirs, tokenizer)
    )
    # every text checked under every model (one encoding per tokenizer) before any model is loaded
    pairs, errors = encode_for(candidates, texts, prompts, [f"text {i}" for i in range(len(texts))])
    if errors:
        raise NatprintsError(next(iter(errors.values())))
    device = resolve_device(device)
    labels = list(candidates)
    n, k = len(texts), len(labels)
    loglik, entropy, variance = (np.zeros((n, k)) for _ in range(3))
    tokens = np.zeros((n, k), dtype=np.int64)
    for j, label in enumerate(tqdm(labels, desc="likelihood", unit="model", disable=None if progress else True)):
        candidate = candidates[label]
        contexts, continuations = pairs[label]
        lm = loaded.get(label) if loaded is not None else None
        if lm is None:
            lm = as_scorer(load_lm(candidate.info.path, device=device))
            if loaded is not None:
                loaded[label] = lm
        scores = score_texts(
            lm,
            contexts,
            continuations,
            eos_id=candidate.pad,
            new_tokens=max(len(ids) for ids in continuations),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            batch_size=batch_size,
            device=device,
        )
        for i, (score, ids) in enumerate(zip(scores, continuations, strict=True)):
            m = len(ids)  # a row shorter than the longest ends with an EOS event: not part of the text
            loglik[i, j] = score.token_logprobs[:m].sum()
            entropy[i, j] = score.entropy[:m].sum()
            variance[i, j] = score.logprob_variance[:m].sum()
            tokens[i, j] = m
        if token_logprobs is not None:
            token_logprobs[label] = [
                s.token_logprobs[: len(ids)].tolist() for s, ids in zip(scores, continuations, strict=True)
            ]
        del lm, scores
        if device == "cuda" and loaded is None:
            torch.cuda.empty_cache()
    if pool:
        return _predict(labels, loglik.sum(0), entropy.sum(0), variance.sum(0), tokens.sum(0), n, alpha, top)
    return [_predict(labels, loglik[i], entropy[i], variance[i], tokens[i], 1, alpha, top) for i in range(n)]


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
) -> LikelihoodPrediction:
    proba, order = _ranked(loglik, top)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (loglik + entropy) / np.sqrt(variance)
    unknown = all(_atypical(float(v), alpha) for v in z)
    best = labels[order[0]]
    return LikelihoodPrediction(
        label=UNKNOWN if unknown else best,
        probability=float(proba[order[0]]),
        best_model=best,
        top=[(labels[i], float(proba[i])) for i in order],
        unknown=unknown,
        loglik={m: float(v) for m, v in zip(labels, loglik, strict=True)},
        z={m: float(v) for m, v in zip(labels, z, strict=True)},
        tokens=int(tokens[order[0]]),
        texts=texts,
        alpha=alpha,
        model_tokens={m: int(t) for m, t in zip(labels, tokens, strict=True)},
        centred={m: float(v) for m, v in zip(labels, loglik + entropy, strict=True)},
        variance={m: float(v) for m, v in zip(labels, variance, strict=True)},
    )


def attribute_pooled(texts: Sequence[str], attributor: Attributor, top: int = 3) -> Prediction:
    """One verdict for texts of one source from a black-box attributor.

    The per-text log calibrated probabilities add up (equal priors, texts independent given the
    source) and the probability is their softmax. The attributor's single-text threshold applies to
    that pooled probability.
    """
    if not texts:
        raise NatprintsError("pooling needs at least one text")
    with np.errstate(divide="ignore"):
        log_scores = np.log(attributor.predict_proba(texts)).sum(axis=0)
    proba, order = _ranked(log_scores, max(top, 1))
    labels = attributor.labels
    p = float(proba[order[0]])
    unknown = p < attributor.threshold
    return Prediction(
        label=UNKNOWN if unknown else labels[order[0]],
        probability=p,
        best_model=labels[order[0]],
        top=[(labels[i], float(proba[i])) for i in order],
        unknown=unknown,
    )
