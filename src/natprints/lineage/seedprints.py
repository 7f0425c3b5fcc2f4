"""SeedPrints: which initialization seed a model descends from (Tong et al., arXiv 2509.26404).

Both models read the same N sequences of random token ids. Each model's final hidden state (after
the final norm) at the last position is recorded; those N x hidden features are all a pair
comparison needs, so they are computed once per model and cached on disk. For a pair: each model's
k lowest-mean ("disliked") dimensions, their intersection S, a per-input softmax over S at a
temperature, Kendall's tau per kept dimension across the inputs, and a z test on the mean tau.

Settings (:class:`~natprints.config.LineageSettings`): token inputs, N = 512 inputs of length 128,
k = all (every hidden dimension), temperature 10. k is what matters most: on the default zoo, N = 128
of length 64 with k = 16 linked 1 of 12 inits to their own trained model; N = 2000 of length 128 with
k = all linked 10/12, and N = 512 with k = all gave the same verdicts on every pair with an init
(10/12 own trained, 40/46 same-seed pairs, 0 false among 129 different-seed pairs) at a quarter of
the cost. On tiny test models (hidden 64, vocabulary 4096, 4 seeds: init, trained, derived) N = 512
and N = 2000 gave the same verdict on all 66 pairs, with features computed in 8.8 s against 54 s.

The null counts N independent inputs, but two inputs that end in the same token give nearly the
same last hidden state: keep N well below the vocabulary size (the stage records how many distinct
last tokens the inputs hold). With a vocabulary of 300, N = 512 and N = 2000 both overshoot it, and
12/96 and 10/96 different-seed pairs with an init came out linked (the spread of z grew with N).

p is reported both ways, as log10 so that extreme evidence does not underflow: one-sided
``sf(z)`` (this project's; the verdicts use it) and two-sided ``2 sf(|z|)`` (the authors' code).
The analytic null holds for a pair that contains a step-0 init: only such pairs get a p < alpha
verdict. Between two trained models of different seeds on identical data it does not (the spread
of z grows with N), so those pairs are judged by a z threshold calibrated on known-unrelated pairs
(:func:`calibrate_threshold`), and are ``uncalibrated`` without one.

The model-directory facts it reads (what a directory holds, a verified digest of its weights) are
in :mod:`natprints.modeldir`, shared with the weight-std fingerprint.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import kendalltau, norm

from natprints.artifacts import atomic_write_bytes, hash_obj
from natprints.config import LineageSettings
from natprints.errors import NatprintsError
from natprints.modeldir import Incomparable, ModelInfo, inspect_model, model_digest
from natprints.runtime import load_lm, resolve_device

FEATURES_VERSION = 1
_LN10 = math.log(10.0)
_LOG10_2 = math.log10(2.0)
_FEATURE_BATCH = 32
K_ALL = "all"


# ---------------------------------------------------------------------------------------------
# Features


def random_inputs(vocab_size: int, n_inputs: int, seq_len: int, seed: int) -> Any:
    """N sequences of token ids uniform over ``[0, vocab_size)``, the same for every model."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n_inputs, seq_len), generator=generator)


def distinct_last_tokens(vocab_size: int, settings: LineageSettings) -> int:
    """How many different tokens end the N inputs: near-duplicate inputs beyond that count."""
    inputs = random_inputs(
        vocab_size, settings.seedprints_inputs, settings.seedprints_seq_len, settings.seedprints_seed
    )
    return len(set(inputs[:, -1].tolist()))


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
        raise Incomparable(
            f"seedprints_seq_len {settings.seedprints_seq_len} exceeds {info.path}'s "
            f"max_position_embeddings {info.max_positions}"
        )
    model = load_lm(info.path, verify=False, device=device)  # the caller verified the digest
    bad = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise NatprintsError(f"{info.path}: {bad} holds non-finite values (NaN or inf); no SeedPrints verdict")
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
    if not np.isfinite(features).all():
        raise NatprintsError(f"{info.path}: hidden states are non-finite (NaN or inf weights); no SeedPrints verdict")
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
    """Kendall's tau-b between ``a[:, j]`` and ``b[:, j]`` for every column ``j`` (NaN if constant).

    ``scipy.stats.kendalltau`` along the columns: O(N log N) per column (a sort and a merge-sort
    count of discordant pairs), equal to the O(N^2) pair count to float rounding (tested).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two 2-d arrays of the same shape, got {a.shape} and {b.shape}")
    n, cols = a.shape
    if n < 2 or cols == 0:
        return np.full(cols, np.nan)
    # the asymptotic p-value scipy computes beside tau is cheap; its exact one is not, and at n = 2
    # the asymptotic variance divides by n - 2
    method = "asymptotic" if n > 2 else "exact"
    return np.asarray(kendalltau(a, b, axis=0, method=method).statistic, dtype=np.float64).reshape(cols)


def tau_null_sd(n: int) -> float:
    """Standard deviation of Kendall's tau between independent samples of size n."""
    return math.sqrt(2.0 * (2.0 * n + 5.0) / (9.0 * n * (n - 1.0)))


def _softmax_rows(x: np.ndarray, temperature: float) -> np.ndarray:
    z = x / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def resolve_k(k: int | float | str, hidden: int) -> int:
    """The number of disliked dimensions per model: a count (at most ``hidden``), ``"all"``
    (= ``hidden``), or a fraction of ``hidden`` in (0, 1] (rounded up)."""
    if isinstance(k, str) and k == K_ALL:
        return hidden
    if isinstance(k, int) and not isinstance(k, bool) and k >= 1:
        return min(k, hidden)
    if isinstance(k, float) and 0.0 < k <= 1.0:
        return max(1, min(hidden, math.ceil(k * hidden - 1e-9)))
    raise NatprintsError(f"seedprints_k must be a count >= 1, a fraction in (0, 1] or 'all', got {k!r}")


def _log10_p_two_sided(z: float) -> float:
    if not math.isfinite(z):
        return 0.0
    return min(0.0, _LOG10_2 + float(norm.logsf(abs(z))) / _LN10)


@dataclass(frozen=True)
class SeedPrintsResult:
    """One pair's SeedPrints test. A log10 p is 0 (p = 1) when there is no evidence.

    ``log10_p`` is the one-sided ``log10 sf(z)`` (the verdicts' convention); ``log10_p_two_sided``
    is ``log10 2 sf(|z|)``, the authors' convention. ``same_lineage`` is the analytic verdict
    p < alpha, valid for a pair that contains an init (see :func:`seedprints_verdict`).
    """

    n_inputs: int
    k: int  # disliked dimensions per model, resolved against the hidden size
    kept: int  # |S|: disliked dimensions the two models share
    tau_bar: float  # NaN when |S| < 2 (a softmax over one dimension is constant)
    z: float
    log10_p: float
    log10_p_two_sided: float
    alpha: float
    dims: list[int] = field(default_factory=list)

    @property
    def p(self) -> float:
        return self.p_one_sided

    @property
    def p_one_sided(self) -> float:
        return 10.0**self.log10_p

    @property
    def p_two_sided(self) -> float:
        return 10.0**self.log10_p_two_sided

    @property
    def same_lineage(self) -> bool:
        return self.log10_p < math.log10(self.alpha)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["log10_p_one_sided"] = self.log10_p
        out["p"] = out["p_one_sided"] = self.p_one_sided
        out["p_two_sided"] = self.p_two_sided
        out["same_lineage"] = self.same_lineage
        for key in ("tau_bar", "z"):
            if not math.isfinite(out[key]):
                out[key] = None
        return out


def seedprints_test(
    features_a: np.ndarray,
    features_b: np.ndarray,
    *,
    k: int | float | str = K_ALL,
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
    k = resolve_k(k, hidden)
    disliked_a = np.argsort(a.mean(axis=0), kind="stable")[:k]
    disliked_b = np.argsort(b.mean(axis=0), kind="stable")[:k]
    kept = np.intersect1d(disliked_a, disliked_b)
    if len(kept) < 2:
        return SeedPrintsResult(n, k, len(kept), math.nan, math.nan, 0.0, 0.0, alpha, kept.tolist())
    taus = kendall_tau_columns(_softmax_rows(a[:, kept], temperature), _softmax_rows(b[:, kept], temperature))
    taus = np.nan_to_num(taus, nan=0.0)  # a constant column carries no evidence
    tau_bar = float(taus.mean())
    z = tau_bar * math.sqrt(len(kept)) / tau_null_sd(n)
    log10_p = min(0.0, float(norm.logsf(z)) / _LN10)
    return SeedPrintsResult(n, k, len(kept), tau_bar, z, log10_p, _log10_p_two_sided(z), alpha, kept.tolist())


# ---------------------------------------------------------------------------------------------
# Verdicts: analytic with an init, calibrated between trained models


def calibrate_threshold(z_unrelated: Any, target_fpr: float) -> float | None:
    """The z threshold for pairs of trained models: the (1 - target FPR) quantile of z over
    known-unrelated pairs, taken as an observed z (numpy's ``higher`` method), so that at most a
    ``target_fpr`` share of those pairs exceeds it. With fewer than 1 / target_fpr pairs that is
    their maximum. None without pairs (a z that is NaN, |S| < 2, is left out)."""
    z = np.asarray(z_unrelated, dtype=np.float64).ravel()
    z = z[np.isfinite(z)]
    if len(z) == 0:
        return None
    return float(np.quantile(z, 1.0 - target_fpr, method="higher"))


def leave_one_seed_out(z_unrelated: Any, seeds_a: list[Any], seeds_b: list[Any], target_fpr: float) -> dict[str, Any]:
    """Out-of-sample false-positive rate of :func:`calibrate_threshold`: for each seed, fit the
    threshold on the pairs that do not involve it and count the pairs that do above it. A pair
    involves two seeds, so it is evaluated twice."""
    z = np.asarray(z_unrelated, dtype=np.float64).ravel()
    seeds = sorted(set(seeds_a) | set(seeds_b), key=repr)
    false = evaluated = folds = 0
    for seed in seeds:
        held = np.array([seed in (sa, sb) for sa, sb in zip(seeds_a, seeds_b, strict=True)], dtype=bool)
        threshold = calibrate_threshold(z[~held], target_fpr)
        test = z[held & np.isfinite(z)]
        if threshold is None or len(test) == 0:
            continue
        folds += 1
        evaluated += len(test)
        false += int((test > threshold).sum())
    return {
        "seeds": len(seeds),
        "folds": folds,
        "evaluated": evaluated,
        "false": false,
        "fpr": false / evaluated if evaluated else None,
    }


def seedprints_verdict(result: SeedPrintsResult, *, with_init: bool, threshold: float | None) -> tuple[str, str]:
    """(verdict, rule). A pair with an init: ``related`` when the one-sided p < alpha (rule
    ``analytic``). Two trained models: ``related`` when z exceeds the calibrated threshold (rule
    ``calibrated``), ``uncalibrated`` when there is none."""
    if with_init:
        return ("related" if result.same_lineage else "unrelated"), "analytic"
    if threshold is None:
        return "uncalibrated", "uncalibrated"
    return ("related" if math.isfinite(result.z) and result.z > threshold else "unrelated"), "calibrated"


def is_init_dir(path: Path | str) -> bool:
    """A zoo step-0 init: an ``init`` directory inside a model directory, as the zoo saves it."""
    path = Path(path)
    return path.name == "init" and (path.parent / "config.json").is_file()


def check_comparable(a: ModelInfo, b: ModelInfo) -> None:
    """SeedPrints compares hidden dimensions under the same inputs: hidden size and vocab must match."""
    diffs = [
        f"{name} {getattr(a, name)} vs {getattr(b, name)}"
        for name in ("hidden_size", "vocab_size")
        if getattr(a, name) != getattr(b, name)
    ]
    if diffs:
        raise Incomparable(
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
