"""Lineage experiments over a run's zoo: score matrices, AUC, verdicts, emergence.

Entries are every zoo model's step-0 init (``<model-id>@init``), the trained models and the derived
models (``<model-id>+kjv``); every unordered pair is scored by both methods. Ground truth comes
from the manifests:

- SeedPrints asks "same seed lineage": two entries are related when they share the init seed and
  the architecture (so their step-0 weights are the same).
- The weight-std fingerprint asks "derived from": related when one entry is an ancestor of the
  other in the derivation graph init -> trained -> derived, with inits identified by (init seed,
  architecture) since those are bit-identical. Siblings trained from the same init (data-order,
  lr, batch-size variants) are *not* derived from one another, so they count as unrelated here.

Outputs in ``reports/<run>/``: ``lineage.csv`` (one row per pair and method), the
``lineage_emergence.csv`` records, the figures, and ``lineage.json`` (summary, checks and
provenance) written last, so its presence marks the stage complete.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from natprints.artifacts import (
    atomic_write_json,
    atomic_write_text,
    git_revision,
    hash_obj,
    package_versions,
    read_manifest,
    sha256_file,
)
from natprints.config import Config, LineageSettings
from natprints.errors import NatprintsError
from natprints.lineage import seedprints as sp
from natprints.lineage import weightstd as ws

STAGE_VERSION = 1
METHODS = ("seedprints", "weights")
CSV_COLUMNS = ["model_a", "model_b", "method", "score", "log10_p", "related", "verdict"]
LINEAGE_CSV = "lineage.csv"
LINEAGE_JSON = "lineage.json"
EMERGENCE_CSV = "lineage_emergence.csv"
TARGET_FPR = 0.01
_STEP_DIR = re.compile(r"^step-(\d+)$")
_KIND_ORDER = {"init": 0, "trained": 1, "derived": 2, "checkpoint": 3}


@dataclass(frozen=True)
class Entry:
    """One model directory in the experiment, with what its manifest says about its origin."""

    label: str
    path: Path
    kind: str  # init | trained | derived | checkpoint
    model_id: str  # the zoo model this directory belongs to
    root: str  # the trained model at the head of its line (the parent, for derived models)
    parent: str | None
    init_seed: int | None
    data_seed: int | None
    conditions: tuple[str, ...]
    arch: dict[str, Any] = field(default_factory=dict)
    step: int | None = None

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        out["conditions"] = list(self.conditions)
        return out


# ---------------------------------------------------------------------------------------------
# Discovering the zoo


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def discover_zoo(zoo_dir: Path | str) -> list[Entry]:
    """Every init, trained, derived model and checkpoint in a zoo directory, in a stable order."""
    zoo_dir = Path(zoo_dir)
    if not zoo_dir.is_dir():
        raise NatprintsError(f"no zoo at {zoo_dir}; train it first (`make zoo`)")
    manifests: dict[str, tuple[Path, dict[str, Any]]] = {}
    for model_dir in sorted(p for p in zoo_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (model_dir / "manifest.json").is_file():
            if (model_dir / "config.json").is_file() or (model_dir / "init").is_dir():
                raise NatprintsError(
                    f"zoo model {model_dir.name} is incomplete (no manifest.json); finish it with `natprints zoo`"
                )
            continue
        manifest = read_manifest(model_dir, "zoo model")
        model_id = str(manifest.get("model_id") or model_dir.name)
        manifests[model_id] = (model_dir, manifest)
    if not manifests:
        raise NatprintsError(f"no models in the zoo at {zoo_dir}; train it first (`make zoo`)")

    entries: list[Entry] = []
    for model_id, (model_dir, manifest) in manifests.items():
        parent = manifest.get("parent")
        parent = str(parent) if parent else None
        if parent is not None and parent not in manifests:
            raise NatprintsError(f"derived model {model_id} names parent {parent!r}, which is not in the zoo")
        source = manifests[parent][1] if parent else manifest
        init_seed = _int_or_none(manifest.get("init_seed"))
        if init_seed is None:
            init_seed = _int_or_none(source.get("init_seed"))
        conditions = tuple(str(c) for c in manifest.get("conditions") or source.get("conditions") or [])
        common = {
            "model_id": model_id,
            "root": parent or model_id,
            "parent": parent,
            "init_seed": init_seed,
            "data_seed": _int_or_none(manifest.get("data_seed")),
            "conditions": conditions,
        }
        info = sp.inspect_model(model_dir)
        kind = "derived" if parent else "trained"
        spec = manifest.get("spec") if isinstance(manifest.get("spec"), dict) else {}
        entries.append(
            Entry(model_id, model_dir, kind, arch=info.arch(), step=_int_or_none(spec.get("steps")), **common)
        )
        if parent is None and (model_dir / "init" / "config.json").is_file():
            init = sp.inspect_model(model_dir / "init")
            entries.append(Entry(f"{model_id}@init", init.path, "init", arch=init.arch(), step=0, **common))
        checkpoints = model_dir / "checkpoints"
        if parent is None and checkpoints.is_dir():
            for ckpt in sorted(checkpoints.iterdir()):
                match = _STEP_DIR.match(ckpt.name)
                if match and (ckpt / "config.json").is_file():
                    info = sp.inspect_model(ckpt)
                    step = int(match.group(1))
                    entries.append(
                        Entry(
                            f"{model_id}@{ckpt.name}",
                            ckpt,
                            "checkpoint",
                            arch=info.arch(),
                            step=step,
                            **common,
                        )
                    )
    # lines that share an init seed sit together, so the heatmaps show lineage as blocks
    entries.sort(
        key=lambda e: (
            e.init_seed if e.init_seed is not None else -1,
            e.arch["hidden_size"],
            e.arch["num_layers"],
            e.root,
            _KIND_ORDER[e.kind],
            e.model_id,
            e.step or 0,
        )
    )
    return entries


# ---------------------------------------------------------------------------------------------
# Ground truth


def seed_related(a: Entry, b: Entry) -> bool:
    """Same seed lineage: the same init seed and architecture, hence the same step-0 weights."""
    return a.init_seed is not None and a.init_seed == b.init_seed and a.arch == b.arch


def _node(e: Entry) -> tuple[Any, ...]:
    if e.kind == "init":
        return ("init", e.init_seed, hash_obj(e.arch))
    return ("model", e.model_id)


def _ancestors(e: Entry) -> set[tuple[Any, ...]]:
    if e.kind == "init":
        return set()
    init = ("init", e.init_seed, hash_obj(e.arch))
    if e.kind == "derived":
        return {("model", e.parent), init}
    return {init}


def derived_related(a: Entry, b: Entry) -> bool:
    """Derived from: one is the other (identical inits), or an ancestor of it."""
    na, nb = _node(a), _node(b)
    return na == nb or na in _ancestors(b) or nb in _ancestors(a)


# ---------------------------------------------------------------------------------------------
# Scoring


def _evidence(row: dict[str, Any]) -> float:
    """Higher = more evidence of relation: -log10 p for SeedPrints, the correlation for weights."""
    if row["method"] == "seedprints":
        return -float(row["log10_p"])
    score = row["score"]
    return -2.0 if score is None or not math.isfinite(score) else float(score)  # undefined = lowest


def method_summary(rows: list[dict[str, Any]], method: str) -> dict[str, Any]:
    """AUC (all pairs and excluding bit-identical ones), TPR at 1% FPR, verdict counts."""
    from sklearn.metrics import roc_auc_score, roc_curve

    mine = [r for r in rows if r["method"] == method]
    comp = [r for r in mine if r["verdict"] != "incomparable"]
    y = np.array([r["related"] for r in comp], dtype=bool)
    s = np.array([_evidence(r) for r in comp], dtype=float)
    called = np.array([r["verdict"] == "related" for r in comp], dtype=bool)

    def auc(mask: np.ndarray) -> float | None:
        yy = y[mask]
        return float(roc_auc_score(yy, s[mask])) if 0 < yy.sum() < len(yy) else None

    tpr_at = None
    if 0 < y.sum() < len(y):
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        tpr_at = float(tpr[fpr <= TARGET_FPR].max())
    identical = np.array([r["identical"] for r in comp], dtype=bool)
    return {
        "pairs": len(mine),
        "comparable": len(comp),
        "incomparable": len(mine) - len(comp),
        "related": int(y.sum()),
        "unrelated": int((~y).sum()),
        "identical_pairs": int(identical.sum()),
        "auc": auc(np.ones(len(y), dtype=bool)),
        "auc_nonidentical": auc(~identical),
        "tpr_at_1pct_fpr": tpr_at,
        "tp": int((called & y).sum()),
        "fp": int((called & ~y).sum()),
        "tn": int((~called & ~y).sum()),
        "fn": int((~called & y).sum()),
    }


def _pair_rows(
    entries: list[Entry],
    features: dict[str, np.ndarray],
    profiles: dict[str, ws.WeightProfile],
    digests: dict[str, str],
    settings: LineageSettings,
) -> list[dict[str, Any]]:
    rows = []
    for i, a in enumerate(entries):
        for b in entries[i + 1 :]:
            base = {"model_a": a.label, "model_b": b.label, "identical": digests[a.label] == digests[b.label]}
            sp_row = {**base, "method": "seedprints", "related": seed_related(a, b)}
            if features[a.label].shape == features[b.label].shape and (a.arch["vocab_size"] == b.arch["vocab_size"]):
                result = sp.seedprints_test(
                    features[a.label],
                    features[b.label],
                    k=settings.seedprints_k,
                    temperature=settings.seedprints_temperature,
                    alpha=settings.alpha,
                )
                sp_row |= {
                    "score": result.z if math.isfinite(result.z) else None,
                    "log10_p": result.log10_p,
                    "verdict": "related" if result.same_lineage else "unrelated",
                    "kept": result.kept,
                }
            else:
                sp_row |= {"score": None, "log10_p": None, "verdict": "incomparable", "kept": None}
            rows.append(sp_row)
            w_row = {**base, "method": "weights", "related": derived_related(a, b), "log10_p": None}
            pa, pb = profiles[a.label], profiles[b.label]
            if pa.num_layers == pb.num_layers:
                wr = ws.compare_profiles(pa, pb, settings.weights_threshold)
                w_row |= {
                    "score": wr.score if math.isfinite(wr.score) else None,
                    "verdict": "related" if wr.related else "unrelated",
                }
            else:
                w_row |= {"score": None, "verdict": "incomparable"}
            rows.append(w_row)
    return rows


# ---------------------------------------------------------------------------------------------
# What held


def _group(
    rows: list[dict[str, Any]],
    by_label: dict[str, Entry],
    method: str,
    name: str,
    expect: str,
    select: Callable[[Entry, Entry], bool],
) -> dict[str, Any] | None:
    chosen = [
        r
        for r in rows
        if r["method"] == method
        and r["verdict"] != "incomparable"
        and (
            select(by_label[r["model_a"]], by_label[r["model_b"]])
            or select(by_label[r["model_b"]], by_label[r["model_a"]])
        )
    ]
    if not chosen:
        return None
    held = sum(r["verdict"] == expect for r in chosen)
    if method == "seedprints":
        values = [r["log10_p"] for r in chosen]
        worst = max(values) if expect == "related" else min(values)
    else:
        values = [r["score"] for r in chosen if r["score"] is not None]
        worst = (min(values) if expect == "related" else max(values)) if values else None
    return {
        "method": method,
        "name": name,
        "expect": expect,
        "n": len(chosen),
        "held": held,
        "worst": worst,
        "failures": [f"{r['model_a']} vs {r['model_b']}" for r in chosen if r["verdict"] != expect][:10],
    }


def expectation_checks(rows: list[dict[str, Any]], entries: list[Entry]) -> list[dict[str, Any]]:
    """The issue's expectations, counted on the zoo (not assumed): one record per pair group."""
    by_label = {e.label: e for e in entries}

    def own(kind_a: str, kind_b: str) -> Callable[[Entry, Entry], bool]:
        return lambda a, b: a.kind == kind_a and b.kind == kind_b and a.root == b.root

    def other_seed(kinds: set[str]) -> Callable[[Entry, Entry], bool]:
        return lambda a, b: {a.kind, b.kind} == kinds and a.init_seed != b.init_seed and a.arch == b.arch

    def siblings(same_data: bool) -> Callable[[Entry, Entry], bool]:
        return lambda a, b: (
            a.kind == b.kind == "trained" and seed_related(a, b) and (a.data_seed == b.data_seed) == same_data
        )

    def derived_other_seed(a: Entry, b: Entry) -> bool:
        return a.kind == "derived" and a.init_seed != b.init_seed and a.arch == b.arch

    specs: list[tuple[str, str, str, Callable[[Entry, Entry], bool]]] = [
        ("init vs its own trained model", "seedprints", "related", own("init", "trained")),
        ("init vs its own derived (+kjv) model", "seedprints", "related", own("init", "derived")),
        ("trained vs its own derived model", "seedprints", "related", own("trained", "derived")),
        ("same init seed, different data order (trained)", "seedprints", "related", siblings(False)),
        ("same init and data seed, other factor (trained)", "seedprints", "related", siblings(True)),
        ("different init seeds: init vs init", "seedprints", "unrelated", other_seed({"init"})),
        ("different init seeds: trained vs trained", "seedprints", "unrelated", other_seed({"trained"})),
        ("different init seeds: init vs trained", "seedprints", "unrelated", other_seed({"init", "trained"})),
        ("different init seeds: a derived model vs any", "seedprints", "unrelated", derived_other_seed),
        ("init vs its own trained model", "weights", "related", own("init", "trained")),
        ("init vs its own derived model", "weights", "related", own("init", "derived")),
        ("trained vs its own derived model", "weights", "related", own("trained", "derived")),
        ("siblings from one init (not derived from each other)", "weights", "unrelated", siblings(False)),
        ("siblings from one init, same data order", "weights", "unrelated", siblings(True)),
        ("different init seeds: init vs init", "weights", "unrelated", other_seed({"init"})),
        ("different init seeds: trained vs trained", "weights", "unrelated", other_seed({"trained"})),
        ("different init seeds: a derived model vs any", "weights", "unrelated", derived_other_seed),
    ]
    checks = []
    for name, method, expect, select in specs:
        group = _group(rows, by_label, method, name, expect, select)
        if group is not None:
            checks.append(group)
    return checks


def emergence_records(
    entries: list[Entry], features: dict[str, np.ndarray], settings: LineageSettings
) -> list[dict[str, Any]]:
    """SeedPrints log10 p of each `seed`-condition init against that model's checkpoints over training
    (reference = own), and of the other seed models' inits against the same checkpoints (controls)."""
    seed_models = [e for e in entries if e.kind == "trained" and "seed" in e.conditions]
    inits = {e.model_id: e for e in entries if e.kind == "init"}
    records = []
    for model in seed_models:
        if model.model_id not in inits:
            continue
        line = [e for e in entries if e.kind == "checkpoint" and e.model_id == model.model_id]
        line.append(model)
        for ref in seed_models:
            init = inits.get(ref.model_id)
            if init is None or init.arch != model.arch:
                continue
            for point in line:
                result = sp.seedprints_test(
                    features[init.label],
                    features[point.label],
                    k=settings.seedprints_k,
                    temperature=settings.seedprints_temperature,
                    alpha=settings.alpha,
                )
                records.append(
                    {
                        "model": model.model_id,
                        "checkpoint": point.label,
                        "step": point.step,
                        "reference": init.label,
                        "own": ref.model_id == model.model_id,
                        "log10_p": result.log10_p,
                    }
                )
    return records


# ---------------------------------------------------------------------------------------------
# The stage


def _outputs_current(reports: Path, key: str) -> bool:
    summary_path = reports / LINEAGE_JSON
    if not summary_path.is_file():
        return False
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(summary, dict) or summary.get("key") != key:
        return False
    outputs = summary.get("outputs")
    if not isinstance(outputs, dict) or not outputs:
        return False
    return all((reports / n).is_file() and sha256_file(reports / n) == h for n, h in outputs.items())


def stage_key(cfg: Config, entries: list[Entry], digests: dict[str, str]) -> str:
    return hash_obj(
        {
            "version": STAGE_VERSION,
            "lineage": cfg.lineage.model_dump(mode="json"),
            "entries": [[e.label, e.kind, e.init_seed, e.parent, digests[e.label]] for e in entries],
        }
    )


def run_lineage(cfg: Config, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Score every pair in the run's zoo by both methods and write ``reports/<run>/lineage.*``.

    Skips (returning the existing summary) when the outputs exist and match the config's lineage
    settings and the digests of every model read.
    """
    from tqdm.auto import tqdm

    from natprints.lineage import report
    from natprints.zoo import setup_torch

    started = time.time()
    device = setup_torch(cfg)  # threads, quiet transformers, deterministic kernels; "auto" resolved
    settings = cfg.lineage
    reports = cfg.paths.reports
    entries = discover_zoo(cfg.paths.zoo)
    # checkpoints only matter for emergence, which covers the `seed` condition's models
    entries = [e for e in entries if e.kind != "checkpoint" or "seed" in e.conditions]
    infos = {e.label: sp.inspect_model(e.path) for e in entries}
    digests = {e.label: sp.model_digest(infos[e.label]) for e in entries}
    key = stage_key(cfg, entries, digests)
    if not force and _outputs_current(reports, key):
        return json.loads((reports / LINEAGE_JSON).read_text(encoding="utf-8"))

    features: dict[str, np.ndarray] = {}
    t0 = time.time()
    for e in tqdm(entries, desc="seedprints features", unit="model", disable=not progress):
        features[e.label] = sp.model_features(infos[e.label], settings, cache_dir=cfg.paths.cache, device=device)
    features_s = time.time() - t0
    matrix_entries = [e for e in entries if e.kind != "checkpoint"]
    profiles = {e.label: ws.weight_profile(infos[e.label]) for e in matrix_entries}
    rows = _pair_rows(matrix_entries, features, profiles, digests, settings)

    frame = pd.DataFrame(rows)
    atomic_write_text(reports / LINEAGE_CSV, frame[CSV_COLUMNS].to_csv(index=False))
    emergence = emergence_records(entries, features, settings)
    emergence_frame = pd.DataFrame(emergence, columns=["model", "checkpoint", "step", "reference", "own", "log10_p"])
    atomic_write_text(reports / EMERGENCE_CSV, emergence_frame.to_csv(index=False))

    summary: dict[str, Any] = {
        "stage": "lineage",
        "key": key,
        "config_hash": cfg.hash(),
        "settings": settings.model_dump(mode="json"),
        "zoo": str(cfg.paths.zoo),
        "entries": [e.summary() | {"digest": digests[e.label]} for e in matrix_entries],
        "num_layers": sorted({e.arch["num_layers"] for e in matrix_entries}),
        "methods": {m: method_summary(rows, m) for m in METHODS},
        "checks": expectation_checks(rows, matrix_entries),
        "emergence": emergence,
        "ground_truth": {
            "seedprints": "same init seed and architecture (identical step-0 weights)",
            "weights": "derived from: one is the other's ancestor in init -> trained -> derived; "
            "siblings from one init are unrelated",
        },
    }
    figures = report.write_figures(reports, summary, rows)
    summary["outputs"] = {name: sha256_file(reports / name) for name in [LINEAGE_CSV, EMERGENCE_CSV, *figures]}
    summary["forward_passes"] = len(entries)
    summary["features_s"] = round(features_s, 3)
    summary["wall_s"] = round(time.time() - started, 3)
    summary["package_versions"] = package_versions()
    summary["git_revision"] = git_revision()
    atomic_write_json(reports / LINEAGE_JSON, summary)
    return summary


# ---------------------------------------------------------------------------------------------
# One model against a library


def library_entries(library: Path | str) -> list[tuple[str, Path]]:
    """The model directories of a library dir (e.g. a zoo): ``<name>`` and ``<name>@init``."""
    library = Path(library)
    if not library.is_dir():
        raise NatprintsError(f"library directory not found: {library}")
    if (library / "config.json").is_file():
        raise NatprintsError(f"{library} is a model directory; give the directory that holds models")
    out = []
    for sub in sorted(p for p in library.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (sub / "config.json").is_file():
            out.append((sub.name, sub))
        if (sub / "init" / "config.json").is_file():
            out.append((f"{sub.name}@init", sub / "init"))
    if not out:
        raise NatprintsError(f"no model directories (with config.json) in library {library}")
    return out


def identify(
    model: Path | str,
    library: Path | str,
    settings: LineageSettings | None = None,
    *,
    cache_dir: Path | str | None = None,
    device: str = "auto",
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Rank a library's models by SeedPrints evidence that ``model`` shares their seed.

    Strongest evidence (lowest log10 p) first; models SeedPrints cannot compare come last, with
    the reason. The model itself is left out when it sits in the library.
    """
    from tqdm.auto import tqdm

    settings = settings or LineageSettings()
    target = sp.inspect_model(model)
    target_features = sp.model_features(target, settings, cache_dir=cache_dir, device=device)
    ranked, skipped = [], []
    candidates = [(n, p) for n, p in library_entries(library) if p.resolve() != target.path.resolve()]
    for name, path in tqdm(candidates, desc="library", unit="model", disable=not progress):
        info = sp.inspect_model(path)
        try:
            sp.check_comparable(target, info)
        except NatprintsError as exc:
            skipped.append({"model": name, "path": str(path), "verdict": "incomparable", "reason": str(exc)})
            continue
        features = sp.model_features(info, settings, cache_dir=cache_dir, device=device)
        result = sp.seedprints_test(
            target_features,
            features,
            k=settings.seedprints_k,
            temperature=settings.seedprints_temperature,
            alpha=settings.alpha,
        )
        verdict = "same seed" if result.same_lineage else "no evidence"
        ranked.append({"model": name, "path": str(path), "verdict": verdict, **result.to_dict()})
    ranked.sort(key=lambda r: (r["log10_p"], r["model"]))
    return ranked + skipped
