"""The attention-weight standard-deviation fingerprint (arXiv 2507.03014).

Per layer, the standard deviation of all elements of the Q, K, V and O projection weights gives
four sequences over depth. Each is z-scored across layers; two models are compared by the Pearson
correlation of each sequence, and the score is the mean of the four. Weights are read straight
from the safetensors files (no model is built), with projections found by name, so any causal LM
with Llama-like module names (``layers.<i>. ... q_proj.weight``) works.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from natprints.errors import NatprintsError
from natprints.lineage.models import ModelInfo, inspect_model, model_digest

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_NAME = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.(?:.+\.)?(q_proj|k_proj|v_proj|o_proj)\.weight$")


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
                raise NatprintsError(f"cannot read {file}: {exc}") from None
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise NatprintsError(f"cannot read {file}: {exc}") from None
            for name, tensor in state.items():
                if _NAME.search(name):
                    yield name, tensor


def weight_profile(path: Path | str | ModelInfo) -> WeightProfile:
    """Read a model directory's per-layer Q/K/V/O weight standard deviations."""
    info = path if isinstance(path, ModelInfo) else inspect_model(path)
    model_digest(info)  # verifies the weights against the model's manifest, when it has one
    found: dict[str, dict[int, float]] = {p: {} for p in PROJECTIONS}
    for name, tensor in _iter_tensors(info):
        match = _NAME.search(name)
        assert match is not None
        layer, proj = int(match.group(1)), match.group(2)
        # population std over all elements, in float64 so bf16 checkpoints lose nothing here
        found[proj][layer] = float(tensor.double().std(correction=0))
    missing = [p for p in PROJECTIONS if not found[p]]
    if missing:
        raise NatprintsError(
            f"{info.path}: no {', '.join(missing)} weights found (the weight-std fingerprint needs "
            "Llama-like attention projections named q_proj, k_proj, v_proj, o_proj)"
        )
    layers = sorted(found[PROJECTIONS[0]])
    for proj in PROJECTIONS:
        if sorted(found[proj]) != layers or layers != list(range(len(layers))):
            raise NatprintsError(f"{info.path}: {proj} weights are not present for every layer")
    if len(layers) != info.num_layers:
        raise NatprintsError(
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
    """One pair's weight-std comparison; ``score`` is NaN when every sequence is constant."""

    per_matrix: dict[str, float | None]
    score: float
    threshold: float
    num_layers: int

    @property
    def related(self) -> bool:
        return math.isfinite(self.score) and self.score >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "per_matrix": self.per_matrix,
            "score": self.score if math.isfinite(self.score) else None,
            "threshold": self.threshold,
            "num_layers": self.num_layers,
            "related": self.related,
        }


def check_comparable(a: WeightProfile, b: WeightProfile) -> None:
    if a.num_layers != b.num_layers:
        raise NatprintsError(
            f"weight-std fingerprint cannot compare {a.path} and {b.path}: "
            f"num_hidden_layers {a.num_layers} vs {b.num_layers} (it needs the same depth)"
        )


def compare_profiles(a: WeightProfile, b: WeightProfile, threshold: float = 0.9) -> WeightsResult:
    """Pearson correlation of the z-scored sequences, per projection, and their mean.

    With 2 layers every correlation is +-1 (two z-scored points); the score then says only whether
    the std of each projection rises or falls with depth in both models.
    """
    check_comparable(a, b)
    if a.num_layers < 2:
        raise NatprintsError("weight-std fingerprint needs at least 2 layers to z-score across depth")
    per: dict[str, float | None] = {}
    for proj in PROJECTIONS:
        za, zb = _zscore(a.stds[proj]), _zscore(b.stds[proj])
        per[proj] = None if za is None or zb is None else float(np.mean(za * zb))
    values = [v for v in per.values() if v is not None]
    score = float(np.mean(values)) if values else math.nan
    return WeightsResult(per, score, threshold, a.num_layers)


def weights_compare(path_a: Path | str, path_b: Path | str, threshold: float = 0.9) -> WeightsResult:
    """Weight-std fingerprint comparison of two model directories."""
    return compare_profiles(weight_profile(path_a), weight_profile(path_b), threshold)
