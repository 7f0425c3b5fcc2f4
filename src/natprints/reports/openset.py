"""The report's sections on what an auditor decides: the open set (a saved attributor's `unknown`, the
likelihood tests, outsiders that no candidate wrote) and sequential attribution with its error bound."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from natprints.config import Config
from natprints.records import sequential_table
from natprints.reports.figures import plot_roc, plot_sequential
from natprints.reports.markdown import acc_cell, group_rows, md_table
from natprints.reports.tables import likelihood_open_set_table, open_set_table, outsiders_table, records_of
from natprints.stats import wilson_interval

FIGURES = "figures"


def open_set_section(records: Sequence[dict[str, Any]]) -> tuple[str, dict[str, float]]:
    table = open_set_table(records)
    attributors = records_of(records, "attributor")
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
            "threshold chosen on held-out calibration prompts, then measured on the test prompts. Where the "
            "run holds the corpus's held-out paragraphs, the attributor's `unknown` is its outsider test "
            "(below), not the probability threshold; known texts rejected counts the verdicts it gives.\n\n"
            + md_table(
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
            "`unknown` by its probability threshold (the outsider test is fitted for the saved attributors "
            "only), next to the share of the known models' test texts wrongly rejected.\n\n"
            + md_table(["left-out model", "its texts called unknown", "known texts rejected", "threshold"], rows)
        )
    return "\n".join(parts), facts


def likelihood_open_set_section(records: Sequence[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
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
            acc_cell(r.known_rejected, *wilson_interval(int(r.known_rejected_n), int(r.n_known))),
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
        f"entropy, scaled by its variance) beyond the two-sided alpha level. " + BACKGROUND_TEST + "Known models' "
        "pools wrongly rejected should stay near alpha (95% Wilson interval shown).\n\n"
        + md_table(
            ["condition", "test", "k", "models left out", "left-out pools called unknown", "known pools rejected"], rows
        )
    )
    return text, {"table": table}


BACKGROUND_TEST = (
    "*background*: the best known model's pooled log-likelihood ratio against the auditor's reference LM "
    "(trained on the public corpus, it wrote none of the texts), per token, below the alpha-quantile of the "
    "same ratio on bootstrap pools of that model's own texts of the calibration split and, where the likelihood "
    "stage scored them, of the training split (the ceiling learns nothing from them; 5 times the texts of the "
    "calibration split alone, whose sampling error showed as false rejections of large pools). "
    "*joint*: the background test and the two-sided analytic test on that best model alone, joined by "
    "Fisher's method: each gives a p-value (the background one from the ratios of the same bootstrap pools of "
    "the model's own texts), and the pool is called `unknown` when minus the sum of their logs exceeds the "
    "(1 − alpha)-quantile of that sum over those own pools: junk, which the background test passes, is "
    "caught by the analytic side, and human text, which is both about as likely under the reference LM and "
    "likelier under the best model than that model's own texts are, by the two together at one "
    "false-rejection rate. "
)
OUTSIDER_TARGET = (4, 0.9)  # pools of 4 human continuations: at least this share called `unknown`


def outsiders_section(cfg: Config, records: Sequence[dict[str, Any]], figures: Path) -> str:
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
            acc_cell(r.known_rejected, *wilson_interval(int(r.known_rejected_n), int(r.n_known))),
            "–" if r.auroc is None or pd.isna(r.auroc) else f"{r.auroc:.3f}",
        ]
        for r in table.itertuples()
    ]
    k_target, share = OUTSIDER_TARGET
    lines = []
    for method in ("analytic", "margin", "background", "joint", "attributor"):
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
        for (c, k), group in group_rows(records_of(records, "open_set_outsiders"), ("condition", "k"))
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
        "above); "
        + BACKGROUND_TEST
        + "*attributor*: the saved attributor's outsider test, black-box (`natprints attribute`, `--pool`): "
        "a detector of human prose against the condition's texts (character 1–4-gram TF-IDF and logistic "
        "regression, fitted on the training-split texts against the held-out paragraphs' continuations of "
        "the training prompts and up to 3,000 texts cut the same way from the corpus's training paragraphs) "
        "scores each text; a pool is `unknown` when its mean score lies outside the "
        "two-sided range, at the attributor's reject rate, of the means of bootstrap pools of as many of "
        "its best model's own calibration texts (a single text: outside the split-conformal range of those "
        "texts' scores, left by an own text with probability at most the reject rate). Known pools "
        "rejected: the condition's own test texts, pooled by "
        "model (95% Wilson interval). AUROC: how well the test's statistic separates outsider pools from "
        "known ones, whatever the threshold.\n\n"
        + "\n".join(lines)
        + "\n\n"
        + figure
        + md_table(["condition", "test", "outsider", "k", "called unknown", "known pools rejected", "AUROC"], rows)
    )


SEQUENTIAL_TARGET = ("seed", 0.01)  # the condition and error level the target names


ROLE_NAMES = {"ceiling": "the ceiling (likelihood)", "best": "the best pipeline", "baseline": "the baseline"}


def sequential_section(records: Sequence[dict[str, Any]], figures: Path) -> str:
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
            acc_cell(r.misattribution, r.misattribution_ci_low, r.misattribution_ci_high)
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
        + md_table(
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
