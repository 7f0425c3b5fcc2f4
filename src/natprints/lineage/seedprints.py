"""SeedPrints: which initialization seed a model descends from (Tong et al., arXiv 2509.26404).

Both models read the same N sequences of random token ids. Each model's final hidden state (after
the final norm) at the last position is recorded; those N x hidden features are all a pair
comparison needs, so they are computed once per model and cached on disk. For a pair: each model's
k lowest-mean ("disliked") dimensions, their intersection S, a per-input softmax over S at a
temperature, Kendall's tau per kept dimension across the inputs, and a one-sided z test on the mean
tau. p is reported as log10 p (``norm.logsf``), so extreme evidence does not underflow to 0.

The model-directory facts it reads (what a directory holds, a verified digest of its weights) are
in :mod:`natprints.lineage.models`, shared with the weight-std fingerprint.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import norm

from natprints.artifacts import atomic_write_bytes, hash_obj
from natprints.config import LineageSettings
from natprints.errors import NatprintsError
from natprints.lineage.models import ModelInfo, inspect_model, model_digest
from natprints.runtime import load_lm, resolve_device

FEATURES_VERSION = 1
_LN10 = math.log(10.0)
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_FEATURE_BATCH = 32
_TAU_CHUNK_ELEMENTS = 1 << 22  # bound on pairs x columns held at once by the tau computation


# ---------------------------------------------------------------------------------------------
# Features


def random_inputs(vocab_size: int, n_inputs: int, seq_len: int, seed: int) -> Any:
    """N sequences of token ids uniform over ``[0, vocab_size)``, the same for every model."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n_inputs, seq_len), generator=generator)


def _feature_key(digest: str, info: ModelInfo, settings: LineageSettings, device: Any) -> str:
    return hash_obj(
        {
            "version": FEATURES_VERSION,
            "weights": digest,
            "vocab_size": info.vocab_size,
            "n_inputs": settings.seedprints_inputs,
            "seq_len": settings.seedprints_seq_len,
            "seed": settings.seedprints_seed,
            "device": str(getattr(device, "type", device)),
            "dtype": "fp32",
        }
    )


def compute_features(info: ModelInfo, settings: LineageSettings, device: Any) -> np.ndarray:
    """Final hidden state (after the final norm) at the last position: an N x hidden array."""
    import torch

    if info.max_positions is not None and settings.seedprints_seq_len > info.max_positions:
        raise NatprintsError(
            f"seedprints_seq_len {settings.seedprints_seq_len} exceeds {info.path}'s "
            f"max_position_embeddings {info.max_positions}"
        )
    model = load_lm(info.path, verify=False, device=device)  # the caller verified the digest
    inputs = random_inputs(
        info.vocab_size, settings.seedprints_inputs, settings.seedprints_seq_len, settings.seedprints_seed
    )
    out = []
    with torch.inference_mode():
        for start in range(0, len(inputs), _FEATURE_BATCH):
            batch = inputs[start : start + _FEATURE_BATCH].to(device)
            hidden = model.base_model(input_ids=batch).last_hidden_state[:, -1, :]
            out.append(hidden.float().cpu().numpy())
    features = np.concatenate(out)
    if features.shape != (settings.seedprints_inputs, info.hidden_size):
        raise NatprintsError(
            f"{info.path}: final hidden state has shape {features.shape}, "
            f"expected ({settings.seedprints_inputs}, {info.hidden_size})"
        )
    return features


def model_features(
    path: Path | str | ModelInfo,
    settings: LineageSettings | None = None,
    *,
    cache_dir: Path | str | None = None,
    device: str = "auto",
) -> np.ndarray:
    """A model's SeedPrints features, from the cache when present (one forward pass per model).

    The cache entry is keyed by the weights' digest and the input settings, stored as ``.npz``.
    """
    settings = settings or LineageSettings()
    info = path if isinstance(path, ModelInfo) else inspect_model(path)
    digest = model_digest(info)
    dev = resolve_device(device)
    key = _feature_key(digest, info, settings, dev)
    cache_file = Path(cache_dir) / "seedprints" / f"{key[:32]}.npz" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as data:
                if str(data["key"]) == key:
                    return data["features"]
        except (OSError, ValueError, KeyError):
            pass  # an unreadable cache entry is recomputed and overwritten
    features = compute_features(info, settings, dev)
    if cache_file is not None:
        buffer = io.BytesIO()
        np.savez(buffer, features=features, key=np.array(key))
        atomic_write_bytes(cache_file, buffer.getvalue())
    return features


# ---------------------------------------------------------------------------------------------
# The statistic


def kendall_tau_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Kendall's tau-b between ``a[:, j]`` and ``b[:, j]`` for every column ``j`` (NaN if constant)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two 2-d arrays of the same shape, got {a.shape} and {b.shape}")
    n, cols = a.shape
    iu, ju = np.triu_indices(n, 1)
    out = np.full(cols, np.nan)
    if len(iu) == 0:
        return out
    chunk = max(1, _TAU_CHUNK_ELEMENTS // len(iu))
    for start in range(0, cols, chunk):
        sl = slice(start, start + chunk)
        da = np.sign(a[iu, sl] - a[ju, sl])
        db = np.sign(b[iu, sl] - b[ju, sl])
        numerator = (da * db).sum(axis=0)
        denominator = np.sqrt(np.count_nonzero(da, axis=0) * np.count_nonzero(db, axis=0).astype(np.float64))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[sl] = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)
    return out


def tau_null_sd(n: int) -> float:
    """Standard deviation of Kendall's tau between independent samples of size n."""
    return math.sqrt(2.0 * (2.0 * n + 5.0) / (9.0 * n * (n - 1.0)))


def _softmax_rows(x: np.ndarray, temperature: float) -> np.ndarray:
    z = x / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class SeedPrintsResult:
    """One pair's SeedPrints test. ``log10_p`` is 0 (p = 1) when there is no evidence."""

    n_inputs: int
    k: int
    kept: int  # |S|: disliked dimensions the two models share
    tau_bar: float  # NaN when |S| < 2 (a softmax over one dimension is constant)
    z: float
    log10_p: float
    alpha: float
    dims: list[int] = field(default_factory=list)

    @property
    def p(self) -> float:
        return 10.0**self.log10_p

    @property
    def same_lineage(self) -> bool:
        return self.log10_p < math.log10(self.alpha)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["p"] = self.p
        out["same_lineage"] = self.same_lineage
        for key in ("tau_bar", "z"):
            if not math.isfinite(out[key]):
                out[key] = None
        return out


def seedprints_test(
    features_a: np.ndarray,
    features_b: np.ndarray,
    *,
    k: int = 16,
    temperature: float = 10.0,
    alpha: float = 0.01,
) -> SeedPrintsResult:
    """The SeedPrints z test on two models' N x hidden features (same inputs, same order)."""
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise NatprintsError(f"SeedPrints features differ in shape: {a.shape} vs {b.shape}")
    n, hidden = a.shape
    if n < 2:
        raise NatprintsError("SeedPrints needs at least 2 inputs")
    k = min(k, hidden)
    disliked_a = np.argsort(a.mean(axis=0), kind="stable")[:k]
    disliked_b = np.argsort(b.mean(axis=0), kind="stable")[:k]
    kept = np.intersect1d(disliked_a, disliked_b)
    if len(kept) < 2:
        return SeedPrintsResult(n, k, len(kept), math.nan, math.nan, 0.0, alpha, kept.tolist())
    taus = kendall_tau_columns(_softmax_rows(a[:, kept], temperature), _softmax_rows(b[:, kept], temperature))
    taus = np.nan_to_num(taus, nan=0.0)  # a constant column carries no evidence
    tau_bar = float(taus.mean())
    z = tau_bar * math.sqrt(len(kept)) / tau_null_sd(n)
    log10_p = min(0.0, float(norm.logsf(z)) / _LN10)
    return SeedPrintsResult(n, k, len(kept), tau_bar, z, log10_p, alpha, kept.tolist())


def check_comparable(a: ModelInfo, b: ModelInfo) -> None:
    """SeedPrints compares hidden dimensions under the same inputs: hidden size and vocab must match."""
    diffs = [
        f"{name} {getattr(a, name)} vs {getattr(b, name)}"
        for name in ("hidden_size", "vocab_size")
        if getattr(a, name) != getattr(b, name)
    ]
    if diffs:
        raise NatprintsError(
            f"SeedPrints cannot compare {a.path} and {b.path}: {'; '.join(diffs)} "
            "(it needs the same hidden size and vocabulary)"
        )


def seedprints_compare(
    path_a: Path | str,
    path_b: Path | str,
    settings: LineageSettings | None = None,
    *,
    cache_dir: Path | str | None = None,
    device: str = "auto",
) -> SeedPrintsResult:
    """SeedPrints test of whether two model directories share an initialization seed."""
    settings = settings or LineageSettings()
    info_a, info_b = inspect_model(path_a), inspect_model(path_b)
    check_comparable(info_a, info_b)
    features_a = model_features(info_a, settings, cache_dir=cache_dir, device=device)
    features_b = model_features(info_b, settings, cache_dir=cache_dir, device=device)
    return seedprints_test(
        features_a,
        features_b,
        k=settings.seedprints_k,
        temperature=settings.seedprints_temperature,
        alpha=settings.alpha,
    )
