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

HEATMAPS = {"seedprints": "lineage_heatmap_seedprints.png", "weights": "lineage_heatmap_weights.png"}
EMERGENCE_PNG = "lineage_emergence.png"


def write_figures(reports: Path, summary: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """Write the heatmaps and the emergence plot; return their file names (relative to ``reports``)."""
    labels = [e["label"] for e in summary["entries"]]
    alpha = summary["settings"]["alpha"]
    names = []
    for method, name in HEATMAPS.items():
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


def _check_line(check: dict[str, Any], alpha: float, threshold: float) -> str:
    method = _METHOD_NAMES[check["method"]]
    n, held = check["n"], check["held"]
    if check["method"] == "seedprints":
        rule = f"p < {alpha:g}" if check["expect"] == "related" else f"p ≥ {alpha:g}"
        worst = f"{'weakest' if check['expect'] == 'related' else 'strongest'} log10 p {_fmt(check['worst'], 1)}"
    else:
        rule = f"score ≥ {threshold:g}" if check["expect"] == "related" else f"score < {threshold:g}"
        worst = f"{'lowest' if check['expect'] == 'related' else 'highest'} score {_fmt(check['worst'])}"
    mark = "held" if held == n else "**did not hold**"
    line = f"- {method}, {check['name']}: {held}/{n} pairs at {rule} ({worst}) — {mark}"
    if held < n and check["failures"]:
        more = " …" if n - held > len(check["failures"]) else ""
        line += f"; exceptions: {', '.join(check['failures'])}{more}"
    return line


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
    write_figures(cfg.paths.reports, summary, rows)
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
        f"p < {alpha:g}) and by the weight-std fingerprint (related at score ≥ {threshold:g}).",
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

    checks = summary["checks"]
    held = [c for c in checks if c["held"] == c["n"]]
    failed = [c for c in checks if c["held"] < c["n"]]
    out += ["", "### What held", ""]
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
    out += [_check_line(c, alpha, threshold) for c in checks]
    out += ["", "![SeedPrints heatmap](lineage_heatmap_seedprints.png)", ""]
    out += ["![Weight-std heatmap](lineage_heatmap_weights.png)", ""]
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
