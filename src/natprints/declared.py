"""Models a run declares but did not train (``[[models]]``): where their weights are, the digests
they are held to, and the conditions their declared factors form.

A declared model is a Hugging Face causal-LM directory with its own tokenizer, or a hub id read
from the local cache (downloaded only when ``HF_HUB_OFFLINE=0``). Its factors are free-form
key/values. For each factor named in ``[conditions] declared``, the models that agree on every other
declared factor and differ in that one form a condition, named ``declared-<factor>`` followed by the
values the group shares where several groups exist (``declared-seed-70m``). Without factors named,
every declared model forms one condition, ``declared``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from natprints.artifacts import hash_obj, sha256_file
from natprints.config import Config, DeclaredModel, home
from natprints.errors import NatprintsError, first_line

DECLARED = "declared"  # the condition of every declared model, and the prefix of the others
STRINGS = "strings"  # where the zoo's texts cut to the character budget live (models with own tokenizers)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model")


@dataclass(frozen=True)
class Declared:
    """A declared model as the stages read it: its directory and the digests of its weights and tokenizer."""

    label: str
    path: Path
    source: str  # as the config gives it: the path, or hub:<id>[@revision]
    model_sha256: str
    tokenizer_sha256: str
    factors: dict


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "1").lower() not in ("0", "false", "no", "")


def model_directory(model: DeclaredModel) -> Path:
    """The local directory of a declared model: its path (relative to the natprints home), or its hub
    id's snapshot in the local cache (fetched first when the hub is on)."""
    if model.path:
        path = Path(model.path).expanduser()
        return path if path.is_absolute() else home() / path
    from huggingface_hub import snapshot_download

    where = f"{model.hub}@{model.revision}" if model.revision else model.hub
    offline = hub_offline()
    try:
        return Path(
            snapshot_download(
                model.hub,
                revision=model.revision or None,
                local_files_only=offline,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
            )
        )
    except Exception as exc:  # the hub client raises many types (not cached, no network, no such repo)
        hint = " (HF_HUB_OFFLINE=1: nothing is downloaded; set HF_HUB_OFFLINE=0 on a machine with network access)"
        raise NatprintsError(
            f"model {model.label}: cannot read hub model {where}: {first_line(exc)}{hint if offline else ''}"
        ) from None


def tokenizer_digest(path: Path) -> str:
    files = {f: sha256_file(path / f) for f in TOKENIZER_FILES if (path / f).is_file()}
    if not files:
        raise NatprintsError(f"declared model at {path} has no tokenizer of its own (no tokenizer.json)")
    return hash_obj(files)


def verify_declared(cfg: Config) -> dict[str, Declared]:
    """Every declared model, checked to be a causal-LM directory with a tokenizer; its weights hashed
    (and checked against a manifest.json beside them, if it has one)."""
    from natprints.modeldir import inspect_model, model_digest

    out = {}
    for model in cfg.models:
        path = model_directory(model)
        try:
            info = inspect_model(path)
        except NatprintsError as exc:
            raise NatprintsError(f"model {model.label}: {exc}") from None
        source = model.path or f"hub:{model.hub}" + (f"@{model.revision}" if model.revision else "")
        out[model.label] = Declared(
            model.label, path, source, model_digest(info), tokenizer_digest(path), dict(model.factors)
        )
    return out


@dataclass(frozen=True)
class Planned:
    """A declared model built on the meta device (no weights read, no memory taken): what it costs."""

    label: str
    model_type: str
    parameters: int
    layers: int
    hidden_size: int
    vocab_size: int
    source: str  # where its architecture came from: its directory's config.json, or the run config

    @property
    def fp32_gib(self) -> float:
        return self.parameters * 4 / 2**30


def architecture(model: DeclaredModel) -> tuple[Any, str]:
    """(transformers config, where it came from) of a declared model: its directory's config.json where
    the model is at hand (a path, or a hub id in the local cache), else the ``architecture`` its entry
    declares; neither is a one-line error."""
    from transformers import AutoConfig

    try:
        path = model_directory(model)
    except NatprintsError as exc:
        if not model.architecture:
            raise NatprintsError(f"{exc}; or declare its architecture (model_type and sizes) in the config") from None
    else:
        if (path / "config.json").is_file():
            return AutoConfig.from_pretrained(path), "config.json"
        if not model.architecture:
            raise NatprintsError(f"model {model.label}: {path} has no config.json")
    fields = dict(model.architecture)
    kind = str(fields.pop("model_type"))
    try:
        return AutoConfig.for_model(kind, **fields), "run config"
    except (ValueError, TypeError) as exc:
        raise NatprintsError(f"model {model.label}: architecture: {first_line(exc)}") from None


def plan(cfg: Config) -> list[Planned]:
    """Every declared model built on the meta device from :func:`architecture`: its parameter count
    and shape, without reading or allocating a weight."""
    import torch
    from transformers import AutoModelForCausalLM

    out = []
    for model in cfg.models:
        config, source = architecture(model)
        try:
            with torch.device("meta"):
                built = AutoModelForCausalLM.from_config(config)
        except (ValueError, TypeError) as exc:
            raise NatprintsError(f"model {model.label}: not a causal LM: {first_line(exc)}") from None
        out.append(
            Planned(
                model.label,
                config.model_type,
                sum(p.numel() for p in built.parameters()),
                int(getattr(config, "num_hidden_layers", 0) or 0),
                int(getattr(config, "hidden_size", 0) or 0),
                int(config.vocab_size),
                source,
            )
        )
    return out


def _name_part(value: object) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", str(value)).strip("_") or "_"


def declared_conditions(cfg: Config) -> dict[str, list[str]]:
    """Condition name -> the labels of its declared models (in declaration order)."""
    models = cfg.models
    if not cfg.conditions.declared:
        return {DECLARED: [m.label for m in models]} if len(models) >= 2 else {}
    out: dict[str, list[str]] = {}
    for factor in cfg.conditions.declared:
        others = sorted({f for m in models for f in m.factors} - {factor})
        groups: dict[tuple, list[DeclaredModel]] = {}
        for m in models:
            if factor in m.factors:
                groups.setdefault(tuple(m.factors.get(f) for f in others), []).append(m)
        formed = {key: g for key, g in groups.items() if len({m.factors[factor] for m in g}) >= 2}
        varying = [i for i in range(len(others)) if len({key[i] for key in formed}) > 1]
        for key, group in formed.items():
            parts = [_name_part(key[i]) for i in varying]
            out["-".join([DECLARED, factor, *parts])] = [m.label for m in group]
    return out
