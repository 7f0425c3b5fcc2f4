"""Attribution experiments: can a classifier tell, from generated text, which zoo model wrote it?

For each condition (models differing in one training factor) and the null control, every
(featurizer, classifier) pipeline is fit on the training prompts only and scored on the test
prompts. The stage writes tidy records to ``reports/<run>/results.jsonl`` (with predictions and
confusion matrices, so every table can be recomputed), ``reports/<run>/accuracy.csv``, evidence
curves, explanations, open-set measurements, and the best pipeline per condition as an attributor
under ``models/<run>/attributors/<condition>/``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pandas as pd

from natprints.artifacts import Manifest, atomic_write_json, hash_obj
from natprints.attribution import ceiling, features
from natprints.attribution.attributor import (
    Attributor,
    save_attributor,
)
from natprints.attribution.ceiling import LikelihoodView
from natprints.attribution.estimators import THREADS, compatible, make_classifier
from natprints.attribution.evidence import evidence_records, too_few
from natprints.attribution.grid import (
    BASELINE,
    Log,
    Setup,
    attributor_record,
    calibrate,
    explanation_records,
    fit_pipeline,
    fit_predict,
    full_texts,
    length_control,
    run_grid,
    seen_texts,
    warn,
)
from natprints.attribution.whitebox import (
    OPEN_SET_MAX_HELD_OUT,
    attributor_outsiders,
    background_views,
    classifier_views,
    declared_views,
    likelihood_views,
    outsider_test,
    reference_views,
    white_box,
    without_model,
)
from natprints.conditions import (
    CALIBRATION_FRACTION,
    ConditionData,
    load_conditions,
    repeat_seeds,
    repeat_split,
    run_split,
    split_parts,
)
from natprints.config import CLASSIFIERS, NULL_CONDITION, Config
from natprints.corpus import load_tokenizer
from natprints.errors import NatprintsError
from natprints.likelihood.declared import declared_key, load_declared_scores
from natprints.likelihood.stage import likelihood_key, load_scores
from natprints.records import write_results
from natprints.reference.stage import _manifest as reference_manifest
from natprints.reference.stage import reference_key
from natprints.runtime import Job, StageResult, output_changed, run_jobs

# 2: the null control is named `null_control` in every record (pandas reads `null` as NaN).
# 3: a length-only control per condition; the string-level ceiling (canonical tokenization).
EXPERIMENTS_VERSION = 11  # bump when the records change meaning: cached results are then redone
EXPERIMENTS_MANIFEST = "experiments.json"


def _repeated_splits(
    setup: Setup, data: ConditionData, best: tuple[str, str], views: dict[str, LikelihoodView] | None
) -> list[dict[str, Any]]:
    """The headline figures on further prompt splits (seeds ``split_seed + 1``, ...): the best
    pipeline, as chosen on the run's split, and the baseline, each refit on the split's training
    texts and scored on its test texts; the ceiling on the split's test texts that the likelihood
    stage scored (the run's test and calibration texts: the ceiling learns nothing, so any of its
    texts is a test text); the reference LMs where the reference stage fine-tuned them on the split's
    training texts (``[reference] repeat_splits``)."""
    settings = setup.settings
    scored = ceiling.concat_views(views["test"], views["cal"]) if views and "cal" in views else None
    row_of = {str(sid): i for i, sid in enumerate(scored.sample_ids)} if scored is not None else {}
    labels = data.frame.set_index(data.frame["sample_id"].astype(str))["label"]
    out = []
    for seed in repeat_seeds(setup.cfg):
        parts = split_parts(data, repeat_split(data.frame["prompt_id"], setup.cfg, seed))
        train, test = parts["train"], parts["test"]
        y = test["label"].to_numpy()
        record: dict[str, Any] = {
            "kind": "split_repeat",
            "condition": data.name,
            "split_seed": seed,
            "n_train": len(train),
            "n_test": len(test),
            "chance": 1.0 / len(data.labels),
        }
        for role, (feat, clf) in (("best", best), ("baseline", BASELINE)):
            if feat not in settings.featurizers or clf not in settings.classifiers or not compatible(feat, clf):
                continue
            if too_few(clf, train["label"], len(data.labels)) or test.empty:
                continue
            predicted = fit_predict(setup, feat, clf, train, test)[1]
            record[role] = {"pipeline": f"{feat}+{clf}", "accuracy": float((predicted == y).mean())}
        rows = [row_of[sid] for sid in test["sample_id"].astype(str) if sid in row_of]
        if rows:
            truth = labels.loc[scored.sample_ids[rows].astype(str)].to_numpy()
            right = ceiling.bayes_predict(scored.loglik[rows]) == truth
            record["ceiling"] = {"accuracy": float(right.mean()), "n_test": len(rows)}
        tuned = (views or {}).get(f"ref_test#{seed}")
        if tuned is not None and len(tuned.sample_ids):
            truth = labels.loc[tuned.sample_ids.astype(str)].to_numpy()
            right = ceiling.bayes_predict(tuned.loglik) == truth
            record["reference"] = {"accuracy": float(right.mean()), "n_test": len(truth)}
        out.append(record)
    return out


def _open_set(
    setup: Setup, data: ConditionData, parts: dict[str, pd.DataFrame], best: dict[str, Any]
) -> list[dict[str, Any]]:
    """Leave one zoo model out: the share of its texts called `unknown` vs known texts rejected."""
    k = len(data.labels)
    if k < 3 or OPEN_SET_MAX_HELD_OUT <= 0:
        return []
    records = []
    for held in sorted({int(i) for i in np.linspace(0, k - 1, min(k, OPEN_SET_MAX_HELD_OUT)).round()}):
        known = [i for i in range(k) if i != held]
        train, cal = without_model(parts["train"], held), without_model(parts["cal"], held)
        pipe = fit_pipeline(setup, best["featurizer"], best["classifier"], train)
        attributor = calibrate(setup, pipe, [data.labels[i] for i in known], cal, None)
        test = parts["test"]
        best_p = attributor.predict_proba(test["text"].tolist()).max(axis=1)
        rejected = best_p < attributor.threshold
        is_held = (test["label"] == held).to_numpy()
        records.append(
            {
                "kind": "open_set",
                "condition": data.name,
                "pipeline": best["pipeline"],
                "held_out_model": data.labels[held],
                "threshold": attributor.threshold,
                "target_reject_rate": setup.settings.open_set_reject_rate,
                "n_unknown": int(is_held.sum()),
                "n_known": int((~is_held).sum()),
                "unknown_rejected": float(rejected[is_held].mean()) if is_held.any() else 0.0,
                "known_rejected": float(rejected[~is_held].mean()) if (~is_held).any() else 0.0,
            }
        )
    return records


def run_condition(
    setup: Setup, data: ConditionData, views: dict[str, LikelihoodView] | None = None
) -> tuple[list[dict[str, Any]], Attributor | None]:
    """All records of one condition, and its calibrated best pipeline (none for the null control).

    ``views``: the condition's likelihood scores of its test and cal texts (the white-box ceiling);
    without them the records are the black-box pipelines' only.
    """
    parts = split_parts(data, setup.split)
    train, cal, test = parts["train"], parts["cal"], parts["test"]
    missing = [data.labels[i] for i in range(len(data.labels)) if not (train["label"] == i).any()]
    if missing or test.empty:
        raise NatprintsError(f"condition {data.name}: too few prompts to split (no training texts of {missing})")
    records: list[dict[str, Any]] = [
        {
            "kind": "split",
            "condition": data.name,
            "labels": data.labels,
            "n_train": len(train),
            "n_cal": len(cal),
            "n_test": len(test),
            "prompts": {s: int(parts[s]["prompt_id"].nunique()) for s in parts},
            "test_sample_ids": test["sample_id"].astype(str).tolist(),
        }
    ]
    grid, fitted, cal_proba = run_grid(setup, data, parts)
    records += grid
    records.append(length_control(data, parts))
    best = next(r for r in grid if r["best"])
    key = (best["featurizer"], best["classifier"])
    test_texts = test["text"].tolist()
    black_box = (
        {"baseline": (BASELINE, np.asarray(fitted[BASELINE].predict_proba(test_texts)))} if BASELINE in fitted else {}
    )
    records += _repeated_splits(setup, data, key, views)
    if data.name == NULL_CONDITION:
        black_box["best"] = (key, np.asarray(fitted[key].predict_proba(test_texts)))
        return records + white_box(setup, data, parts, views, black_box), None
    attributor = calibrate(setup, fitted[key], data.labels, cal, cal_proba.get(key))
    attributor.seen = seen_texts({"train": train, "cal": cal})
    attributor.outsider = outsider_test(setup, data, parts)
    black_box["best"] = (key, attributor.predict_proba(test_texts))
    attributor.meta = {
        "condition": data.name,
        "featurizer": best["featurizer"],
        "classifier": best["classifier"],
        "pipeline": best["pipeline"],
        "test_accuracy": best["accuracy"],
    }
    records.append(attributor_record(data, best, attributor, test, len(cal)))
    explanations = explanation_records(setup, data, parts, fitted)
    fitted.clear()  # free the other pipelines before the refits below
    records += evidence_records(setup, data, parts, grid)
    records += explanations
    records += _open_set(setup, data, parts, best) if data.name in setup.open_set else []
    records += attributor_outsiders(setup, data, parts, attributor, black_box["best"][1])
    records += white_box(setup, data, parts, views, black_box)
    return records, attributor


def condition_keys(cfg: Config, conditions: dict[str, ConditionData]) -> dict[str, str]:
    """Each condition's key: what its records depend on (the likelihood and reference manifests are read
    once for all of them)."""
    shared = {
        "version": EXPERIMENTS_VERSION,
        "attribution": cfg.attribution.model_dump(mode="json"),
        "device": cfg.run.device,
        "calibration_fraction": CALIBRATION_FRACTION,
        "open_set_max_held_out": OPEN_SET_MAX_HELD_OUT,
        # Estimator settings live in code: their reprs make a changed setting redo the work.
        "classifiers": {c: repr(make_classifier(c, cfg.attribution.split_seed)) for c in CLASSIFIERS},
        "threads": THREADS,
        "likelihood": {"settings": cfg.likelihood.model_dump(mode="json"), "scores": likelihood_key(cfg)},
        "reference": reference_key(cfg),
    }
    if any(data.strings for data in conditions.values()):
        shared["declared_scores"] = declared_key(cfg)  # only in runs with string conditions: old keys hold
    return {
        name: hash_obj({**shared, "condition": data.name, "labels": data.labels, "inputs": data.inputs})
        for name, data in conditions.items()
    }


def _stage_key(cfg: Config, keys: dict[str, str]) -> str:
    return hash_obj({"run": cfg.run.name, "conditions": keys})


def _manifest(cfg: Config) -> Manifest:
    return Manifest(cfg.paths.reports, "experiment results", EXPERIMENTS_MANIFEST)


def experiments_up_to_date(
    cfg: Config, conditions: dict[str, ConditionData] | None = None, keys: dict[str, str] | None = None
) -> bool:
    """True when the stage's outputs exist, verify, and were made from this config and these inputs."""
    conditions = conditions if conditions is not None else load_conditions(cfg, declared=True)
    keys = keys if keys is not None else condition_keys(cfg, conditions)
    if not _manifest(cfg).is_current(_stage_key(cfg, keys)):
        return False
    return all(attributor_intact(cfg, name) for name in conditions if name != NULL_CONDITION)


def attributor_intact(cfg: Config, name: str) -> bool:
    """The condition's saved attributor exists and every file of it matches its manifest hash (a
    damaged one is rebuilt by the stage, not reported as up to date)."""
    manifest = Manifest(cfg.paths.attributors / name, f"attributor {name}")
    try:
        return manifest.exists() and not manifest.mismatched()
    except NatprintsError:
        return False


def run_experiments(cfg: Config, *, force: bool = False, progress: bool = True, log: Log = warn) -> None:
    """The `experiments` stage: every condition's pipelines, records, tables and attributors.

    Idempotent: does nothing when its outputs match the config and the generated inputs. Resumable:
    each finished condition is kept under ``models/<run>/experiments/`` and not redone.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=THREADS):
        _run_experiments(cfg, force=force, progress=progress, log=log)


def _condition_cache(cfg: Config, name: str) -> Manifest:
    """A finished condition's records, kept so that an interrupted stage does not redo it: a manifest of
    their own beside them, the same contract as every stage's output."""
    return Manifest(cfg.paths.models / "experiments", f"condition {name}'s records", f"{name}.manifest.json")


def _cached_condition(cfg: Config, name: str, key: str) -> tuple[list[dict[str, Any]], dict[str, float]] | None:
    """A finished condition's records and timings, when they were made under ``key`` and verify (and so
    does its saved attributor)."""
    cache = _condition_cache(cfg, name)
    if not cache.is_current(key) or not (name == NULL_CONDITION or attributor_intact(cfg, name)):
        return None
    saved = json.loads((cache.directory / f"{name}.json").read_text(encoding="utf-8"))
    return saved["records"], cache.read()["seconds"]


def _condition_job(
    cfg: Config,
    name: str,
    data: ConditionData,
    split: dict[str, str],
    key: str,
    views: dict[str, LikelihoodView] | None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Run one condition (in a worker process or here), save its attributor and cache its records."""
    from threadpoolctl import threadpool_limits

    # the full texts are in the cache already (_prefill_embeddings); the evidence curves' cut texts are
    # embedded here but not stored, so the cache is the same whatever order the conditions ran in
    with threadpool_limits(limits=THREADS), features.read_only_cache():
        # the run's tokenizer, the one the generator decoded continuations with (none for texts of
        # models with tokenizers of their own: their evidence curves count words)
        tokenizer = None if data.strings else load_tokenizer(cfg.paths.tokenizer)
        setup = Setup(cfg=cfg, split=split, tokenizer=tokenizer, progress=progress)
        start = time.perf_counter()
        done, attributor = run_condition(setup, data, views)
    if attributor is not None:
        # A saved attributor embeds user texts without writing them to the run's cache.
        params = attributor.pipeline.get_params(deep=True)
        attributor.pipeline.set_params(**{k: None for k in params if k.endswith("cache_dir")})
        save_attributor(
            cfg.paths.attributors / name,
            attributor,
            {
                "run": cfg.run.name,
                "condition": name,
                "config_hash": cfg.hash(),
                "condition_key": key,
                "inputs": data.inputs,
            },
        )
    wall = round(time.perf_counter() - start, 1)
    seconds = {
        "condition": wall,
        **{k.split("/", 1)[1]: v for k, v in setup.timings.items() if k.startswith(f"{name}/")},
    }
    cache = _condition_cache(cfg, name)
    cache.invalidate()
    atomic_write_json(cache.directory / f"{name}.json", {"records": done})  # the same bytes on any executor
    cache.write(key, {"condition": name, "seconds": seconds}, [f"{name}.json"])
    warn(f"condition {name}: {len(data.labels)} models, done in {wall:.1f}s")
    return done, seconds


def _embed_job(cfg: Config, label: str, texts: list[str], progress: bool = True) -> int:
    """Embed ``texts`` into the run's embedding cache (so condition workers only read it)."""
    setup = Setup(cfg=cfg, split={}, tokenizer=None, progress=progress)
    setup.featurizer("embed").fit(texts).transform(texts)
    return len(texts)


EMBED_CHUNK = 2048  # texts per embedding job of the experiments stage


def _prefill_embeddings(cfg: Config, pending: dict[str, ConditionData]) -> None:
    """Embed every full text of the pending conditions once, split over the run's workers."""
    if not {"embed", "union"} & set(cfg.attribution.featurizers):
        return
    texts = sorted({t for data in pending.values() for t in full_texts(data.frame)})
    # Fixed chunks, not one per worker: each text is embedded in the same batch whatever `workers` is.
    chunks = [texts[i : i + EMBED_CHUNK] for i in range(0, len(texts), EMBED_CHUNK)]
    names = [f"embeddings {i + 1}/{len(chunks)}" for i in range(len(chunks))]
    jobs = [Job(name, (cfg, name, chunk)) for name, chunk in zip(names, chunks, strict=True)]
    run_jobs(cfg.run.worker_count(), _embed_job, jobs, "embed")


def _run_experiments(cfg: Config, *, force: bool, progress: bool, log: Log) -> None:
    """Conditions run ``[run] workers`` at a time, largest first; records keep the condition order."""
    started = time.perf_counter()
    conditions = load_conditions(cfg, declared=True)
    keys = condition_keys(cfg, conditions)  # once: every check below reads these
    if not force and experiments_up_to_date(cfg, conditions, keys):
        log(f"experiments for run '{cfg.run.name}' are up to date")
        return
    split = run_split(cfg, conditions)
    results = {} if force else {name: _cached_condition(cfg, name, keys[name]) for name in conditions}
    pending = {name: data for name, data in conditions.items() if results.get(name) is None}
    if pending:
        _prefill_embeddings(cfg, pending)
        order = sorted(pending, key=lambda name: -len(pending[name].frame))
        scores = load_scores(cfg) if likelihood_key(cfg) is not None else None
        if scores is None:
            log("no likelihood scores (run `natprints likelihood`): the tables carry no ceiling")
        zoo = {name: data for name, data in pending.items() if not data.strings}
        views = {name: likelihood_views(cfg, zoo[name], split, scores) for name in zoo} if scores else {}
        refs = load_scores(cfg, reference_manifest(cfg)) if reference_key(cfg) is not None else None
        for name, view in reference_views(cfg, zoo, split, refs).items():
            views.setdefault(name, {}).update(view)
        for name in zoo if refs else ():
            views.setdefault(name, {}).update(background_views(zoo[name], split, views[name], refs))
        if len(zoo) < len(pending):
            if declared_key(cfg) is None:
                log("no string scores (run `natprints likelihood`): tables of own-tokenizer models carry no ceiling")
            else:
                strings = load_declared_scores(cfg)
                views.update({n: declared_views(d, split, strings) for n, d in pending.items() if d.strings})
        if refs is not None:
            for name, view in classifier_views(cfg, pending, split).items():
                views.setdefault(name, {}).update(view)
        jobs = [Job(name, (cfg, name, pending[name], split, keys[name], views.get(name))) for name in order]
        results.update(zip(order, run_jobs(cfg.run.worker_count(), _condition_job, jobs, "condition"), strict=True))
    records = [r for name in conditions for r in results[name][0]]
    seconds = {name: results[name][1] for name in conditions}
    manifest = _manifest(cfg)
    manifest.invalidate()
    files = write_results(cfg.paths.reports, records)
    fields = {
        "stage": "experiments",
        "run": cfg.run.name,
        "config_hash": cfg.hash(),
        "inputs": {f: h for d in conditions.values() for f, h in d.inputs.items()},
        "conditions": list(conditions),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "seconds": seconds,
    }
    manifest.write(_stage_key(cfg, keys), fields, files)


def run(cfg: Config, *, force: bool = False) -> StageResult:
    """The `experiments` stage: every condition's tables and attributors, and each best pipeline's line."""
    from natprints.records import accuracy_table, load_records

    with output_changed(cfg.paths.reports / "experiments.json") as changed:
        run_experiments(cfg, force=force)
    table = accuracy_table(load_records(cfg.paths.reports))
    lines = [
        f"{row.condition}: {row.pipeline} accuracy {row.accuracy:.3f} "
        f"[{row.ci_low:.3f}, {row.ci_high:.3f}], chance {row.chance:.3f}, p = {row.p_value:.2g}"
        for row in table[table["best"]].itertuples()
    ]
    return StageResult(changed(), (*lines, f"wrote {cfg.paths.reports / 'accuracy.csv'} and {cfg.paths.attributors}/"))
