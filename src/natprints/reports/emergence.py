"""The report section on the text fingerprint over training, from ``reports/<run>/emergence.csv``."""

from __future__ import annotations

import pandas as pd

from natprints.config import Config
from natprints.records import TEXT_EMERGENCE_CSV
from natprints.reports.figures import plot_text_emergence

FIGURE = "figures/emergence.png"


def _interval(row) -> str:
    return f"{row.accuracy:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}]"


def trend(steps: list[int], accuracy: list[float], low: list[float], high: list[float]) -> str:
    """How a per-step accuracy moves: where it peaks, and whether the last step is below that peak
    beyond both 95% intervals (fades), or the peak is the last step (grows), or neither (flat)."""
    peak = max(range(len(steps)), key=lambda i: accuracy[i])
    last = len(steps) - 1
    if peak == last:
        return f"grows to its highest value at the last step ({steps[last]}: {accuracy[last]:.3f})"
    if high[last] < low[peak]:
        return (
            f"peaks at step {steps[peak]} ({accuracy[peak]:.3f}) and fades to {accuracy[last]:.3f} by step "
            f"{steps[last]}, outside both intervals"
        )
    return (
        f"is highest at step {steps[peak]} ({accuracy[peak]:.3f}), and step {steps[last]}'s {accuracy[last]:.3f} "
        "is not below it beyond the intervals"
    )


def render_section(cfg: Config) -> str:
    """The markdown section, writing its figure under ``figures/``."""
    table = pd.read_csv(cfg.paths.reports / TEXT_EMERGENCE_CSV)
    plot_text_emergence(table, cfg.paths.reports / FIGURE)
    top = table[table["white_box"]].sort_values("step")
    best = table[table["best"] & ~table["white_box"]].set_index("step")
    condition = str(top["condition"].iloc[0])
    steps = [int(s) for s in top["step"]]
    pipelines = [m for m in dict.fromkeys(table.loc[~table["white_box"], "method"])]
    chance = float(top["chance"].iloc[0])
    out = [
        "## The text fingerprint over training",
        "",
        f"The `{condition}` condition's models at every saved step (step 0: the untrained inits), each continuing "
        f"the same {int(top['n_test'].iloc[0])} test prompts (and the training prompts, for the black-box "
        "pipelines, which are fit anew at each step on that step's texts). Per step: the exact ceiling (each model's "
        "likelihood of the texts), the best of "
        + ", ".join(f"`{p}`" for p in pipelines)
        + ", the mean per-token KL divergence between the models' text distributions (min–max over ordered "
        f"pairs), and the models' mean held-out loss. Chance is {chance:.3f}. The last step's texts are the run's "
        f"own, so its ceiling is the `{condition}` ceiling of the tables above. `{TEXT_EMERGENCE_CSV}` holds "
        "every pipeline at every step.",
        "",
        "| step | held-out loss | KL (nats/token) [min–max] | ceiling | best black-box | pipeline | share of ceiling |",
        "|---:|---:|---|---|---|---|---:|",
    ]
    for row in top.itertuples():
        b = best.loc[row.step]
        out.append(
            f"| {row.step} | {row.heldout_loss:.3f} | {row.kl_per_token:.3f} [{row.kl_min:.3f}–{row.kl_max:.3f}] "
            f"| {_interval(row)} | {b.accuracy:.3f} [{b.ci_low:.3f}, {b.ci_high:.3f}] | `{b.method}` "
            f"| {b.ceiling_share:.2f} |"
        )
    first, last = top.iloc[0], top.iloc[-1]
    bb = best.loc[steps]
    out += [
        "",
        f"![text fingerprint over training]({FIGURE})",
        "",
        f"At step {steps[0]} the ceiling tells the models' texts apart at {first.accuracy:.3f} "
        f"[{first.ci_low:.3f}, {first.ci_high:.3f}] (KL {first.kl_per_token:.3f} nats/token)"
        + (": untrained inits of one shape already differ" if first.ci_low > chance else ", not above chance")
        + ". The ceiling "
        + trend(steps, top["accuracy"].tolist(), top["ci_low"].tolist(), top["ci_high"].tolist())
        + "; the best black-box pipeline "
        + trend(steps, bb["accuracy"].tolist(), bb["ci_low"].tolist(), bb["ci_high"].tolist())
        + f". Mean KL goes from {first.kl_per_token:.3f} to {last.kl_per_token:.3f} nats/token (highest "
        f"{top['kl_per_token'].max():.3f}, at step {int(top.loc[top['kl_per_token'].idxmax(), 'step'])}) while the "
        f"held-out loss falls from {first.heldout_loss:.3f} to {last.heldout_loss:.3f}.",
        "",
    ]
    notes = []
    if (top["kl_min"] < 0).any():
        notes.append(
            "A negative KL is estimator noise, not a divergence below zero: each pair's KL is the mean log-ratio "
            "of the two models' likelihoods over one model's sampled texts, unbiased but with a standard error "
            "(`kl.csv` gives it for the last step), so a pair whose distributions barely differ can come out "
            "slightly below 0."
        )
    if (bb["ceiling_share"] < 0).any():
        notes.append(
            "A negative share of ceiling is a best pipeline below chance, within its interval: no fingerprint "
            "captured at that step, not a harmful one."
        )
    return "\n".join(out + ([" ".join(notes), ""] if notes else []))
