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

import pandas as pd

from natprints.artifacts import atomic_write_json, atomic_write_text
from natprints.errors import NatprintsError

RESULTS_FILE = "results.jsonl"


ACCURACY_FILE = "accuracy.csv"


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
    "best",
)


def write_results(reports: Path, records: list[dict[str, Any]]) -> None:
    """Write ``results.jsonl`` (every record) and ``accuracy.csv`` (the pipeline records)."""
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    atomic_write_text(reports / RESULTS_FILE, lines)
    atomic_write_text(reports / ACCURACY_FILE, accuracy_table(records).to_csv(index=False, float_format="%.6g"))


def load_records(reports: Path | str) -> list[dict[str, Any]]:
    """Read ``results.jsonl``; a missing file means the experiments stage has not run."""
    path = Path(reports) / RESULTS_FILE
    if not path.is_file():
        raise NatprintsError(f"no attribution results at {path} (run `natprints experiments`)")
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except ValueError as exc:
        raise NatprintsError(f"{path}: corrupt results ({exc})") from None


def accuracy_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per (condition, featurizer, classifier), straight from the pipeline records."""
    rows = [{c: r[c] for c in ACCURACY_COLUMNS} for r in records if r.get("kind") == "pipeline"]
    return pd.DataFrame(rows, columns=list(ACCURACY_COLUMNS))


CSV_COLUMNS = ["model_a", "model_b", "method", "score", "log10_p", "related", "verdict"]


LINEAGE_CSV = "lineage.csv"


LINEAGE_JSON = "lineage.json"


EMERGENCE_CSV = "lineage_emergence.csv"


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
