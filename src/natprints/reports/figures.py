"""Every figure of the reports, drawn at report time from records (nothing is computed here).

Figures are PNG files written through one :func:`save`, with no software or date metadata, so the
same records give the same bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from natprints.artifacts import atomic_write_bytes

METHOD_NAMES = {"seedprints": "SeedPrints", "weights": "Weight-std"}


def save(fig: Any, path: Path, *, tight: bool = False) -> None:
    """Write ``fig`` as a PNG at 110 dpi; ``tight`` crops to the drawn area."""
    buffer = io.BytesIO()
    extra = {"dpi": 110, "bbox_inches": "tight"} if tight else {}
    fig.savefig(buffer, format="png", metadata={"Software": None}, **extra)
    atomic_write_bytes(path, buffer.getvalue())


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def short_labels(labels: Sequence[str]) -> tuple[list[str], str]:
    """Model ids without the parts they all share: ``s-lr2e-3-bs32-init1-data1`` and
    ``s-lr2e-3-bs32-init2-data2`` become ``init1-data1`` and ``init2-data2``, with ``s-lr2e-3-bs32``
    returned as the common part (stated once, on the figure). Parts are split at a ``-`` before a
    letter, so ``lr2e-3`` stays whole. Ids of different lengths (another family's prefix) lose the
    parts they share at both ends: ``gpt2-s-lr2e-3`` and ``s-lr2e-3`` become ``gpt2`` and, since nothing
    of it would be left, ``s-lr2e-3`` in full."""
    import re

    split = [re.split(r"-(?=[A-Za-z])", str(label)) for label in labels]
    if len(labels) < 2:
        return [str(label) for label in labels], ""
    if len({len(parts) for parts in split}) == 1:
        shared = {i for i in range(len(split[0])) if len({parts[i] for parts in split}) == 1}
        if len(shared) == len(split[0]):
            return [str(label) for label in labels], ""
        short = ["-".join(p for i, p in enumerate(parts) if i not in shared) for parts in split]
        return short, "-".join(split[0][i] for i in sorted(shared))
    shortest = min(len(parts) for parts in split)
    head = next((i for i in range(shortest) if len({parts[i] for parts in split}) > 1), shortest)
    tail = next((i for i in range(shortest - head) if len({parts[-1 - i] for parts in split}) > 1), shortest - head)
    if head + tail == 0:
        return [str(label) for label in labels], ""
    short = [
        "-".join(parts[head : len(parts) - tail]) or str(label) for parts, label in zip(split, labels, strict=True)
    ]
    common = "-".join(split[0][:head] + ["…"] * bool(head and tail) + split[0][len(split[0]) - tail :])
    return short, common


def plot_confusion(panels: Sequence[tuple[str, np.ndarray, list[str]]], labels: Sequence[str], path: Path) -> None:
    """Confusion matrices side by side, one per (title, counts, predicted-column names): each cell the
    count of test texts and, beneath it, the share of the true model's texts. Rows are ``labels``; a
    panel may have more columns than rows (``unknown``). Labels are shortened to what tells the models
    apart, and the part they share is stated once."""
    short, common = short_labels(labels)
    k = len(labels)
    side = 1.4 + 0.5 * k
    fig = _figure(side * len(panels) + 1.0, side + 0.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, matrix, columns) in zip(axes, panels, strict=True):
        counts = np.asarray(matrix, dtype=float)
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        cols = [short[labels.index(c)] if c in labels else c for c in columns]
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(k), short, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_title(title, fontsize=8)
        if k <= 14:
            for i in range(k):
                for j in range(len(cols)):
                    color = "white" if shares[i, j] > 0.5 else "black"
                    text = f"{int(counts[i, j])}\n{shares[i, j]:.2f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=5.5, color=color)
    axes[0].set_ylabel("true model")
    if common:
        fig.suptitle(f"shared by every model id: {common}; cells: test texts and share of the row", fontsize=8)
    save(fig, path)


def plot_reliability(panels: Sequence[tuple[str, np.ndarray, np.ndarray]], path: Path, bins: int = 10) -> None:
    """One reliability diagram per (title, confidence, correct): the accuracy of the texts whose top
    calibrated probability falls in each bin against the bin's mean probability, with the share of
    texts per bin beneath; the diagonal is perfect calibration."""
    n = len(panels)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = _figure(2.6 * cols, 2.6 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    edges = np.linspace(0, 1, bins + 1)
    for ax, (title, confidence, correct) in zip(axes, panels, strict=False):
        which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
        filled = [b for b in range(bins) if (which == b).any()]
        mean_conf = [float(confidence[which == b].mean()) for b in filled]
        accuracy = [float(correct[which == b].mean()) for b in filled]
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
        ax.plot(mean_conf, accuracy, marker="o", ms=3, color="C0")
        share = np.bincount(which, minlength=bins) / max(len(confidence), 1)
        ax.bar(edges[:-1], share, width=1 / bins, align="edge", color="C1", alpha=0.3)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax in axes[:n:cols]:
        ax.set_ylabel("accuracy (bars: share of texts)", fontsize=7)
    for ax in axes[max(0, n - cols) : n]:
        ax.set_xlabel("top calibrated probability", fontsize=7)
    save(fig, path)


OUTSIDER_STYLES = {"human": "-", "junk": ":"}  # line style per outsider source; colour per test
TEST_COLOURS = {"analytic": "C3", "margin": "C1", "background": "C2", "joint": "C4", "attributor": "C0"}


def plot_roc(panels: Sequence[tuple[str, Sequence[tuple[str, list[float], list[float]]]]], path: Path) -> None:
    """One ROC panel per (title, curves); each curve ``("<test>, <source>", fpr, tpr)``: outsider pools
    called ``unknown`` against known pools rejected, as the threshold moves."""
    n = len(panels)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = _figure(2.7 * cols, 2.7 * rows + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (title, curves) in zip(axes, panels, strict=False):
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        for name, fpr, tpr in curves:
            test, source = name.split(", ", 1)
            ax.plot(fpr, tpr, ls=OUTSIDER_STYLES.get(source, "-"), color=TEST_COLOURS.get(test, "C7"), lw=1.3)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax in axes[:n:cols]:
        ax.set_ylabel("outsider pools called unknown", fontsize=7)
    for ax in axes[max(0, n - cols) : n]:
        ax.set_xlabel("known pools rejected", fontsize=7)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, lw=1.5, label=t) for t, c in TEST_COLOURS.items()]
    handles += [Line2D([], [], color="0.3", ls=ls, lw=1.5, label=s) for s, ls in OUTSIDER_STYLES.items()]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7, handlelength=3)
    save(fig, path)


def plot_sequential(table: pd.DataFrame, path: Path) -> None:
    """One panel per condition: the median texts the sequential test read before a verdict (bars: the
    quartiles) against the error level, per role, on streams of known models."""
    conditions = list(dict.fromkeys(table["condition"]))
    cols = min(len(conditions), 4)
    rows = math.ceil(len(conditions) / cols)
    fig = _figure(2.7 * cols, 2.6 * rows + 0.4)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, condition in zip(axes, conditions, strict=False):
        sub = table[table["condition"] == condition]
        for role, group in sub.groupby("role", sort=False):
            style, colour, _ = ROLE_STYLES.get(str(role), ("-", "C7", str(role)))
            group = group.sort_values("error", ascending=False)
            spread = [group["median_texts"] - group["q25_texts"], group["q75_texts"] - group["median_texts"]]
            ax.errorbar(group["error"], group["median_texts"], yerr=spread, ls=style, color=colour, marker="o", ms=3)
        ax.set_xscale("log")
        levels = sorted(table["error"].unique(), reverse=True)
        ax.set_xticks(levels, [f"{e:g}" for e in levels])
        ax.minorticks_off()
        ax.invert_xaxis()
        ax.set_ylim(bottom=0)
        ax.set_title(condition, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(conditions) :]:
        ax.set_visible(False)
    for ax in axes[: len(conditions) : cols]:
        ax.set_ylabel("texts to a verdict (median, IQR)", fontsize=7)
    for ax in axes[max(0, len(conditions) - cols) : len(conditions)]:
        ax.set_xlabel("error guaranteed", fontsize=7)
    from matplotlib.lines import Line2D

    roles = list(dict.fromkeys(table["role"]))
    handles = [
        Line2D([], [], ls=ROLE_STYLES[r][0], color=ROLE_STYLES[r][1], lw=1.5, label=ROLE_STYLES[r][2])
        for r in roles
        if r in ROLE_STYLES
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7, handlelength=3)
    save(fig, path)


ROLE_STYLES = {  # role -> (line style, colour, legend name)
    "ceiling": ("-", "C3", "ceiling (likelihood)"),
    "best": ("-", "C0", "best pipeline"),
    "baseline": ("--", "C7", "baseline (word1+logreg)"),
    "reflm": ("-.", "C2", "reference LMs"),
    "head": (":", "C4", "reference-LM head"),
    "minilm": ("--", "C1", "fine-tuned encoder (minilm+ft)"),
}


def plot_evidence(points: pd.DataFrame, x: str, xlabel: str, path: Path, tick_labels: dict | None = None) -> None:
    """Accuracy against ``x``, one panel per condition (the same axes in each): the ceiling, the best
    pipeline, the baseline and the reference LMs where measured, each with its 95% band, and chance
    dotted. One legend for all panels, beneath them."""
    conditions = list(dict.fromkeys(points["condition"]))
    cols = min(len(conditions), 4)
    rows = math.ceil(len(conditions) / cols)
    fig = _figure(2.7 * cols + 0.2, 2.4 * rows + 0.7)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False, sharex=bool(tick_labels), sharey=True)).ravel()
    handles = {}
    for ax, condition in zip(axes, conditions, strict=False):
        sub = points[points["condition"] == condition]
        for role, group in sub.groupby("role", sort=False):
            group = group.sort_values(x)
            style, color, name = ROLE_STYLES.get(str(role), ("--", "C5", str(role)))
            (line,) = ax.plot(group[x], group["accuracy"], style, marker="o", ms=2.5, lw=1.3, color=color)
            ax.fill_between(group[x], group["ci_low"], group["ci_high"], color=color, alpha=0.15, lw=0)
            handles.setdefault(name, line)
        ax.axhline(float(sub["chance"].iloc[0]), color="0.4", lw=0.8, ls=":")
        best = sub.loc[sub["role"] == "best", "pipeline"]
        ax.set_title(f"{condition}" + (f" (best: {best.iloc[0]})" if len(best) else ""), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_ylim(0, 1.02)
        if tick_labels:
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(tick_labels), list(tick_labels.values()))
            ax.minorticks_off()
    for ax in axes[len(conditions) :]:
        ax.set_visible(False)
    fig.supxlabel(xlabel, fontsize=8)
    fig.supylabel("test accuracy (95% band; dotted: chance)", fontsize=8)
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="outside upper center",
        ncol=min(len(handles), 5),
        fontsize=7,
        handlelength=3.5,
    )
    save(fig, path)


def _matrix(labels: list[str], rows: list[dict[str, Any]], method: str) -> tuple[np.ndarray, np.ndarray]:
    index = {label: i for i, label in enumerate(labels)}
    n = len(labels)
    values = np.full((n, n), np.nan)
    related = np.zeros((n, n), dtype=bool)
    for r in rows:
        if r["method"] != method:
            continue
        i, j = index[r["model_a"]], index[r["model_b"]]
        related[i, j] = related[j, i] = bool(r["related"])
        if r["verdict"] == "incomparable":
            continue
        value = -r["log10_p"] if method == "seedprints" else r["score"]
        if value is not None:
            values[i, j] = values[j, i] = value
    return values, related


def plot_heatmap(labels: list[str], rows: list[dict[str, Any]], method: str, alpha: float, path: Path) -> None:
    """Pairwise evidence; grey = incomparable (or the diagonal), dots = related by ground truth."""
    from matplotlib.colors import SymLogNorm
    from matplotlib.figure import Figure

    values, related = _matrix(labels, rows, method)
    n = len(labels)
    size = max(4.0, 0.28 * n + 2.0)
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(values)
    if method == "seedprints":
        from matplotlib import colormaps

        cmap = colormaps["viridis"].with_extremes(bad="0.85")
        top = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
        norm = SymLogNorm(linthresh=-math.log10(alpha), vmin=0.0, vmax=max(top, 2.0 * -math.log10(alpha)))
        image = ax.imshow(masked, cmap=cmap, norm=norm)
        label = f"-log10 p   (same lineage above {-math.log10(alpha):g})"
    else:
        from matplotlib import colormaps

        cmap = colormaps["RdBu_r"].with_extremes(bad="0.85")
        image = ax.imshow(masked, cmap=cmap, vmin=-1, vmax=1)
        label = "mean z-scored std correlation"
    ii, jj = np.nonzero(related)
    ax.scatter(jj, ii, s=6, c="k", marker="o", linewidths=0)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=max(4, 9 - n // 10))
    ax.set_yticks(range(n), labels, fontsize=max(4, 9 - n // 10))
    ax.set_title(f"{METHOD_NAMES[method]}: pairwise evidence (dots = related by ground truth)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label(label, fontsize=8)
    save(fig, path, tight=True)


def plot_emergence(records: list[dict[str, Any]], alpha: float, path: Path) -> None:
    """-log10 p of init vs checkpoint over training: own init solid, other seeds' inits grey."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.0))
    ax = fig.add_subplot()
    points = [r for r in records if r["step"] is not None]
    models = sorted({r["model"] for r in points})
    for model in models:
        for own in (False, True):
            mine = [r for r in points if r["model"] == model and r["own"] == own]
            for ref in sorted({r["reference"] for r in mine}):
                line = sorted((r["step"], -r["log10_p"]) for r in mine if r["reference"] == ref)
                xs, ys = zip(*line, strict=True) if line else ((), ())
                if own:
                    ax.plot(xs, ys, marker="o", ms=3, label=model)
                else:
                    ax.plot(xs, ys, color="0.7", lw=0.8, ls="--")
    ax.axhline(-math.log10(alpha), color="r", lw=0.8, ls=":", label=f"p = {alpha:g}")
    ax.set_yscale("symlog", linthresh=-math.log10(alpha))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("-log10 p  (init vs checkpoint)")
    ax.set_title("SeedPrints emergence: own init (solid) vs other seeds' inits (grey)", fontsize=9)
    if models:
        ax.legend(fontsize=7)
    save(fig, path, tight=True)


def plot_kl_heatmap(labels: Sequence[str], matrix: np.ndarray, path: Path) -> None:
    """Per-token KL(row || column) between models' text distributions, in nats (diagonal 0)."""
    from matplotlib.figure import Figure

    n = len(labels)
    size = max(4.0, 0.28 * n + 2.0)
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="magma_r", vmin=0)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=max(4, 9 - n // 10))
    ax.set_yticks(range(n), labels, fontsize=max(4, 9 - n // 10))
    ax.set_xlabel("model b")
    ax.set_ylabel("model a (whose samples)")
    ax.set_title("Text fingerprint distance: KL(a || b) per token", fontsize=9)
    if n <= 16:
        top = np.nanmax(matrix) if np.isfinite(matrix).any() else 0.0
        for i in range(n):
            for j in range(n):
                if np.isfinite(matrix[i, j]):
                    color = "white" if matrix[i, j] > 0.6 * top else "black"
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=5, color=color)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label("nats per token", fontsize=8)
    save(fig, path, tight=True)


def plot_text_emergence(table: pd.DataFrame, path: Path) -> None:
    """Per training step: the ceiling and the best black-box pipeline (95% intervals) against chance;
    beside it the mean KL between the models (min-max band) and their mean held-out loss."""
    steps = sorted(table["step"].unique())
    top = table[table["white_box"]].set_index("step").loc[steps]
    best = table[table["best"] & ~table["white_box"]].set_index("step").loc[steps]
    fig = _figure(9.5, 3.6)
    left, right = fig.subplots(1, 2)
    for rows, name, color in ((top, "ceiling (likelihood)", "C0"), (best, "best black-box", "C1")):
        left.plot(steps, rows["accuracy"], marker="o", ms=3, color=color, label=name)
        left.fill_between(steps, rows["ci_low"], rows["ci_high"], color=color, alpha=0.2, lw=0)
    left.axhline(float(top["chance"].iloc[0]), color="0.5", lw=0.8, ls="--", label="chance")
    left.set_ylim(0, 1)
    left.set_ylabel("test accuracy")
    left.legend(fontsize=7)
    right.plot(steps, top["kl_per_token"], marker="o", ms=3, color="C3", label="mean KL between models")
    right.fill_between(steps, top["kl_min"], top["kl_max"], color="C3", alpha=0.2, lw=0)
    right.set_ylabel("KL (nats per token)", color="C3")
    loss = right.twinx()
    loss.plot(steps, top["heldout_loss"], marker="s", ms=3, color="0.3", label="held-out loss")
    loss.set_ylabel("held-out loss (nats per token)", color="0.3")
    linthresh = next((s for s in steps if s > 0), 1)
    for ax in (left, right):
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_xlim(0, max(steps) * 1.15)  # the default margin would reach below step 0
        ax.set_xlabel("training step (0 = init)")
        ax.set_xticks(steps, [str(s) for s in steps], fontsize=7)
    fig.suptitle(f"Text fingerprint over training: condition {top['condition'].iloc[0]}", fontsize=9)
    save(fig, path)
