"""The lineage section of ``reports/<run>/index.md`` and its figures, rendered from the stage's records.

Nothing is computed here beyond arranging records: the numbers come from ``lineage.json`` and
``lineage.csv`` written by :func:`natprints.lineage.experiments.run_lineage`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from natprints.config import Config
from natprints.records import load_lineage
from natprints.reports.figures import METHOD_NAMES as _METHOD_NAMES
from natprints.reports.figures import plot_emergence, plot_heatmap
from natprints.stats import wilson_interval

HEATMAPS = {"seedprints": "lineage_heatmap_seedprints.png", "weights": "lineage_heatmap_weights.png"}
EMERGENCE_PNG = "lineage_emergence.png"


def write_figures(reports: Path, summary: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """Write the heatmaps and the emergence plot; return their file names (relative to ``reports``)."""
    labels = [e["label"] for e in summary["entries"]]
    alpha = summary["settings"]["alpha"]
    names = []
    for method, name in HEATMAPS.items():
        comparable = [r for r in rows if r["method"] == method and r["verdict"] != "incomparable"]
        if not comparable:  # every cell would be grey: no figure (the section says why)
            (reports / name).unlink(missing_ok=True)
            continue
        plot_heatmap(labels, rows, method, alpha, reports / name)
        names.append(name)
    if summary["emergence"]:
        plot_emergence(summary["emergence"], alpha, reports / EMERGENCE_PNG)
        names.append(EMERGENCE_PNG)
    return names


# ---------------------------------------------------------------------------------------------
# Markdown


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _check_line(check: dict[str, Any], alpha: float, threshold: float, sp_threshold: float | None) -> str:
    method = _METHOD_NAMES[check["method"]]
    n, held = check["n"], check["held"]
    related = check["expect"] == "related"
    if check["method"] == "seedprints" and check.get("rule", "analytic") == "analytic":
        rule = f"p < {alpha:g}" if related else f"p ≥ {alpha:g}"
        worst = f"{'weakest' if related else 'strongest'} log10 p {_fmt(check['worst'], 1)}"
    elif check["method"] == "seedprints":
        cut = _fmt(sp_threshold, 2)
        rule = f"z > {cut} (calibrated)" if related else f"z ≤ {cut} (calibrated)"
        worst = f"{'lowest' if related else 'highest'} z {_fmt(check['worst'], 2)}"
    else:
        rule = f"score ≥ {threshold:g}" if related else f"score < {threshold:g}"
        worst = f"{'lowest' if related else 'highest'} score {_fmt(check['worst'])}"
    mark = "held" if held == n else "**did not hold**"
    line = f"- {method}, {check['name']}: {held}/{n} pairs at {rule} ({worst}) — {mark}"
    if held < n and check["failures"]:
        more = " …" if n - held > len(check["failures"]) else ""
        line += f"; exceptions: {', '.join(check['failures'])}{more}"
    return line


def _share(num: int, den: int) -> str:
    return f"{num}/{den}" + (f" ({num / den:.0%})" if den else "")


def _unlinked_text(items: list[dict[str, Any]]) -> str:
    return "; ".join(
        f"`{u['pair']}` z = {_fmt(u['z'], 2)}, log10 p = {_fmt(u['log10_p'], 1)}, |S| = {u['kept']}/{u['k']} "
        f"(hidden {u['hidden_size']})"
        for u in items
    )


def _seedprints_lines(summary: dict[str, Any]) -> list[str]:
    """Settings, p conventions, the calibrated threshold and the counts the issue asks for."""
    block = summary.get("seedprints")
    if not block:
        return []
    settings = summary["settings"]
    alpha = settings["alpha"]
    cal, counts = block["calibration"], block["counts"]
    ks = ", ".join(f"{k} of {h}" for h, k in block["k_by_hidden_size"].items())
    out = ["### SeedPrints: settings, p and verdicts", ""]
    distinct = ", ".join(f"{d} of vocabulary {v}" for v, d in block.get("distinct_last_tokens", {}).items())
    out.append(
        f"- Inputs: N = {settings['seedprints_inputs']} sequences of {settings['seedprints_seq_len']} "
        f"{block['inputs']} (seed {settings['seedprints_seed']}"
        + (f"; distinct last tokens: {distinct}" if distinct else "")
        + f"); k = {settings['seedprints_k']} disliked dimensions per model ({ks} hidden dimensions); "
        f"softmax temperature {settings['seedprints_temperature']:g}."
    )
    out.append(
        f"- p two ways: one-sided {block['p_conventions']['one_sided']}; two-sided "
        f"{block['p_conventions']['two_sided']} (twice the one-sided p when z > 0)."
    )
    loso = cal["leave_one_seed_out"]
    if cal["threshold"] is None:
        threshold = "no calibrated threshold (the zoo has no trained/derived pair of different init seeds)"
        threshold += ": those pairs are marked `uncalibrated`"
    else:
        threshold = (
            f"z > {cal['threshold']:.2f}, the {cal['quantile']:.0%} quantile of z over {cal['pairs']} known-unrelated "
            f"pairs — {cal['pool']} — for a target FPR of {cal['target_fpr']:g} (the config's alpha). It is fit and "
            f"evaluated on the same pairs (in-sample: {_share(cal['in_sample']['false'], cal['pairs'])} above it)"
        )
        if loso["evaluated"]:
            threshold += (
                f"; leave-one-seed-out ({loso['folds']} folds, each pair held out with each of its two seeds): "
                f"{_share(loso['false'], loso['evaluated'])} above the threshold fit without them"
            )
        else:
            threshold += f"; no leave-one-seed-out estimate with {loso.get('seeds', 0)} seeds (it needs 3)"
        if cal["pairs"] * cal["target_fpr"] < 1:
            threshold += f"; with fewer than {1 / cal['target_fpr']:.0f} pairs the threshold is their largest z"
    out.append(
        f"- Verdicts: a pair with a step-0 init is linked at one-sided p < {alpha:g} (the analytic null holds "
        f"there); two trained/derived models are linked at {threshold}."
    )

    def linked(key: str, what: str) -> str:
        c = counts[key]
        line = f"- {what}: linked {_share(c['linked'], c['n'])}"
        if c.get("unlinked"):
            line += f"; not linked: {_unlinked_text(c['unlinked'])}"
        return line + "."

    def false(key: str, what: str) -> str:
        c = counts[key]
        line = f"- {what}: {_share(c['linked'], c['n'])} false links"
        if c["uncalibrated"]:
            line += f" ({c['uncalibrated']} uncalibrated)"
        return line + "."

    out += [
        "",
        linked("init_own_trained", "Init ↔ its own trained model"),
        linked("init_own_derived", "Init ↔ its own derived model"),
        linked("same_seed_with_init", "Same init seed, pairs with an init (p < alpha)"),
        linked("same_seed_trained_only", "Same init seed, trained/derived pairs (calibrated threshold)"),
        false("different_seed_with_init", f"Different init seeds, pairs with an init, at p < {alpha:g}"),
        false(
            "different_seed_trained_only",
            "Different init seeds, trained/derived pairs, at the calibrated threshold (in-sample)",
        ),
    ]
    t = counts["target"]
    out.append(_target_line(t, loso if cal["threshold"] is not None else {}))
    return [*out, ""]


def _target_line(t: dict[str, Any], loso: dict[str, Any]) -> str:
    """The SeedPrints target, judged by the out-of-sample false-positive rate where there is one: the
    in-sample rate counts pairs the threshold was fit on, so it is 0 by construction when the threshold
    is their largest z."""
    line = (
        f"- Target (init ↔ own trained and derived models linked at TPR ≥ {t['goal_tpr']:g} with FPR ≤ "
        f"{t['goal_fpr']:g}): TPR {_share(t['tp'], t['positives'])}"
    )
    if not loso.get("evaluated"):
        verdict = "met in-sample only" if t["met"] else "**not met**"
        return f"{line}, FPR {_share(t['fp'], t['negatives'])} in-sample (no held-out estimate) — {verdict}."
    fpr = loso["false"] / loso["evaluated"]
    low, high = wilson_interval(loso["false"], loso["evaluated"])
    met = t["positives"] > 0 and t["tp"] >= t["goal_tpr"] * t["positives"] and fpr <= t["goal_fpr"]
    return (
        f"{line}; **FPR leave-one-seed-out {_share(loso['false'], loso['evaluated'])}** [95% CI {low:.3f}, "
        f"{high:.3f}] on trained/derived pairs (in-sample over all different-seed pairs "
        f"{_share(t['fp'], t['negatives'])}, which counts the pairs the threshold was fit on) — "
        f"{'met' if met else '**not met**'}."
    )


def _emergence_lines(records: list[dict[str, Any]], alpha: float) -> list[str]:
    lines = []
    threshold = math.log10(alpha)
    for model in sorted({r["model"] for r in records}):
        own = sorted((r for r in records if r["model"] == model and r["own"]), key=lambda r: r["step"] or 0)
        others = [r for r in records if r["model"] == model and not r["own"]]
        if not own:
            continue
        detected = [r["step"] for r in own if r["log10_p"] < threshold]
        steps = ", ".join(f"{r['step']}: {_fmt(r['log10_p'], 1)}" for r in own)
        line = f"- `{model}`: own-init log10 p by step — {steps}"
        line += f"; detected at {len(detected)}/{len(own)} steps"
        if others:
            false = sum(r["log10_p"] < threshold for r in others)
            line += f"; other seeds' inits: {false}/{len(others)} below p = {alpha:g}"
        lines.append(line)
    return lines


def render_section(cfg: Config) -> str:
    """The markdown lineage section for ``reports/<run>/index.md`` (figures referenced relatively)."""
    summary, rows = load_lineage(cfg.paths.reports)
    drawn = write_figures(cfg.paths.reports, summary, rows)
    settings = summary["settings"]
    alpha, threshold = settings["alpha"], settings["weights_threshold"]
    entries = summary["entries"]
    kinds = {k: sum(e["kind"] == k for e in entries) for k in ("init", "trained", "derived")}
    out = [
        "## Lineage",
        "",
        f"Every pair among {len(entries)} models — {kinds['init']} step-0 inits, {kinds['trained']} trained, "
        f"{kinds['derived']} derived (continued on the shift corpus) — scored by SeedPrints "
        f"(N = {settings['seedprints_inputs']} random-token inputs of length {settings['seedprints_seq_len']}, "
        f"k = {settings['seedprints_k']}, temperature {settings['seedprints_temperature']:g}; same lineage at "
        f"one-sided p < {alpha:g} for pairs with an init, above a calibrated z threshold for two trained models) "
        f"and by the weight-std fingerprint (related at score ≥ {threshold:g}).",
        f"Ground truth — SeedPrints: {summary['ground_truth']['seedprints']}; weight-std: "
        f"{summary['ground_truth']['weights']}. Pairs of different shape are marked incomparable and left out.",
        "",
        "| method | pairs | comparable | related | AUC | AUC (excl. identical weights) | TPR @ 1% FPR "
        "| TP | FP | TN | FN |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, m in summary["methods"].items():
        out.append(
            f"| {_METHOD_NAMES[method]} | {m['pairs']} | {m['comparable']} | {m['related']} | {_fmt(m['auc'])} "
            f"| {_fmt(m['auc_nonidentical'])} | {_fmt(m['tpr_at_1pct_fpr'])} | {m['tp']} | {m['fp']} "
            f"| {m['tn']} | {m['fn']} |"
        )
    notes = ["in `lineage.csv`, `score` is SeedPrints' z statistic and weight-std's mean correlation"]
    few = [f"{m['unrelated']} ({_METHOD_NAMES[k]})" for k, m in summary["methods"].items() if 0 < m["unrelated"] < 100]
    if few:
        notes.append(f"with {' and '.join(few)} unrelated pairs, TPR at 1% FPR allows no false positive at all")
    if any(n < 3 for n in summary.get("num_layers", [])):
        notes.append(
            "with 2 layers the weight-std sequences have two points, so every per-matrix correlation is ±1: "
            "the score there says only whether each projection's std rises or falls with depth in both models"
        )
    if notes:
        out += ["", "Notes: " + "; ".join(notes) + "."]

    out += ["", *_seedprints_lines(summary)]
    sp_threshold = (summary.get("seedprints") or {}).get("calibration", {}).get("threshold")
    checks = summary["checks"]
    held = [c for c in checks if c["held"] == c["n"]]
    failed = [c for c in checks if c["held"] < c["n"]]
    out += ["### What held", ""]
    out.append(
        f"Of {len(checks)} expectations checked on this zoo, {len(held)} held for every pair and "
        f"{len(failed)} did not"
        + (
            ": " + "; ".join(f"{_METHOD_NAMES[c['method']]} {c['name']} ({c['held']}/{c['n']})" for c in failed)
            if failed
            else ""
        )
        + "."
    )
    out.append("")
    out += [_check_line(c, alpha, threshold, sp_threshold) for c in checks]
    out.append("")
    for method, name in HEATMAPS.items():
        if name in drawn:
            out += [f"![{_METHOD_NAMES[method]} heatmap]({name})", ""]
        else:
            out += [f"No {_METHOD_NAMES[method]} heatmap: no pair of models is comparable by it (shapes differ).", ""]
    out += ["### Emergence over training", ""]
    if summary["emergence"]:
        out.append(
            "SeedPrints log10 p of each `seed`-condition model's init against its checkpoints, with the "
            "other seed models' inits as controls:"
        )
        out.append("")
        out += _emergence_lines(summary["emergence"], alpha)
        out += ["", f"![SeedPrints emergence]({EMERGENCE_PNG})", ""]
    else:
        out += ["No `seed`-condition models with a saved init in this zoo; no emergence curve.", ""]
    out.append("Per-pair scores: `lineage.csv`; summary and provenance: `lineage.json`.")
    return "\n".join(out) + "\n"
