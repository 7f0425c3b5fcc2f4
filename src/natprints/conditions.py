"""Generated corpora as attribution problems: one labelled frame per condition, split by prompt.

Labels are the model ids the parquet rows carry (never file names or argument order); the null
control is the base model under two sampling seeds, labelled ``model@seed`` from the data.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from natprints.artifacts import MANIFEST, Manifest, sha256_file
from natprints.config import CONDITION_ORDER, NULL_CONDITION, Config
from natprints.declared import DECLARED, STRINGS
from natprints.errors import NatprintsError

OPEN_SET_MIN_MODELS = 3  # leaving one out must leave a known model and a best other one
CALIBRATION_FRACTION = 0.15  # share of prompts held out from training to calibrate attributors
GENERATED_COLUMNS = [  # the generated texts' schema: one row per continuation, as `generate` writes it
    "sample_id",
    "model_id",
    "prompt_id",
    "prompt",
    "text",
    "n_tokens",
    "token_ids",
    "sample_index",
    "sampling_seed",
    "temperature",
    "top_k",
    "top_p",
    "new_tokens",
]
REQUIRED_COLUMNS = tuple(c for c in GENERATED_COLUMNS if c not in ("prompt", "n_tokens"))  # what the tables read


@dataclass
class ConditionData:
    """One condition's texts: ``label`` indexes ``labels`` (model ids taken from the data)."""

    name: str
    labels: list[str]
    frame: pd.DataFrame
    inputs: dict[str, str]  # input file (relative to the generated dir) -> sha256
    # texts of models with tokenizers of their own (declared models, the zoo's `tokenizer` condition):
    # read as strings (no token ids), scored as strings under each model (natprints.likelihood.declared)
    strings: bool = False


def open_set_applies(data: ConditionData) -> bool:
    """Whether the condition gets the open-set test (its analytic test reads test-text moments)."""
    return len(data.labels) >= OPEN_SET_MIN_MODELS and data.name != NULL_CONDITION


def first_samples(frame: pd.DataFrame, cfg: Config) -> pd.Series:
    """Which rows of ``frame`` are among the first ``generate.samples_per_prompt`` continuations of
    their prompt: the run's own texts, not the extra training texts (``train_samples_per_prompt``)."""
    return frame["sample_index"] < cfg.generate.samples_per_prompt


def _read_generated(path: Path, columns: tuple[str, ...] = REQUIRED_COLUMNS) -> pd.DataFrame:
    if not path.is_file():
        raise NatprintsError(f"generated file missing: {path} (run `natprints generate`)")
    try:
        frame = pd.read_parquet(path, columns=list(columns))
    except (OSError, ValueError, KeyError) as exc:
        raise NatprintsError(f"{path}: unreadable generated file or missing columns ({exc})") from None
    if frame.empty:
        raise NatprintsError(f"{path}: no generated texts")
    return frame


def load_conditions(cfg: Config, *, declared: bool = False) -> dict[str, ConditionData]:
    """Read the generated corpora as one :class:`ConditionData` per condition, plus the null control;
    with ``declared``, also the conditions whose models read text with tokenizers of their own (the
    zoo's ``tokenizer`` condition, then the declared models'), as strings."""
    gen_dir = cfg.paths.generated
    manifest = Manifest(gen_dir, "generated corpora").read()
    if manifest.get("complete") is False:
        raise NatprintsError(f"generated corpora at {gen_dir} are incomplete; rerun `natprints generate`")
    Manifest(gen_dir, "generated corpora", remake="natprints generate").verify()
    models = manifest.get("models")
    conditions = manifest.get("conditions")
    if not isinstance(models, dict) or not isinstance(conditions, dict):
        raise NatprintsError(f"{gen_dir}/manifest.json lacks 'models' or 'conditions'")
    frames: dict[str, pd.DataFrame] = {}
    inputs: dict[str, str] = {}

    def model_frame(model_id: str) -> pd.DataFrame:
        if model_id not in frames:
            entry = models.get(model_id)
            if not isinstance(entry, dict) or "file" not in entry:
                raise NatprintsError(f"{gen_dir}/manifest.json: condition lists unknown model {model_id!r}")
            frame = _read_generated(gen_dir / entry["file"])
            found = set(frame["model_id"].astype(str))
            if found != {model_id}:
                raise NatprintsError(
                    f"{gen_dir / entry['file']}: holds texts of {sorted(found)}, manifest says {model_id!r}"
                )
            frames[model_id] = frame
            inputs[entry["file"]] = sha256_file(gen_dir / entry["file"])
        return frames[model_id]

    out: dict[str, ConditionData] = {}
    names = [c for c in CONDITION_ORDER if c in conditions] + sorted(set(conditions) - set(CONDITION_ORDER))
    for name in names:
        ids = sorted(dict.fromkeys(str(m) for m in conditions[name]))
        if len(ids) < 2:
            continue  # one model is not a classification problem
        frame = pd.concat([model_frame(m) for m in ids], ignore_index=True)
        files = {models[m]["file"]: inputs[models[m]["file"]] for m in ids}
        out[name] = condition_data(name, frame, "model_id", files)
    null = manifest.get("null_control")
    if isinstance(null, dict) and "file" in null:
        base_id = str(null["model_id"])
        base = model_frame(base_id)
        other = _read_generated(gen_dir / null["file"])
        files = {models[base_id]["file"]: inputs[models[base_id]["file"]]}
        files[null["file"]] = sha256_file(gen_dir / null["file"])
        both = pd.concat([base, other], ignore_index=True)
        # The two classes are one model sampled with two seeds: the label is model@seed, from the data.
        both["null_label"] = both["model_id"].astype(str) + "@seed" + both["sampling_seed"].astype(str)
        if both["null_label"].nunique() != 2:
            raise NatprintsError(f"{gen_dir}: the null control needs the base model under two sampling seeds")
        out[NULL_CONDITION] = condition_data(NULL_CONDITION, both, "null_label", files)
    for name in (STRINGS, DECLARED) if declared else ():
        if isinstance(manifest.get(name), dict):
            out.update(_declared_conditions(gen_dir, manifest[name], inputs))
    if not out:
        raise NatprintsError(f"{gen_dir}: no condition with two or more models to attribute")
    return out


def _declared_conditions(gen_dir: Path, section: dict, inputs: dict[str, str]) -> dict[str, ConditionData]:
    """Conditions of models with tokenizers of their own: their texts without token ids (each model's
    own), as strings."""
    models = section.get("models") if isinstance(section.get("models"), dict) else {}
    out = {}
    for name, labels in (section.get("conditions") or {}).items():
        frames, files = [], {}
        for label in labels:
            entry = models.get(label)
            if not isinstance(entry, dict) or "file" not in entry:
                raise NatprintsError(f"{gen_dir}/{MANIFEST}: condition {name} lists unknown model {label!r}")
            frame = _read_generated(gen_dir / entry["file"], (*REQUIRED_COLUMNS, "prompt"))
            if set(frame["model_id"].astype(str)) != {label}:
                raise NatprintsError(f"{gen_dir / entry['file']}: holds texts of another model than {label!r}")
            frames.append(frame.drop(columns=["token_ids"]))
            files[entry["file"]] = inputs.setdefault(entry["file"], sha256_file(gen_dir / entry["file"]))
        data = condition_data(name, pd.concat(frames, ignore_index=True), "model_id", files)
        data.strings = True
        out[name] = data
    return out


def condition_data(name: str, frame: pd.DataFrame, label_column: str, files: dict[str, str]) -> ConditionData:
    labels = sorted(frame[label_column].astype(str).unique())
    index = {m: i for i, m in enumerate(labels)}
    frame = frame.assign(label=frame[label_column].astype(str).map(index).astype(np.int64))
    frame = frame.sort_values(["label", "prompt_id", "sample_id"], kind="stable").reset_index(drop=True)
    return ConditionData(name=name, labels=labels, frame=frame, inputs=dict(sorted(files.items())))


def split_prompts(prompt_ids: Iterable[str], test_fraction: float, cal_fraction: float, seed: int) -> dict[str, str]:
    """Assign each prompt to ``train``, ``cal`` or ``test``: every continuation of a prompt goes together."""
    prompts = sorted(set(map(str, prompt_ids)))
    order = np.random.default_rng(seed).permutation(len(prompts))
    n = len(prompts)
    n_test = min(max(1, round(test_fraction * n)), max(n - 1, 0))
    n_cal = min(max(1, round(cal_fraction * n)), max(n - n_test - 1, 0)) if cal_fraction > 0 else 0
    split = {}
    for rank, i in enumerate(order):
        split[prompts[i]] = "test" if rank < n_test else "cal" if rank < n_test + n_cal else "train"
    return split


def run_split(cfg: Config, conditions: dict[str, ConditionData]) -> dict[str, str]:
    """The run's prompt split (train, cal, test) over every prompt of every condition."""
    prompts = pd.concat([d.frame["prompt_id"] for d in conditions.values()]).astype(str)
    s = cfg.attribution
    return split_prompts(prompts, s.test_fraction, CALIBRATION_FRACTION, s.split_seed)


def repeat_seeds(cfg: Config) -> list[int]:
    """The split seeds the headline figures are repeated over, besides the run's own split."""
    first = cfg.attribution.split_seed
    return list(range(first + 1, first + cfg.attribution.splits))


def repeat_split(prompt_ids: Iterable[str], cfg: Config, seed: int) -> dict[str, str]:
    """The prompt split ``seed`` of the repeated splits, over ``prompt_ids`` (a condition's or a model's)."""
    return split_prompts(prompt_ids, cfg.attribution.test_fraction, CALIBRATION_FRACTION, seed)


def split_parts(data: ConditionData, split: dict[str, str]) -> dict[str, pd.DataFrame]:
    where = data.frame["prompt_id"].astype(str).map(split).fillna("train")
    return {s: data.frame[where == s].reset_index(drop=True) for s in ("train", "cal", "test")}
