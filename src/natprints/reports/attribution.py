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
from natprints.config import CLASSIFIERS as CLASSIFIER_ORDER
from natprints.config import FEATURIZERS as FEATURIZER_ORDER
from natprints.config import NULL_CONDITION, STRING_CONDITIONS, Config
from natprints.declared import DECLARED
from natprints.records import CEILING_PIPELINE, accuracy_table, kl_table, load_records
from natprints.reports.figures import (
    plot_confusion,
    plot_evidence,
    plot_kl_heatmap,
    plot_reliability,
)
from natprints.reports.markdown import acc_cell, md_table, p_cell, share_cell
from natprints.reports.openset import (
    likelihood_open_set_section,
    open_set_section,
    outsiders_section,
    sequential_section,
)
from natprints.reports.tables import (
    approach_table,
    chance_corrected,
    condition_order,
    confusion_panels,
    evidence_table,
    expected_calibration_error,
    headline_table,
    pooled_points,
    records_of,
    split_table,
    test_maximum,
)

FIGURES = "figures"
SIGNIFICANCE = 0.05


# --- tables from records ------------------------------------------------------------------------


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
        "texts that the likelihood stage scored; the reference LMs are fine-tuned anew on each split's training "
        "texts (`[reference] repeat_splits`). Mean ± standard deviation over the splits, and their range: how "
        "much of a difference between conditions or pipelines one split can show by chance.\n\n"
        + md_table(["condition", "role", "pipeline", "run's split", f"mean ± sd ({n} splits)", "range"], rows)
    )


# --- the markdown section -------------------------------------------------------------------------


def _full_table(table: pd.DataFrame) -> str:
    classifiers = [c for c in CLASSIFIER_ORDER if c in set(table["classifier"])]
    rows = []
    for condition in condition_order(table):
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
                cell = acc_cell(r["accuracy"], r["ci_low"], r["ci_high"])
                cells.append(f"**{cell}**" if r["best"] else cell)
            rows.append([condition, f"{sub['chance'].iloc[0]:.3f}", feat, *cells])
    return md_table(["condition", "chance", "featurizer", *classifiers], rows)


def _null_section(table: pd.DataFrame, records: Sequence[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    null = table[(table["condition"] == NULL_CONDITION) & ~table["white_box"].astype(bool)]
    if null.empty:
        return "", {}
    labels = next(r["labels"] for r in records_of(records, "split") if r["condition"] == NULL_CONDITION)
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
        f"{acc_cell(ref['accuracy'], ref['ci_low'], ref['ci_high'])} (p = {p_cell(ref['p_value'])}, "
        f"{int(ref['n_test'])} test texts): chance is {'outside' if failed else 'inside'} its interval. "
        f"Across all {len(null)} pipelines, chance lies inside the 95% interval for {inside} and "
        f"{significant} reach p < {SIGNIFICANCE} (about {SIGNIFICANCE * len(null):.1f} expected by chance "
        f"alone); the highest test accuracy is {top['pipeline']} at {top['accuracy']:.3f}, "
        f"p = {p_cell(top['p_bonferroni'])} corrected for the {len(null)} pipelines it was picked from.\n"
    )
    if failed:
        text += f"\n{_control_failed(ref)}\n"
    return text, facts


def _test_max_note(table: pd.DataFrame) -> str:
    """The highest test accuracy of each condition's grid, quoted only with its corrected p."""
    cells = []
    for condition in condition_order(table):
        grid = table[(table["condition"] == condition) & table["cal_accuracy"].notna()]
        if grid.empty:
            continue
        top = test_maximum(grid)
        cells.append(f"`{condition}` {top['pipeline']} {top['accuracy']:.3f} (p = {p_cell(top['p_bonferroni'])})")
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
    explained = records_of(records, "explanation")
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
        + md_table(["model", "top n-grams"], rows)
    )


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
            f"{share_cell(r.ceiling_share)})"
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
    open_text, open_facts = open_set_section(records)
    lik_text, lik_facts = likelihood_open_set_section(records)
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
        _segmented_section(records),
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
        outsiders_section(cfg, records, figures),
        sequential_section(records, figures),
        _findings(head, null_facts, tokens, open_facts, pooled, lik_facts),
    ]
    return "\n".join(p for p in parts if p)


def _headline_md(head: pd.DataFrame, has_ceiling: bool) -> str:
    """The headline table: per condition the ceiling, the best pipeline, the baseline, the length control."""
    return md_table(
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
                *([acc_cell(r.ceiling, r.ceiling_ci_low, r.ceiling_ci_high)] if has_ceiling else []),
                r.best,
                acc_cell(r.accuracy, r.ci_low, r.ci_high),
                *([share_cell(r.ceiling_share)] if has_ceiling else []),
                f"{chance_corrected(r.accuracy, r.chance):.3f}",
                f"{r.macro_f1:.3f}",
                p_cell(r.p_value),
                "–" if math.isnan(r.baseline) else acc_cell(r.baseline, r.baseline_ci_low, r.baseline_ci_high),
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
            acc_cell(r.accuracy, r.ci_low, r.ci_high),
            share_cell(r.ceiling_share),
        ]
        for r in approaches.itertuples()
        if r.condition != NULL_CONDITION
    ]
    return (
        "### Black-box approaches against the ceiling\n\nThe best pipeline of each approach per condition "
        "(text only, no weights of the zoo): what each reached, including what did not help.\n\n"
        + md_table(["condition", "approach", "best of it", "accuracy [95% CI]", "share of ceiling"], rows)
    )


def _confusion_section(records: Sequence[dict[str, Any]], figures: Path) -> str:
    """The ceiling's confusion matrix beside the best pipeline's saved attributor, per condition."""
    images = []
    attributors = {r["condition"]: r for r in records_of(records, "attributor")}
    ceilings = {r["condition"]: r for r in records_of(records, "pipeline") if r["pipeline"] == CEILING_PIPELINE}
    for r in records_of(records, "pipeline"):
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
    attributors = {r["condition"]: r for r in records_of(records, "attributor")}
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
    """The ceiling scored on strings (canonical tokenization, and summed over the most probable
    segmentations where the run searched them) against the sampled ids."""
    rows = records_of(records, "string_ceiling")
    if not rows:
        return ""
    searched = any("segmented" in r for r in rows)
    table = []
    for r in rows:
        shares = list(r["differs_by_model"].values())
        t, s = r["token"], r["string"]
        on_those = [r["token_on_differing"], r["string_on_differing"]]
        cells = [
            f"`{r['condition']}`",
            f"{r['differs']:.2f} ({r['n_differs']}/{r['n_test']}; per model {min(shares):.2f}–{max(shares):.2f})",
            acc_cell(t["accuracy"], t["ci_low"], t["ci_high"]),
            acc_cell(s["accuracy"], s["ci_low"], s["ci_high"]),
            f"{t['accuracy'] - s['accuracy']:+.3f}",
        ]
        agrees = r["agrees"]
        if searched:
            g = r.get("segmented")
            if g is None:
                cells += ["–", "–", "–"]
            else:
                on_those.append(r["segmented_on_differing"])
                agrees = r["agrees_segmented"]
                cells += [
                    acc_cell(g["accuracy"], g["ci_low"], g["ci_high"]),
                    f"{t['accuracy'] - g['accuracy']:+.3f}",
                    f"{r['true_gap_canonical']:.2f} → {r['true_gap_segmented']:.2f}",
                ]
        cells.append("–" if math.isnan(on_those[0]) else " → ".join(f"{v:.3f}" for v in on_those))
        cells.append("yes" if agrees else "**no**")
        table.append(cells)
    header = [
        "condition",
        "texts re-tokenized otherwise",
        "ceiling, sampled ids [95% CI]",
        "ceiling, canonical string [95% CI]",
        "lost",
    ]
    if searched:
        header += ["ceiling, string over segmentations [95% CI]", "lost", "true model's shortfall, nats"]
    header += ["on those texts: sampled → " + ("canonical → segmentations" if searched else "string"), "agrees"]
    search = (
        " *Over segmentations*: each text's probability summed over its most probable token paths "
        "(`[likelihood] segmentation_beam`, `natprints.likelihood.segmentations`): a lower bound on the "
        "string's probability, never below the canonical path's. *True model's shortfall*: the mean nats by "
        "which its score of its own text falls below the sampled path's, canonical → over segmentations (below "
        "0: the paths summed exceed the sampled one, as a string's probability may). A "
        "string scorer cannot see which path a model sampled, so the sampled-id ceiling is an upper reference, "
        "not a target."
        if searched
        else ""
    )
    return (
        "### The ceiling on strings\n\nThe likelihood attributor above scores the token ids each text was "
        "sampled as. A scorer that has only the string (another model family, another tokenizer) scores its "
        "canonical tokenization, the text re-tokenized, which is often another path to the same string: it "
        "scores that one path, while the string's probability sums over every path. All ceilings here leave "
        "out the end event (where a text stopped), so they can read a little below the one above. *Agrees*: "
        "the best string-level ceiling inside the token-level one's 95% interval."
        + search
        + "\n\n"
        + md_table(header, table)
    )


def _segmented_section(records: Sequence[dict[str, Any]]) -> str:
    """The ceiling of conditions whose models read text with tokenizers of their own, canonical tokens
    against the sum over segmentations (its headline above)."""
    rows = records_of(records, "segmented_ceiling")
    if not rows:
        return ""
    table = []
    for r in rows:
        c, g = r["canonical"], r["segmented"]
        gains = list(r["gain_by_model"].values())
        table.append(
            [
                f"`{r['condition']}`",
                str(r["n_test"]),
                acc_cell(c["accuracy"], c["ci_low"], c["ci_high"]),
                acc_cell(g["accuracy"], g["ci_low"], g["ci_high"]),
                f"{g['accuracy'] - c['accuracy']:+.3f}",
                f"{r['true_gain']:.2f} (per model {min(gains):.2f}–{max(gains):.2f})",
            ]
        )
    header = [
        "condition",
        "test texts",
        "ceiling, canonical tokens [95% CI]",
        "ceiling, over segmentations [95% CI]",
        "gained",
        "true model's score raised, nats",
    ]
    return (
        "### The ceiling across tokenizers\n\nIn conditions whose models read text with tokenizers of their "
        "own, every text is a string to every model: each scores it as a string over its most probable "
        "segmentations into its own tokens (the ceiling in the tables above), here beside the canonical "
        "tokens alone. *Score raised*: the mean nats by which the search raised each true model's score of "
        "its own texts.\n\n" + md_table(header, table)
    )


def _length_cell(row: Any) -> str:
    if math.isnan(row.length):
        return "–"
    cell = acc_cell(row.length, row.length_ci_low, row.length_ci_high)
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
    best = next((r for r in records_of(records, "pipeline") if r["condition"] == "all" and r["best"]), None)
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
    relations = records_of(records, "kl_relation")
    if relations:
        parts.append(
            "Mean symmetrized KL by what a pair shares (95% bootstrap interval over prompts):\n\n"
            + md_table(
                ["pair relation", "pairs", "KL per token [95% CI]"],
                [
                    [r["relation"], r["n_pairs"], acc_cell(r["kl_per_token"], r["ci_low"], r["ci_high"])]
                    for r in relations
                ],
            )
        )
    tests = records_of(records, "kl_test")
    if tests:
        parts.append(
            "One-sided permutation tests over pairs: "
            + "; ".join(
                f"{t['closer']} closer than {t['farther']} by {t['difference']:.3f} nats/token "
                f"(p = {p_cell(t['p_value'])})"
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
    return md_table(["condition", "pipeline", *[label[axis](v) for v in values]], rows)
