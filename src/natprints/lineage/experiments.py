"""Lineage experiments over a run's zoo: score matrices, AUC, verdicts, emergence.

Entries are every zoo model's step-0 init (``<model-id>@init``), the trained models and the derived
models (``<model-id>+kjv``); every unordered pair is scored by both methods. Ground truth comes
from the manifests:

- SeedPrints asks "same seed lineage": two entries are related when they share the init seed and
  the architecture (so their step-0 weights are the same). A pair with an init gets the analytic
  verdict (one-sided p < alpha). A pair of two trained/derived models gets a calibrated one: z
  above the (1 - alpha) quantile of z over the zoo's trained/derived pairs of different init
  seeds (fit and evaluated on the same pairs; a leave-one-seed-out estimate of its FPR is kept).
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
import sys
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
from natprints.modeldir import (
    DECLARED_KIND,
    Entry,
    Incomparable,
    discover_zoo,
    inspect_model,
    library_entries,
    model_digest,
)
from natprints.records import LINEAGE_JSON, write_lineage
from natprints.runtime import Job, StageResult, run_jobs, setup_torch

STAGE_VERSION = 2  # 2: SeedPrints at the authors' settings, calibrated verdicts
METHODS = ("seedprints", "weights")
TARGET_FPR = 0.01
GOAL_TPR, GOAL_FPR = 0.95, 0.05  # init <-> own trained and derived linked, over all different-seed pairs


# ---------------------------------------------------------------------------------------------
# Discovering the zoo


# ---------------------------------------------------------------------------------------------
# Ground truth


def declared_entries(cfg: Config) -> list[Entry]:
    """The run's declared models as lineage entries: compared with every model, their ground truth
    unknown (no pair with one of them counts in the AUCs, counts or checks)."""
    from natprints.declared import declared_conditions, verify_declared

    conditions = declared_conditions(cfg)
    out = []
    for label, d in verify_declared(cfg).items():
        mine = tuple(c for c, members in conditions.items() if label in members)
        common = {"model_id": label, "root": label, "parent": None, "init_seed": None, "data_seed": None}
        out.append(Entry(label, d.path, DECLARED_KIND, conditions=mine, arch=inspect_model(d.path).arch(), **common))
    return out


def known(a: Entry, b: Entry) -> bool:
    """Whether the pair's relation is known (no declared model in it)."""
    return DECLARED_KIND not in (a.kind, b.kind)


def seed_related(a: Entry, b: Entry) -> bool:
    """Same seed lineage: the same init seed and architecture, hence the same step-0 weights."""
    return a.init_seed is not None and a.init_seed == b.init_seed and a.arch == b.arch


def different_seeds(a: Entry, b: Entry) -> bool:
    """Known unrelated for SeedPrints: two different init seeds."""
    return a.init_seed is not None and b.init_seed is not None and a.init_seed != b.init_seed


def with_init(a: Entry, b: Entry) -> bool:
    """A pair SeedPrints' analytic null holds for: one of the two is a step-0 init."""
    return "init" in (a.kind, b.kind)


def _seed_group(e: Entry) -> tuple[Any, str]:
    return (e.init_seed, hash_obj(e.arch))


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

    mine = [r for r in rows if r["method"] == method and r["related"] is not None]  # known truth only
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


def _seedprints_results(
    entries: list[Entry], features: dict[str, np.ndarray], settings: LineageSettings
) -> dict[tuple[str, str], sp.SeedPrintsResult | None]:
    """Every unordered pair's SeedPrints test (None where the shapes differ)."""
    out: dict[tuple[str, str], sp.SeedPrintsResult | None] = {}
    for i, a in enumerate(entries):
        for b in entries[i + 1 :]:
            comparable = features[a.label].shape == features[b.label].shape
            if comparable and a.arch["vocab_size"] == b.arch["vocab_size"]:
                out[a.label, b.label] = sp.seedprints_test(
                    features[a.label],
                    features[b.label],
                    k=settings.seedprints_k,
                    temperature=settings.seedprints_temperature,
                    alpha=settings.alpha,
                )
            else:
                out[a.label, b.label] = None
    return out


def seedprints_calibration(
    entries: list[Entry], results: dict[tuple[str, str], sp.SeedPrintsResult | None], target_fpr: float
) -> dict[str, Any]:
    """The z threshold for trained/derived pairs, fit on the zoo's known-unrelated ones (different
    init seeds, neither an init), with its in-sample and leave-one-seed-out false-positive rates."""
    by_label = {e.label: e for e in entries}
    pool = [
        (by_label[la], by_label[lb], r)
        for (la, lb), r in results.items()
        if r is not None
        and math.isfinite(r.z)
        and not with_init(by_label[la], by_label[lb])
        and different_seeds(by_label[la], by_label[lb])
    ]
    z = np.array([r.z for _, _, r in pool], dtype=float)
    threshold = sp.calibrate_threshold(z, target_fpr)
    loso = sp.leave_one_seed_out(
        z, [_seed_group(a) for a, _, _ in pool], [_seed_group(b) for _, b, _ in pool], target_fpr
    )
    false = int((z > threshold).sum()) if threshold is not None else 0
    return {
        "threshold": threshold,
        "target_fpr": target_fpr,
        "quantile": 1.0 - target_fpr,
        "quantile_method": "numpy 'higher' (an observed z; at most the target share of the pairs exceeds it)",
        "pairs": len(pool),
        "pool": "trained/derived pairs of different init seeds, no init in the pair",
        "z_max": float(z.max()) if len(z) else None,
        "z_median": float(np.median(z)) if len(z) else None,
        "in_sample": {"false": false, "pairs": len(pool), "fpr": false / len(pool) if pool else None},
        "leave_one_seed_out": loso,
        "note": "fit and evaluated on the same pairs (in-sample); with fewer than 1 / target FPR pairs "
        "the threshold is their largest z",
    }


def _pair_rows(
    entries: list[Entry],
    results: dict[tuple[str, str], sp.SeedPrintsResult | None],
    threshold: float | None,
    profiles: dict[str, ws.WeightProfile],
    digests: dict[str, str],
    settings: LineageSettings,
) -> list[dict[str, Any]]:
    rows = []
    for i, a in enumerate(entries):
        for b in entries[i + 1 :]:
            base = {"model_a": a.label, "model_b": b.label, "identical": digests[a.label] == digests[b.label]}
            truth = known(a, b)
            sp_row = {**base, "method": "seedprints", "related": seed_related(a, b) if truth else None}
            result = results[a.label, b.label]
            if result is not None:
                verdict, rule = sp.seedprints_verdict(result, with_init=with_init(a, b), threshold=threshold)
                sp_row |= {
                    "score": result.z if math.isfinite(result.z) else None,
                    "log10_p": result.log10_p,
                    "log10_p_two_sided": result.log10_p_two_sided,
                    "verdict": verdict,
                    "rule": rule,
                    "kept": result.kept,
                    "k": result.k,
                }
            else:
                sp_row |= {"score": None, "log10_p": None, "verdict": "incomparable", "rule": None, "kept": None}
            rows.append(sp_row)
            w_row = {**base, "method": "weights", "related": derived_related(a, b) if truth else None, "log10_p": None}
            pa, pb = profiles[a.label], profiles[b.label]
            if pa.num_layers == pb.num_layers:
                wr = ws.compare_profiles(pa, pb, settings.weights_threshold)
                w_row |= {
                    "score": wr.score if wr.score is not None and math.isfinite(wr.score) else None,
                    "verdict": wr.verdict,
                }
            else:
                w_row |= {"score": None, "verdict": "incomparable"}
            rows.append(w_row)
    return rows


def _own(kind_a: str, kind_b: str) -> Callable[[Entry, Entry], bool]:
    return lambda a, b: a.kind == kind_a and b.kind == kind_b and a.root == b.root


def seedprints_counts(rows: list[dict[str, Any]], entries: list[Entry]) -> dict[str, Any]:
    """What the issue asks of SeedPrints, counted on the zoo's comparable pairs, and the target
    "init <-> own trained and derived linked at TPR >= 0.95 with FPR <= 0.05 over all
    different-seed pairs" (uncalibrated pairs count as not linked)."""
    by_label = {e.label: e for e in entries}
    mine = [
        r for r in rows if r["method"] == "seedprints" and r["verdict"] != "incomparable" and r["related"] is not None
    ]

    def pick(select: Callable[[Entry, Entry], bool]) -> list[dict[str, Any]]:
        out = []
        for r in mine:
            a, b = by_label[r["model_a"]], by_label[r["model_b"]]
            if select(a, b) or select(b, a):
                out.append(r)
        return out

    def detail(r: dict[str, Any]) -> dict[str, Any]:
        a = by_label[r["model_a"]]
        return {
            "pair": f"{r['model_a']} vs {r['model_b']}",
            "z": r["score"],
            "log10_p": r["log10_p"],
            "kept": r["kept"],
            "k": r.get("k"),
            "hidden_size": a.arch["hidden_size"],
        }

    def tally(select: Callable[[Entry, Entry], bool], expect_related: bool) -> dict[str, Any]:
        chosen = pick(select)
        hits = [r for r in chosen if r["verdict"] == "related"]
        out = {
            "n": len(chosen),
            "linked": len(hits),
            "uncalibrated": sum(r["verdict"] == "uncalibrated" for r in chosen),
        }
        if expect_related:
            out["unlinked"] = [detail(r) for r in chosen if r["verdict"] != "related"]
        else:
            out["false"] = [detail(r) for r in hits][:20]
        return out

    counts = {
        "init_own_trained": tally(_own("init", "trained"), True),
        "init_own_derived": tally(_own("init", "derived"), True),
        "same_seed_with_init": tally(lambda a, b: with_init(a, b) and seed_related(a, b), True),
        "same_seed_trained_only": tally(lambda a, b: not with_init(a, b) and seed_related(a, b), True),
        "different_seed_with_init": tally(lambda a, b: with_init(a, b) and different_seeds(a, b), False),
        "different_seed_trained_only": tally(lambda a, b: not with_init(a, b) and different_seeds(a, b), False),
    }
    positives = counts["init_own_trained"]["n"] + counts["init_own_derived"]["n"]
    tp = counts["init_own_trained"]["linked"] + counts["init_own_derived"]["linked"]
    negatives = counts["different_seed_with_init"]["n"] + counts["different_seed_trained_only"]["n"]
    fp = counts["different_seed_with_init"]["linked"] + counts["different_seed_trained_only"]["linked"]
    tpr = tp / positives if positives else None
    fpr = fp / negatives if negatives else None
    counts["target"] = {
        "positives": positives,
        "tp": tp,
        "tpr": tpr,
        "negatives": negatives,
        "fp": fp,
        "fpr": fpr,
        "goal_tpr": GOAL_TPR,
        "goal_fpr": GOAL_FPR,
        "met": tpr is not None and fpr is not None and tpr >= GOAL_TPR and fpr <= GOAL_FPR,
    }
    return counts


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
        and r["verdict"] not in ("incomparable", "uncalibrated")
        and (
            select(by_label[r["model_a"]], by_label[r["model_b"]])
            or select(by_label[r["model_b"]], by_label[r["model_a"]])
        )
    ]
    if not chosen:
        return None
    held = sum(r["verdict"] == expect for r in chosen)
    rule = None
    if method == "seedprints":
        rules = {r["rule"] for r in chosen}
        if len(rules) != 1:
            raise ValueError(f"check {name!r} mixes SeedPrints rules {sorted(rules)}")
        rule = rules.pop()
    if rule == "analytic":
        values = [r["log10_p"] for r in chosen]
        worst = max(values) if expect == "related" else min(values)
    else:  # weight-std scores, SeedPrints z against its calibrated threshold
        values = [r["score"] for r in chosen if r["score"] is not None]
        worst = (min(values) if expect == "related" else max(values)) if values else None
    return {
        "method": method,
        "name": name,
        "rule": rule,
        "expect": expect,
        "n": len(chosen),
        "held": held,
        "worst": worst,
        "failures": [f"{r['model_a']} vs {r['model_b']}" for r in chosen if r["verdict"] != expect][:10],
    }


def expectation_checks(rows: list[dict[str, Any]], entries: list[Entry]) -> list[dict[str, Any]]:
    """The issue's expectations, counted on the zoo (not assumed): one record per pair group.

    SeedPrints groups are judged by the pairs' rule: analytic p for pairs with an init, the
    calibrated z threshold for trained/derived pairs (groups with no calibrated pair are left out).
    """
    rows = [r for r in rows if r["related"] is not None]  # pairs with a declared model: truth unknown
    by_label = {e.label: e for e in entries}

    def other_seed(kinds: set[str]) -> Callable[[Entry, Entry], bool]:
        return lambda a, b: {a.kind, b.kind} == kinds and a.init_seed != b.init_seed and a.arch == b.arch

    def siblings(same_data: bool) -> Callable[[Entry, Entry], bool]:
        return lambda a, b: (
            a.kind == b.kind == "trained" and seed_related(a, b) and (a.data_seed == b.data_seed) == same_data
        )

    def derived_other_seed(a: Entry, b: Entry) -> bool:
        return a.kind == "derived" and a.init_seed != b.init_seed and a.arch == b.arch

    def derived_other_seed_init(a: Entry, b: Entry) -> bool:
        return derived_other_seed(a, b) and b.kind == "init"

    def derived_other_seed_model(a: Entry, b: Entry) -> bool:
        return derived_other_seed(a, b) and b.kind != "init"

    specs: list[tuple[str, str, str, Callable[[Entry, Entry], bool]]] = [
        ("init vs its own trained model", "seedprints", "related", _own("init", "trained")),
        ("init vs its own derived (+kjv) model", "seedprints", "related", _own("init", "derived")),
        ("trained vs its own derived model", "seedprints", "related", _own("trained", "derived")),
        ("same init seed, different data order (trained)", "seedprints", "related", siblings(False)),
        ("same init and data seed, other factor (trained)", "seedprints", "related", siblings(True)),
        ("different init seeds: init vs init", "seedprints", "unrelated", other_seed({"init"})),
        ("different init seeds: trained vs trained", "seedprints", "unrelated", other_seed({"trained"})),
        ("different init seeds: init vs trained", "seedprints", "unrelated", other_seed({"init", "trained"})),
        ("different init seeds: a derived model vs an init", "seedprints", "unrelated", derived_other_seed_init),
        (
            "different init seeds: a derived model vs a trained or derived one",
            "seedprints",
            "unrelated",
            derived_other_seed_model,
        ),
        ("init vs its own trained model", "weights", "related", _own("init", "trained")),
        ("init vs its own derived model", "weights", "related", _own("init", "derived")),
        ("trained vs its own derived model", "weights", "related", _own("trained", "derived")),
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


def missing_derived(cfg: Config, entries: list[Entry]) -> list[str]:
    """The derived models the config asks for that the zoo does not hold (yet)."""
    from natprints.zoo.stage import derived_ids

    present = {e.model_id for e in entries if e.kind == "derived"}
    return sorted(set(derived_ids(cfg)) - present)


def _features_job(cfg: Config, label: str, path: str, *, progress: bool) -> None:
    """One model's SeedPrints features into the run's cache (a job: each runs with the run's threads,
    so the features do not depend on where it ran)."""
    device = setup_torch(cfg)
    sp.model_features(Path(path), cfg.lineage, cache_dir=cfg.paths.cache, device=device)


def run_lineage(cfg: Config, *, force: bool = False) -> dict[str, Any]:
    """Score every pair in the run's zoo by both methods and write ``reports/<run>/lineage.*``.

    Skips (returning the existing summary) when the outputs exist and match the config's lineage
    settings and the digests of every model read.
    """
    started = time.time()
    device = setup_torch(cfg)  # threads, quiet transformers, deterministic kernels; "auto" resolved
    settings = cfg.lineage
    reports = cfg.paths.reports
    entries = discover_zoo(cfg.paths.zoo)
    missing = missing_derived(cfg, entries)
    if missing:
        print(
            f"warning: {len(missing)} derived model(s) missing ({', '.join(missing)}); lineage results leave "
            "them out: run `natprints derive` first to include them",
            file=sys.stderr,
            flush=True,
        )
    # checkpoints only matter for emergence, which covers the `seed` condition's models
    entries = [e for e in entries if e.kind != "checkpoint" or "seed" in e.conditions]
    entries += declared_entries(cfg)
    infos = {e.label: inspect_model(e.path) for e in entries}
    digests = {e.label: model_digest(infos[e.label]) for e in entries}
    key = stage_key(cfg, entries, digests)
    manifest = Manifest(reports, "lineage results", LINEAGE_JSON)
    if not force and manifest.is_current(key):
        return manifest.read()
    manifest.invalidate()

    t0 = time.time()
    # one forward pass per model, fanned out over the workers into the feature cache; then read back
    jobs = [Job(e.label, (cfg, e.label, str(e.path))) for e in entries]
    run_jobs(cfg.run.worker_count(), _features_job, jobs, "seedprints features")
    features = {
        e.label: sp.model_features(infos[e.label], settings, cache_dir=cfg.paths.cache, device=device) for e in entries
    }
    features_s = time.time() - t0
    matrix_entries = [e for e in entries if e.kind != "checkpoint"]
    profiles = {e.label: ws.weight_profile(infos[e.label]) for e in matrix_entries}
    results = _seedprints_results(matrix_entries, features, settings)
    calibration = seedprints_calibration(matrix_entries, results, settings.alpha)
    rows = _pair_rows(matrix_entries, results, calibration["threshold"], profiles, digests, settings)

    emergence = emergence_records(entries, features, settings)
    files = write_lineage(reports, rows, emergence)

    summary: dict[str, Any] = {
        "stage": "lineage",
        "config_hash": cfg.hash(),
        "settings": settings.model_dump(mode="json"),
        "zoo": str(cfg.paths.zoo),
        "entries": [e.summary() | {"digest": digests[e.label]} for e in matrix_entries],
        "num_layers": sorted({e.arch["num_layers"] for e in matrix_entries}),
        "missing_derived": missing,
        "methods": {m: method_summary(rows, m) for m in METHODS},
        "checks": expectation_checks(rows, matrix_entries),
        "seedprints": {
            "inputs": "token ids uniform over the vocabulary, the same for every model",
            "distinct_last_tokens": {
                str(v): sp.distinct_last_tokens(v, settings)
                for v in sorted({e.arch["vocab_size"] for e in matrix_entries})
            },
            "k_by_hidden_size": {
                str(h): sp.resolve_k(settings.seedprints_k, h)
                for h in sorted({e.arch["hidden_size"] for e in matrix_entries})
            },
            "p_conventions": {
                "one_sided": "sf(z), this project's: log10_p in lineage.csv, the verdicts use it",
                "two_sided": "2 sf(|z|), the authors' code",
            },
            "verdict_rule": "a pair with an init: one-sided p < alpha; two trained/derived models: z above "
            "the calibrated threshold",
            "calibration": calibration,
            "counts": seedprints_counts(rows, matrix_entries),
        },
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
# One model against a library, one pair

_CALIBRATION_SETTINGS = (  # a threshold applies only to z computed the same way
    "seedprints_inputs",
    "seedprints_seq_len",
    "seedprints_k",
    "seedprints_temperature",
    "seedprints_seed",
    "alpha",
)


def load_calibration(reports_dir: Path | str | None, settings: LineageSettings) -> dict[str, Any] | None:
    """The calibrated SeedPrints threshold a run's ``lineage.json`` records, with its source, when
    there is one and it was fit at the same SeedPrints settings; else None."""
    if reports_dir is None:
        return None
    path = Path(reports_dir) / LINEAGE_JSON
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        calibration = summary["seedprints"]["calibration"]
        recorded = summary["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # an older or unreadable record: no threshold
    current = settings.model_dump(mode="json")
    if calibration.get("threshold") is None or any(recorded.get(k) != current[k] for k in _CALIBRATION_SETTINGS):
        return None
    return {"threshold": float(calibration["threshold"]), "pairs": calibration["pairs"], "source": str(path)}


def _seedprints_answer(
    result: sp.SeedPrintsResult, pair_with_init: bool, calibration: dict[str, Any] | None
) -> dict[str, Any]:
    threshold = calibration["threshold"] if calibration else None
    verdict, rule = sp.seedprints_verdict(result, with_init=pair_with_init, threshold=threshold)
    out = result.to_dict() | {"verdict": verdict, "rule": rule, "with_init": pair_with_init}
    out["same_lineage"] = None if verdict == "uncalibrated" else verdict == "related"
    out["threshold"] = threshold
    out["threshold_source"] = calibration["source"] if calibration and rule == "calibrated" else None
    if verdict == "uncalibrated":
        # the analytic test's answer, labelled: between two trained models its p is too small (their
        # z spreads wider than the null), so a `related` here may be a false link
        out["analytic_verdict"] = "related" if result.same_lineage else "unrelated"
        out["note"] = (
            "uncalibrated: two trained models (no init in the pair), where the analytic p is too small "
            "and its false-positive rate is not controlled; a `lineage run` of a zoo provides a threshold"
        )
    return out


def identify(
    model: Path | str,
    library: Path | str,
    settings: LineageSettings | None = None,
    *,
    cache_dir: Path | str | None = None,
    device: str = "auto",
    progress: bool = False,
    reports_dir: Path | str | None = None,
) -> list[dict[str, Any]]:
    """Rank a library's models by SeedPrints evidence that ``model`` shares their seed.

    Strongest evidence (highest z, lowest log10 p) first; models SeedPrints cannot compare come
    last, with the reason. The model itself is left out when it sits in the library. Verdicts:
    ``same seed`` / ``no evidence`` by the analytic p when the pair holds an init, by the calibrated
    threshold of ``reports_dir``'s ``lineage.json`` between two trained models, else ``uncalibrated``.
    """
    from tqdm.auto import tqdm

    settings = settings or LineageSettings()
    calibration = load_calibration(reports_dir, settings)
    target = inspect_model(model)
    target_features = sp.model_features(target, settings, cache_dir=cache_dir, device=device)
    ranked, skipped = [], []
    candidates = [(n, p) for n, p in library_entries(library) if p.resolve() != target.path.resolve()]
    names = {"related": "same seed", "unrelated": "no evidence", "uncalibrated": "uncalibrated"}
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
        answer = _seedprints_answer(result, sp.is_init_dir(target.path) or sp.is_init_dir(path), calibration)
        ranked.append({"model": name, "path": str(path), **answer, "verdict": names[answer["verdict"]]})
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
    reports_dir: Path | str | None = None,
) -> dict[str, dict[str, Any]]:
    """Is B from A's lineage? Per method (``seedprints``, ``weights`` or ``all``), its result and verdict.

    SeedPrints gives the analytic verdict (one-sided p < alpha) when one of the two is a zoo init
    (an ``init`` directory inside a model directory); for two trained models it is ``uncalibrated``
    (z shown) unless ``reports_dir`` holds a ``lineage.json`` whose calibrated threshold was fit at
    the same settings. With ``all``, a method that cannot compare the pair (another shape) is
    reported ``incomparable`` and the other still answers; when neither can, or the one asked for by
    name cannot, it is an error.
    """
    settings = settings or LineageSettings()
    info_a, info_b = inspect_model(model_a), inspect_model(model_b)
    methods = list(METHODS) if method == "all" else [method]
    if model_digest(info_a) == model_digest(info_b):  # the same config and weights, byte for byte
        note = "identical config and weights: one model, so the same lineage by any method"
        return {name: {"verdict": "identical", "same_lineage": True, "related": True, "note": note} for name in methods}
    results: dict[str, dict[str, Any]] = {}
    for name in methods:
        try:
            if name == "seedprints":
                sp.check_comparable(info_a, info_b)
                r = sp.seedprints_compare(info_a.path, info_b.path, settings, cache_dir=cache_dir, device=device)
                pair_with_init = sp.is_init_dir(info_a.path) or sp.is_init_dir(info_b.path)
                results[name] = _seedprints_answer(r, pair_with_init, load_calibration(reports_dir, settings))
            else:
                w = ws.weights_compare(info_a.path, info_b.path, settings.weights_threshold)
                results[name] = w.to_dict() | {"verdict": "related" if w.related else "unrelated"}
        except Incomparable as exc:
            if method != "all":
                raise
            results[name] = {"verdict": "incomparable", "reason": str(exc)}
    if all(r["verdict"] == "incomparable" for r in results.values()):
        raise NatprintsError("; ".join(r["reason"] for r in results.values()))
    return results


def _log10p_text(log10_p: float) -> str:
    return "p = 1" if log10_p == 0 else f"p = 10^{log10_p:.1f}" if log10_p < -3 else f"p = {10**log10_p:.3g}"


def comparison_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """One line per method of a :func:`compare` result, as `natprints lineage A B` prints it."""
    lines = []
    for name, r in results.items():
        if r["verdict"] == "incomparable":
            lines.append(f"{name}: incomparable — {r['reason']}")
        elif r["verdict"] == "identical":
            lines.append(f"{name}: identical — {r['note']}")
        elif name == "seedprints":
            z = "n/a" if r["z"] is None else f"{r['z']:.2f}"
            if r["verdict"] == "uncalibrated":
                analytic = "same seed lineage" if r["analytic_verdict"] == "related" else "no evidence of shared seed"
                verdict = f"{analytic} by the analytic test, UNCALIBRATED (two trained models: may be a false link)"
            else:
                verdict = f"{'same seed lineage' if r['same_lineage'] else 'no evidence of shared seed'}"
            lines.append(
                f"seedprints: {_log10p_text(r['log10_p'])} (log10 p = {r['log10_p']:.2f}, z = {z}, "
                f"|S| = {r['kept']}/{r['k']}, N = {r['n_inputs']}) -> {verdict} at alpha = {r['alpha']:g}"
            )
        else:
            score = r["score"]
            per = ", ".join(f"{k[0]} {'n/a' if v is None else f'{v:.3f}'}" for k, v in r["per_matrix"].items())
            shown = "n/a" if score is None or not math.isfinite(score) else f"{score:.3f}"
            lines.append(
                f"weights: score = {shown} ({per}) -> "
                f"{'related' if r['related'] else 'not related'} at threshold {r['threshold']:g}"
            )
    return lines


def ranking_lines(ranking: list[dict[str, Any]]) -> list[str]:
    """One line per model of an :func:`identify` ranking, best first; incomparable ones say why."""
    return [
        f"  -  {r['model']}: incomparable ({r['reason']})"
        if r["verdict"] == "incomparable"
        else f"{rank:3d}  {r['model']}: log10 p = {r['log10_p']:.2f}  {r['verdict']}"
        for rank, r in enumerate(ranking, 1)
    ]


def run(cfg: Config, *, force: bool = False) -> StageResult:
    """The `lineage run` stage: each method's pair counts and AUC."""
    from natprints.runtime import output_changed

    with output_changed(cfg.paths.reports / "lineage.json") as changed:
        summary = run_lineage(cfg, force=force)
    lines = []
    for method, m in summary["methods"].items():
        auc = "n/a" if m["auc"] is None else f"{m['auc']:.3f}"
        lines.append(
            f"{method}: {m['comparable']} comparable pairs, AUC {auc}, "
            f"TP {m['tp']} FP {m['fp']} TN {m['tn']} FN {m['fn']}"
        )
    return StageResult(changed(), (*lines, f"wrote {cfg.paths.reports / 'lineage.csv'}"))
