"""The n-gram fast path of ``natprints attribute``: counting and scoring without scikit-learn.

:class:`NgramCounter` counts word and character n-grams vectorized, giving the same matrix as a
fitted ``TfidfVectorizer``; :class:`NgramLogistic` evaluates a saved TF-IDF + logistic regression
with scikit-learn's own numpy operations in its order and dtypes. Both are gated by bit-identity
tests against scikit-learn, which is pinned to the minor version those tests pass on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

ROW_WISE = frozenset(
    {
        "sklearn.linear_model._logistic.LogisticRegression",
        "sklearn.calibration.CalibratedClassifierCV",
        "sklearn.feature_selection._univariate_selection.SelectKBest",
        "natprints.attribution.estimators.LabelXGBClassifier",
    }
)


def row_wise(estimator: Any) -> bool:
    """Whether ``estimator`` maps sparse rows to outputs one row at a time (see ``batch_invariant``)."""
    name = _kind(estimator)
    if name == "sklearn.pipeline.Pipeline":
        return all(row_wise(est) for _, est in estimator.steps)
    return name in ROW_WISE


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


def ngram_first_step(pipeline: Any) -> Any:
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
    (the tests compare the two); :func:`export_ngram_logistic` says which pipelines qualify.
    """

    def __init__(self, vectorizer: Any, classifier: Any):
        self.counter = NgramCounter(vectorizer)
        self.tfidf = vectorizer._tfidf
        self.classes_ = classifier.classes_
        self.coef_, self.intercept_ = classifier.coef_, classifier.intercept_

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        scores = self.decision_function(texts)
        scores -= np.max(scores, axis=1).reshape((-1, 1))  # sklearn.utils.extmath.softmax
        np.exp(scores, out=scores)
        scores /= np.sum(scores, axis=1).reshape((-1, 1))
        return scores

    def decision_function(self, texts: Sequence[str]) -> np.ndarray:
        """(n, rows of coef_) linear scores: a binary model's one column is its log-odds of class 1."""
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
        return np.asarray(X @ self.coef_.T + self.intercept_)  # LogisticRegression.decision_function


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


def _eligible(pipeline: Any, binary: bool = False) -> bool:
    """Whether ``pipeline`` is a TF-IDF + multinomial logistic regression :class:`NgramLogistic` reproduces
    (``binary``: a two-class logistic regression, whose decision function it reproduces)."""
    steps = getattr(pipeline, "steps", None)
    if _kind(pipeline) != "sklearn.pipeline.Pipeline" or not isinstance(steps, list) or len(steps) != 2:
        return False
    (_, vectorizer), (_, classifier) = steps
    if (
        not NgramCounter.supports(vectorizer)
        or _kind(classifier) != "sklearn.linear_model._logistic.LogisticRegression"
    ):
        return False
    t = vectorizer._tfidf
    if t.norm not in ("l2", None) or getattr(t, "use_idf", True) != hasattr(t, "idf_"):
        return False
    coef, classes = getattr(classifier, "coef_", None), getattr(classifier, "classes_", None)
    if binary:
        return (
            coef is not None
            and classes is not None
            and len(classes) == 2
            and coef.shape == (1, len(vectorizer.vocabulary_))
        )
    if coef is None or classes is None or len(classes) < 3 or coef.shape != (len(classes), len(vectorizer.vocabulary_)):
        return False  # two classes: a logistic, not a softmax
    return getattr(classifier, "multi_class", "auto") in ("auto", "multinomial", "deprecated")


_VECTORIZER_FIELDS = (
    "analyzer", "ngram_range", "lowercase", "token_pattern", "binary", "input", "preprocessor",
    "strip_accents", "tokenizer", "stop_words",
)  # fmt: skip


def export_ngram_logistic(pipeline: Any, binary: bool = False) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """The fast path's parameters of a fitted pipeline (JSON fields, arrays), when it qualifies."""
    if not _eligible(pipeline, binary) or not NgramCounter(pipeline.steps[0][1]).usable:
        return None
    vectorizer, classifier = pipeline.steps[0][1], pipeline.steps[1][1]
    t = vectorizer._tfidf
    fields = {
        "vectorizer": {name: getattr(vectorizer, name) for name in _VECTORIZER_FIELDS},
        "dtype": np.dtype(vectorizer.dtype).name,
        "vocabulary": {term: int(col) for term, col in vectorizer.vocabulary_.items()},
        "tfidf": {"sublinear_tf": bool(t.sublinear_tf), "norm": t.norm, "use_idf": hasattr(t, "idf_")},
    }
    arrays = {"coef": classifier.coef_, "intercept": classifier.intercept_, "classes": classifier.classes_}
    if hasattr(t, "idf_"):
        arrays["idf"] = t.idf_
    return fields, arrays


class Params(SimpleNamespace):
    """A saved estimator's fitted parameters, standing in for it without importing scikit-learn."""


def load_ngram_logistic(fields: dict[str, Any], arrays: dict[str, np.ndarray], binary: bool = False) -> NgramLogistic:
    """An :class:`NgramLogistic` from :func:`export_ngram_logistic`'s output."""
    tfidf = Params(kind="sklearn.feature_extraction.text.TfidfTransformer", **fields["tfidf"])
    if fields["tfidf"]["use_idf"]:
        tfidf.idf_ = arrays["idf"]
    vectorizer = Params(
        kind="sklearn.feature_extraction.text.TfidfVectorizer",
        **{**fields["vectorizer"], "ngram_range": tuple(fields["vectorizer"]["ngram_range"])},
        dtype=np.dtype(fields["dtype"]).type,
        vocabulary_=fields["vocabulary"],
        _tfidf=tfidf,
    )
    classifier = Params(
        kind="sklearn.linear_model._logistic.LogisticRegression",
        coef_=arrays["coef"],
        intercept_=arrays["intercept"],
        classes_=arrays["classes"],
    )
    pipeline = Params(kind="sklearn.pipeline.Pipeline", steps=[("features", vectorizer), ("classifier", classifier)])
    if not _eligible(pipeline, binary):
        raise ValueError("saved fast-path parameters do not describe a TF-IDF + logistic regression")
    return NgramLogistic(vectorizer, classifier)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` archive with fixed member timestamps: the same arrays give the same bytes."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return buf.getvalue()


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _kind(obj: Any) -> str:
    return obj.kind if isinstance(obj, Params) else _qualname(type(obj))
