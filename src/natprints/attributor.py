"""Saved attributors: the best pipeline of a condition, calibrated, with an open-set threshold.

An attributor directory holds ``pipeline.json`` (the fitted pipeline's structure and parameters),
``arrays.npz`` (its arrays, loaded with ``allow_pickle=False``), ``attributor.json`` (label names,
temperature, threshold, provenance) and ``manifest.json`` with the sha256 of every file. Nothing is
pickled: objects are rebuilt only from the explicit :data:`TRUSTED_TYPES`, and every load checks
the hashes first. Loading an n-gram attributor imports neither torch nor sentence-transformers.
"""

from __future__ import annotations

import errno
import importlib
import io
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from natprints.artifacts import (
    MANIFEST,
    atomic_write_bytes,
    atomic_write_json,
    load_verified_manifest,
    write_manifest,
)
from natprints.errors import NatprintsError

KIND = "natprints-attributor"
FORMAT_VERSION = 1
PIPELINE_FILE = "pipeline.json"
ARRAYS_FILE = "arrays.npz"
META_FILE = "attributor.json"
UNKNOWN = "unknown"
DEFAULT_MAX_TEXT_BYTES = 1_000_000

# The only classes a saved pipeline may contain; anything else is refused before it is imported.
TRUSTED_TYPES = frozenset(
    {
        "sklearn.pipeline.Pipeline",
        "sklearn.pipeline.FeatureUnion",
        "sklearn.feature_extraction.text.TfidfVectorizer",
        "sklearn.feature_extraction.text.TfidfTransformer",
        "sklearn.linear_model._logistic.LogisticRegression",
        "sklearn.svm._classes.LinearSVC",
        "sklearn.calibration.CalibratedClassifierCV",
        "sklearn.calibration._CalibratedClassifier",
        "sklearn.calibration._SigmoidCalibration",
        "sklearn.neural_network._multilayer_perceptron.MLPClassifier",
        "sklearn.preprocessing._label.LabelBinarizer",
        "sklearn.preprocessing._label.LabelEncoder",
        "natprints.features.SentenceEmbedder",
        "natprints.features.LabelXGBClassifier",
        "natprints.features.TopFeatures",
    }
)
_NUMPY_TYPES = {f"numpy.{t}": getattr(np, t) for t in ("float32", "float64", "int32", "int64")}
# Fitted state needed only to continue training; never saved.
_DROPPED = {"_optimizer", "_random_state", "_best_coefs", "_best_intercepts"}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class _StateWriter:
    """Turns a fitted estimator into JSON plus named arrays, refusing untrusted types."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def encode(self, obj: Any) -> Any:
        if isinstance(obj, np.generic):  # before int/float: np.float64 subclasses float
            return {"__scalar__": obj.dtype.str, "value": self.encode(obj.item())}
        if obj is None or isinstance(obj, bool | str | int):
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {"__float__": repr(obj)}
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind in "biufU":
                key = f"a{len(self.arrays)}"
                self.arrays[key] = obj
                return {"__array__": key}
            if obj.dtype.kind == "O" and all(isinstance(v, str) for v in obj.ravel()):
                return {"__strarray__": obj.tolist(), "shape": list(obj.shape)}
            raise NatprintsError(f"cannot save an array of dtype {obj.dtype}")
        if isinstance(obj, list):
            return [self.encode(v) for v in obj]
        if isinstance(obj, tuple):
            return {"__tuple__": [self.encode(v) for v in obj]}
        if isinstance(obj, dict):
            if not all(isinstance(k, str) for k in obj):
                raise NatprintsError("cannot save a dict with non-string keys")
            if obj and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in obj.values()):
                return {"__intdict__": {k: int(v) for k, v in obj.items()}}
            return {"__dict__": {k: self.encode(v) for k, v in obj.items()}}
        if isinstance(obj, type) and _qualname(obj) in _NUMPY_TYPES:
            return {"__type__": _qualname(obj)}
        name = _qualname(type(obj))
        if name not in TRUSTED_TYPES:
            raise NatprintsError(f"cannot save an object of untrusted type {name}")
        state = obj.__getstate__() if hasattr(obj, "__getstate__") else vars(obj)
        state = {k: v for k, v in dict(state).items() if k not in _DROPPED}
        return {"__object__": name, "state": self.encode(state)}


def _decode(node: Any, arrays: dict[str, np.ndarray], plain: bool = False) -> Any:
    if node is None or isinstance(node, bool | int | float | str):
        return node
    if isinstance(node, list):
        return [_decode(v, arrays, plain) for v in node]
    if not isinstance(node, dict) or len(node) not in (1, 2):
        raise ValueError("malformed pipeline state")
    if "__float__" in node:
        return float(node["__float__"])
    if "__scalar__" in node:
        return np.dtype(node["__scalar__"]).type(_decode(node["value"], arrays, plain))
    if "__array__" in node:
        return arrays[node["__array__"]]
    if "__strarray__" in node:
        return np.array(node["__strarray__"], dtype=object).reshape(node["shape"])
    if "__tuple__" in node:
        return tuple(_decode(v, arrays, plain) for v in node["__tuple__"])
    if "__intdict__" in node:
        items = node["__intdict__"]  # JSON keys are str already; a 50,000-term vocabulary is one of these
        return dict(zip(items, map(int, items.values()), strict=True))
    if "__dict__" in node:
        return {str(k): _decode(v, arrays, plain) for k, v in node["__dict__"].items()}
    if "__type__" in node:
        return _NUMPY_TYPES[node["__type__"]]
    if "__object__" in node:
        name = node["__object__"]
        if name not in TRUSTED_TYPES:
            raise NatprintsError(f"refusing to load untrusted type {name}")
        state = _decode(node["state"], arrays, plain)
        if plain:
            return Saved(name, state)
        module, _, cls_name = name.rpartition(".")
        cls = getattr(importlib.import_module(module), cls_name)
        obj = cls.__new__(cls)
        if hasattr(obj, "__setstate__"):
            obj.__setstate__(state)
        else:  # pragma: no cover - every trusted type has __setstate__ on Python >= 3.11
            obj.__dict__.update(state)
        return obj
    raise ValueError("malformed pipeline state")


class Saved:
    """A saved object's class name and decoded state, for reading a pipeline without importing it."""

    def __init__(self, kind: str, state: dict[str, Any]):
        self.kind = kind
        self.__dict__.update(state)


def _kind(obj: Any) -> str:
    return obj.kind if isinstance(obj, Saved) else _qualname(type(obj))


def dump_estimator(estimator: Any) -> tuple[bytes, bytes]:
    """Serialize a fitted estimator to (JSON bytes, npz bytes) without pickle."""
    writer = _StateWriter()
    tree = writer.encode(estimator)
    return (json.dumps(tree, sort_keys=True) + "\n").encode("utf-8"), npz_bytes(writer.arrays)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` archive with fixed member timestamps: the same arrays give the same bytes."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return buf.getvalue()


def load_estimator(tree_bytes: bytes, arrays_bytes: bytes, *, plain: bool = False) -> Any:
    """Rebuild an estimator written by :func:`dump_estimator`; only trusted types are created.

    ``plain``: :class:`Saved` objects instead of the estimators (nothing is imported).
    """
    tree = json.loads(tree_bytes.decode("utf-8"))
    with np.load(io.BytesIO(arrays_bytes), allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return _decode(tree, arrays, plain)


# --- calibration and the open-set threshold -----------------------------------------------------


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scale class probabilities: softmax(log p / T)."""
    logits = np.log(np.clip(np.asarray(proba, dtype=np.float64), 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def fit_temperature(proba: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of held-out labels."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return 1.0

    def nll(log_t: float) -> float:
        p = apply_temperature(proba, math.exp(log_t))
        return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0)).mean())

    result = minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded")
    return float(math.exp(result.x))


def choose_threshold(best_proba: np.ndarray, reject_rate: float) -> float:
    """The probability below which a text is `unknown`: the ``reject_rate`` quantile on known texts."""
    if reject_rate <= 0 or len(best_proba) == 0:
        return 0.0
    return float(np.quantile(np.asarray(best_proba, dtype=np.float64), reject_rate))


# --- the attributor -------------------------------------------------------------------------------


@dataclass
class Prediction:
    """One text's attribution: ``label`` is a model id, or ``unknown`` below the threshold."""

    label: str
    probability: float
    best_model: str
    top: list[tuple[str, float]]
    unknown: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "probability": self.probability,
            "best_model": self.best_model,
            "unknown": self.unknown,
            "top": [{"model": m, "probability": p} for m, p in self.top],
        }


@dataclass
class Attributor:
    """A fitted pipeline over class indices, the model ids they stand for, calibration, threshold."""

    pipeline: Any
    labels: list[str]
    temperature: float = 1.0
    threshold: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    _counter: NgramCounter | None = field(default=None, init=False, repr=False, compare=False)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Calibrated probabilities, one column per label (in ``labels`` order)."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, len(self.labels)))
        raw = np.asarray(self._pipeline_proba(texts), dtype=np.float64)
        full = np.zeros((len(texts), len(self.labels)))
        full[:, np.asarray(self.pipeline.classes_, dtype=np.int64)] = raw
        return apply_temperature(full, self.temperature)

    def _pipeline_proba(self, texts: list[str]) -> np.ndarray:
        """The pipeline's probabilities; an n-gram first step is counted vectorized (same matrix)."""
        vectorizer = _ngram_first_step(self.pipeline)
        if vectorizer is None or not all(isinstance(t, str) for t in texts):
            return self.pipeline.predict_proba(texts)
        if self._counter is None or not self._counter.built_for(vectorizer):  # built once per fitted vocabulary
            self._counter = NgramCounter(vectorizer)
        if not self._counter.usable:
            return self.pipeline.predict_proba(texts)
        return self.pipeline[1:].predict_proba(self._counter.transform(texts))

    @property
    def batch_invariant(self) -> bool:
        """Whether a text's result is independent of the texts predicted with it (to the last bit).

        True for sparse n-gram features under a classifier that scores each row on its own (linear
        models, calibrated SVMs, trees); dense features or hidden layers go through BLAS matrix
        products whose rounding may depend on the batch's size.
        """
        if isinstance(self.pipeline, NgramLogistic):
            return True
        steps = getattr(self.pipeline, "steps", None)
        if _qualname(type(self.pipeline)) != "sklearn.pipeline.Pipeline" or not steps:
            return False
        first = _qualname(type(steps[0][1]))
        return first == "sklearn.feature_extraction.text.TfidfVectorizer" and all(
            _row_wise(est) for _, est in steps[1:]
        )

    def predict(self, texts: Sequence[str], top_k: int = 3) -> list[Prediction]:
        proba = self.predict_proba(texts)
        k = max(top_k, 1)
        order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
        top_p = np.take_along_axis(proba, order, axis=1)
        labels = self.labels
        out = []
        for idx, ps in zip(order.tolist(), top_p.tolist(), strict=True):
            best, p = idx[0], ps[0]
            unknown = p < self.threshold
            out.append(
                Prediction(
                    label=UNKNOWN if unknown else labels[best],
                    probability=p,
                    best_model=labels[best],
                    top=[(labels[i], q) for i, q in zip(idx, ps, strict=True)],
                    unknown=unknown,
                )
            )
        return out


_ROW_WISE = frozenset(
    {
        "sklearn.linear_model._logistic.LogisticRegression",
        "sklearn.calibration.CalibratedClassifierCV",
        "natprints.features.TopFeatures",
        "natprints.features.LabelXGBClassifier",
    }
)


def _row_wise(estimator: Any) -> bool:
    """Whether ``estimator`` maps sparse rows to outputs one row at a time (see ``batch_invariant``)."""
    name = _qualname(type(estimator))
    if name == "sklearn.pipeline.Pipeline":
        return all(_row_wise(est) for _, est in estimator.steps)
    return name in _ROW_WISE


# --- vectorized n-gram counting -------------------------------------------------------------------


_WHITE_SPACES = re.compile(r"\s\s+")  # scikit-learn's _VectorizerMixin._white_spaces
# Word token patterns that never match whitespace, so a vocabulary's word n-gram splits on " ".
_TOKEN_PATTERNS = frozenset({r"(?u)\b\w\w+\b", r"(?u)\b\w+\b|[^\w\s]"})  # scikit-learn's, natprints'


class NgramCounter:
    """A fitted ``TfidfVectorizer``'s ``transform``, with the n-gram counting done in numpy.

    scikit-learn counts n-grams in a Python loop (one dict lookup per n-gram: most of the time of
    an n-gram attributor). Here every unit of a batch (a character, or a word token) becomes a small
    integer id and every n-gram is looked up at once: in dense per-length tables that walk a trie of
    the vocabulary (characters), or as bit-packed keys in the sorted vocabulary (words). The count
    matrix equals scikit-learn's entry for entry (dtype, sorted indices) and the vectorizer's own
    TF-IDF step is applied to it, so the features, and every probability, are identical.
    """

    MAX_TABLE = 1 << 25  # entries of one dense trie level; larger vocabularies use sorted keys

    def __init__(self, vectorizer: Any):
        self.vectorizer = vectorizer
        self.min_n, self.max_n = vectorizer.ngram_range
        self.vocabulary = vocabulary = vectorizer.vocabulary_
        self.n_features = len(vocabulary)
        self.char = vectorizer.analyzer == "char"
        cols = np.fromiter(vocabulary.values(), dtype=np.int64, count=len(vocabulary))
        if self.char:
            joined = "".join(vocabulary)
            codes = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), np.uint32)
            alphabet = np.unique(codes)
            self.n_units = len(alphabet)
            self.table = np.zeros(int(alphabet.max(initial=0)) + 1, dtype=np.int32)
            self.table[alphabet] = np.arange(1, self.n_units + 1)  # id 0: unknown unit or text boundary
            flat = self.table[codes]
            lengths = np.fromiter(map(len, vocabulary), dtype=np.int64, count=len(vocabulary))
        else:
            self.tokenize = re.compile(vectorizer.token_pattern).findall
            self.units: dict[str, int] = {}
            split = [term.split(" ") for term in vocabulary]
            for parts in split:
                for u in parts:
                    self.units.setdefault(u, len(self.units) + 1)
            self.n_units = len(self.units)
            flat = np.array([self.units[u] for parts in split for u in parts], dtype=np.int32)
            lengths = np.fromiter(map(len, split), dtype=np.int64, count=len(split))
        # One row of unit ids per vocabulary term, 0-padded to max_n.
        width = max(self.max_n, int(lengths.max(initial=0)))
        terms = np.zeros((len(lengths), width), dtype=np.int64)
        starts = np.cumsum(lengths) - lengths
        terms[np.repeat(np.arange(len(lengths)), lengths), np.arange(len(flat)) - np.repeat(starts, lengths)] = flat
        keep = lengths <= self.max_n  # longer terms (a hand-made vocabulary) never match
        terms, lengths, cols = terms[keep, : self.max_n], lengths[keep], cols[keep]
        self.width = self.n_units + 1
        self.levels = self._trie(terms, lengths, cols)
        self.bits = max(self.n_units.bit_length(), 1)
        self.usable = self.levels is not None or self.bits * self.max_n <= 62
        if self.levels is None and self.usable:
            packed = (terms << (self.bits * np.arange(self.max_n))).sum(axis=1)
            order = np.argsort(packed, kind="stable")
            self.keys, self.cols = packed[order], cols[order]

    def _trie(self, terms: np.ndarray, lengths: np.ndarray, cols: np.ndarray) -> list[tuple[Any, Any]] | None:
        """Per n-gram length: (child table, column table); None when a level would be too large.

        Level-n nodes are the distinct n-unit prefixes of the vocabulary (0: no such prefix); the
        child table maps (level n-1 node, unit) to a level-n node, the column table a node to its
        vocabulary column (-1: a prefix only).
        """
        levels = []
        node, n_nodes = terms[:, 0], self.n_units  # level 1: a node per unit id
        for n in range(1, self.max_n + 1):
            child = None
            if n > 1:
                if (n_nodes + 1) * self.width > self.MAX_TABLE:
                    return None
                has = lengths >= n
                pair = node[has] * self.width + terms[has, n - 1]
                uniq, inverse = np.unique(pair, return_inverse=True)
                child = np.zeros((n_nodes + 1) * self.width, dtype=np.int32)
                child[uniq] = np.arange(1, len(uniq) + 1)
                node = np.zeros(len(terms), dtype=np.int64)
                node[has] = inverse + 1
                n_nodes = len(uniq)
            column = np.full(n_nodes + 1, -1, dtype=np.int64)
            ends = lengths == n
            column[node[ends]] = cols[ends]
            levels.append((child, column))
        return levels

    def built_for(self, vectorizer: Any) -> bool:
        """Whether this counter is for ``vectorizer`` as it is now fitted (a refit makes a new vocabulary)."""
        v = vectorizer
        return v is self.vectorizer and v.vocabulary_ is self.vocabulary and v.ngram_range == (self.min_n, self.max_n)

    @staticmethod
    def supports(vectorizer: Any) -> bool:
        """Whether ``vectorizer`` is a fitted ``TfidfVectorizer`` whose analyzer the counter reproduces."""
        v = vectorizer
        if _kind(v) != "sklearn.feature_extraction.text.TfidfVectorizer":
            return False
        word = (
            v.analyzer == "word" and v.tokenizer is None and v.stop_words is None and v.token_pattern in _TOKEN_PATTERNS
        )
        return (
            (v.analyzer == "char" or word)
            and v.input == "content"
            and v.preprocessor is None
            and v.strip_accents is None
            and hasattr(v, "vocabulary_")
            and hasattr(v, "_tfidf")
        )

    def _unit_ids(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The batch's unit ids, a 0 after every text (no n-gram spans two texts); each text's length."""
        v = self.vectorizer
        if v.lowercase:
            texts = [t.lower() for t in texts]
        if self.char:
            white = getattr(v, "_white_spaces", _WHITE_SPACES)
            texts = [white.sub(" ", t) for t in texts]
            lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
            codes = np.frombuffer(("\x00".join(texts) + "\x00").encode("utf-32-le", "surrogatepass"), np.uint32)
            ids = self.table[np.minimum(codes, len(self.table) - 1)]
            ids[codes >= len(self.table)] = 0
            ids[np.cumsum(lengths + 1) - 1] = 0
            return ids, lengths
        get = self.units.get
        flat: list[int] = []
        lengths = np.zeros(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            tokens = self.tokenize(text)
            flat.extend([get(tok, 0) for tok in tokens])
            flat.append(0)
            lengths[i] = len(tokens)
        return np.array(flat, dtype=np.int32), lengths

    def _matches(self, ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """(positions, columns) of the vocabulary n-grams starting at each position, per length."""
        out = []
        if self.levels is not None:
            node = ids
            for n, (child, column) in enumerate(self.levels, start=1):
                if n > 1:
                    node = child[node[:-1] * self.width + ids[n - 1 :]]
                if n >= self.min_n:
                    col = column[node]
                    at = np.flatnonzero(col >= 0)
                    out.append((at, col[at]))
            return out
        key, valid = ids.astype(np.int64), ids != 0
        for n in range(1, self.max_n + 1):
            if n > 1:
                key = key[:-1] | (ids[n - 1 :].astype(np.int64) << (self.bits * (n - 1)))
                valid = valid[:-1] & (ids[n - 1 :] != 0)
            if n >= self.min_n and len(self.keys):
                at = np.flatnonzero(valid)
                pos = np.searchsorted(self.keys, key[at]).clip(max=len(self.keys) - 1)
                hit = self.keys[pos] == key[at]
                out.append((at[hit], self.cols[pos[hit]]))
        return out

    def counts(self, texts: list[str], align: bool = True) -> Any:
        """The document-term count matrix, as ``CountVectorizer.transform`` makes it.

        ``align``: in scikit-learn's configured sparse container (else a ``csr_array``, and
        scikit-learn is not imported).
        """
        import scipy.sparse as sp

        ids, lengths = self._unit_ids(texts)
        row_of = np.repeat(np.arange(len(texts), dtype=np.int64), lengths + 1)
        matches = self._matches(ids)
        cell = np.concatenate([row_of[at] * self.n_features + col for at, col in matches] or [np.zeros(0, np.int64)])
        cell.sort()
        first = np.flatnonzero(np.concatenate([[True], cell[1:] != cell[:-1]])) if len(cell) else cell
        counts = np.diff(np.append(first, len(cell))).astype(np.intc)
        rows, columns = np.divmod(cell[first], self.n_features)
        indptr = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=len(texts)), out=indptr[1:])
        index = np.int32 if len(first) <= np.iinfo(np.int32).max else np.int64
        X = sp.csr_array(
            (counts, columns.astype(index), indptr.astype(index)),
            shape=(len(texts), self.n_features),
            dtype=self.vectorizer.dtype,
        )
        X.sort_indices()
        if self.vectorizer.binary:
            X.data.fill(1)
        if not align:
            return X
        try:
            from sklearn.utils._sparse import _align_api_if_sparse
        except ImportError:  # pragma: no cover - older scikit-learn: count matrices are csr_matrix
            return sp.csr_matrix(X)
        return _align_api_if_sparse(X)

    def transform(self, texts: list[str]) -> Any:
        """``TfidfVectorizer.transform(texts)``: the counts, then the vectorizer's TF-IDF step."""
        return self.vectorizer._tfidf.transform(self.counts(texts), copy=False)


def _ngram_first_step(pipeline: Any) -> Any:
    """The pipeline's first step when :class:`NgramCounter` can count for it (and a step follows)."""
    steps = getattr(pipeline, "steps", None)
    if _qualname(type(pipeline)) != "sklearn.pipeline.Pipeline" or not steps or len(steps) < 2:
        return None
    return steps[0][1] if NgramCounter.supports(steps[0][1]) else None


class NgramLogistic:
    """``predict_proba`` of a saved TfidfVectorizer + LogisticRegression pipeline, without scikit-learn.

    For `natprints attribute`: importing scikit-learn (and the scipy.stats and pandas it imports)
    is most of the CLI's time to first answer. These are scikit-learn's own numpy and scipy
    operations, in its order and dtypes, so the probabilities are bit-identical to the pipeline's
    (the tests compare the two); :func:`plain_ngram_logistic` says which saved pipelines qualify.
    """

    def __init__(self, vectorizer: Saved, classifier: Saved):
        self.counter = NgramCounter(vectorizer)
        self.tfidf = vectorizer._tfidf
        self.classes_ = classifier.classes_
        self.coef_, self.intercept_ = classifier.coef_, classifier.intercept_

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        import scipy.sparse as sp

        X = sp.csr_matrix(self.counter.counts(list(texts), align=False))
        t = self.tfidf  # TfidfTransformer.transform
        if t.sublinear_tf:
            np.log(X.data, X.data)
            X.data += 1.0
        if hasattr(t, "idf_"):
            X.data *= t.idf_[X.indices]
        if t.norm == "l2":
            _normalize_rows_l2(X)
        scores = X @ self.coef_.T + self.intercept_  # LogisticRegression.decision_function
        scores -= np.max(scores, axis=1).reshape((-1, 1))  # sklearn.utils.extmath.softmax
        np.exp(scores, out=scores)
        scores /= np.sum(scores, axis=1).reshape((-1, 1))
        return scores


def _normalize_rows_l2(X: Any) -> None:
    """scikit-learn's ``inplace_csr_row_normalize_l2``: per row, float32 squares summed in order in a
    double, then each value divided by the root in double and rounded back (rows sum to zero: kept)."""
    lengths = np.diff(X.indptr)
    order = np.argsort(-lengths, kind="stable")  # longest rows first: column j is a prefix of them
    starts, squares = X.indptr[:-1][order], (X.data * X.data).astype(np.float64)
    total = np.zeros(len(order))
    active = np.searchsorted(-lengths[order], -np.arange(int(lengths.max(initial=0))), side="left")  # rows > j
    for j, k in enumerate(active.tolist()):  # one vectorized step per position: the adds stay in order
        total[:k] += squares[starts[:k] + j]
    norms = np.ones(len(order))
    norms[order] = np.where(total == 0.0, 1.0, np.sqrt(total))
    X.data[:] = (X.data.astype(np.float64) / np.repeat(norms, lengths)).astype(X.data.dtype)


def plain_ngram_logistic(pipeline: Any) -> NgramLogistic | None:
    """An :class:`NgramLogistic` for a pipeline read with ``plain=True``, when it is one it reproduces."""
    steps = getattr(pipeline, "steps", None)
    if _kind(pipeline) != "sklearn.pipeline.Pipeline" or not isinstance(steps, list) or len(steps) != 2:
        return None
    (_, vectorizer), (_, classifier) = steps
    if (
        not NgramCounter.supports(vectorizer)
        or _kind(classifier) != "sklearn.linear_model._logistic.LogisticRegression"
    ):
        return None
    t = vectorizer._tfidf
    if t.norm not in ("l2", None) or getattr(t, "use_idf", True) != hasattr(t, "idf_"):
        return None
    coef, classes = getattr(classifier, "coef_", None), getattr(classifier, "classes_", None)
    if coef is None or classes is None or len(classes) < 3 or coef.shape != (len(classes), len(vectorizer.vocabulary_)):
        return None  # two classes: a logistic, not a softmax
    if getattr(classifier, "multi_class", "auto") not in ("auto", "multinomial", "deprecated"):
        return None
    predictor = NgramLogistic(vectorizer, classifier)
    return predictor if predictor.counter.usable else None


def save_attributor(directory: Path | str, attributor: Attributor, fields: dict[str, Any]) -> Path:
    """Write an attributor directory; the manifest, written last, lists every file's sha256."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)  # incomplete until the manifest is back
    tree, arrays = dump_estimator(attributor.pipeline)
    atomic_write_bytes(directory / PIPELINE_FILE, tree)
    atomic_write_bytes(directory / ARRAYS_FILE, arrays)
    meta = {
        **attributor.meta,
        "labels": list(attributor.labels),
        "temperature": attributor.temperature,
        "threshold": attributor.threshold,
    }
    atomic_write_json(directory / META_FILE, meta)
    write_manifest(
        directory,
        {"kind": KIND, "format_version": FORMAT_VERSION, **fields},
        [PIPELINE_FILE, ARRAYS_FILE, META_FILE],
    )
    return directory


def load_attributor(directory: Path | str, *, light: bool = False) -> Attributor:
    """Load and verify an attributor; a missing, foreign or tampered one is a :class:`NatprintsError`.

    ``light``: when the pipeline is one :class:`NgramLogistic` reproduces, use that instead (same
    probabilities, scikit-learn never imported); for the CLI's time to first answer.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise NatprintsError(f"no attributor at {directory} (run `natprints experiments` first)")
    manifest = load_verified_manifest(directory, "attributor")
    if manifest.get("kind") != KIND:
        raise NatprintsError(f"{directory} is not a natprints attributor (foreign artifact)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise NatprintsError(
            f"attributor at {directory} has format {manifest.get('format_version')}, "
            f"this natprints reads {FORMAT_VERSION}; rerun `natprints experiments`"
        )
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        tree, arrays = (directory / PIPELINE_FILE).read_bytes(), (directory / ARRAYS_FILE).read_bytes()
        pipeline = plain_ngram_logistic(load_estimator(tree, arrays, plain=True)) if light else None
        pipeline = pipeline or load_estimator(tree, arrays)
        labels = [str(x) for x in meta["labels"]]
        attributor = Attributor(
            pipeline=pipeline,
            labels=labels,
            temperature=float(meta["temperature"]),
            threshold=float(meta["threshold"]),
            meta={k: v for k, v in meta.items() if k not in ("labels", "temperature", "threshold")},
        )
    except NatprintsError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        raise NatprintsError(f"attributor at {directory} is corrupt: {exc}") from None
    if not labels or not hasattr(pipeline, "predict_proba"):
        raise NatprintsError(f"attributor at {directory} is corrupt: no labels or no classifier")
    return attributor


def attribute(texts: Sequence[str], attributor: Attributor | Path | str, top_k: int = 3) -> list[Prediction]:
    """Attribute each text to a known model (or ``unknown``); the importable API behind the CLI."""
    if not isinstance(attributor, Attributor):
        attributor = load_attributor(attributor)
    return attributor.predict(list(texts), top_k=top_k)


def decode_text(data: bytes, name: str, max_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> str:
    """Check one input's bytes and return its text; every problem is a one-line error."""
    if len(data) > max_bytes:
        raise NatprintsError(f"{name}: text is over the size limit (more than {max_bytes} bytes)")
    if b"\x00" in data:
        raise NatprintsError(f"{name}: binary data, not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise NatprintsError(f"{name}: not UTF-8 text") from None
    if not text.strip():
        raise NatprintsError(f"{name}: empty text")
    return text


def read_text_file(path: Path | str, max_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> str:
    """Read one input file for attribution; never reads more than ``max_bytes + 1`` bytes."""
    path = Path(path)
    try:  # open first, then ask: one system call per check is what 10,000 inputs cost
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise NatprintsError(f"{path}: text is over the size limit ({size} > {max_bytes} bytes)")
            data = f.read(max_bytes + 1)
    except IsADirectoryError:
        raise NatprintsError(f"{path}: is a directory, not a text file") from None
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            raise NatprintsError(f"{path}: no such file") from None
        raise NatprintsError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode_text(data, str(path), max_bytes)
