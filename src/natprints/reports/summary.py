"""``reports/<run>/summary.json``: the headline numbers per condition, for scripts and for comparing runs.

Everything here is read from the records the tables are rendered from (``results.jsonl``,
``lineage.json``), so the file and ``index.md`` cannot disagree. Accuracies come with their 95%
Wilson interval as ``[low, high]``; a figure that does not exist for a run (no ceiling for collected
texts, no lineage without models) is absent rather than null.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from natprints.artifacts import atomic_write_json, git_revision
from natprints.config import NULL_CONDITION, Config
from natprints.records import (
    CEILING_PIPELINE,
    LINEAGE_JSON,
    REFERENCE,
    RESULTS_FILE,
    accuracy_table,
    load_records,
    sequential_table,
)
from natprints.reports.tables import (
    expected_calibration_error,
    headline_table,
    likelihood_open_set_table,
    open_set_table,
    outsiders_table,
    split_table,
    test_maximum,
)

SUMMARY_FILE = "summary.json"
SUMMARY_VERSION = 1


def _figure(row: Any) -> dict[str, Any]:
    return {"accuracy": float(row["accuracy"]), "ci": [float(row["ci_low"]), float(row["ci_high"])]}


def _finite(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def condition_summaries(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per condition: chance, the ceiling, the selected pipeline, the grid's test maximum (with its
    corrected p), the baseline, the reference LMs, the length control and the open-set figures."""
    table = accuracy_table(records)
    head = headline_table(records)
    open_set = open_set_table(records)
    lik_open = likelihood_open_set_table(records)
    outsiders = outsiders_table(records)
    sequential = sequential_table(records)
    splits = split_table(records)
    attributors = {r["condition"]: r for r in records if r.get("kind") == "attributor"}
    out: dict[str, dict[str, Any]] = {}
    for r in head.to_dict("records"):
        name = r["condition"]
        sub = table[table["condition"] == name]
        chosen = sub[sub["best"].astype(bool)].iloc[0]
        grid = sub[sub["cal_accuracy"].notna()]
        entry: dict[str, Any] = {
            "models": int(r["n_classes"]),
            "test_texts": int(r["n_test"]),
            "chance": float(r["chance"]),
            "best": {
                "pipeline": str(chosen["pipeline"]),
                "selected_on": "calibration split" if pd.notna(chosen["cal_accuracy"]) else "fixed in advance",
                "calibration_accuracy": _finite(chosen["cal_accuracy"]),
                **_figure(chosen),
                "p": float(chosen["p_value"]),
                "share_of_ceiling": _finite(chosen["ceiling_share"]),
            },
            "length_control": {
                "accuracy": float(r["length"]),
                "ci": [float(r["length_ci_low"]), float(r["length_ci_high"])],
                "leaks": bool(r["length_leaks"]),
            },
        }
        if not math.isnan(r["ceiling"]):
            entry["ceiling"] = {"accuracy": float(r["ceiling"]), "ci": [r["ceiling_ci_low"], r["ceiling_ci_high"]]}
        if len(grid):
            top = test_maximum(grid)
            entry["test_maximum"] = {
                "pipeline": str(top["pipeline"]),
                **_figure(top),
                "pipelines": len(grid),
                "p_bonferroni": float(top["p_bonferroni"]),
            }
        for key, (feat, clf) in (("baseline", ("word1", "logreg")), ("reference_lms", REFERENCE)):
            hit = sub[(sub["featurizer"] == feat) & (sub["classifier"] == clf)]
            if len(hit):
                entry[key] = {**_figure(hit.iloc[0]), "share_of_ceiling": _finite(hit.iloc[0]["ceiling_share"])}
        if name == NULL_CONDITION:
            inside = chosen["ci_low"] <= chosen["chance"] <= chosen["ci_high"]
            entry["verdict"] = "at chance" if inside else "failed"
        saved = attributors.get(name)
        if saved is not None and saved.get("confidence"):
            entry["attributor"] = {
                "pipeline": saved["pipeline"],
                "temperature": float(saved["temperature"]),
                "threshold": float(saved["threshold"]),
                "known_rejected": float(saved["known_rejected"]),
                "expected_calibration_error": expected_calibration_error(saved),
            }
        held = open_set[open_set["condition"] == name]
        if len(held):
            entry["open_set_attributor"] = {
                "unknown_rejected": float(held["unknown_rejected"].mean()),
                "known_rejected": float(held["known_rejected"].mean()),
                "held_out_models": len(held),
            }
        lik = lik_open[lik_open["condition"] == name] if len(lik_open) else lik_open
        if len(lik):
            entry["open_set_likelihood"] = [
                {
                    "method": str(row["method"]),
                    "k": int(row["k"]),
                    "alpha": float(row["alpha"]),
                    "unknown_rejected": float(row["unknown_rejected"]),
                    "known_rejected": float(row["known_rejected"]),
                }
                for row in lik.to_dict("records")
            ]
        strangers = outsiders[outsiders["condition"] == name]
        if len(strangers):
            entry["open_set_outsiders"] = [
                {
                    "method": str(row["method"]),
                    "source": str(row["source"]),
                    "k": int(row["k"]),
                    "called_unknown": float(row["outsider_rejected"]),
                    "known_rejected": float(row["known_rejected"]),
                    "auroc": _finite(row["auroc"]),
                }
                for row in strangers.to_dict("records")
            ]
        streams = sequential[sequential["condition"] == name]
        if len(streams):
            entry["sequential"] = [
                {
                    "role": str(row["role"]),
                    "case": str(row["case"]),
                    "error": float(row["error"]),
                    "streams": int(row["n_streams"]),
                    "median_texts": _finite(row["median_texts"]),
                    "misattribution": float(row["misattribution"]),
                    "misattribution_ci": [float(row["misattribution_ci_low"]), float(row["misattribution_ci_high"])],
                    "undecided": int(row["undecided"]),
                }
                for row in streams.to_dict("records")
            ]
        spread = splits[splits["condition"] == name] if len(splits) else splits
        if len(spread):
            entry["splits"] = {
                str(row["role"]): {k: row[k] for k in ("pipeline", "splits", "mean", "sd", "min", "max")}
                for row in spread.to_dict("records")
            }
        out[name] = entry
    return out


def lineage_summary(reports: Path) -> dict[str, Any]:
    """AUC and error counts per lineage method; SeedPrints' false-positive rate held out by seed."""
    import json

    path = reports / LINEAGE_JSON
    if not path.is_file():
        return {}
    summary = json.loads(path.read_text(encoding="utf-8"))
    out: dict[str, Any] = {}
    for method, m in summary.get("methods", {}).items():
        out[method] = {k: m[k] for k in ("auc", "auc_nonidentical", "tp", "fp", "tn", "fn", "tpr_at_1pct_fpr")}
    loso = summary.get("seedprints", {}).get("calibration", {}).get("leave_one_seed_out", {})
    if "seedprints" in out and loso.get("evaluated"):
        out["seedprints"]["fpr_leave_one_seed_out"] = loso["false"] / loso["evaluated"]
        out["seedprints"]["leave_one_seed_out_pairs"] = loso["evaluated"]
    return out


def write_summary(cfg: Config) -> Path | None:
    """Write ``summary.json`` beside ``index.md``; nothing when the run has no attribution results."""
    reports = cfg.paths.reports
    if not (reports / RESULTS_FILE).is_file():
        return None
    records = load_records(reports)
    summary: dict[str, Any] = {
        "version": SUMMARY_VERSION,
        "run": cfg.run.name,
        "config_hash": cfg.hash(),
        "git_revision": git_revision(),
        "ceiling_pipeline": CEILING_PIPELINE,
        "selection": "each condition's best pipeline has the highest accuracy on the calibration split; "
        "test_maximum is the highest test accuracy, with its p corrected for the pipelines it was picked from",
        "conditions": condition_summaries(records),
    }
    lineage = lineage_summary(reports)
    if lineage:
        summary["lineage"] = lineage
    path = reports / SUMMARY_FILE
    atomic_write_json(path, summary)
    return path
