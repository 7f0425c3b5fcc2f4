"""Saved attributors: the best pipeline of a condition, calibrated, with an open-set threshold.

An attributor directory holds ``pipeline.skops`` (the fitted pipeline, skops format),
``attributor.json`` (label names, temperature, threshold, provenance), for TF-IDF + logistic
regression attributors the fast path's parameters (``fastpath.json``, ``fastpath.npz``, loaded with
``allow_pickle=False``), and ``manifest.json`` with the sha256 of every file. Nothing is pickled:
skops creates only the types it trusts and the explicit :data:`TRUSTED_TYPES`, and every load
checks the hashes first. Loading an n-gram attributor imports neither torch nor scikit-learn.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from natprints.artifacts import Manifest, atomic_write_bytes, atomic_write_json, hash_obj
from natprints.attribution.fastpath import (
    NgramCounter,
    NgramLogistic,
    export_ngram_logistic,
    load_ngram_logistic,
    ngram_first_step,
    npz_bytes,
    row_wise,
)
from natprints.errors import NatprintsError, first_line

KIND = "natprints-attributor"
FORMAT_VERSION = 2  # 2: the pipeline in skops format, the n-gram fast path as JSON + npz
PIPELINE_FILE = "pipeline.skops"
META_FILE = "attributor.json"
UNKNOWN = "unknown"
DEFAULT_MAX_TEXT_BYTES = 1_000_000
# Text, not binary: valid UTF-8 with C0 control characters (other than tab, newline and carriage
# return) in at most this share of its characters. A single NUL does not make a text binary: byte-level
# BPE models sample one now and then (2 of 4,800 generated texts).
MAX_CONTROL_SHARE = 0.10
_CONTROL_BYTES = bytes(b for b in range(32) if b not in b"\t\n\r")  # in UTF-8 each is one byte, never in a sequence
# Non-blocking, so that opening a FIFO without a writer returns at once (fstat then refuses it); no
# controlling terminal from a tty named as input.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
_SPECIAL_FILES = (
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "device"),
    (stat.S_ISBLK, "device"),
)

# The only types a saved pipeline may hold beyond those skops trusts by default; anything else is
# refused before it is created (skops.io.load with an explicit trusted list, never pickle).
TRUSTED_TYPES = (
    "natprints.attribution.features.SentenceEmbedder",
    "natprints.attribution.features.BpeTokens",
    "natprints.attribution.estimators.LabelXGBClassifier",
    "sklearn.feature_selection._univariate_selection.f_classif",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.utils._bunch.Bunch",
    "sklearn.utils._tags.Tags",
    "numpy.dtype",
    "builtins.slice",
)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def dump_pipeline(pipeline: Any) -> bytes:
    """A fitted pipeline in skops format; an untrusted type in it is an error, not a silent save."""
    import skops.io as sio

    for part in [pipeline, *pipeline.get_params(deep=True).values()]:
        # scikit-learn's vectorizers cache id(stop_words), a memory address, to skip re-validating
        # them: dropped, so the same pipeline gives the same bytes in any process (it is re-derived)
        if hasattr(part, "_stop_words_id"):
            del part._stop_words_id
        # a vocabulary pruned to max_features maps terms to numpy ints, which skops stores as one array
        # file each (tens of thousands, at a cost that grows with their square): plain ints, same lookups
        if isinstance(getattr(part, "vocabulary_", None), dict):
            part.vocabulary_ = {term: int(index) for term, index in part.vocabulary_.items()}
    data = sio.dumps(pipeline)
    untrusted = [t for t in sio.get_untrusted_types(data=data) if t not in TRUSTED_TYPES]
    if untrusted:
        raise NatprintsError(f"cannot save a pipeline holding untrusted type(s) {', '.join(untrusted)}")
    return _canonical_skops(data)


_SKOPS_ID = re.compile(r'("__id__": |")(\d+)(\.npy")?')


def _canonical_skops(archive: bytes) -> bytes:
    """The same skops archive, reproducible: skops names objects and array files by ``id()``, a
    memory address; here they are renumbered in order of first appearance in the schema, and every
    member is dated 1980-01-01, so the same pipeline gives the same bytes in any process."""
    import io
    import zipfile

    numbers: dict[str, str] = {}

    def renumber(match: re.Match[str]) -> str:
        prefix, number, suffix = match.groups()
        if prefix == '"' and suffix is None:
            return match.group(0)  # a quoted number that names no object
        new = numbers.setdefault(number, str(len(numbers) + 1))
        return f"{prefix}{new}{suffix or ''}"

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as src, zipfile.ZipFile(out, "w") as dst:
        schema = _SKOPS_ID.sub(renumber, src.read("schema.json").decode("utf-8"))
        members = {"schema.json": schema.encode("utf-8")}
        for info in src.infolist():
            if info.filename != "schema.json":
                stem = info.filename.removesuffix(".npy")
                members[f"{numbers.get(stem, stem)}.npy"] = src.read(info)
        for name in sorted(members):
            dst.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), members[name], zipfile.ZIP_DEFLATED)
    return out.getvalue()


def load_pipeline(data: bytes) -> Any:
    """Rebuild a pipeline written by :func:`dump_pipeline`; only trusted types are created."""
    import skops.io as sio

    untrusted = [t for t in sio.get_untrusted_types(data=data) if t not in TRUSTED_TYPES]
    if untrusted:
        raise NatprintsError(f"refusing to load untrusted type(s) {', '.join(untrusted)}")
    return sio.loads(data, trusted=list(TRUSTED_TYPES))


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


# --- the black-box open set ----------------------------------------------------------------------


def conformal_range(own: np.ndarray, alpha: float) -> tuple[float, float]:
    """The two-sided split-conformal range of n exchangeable scores: a new one falls below the
    floor((n + 1) alpha/2)-th smallest, or above the ceil((n + 1)(1 - alpha/2))-th, each with
    probability at most alpha/2 (a side whose rank falls outside 1..n is unbounded)."""
    ranked = np.sort(np.asarray(own, dtype=np.float64))
    n = len(ranked)
    low_rank, high_rank = math.floor((n + 1) * alpha / 2), math.ceil((n + 1) * (1 - alpha / 2))
    low = ranked[low_rank - 1] if 1 <= low_rank <= n else -math.inf
    high = ranked[high_rank - 1] if 1 <= high_rank <= n else math.inf
    return float(low), float(high)


@dataclass
class OutsiderTest:
    """The attributor's `unknown`: a detector of text the library did not write, calibrated per model.

    ``fields`` and ``arrays`` are a binary TF-IDF + logistic regression (the n-gram fast path's form:
    no scikit-learn to load it) scoring a text's log-odds of being human prose of the public corpus
    rather than one of the library's texts; ``own`` holds its scores of the calibration texts,
    ``own_labels`` their label indices. A pool of k texts whose best label is M is ``unknown`` when its
    mean score lies outside M's two-sided ``alpha`` range (:meth:`limits`: split-conformal for one
    text, bootstrap pools of k of M's own calibration texts for more): more human-like than M's
    texts, or less (junk is less alike to either).
    """

    fields: dict[str, Any]
    arrays: dict[str, np.ndarray]
    own: np.ndarray
    own_labels: np.ndarray
    alpha: float
    resamples: int = 2000
    _detector: Any = field(default=None, init=False, repr=False, compare=False)
    _limits: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict, init=False, repr=False)

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """The detector's log-odds of each text (above 0: more like human prose than the library's)."""
        if self._detector is None:
            self._detector = load_ngram_logistic(self.fields, self.arrays, binary=True)
        texts = list(texts)
        return self._detector.decision_function(texts)[:, 0] if texts else np.zeros(0)

    def limits(self, label: int, k: int) -> tuple[float, float]:
        """The two-sided alpha range of the mean score of k of label's own calibration texts.

        One text (k = 1): split-conformal ranks of the n own scores, the floor((n + 1) alpha/2)-th
        smallest and the ceil((n + 1)(1 - alpha/2))-th (infinite where the rank falls outside), so an
        exchangeable own text leaves the range with probability at most alpha whatever n; the
        interpolated quantile leaves it more often at n = 150 (0.077 of single known texts in the
        default run's data_order). Pools: the quantiles of the means of bootstrap pools, seeded by label
        and k (the same range on every call)."""
        if (label, k) not in self._limits:
            rows = np.flatnonzero(self.own_labels == label)
            own = self.own[rows if len(rows) else np.arange(len(self.own))].astype(np.float64)
            if k == 1:
                low, high = conformal_range(own, self.alpha)
            else:
                rng = np.random.default_rng([label, k])
                means = own[rng.integers(0, len(own), size=(self.resamples, k))].mean(axis=1)
                low, high = np.quantile(means, [self.alpha / 2, 1 - self.alpha / 2])
            self._limits[(label, k)] = (float(low), float(high))
        return self._limits[(label, k)]

    def blind(self, k: int) -> list[int]:
        """The labels with too few calibration texts (under 2/alpha - 1 for one text) for a pool of k of
        their texts ever to be ``unknown``: their range is unbounded on both sides."""
        labels = np.unique(self.own_labels).tolist()
        return [int(m) for m in labels if self.limits(int(m), k) == (-math.inf, math.inf)]

    def statistic(self, scores: np.ndarray, label: int) -> float:
        """How far the pool's mean score lies outside ``label``'s range (above 0: ``unknown``)."""
        low, high = self.limits(label, len(scores))
        mean = float(np.mean(scores))
        return max(low - mean, mean - high)


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
    # part ("train", "cal") -> digests (:func:`text_digest`) of the texts it was fitted or calibrated on
    seen: dict[str, frozenset[str]] = field(default_factory=dict)
    # the open set: where present it decides `unknown` (else the probability threshold does)
    outsider: OutsiderTest | None = None

    _counter: NgramCounter | None = field(default=None, init=False, repr=False, compare=False)

    def seen_in(self, text: str) -> str | None:
        """The part (``train`` or ``cal``) whose texts include ``text``, else None: a verdict on such a
        text is no held-out estimate (the attributor learned or calibrated on it)."""
        digest = text_digest(text)
        return next((part for part, digests in self.seen.items() if digest in digests), None)

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
        vectorizer = ngram_first_step(self.pipeline)
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
        return first == "sklearn.feature_extraction.text.TfidfVectorizer" and all(row_wise(est) for _, est in steps[1:])

    def rejects(self, texts: Sequence[str], best: int, pooled_probability: float) -> bool:
        """Whether texts whose verdict is label ``best`` at ``pooled_probability`` are ``unknown``: by the
        outsider test where the attributor has one, else by the probability threshold."""
        if self.outsider is None:
            return pooled_probability < self.threshold
        return self.outsider.statistic(self.outsider.scores(texts), best) > 0

    def unknown(self, texts: Sequence[str], proba: np.ndarray) -> np.ndarray:
        """Per text (``proba``: its calibrated probabilities), whether its verdict is ``unknown``."""
        if self.outsider is None:
            return np.asarray(proba).max(axis=1) < self.threshold
        best = np.asarray(proba).argmax(axis=1)
        scores = self.outsider.scores(texts)
        return np.array([self.outsider.statistic(scores[i : i + 1], int(b)) > 0 for i, b in enumerate(best)], bool)

    def predict(self, texts: Sequence[str], top_k: int = 3) -> list[Prediction]:
        proba = self.predict_proba(texts)
        k = max(top_k, 1)
        order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
        top_p = np.take_along_axis(proba, order, axis=1)
        labels = self.labels
        rejected = self.unknown(texts, proba).tolist()
        out = []
        for idx, ps, unknown in zip(order.tolist(), top_p.tolist(), rejected, strict=True):
            best, p = idx[0], ps[0]
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


# --- vectorized n-gram counting -------------------------------------------------------------------


SEEN_FILE = "seen.json"  # digests of the training and calibration texts, for `attribute`'s warning


def text_digest(text: str) -> str:
    """The digest a text is recognised by (its UTF-8 bytes, surrounding whitespace stripped)."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:20]


FASTPATH_FIELDS = "fastpath.json"
FASTPATH_ARRAYS = "fastpath.npz"
OUTSIDER_FIELDS = "outsider.json"  # the outsider test: the detector's fields, alpha
OUTSIDER_ARRAYS = "outsider.npz"  # the detector's arrays, and its scores and labels of the calibration texts
OWN_SCORES, OWN_LABELS = "own_scores", "own_labels"


def save_attributor(directory: Path | str, attributor: Attributor, fields: dict[str, Any]) -> Path:
    """Write an attributor directory; the manifest, written last, lists every file's sha256."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(directory, "attributor")
    manifest.invalidate()  # incomplete until the manifest is back
    for stale in (FASTPATH_FIELDS, FASTPATH_ARRAYS, OUTSIDER_FIELDS, OUTSIDER_ARRAYS):
        (directory / stale).unlink(missing_ok=True)
    atomic_write_bytes(directory / PIPELINE_FILE, dump_pipeline(attributor.pipeline))
    files = [PIPELINE_FILE, META_FILE]
    fast = export_ngram_logistic(attributor.pipeline)
    if fast is not None:
        atomic_write_json(directory / FASTPATH_FIELDS, fast[0])
        atomic_write_bytes(directory / FASTPATH_ARRAYS, npz_bytes(fast[1]))
        files += [FASTPATH_FIELDS, FASTPATH_ARRAYS]
    outsider = attributor.outsider
    if outsider is not None:
        test = {"detector": outsider.fields, "alpha": outsider.alpha, "resamples": outsider.resamples}
        atomic_write_json(directory / OUTSIDER_FIELDS, test)
        calibration = {OWN_SCORES: outsider.own, OWN_LABELS: outsider.own_labels}  # exact, unlike JSON's floats
        atomic_write_bytes(directory / OUTSIDER_ARRAYS, npz_bytes({**outsider.arrays, **calibration}))
        files += [OUTSIDER_FIELDS, OUTSIDER_ARRAYS]
    (directory / SEEN_FILE).unlink(missing_ok=True)
    if attributor.seen:
        atomic_write_json(directory / SEEN_FILE, {part: sorted(d) for part, d in attributor.seen.items()})
        files.append(SEEN_FILE)
    meta = {
        **attributor.meta,
        "labels": list(attributor.labels),
        "temperature": attributor.temperature,
        "threshold": attributor.threshold,
    }
    atomic_write_json(directory / META_FILE, meta)
    manifest.write(hash_obj(meta), {"kind": KIND, "format_version": FORMAT_VERSION, **fields}, files)
    return directory


def _load_fastpath(directory: Path) -> NgramLogistic | None:
    if not (directory / FASTPATH_FIELDS).is_file():
        return None
    fields = json.loads((directory / FASTPATH_FIELDS).read_text(encoding="utf-8"))
    with np.load(directory / FASTPATH_ARRAYS, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return load_ngram_logistic(fields, arrays)


def _load_outsider(directory: Path) -> OutsiderTest:
    saved = json.loads((directory / OUTSIDER_FIELDS).read_text(encoding="utf-8"))
    with np.load(directory / OUTSIDER_ARRAYS, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    own, labels = arrays.pop(OWN_SCORES), arrays.pop(OWN_LABELS)
    test = OutsiderTest(saved["detector"], arrays, own, labels, float(saved["alpha"]), int(saved["resamples"]))
    test._detector = load_ngram_logistic(saved["detector"], arrays, binary=True)  # a damaged one fails on load
    return test


def load_attributor(directory: Path | str, *, light: bool = False) -> Attributor:
    """Load and verify an attributor; a missing, foreign or tampered one is a :class:`NatprintsError`.

    ``light``: when the attributor carries the n-gram fast path, use it instead of the pipeline
    (the same probabilities, scikit-learn never imported); for the CLI's time to first answer.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise NatprintsError(f"no attributor at {directory} (run `natprints experiments` first)")
    manifest = Manifest(directory, "attributor", remake="natprints experiments").verify()
    if manifest.get("kind") != KIND:
        raise NatprintsError(f"{directory} is not a natprints attributor (foreign artifact)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise NatprintsError(
            f"attributor at {directory} has format {manifest.get('format_version')}, "
            f"this natprints reads {FORMAT_VERSION}; rerun `natprints experiments`"
        )
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        pipeline = _load_fastpath(directory) if light else None
        pipeline = pipeline or load_pipeline((directory / PIPELINE_FILE).read_bytes())
        labels = [str(x) for x in meta["labels"]]
        attributor = Attributor(
            pipeline=pipeline,
            labels=labels,
            temperature=float(meta["temperature"]),
            threshold=float(meta["threshold"]),
            meta={k: v for k, v in meta.items() if k not in ("labels", "temperature", "threshold")},
        )
        if OUTSIDER_FIELDS in manifest.get("files", {}):
            attributor.outsider = _load_outsider(directory)
        if SEEN_FILE in manifest.get("files", {}):
            seen = json.loads((directory / SEEN_FILE).read_text(encoding="utf-8"))
            attributor.seen = {str(part): frozenset(map(str, d)) for part, d in seen.items()}
    except NatprintsError:
        raise
    except Exception as exc:  # skops and numpy raise many types for a corrupt file
        first = first_line(exc)
        raise NatprintsError(f"attributor at {directory} is corrupt: {first}") from None
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
    controls = len(data) - len(data.translate(None, _CONTROL_BYTES))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        if b"\x00" in data or controls > MAX_CONTROL_SHARE * len(data):
            raise NatprintsError(f"{name}: binary data, not text") from None
        raise NatprintsError(f"{name}: not UTF-8 text") from None
    if not text.strip():
        raise NatprintsError(f"{name}: empty text")
    if controls > MAX_CONTROL_SHARE * len(text):
        raise NatprintsError(
            f"{name}: binary data, not text ({controls} of {len(text)} characters are control characters)"
        )
    return text


def without_final_newline(text: str) -> str:
    """A file's last line ending is the file's, not the text's (`echo TEXT > FILE` adds one): the
    likelihood method scores a text without it."""
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def read_text_file(path: Path | str, max_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> str:
    """Read one regular file for attribution; never reads more than ``max_bytes + 1`` bytes.

    Open, fstat, read, close: one system call per check, which is what 10,000 inputs cost. A FIFO,
    device or socket is refused after the (non-blocking) open, before anything is read from it.
    """
    path = Path(path)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise NatprintsError(f"{path}: no such file") from None
        if exc.errno == errno.ELOOP:
            raise NatprintsError(f"{path}: too many levels of symbolic links (a symlink loop)") from None
        if exc.errno == errno.EISDIR:
            raise NatprintsError(f"{path}: is a directory, not a text file") from None
        if exc.errno == errno.ENXIO:  # open(2) on a Unix socket, or a device node with no device
            raise NatprintsError(f"{path}: not a regular file (a socket or device)") from None
        raise NatprintsError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            if stat.S_ISDIR(info.st_mode):
                raise NatprintsError(f"{path}: is a directory, not a text file")
            kind = next((kind for test, kind in _SPECIAL_FILES if test(info.st_mode)), "special file")
            raise NatprintsError(f"{path}: not a regular file (a {kind})")
        size = info.st_size
        if size > max_bytes:
            raise NatprintsError(f"{path}: text is over the size limit ({size} > {max_bytes} bytes)")
        data = os.read(fd, size + 1)
        if len(data) != size:  # changed since fstat, or a size-0 /proc file: read on, up to the limit
            parts, total = [data], len(data)
            while total <= max_bytes and (more := os.read(fd, max_bytes + 1 - total)):
                parts.append(more)
                total += len(more)
            data = b"".join(parts)
    except OSError as exc:
        raise NatprintsError(f"{path}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    return decode_text(data, str(path), max_bytes)
