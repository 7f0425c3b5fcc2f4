"""White-box attribution: which known model wrote these texts, from each model's exact log-likelihood.

The zoo's texts are ancestral samples of known models, so scoring a text under every candidate (with
the sampling transform it was drawn with) gives the Bayes posterior with equal priors: the ceiling
that no text classifier beats. Each text is re-tokenized with the models' shared tokenizer (no
special tokens) and scored as a whole continuation of its prompt, or of the EOS token alone (the
corpus separates paragraphs with EOS); where it stops carries no evidence (no EOS event). Models are
loaded one at a time. The open set is the analytic (Fast-DetectGPT) test of each model: a model is
rejected when its discrepancy z = (loglik + sum H) / sqrt(sum Var) is below ``norm.ppf(alpha)`` (the
text is less likely than that model's own samples are), and the label is ``unknown`` when every
model is rejected. Pooling treats all texts as from one source: their log-likelihoods, z numerators
and variances add up to one verdict.

A re-tokenized text is the tokenizer's canonical tokenization; a sample drawn as another token
sequence of the same string scores lower than the sample itself did (the text's probability sums
over every tokenization; this scores one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np

from natprints.attribution.attributor import UNKNOWN, Prediction
from natprints.errors import NatprintsError

if TYPE_CHECKING:
    from natprints.attribution.attributor import Attributor
    from natprints.lineage.models import ModelInfo


@dataclass
class LikelihoodPrediction(Prediction):
    """A :class:`Prediction` from log-likelihoods, with each model's log-likelihood and discrepancy z.

    ``loglik`` and ``z`` are keyed by model label; ``tokens`` counts the scored tokens, ``texts`` the
    texts behind the verdict (more than one when pooled). ``alpha`` is the open-set test's level.
    """

    loglik: dict[str, float]
    z: dict[str, float]
    tokens: int
    texts: int
    alpha: float

    @property
    def rejected(self) -> list[str]:
        """The models whose own samples would be this unlikely less than ``alpha`` of the time."""
        limit = NormalDist().inv_cdf(self.alpha)
        return [m for m, z in self.z.items() if z < limit]  # nan (zero variance) is never below

    def to_dict(self) -> dict[str, Any]:
        """The attributor's fields plus per-model log-likelihood and z (null where not finite)."""
        return {
            **super().to_dict(),
            "loglik": {m: _finite(v) for m, v in self.loglik.items()},
            "z": {m: _finite(v) for m, v in self.z.items()},
            "rejected": self.rejected,
            "alpha": self.alpha,
            "tokens": self.tokens,
            "texts": self.texts,
        }


def _finite(value: float) -> float | None:
    """JSON has no infinities: an impossible text (-inf) or an undefined z (nan) is null."""
    return value if math.isfinite(value) else None


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (an EOS string inside a text becomes EOS)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def check_tokens(ids: Sequence[int], eos_id: int, name: str) -> None:
    """A text must tokenize to something, and hold no EOS: it is one continuation, not several."""
    if not ids:
        raise NatprintsError(f"{name}: empty text after tokenization")
    if eos_id in ids:
        raise NatprintsError(f"{name}: holds the EOS token; give each paragraph as its own text")


def check_models(model_dirs: Mapping[str, Path | str], tokenizer: Any) -> dict[str, ModelInfo]:
    """Read each model directory's config and check that it shares the tokenizer's vocabulary.

    A vocabulary smaller than the tokenizer's, or a tokenizer saved with the model that maps tokens
    to other ids, is an error naming the model: its log-likelihoods would be of other texts.
    """
    from natprints.lineage.models import inspect_model

    if not model_dirs:
        raise NatprintsError("likelihood attribution needs at least one model")
    size = len(tokenizer)
    vocab = None
    infos = {}
    for label, directory in model_dirs.items():
        info = inspect_model(directory)
        if info.vocab_size < size:
            raise NatprintsError(
                f"model {label} ({info.path}) has vocab_size {info.vocab_size}, smaller than the tokenizer's "
                f"{size}: it does not share this tokenizer"
            )
        own = info.path / "tokenizer.json"
        if own.is_file():
            vocab = vocab if vocab is not None else tokenizer.get_vocab()
            if _tokenizer_vocab(own) != vocab:
                raise NatprintsError(
                    f"model {label} ({info.path}) holds a tokenizer whose vocabulary differs from the one in use"
                )
        infos[label] = info
    return infos


def _tokenizer_vocab(path: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as exc:  # tokenizers raises its own exception types for a corrupt file
        raise NatprintsError(f"{path}: not a readable tokenizer ({str(exc).strip() or type(exc).__name__})") from None


def max_text_tokens(infos: Mapping[str, ModelInfo], context_tokens: int) -> int | None:
    """The longest text every model can score after ``context_tokens`` of context (None: no limit known)."""
    limits = [info.max_positions for info in infos.values() if info.max_positions]
    return min(limits) - context_tokens if limits else None


class _FullLogits:
    """Any causal LM in the shape :func:`score_texts` reads (``.model``, ``.lm_head``, ``.config``).

    The trunk returns the model's own final logits and the head is the identity, so whatever the
    architecture applies after its output embedding (soft-capping, logit scales) is kept. It costs the
    full (batch, length, vocab) logits; a Llama model is scored directly, from its hidden states.
    """

    def __init__(self, lm: Any):
        import torch

        self.config = lm.config
        self._lm = lm
        self.lm_head = torch.nn.Identity()
        self.lm_head.out_features = lm.config.vocab_size

    def model(self, input_ids: Any, use_cache: bool = False) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(last_hidden_state=self._lm(input_ids=input_ids, use_cache=use_cache).logits)


def _scorer(lm: Any) -> Any:
    return lm if type(lm).__name__ == "LlamaForCausalLM" else _FullLogits(lm)


def attribute_by_likelihood(
    texts: Sequence[str],
    model_dirs: Mapping[str, Path | str],
    tokenizer: Any,
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
) -> list[LikelihoodPrediction] | LikelihoodPrediction:
    """Attribute each text (or, with ``pool``, all of them together) to the model most likely to have written it.

    ``model_dirs`` maps labels to causal-LM directories sharing ``tokenizer`` (a
    ``PreTrainedTokenizerFast``); ``prompts`` gives each text's prompt (default: the EOS token alone).
    ``temperature``, ``top_k`` and ``top_p`` are the transform the texts were sampled with. Returns one
    :class:`LikelihoodPrediction` per text in order, or one when ``pool``; ``top`` candidates each.
    """
    import torch
    from tqdm.auto import tqdm

    from natprints.likelihood.scorer import score_texts
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
    eos = tokenizer.eos_token_id
    if eos is None:
        raise NatprintsError("the tokenizer has no EOS token (it pads the batches and starts a text without a prompt)")
    infos = check_models(model_dirs, tokenizer)
    continuations = encode_texts(tokenizer, texts)
    for i, ids in enumerate(continuations):
        check_tokens(ids, eos, f"text {i}")
    contexts = [[eos]] * len(texts) if prompts is None else encode_texts(tokenizer, prompts)
    for i, (context, ids) in enumerate(zip(contexts, continuations, strict=True)):
        if not context:
            raise NatprintsError(f"text {i}: its prompt is empty after tokenization")
        for label, info in infos.items():
            # the input is context + text (the EOS event after the longest row's end is scored, then dropped)
            if info.max_positions and len(context) + len(ids) > info.max_positions:
                raise NatprintsError(
                    f"text {i}: {len(context)} context + {len(ids)} text tokens exceed model {label}'s "
                    f"context of {info.max_positions} positions"
                )
    device = resolve_device(device)
    labels = list(model_dirs)
    n, k = len(texts), len(labels)
    loglik, entropy, variance = (np.zeros((n, k)) for _ in range(3))
    new_tokens = max(len(ids) for ids in continuations)
    for j, label in enumerate(tqdm(labels, desc="likelihood", unit="model", disable=None if progress else True)):
        lm = load_lm(infos[label].path, device=device)
        scores = score_texts(
            _scorer(lm),
            contexts,
            continuations,
            eos_id=eos,
            new_tokens=new_tokens,
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
        del lm, scores
        if device == "cuda":
            torch.cuda.empty_cache()
    tokens = np.array([len(ids) for ids in continuations])
    if pool:
        return _predict(labels, loglik.sum(0), entropy.sum(0), variance.sum(0), int(tokens.sum()), n, alpha, top)
    return [_predict(labels, loglik[i], entropy[i], variance[i], int(tokens[i]), 1, alpha, top) for i in range(n)]


def _ranked(log_scores: np.ndarray, top: int) -> tuple[np.ndarray, list[int]]:
    """Softmax of summed log scores (equal priors; -inf columns get 0, an all -inf row is uniform), best first."""
    from natprints.likelihood.scorer import posterior

    proba = posterior(np.asarray(log_scores, dtype=np.float64)[None, :])[0]
    return proba, np.argsort(-proba, kind="stable")[:top].tolist()


def _predict(
    labels: list[str],
    loglik: np.ndarray,
    entropy: np.ndarray,
    variance: np.ndarray,
    tokens: int,
    texts: int,
    alpha: float,
    top: int,
) -> LikelihoodPrediction:
    proba, order = _ranked(loglik, top)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (loglik + entropy) / np.sqrt(variance)
    unknown = bool(np.all(z < NormalDist().inv_cdf(alpha)))
    best = labels[order[0]]
    return LikelihoodPrediction(
        label=UNKNOWN if unknown else best,
        probability=float(proba[order[0]]),
        best_model=best,
        top=[(labels[i], float(proba[i])) for i in order],
        unknown=unknown,
        loglik={m: float(v) for m, v in zip(labels, loglik, strict=True)},
        z={m: float(v) for m, v in zip(labels, z, strict=True)},
        tokens=tokens,
        texts=texts,
        alpha=alpha,
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
