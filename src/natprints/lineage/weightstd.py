"""The attention-weight standard-deviation fingerprint (arXiv 2507.03014).

Per layer, the standard deviation of all elements of the Q, K, V and O projection weights gives
four sequences over depth. Each is z-scored across layers; two models are compared by the Pearson
correlation of each sequence, and the score is the mean of the four. Weights are read straight
from the safetensors files (no model is built), with projections found by name: separate Llama-like
ones (``layers.<i>. ... q_proj.weight``, also Qwen2's), GPT-2's fused ``attn.c_attn`` (a Conv1D whose
columns are Q, K, V) with ``attn.c_proj``, and GPT-NeoX's fused ``attention.query_key_value`` (rows
grouped per head as Q, K, V) with ``attention.dense``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from natprints.errors import NatprintsError, first_line
from natprints.modeldir import Incomparable, ModelInfo, inspect_model, model_digest

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Z-scored over 2 layers every sequence is (-1, 1) or (1, -1), so every correlation is +-1: a pair
# needs at least this many layers for the score to say more than "rises or falls with depth".
MIN_LAYERS = 3
_NAME = re.compile(
    r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.(?:.+\.)?"
    r"(q_proj|k_proj|v_proj|o_proj|attn\.c_attn|attn\.c_proj|attention\.query_key_value|attention\.dense)\.weight$"
)
_OUTPUT = {"attn.c_proj": "o_proj", "attention.dense": "o_proj"}


@dataclass(frozen=True)
class WeightProfile:
    """Per-layer standard deviations of each projection type (arrays of length ``num_layers``)."""

    path: Path
    stds: dict[str, np.ndarray]

    @property
    def num_layers(self) -> int:
        return len(self.stds[PROJECTIONS[0]])


def _iter_tensors(info: ModelInfo) -> Any:
    """Yield (name, tensor) for the projection weights only."""
    import torch

    for file in info.weight_files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(file), framework="pt") as handle:
                    for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                        if _NAME.search(name):
                            yield name, handle.get_tensor(name)
            except Exception as exc:  # safetensors raises its own error types on corrupt files
                raise NatprintsError(f"cannot read {file}: {first_line(exc)}") from None
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception:  # torch's message advises loading with weights_only=False: never repeated
                raise NatprintsError(
                    f"cannot read {file}: not a PyTorch checkpoint of plain tensors (it is corrupt, or it holds "
                    "pickled objects, which natprints does not load)"
                ) from None
            if not isinstance(state, dict):
                raise NatprintsError(f"cannot read {file}: not a state dict of tensors")
            for name, tensor in state.items():
                if _NAME.search(name) and isinstance(tensor, torch.Tensor):
                    yield name, tensor


def _projections(kind: str, tensor: Any, info: ModelInfo) -> list[tuple[str, Any]]:
    """(projection, weights) pairs of one named tensor: itself, or the Q, K and V inside a fused one."""
    if kind in PROJECTIONS:
        return [(kind, tensor)]
    if kind in _OUTPUT:
        return [(_OUTPUT[kind], tensor)]
    if kind == "attn.c_attn":  # GPT-2's Conv1D: (hidden, 3 * hidden), columns Q | K | V
        return list(zip(PROJECTIONS[:3], tensor.chunk(3, dim=1), strict=True))
    heads = info.num_heads  # GPT-NeoX: (3 * hidden, hidden), rows per head as Q, K, V
    if not heads or tensor.shape[0] % (3 * heads):
        raise Incomparable(f"{info.path}: cannot split a fused query_key_value of shape {tuple(tensor.shape)}")
    grouped = tensor.reshape(heads, 3, tensor.shape[0] // (3 * heads), tensor.shape[-1])
    return [(proj, grouped[:, i]) for i, proj in enumerate(PROJECTIONS[:3])]


def weight_profile(path: Path | str | ModelInfo) -> WeightProfile:
    """Read a model directory's per-layer Q/K/V/O weight standard deviations."""
    info = path if isinstance(path, ModelInfo) else inspect_model(path)
    model_digest(info)  # verifies the weights against the model's manifest, when it has one
    found: dict[str, dict[int, float]] = {p: {} for p in PROJECTIONS}
    for name, tensor in _iter_tensors(info):
        match = _NAME.search(name)
        assert match is not None
        layer = int(match.group(1))
        for proj, part in _projections(match.group(2), tensor, info):
            # population std over all elements, in float64 so bf16 checkpoints lose nothing here
            sd = float(part.double().std(correction=0))
            if not math.isfinite(sd):
                raise NatprintsError(
                    f"{info.path}: {name} holds non-finite values (NaN or inf); no weight-std fingerprint of it"
                )
            found[proj][layer] = sd
    missing = [p for p in PROJECTIONS if not found[p]]
    if missing:
        raise Incomparable(
            f"{info.path}: no {', '.join(missing)} weights found (the weight-std fingerprint needs "
            "attention projections named q_proj, k_proj, v_proj, o_proj, or GPT-2's or GPT-NeoX's fused ones)"
        )
    layers = sorted(found[PROJECTIONS[0]])
    for proj in PROJECTIONS:
        if sorted(found[proj]) != layers or layers != list(range(len(layers))):
            raise Incomparable(f"{info.path}: {proj} weights are not present for every layer")
    if len(layers) != info.num_layers:
        raise Incomparable(
            f"{info.path}: found attention projections for {len(layers)} layers, config.json says {info.num_layers}"
        )
    return WeightProfile(info.path, {p: np.array([found[p][i] for i in layers]) for p in PROJECTIONS})


def _zscore(x: np.ndarray) -> np.ndarray | None:
    sd = x.std()
    if not np.isfinite(sd) or sd <= 0:
        return None
    return (x - x.mean()) / sd


@dataclass(frozen=True)
class WeightsResult:
    """One pair's weight-std comparison; ``score`` is NaN when every sequence is constant, and when
    the pair is incomparable (``reason`` says why)."""

    per_matrix: dict[str, float | None]
    score: float
    threshold: float
    num_layers: int
    reason: str | None = None

    @property
    def related(self) -> bool:
        return self.reason is None and math.isfinite(self.score) and self.score >= self.threshold

    @property
    def verdict(self) -> str:
        if self.reason is not None:
            return "incomparable"
        return "related" if self.related else "unrelated"

    def to_dict(self) -> dict[str, Any]:
        out = {
            "per_matrix": self.per_matrix,
            "score": self.score if math.isfinite(self.score) else None,
            "threshold": self.threshold,
            "num_layers": self.num_layers,
            "related": self.related,
            "verdict": self.verdict,
        }
        return out | ({"reason": self.reason} if self.reason is not None else {})


def incomparable_reason(a: WeightProfile, b: WeightProfile) -> str | None:
    """Why the fingerprint cannot compare the pair (another depth, under :data:`MIN_LAYERS` layers), or None."""
    what = f"weight-std fingerprint cannot compare {a.path} and {b.path}"
    if a.num_layers != b.num_layers:
        return f"{what}: num_hidden_layers {a.num_layers} vs {b.num_layers} (it needs the same depth)"
    if a.num_layers < MIN_LAYERS:
        return (
            f"{what}: {a.num_layers} layer(s), fewer than {MIN_LAYERS} (z-scored over so few layers every "
            "correlation is +-1 or undefined)"
        )
    return None


def check_comparable(a: WeightProfile, b: WeightProfile) -> None:
    reason = incomparable_reason(a, b)
    if reason is not None:
        raise Incomparable(reason)


def compare_profiles(a: WeightProfile, b: WeightProfile, threshold: float = 0.9) -> WeightsResult:
    """Pearson correlation of the z-scored sequences, per projection, and their mean.

    An incomparable pair gets a result with ``reason`` set and no score (verdict ``incomparable``),
    for a stage that reports every pair; :func:`weights_compare` raises instead.
    """
    reason = incomparable_reason(a, b)
    if reason is not None:
        return WeightsResult(dict.fromkeys(PROJECTIONS), math.nan, threshold, a.num_layers, reason)
    per: dict[str, float | None] = {}
    for proj in PROJECTIONS:
        za, zb = _zscore(a.stds[proj]), _zscore(b.stds[proj])
        per[proj] = None if za is None or zb is None else float(np.mean(za * zb))
    values = [v for v in per.values() if v is not None]
    score = float(np.mean(values)) if values else math.nan
    return WeightsResult(per, score, threshold, a.num_layers)


def weights_compare(path_a: Path | str, path_b: Path | str, threshold: float = 0.9) -> WeightsResult:
    """Weight-std fingerprint comparison of two model directories; an incomparable pair is an error."""
    a, b = weight_profile(path_a), weight_profile(path_b)
    check_comparable(a, b)
    return compare_profiles(a, b, threshold)
