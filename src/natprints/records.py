"""The tidy records every table and figure is rendered from: read and write them here only.

``results.jsonl`` (one JSON object per condition x pipeline x metric set) and ``accuracy.csv``
(the pipeline records) from the experiments stage; ``lineage.csv`` and ``lineage_emergence.csv``
from the lineage stage; ``timings.json``, the stage wall times and peak memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from natprints.artifacts import atomic_write_json, atomic_write_text
from natprints.errors import NatprintsError

RESULTS_FILE = "results.jsonl"
ACCURACY_FILE = "accuracy.csv"
POOLED_FILE = "pooled.csv"
CEILING_PIPELINE = "likelihood+bayes"
ACCURACY_COLUMNS = (
    "condition",
    "featurizer",
    "classifier",
    "pipeline",
    "n_classes",
    "n_train",
    "n_test",
    "chance",
    "accuracy",
    "ci_low",
    "ci_high",
    "macro_f1",
    "p_value",
    "cal_accuracy",  # on the calibration split, where the best pipeline is chosen (grid pipelines only)
    "best",
    "white_box",
    "ceiling",
    "ceiling_share",
)
POOLED_COLUMNS = ("condition", "role", "pipeline", "k", "n_groups", "accuracy", "ci_low", "ci_high")
KL_FILE = "kl.csv"
SEQUENTIAL_FILE = "sequential.csv"
KL_COLUMNS = ("model_a", "model_b", "kl_per_token", "se", "n_tokens")


def write_results(reports: Path, records: list[dict[str, Any]]) -> list[str]:
    """Write ``results.jsonl`` (every record), ``accuracy.csv`` and, with a ceiling, ``pooled.csv``."""
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    atomic_write_text(reports / RESULTS_FILE, lines)
    atomic_write_text(reports / ACCURACY_FILE, accuracy_table(records).to_csv(index=False, float_format="%.6g"))
    files = [RESULTS_FILE, ACCURACY_FILE]
    tables = ((POOLED_FILE, pooled_table(records)), (KL_FILE, kl_table(records)))
    for name, table in (*tables, (SEQUENTIAL_FILE, sequential_table(records))):
        if table.empty:
            (reports / name).unlink(missing_ok=True)
            continue
        atomic_write_text(reports / name, table.to_csv(index=False, float_format="%.6g"))
        files.append(name)
    return files


def load_records(reports: Path | str) -> list[dict[str, Any]]:
    """Read ``results.jsonl``; a missing file means the experiments stage has not run."""
    path = Path(reports) / RESULTS_FILE
    if not path.is_file():
        raise NatprintsError(f"no attribution results at {path} (run `natprints experiments`)")
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except ValueError as exc:
        raise NatprintsError(f"{path}: corrupt results ({exc})") from None


def ceiling_share(accuracy: float, chance: float, ceiling: float) -> float:
    """(accuracy - chance) / (ceiling - chance): the share of the text's margin above chance reached."""
    margin = ceiling - chance
    return (accuracy - chance) / margin if margin > 0 else float("nan")


def accuracy_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per (condition, featurizer, classifier), straight from the pipeline records.

    ``ceiling`` is the condition's likelihood attributor's accuracy on the same test texts (the Bayes
    limit), ``ceiling_share`` each row's :func:`ceiling_share` of it; both empty without a ceiling row.
    """
    pipelines = [r for r in records if r.get("kind") == "pipeline"]
    ceilings = {r["condition"]: r["accuracy"] for r in pipelines if r["pipeline"] == CEILING_PIPELINE}
    rows = []
    for r in pipelines:
        row = {c: r.get(c) for c in ACCURACY_COLUMNS}
        row["white_box"] = bool(r.get("white_box", False))
        top = ceilings.get(r["condition"])
        row["ceiling"] = top
        row["ceiling_share"] = None if top is None else ceiling_share(r["accuracy"], r["chance"], top)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(ACCURACY_COLUMNS))


def kl_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per ordered pair of models: KL(a || b) per token of their text distributions."""
    rows = [{c: r[c] for c in KL_COLUMNS} for r in records if r.get("kind") == "kl"]
    return pd.DataFrame(rows, columns=list(KL_COLUMNS))


def pooled_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per (condition, role, pooled texts k): accuracy of one verdict per pool of one source."""
    rows = [{c: r[c] for c in POOLED_COLUMNS} for r in records if r.get("kind") == "pooled"]
    return pd.DataFrame(rows, columns=list(POOLED_COLUMNS))


def sequential_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per (condition, role, case, error) of the sequential test: how its streams ended, the
    texts it took to a verdict (median and quartiles), and the misattribution rate with its 95% Wilson
    interval (a stream naming a wrong model; for streams no candidate wrote, naming any)."""
    from natprints.stats import wilson_interval

    rows = []
    for r in records:
        if r.get("kind") != "sequential":
            continue
        texts = np.asarray(r["texts_to_verdict"], dtype=np.float64)
        low, high = wilson_interval(r["named_wrong"], r["n_streams"])
        quartiles = np.percentile(texts, [25, 50, 75]) if len(texts) else [np.nan] * 3
        rows.append(
            {
                **{c: r[c] for c in ("condition", "role", "pipeline", "case", "error", "stream_texts", "n_streams")},
                **{c: r[c] for c in ("named_right", "named_wrong", "unknown", "undecided")},
                "median_texts": quartiles[1],
                "q25_texts": quartiles[0],
                "q75_texts": quartiles[2],
                "misattribution": r["named_wrong"] / max(r["n_streams"], 1),
                "misattribution_ci_low": low,
                "misattribution_ci_high": high,
            }
        )
    return pd.DataFrame(rows, columns=SEQUENTIAL_COLUMNS)


SEQUENTIAL_COLUMNS = [
    "condition",
    "role",
    "pipeline",
    "case",
    "error",
    "stream_texts",
    "n_streams",
    "named_right",
    "named_wrong",
    "unknown",
    "undecided",
    "median_texts",
    "q25_texts",
    "q75_texts",
    "misattribution",
    "misattribution_ci_low",
    "misattribution_ci_high",
]


CSV_COLUMNS = ["model_a", "model_b", "method", "score", "log10_p", "related", "verdict"]


LINEAGE_CSV = "lineage.csv"


LINEAGE_JSON = "lineage.json"


EMERGENCE_CSV = "lineage_emergence.csv"
TEXT_EMERGENCE_CSV = "emergence.csv"  # the text fingerprint over training (natprints.emergence)


TIMINGS_FILE = "timings.json"


def write_lineage(reports: Path, rows: list[dict[str, Any]], emergence: list[dict[str, Any]]) -> list[str]:
    """Write ``lineage.csv`` (one row per pair and method) and ``lineage_emergence.csv``."""
    frame = pd.DataFrame(rows)
    atomic_write_text(reports / LINEAGE_CSV, frame[CSV_COLUMNS].to_csv(index=False))
    columns = ["model", "checkpoint", "step", "reference", "own", "log10_p"]
    atomic_write_text(reports / EMERGENCE_CSV, pd.DataFrame(emergence, columns=columns).to_csv(index=False))
    return [LINEAGE_CSV, EMERGENCE_CSV]


def load_lineage(reports: Path | str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The lineage stage's summary (``lineage.json``) and its pair rows (``lineage.csv``)."""
    reports = Path(reports)
    path = reports / LINEAGE_JSON
    if not path.is_file():
        raise NatprintsError(f"no lineage results at {path}; run `natprints lineage run` first")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        frame = pd.read_csv(reports / LINEAGE_CSV, float_precision="round_trip")
    except (OSError, ValueError) as exc:
        raise NatprintsError(f"{path.parent}: unreadable lineage results ({exc})") from None
    rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
    return summary, rows


def read_timings(reports: Path) -> dict[str, Any]:
    path = reports / TIMINGS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_timings(reports: Path, timings: dict[str, Any]) -> None:
    atomic_write_json(reports / TIMINGS_FILE, timings)
