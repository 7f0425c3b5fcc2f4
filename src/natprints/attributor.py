"""Saved attributors: the best pipeline of a condition, calibrated, with an open-set threshold.

An attributor directory holds ``pipeline.json`` (the fitted pipeline's structure and parameters),
``arrays.npz`` (its arrays, loaded with ``allow_pickle=False``), ``attributor.json`` (label names,
temperature, threshold, provenance) and ``manifest.json`` with the sha256 of every file. Nothing is
pickled: objects are rebuilt only from the explicit :data:`TRUSTED_TYPES`, and every load checks
the hashes first. Loading an n-gram attributor imports neither torch nor sentence-transformers.
"""

from __future__ import annotations

import importlib
import io
import json
import math
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


def _decode(node: Any, arrays: dict[str, np.ndarray]) -> Any:
    if node is None or isinstance(node, bool | int | float | str):
        return node
    if isinstance(node, list):
        return [_decode(v, arrays) for v in node]
    if not isinstance(node, dict) or len(node) not in (1, 2):
        raise ValueError("malformed pipeline state")
    if "__float__" in node:
        return float(node["__float__"])
    if "__scalar__" in node:
        return np.dtype(node["__scalar__"]).type(_decode(node["value"], arrays))
    if "__array__" in node:
        return arrays[node["__array__"]]
    if "__strarray__" in node:
        return np.array(node["__strarray__"], dtype=object).reshape(node["shape"])
    if "__tuple__" in node:
        return tuple(_decode(v, arrays) for v in node["__tuple__"])
    if "__intdict__" in node:
        return {str(k): int(v) for k, v in node["__intdict__"].items()}
    if "__dict__" in node:
        return {str(k): _decode(v, arrays) for k, v in node["__dict__"].items()}
    if "__type__" in node:
        return _NUMPY_TYPES[node["__type__"]]
    if "__object__" in node:
        name = node["__object__"]
        if name not in TRUSTED_TYPES:
            raise NatprintsError(f"refusing to load untrusted type {name}")
        module, _, cls_name = name.rpartition(".")
        cls = getattr(importlib.import_module(module), cls_name)
        state = _decode(node["state"], arrays)
        obj = cls.__new__(cls)
        if hasattr(obj, "__setstate__"):
            obj.__setstate__(state)
        else:  # pragma: no cover - every trusted type has __setstate__ on Python >= 3.11
            obj.__dict__.update(state)
        return obj
    raise ValueError("malformed pipeline state")


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


def load_estimator(tree_bytes: bytes, arrays_bytes: bytes) -> Any:
    """Rebuild an estimator written by :func:`dump_estimator`; only trusted types are created."""
    tree = json.loads(tree_bytes.decode("utf-8"))
    with np.load(io.BytesIO(arrays_bytes), allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return _decode(tree, arrays)


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

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Calibrated probabilities, one column per label (in ``labels`` order)."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, len(self.labels)))
        raw = np.asarray(self.pipeline.predict_proba(texts), dtype=np.float64)
        full = np.zeros((len(texts), len(self.labels)))
        full[:, np.asarray(self.pipeline.classes_, dtype=np.int64)] = raw
        return apply_temperature(full, self.temperature)

    def predict(self, texts: Sequence[str], top_k: int = 3) -> list[Prediction]:
        proba = self.predict_proba(texts)
        out = []
        for row in proba:
            order = np.argsort(-row, kind="stable")
            best = int(order[0])
            p = float(row[best])
            unknown = p < self.threshold
            out.append(
                Prediction(
                    label=UNKNOWN if unknown else self.labels[best],
                    probability=p,
                    best_model=self.labels[best],
                    top=[(self.labels[i], float(row[i])) for i in order[: max(top_k, 1)]],
                    unknown=unknown,
                )
            )
        return out


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


def load_attributor(directory: Path | str) -> Attributor:
    """Load and verify an attributor; a missing, foreign or tampered one is a :class:`NatprintsError`."""
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
        pipeline = load_estimator((directory / PIPELINE_FILE).read_bytes(), (directory / ARRAYS_FILE).read_bytes())
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
    if path.is_dir():
        raise NatprintsError(f"{path}: is a directory, not a text file")
    if not path.exists():
        raise NatprintsError(f"{path}: no such file")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise NatprintsError(f"{path}: text is over the size limit ({size} > {max_bytes} bytes)")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise NatprintsError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode_text(data, str(path), max_bytes)
