"""Records to tables: every data frame a report section or ``summary.json`` shows is computed here
from the records of ``reports/<run>/results.jsonl``, never from anything else."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from natprints.attribution.grid import BASELINE
from natprints.attribution.whitebox import APPROACHES, approach
from natprints.config import NULL_CONDITION
from natprints.records import CEILING_PIPELINE, REFERENCE_PIPELINE, accuracy_table, pooled_table


def records_of(records: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == kind]


def condition_order(table: pd.DataFrame) -> list[str]:
    seen = list(dict.fromkeys(table["condition"]))
    return [c for c in seen if c != NULL_CONDITION] + ([NULL_CONDITION] if NULL_CONDITION in seen else [])


def headline_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per condition: the best pipeline and the unigram baseline, with chance and intervals."""
    table = accuracy_table(records)
    lengths = {r["condition"]: r for r in records_of(records, "length_control")}
    rows = []
    for condition in condition_order(table):
        sub = table[table["condition"] == condition]
        best = sub[sub["best"]].iloc[0]
        length = lengths.get(condition, {})
        base = sub[(sub["featurizer"] == BASELINE[0]) & (sub["classifier"] == BASELINE[1])]
        top = sub[sub["pipeline"] == CEILING_PIPELINE]
        rows.append(
            {
                "condition": condition,
                "n_classes": int(best["n_classes"]),
                "n_test": int(best["n_test"]),
                "chance": float(best["chance"]),
                "best": best["pipeline"],
                "accuracy": float(best["accuracy"]),
                "ci_low": float(best["ci_low"]),
                "ci_high": float(best["ci_high"]),
                "macro_f1": float(best["macro_f1"]),
                "p_value": float(best["p_value"]),
                "baseline": float(base["accuracy"].iloc[0]) if len(base) else math.nan,
                "baseline_ci_low": float(base["ci_low"].iloc[0]) if len(base) else math.nan,
                "baseline_ci_high": float(base["ci_high"].iloc[0]) if len(base) else math.nan,
                "ceiling": float(top["accuracy"].iloc[0]) if len(top) else math.nan,
                "ceiling_ci_low": float(top["ci_low"].iloc[0]) if len(top) else math.nan,
                "ceiling_ci_high": float(top["ci_high"].iloc[0]) if len(top) else math.nan,
                "ceiling_share": float(best["ceiling_share"]) if len(top) else math.nan,
                "baseline_share": float(base["ceiling_share"].iloc[0]) if len(top) and len(base) else math.nan,
                "length": float(length.get("accuracy", math.nan)),
                "length_ci_low": float(length.get("ci_low", math.nan)),
                "length_ci_high": float(length.get("ci_high", math.nan)),
                "length_leaks": bool(length.get("leaks", False)),
            }
        )
    return pd.DataFrame(rows)


def approach_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per condition and black-box approach: its best pipeline, accuracy and share of the ceiling."""
    table = accuracy_table(records)
    rows = []
    for condition in condition_order(table):
        sub = table[(table["condition"] == condition) & ~table["white_box"].astype(bool)]
        kinds = [approach(f, c) for f, c in zip(sub["featurizer"], sub["classifier"], strict=True)]
        for name in APPROACHES:
            hit = sub[[kind == name for kind in kinds]]
            if hit.empty:
                continue
            # chosen as the experiments stage chooses: on the calibration split, never the test texts
            # (an approach of one pipeline, such as the reference LMs, has nothing to choose)
            top = hit.sort_values("cal_accuracy", ascending=False, kind="stable", na_position="last").iloc[0]
            rows.append(
                {
                    "condition": condition,
                    "approach": name,
                    **top[
                        ["pipeline", "accuracy", "ci_low", "ci_high", "chance", "ceiling", "ceiling_share"]
                    ].to_dict(),
                }
            )
    return pd.DataFrame(rows)


def split_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per condition and role (ceiling, best, baseline, reference LMs): the accuracy on the run's split
    and on each repeated split, as mean, standard deviation, minimum and maximum over all of them."""
    repeats = records_of(records, "split_repeat")
    if not repeats:
        return pd.DataFrame()
    head = headline_table(records).set_index("condition")
    table = accuracy_table(records)
    reflm = table[table["pipeline"] == REFERENCE_PIPELINE].set_index("condition")["accuracy"]
    rows = []
    for condition in dict.fromkeys(r["condition"] for r in repeats):
        first = head.loc[condition]
        mine = [r for r in repeats if r["condition"] == condition]
        roles = (
            ("ceiling", first["ceiling"]),
            ("best", first["accuracy"]),
            ("baseline", first["baseline"]),
            ("reference", float(reflm.get(condition, math.nan))),
        )
        for role, value in roles:
            if math.isnan(value) or any(role not in r for r in mine):
                continue
            values = np.array([value, *(r[role]["accuracy"] for r in mine)])
            named = {"ceiling": CEILING_PIPELINE, "reference": REFERENCE_PIPELINE}
            pipeline = named.get(role) or mine[0][role]["pipeline"]
            rows.append(
                {
                    "condition": condition,
                    "role": role,
                    "pipeline": pipeline,
                    "splits": len(values),
                    "first": float(value),
                    "mean": float(values.mean()),
                    "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                    "min": float(values.min()),
                    "max": float(values.max()),
                    "chance": float(first["chance"]),
                }
            )
    return pd.DataFrame(rows)


def pooled_points(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Pooled-evidence points as evidence-curve rows: x = texts pooled, one line per (condition, role)."""
    table = pooled_table(records).rename(columns={"k": "value"})
    return table.assign(chance=[r["chance"] for r in records_of(records, "pooled")] if len(table) else [])


def likelihood_open_set_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per (condition, method, k): rejection rates pooled over every left-out model."""
    rows = records_of(records, "open_set_likelihood")
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    grouped = frame.groupby(["condition", "method", "k"], sort=False)
    out = grouped[["n_unknown", "unknown_rejected_n", "n_known", "known_rejected_n"]].sum().reset_index()
    out["alpha"] = grouped["alpha"].first().to_numpy()
    out["held_out"] = grouped["held_out_model"].nunique().to_numpy()
    out["unknown_rejected"] = out["unknown_rejected_n"] / out["n_unknown"].clip(lower=1)
    out["known_rejected"] = out["known_rejected_n"] / out["n_known"].clip(lower=1)
    return out


def evidence_table(records: Sequence[dict[str, Any]], axis: str) -> pd.DataFrame:
    """Evidence-curve points (``axis`` = ``tokens`` or ``train_fraction``), one row per point."""
    rows = [
        {
            k: r[k]
            for k in ("condition", "pipeline", "role", "value", "n_train", "accuracy", "ci_low", "ci_high", "chance")
        }
        for r in records_of(records, "evidence")
        if r["axis"] == axis
    ]
    cols = ["condition", "pipeline", "role", "value", "n_train", "accuracy", "ci_low", "ci_high", "chance"]
    return pd.DataFrame(rows, columns=cols)


def outsiders_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per (condition, method, source, k): outsider pools called ``unknown``, known pools rejected, AUROC."""
    cols = [
        "condition",
        "method",
        "source",
        "k",
        "n_outsider",
        "outsider_rejected_n",
        "n_known",
        "known_rejected_n",
        "auroc",
    ]
    frame = pd.DataFrame([{c: r.get(c) for c in cols} for r in records_of(records, "open_set_outsiders")], columns=cols)
    frame["outsider_rejected"] = frame["outsider_rejected_n"] / frame["n_outsider"].clip(lower=1)
    frame["known_rejected"] = frame["known_rejected_n"] / frame["n_known"].clip(lower=1)
    return frame


def open_set_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    cols = ["condition", "pipeline", "held_out_model", "unknown_rejected", "known_rejected", "threshold", "n_unknown"]
    return pd.DataFrame([{k: r[k] for k in cols} for r in records_of(records, "open_set")], columns=cols)


def chance_corrected(accuracy: float, chance: float) -> float:
    """(accuracy - chance) / (1 - chance): 0 at chance, 1 when perfect; comparable across k."""
    return (accuracy - chance) / (1 - chance)


def test_maximum(rows: pd.DataFrame) -> pd.Series:
    """The pipeline with the highest *test* accuracy among ``rows`` (one condition's grid), with its p
    corrected for having been picked from ``len(rows)`` (Bonferroni): the only honest way to quote a
    maximum taken over the test texts."""
    top = rows.sort_values("accuracy", ascending=False, kind="stable").iloc[0].copy()
    top["p_bonferroni"] = min(1.0, float(top["p_value"]) * len(rows))
    return top


def confusion_panels(
    best: dict[str, Any], ceiling: dict[str, Any] | None, attributor: dict[str, Any] | None
) -> list[tuple[str, np.ndarray, list[str]]]:
    """The panels of one condition's confusion figure: the ceiling's matrix (where there is one), then
    the saved attributor's with an ``unknown`` column (else the best pipeline's own)."""
    labels = list(best["labels"])
    panels = []
    if ceiling is not None:
        panels.append((f"ceiling, accuracy {ceiling['accuracy']:.3f}", np.asarray(ceiling["confusion"]), labels))
    if attributor is not None and attributor.get("confidence"):
        k = len(labels)
        matrix = np.zeros((k, k + 1), dtype=np.int64)
        if "unknown_rows" in attributor:  # the verdicts the attributor gave (its outsider test, where it has one)
            unknown = np.zeros(len(attributor["y_true"]), dtype=bool)
            unknown[attributor["unknown_rows"]] = True
        else:
            unknown = np.asarray(attributor["confidence"]) < attributor["threshold"]
        for t, p, u in zip(attributor["y_true"], attributor["y_pred"], unknown, strict=True):
            matrix[t, k if u else p] += 1
        title = f"{best['pipeline']} attributor, accuracy {attributor['accuracy']:.3f}"
        panels.append((title, matrix, [*labels, "unknown"]))
    else:
        panels.append((f"{best['pipeline']}, accuracy {best['accuracy']:.3f}", np.asarray(best["confusion"]), labels))
    return panels


def expected_calibration_error(attributor: dict[str, Any], bins: int = 10) -> float:
    """ECE of a saved attributor on its test texts: |accuracy − mean top probability| per bin of the
    top probability, weighted by the bin's share of texts."""
    confidence = np.asarray(attributor["confidence"], dtype=float)
    correct = np.asarray(attributor["y_true"]) == np.asarray(attributor["y_pred"])
    which = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    gaps = [
        abs(correct[which == b].mean() - confidence[which == b].mean()) * (which == b).mean()
        for b in range(bins)
        if (which == b).any()
    ]
    return float(sum(gaps))
