"""Attribution on texts collected from sources the user cannot run: a labelled corpus in, the
experiments' tables, confusion matrices, evidence curves, explanations and a saved attributor out.

A corpus is a JSONL, CSV or parquet file with ``text`` and ``source`` columns (optional ``prompt``:
texts continuing one prompt share a split; optional ``group``: the unit of the split, before
``prompt``), or a folder with one subfolder per source holding one text per file, whose name (relative
to the source's folder) is its group. Without a group or a prompt each text is its own group.

The null control is the largest source split in two at random (by group): two labels for one writer,
which must come out at chance. There is no likelihood ceiling: no weights wrote these texts as far as
the lab knows, and the report says so.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from natprints.artifacts import MANIFEST, Manifest, hash_obj, sha256_file
from natprints.attribution.attributor import decode_text, save_attributor
from natprints.attribution.estimators import THREADS
from natprints.attribution.grid import Setup
from natprints.conditions import CALIBRATION_FRACTION, ConditionData, condition_data, split_parts, split_prompts
from natprints.config import NULL_CONDITION, Config, RunSettings
from natprints.errors import NatprintsError, first_line

TABLE_SUFFIXES = (".jsonl", ".csv", ".parquet")
MIN_TEXTS = 4  # per source: enough to reach train, calibration and test
NULL_HALVES = ("a", "b")
COLLECTED_VERSION = 1  # bump when the records change meaning
COLLECTED_MANIFEST = "experiments.json"
# the BPE token n-grams need the run's tokenizer, which collected texts were not written with
NEEDS_RUN_TOKENIZER = ("tok13",)


@dataclass
class Collected:
    """A validated labelled corpus: one row per kept text (``text``, ``source``, ``group``)."""

    path: Path
    frame: pd.DataFrame
    skipped: Counter = field(default_factory=Counter)  # reason -> texts left out

    def skipped_line(self) -> str:
        if not self.skipped:
            return ""
        total = sum(self.skipped.values())
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return f"{self.path}: skipped {total} text(s): {reasons}"


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError(f"line {n} is not a JSON object")
                    rows.append(row)
            return pd.DataFrame(rows)
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        return pd.read_parquet(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        first = first_line(exc)
        raise NatprintsError(f"{path}: unreadable {suffix[1:]} corpus ({first})") from None


def _read_folder(path: Path, max_bytes: int, skipped: Counter) -> pd.DataFrame:
    rows = []
    for source_dir in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(p for p in source_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
            data = file.read_bytes()
            if len(data) > max_bytes:
                skipped["over the size limit"] += 1
                continue
            # same-named files of different sources continue one prompt: the file name is the group
            rows.append({"text": data, "source": source_dir.name, "group": file.relative_to(source_dir).as_posix()})
    if not rows:
        raise NatprintsError(f"{path}: no texts (a corpus folder holds one subfolder per source, one text per file)")
    return pd.DataFrame(rows)


def _check_text(value: Any, max_bytes: int) -> tuple[str | None, str | None]:
    """(text, None) for a usable text, else (None, why it was skipped)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None, "empty"
    data = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")
    try:
        return decode_text(data, "text", max_bytes), None
    except NatprintsError as exc:
        why = str(exc).split(": ", 1)[1]
        if why.startswith("binary"):
            return None, "binary"
        return None, "over the size limit" if "size limit" in why else why


def read_collected(path: Path | str, max_bytes: int = 1_000_000) -> Collected:
    """Read and validate a labelled corpus; every problem with the whole corpus is a one-line error,
    and texts that cannot be used (empty, binary, not UTF-8, too large) are counted and left out."""
    path = Path(path)
    skipped: Counter = Counter()
    if path.is_dir():
        raw = _read_folder(path, max_bytes, skipped)
    elif not path.is_file():
        raise NatprintsError(f"{path}: no such file or folder")
    elif path.suffix.lower() not in TABLE_SUFFIXES:
        raise NatprintsError(
            f"{path}: unknown corpus format {path.suffix or '(no suffix)'!r}; give {', '.join(TABLE_SUFFIXES)} "
            "or a folder with one subfolder per source"
        )
    else:
        raw = _read_table(path)
    for column in ("text", "source"):
        if column not in raw.columns:
            have = ", ".join(map(str, raw.columns)) or "none"
            raise NatprintsError(f"{path}: no `{column}` column (columns: {have})")
    rows = []
    for i, row in enumerate(raw.to_dict("records")):
        text, why = _check_text(row["text"], max_bytes)
        source = row["source"]
        if text is not None and (source is None or not str(source).strip()):
            text, why = None, "without a source"
        if text is None:
            skipped[why] += 1
            continue
        group = next((row[c] for c in ("group", "prompt") if c in row and str(row[c] or "").strip()), None)
        rows.append({"text": text, "source": str(source).strip(), "group": str(group) if group else f"#{i}"})
    frame = pd.DataFrame(rows, columns=["text", "source", "group"])
    collected = Collected(path=path, frame=frame, skipped=skipped)
    if frame.empty:
        raise NatprintsError(f"{path}: no usable text ({collected.skipped_line().split(': ', 1)[1]})")
    sources = frame["source"].value_counts()
    if len(sources) < 2:
        raise NatprintsError(f"{path}: one source only ({sources.index[0]!r}); attribution needs two or more")
    few = sources[sources < MIN_TEXTS]
    if len(few):
        name, n = few.index[0], int(few.iloc[0])
        raise NatprintsError(
            f"{path}: source {name!r} has {n} text(s); each source needs {MIN_TEXTS} to split into train, "
            "calibration and test"
        )
    return collected


def _frame(texts: pd.DataFrame, label: pd.Series) -> pd.DataFrame:
    """The columns the experiments read, from a collected frame and each row's label."""
    prompt_ids = ["g" + hashlib.sha256(g.encode("utf-8")).hexdigest()[:16] for g in texts["group"]]
    sample_ids = [
        hashlib.sha256(f"{s}\0{g}\0{t}".encode()).hexdigest()[:16]
        for s, g, t in zip(label, texts["group"], texts["text"], strict=True)
    ]
    frame = pd.DataFrame(
        {
            "sample_id": sample_ids,
            "source": label.to_numpy(),
            "prompt_id": prompt_ids,
            "text": texts["text"].to_numpy(),
        }
    )
    # the n-th text of a source under one group: the axis of "more training texts per group"
    frame["sample_index"] = frame.groupby(["source", "prompt_id"], sort=False).cumcount().astype(np.int64)
    return frame


def collected_conditions(collected: Collected, name: str, seed: int) -> dict[str, ConditionData]:
    """The corpus as a condition (one label per source), and the null control: the largest source's
    groups split at random into two halves, labelled ``source@a`` and ``source@b``."""
    texts = collected.frame
    inputs = {collected.path.name: _corpus_hash(collected.path)}
    out = {name: condition_data(name, _frame(texts, texts["source"]), "source", inputs)}
    counts = texts["source"].value_counts()
    largest = sorted(counts[counts == counts.max()].index)[0]
    mine = texts[texts["source"] == largest]
    groups = sorted(mine["group"].unique())
    if len(groups) >= 2 * MIN_TEXTS:
        order = np.random.default_rng(seed).permutation(len(groups))
        half = {groups[i]: NULL_HALVES[rank % 2] for rank, i in enumerate(order)}
        labels = mine["group"].map(half).radd(f"{largest}@")
        out[NULL_CONDITION] = condition_data(NULL_CONDITION, _frame(mine, labels), "source", inputs)
    return out


def _corpus_hash(path: Path) -> str:
    if path.is_file():
        return sha256_file(path)
    return hash_obj({str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()})


def collected_config(cfg: Config, name: str) -> Config:
    """``cfg`` as the run ``name``: its attribution settings, with the paths of a run of that name."""
    try:
        run = RunSettings.model_validate({**cfg.run.model_dump(), "name": name})
    except ValueError:
        raise NatprintsError(f"--name {name!r}: letters, digits, '.', '_' and '-' only") from None
    attribution = cfg.attribution.model_copy(
        update={"featurizers": [f for f in cfg.attribution.featurizers if f not in NEEDS_RUN_TOKENIZER]}
    )
    return cfg.model_copy(update={"run": run, "attribution": attribution})


@dataclass
class CollectedResult:
    """What :func:`run_collected` wrote, and its per-condition best pipelines."""

    reports: Path
    attributor: Path
    records: list[dict[str, Any]]
    did_work: bool


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_collected(
    cfg: Config, corpus: Path | str, *, name: str | None = None, force: bool = False, progress: bool = True
) -> CollectedResult:
    """Attribution experiments on a labelled corpus: writes ``reports/<name>/`` (results, tables,
    figures, index.md) and ``models/<name>/attributors/<name>/``. Idempotent on the same corpus and
    settings. ``cfg`` gives the attribution settings; ``name`` (default: the corpus file's stem) the run."""
    from threadpoolctl import threadpool_limits

    from natprints.attribution import experiments as ex
    from natprints.records import load_records, write_results

    corpus = Path(corpus)
    name = name or corpus.stem
    cfg = collected_config(cfg, name)
    collected = read_collected(corpus, cfg.attribution.max_text_bytes)
    if collected.skipped:
        _log(collected.skipped_line())
    conditions = collected_conditions(collected, name, cfg.attribution.split_seed)
    if NULL_CONDITION not in conditions:
        _log(f"{corpus}: no null control (its largest source has fewer than {2 * MIN_TEXTS} groups to halve)")
    paths = cfg.paths
    key = hash_obj(
        {
            "version": COLLECTED_VERSION,
            "experiments": ex.EXPERIMENTS_VERSION,
            "attribution": cfg.attribution.model_dump(mode="json"),
            "inputs": conditions[name].inputs,
            "name": name,
        }
    )
    manifest = Manifest(paths.reports, "collected-text experiments", COLLECTED_MANIFEST)
    attributor_dir = paths.attributors / name
    if not force and manifest.is_current(key) and (attributor_dir / MANIFEST).is_file():
        return CollectedResult(paths.reports, attributor_dir, load_records(paths.reports), False)
    started = time.perf_counter()
    prompts = pd.concat([d.frame["prompt_id"] for d in conditions.values()]).astype(str)
    split = split_prompts(prompts, cfg.attribution.test_fraction, CALIBRATION_FRACTION, cfg.attribution.split_seed)
    for data in conditions.values():
        parts = split_parts(data, split)
        for i, label in enumerate(data.labels):
            n = {s: int((parts[s]["label"] == i).sum()) for s in ("train", "test")}
            if not all(n.values()):
                raise NatprintsError(
                    f"{corpus}: source {label!r} has no {'training' if not n['train'] else 'test'} text after the "
                    f"split by group ({int((data.frame['label'] == i).sum())} texts); give it more texts or groups"
                )
    records: list[dict[str, Any]] = []
    with threadpool_limits(limits=THREADS):
        setup = Setup(cfg=cfg, split=split, tokenizer=None, progress=progress, open_set=(name,))
        attributor = None
        for condition, data in conditions.items():
            done, fitted = ex.run_condition(setup, data, None)
            records += done
            attributor = fitted if condition == name else attributor
    assert attributor is not None
    manifest.invalidate()
    params = attributor.pipeline.get_params(deep=True)
    attributor.pipeline.set_params(**{k: None for k in params if k.endswith("cache_dir")})
    save_attributor(
        attributor_dir,
        attributor,
        {"run": name, "condition": name, "corpus": str(corpus), "inputs": conditions[name].inputs, "key": key},
    )
    files = write_results(paths.reports, records)
    fields = {
        "stage": "collected",
        "run": name,
        "corpus": str(corpus),
        "inputs": conditions[name].inputs,
        "skipped": dict(collected.skipped),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "seconds": setup.timings,
    }
    manifest.write(key, fields, files)
    return CollectedResult(paths.reports, attributor_dir, records, True)


def summary_lines(records: list[dict[str, Any]]) -> list[str]:
    """One line per condition: its chosen pipeline's accuracy with its interval, chance, and what
    text length alone reaches (flagged when length gives the source away)."""
    from natprints.records import accuracy_table

    table = accuracy_table(records)
    lengths = {r["condition"]: r for r in records if r["kind"] == "length_control"}
    lines = []
    for row in table[table["best"]].itertuples():
        length = lengths[row.condition]
        lines.append(
            f"{row.condition}: {row.pipeline} accuracy {row.accuracy:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}], "
            f"chance {row.chance:.3f}; length only {length['accuracy']:.3f}"
            + (" (length leaks)" if length["leaks"] else "")
        )
    return lines
