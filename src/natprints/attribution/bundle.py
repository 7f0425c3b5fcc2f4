"""Evidence bundles: one JSON file that lets someone else recompute a set of verdicts.

`natprints attribute FILES --bundle OUT` records what the verdicts rest on: each input's sha256 (of
the text as read), each candidate model's weight digest and tokenizer hash (or the saved attributor's
files), the request and the run config, the code and machine that computed it, the per-text scores
(for the likelihood method each model's log-probability of every token it scored, its
log-likelihood and discrepancy z; for an attributor its calibrated probabilities) and the verdicts.
`natprints verify OUT` checks every hash against the files the bundle names, recomputes every score
and verdict from them, and says ``verified`` or the first thing that differs. Scores are compared
within a tolerance (:data:`TOLERANCE`): reruns are bit-identical on one kind of CPU, not across kinds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from natprints.artifacts import atomic_write_json, hash_obj, provenance, sha256_file, sha256_text
from natprints.errors import NatprintsError

BUNDLE_FORMAT = "natprints-evidence-bundle"
BUNDLE_VERSION = 1
TOLERANCE = {"token_logprobs": 1e-4, "loglik": 1e-3, "z": 1e-3, "proba": 1e-6, "probability": 1e-6, "top": 1e-6}


@dataclass
class Bundle:
    """What one `attribute` call rests on, filled while it runs (see the module's note)."""

    method: str
    request: dict[str, Any]
    inputs: list[dict[str, Any]] = field(default_factory=list)  # name, path, sha256, chars
    sources: dict[str, Any] = field(default_factory=dict)  # models (label -> path, digests) or the attributor
    config: dict[str, Any] | None = None
    texts: list[dict[str, Any]] = field(default_factory=list)  # per-text scores, in input order
    verdicts: list[dict[str, Any]] = field(default_factory=list)

    def add_input(self, name: str, text: str) -> None:
        self.inputs.append(
            {"name": name, "path": str(Path(name).resolve()), "sha256": sha256_text(text), "chars": len(text)}
        )

    def add_models(self, models: dict[str, Path], shared_tokenizer: Path) -> None:
        """Each candidate's directory, weight digest (checked against its manifest), and the tokenizer it
        reads with (its own, else the shared one) with that tokenizer's digest."""
        from natprints.modeldir import has_tokenizer, inspect_model, model_digest

        for label, directory in models.items():
            tokenizer = Path(directory) if has_tokenizer(directory) else Path(shared_tokenizer)
            self.sources[label] = {
                "path": str(Path(directory).resolve()),
                "weights": model_digest(inspect_model(directory)),
                "tokenizer": str(tokenizer.resolve()),
                "tokenizer_files": tokenizer_digest(tokenizer),
            }

    def add_attributor(self, directory: Path) -> None:
        self.sources["attributor"] = {"path": str(Path(directory).resolve()), "files": directory_digest(directory)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "method": self.method,
            "request": self.request,
            "config": self.config,
            "inputs": self.inputs,
            "sources": self.sources,
            "texts": self.texts,
            "verdicts": self.verdicts,
            "provenance": provenance(),
        }

    def write(self, path: Path | str) -> None:
        atomic_write_json(path, finite(self.to_dict()))


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def tokenizer_digest(directory: Path | str) -> str:
    """One digest of the tokenizer files a directory holds (a model's, or a shared tokenizer's)."""
    directory = Path(directory)
    return hash_obj({name: sha256_file(directory / name) for name in TOKENIZER_FILES if (directory / name).is_file()})


def directory_digest(directory: Path | str) -> str:
    """One digest of every file under a directory (its relative path and sha256), hidden files aside."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))
    return hash_obj({p.relative_to(directory).as_posix(): sha256_file(p) for p in files})


def finite(value: Any) -> Any:
    """JSON has no infinities or NaN: an impossible text (-inf) or an undefined z is null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def read_bundle(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NatprintsError(f"{path}: no such bundle") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NatprintsError(f"{path}: not a readable evidence bundle ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise NatprintsError(f"{path}: not a natprints evidence bundle")
    if data.get("version") != BUNDLE_VERSION:
        raise NatprintsError(f"{path}: bundle version {data.get('version')}; this natprints reads {BUNDLE_VERSION}")
    return data


def check_hashes(data: dict[str, Any]) -> None:
    """Every input, model and attributor the bundle names, hashed again: the first that differs is an error."""
    from natprints.attribution.attributor import read_text_file, without_final_newline
    from natprints.modeldir import inspect_model, model_digest

    limit = data["request"]["max_bytes"]
    for entry in data["inputs"]:
        try:
            text = read_text_file(entry["path"], limit)
        except NatprintsError as exc:
            raise NatprintsError(f"input {entry['name']}: cannot be read again ({exc})") from None
        if data["method"] == "likelihood":  # as it was scored
            text = without_final_newline(text)
        if sha256_text(text) != entry["sha256"]:
            raise NatprintsError(f"input {entry['name']}: changed since the bundle was written (sha256 differs)")
    for label, source in data["sources"].items():
        if label == "attributor" and data["method"] == "attributor":
            if directory_digest(source["path"]) != source["files"]:
                raise NatprintsError(f"attributor {source['path']}: its files changed since the bundle was written")
            continue
        try:
            weights = model_digest(inspect_model(source["path"]))
        except NatprintsError as exc:
            raise NatprintsError(f"model {label}: {exc}") from None
        if weights != source["weights"]:
            raise NatprintsError(f"model {label} ({source['path']}): weights changed since the bundle was written")
        if tokenizer_digest(source["tokenizer"]) != source["tokenizer_files"]:
            raise NatprintsError(f"model {label}: tokenizer {source['tokenizer']} changed since the bundle was written")


def compare(recorded: Any, now: Any, where: str, key: str = "") -> float:
    """The largest difference between two bundles' scores; raises at the first one beyond tolerance
    (or any difference in labels, counts or names). ``where`` says which text and field."""
    if isinstance(recorded, dict) and isinstance(now, dict):
        if set(recorded) != set(now):
            raise NatprintsError(f"{where}: recorded fields {sorted(recorded)}, recomputed {sorted(now)}")
        deltas = (compare(recorded[k], now[k], f"{where} {k}", k if k in TOLERANCE else key) for k in recorded)
        return max(deltas, default=0.0)
    if isinstance(recorded, list) and isinstance(now, list):
        if len(recorded) != len(now):
            raise NatprintsError(f"{where}: {len(recorded)} values recorded, {len(now)} recomputed")
        return max((compare(r, n, where, key) for r, n in zip(recorded, now, strict=True)), default=0.0)
    numbers = (int, float)
    if isinstance(recorded, numbers) and isinstance(now, numbers) and not isinstance(recorded, bool):
        delta = abs(float(recorded) - float(now))
        if key in TOLERANCE and delta <= TOLERANCE[key]:
            return delta
        if delta == 0:
            return 0.0
        raise NatprintsError(f"{where}: {recorded!r} recorded, {now!r} recomputed")
    if recorded != now:
        raise NatprintsError(f"{where}: {recorded!r} recorded, {now!r} recomputed")
    return 0.0
