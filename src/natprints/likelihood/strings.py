"""Scoring strings under models of any family, each reading them with its own tokenizer.

A continuation *string* is scored as log p(continuation | prompt) under each model: the prompt and
the continuation are tokenized apart, each by the model's own tokenizer, as a generator that
continues the prompt's tokens produced them, and the continuation's canonical tokenization is
teacher-forced after the prompt's. Models with different vocabularies so compete on one string.

**The token boundary.** Without a prompt a text continues the tokenizer's BOS token (EOS where it has
none: the zoo's corpus separates paragraphs with EOS); where it stops carries no evidence (no EOS
event). With a prompt, prompt and text are tokenized apart. Byte-level BPE (the zoo's, GPT-2's,
Pythia's) keeps a text's leading space in its first token, so the pair is exact. A tokenizer that
marks word starts inside tokens (SentencePiece's "▁") reads the text as starting a new word after
the prompt, which is how its decoder writes a continuation that begins with one: decoded alone, the
leading "▁" leaves no space.

A string's probability sums over every tokenization; this scores its canonical one, which for a
sample drawn as another token sequence of the same string is lower than the sample's own path. A
string the tokenizer cannot read back (:func:`reads_back`: characters outside a vocabulary without
bytes, read as an unknown piece) is one the model cannot write, and scores -inf.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from natprints.errors import NatprintsError
from natprints.modeldir import encode_texts, has_tokenizer, load_model_tokenizer

if TYPE_CHECKING:
    from natprints.modeldir import ModelInfo


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

    def encode(
        self, text: str, prompt: str | None, name: str, sampled: Sequence[int] | None = None
    ) -> tuple[list[int], list[int], bool]:
        """(context ids, text ids, whether the text ids are ``sampled``) for this model's tokenizer; see
        the module's note on the boundary. ``sampled``: the ids the text was sampled as, where its
        source recorded them; this model scores them instead of a re-tokenization when its tokenizer
        reads them back as the text (the ids are in its vocabulary)."""
        as_sampled = sampled is not None and self.reads_as(sampled, text)
        ids = list(sampled) if as_sampled and sampled is not None else encode_texts(self.tokenizer, [text])[0]
        if prompt is None:
            context = [self.start]
        else:
            context = encode_texts(self.tokenizer, [prompt])[0]
            if not context:
                raise NatprintsError(f"{name}: its prompt is empty after tokenization by model {self.label}")
        check_tokens(ids, self.tokenizer.eos_token_id, name)
        return context, ids, as_sampled

    def reads_as(self, ids: Sequence[int], text: str) -> bool:
        """Whether ``ids`` are ids of this model's tokenizer that decode to ``text``."""
        if not ids or not all(0 <= i < len(self.tokenizer) for i in ids):
            return False
        return reads_back(self.tokenizer, ids, text)

    def check_room(self, context: Sequence[int], ids: Sequence[int], name: str) -> None:
        limit = self.info.max_positions
        if limit and len(context) + len(ids) > limit:
            raise NatprintsError(
                f"{name}: {len(context)} context + {len(ids)} text tokens exceed model {self.label}'s "
                f"context of {limit} positions"
            )


Pairs = tuple[list[list[int]], list[list[int]]]  # each text's context ids and text ids


class Encoded(NamedTuple):
    """Texts tokenized for every candidate: each one's pairs, each failing text's first error, and per
    candidate which texts it scores as their sampled ids (rather than a re-tokenization)."""

    pairs: dict[str, Pairs]
    errors: dict[int, str]
    as_sampled: dict[str, list[bool]]


def encode_for(
    candidates: Mapping[str, Candidate],
    texts: Sequence[str],
    prompts: Sequence[str | None] | None,
    names: Sequence[str],
    sampled: Sequence[Sequence[int] | None] | None = None,
) -> Encoded:
    """Every text tokenized for every candidate (once per tokenizer), and each failing text's first error.

    A text fails when some candidate cannot score it (empty, holding EOS, longer than its context).
    ``sampled``: each text's sampled token ids where known (see :meth:`Candidate.encode`).
    """
    by_tokenizer: dict[int, list[tuple[list[int], list[int], bool] | str]] = {}
    errors: dict[int, str] = {}
    pairs, as_sampled = {}, {}
    for label, candidate in candidates.items():
        key = id(candidate.tokenizer)
        if key not in by_tokenizer:
            rows: list[tuple[list[int], list[int], bool] | str] = []
            for i, text in enumerate(texts):
                prompt = None if prompts is None else prompts[i]
                try:
                    rows.append(candidate.encode(text, prompt, names[i], None if sampled is None else sampled[i]))
                except NatprintsError as exc:
                    rows.append(str(exc))
            by_tokenizer[key] = rows
        rows = by_tokenizer[key]
        for i, row in enumerate(rows):
            if isinstance(row, str):
                errors.setdefault(i, row)
                continue
            try:
                candidate.check_room(row[0], row[1], names[i])
            except NatprintsError as exc:
                errors.setdefault(i, str(exc))
        good = [row if not isinstance(row, str) else ([], [], False) for row in rows]
        pairs[label] = ([c for c, _, _ in good], [t for _, t, _ in good])
        as_sampled[label] = [bool(u) for _, _, u in good]
    return Encoded(pairs, dict(sorted(errors.items())), as_sampled)


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


def reads_back(tokenizer: Any, ids: Sequence[int], text: str) -> bool:
    """Whether ``ids`` decode to ``text`` again (up to the leading space a word-marking tokenizer drops):
    a tokenizer that reads characters outside its vocabulary as an unknown piece does not, and its model
    cannot write that text (its probability is 0, not the unknown piece's)."""
    return tokenizer.decode(list(ids)).lstrip() == text.lstrip()


@dataclass(frozen=True)
class StringScores:
    """Texts scored under one model (row i: text i): each text's per-token log-probabilities, and the
    sums the attributors read; no end event (a string says nothing of where its writer stopped)."""

    token_logprobs: list[np.ndarray]
    loglik: np.ndarray
    entropy: np.ndarray  # sum over the text's tokens of the transformed distribution's entropy
    variance: np.ndarray  # sum of the variance of log p
    tokens: np.ndarray  # tokens of the text under this model's tokenizer


def score_pairs(
    lm: Any,
    pairs: Pairs,
    *,
    end_id: int,
    temperature: float,
    top_k: int,
    top_p: float,
    batch_size: int,
    device: str,
) -> StringScores:
    """Score each (context ids, text ids) pair under ``lm`` (an :func:`~natprints.likelihood.scorer.as_scorer`
    model) without the end event; an empty text scores 0 under every model (it carries no evidence)."""
    from natprints.likelihood.scorer import score_texts

    contexts, continuations = pairs
    n = len(contexts)
    logprobs = [np.zeros(0)] * n
    loglik, entropy, variance = (np.zeros(n) for _ in range(3))
    tokens = np.array([len(ids) for ids in continuations], dtype=np.int64)
    rows = [i for i in range(n) if continuations[i]]
    if rows:
        scores = score_texts(
            lm,
            [contexts[i] for i in rows],
            [continuations[i] for i in rows],
            eos_id=end_id,
            new_tokens=int(tokens.max()),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            batch_size=batch_size,
            device=device,
        )
        for i, score in zip(rows, scores, strict=True):
            m = int(tokens[i])  # a row shorter than the longest ends with an EOS event: not part of the text
            logprobs[i] = score.token_logprobs[:m]
            loglik[i] = logprobs[i].sum()
            entropy[i] = score.entropy[:m].sum()
            variance[i] = score.logprob_variance[:m].sum()
    return StringScores(logprobs, loglik, entropy, variance, tokens)
