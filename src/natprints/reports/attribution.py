"""The attribution section of ``reports/<run>/index.md``, and its figures.

Every number comes from the records in ``reports/<run>/results.jsonl``: the ``*_table`` functions
turn records into small data frames, :mod:`natprints.reports.figures` only draws what it is given,
and :func:`render_section` puts tables, figures and a findings paragraph together.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from natprints.attribution.estimators import MLP_FEATURES, XGB_FEATURES
from natprints.attribution.grid import BASELINE
from natprints.config import CLASSIFIERS as CLASSIFIER_ORDER
from natprints.config import FEATURIZERS as FEATURIZER_ORDER
from natprints.config import NULL_CONDITION, STRING_CONDITIONS, Config
from natprints.declared import DECLARED
from natprints.records import CEILING_PIPELINE, accuracy_table, kl_table, load_records, pooled_table, sequential_table
from natprints.reports.figures import (
    plot_confusion,
    plot_evidence,
    plot_kl_heatmap,
    plot_reliability,
    plot_roc,
    plot_sequential,
)
from natprints.stats import wilson_interval

FIGURES = "figures"
SIGNIFICANCE = 0.05


# --- tables from records ------------------------------------------------------------------------


def _of(records: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == kind]


def _conditions(table: pd.DataFrame) -> list[str]:
    seen = list(dict.fromkeys(table["condition"]))
    return [c for c in seen if c != NULL_CONDITION] + ([NULL_CONDITION] if NULL_CONDITION in seen else [])


def headline_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per condition: the best pipeline and the unigram baseline, with chance and intervals."""
    table = accuracy_table(records)
    lengths = {r["condition"]: r for r in _of(records, "length_control")}
    rows = []
    for condition in _conditions(table):
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


APPROACHES = (
    ("word/char n-grams", lambda f, c: f in ("word1", "word12", "char14") and c != "nb"),
    ("BPE token n-grams", lambda f, c: f == "tok13" and c != "nb"),
    ("naive Bayes on n-grams (generative)", lambda f, c: c == "nb"),
    ("sentence embeddings (embed, union)", lambda f, c: f in ("embed", "union")),
    ("reference LMs fine-tuned per model", lambda f, c: f == "reflm" and c == "lm"),
    ("classification head on the reference LM", lambda f, c: f == "reflm" and c == "head"),
    ("reference LMs × best pipeline (product of posteriors)", lambda f, c: f == "combined" and c == "product"),
)


def approach_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per condition and black-box approach: its best pipeline, accuracy and share of the ceiling."""
    table = accuracy_table(records)
    rows = []
    for condition in _conditions(table):
        sub = table[(table["condition"] == condition) & ~table["white_box"].astype(bool)]
        for name, member in APPROACHES:
            hit = sub[[member(f, c) for f, c in zip(sub["featurizer"], sub["classifier"], strict=True)]]
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
    """Per condition and role (ceiling, best, baseline): the accuracy on the run's split and on each
    repeated split, as mean, standard deviation, minimum and maximum over all of them."""
    repeats = _of(records, "split_repeat")
    if not repeats:
        return pd.DataFrame()
    head = headline_table(records).set_index("condition")
    rows = []
    for condition in dict.fromkeys(r["condition"] for r in repeats):
        first = head.loc[condition]
        mine = [r for r in repeats if r["condition"] == condition]
        roles = (("ceiling", first["ceiling"]), ("best", first["accuracy"]), ("baseline", first["baseline"]))
        for role, value in roles:
            if math.isnan(value) or any(role not in r for r in mine):
                continue
            values = np.array([value, *(r[role]["accuracy"] for r in mine)])
            pipeline = CEILING_PIPELINE if role == "ceiling" else mine[0][role]["pipeline"]
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


def _split_section(records: Sequence[dict[str, Any]]) -> str:
    table = split_table(records)
    if table.empty:
        return ""
    n = int(table["splits"].max())
    rows = [
        [
            f"`{r.condition}`",
            r.role,
            r.pipeline,
            f"{r.first:.3f}",
            f"{r.mean:.3f} ± {r.sd:.3f}",
            f"{r.min:.3f}–{r.max:.3f}",
        ]
        for r in table.itertuples()
    ]
    return (
        f"### Over {n} prompt splits\n\nThe headline figures on the run's split and on {n - 1} more (other "
        "`split_seed`s, the same fractions): the best pipeline as chosen on the run's split and the baseline are "
        "refit on each split's training texts; the ceiling, which learns nothing, is scored on each split's test "
        "texts that the likelihood stage scored. Mean ± standard deviation over the splits, and their range: how "
        "much of a difference between conditions or pipelines one split can show by chance. The reference LMs "
        "are not repeated (each split would fine-tune them anew).\n\n"
        + _md_table(["condition", "role", "pipeline", "run's split", f"mean ± sd ({n} splits)", "range"], rows)
    )


def pooled_points(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Pooled-evidence points as evidence-curve rows: x = texts pooled, one line per (condition, role)."""
    table = pooled_table(records).rename(columns={"k": "value"})
    return table.assign(chance=[r["chance"] for r in _of(records, "pooled")] if len(table) else [])


def likelihood_open_set_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per (condition, method, k): rejection rates pooled over every left-out model."""
    rows = _of(records, "open_set_likelihood")
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
        for r in _of(records, "evidence")
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
    frame = pd.DataFrame([{c: r.get(c) for c in cols} for r in _of(records, "open_set_outsiders")], columns=cols)
    frame["outsider_rejected"] = frame["outsider_rejected_n"] / frame["n_outsider"].clip(lower=1)
    frame["known_rejected"] = frame["known_rejected_n"] / frame["n_known"].clip(lower=1)
    return frame


def open_set_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    cols = ["condition", "pipeline", "held_out_model", "unknown_rejected", "known_rejected", "threshold", "n_unknown"]
    return pd.DataFrame([{k: r[k] for k in cols} for r in _of(records, "open_set")], columns=cols)


# --- the markdown section -------------------------------------------------------------------------


def _acc(acc: float, low: float, high: float) -> str:
    return f"{acc:.3f} [{low:.3f}, {high:.3f}]"


def _p(p: float) -> str:
    if p <= 0:
        return "< 1e-300"  # below double precision
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def chance_corrected(accuracy: float, chance: float) -> float:
    """(accuracy - chance) / (1 - chance): 0 at chance, 1 when perfect; comparable across k."""
    return (accuracy - chance) / (1 - chance)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _full_table(table: pd.DataFrame) -> str:
    classifiers = [c for c in CLASSIFIER_ORDER if c in set(table["classifier"])]
    rows = []
    for condition in _conditions(table):
        sub = table[table["condition"] == condition]
        feats = [f for f in FEATURIZER_ORDER if f in set(sub["featurizer"])]
        for feat in feats:
            cells = []
            for clf in classifiers:
                hit = sub[(sub["featurizer"] == feat) & (sub["classifier"] == clf)]
                if hit.empty:
                    cells.append("–")
                    continue
                r = hit.iloc[0]
                cell = _acc(r["accuracy"], r["ci_low"], r["ci_high"])
                cells.append(f"**{cell}**" if r["best"] else cell)
            rows.append([condition, f"{sub['chance'].iloc[0]:.3f}", feat, *cells])
    return _md_table(["condition", "chance", "featurizer", *classifiers], rows)


def _null_section(table: pd.DataFrame, records: Sequence[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    null = table[(table["condition"] == NULL_CONDITION) & ~table["white_box"].astype(bool)]
    if null.empty:
        return "", {}
    labels = next(r["labels"] for r in _of(records, "split") if r["condition"] == NULL_CONDITION)
    inside = int(((null["ci_low"] <= null["chance"]) & (null["chance"] <= null["ci_high"])).sum())
    significant = int((null["p_value"] < SIGNIFICANCE).sum())
    chosen = null[null["best"].astype(bool)]
    ref = chosen.iloc[0] if len(chosen) else null.iloc[0]
    top = test_maximum(null)
    failed = not ref["ci_low"] <= ref["chance"] <= ref["ci_high"]
    facts = {"n": len(null), "inside": inside, "significant": significant, "ref": ref, "max": top, "failed": failed}
    text = (
        f"### Null control\n\n{_null_what(labels)} (`{labels[0]}` vs `{labels[1]}`), labelled as two classes, "
        "must come out at chance (0.5). "
        f"The pipeline chosen on the calibration split, {ref['pipeline']}, scores "
        f"{_acc(ref['accuracy'], ref['ci_low'], ref['ci_high'])} (p = {_p(ref['p_value'])}, {int(ref['n_test'])} "
        f"test texts): chance is {'outside' if failed else 'inside'} its interval. Across all {len(null)} "
        f"pipelines, chance lies inside the 95% interval for {inside} and {significant} reach p < {SIGNIFICANCE} "
        f"(about {SIGNIFICANCE * len(null):.1f} expected by chance alone); the highest test accuracy is "
        f"{top['pipeline']} at {top['accuracy']:.3f}, p = {_p(top['p_bonferroni'])} corrected for the "
        f"{len(null)} pipelines it was picked from.\n"
    )
    if failed:
        text += f"\n{_control_failed(ref)}\n"
    return text, facts


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


def _test_max_note(table: pd.DataFrame) -> str:
    """The highest test accuracy of each condition's grid, quoted only with its corrected p."""
    cells = []
    for condition in _conditions(table):
        grid = table[(table["condition"] == condition) & table["cal_accuracy"].notna()]
        if grid.empty:
            continue
        top = test_maximum(grid)
        cells.append(f"`{condition}` {top['pipeline']} {top['accuracy']:.3f} (p = {_p(top['p_bonferroni'])})")
    if not cells:
        return ""
    return (
        "*Highest test accuracy of the grid*, picked on the test texts and so quoted with its p corrected for "
        "the number of pipelines (Bonferroni): " + "; ".join(cells) + ".\n"
    )


def _control_failed(ref: pd.Series) -> str:
    return (
        f"**The null control failed**: its chosen pipeline ({ref['pipeline']}) tells one model's two sampling "
        f"seeds apart at {ref['accuracy']:.3f} (95% interval {ref['ci_low']:.3f}–{ref['ci_high']:.3f}, chance "
        f"{ref['chance']:.3f}). Something other than the model (the split, a leak, a selection) separates "
        "the classes, and every accuracy of this report may be inflated by as much."
    )


def _null_what(labels: Sequence[str]) -> str:
    """The run's null control is one model under two sampling seeds; a collected corpus's, one source's
    texts halved at random (labels ``source@a`` and ``source@b``)."""
    if all(label.rsplit("@", 1)[-1] in ("a", "b") for label in labels):
        return "One source's texts split at random in two, by group,"
    return "The base model sampled twice with different sampling seeds"


def _explanation_section(records: Sequence[dict[str, Any]]) -> str:
    explained = _of(records, "explanation")
    if not explained:
        return ""
    condition = "all" if any(r["condition"] == "all" for r in explained) else explained[0]["condition"]
    rows = []
    for r in (r for r in explained if r["condition"] == condition):
        grams = ", ".join(
            f"`{g['ngram']}` ({100 * g['share_model']:.0f}% vs {100 * g['share_rest']:.0f}%)" for g in r["ngrams"]
        )
        rows.append([f"`{r['model_id']}`", grams])
    return (
        f"### What sets each model apart (condition `{condition}`)\n\n"
        f"The word n-grams with the largest {explained[0]['pipeline']} weight for each model; in brackets, the "
        f"share of that model's training texts containing the n-gram vs the share of the other models' texts.\n\n"
        + _md_table(["model", "top n-grams"], rows)
    )


def _open_set_section(records: Sequence[dict[str, Any]]) -> tuple[str, dict[str, float]]:
    table = open_set_table(records)
    attributors = _of(records, "attributor")
    parts = []
    if attributors:
        rows = [
            [
                a["condition"],
                a["pipeline"],
                f"{a['temperature']:.2f}",
                f"{a['threshold']:.3f}",
                f"{a['accuracy']:.3f}",
                f"{a['known_rejected']:.3f}",
                f"{a['accepted_accuracy']:.3f}",
            ]
            for a in attributors
        ]
        parts.append(
            "### Saved attributors\n\nThe best pipeline of each condition, saved under "
            "`models/<run>/attributors/<condition>/` for `natprints attribute`; temperature and open-set "
            "threshold chosen on held-out calibration prompts, then measured on the test prompts.\n\n"
            + _md_table(
                [
                    "condition",
                    "pipeline",
                    "temperature",
                    "threshold",
                    "test accuracy",
                    "known texts rejected",
                    "accuracy when accepted",
                ],
                rows,
            )
        )
    facts: dict[str, float] = {}
    if not table.empty:
        rows = [
            [f"`{r.held_out_model}`", f"{r.unknown_rejected:.3f}", f"{r.known_rejected:.3f}", f"{r.threshold:.3f}"]
            for r in table.itertuples()
        ]
        facts = {"unknown": float(table["unknown_rejected"].mean()), "known": float(table["known_rejected"].mean())}
        parts.append(
            f"### Open set\n\nAn attributor ({table['pipeline'].iloc[0]}, condition `{table['condition'].iloc[0]}`) "
            "trained with one zoo model left out: the share of the left-out model's test texts reported as "
            "`unknown`, next to the share of the known models' test texts wrongly rejected.\n\n"
            + _md_table(["left-out model", "its texts called unknown", "known texts rejected", "threshold"], rows)
        )
    return "\n".join(parts), facts


def _findings(
    head: pd.DataFrame,
    null_facts: dict[str, Any],
    tokens: pd.DataFrame,
    open_facts: dict[str, float],
    pooled: pd.DataFrame | None = None,
    lik_facts: dict[str, Any] | None = None,
) -> str:
    real = head[head["condition"] != NULL_CONDITION]
    if real.empty:
        return ""
    above = real[real["ci_low"] > real["chance"]]
    out = []
    if real["ceiling"].notna().all():
        ceil = ", ".join(
            f"`{r.condition}` {r.ceiling:.3f} (chance {r.chance:.3f}; best pipeline {r.accuracy:.3f}, share "
            f"{_share(r.ceiling_share)})"
            for r in real.itertuples()
        )
        out.append(
            f"The text carries a strong fingerprint: the exact Bayes limit at the full continuation is {ceil}. "
            f"The best black-box pipelines capture a median {real['ceiling_share'].median():.2f} of the margin "
            "above chance that the text carries."
        )
        if pooled is not None and not pooled.empty:
            top = pooled[(pooled["role"] == "ceiling") & (pooled["condition"] != NULL_CONDITION)]
            for k in sorted(top["value"].unique()):
                at = top[top["value"] == k]
                if (at["accuracy"] >= 0.99).all():
                    out.append(
                        f"With {int(k)} texts of one source pooled, the ceiling is at least 0.99 in every condition."
                    )
                    break
    out.append(f"The best pipeline beats chance (95% interval above 1/k) in {len(above)} of {len(real)} conditions.")
    factors = real[real["condition"] != "all"]
    if len(factors) >= 2:
        ranked = factors.assign(corrected=chance_corrected(factors["accuracy"], factors["chance"]))
        ranked = ranked.sort_values("corrected", kind="stable")
        top, low = ranked.iloc[-1], ranked.iloc[0]
        out.append(
            f"Measured by chance-corrected accuracy, the training factor whose models are easiest to tell "
            f"apart is `{top['condition']}` ({top['best']}: {top['accuracy']:.3f} vs chance {top['chance']:.3f}, "
            f"corrected {top['corrected']:.3f}) and the hardest `{low['condition']}` ({low['best']}: "
            f"{low['accuracy']:.3f} vs {low['chance']:.3f}, corrected {low['corrected']:.3f})."
        )
    if "all" in set(real["condition"]):
        a = real[real["condition"] == "all"].iloc[0]
        out.append(
            f"Among all {a['n_classes']} models the best pipeline reaches {a['accuracy']:.3f}, the unigram "
            f"baseline {a['baseline']:.3f}."
        )
        curve = tokens[(tokens["condition"] == "all") & (tokens["role"] == "best")].sort_values("value")
        shown = curve[curve["value"] > 0]
        if len(shown) and (curve["value"] == 0).any():
            first, full = shown.iloc[0], curve[curve["value"] == 0].iloc[0]
            out.append(
                f"Shown only {int(first['value'])} generated tokens it reaches {first['accuracy']:.3f}, "
                f"against {full['accuracy']:.3f} with the whole continuation."
            )
    if null_facts and not null_facts["failed"]:
        ref = null_facts["ref"]
        out.append(f"The null control ({ref['pipeline']}) scores {ref['accuracy']:.3f}, chance inside its interval.")
    if null_facts and null_facts["failed"]:
        out.insert(0, _control_failed(null_facts["ref"]))
    if open_facts:
        out.append(
            f"With one model left out, {100 * open_facts['unknown']:.0f}% of its texts are rejected as unknown, "
            f"against {100 * open_facts['known']:.0f}% of known models' texts."
        )
    if lik_facts:
        table = lik_facts["table"]
        margin = table[(table["method"] == "margin") & (table["condition"] == "seed")]
        if len(margin):
            rates = "; ".join(
                f"k = {int(r.k)}: {r.unknown_rejected:.2f} of a left-out model's pools called unknown, "
                f"{r.known_rejected:.3f} of known ones rejected"
                for r in margin.itertuples()
            )
            out.append(f"The likelihood margin test in `seed` at alpha {margin['alpha'].iloc[0]:g}: {rates}.")
    return "### Findings\n\n" + " ".join(out) + "\n"


_INTRO = (
    "Can a classifier tell, from a continuation alone, which model wrote it? Per condition (models "
    "that differ in one training factor), every (featurizer, classifier) pipeline is trained on the "
    "continuations of the training prompts and scored on those of held-out prompts. Intervals are 95% "
    "Wilson intervals; p is a one-sided exact binomial test against chance = 1/k; chance-corrected "
    "accuracy is (accuracy − chance) / (1 − chance), comparable across numbers of models. Featurizers: "
    "word1 = word-unigram TF-IDF (the baseline), word12 = word 1–2-grams, char14 = character 1–4-grams, "
    "embed = frozen all-MiniLM-L6-v2 sentence embeddings, union = word12 + char14 + embed. Classifiers: "
    "logreg = logistic regression, svm = linear SVM with sigmoid-calibrated probabilities, "
    f"xgb = XGBoost on the {XGB_FEATURES} columns with the highest ANOVA F score, mlp = one hidden layer "
    f"of 64 units on the {MLP_FEATURES} highest-F columns. *Best pipeline*: the one with the highest "
    "accuracy on the calibration split (prompts held out from training and from the test), fixed before "
    "the test texts are scored, so its test accuracy and p are honest estimates; the full table marks it "
    "in bold.\n"
)
_CEILING = (
    "**The ceiling.** The zoo's texts are exact samples of known models, so each candidate model's "
    "log-likelihood of a continuation (given its prompt, under the sampling transform it was drawn "
    "with) is the exact probability that it wrote it. The likelihood attributor (`likelihood+bayes`: "
    "the argmax with equal priors) is the Bayes-optimal attributor on these texts: no classifier of the "
    "text alone can beat it. *Share of ceiling* = (accuracy − chance) / (ceiling − chance): the part of "
    "the margin above chance that the text carries which a black-box pipeline captures.\n"
)


def _as_strings(condition: str) -> bool:
    """A condition whose models read text with tokenizers of their own (scored as strings)."""
    return condition.startswith(DECLARED) or condition in STRING_CONDITIONS


_DECLARED_CEILING = (
    "For the conditions whose models have tokenizers of their own (`tokenizer`, and declared models' "
    "`declared…`), each model reads the prompt and the "
    "continuation *string* with its own tokenizer and scores the continuation's canonical tokens, "
    "without an end event (a text cut to the character budget did not end there): a string's "
    "probability sums over all its tokenizations, so where a model sampled another segmentation the "
    "score is below the exact one and the ceiling is not an upper bound on these rows. A text a model's "
    "tokenizer cannot read back (characters outside its vocabulary) scores -inf under it: that model "
    "cannot write it.\n"
)
_NO_CEILING = (
    "**No ceiling.** There are no likelihood scores of these texts (they come without the weights that "
    "wrote them, or the likelihood stage has not run), so the table has no Bayes-optimal ceiling and no "
    "share of it.\n"
)


def render_section(cfg: Config) -> str:
    """The attribution section of the run report (markdown), writing its PNGs under ``figures/``: one
    function per subsection, in the order they appear."""
    reports = cfg.paths.reports
    records = load_records(reports)
    table = accuracy_table(records)
    figures = reports / FIGURES
    head = headline_table(records)
    has_ceiling = bool(head["ceiling"].notna().any())
    null_text, null_facts = _null_section(table, records)
    evidence_text, tokens = _evidence_section(records, figures)
    pooled_text, pooled = _pooled_section(records, figures)
    open_text, open_facts = _open_set_section(records)
    lik_text, lik_facts = _likelihood_open_set_section(records)
    parts = [
        "## Attribution: natural fingerprints\n",
        _INTRO,
        _CEILING if has_ceiling else _NO_CEILING,
        _DECLARED_CEILING if has_ceiling and head["condition"].astype(str).map(_as_strings).any() else "",
        _headline_md(head, has_ceiling),
        _length_note(head),
        _test_max_note(table),
        _split_section(records),
        _approaches_section(records) if has_ceiling else "",
        _string_section(records),
        "### Every pipeline\n\nAccuracy [95% CI] on the test prompts; the best per condition in bold.\n",
        _full_table(table),
        null_text,
        _confusion_section(records, figures),
        _calibration_section(records, figures),
        evidence_text,
        _samples_section(records, figures),
        pooled_text,
        _kl_section(cfg, records),
        _explanation_section(records),
        open_text,
        lik_text,
        _outsiders_section(cfg, records, figures),
        _sequential_section(records, figures),
        _findings(head, null_facts, tokens, open_facts, pooled, lik_facts),
    ]
    return "\n".join(p for p in parts if p)


def _headline_md(head: pd.DataFrame, has_ceiling: bool) -> str:
    """The headline table: per condition the ceiling, the best pipeline, the baseline, the length control."""
    return _md_table(
        [
            "condition",
            "models",
            "test texts",
            "chance",
            *(["ceiling (likelihood) [95% CI]"] if has_ceiling else []),
            "best pipeline",
            "accuracy [95% CI]",
            *(["share of ceiling"] if has_ceiling else []),
            "chance-corrected",
            "macro-F1",
            "p",
            "unigram baseline (word1+logreg)",
            "length only [95% CI]",
        ],
        [
            [
                f"`{r.condition}`",
                r.n_classes,
                r.n_test,
                f"{r.chance:.3f}",
                *([_acc(r.ceiling, r.ceiling_ci_low, r.ceiling_ci_high)] if has_ceiling else []),
                r.best,
                _acc(r.accuracy, r.ci_low, r.ci_high),
                *([_share(r.ceiling_share)] if has_ceiling else []),
                f"{chance_corrected(r.accuracy, r.chance):.3f}",
                f"{r.macro_f1:.3f}",
                _p(r.p_value),
                "–" if math.isnan(r.baseline) else _acc(r.baseline, r.baseline_ci_low, r.baseline_ci_high),
                _length_cell(r),
            ]
            for r in head.itertuples()
        ],
    )


def _approaches_section(records: Sequence[dict[str, Any]]) -> str:
    """Each black-box approach's best pipeline per condition against the ceiling."""
    approaches = approach_table(records)
    if approaches.empty:
        return ""
    rows = [
        [
            f"`{r.condition}`",
            r.approach,
            r.pipeline,
            _acc(r.accuracy, r.ci_low, r.ci_high),
            _share(r.ceiling_share),
        ]
        for r in approaches.itertuples()
        if r.condition != NULL_CONDITION
    ]
    return (
        "### Black-box approaches against the ceiling\n\nThe best pipeline of each approach per condition "
        "(text only, no weights of the zoo): what each reached, including what did not help.\n\n"
        + _md_table(["condition", "approach", "best of it", "accuracy [95% CI]", "share of ceiling"], rows)
    )


def _confusion_section(records: Sequence[dict[str, Any]], figures: Path) -> str:
    """The ceiling's confusion matrix beside the best pipeline's saved attributor, per condition."""
    images = []
    attributors = {r["condition"]: r for r in _of(records, "attributor")}
    ceilings = {r["condition"]: r for r in _of(records, "pipeline") if r["pipeline"] == CEILING_PIPELINE}
    for r in _of(records, "pipeline"):
        if r["best"] and r["condition"] != NULL_CONDITION:
            name = f"confusion_{r['condition']}.png"
            plot_confusion(
                confusion_panels(r, ceilings.get(r["condition"]), attributors.get(r["condition"])),
                r["labels"],
                figures / name,
            )
            images.append(f"![confusion matrix, {r['condition']}]({FIGURES}/{name})")
    if not images:
        return ""
    return (
        "### Confusion matrices\n\nPer condition: the ceiling's matrix beside the best pipeline's saved "
        "attributor (calibrated, with its `unknown` column: texts whose top probability falls below the "
        "open-set threshold). Each cell: test texts, and their share of the true model's row.\n\n"
        + "\n".join(images)
        + "\n"
    )


def _calibration_section(records: Sequence[dict[str, Any]], figures: Path) -> str:
    """The saved attributors' reliability diagram and ECE."""
    attributors = {r["condition"]: r for r in _of(records, "attributor")}
    reliability = [a for a in attributors.values() if a.get("confidence")]
    if not reliability:
        return ""
    plot_reliability(
        [
            (
                f"{a['condition']}: {a['pipeline']}, ECE {expected_calibration_error(a):.3f}",
                np.asarray(a["confidence"]),
                np.asarray(a["y_true"]) == np.asarray(a["y_pred"]),
            )
            for a in reliability
        ],
        figures / "reliability.png",
    )
    return (
        "### Calibration of the saved attributors\n\nThe accuracy of the test texts in each bin of the "
        "attributor's top calibrated probability, against that probability (the diagonal is perfect "
        "calibration; bars: share of texts per bin). ECE: expected calibration error over 10 bins "
        f"(the mean |accuracy − probability|, weighted by texts).\n\n![reliability]({FIGURES}/reliability.png)\n"
    )


def _evidence_section(records: Sequence[dict[str, Any]], figures: Path) -> tuple[str, pd.DataFrame]:
    """Evidence curves against the tokens (or words) shown and the training texts; and the points."""
    parts = []
    # generated tokens for the run's own texts, words for collected ones (no tokenizer wrote them)
    unit = "tokens" if not evidence_table(records, "tokens").empty else "words"
    tokens = evidence_table(records, unit)
    train = evidence_table(records, "train_fraction")
    if not tokens.empty:
        shown = "generated tokens" if unit == "tokens" else "words"
        max_tok = max(int(tokens["value"].max()), 1)
        all_at = max_tok * 2
        plot_tokens = tokens.assign(x=tokens["value"].where(tokens["value"] > 0, all_at))
        ticks = {int(v): ("all" if v == all_at else str(int(v))) for v in sorted(plot_tokens["x"].unique())}
        plot_evidence(plot_tokens, "x", f"{shown} shown to the classifier", figures / f"evidence_{unit}.png", ticks)
        parts.append(
            f"### Evidence curves\n\nAccuracy against the number of {shown} shown (train and test "
            f"texts cut to their first N {unit}), and against the number of training texts.\n\n"
            f"![evidence: {unit}]({FIGURES}/evidence_{unit}.png)\n"
        )
        parts.append(_evidence_md(tokens, unit))
    if not train.empty:
        plot_evidence(train, "n_train", "training texts", figures / "evidence_train.png")
        parts.append(f"![evidence: training size]({FIGURES}/evidence_train.png)\n")
        parts.append(_evidence_md(train, "train_fraction"))
    return "\n".join(p for p in parts if p), tokens


def _samples_section(records: Sequence[dict[str, Any]], figures: Path) -> str:
    """Accuracy against the continuations per training prompt."""
    parts = []
    samples = evidence_table(records, "train_samples")
    if not samples.empty:
        ticks = {int(v): f"{int(v)}×" for v in sorted(samples["value"].unique())}
        plot_evidence(
            samples, "value", "continuations per training prompt (× texts)", figures / "evidence_samples.png", ticks
        )
        parts.append(
            "### More training texts\n\nAccuracy against the continuations generated per training prompt "
            "(`generate.train_samples_per_prompt`; the test texts stay one per prompt): the best pipeline and "
            "the baseline refitted on the first N continuations of each training prompt, and the reference "
            "LMs fine-tuned on them.\n\n"
            f"![evidence: training texts per prompt]({FIGURES}/evidence_samples.png)\n"
        )
        parts.append(_evidence_md(samples, "train_samples"))
    return "\n".join(p for p in parts if p)


def _pooled_section(records: Sequence[dict[str, Any]], figures: Path) -> tuple[str, pd.DataFrame]:
    """One verdict for k texts of one source; and the points."""
    parts = []
    pooled = pooled_points(records)
    if not pooled.empty:
        plot_evidence(
            pooled,
            "value",
            "texts of one source pooled into one verdict",
            figures / "pooled.png",
            {int(k): str(int(k)) for k in sorted(pooled["value"].unique())},
        )
        parts.append(
            "### Pooled evidence\n\nOne verdict for k texts of one source (test prompts only, disjoint groups "
            "per model): the sum of the per-text log-posteriors (log-likelihoods for the ceiling, the "
            "calibrated attributor's log-probabilities for the best pipeline). `pooled.csv` holds every point.\n\n"
            f"![pooled evidence]({FIGURES}/pooled.png)\n"
        )
        parts.append(_evidence_md(pooled, "pooled"))
    return "\n".join(p for p in parts if p), pooled


def _string_section(records: Sequence[dict[str, Any]]) -> str:
    """The ceiling scored on strings (canonical tokenization) against the sampled ids."""
    rows = _of(records, "string_ceiling")
    if not rows:
        return ""
    table = []
    for r in rows:
        shares = list(r["differs_by_model"].values())
        t, s = r["token"], r["string"]
        table.append(
            [
                f"`{r['condition']}`",
                f"{r['differs']:.2f} ({r['n_differs']}/{r['n_test']}; per model {min(shares):.2f}–{max(shares):.2f})",
                _acc(t["accuracy"], t["ci_low"], t["ci_high"]),
                _acc(s["accuracy"], s["ci_low"], s["ci_high"]),
                f"{t['accuracy'] - s['accuracy']:+.3f}",
                "–"
                if math.isnan(r["token_on_differing"])
                else f"{r['token_on_differing']:.3f} → {r['string_on_differing']:.3f}",
                "yes" if r["agrees"] else "**no**",
            ]
        )
    return (
        "### The ceiling on strings\n\nThe likelihood attributor above scores the token ids each text was "
        "sampled as. A scorer that has only the string (another model family, another tokenizer) scores its "
        "canonical tokenization, the text re-tokenized, which is often another path to the same string: it "
        "scores that one path, while the string's probability sums over every path. Both ceilings here leave "
        "out the end event (where a text stopped), so they can read a little below the one above. *Agrees*: "
        "the string-level ceiling inside the token-level one's 95% interval.\n\n"
        + _md_table(
            [
                "condition",
                "texts re-tokenized otherwise",
                "ceiling, sampled ids [95% CI]",
                "ceiling, canonical string [95% CI]",
                "lost",
                "on those texts: sampled → string",
                "agrees",
            ],
            table,
        )
    )


def _length_cell(row: Any) -> str:
    if math.isnan(row.length):
        return "–"
    cell = _acc(row.length, row.length_ci_low, row.length_ci_high)
    return f"**{cell} leaks**" if row.length_leaks else cell


def _length_note(head: pd.DataFrame) -> str:
    """What the length-only control says: at chance, or which conditions length gives away."""
    if head["length"].isna().all():
        return ""
    note = (
        "*Length only* is a control: logistic regression on each continuation's length alone (characters, "
        "words, and generated tokens or, for texts without them, UTF-8 bytes). "
    )
    leaks = head[head["length_leaks"]]
    if leaks.empty:
        return note + "Its interval holds chance in every condition: length does not tell the sources apart.\n"
    names = ", ".join(f"`{c}`" for c in leaks["condition"])
    return note + (
        f"**Length leaks** in {names}: its interval lies above chance, so part of what a pipeline scores there "
        "is how long the texts are, not how they are written.\n"
    )


def _kl_order(cfg: Config, labels: list[str]) -> list[str]:
    """The SeedPrints heatmap's model order where the lineage stage ran, else the condition's."""
    path = cfg.paths.reports / "lineage.json"
    if not path.is_file():
        return labels
    entries = [e["label"] for e in json.loads(path.read_text(encoding="utf-8")).get("entries", [])]
    ordered = [m for m in entries if m in labels]
    return ordered + [m for m in labels if m not in ordered]


def _pair_confusion(records: Sequence[dict[str, Any]]) -> dict[frozenset, float]:
    """From the `all` condition's best pipeline: how often a's and b's texts are taken for each other."""
    best = next((r for r in _of(records, "pipeline") if r["condition"] == "all" and r["best"]), None)
    if best is None:
        return {}
    c = np.asarray(best["confusion"], dtype=float)
    rates = c / np.maximum(c.sum(axis=1, keepdims=True), 1)
    labels = best["labels"]
    return {
        frozenset((labels[i], labels[j])): 0.5 * (rates[i, j] + rates[j, i])
        for i in range(len(labels))
        for j in range(i + 1, len(labels))
    }


def _kl_section(cfg: Config, records: Sequence[dict[str, Any]]) -> str:
    kl = kl_table(records)
    if kl.empty:
        return ""
    from scipy.stats import spearmanr

    labels = _kl_order(cfg, list(dict.fromkeys(kl["model_a"])))
    index = {m: i for i, m in enumerate(labels)}
    matrix = np.full((len(labels), len(labels)), np.nan)
    for r in kl.itertuples():
        matrix[index[r.model_a], index[r.model_b]] = r.kl_per_token
    plot_kl_heatmap(labels, matrix, cfg.paths.reports / FIGURES / "kl_heatmap.png")
    sym = {
        frozenset((labels[i], labels[j])): 0.5 * (matrix[i, j] + matrix[j, i])
        for i in range(len(labels))
        for j in range(i + 1, len(labels))
    }
    parts = [
        "### What the text fingerprint follows\n\nThe exact distance between two models' text distributions: "
        "KL(a ‖ b) per token, the mean of log p_a − log p_b over a's own test and calibration texts "
        "(`kl.csv`, with standard errors). Same model order as the SeedPrints heatmap.\n\n"
        f"![KL heatmap]({FIGURES}/kl_heatmap.png)\n"
    ]
    relations = _of(records, "kl_relation")
    if relations:
        parts.append(
            "Mean symmetrized KL by what a pair shares (95% bootstrap interval over prompts):\n\n"
            + _md_table(
                ["pair relation", "pairs", "KL per token [95% CI]"],
                [[r["relation"], r["n_pairs"], _acc(r["kl_per_token"], r["ci_low"], r["ci_high"])] for r in relations],
            )
        )
    tests = _of(records, "kl_test")
    if tests:
        parts.append(
            "One-sided permutation tests over pairs: "
            + "; ".join(
                f"{t['closer']} closer than {t['farther']} by {t['difference']:.3f} nats/token (p = {_p(t['p_value'])})"
                for t in tests
            )
            + ".\n"
        )
    facts = []
    confusion = _pair_confusion(records)
    common = [k for k in sym if k in confusion]
    if len(common) >= 3:
        rho = spearmanr([sym[k] for k in common], [confusion[k] for k in common]).statistic
        facts.append(
            "Spearman correlation of KL with the best pipeline's pairwise confusion rate: "
            f"{rho:.2f} ({len(common)} pairs)"
        )
    lineage = cfg.paths.reports / "lineage.csv"
    if lineage.is_file():
        rows = pd.read_csv(lineage)
        rows = rows[(rows["method"] == "seedprints") & rows["score"].notna()]
        z = {frozenset((a, b)): s for a, b, s in zip(rows["model_a"], rows["model_b"], rows["score"], strict=True)}
        both = [k for k in sym if k in z]
        if len(both) >= 3:
            rho = spearmanr([sym[k] for k in both], [z[k] for k in both]).statistic
            facts.append(f"with SeedPrints z over the same trained pairs: {rho:.2f} ({len(both)} pairs)")
    if facts:
        parts.append("; ".join(facts) + ".\n")
    by = {r["relation"]: r for r in relations}
    if {"same init only", "same data order only", "neither"} <= set(by):
        i, d, n = by["same init only"], by["same data order only"], by["neither"]
        additive = i["kl_per_token"] + d["kl_per_token"]
        parts.append(
            f"**In numbers:** models sharing only the init seed are at {i['kl_per_token']:.3f} nats/token, "
            f"sharing only the data order at {d['kl_per_token']:.3f}, sharing neither at {n['kl_per_token']:.3f}. "
            f"Sharing the init lowers the distance by {n['kl_per_token'] - i['kl_per_token']:.3f}, "
            f"sharing the data order by {n['kl_per_token'] - d['kl_per_token']:.3f}. A model sharing both is the same "
            f"model (distance 0), so if the two seeds' contributions added up, `neither` would sit at init-only + "
            f"data-only = {additive:.3f}; it sits at {n['kl_per_token']:.3f} "
            f"({'inside' if n['ci_low'] <= additive <= n['ci_high'] else 'outside'} its interval). "
            "The natural fingerprint follows " + _follows(i, d, n) + ".\n"
        )
    return "\n".join(parts)


def _follows(init: dict, data: dict, neither: dict) -> str:
    """Which seeds the text distance follows, from non-overlapping intervals only."""
    init_lower = init["ci_high"] < neither["ci_low"]
    data_lower = data["ci_high"] < neither["ci_low"]
    if init_lower and data_lower:
        return "both the init and the data order (each interval lies below `neither`)"
    if init_lower:
        return "the init seed (its interval lies below `neither`; the data order's does not)"
    if data_lower:
        return "the data order (its interval lies below `neither`; the init seed's does not)"
    return "neither seed clearly (every interval overlaps `neither`)"


def _share(share: float) -> str:
    return "–" if share is None or math.isnan(share) else f"{share:.2f}"


def _likelihood_open_set_section(records: Sequence[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    table = likelihood_open_set_table(records)
    if table.empty:
        return "", {}
    rows = [
        [
            f"`{r.condition}`",
            r.method,
            int(r.k),
            int(r.held_out),
            f"{r.unknown_rejected:.3f} ({int(r.unknown_rejected_n)}/{int(r.n_unknown)})",
            _acc(r.known_rejected, *wilson_interval(int(r.known_rejected_n), int(r.n_known))),
        ]
        for r in table.itertuples()
    ]
    alpha = float(table["alpha"].iloc[0])
    text = (
        "### Open set: did a known model write these texts?\n\n"
        f"Each model of a condition is left out of the library in turn; pools of k test texts of one source are "
        f"called `unknown` when the test rejects their best known model at alpha = {alpha:g}. *margin*: the "
        "pooled log-likelihood margin of that model over the best other known model, against the alpha-quantile "
        "of the same margin on bootstrap pools of the model's own calibration-split texts. *analytic*: every known "
        "model's pooled Fast-DetectGPT discrepancy z (log-likelihood centred by the model's own per-position "
        f"entropy, scaled by its variance) below the one-sided alpha level. Known models' pools wrongly rejected "
        "should stay near alpha (95% Wilson interval shown).\n\n"
        + _md_table(
            ["condition", "test", "k", "models left out", "left-out pools called unknown", "known pools rejected"], rows
        )
    )
    return text, {"table": table}


OUTSIDER_TARGET = (4, 0.9)  # pools of 4 human continuations: at least this share called `unknown`


def _outsiders_section(cfg: Config, records: Sequence[dict[str, Any]], figures: Path) -> str:
    """Every open-set test with the whole library known, against texts no model of it wrote."""
    table = outsiders_table(records)
    if table.empty:
        return ""
    alpha = cfg.likelihood.open_set_alpha
    rows = [
        [
            f"`{r.condition}`",
            r.method,
            r.source,
            int(r.k),
            f"{r.outsider_rejected:.3f} ({int(r.outsider_rejected_n)}/{int(r.n_outsider)})",
            _acc(r.known_rejected, *wilson_interval(int(r.known_rejected_n), int(r.n_known))),
            "–" if r.auroc is None or pd.isna(r.auroc) else f"{r.auroc:.3f}",
        ]
        for r in table.itertuples()
    ]
    k_target, share = OUTSIDER_TARGET
    lines = []
    for method in ("analytic", "margin", "attributor"):
        at = table[(table["method"] == method) & (table["source"] == "human") & (table["k"] == k_target)]
        if at.empty:
            continue
        met = at[at["outsider_rejected"] >= share]["condition"].tolist()
        lines.append(
            f"- *{method}*: pools of {k_target} human continuations called `unknown` in "
            f"{at['outsider_rejected'].min():.2f}–{at['outsider_rejected'].max():.2f} of cases; the target "
            f"(≥ {share:g}) is met in {len(met)} of {len(at)} conditions"
            + (f" ({', '.join(f'`{c}`' for c in met)})" if 0 < len(met) < len(at) else "")
            + "."
        )
    fpr = table[table["method"] != "attributor"]
    if not fpr.empty:
        low = [wilson_interval(int(r.known_rejected_n), int(r.n_known))[0] for r in fpr.itertuples()]
        above = sum(lo > alpha for lo in low)
        lines.append(
            "- Known models' pools wrongly called `unknown` by the likelihood tests: "
            f"{fpr['known_rejected'].min():.3f}–{fpr['known_rejected'].max():.3f}; {above} of {len(fpr)} rows "
            "have their whole 95% interval above "
            f"alpha = {alpha:g}."
        )
    panels = [
        (f"{c}, k={k}", [(f"{r['method']}, {r['source']}", r["roc_fpr"], r["roc_tpr"]) for r in group])
        for (c, k), group in _groupby(_of(records, "open_set_outsiders"), ("condition", "k"))
        if k in (1, k_target)
    ]
    figure = ""
    if panels:
        plot_roc(panels, figures / "open_set_roc.png")
        figure = f"![open set: ROC curves]({FIGURES}/open_set_roc.png)\n\n"
    return (
        "### Open set: texts none of the models wrote\n\n"
        "What an auditor meets besides the library's own models: *human*, the held-out paragraph's own "
        "continuation of each test prompt (at most as many tokens as a model wrote; its end scored as a "
        "model's EOS when the paragraph ends), and *junk*, as many tokens drawn uniformly from the "
        "vocabulary. Every model of the condition is known. *analytic*: every model's pooled discrepancy z "
        f"beyond the two-sided alpha = {alpha:g} level (too unlikely *or* too likely for that model's own "
        "texts); *margin*: the best model's pooled log-likelihood margin below its bootstrap threshold (as "
        "above); *attributor*: the saved attributor's pooled calibrated probability below its threshold "
        "(`natprints attribute --pool`). Known pools rejected: the condition's own test texts, pooled by "
        "model (95% Wilson interval). AUROC: how well the test's statistic separates outsider pools from "
        "known ones, whatever the threshold.\n\n"
        + "\n".join(lines)
        + "\n\n"
        + figure
        + _md_table(["condition", "test", "outsider", "k", "called unknown", "known pools rejected", "AUROC"], rows)
    )


SEQUENTIAL_TARGET = ("seed", 0.01)  # the condition and error level the target names


def _sequential_section(records: Sequence[dict[str, Any]], figures: Path) -> str:
    """The sequential test: texts to a verdict and the misattribution rate against its guarantee."""
    table = sequential_table(records)
    if table.empty:
        return ""
    known = table[table["case"] == "known"]
    plot_sequential(known, figures / "sequential.png")

    def texts(r: Any) -> str:
        return "–" if pd.isna(r.median_texts) else f"{r.median_texts:g} ({r.q25_texts:g}–{r.q75_texts:g})"

    rows = [
        [
            f"`{r.condition}`",
            r.pipeline + {"ceiling": " (ceiling)", "baseline": " (baseline)"}.get(r.role, ""),
            r.case,
            f"{r.error:g}",
            int(r.n_streams),
            texts(r),
            f"{int(r.named_right)} / {int(r.named_wrong)} / {int(r.unknown)} / {int(r.undecided)}",
            _acc(r.misattribution, r.misattribution_ci_low, r.misattribution_ci_high)
            + ("" if r.misattribution_ci_low <= r.error else " **above its bound**"),
        ]
        for r in table.itertuples()
    ]
    condition, error = SEQUENTIAL_TARGET
    lines = []
    for role in ("ceiling", "best"):
        at = known[(known["condition"] == condition) & (known["role"] == role) & (known["error"] == error)]
        if len(at):
            r = next(at.itertuples())
            within = "within" if r.misattribution_ci_low <= error else "**not within**"
            lines.append(
                f"- `{condition}` at error {error:g}, {ROLE_NAMES.get(role, role)}: median {texts(r)} texts to a "
                f"verdict; misattribution {r.misattribution:.3f} [{r.misattribution_ci_low:.3f}, "
                f"{r.misattribution_ci_high:.3f}], {within} its bound; {int(r.undecided)} of {int(r.n_streams)} "
                f"streams undecided after {int(r.stream_texts)} texts."
            )
    stream = int(table["stream_texts"].iloc[0])
    return (
        "### Sequential attribution: when is there enough evidence?\n\n"
        f"Texts of one source arrive one at a time (streams of {stream} test texts, in a random order). After "
        "each text the test names model i once its likelihood leads every other candidate's by a factor "
        "(K − 1) / error: by Ville's inequality the chance of *ever* naming a wrong model is at most the "
        "error, at any stopping time. The ceiling uses exact likelihoods and carries the guarantee; the best "
        "pipeline and the baseline use their probabilities as likelihood ratios (exact only as far as they are "
        "calibrated: the baseline is not calibrated at all), so for them the observed rate is the check. "
        "Beside it, the analytic open-set test (two-sided, spending error · 6 / (π² n²) at the n-th text) "
        "rejects a candidate whose texts so far do not look like its own samples: a rejected leader is not "
        "named, and a stream that rejects every candidate is `unknown` (the ceiling only: it needs each "
        "text's entropy and variance). *left-out model*: each model's streams with that model out of the library; "
        "*human*: the held-out paragraphs' own continuations; for both, naming any model is a "
        "misattribution, which the guarantee does not cover (no candidate is the truth). Verdicts: "
        "right / wrong / `unknown` / undecided. `sequential.csv` holds every row.\n\n"
        + "\n".join(lines)
        + ("\n\n" if lines else "")
        + f"![sequential attribution]({FIGURES}/sequential.png)\n\n"
        + _md_table(
            [
                "condition",
                "attributor",
                "streams of",
                "error",
                "streams",
                "texts to a verdict: median (IQR)",
                "verdicts",
                "misattribution [95% CI]",
            ],
            rows,
        )
    )


ROLE_NAMES = {"ceiling": "the ceiling (likelihood)", "best": "the best pipeline", "baseline": "the baseline"}


def _groupby(rows: Sequence[dict[str, Any]], keys: tuple[str, ...]) -> list[tuple[tuple, list[dict[str, Any]]]]:
    """Rows grouped by ``keys``, groups in order of first appearance."""
    out: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return list(out.items())


def _evidence_md(points: pd.DataFrame, axis: str) -> str:
    values = sorted(points["value"].unique(), key=lambda v: (v == 0, v))
    label = {
        "tokens": lambda v: "all" if v == 0 else f"{int(v)} tok",
        "words": lambda v: "all" if v == 0 else f"{int(v)} words",
        "train_fraction": lambda v: f"{v:g} of train",
        "train_samples": lambda v: f"{int(v)}× texts",
        "pooled": lambda v: f"k={int(v)}",
    }
    rows = []
    for (condition, pipeline, role), group in points.groupby(["condition", "pipeline", "role"], sort=False):
        by = dict(zip(group["value"], group["accuracy"], strict=True))
        rows.append(
            [
                f"`{condition}`",
                pipeline + {"baseline": " (baseline)", "ceiling": " (ceiling)"}.get(role, ""),
                *[f"{by[v]:.3f}" if v in by else "–" for v in values],
            ]
        )
    return _md_table(["condition", "pipeline", *[label[axis](v) for v in values]], rows)
