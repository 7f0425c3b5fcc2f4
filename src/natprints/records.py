"""The tidy records every table and figure is rendered from: read and write them here only.

``results.jsonl`` (one JSON object per condition x pipeline x metric set) and ``accuracy.csv``
(the pipeline records) from the experiments stage; ``lineage.csv`` and ``lineage_emergence.csv``
from the lineage stage; ``timings.json``, the stage wall times and peak memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypedDict, get_type_hints

import numpy as np
import pandas as pd

from natprints.artifacts import atomic_write_json, atomic_write_text
from natprints.errors import NatprintsError

RESULTS_FILE = "results.jsonl"
ACCURACY_FILE = "accuracy.csv"
POOLED_FILE = "pooled.csv"
# The white-box attributor: every candidate model's exact likelihood of the text (the ceiling).
CEILING = ("likelihood", "bayes")
# Black-box generative: per-candidate LMs fine-tuned from the auditor's own reference LM.
REFERENCE = ("reflm", "lm")
CEILING_PIPELINE = "+".join(CEILING)
REFERENCE_PIPELINE = "+".join(REFERENCE)
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


# The schema of results.jsonl: one typed record per kind, what the experiments stage writes and every
# table reads. A record missing a field of its kind, or of a kind not listed, is refused on writing
# (a bug) and on reading (a file from another version, or edited by hand).
class _Scored(TypedDict):
    """An accuracy on a test set with its Wilson interval and binomial p against chance."""

    condition: str
    pipeline: str
    accuracy: float
    chance: float
    ci_low: float
    ci_high: float
    n_test: int


class _Classified(_Scored):
    featurizer: str
    classifier: str
    n_classes: int
    n_train: int
    n_correct: int
    macro_f1: float
    p_value: float


class _Pipeline(_Classified):
    kind: Literal["pipeline"]
    labels: list[str]
    confusion: list[list[int]]
    y_true: list[int]
    y_pred: list[int]
    best: bool


class PipelineRecord(_Pipeline, total=False):
    """One (featurizer, classifier) pipeline of a condition, or a white-box one (the ceiling, the
    reference LMs), with its confusion matrix and predictions."""

    cal_accuracy: float
    n_cal: int
    members: list[str]
    selected_by: str
    white_box: bool


class EvidenceRecord(_Classified):
    """A pipeline at one point of an evidence curve (``axis``: texts' length or training texts)."""

    kind: Literal["evidence"]
    role: str
    axis: str
    value: float


class LengthControlRecord(_Scored):
    """The length-only control: a classifier on character, word and token counts."""

    kind: Literal["length_control"]
    features: list[str]
    labels: list[str]
    confusion: list[list[int]]
    n_classes: int
    n_train: int
    n_correct: int
    macro_f1: float
    p_value: float
    leaks: bool


class PooledRecord(TypedDict):
    """One verdict per pool of ``k`` texts of one source."""

    kind: Literal["pooled"]
    condition: str
    role: str
    pipeline: str
    k: int
    n_groups: int
    n_correct: int
    accuracy: float
    chance: float
    ci_low: float
    ci_high: float


class _Attributor(TypedDict):
    kind: Literal["attributor"]
    condition: str
    pipeline: str
    featurizer: str
    classifier: str
    labels: list[str]
    temperature: float
    threshold: float
    n_cal: int
    n_test: int
    accuracy: float
    accepted_accuracy: float
    known_rejected: float


class AttributorRecord(_Attributor, total=False):
    """The saved attributor of a condition: its calibration and open-set threshold; ``open_set`` says
    what decides its `unknown` (``threshold``, or its ``outsider`` test), ``unknown_rows`` the test texts
    it calls so."""

    confidence: list[float]
    y_true: list[int]
    y_pred: list[int]
    open_set: Literal["threshold", "outsider"]
    unknown_rows: list[int]


class OpenSetRecord(TypedDict):
    """The attributor's rejection of a model left out of its library."""

    kind: Literal["open_set"]
    condition: str
    pipeline: str
    held_out_model: str
    threshold: float
    target_reject_rate: float
    n_known: int
    n_unknown: int
    known_rejected: float
    unknown_rejected: float


class OpenSetLikelihoodRecord(TypedDict):
    """The likelihood test's rejection of a left-out model's pools of ``k`` texts at level ``alpha``."""

    kind: Literal["open_set_likelihood"]
    condition: str
    method: str
    held_out_model: str
    k: int
    alpha: float
    n_known: int
    n_unknown: int
    known_rejected_n: int
    unknown_rejected_n: int


class _OpenSetOutsiders(TypedDict):
    kind: Literal["open_set_outsiders"]
    condition: str
    method: str
    source: str
    k: int
    n_known: int
    n_outsider: int
    known_rejected_n: int
    outsider_rejected_n: int
    auroc: float
    roc_fpr: list[float]
    roc_tpr: list[float]


class OpenSetOutsidersRecord(_OpenSetOutsiders, total=False):
    """Rejection of texts no candidate wrote (human paragraphs, junk), with its ROC."""

    alpha: float


class ExplanationRecord(TypedDict):
    """The n-grams that most speak for one model in the interpretable baseline."""

    kind: Literal["explanation"]
    condition: str
    pipeline: str
    model_id: str
    ngrams: list[Any]


class KLRecord(TypedDict):
    """KL(a || b) per token between two models' text distributions."""

    kind: Literal["kl"]
    condition: str
    model_a: str
    model_b: str
    relation: str
    kl_per_token: float
    se: float
    n_texts: int
    n_tokens: int


class KLRelationRecord(TypedDict):
    kind: Literal["kl_relation"]
    condition: str
    relation: str
    n_pairs: int
    kl_per_token: float
    ci_low: float
    ci_high: float


class KLTestRecord(TypedDict):
    kind: Literal["kl_test"]
    condition: str
    closer: str
    farther: str
    difference: float
    p_value: float


class PosteriorsRecord(TypedDict):
    """Per test text, a pipeline's log posterior over the condition's models."""

    kind: Literal["posteriors"]
    condition: str
    role: str
    pipeline: str
    featurizer: str
    classifier: str
    labels: list[str]
    sample_ids: list[str]
    y_true: list[int]
    log_posterior: list[list[float]]


class SequentialRecord(TypedDict):
    """How streams of texts ended under the sequential test at one error level."""

    kind: Literal["sequential"]
    condition: str
    role: str
    pipeline: str
    case: str
    error: float
    stream_texts: int
    n_streams: int
    named_right: int
    named_wrong: int
    unknown: int
    undecided: int
    texts_to_verdict: list[int]


class SplitRecord(TypedDict):
    """A condition's prompt split: its sizes and the test texts."""

    kind: Literal["split"]
    condition: str
    labels: list[str]
    prompts: dict[str, Any]
    n_train: int
    n_cal: int
    n_test: int
    test_sample_ids: list[str]


class _SplitRepeat(TypedDict):
    kind: Literal["split_repeat"]
    condition: str
    split_seed: int
    n_train: int
    n_test: int
    chance: float


class SplitRepeatRecord(_SplitRepeat, total=False):
    """The headline accuracies on one more prompt split: each role's pipeline and accuracy, where it
    could be fit (and the ceiling where the texts have likelihoods)."""

    best: dict[str, Any]
    baseline: dict[str, Any]
    ceiling: dict[str, Any]
    reference: dict[str, Any]


class StringCeilingRecord(TypedDict):
    """The ceiling scored as strings against the sampled tokens (a shared-tokenizer condition)."""

    kind: Literal["string_ceiling"]
    condition: str
    labels: list[str]
    n_test: int
    token: dict[str, Any]
    string: dict[str, Any]
    segmented: dict[str, Any]
    agrees: bool
    agrees_segmented: bool
    differs: float
    n_differs: int
    differs_by_model: dict[str, Any]
    token_on_differing: dict[str, Any]
    string_on_differing: dict[str, Any]
    segmented_on_differing: dict[str, Any]
    true_gap_canonical: float
    true_gap_segmented: float


class SegmentedCeilingRecord(TypedDict):
    """The ceiling of an own-tokenizer condition, canonical and summed over segmentations."""

    kind: Literal["segmented_ceiling"]
    condition: str
    labels: list[str]
    n_test: int
    canonical: dict[str, Any]
    segmented: dict[str, Any]
    true_gain: float
    gain_by_model: dict[str, Any]


RECORD_TYPES: dict[str, type] = {
    get_type_hints(t)["kind"].__args__[0]: t
    for t in (
        PipelineRecord,
        EvidenceRecord,
        LengthControlRecord,
        PooledRecord,
        AttributorRecord,
        OpenSetRecord,
        OpenSetLikelihoodRecord,
        OpenSetOutsidersRecord,
        ExplanationRecord,
        KLRecord,
        KLRelationRecord,
        KLTestRecord,
        PosteriorsRecord,
        SequentialRecord,
        SplitRecord,
        SplitRepeatRecord,
        StringCeilingRecord,
        SegmentedCeilingRecord,
    )
}


def record_problem(record: Any) -> str | None:
    """What is wrong with one record against the schema, or None."""
    if not isinstance(record, dict):
        return "not an object"
    kind = record.get("kind")
    schema = RECORD_TYPES.get(kind)  # type: ignore[arg-type]
    if schema is None:
        return f"unknown record kind {kind!r}"
    missing = sorted(schema.__required_keys__ - record.keys())  # type: ignore[attr-defined]
    extra = sorted(record.keys() - schema.__required_keys__ - schema.__optional_keys__)  # type: ignore[attr-defined]
    if missing or extra:
        return (
            f"{kind} record"
            + (f" lacks {', '.join(missing)}" if missing else "")
            + (f" has unknown {', '.join(extra)}" if extra else "")
        )
    return None


def write_results(reports: Path, records: list[dict[str, Any]]) -> list[str]:
    """Write ``results.jsonl`` (every record), ``accuracy.csv`` and, with a ceiling, ``pooled.csv``."""
    for i, record in enumerate(records):
        problem = record_problem(record)
        if problem is not None:
            raise NatprintsError(f"record {i + 1} breaks the results schema: {problem}")
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
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except ValueError as exc:
        raise NatprintsError(f"{path}: corrupt results ({exc})") from None
    for i, record in enumerate(records):
        problem = record_problem(record)
        if problem is not None:
            raise NatprintsError(f"{path}: line {i + 1}: {problem} (rerun `natprints experiments --force`)")
    return records


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
