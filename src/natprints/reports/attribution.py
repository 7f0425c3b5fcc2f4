"""The attribution section of ``reports/<run>/index.md``, and its figures.

Every number comes from the records in ``reports/<run>/results.jsonl``: the ``*_table`` functions
turn records into small data frames, :mod:`natprints.reports.figures` only draws what it is given,
and :func:`render_section` puts tables, figures and a findings paragraph together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from natprints.attribution.estimators import MLP_FEATURES, XGB_FEATURES
from natprints.attribution.experiments import BASELINE
from natprints.config import CLASSIFIERS as CLASSIFIER_ORDER
from natprints.config import FEATURIZERS as FEATURIZER_ORDER
from natprints.config import NULL_CONDITION, Config
from natprints.records import accuracy_table, load_records
from natprints.reports.figures import plot_confusion, plot_evidence

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
    rows = []
    for condition in _conditions(table):
        sub = table[table["condition"] == condition]
        best = sub[sub["best"]].iloc[0]
        base = sub[(sub["featurizer"] == BASELINE[0]) & (sub["classifier"] == BASELINE[1])]
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
            }
        )
    return pd.DataFrame(rows)


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


def open_set_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    cols = ["condition", "pipeline", "held_out_model", "unknown_rejected", "known_rejected", "threshold", "n_unknown"]
    return pd.DataFrame([{k: r[k] for k in cols} for r in _of(records, "open_set")], columns=cols)


# --- figures (drawing only) -----------------------------------------------------------------------


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
    null = table[table["condition"] == NULL_CONDITION]
    if null.empty:
        return "", {}
    labels = next(r["labels"] for r in _of(records, "split") if r["condition"] == NULL_CONDITION)
    inside = int(((null["ci_low"] <= null["chance"]) & (null["chance"] <= null["ci_high"])).sum())
    significant = int((null["p_value"] < SIGNIFICANCE).sum())
    base = null[(null["featurizer"] == BASELINE[0]) & (null["classifier"] == BASELINE[1])]
    ref = base.iloc[0] if len(base) else null.iloc[0]
    facts = {
        "n": len(null),
        "inside": inside,
        "significant": significant,
        "ref": ref,
        "max": null.sort_values("accuracy").iloc[-1],
    }
    text = (
        f"### Null control\n\nThe base model sampled twice with different sampling seeds "
        f"(`{labels[0]}` vs `{labels[1]}`), labelled as two classes, must come out at chance (0.5). "
        f"The {ref['pipeline']} pipeline scores {_acc(ref['accuracy'], ref['ci_low'], ref['ci_high'])} "
        f"(p = {_p(ref['p_value'])}, {int(ref['n_test'])} test texts). Across all {len(null)} pipelines, chance "
        f"lies inside the 95% interval for {inside} and {significant} reach p < {SIGNIFICANCE} "
        f"(about {SIGNIFICANCE * len(null):.1f} expected by chance alone); the highest is "
        f"{facts['max']['pipeline']} at {facts['max']['accuracy']:.3f}.\n"
    )
    return text, facts


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
    head: pd.DataFrame, null_facts: dict[str, Any], tokens: pd.DataFrame, open_facts: dict[str, float]
) -> str:
    real = head[head["condition"] != NULL_CONDITION]
    if real.empty:
        return ""
    above = real[real["ci_low"] > real["chance"]]
    out = [f"The best pipeline beats chance (95% interval above 1/k) in {len(above)} of {len(real)} conditions."]
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
    if null_facts:
        ref = null_facts["ref"]
        verdict = "inside" if ref["ci_low"] <= ref["chance"] <= ref["ci_high"] else "outside"
        out.append(f"The null control ({ref['pipeline']}) scores {ref['accuracy']:.3f}, chance {verdict} its interval.")
    if open_facts:
        out.append(
            f"With one model left out, {100 * open_facts['unknown']:.0f}% of its texts are rejected as unknown, "
            f"against {100 * open_facts['known']:.0f}% of known models' texts."
        )
    return "### Findings\n\n" + " ".join(out) + "\n"


def render_section(cfg: Config) -> str:
    """The attribution section of the run report (markdown), writing its PNGs under ``figures/``."""
    reports = cfg.paths.reports
    records = load_records(reports)
    table = accuracy_table(records)
    figures = reports / FIGURES
    head = headline_table(records)
    parts = ["## Attribution: natural fingerprints\n"]
    parts.append(
        "Can a classifier tell, from a continuation alone, which model wrote it? Per condition (models "
        "that differ in one training factor), every (featurizer, classifier) pipeline is trained on the "
        "continuations of the training prompts and scored on those of held-out prompts. Intervals are 95% "
        "Wilson intervals; p is a one-sided exact binomial test against chance = 1/k; chance-corrected "
        "accuracy is (accuracy − chance) / (1 − chance), comparable across numbers of models. Featurizers: "
        "word1 = word-unigram TF-IDF (the baseline), word12 = word 1–2-grams, char14 = character 1–4-grams, "
        "embed = frozen all-MiniLM-L6-v2 sentence embeddings, union = word12 + char14 + embed. Classifiers: "
        "logreg = logistic regression, svm = linear SVM with sigmoid-calibrated probabilities, "
        f"xgb = XGBoost on the {XGB_FEATURES} columns with the highest ANOVA F score, mlp = one hidden layer "
        f"of 64 units on the {MLP_FEATURES} highest-F columns.\n"
    )
    parts.append(
        _md_table(
            [
                "condition",
                "models",
                "test texts",
                "chance",
                "best pipeline",
                "accuracy [95% CI]",
                "chance-corrected",
                "macro-F1",
                "p",
                "unigram baseline (word1+logreg)",
            ],
            [
                [
                    f"`{r.condition}`",
                    r.n_classes,
                    r.n_test,
                    f"{r.chance:.3f}",
                    r.best,
                    _acc(r.accuracy, r.ci_low, r.ci_high),
                    f"{chance_corrected(r.accuracy, r.chance):.3f}",
                    f"{r.macro_f1:.3f}",
                    _p(r.p_value),
                    "–" if math.isnan(r.baseline) else _acc(r.baseline, r.baseline_ci_low, r.baseline_ci_high),
                ]
                for r in head.itertuples()
            ],
        )
    )
    parts.append("### Every pipeline\n\nAccuracy [95% CI] on the test prompts; the best per condition in bold.\n")
    parts.append(_full_table(table))
    null_text, null_facts = _null_section(table, records)
    if null_text:
        parts.append(null_text)

    images = []
    for r in _of(records, "pipeline"):
        if r["best"] and r["condition"] != NULL_CONDITION:
            name = f"confusion_{r['condition']}.png"
            title = f"{r['condition']}: {r['pipeline']}, accuracy {r['accuracy']:.3f}"
            plot_confusion(np.asarray(r["confusion"]), r["labels"], title, figures / name)
            images.append(f"![confusion matrix, {r['condition']}]({FIGURES}/{name})")
    if images:
        parts.append("### Confusion matrices (best pipeline per condition)\n\n" + "\n".join(images) + "\n")

    tokens = evidence_table(records, "tokens")
    train = evidence_table(records, "train_fraction")
    if not tokens.empty:
        max_tok = max(int(tokens["value"].max()), 1)
        all_at = max_tok * 2
        plot_tokens = tokens.assign(x=tokens["value"].where(tokens["value"] > 0, all_at))
        ticks = {int(v): ("all" if v == all_at else str(int(v))) for v in sorted(plot_tokens["x"].unique())}
        plot_evidence(
            plot_tokens, "x", "generated tokens shown to the classifier", figures / "evidence_tokens.png", ticks
        )
        parts.append(
            "### Evidence curves\n\nAccuracy against the number of generated tokens shown (train and test "
            "texts cut to their first N tokens), and against the number of training texts.\n\n"
            f"![evidence: tokens]({FIGURES}/evidence_tokens.png)\n"
        )
        parts.append(_evidence_md(tokens, "tokens"))
    if not train.empty:
        plot_evidence(train, "n_train", "training texts", figures / "evidence_train.png")
        parts.append(f"![evidence: training size]({FIGURES}/evidence_train.png)\n")
        parts.append(_evidence_md(train, "train_fraction"))
    explain = _explanation_section(records)
    if explain:
        parts.append(explain)
    open_text, open_facts = _open_set_section(records)
    if open_text:
        parts.append(open_text)
    parts.append(_findings(head, null_facts, tokens, open_facts))
    return "\n".join(p for p in parts if p)


def _evidence_md(points: pd.DataFrame, axis: str) -> str:
    values = sorted(points["value"].unique(), key=lambda v: (v == 0, v))
    label = {"tokens": lambda v: "all" if v == 0 else f"{int(v)} tok", "train_fraction": lambda v: f"{v:g} of train"}
    rows = []
    for (condition, pipeline, role), group in points.groupby(["condition", "pipeline", "role"], sort=False):
        by = dict(zip(group["value"], group["accuracy"], strict=True))
        rows.append(
            [
                f"`{condition}`",
                pipeline + (" (baseline)" if role == "baseline" else ""),
                *[f"{by[v]:.3f}" if v in by else "–" for v in values],
            ]
        )
    return _md_table(["condition", "pipeline", *[label[axis](v) for v in values]], rows)
