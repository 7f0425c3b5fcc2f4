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

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from natprints.artifacts import Manifest, hash_obj
from natprints.config import Config, LineageSettings
from natprints.errors import NatprintsError
from natprints.lineage import seedprints as sp
from natprints.lineage import weightstd as ws
from natprints.lineage.models import Entry, discover_zoo, inspect_model, library_entries, model_digest
from natprints.records import LINEAGE_JSON, write_lineage
from natprints.runtime import setup_torch

STAGE_VERSION = 1
METHODS = ("seedprints", "weights")
TARGET_FPR = 0.01


# ---------------------------------------------------------------------------------------------
# Discovering the zoo


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

    started = time.time()
    device = setup_torch(cfg)  # threads, quiet transformers, deterministic kernels; "auto" resolved
    settings = cfg.lineage
    reports = cfg.paths.reports
    entries = discover_zoo(cfg.paths.zoo)
    # checkpoints only matter for emergence, which covers the `seed` condition's models
    entries = [e for e in entries if e.kind != "checkpoint" or "seed" in e.conditions]
    infos = {e.label: inspect_model(e.path) for e in entries}
    digests = {e.label: model_digest(infos[e.label]) for e in entries}
    key = stage_key(cfg, entries, digests)
    manifest = Manifest(reports, "lineage results", LINEAGE_JSON)
    if not force and manifest.is_current(key):
        return manifest.read()
    manifest.invalidate()

    features: dict[str, np.ndarray] = {}
    t0 = time.time()
    for e in tqdm(entries, desc="seedprints features", unit="model", disable=not progress):
        features[e.label] = sp.model_features(infos[e.label], settings, cache_dir=cfg.paths.cache, device=device)
    features_s = time.time() - t0
    matrix_entries = [e for e in entries if e.kind != "checkpoint"]
    profiles = {e.label: ws.weight_profile(infos[e.label]) for e in matrix_entries}
    rows = _pair_rows(matrix_entries, features, profiles, digests, settings)

    emergence = emergence_records(entries, features, settings)
    files = write_lineage(reports, rows, emergence)

    summary: dict[str, Any] = {
        "stage": "lineage",
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
    summary["forward_passes"] = len(entries)
    summary["features_s"] = round(features_s, 3)
    summary["wall_s"] = round(time.time() - started, 3)
    return manifest.write(key, summary, files)


# ---------------------------------------------------------------------------------------------
# One model against a library


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
    target = inspect_model(model)
    target_features = sp.model_features(target, settings, cache_dir=cache_dir, device=device)
    ranked, skipped = [], []
    candidates = [(n, p) for n, p in library_entries(library) if p.resolve() != target.path.resolve()]
    for name, path in tqdm(candidates, desc="library", unit="model", disable=not progress):
        info = inspect_model(path)
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


def compare(
    model_a: Path | str,
    model_b: Path | str,
    method: str = "all",
    settings: LineageSettings | None = None,
    *,
    cache_dir: Path | str | None = None,
    device: str = "auto",
) -> dict[str, dict[str, Any]]:
    """Is B from A's lineage? Per method (``seedprints``, ``weights`` or ``all``), its result and verdict.

    With ``all``, a method that cannot compare the pair (another shape) is reported ``incomparable``
    and the other still answers; when neither can, or the one asked for by name cannot, it is an error.
    """
    settings = settings or LineageSettings()
    info_a, info_b = inspect_model(model_a), inspect_model(model_b)
    methods = list(METHODS) if method == "all" else [method]
    results: dict[str, dict[str, Any]] = {}
    for name in methods:
        try:
            if name == "seedprints":
                sp.check_comparable(info_a, info_b)
                r = sp.seedprints_compare(info_a.path, info_b.path, settings, cache_dir=cache_dir, device=device)
                results[name] = r.to_dict() | {"verdict": "related" if r.same_lineage else "unrelated"}
            else:
                w = ws.weights_compare(info_a.path, info_b.path, settings.weights_threshold)
                results[name] = w.to_dict() | {"verdict": "related" if w.related else "unrelated"}
        except NatprintsError as exc:
            if method != "all" or "cannot compare" not in str(exc):
                raise
            results[name] = {"verdict": "incomparable", "reason": str(exc)}
    if all(r["verdict"] == "incomparable" for r in results.values()):
        raise NatprintsError("; ".join(r["reason"] for r in results.values()))
    return results
