"""The `likelihood` stage: every text the tables use, scored under every model of its conditions.

For each condition, each member model scores the test- and calibration-split continuations of every
member (the null control: the base model scores both of its sampling seeds' texts). One job per
scoring model (loaded once), ``[run] workers`` at a time, largest first. Each scorer's rows go to
``data/likelihood/<run>/<model-id>.parquet``, cached by the model's weights hash and a hash of each
row (sample id, prompt and continuation tokens, sampling transform): a rerun scores only what is
missing, and a retrained model is scored anew. Each position's entropy and variance of log p are
scored only for the rows the open-set tests read (in a condition with an open-set test: the test-split
texts, and each model's own calibration- and training-split texts under it, which calibrate the joint
test); elsewhere they are NaN, and a row that comes to need them is scored again.

Each test text whose canonical tokenization (the text re-tokenized) differs from the ids it was
sampled as is also scored as those canonical ids, under the sample id ``<id>~canonical`` and without
an end event: what a scorer that sees only the string can compute (the string-level ceiling). With
``[likelihood] segmentation_beam`` > 0 every test text is also scored as a string over its most
probable segmentations (:mod:`natprints.likelihood.segmentations`), under ``<id>~string``: ``loglik``
is the log of the summed probability of the paths found, ``events`` how many paths were summed.

Each model of a condition with the open-set test also scores, with moments, texts no model wrote: the
held-out paragraph's own continuation of each test prompt (``human:<prompt id>``) and as many junk
tokens (``junk:<prompt id>``), the negatives of the open-set tests (``outsider_texts`` in
``generate.stage``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from natprints.artifacts import MANIFEST as MANIFEST_NAME
from natprints.artifacts import Manifest, hash_obj, read_manifest, sha256_file, sha256_text, temp_path_for
from natprints.conditions import ConditionData, first_samples, load_conditions, open_set_applies, run_split
from natprints.config import Config
from natprints.errors import NatprintsError
from natprints.runtime import Job, StageResult, load_lm, run_jobs, setup_torch

SCORED_SPLITS = ("test", "cal")
CANONICAL = "~canonical"  # a sample id with this suffix: the text's canonical tokenization
STRING = "~string"  # ... the text as a string, summed over its most probable segmentations
LIKELIHOOD_VERSION = 2  # 2: moments only where the open-set tests read them
COLUMNS = [
    "row_key",
    "sample_id",
    "events",
    "ends_with_eos",
    "loglik",
    "entropy_sum",
    "variance_sum",
    "token_logprobs",
    "token_entropy",
    "token_variance",
]


def prompt_lists(prompts: pd.Series) -> dict[str, list[int]]:
    """Prompt id -> its token ids as ints, for lookups once a text (``Series.loc`` costs about 50 us a
    call: a third of a `reference` rerun with nothing to do on the default run)."""
    return {pid: int_list(ids) for pid, ids in prompts.items()}


def int_list(ids: Any) -> list[int]:
    """Token ids (a list or an integer array) as a list of Python ints."""
    return np.asarray(ids, dtype=np.int64).tolist()


def _row_key(sample_id: str, prompt: list[int], tokens: list[int], transform: tuple) -> str:
    return sha256_text(f"{sample_id}|{prompt}|{tokens}|{transform}")[:24]


def scoring_rows(
    cfg: Config,
    conditions: dict[str, ConditionData],
    *,
    canonical: bool = False,
    outsiders: bool = False,
    own_train: bool = False,
) -> dict[str, pd.DataFrame]:
    """Scoring model -> the rows it scores (each text of a scored split, once per model); a row's
    ``moments`` is True where the open-set tests read them: the test texts of a condition that gets
    the test, and the scorer's own calibration (and, with ``own_train``, training) texts there.
    ``canonical``: also each test text's canonical tokenization where it differs from the sampled ids
    (:func:`canonical_rows`). ``outsiders``: also, for a condition with the
    open-set test, the human and junk texts of its test prompts (:func:`outsider_rows`).
    ``own_train``: also, for a condition with the open-set test, each model's own training-split texts
    (as many per prompt as a test prompt has) under that model: the likelihood ceiling learns nothing
    from them, so they calibrate the open-set thresholds beside the calibration texts."""
    from natprints.generate.stage import build_prompts, outsider_texts

    prompts = build_prompts(cfg).set_index("prompt_id")["prompt_token_ids"]
    split = run_split(cfg, conditions)
    wanted: dict[str, dict[str, pd.Series]] = {}
    needs: dict[str, set[str]] = {}
    tests: dict[str, set[str]] = {}
    strange: dict[str, set[str]] = {}
    for data in conditions.values():
        where = data.frame["prompt_id"].astype(str).map(split)
        frame = data.frame[where.isin(SCORED_SPLITS)]
        test_ids = set(data.frame.loc[where == "test", "sample_id"].astype(str))
        tested = where == "test" if open_set_applies(data) else pd.Series(False, index=where.index)
        with_moments = set(data.frame.loc[tested, "sample_id"].astype(str))
        test_prompts = set(data.frame.loc[tested, "prompt_id"].astype(str))
        scorers = sorted(data.frame["model_id"].astype(str).unique())  # the null control: its one model
        calibrating = (where == "train") & first_samples(data.frame, cfg)
        for scorer in scorers:
            rows = wanted.setdefault(scorer, {})
            for row in frame.itertuples(index=False):
                rows.setdefault(str(row.sample_id), row)
            needs.setdefault(scorer, set()).update(with_moments)
            if open_set_applies(data):  # a model's own calibration texts under it calibrate the joint test
                mine = data.frame["model_id"].astype(str) == scorer
                needs[scorer].update(data.frame.loc[mine & (where == "cal"), "sample_id"].astype(str))
            if own_train and open_set_applies(data):
                own = data.frame[calibrating & (data.frame["model_id"].astype(str) == scorer)]
                for row in own.itertuples(index=False):
                    rows.setdefault(str(row.sample_id), row)
                needs[scorer].update(own["sample_id"].astype(str))
            tests.setdefault(scorer, set()).update(test_ids)
            strange.setdefault(scorer, set()).update(test_prompts)
    out = {}
    memo: dict[str, tuple] = {}
    canonical_ids = _canonical_ids(cfg, [r for rows in wanted.values() for r in rows.values()]) if canonical else {}
    strangers = outsider_texts(cfg, set().union(*strange.values())) if outsiders and strange else None
    for scorer, rows in wanted.items():
        frame = text_rows(list(rows.values()), prompts, memo)
        frame = frame.assign(moments=frame["sample_id"].isin(needs[scorer]))
        if canonical:
            tested = [row for sid, row in rows.items() if sid in tests[scorer]]
            parts = [frame, canonical_rows(tested, prompts, canonical_ids)]
            if cfg.likelihood.segmentation_beam:
                parts.append(string_rows(cfg, tested, prompts, canonical_ids))
            frame = pd.concat(parts, ignore_index=True)
        if strangers is not None and strange[scorer]:
            mine = strangers[strangers["prompt_id"].isin(strange[scorer])]
            frame = pd.concat([frame, outsider_rows(cfg, mine, prompts)], ignore_index=True)
        out[scorer] = frame
    return out


def outsider_rows(cfg: Config, texts: pd.DataFrame, prompts: pd.Series) -> pd.DataFrame:
    """Rows scoring :func:`~natprints.generate.stage.outsider_texts` (human continuations and junk)
    under the run's sampling transform, with moments (the analytic open-set test reads them). A human
    continuation shorter than ``new_tokens`` ended its paragraph: its end event is scored, as a
    generated text's EOS is."""
    g = cfg.generate
    records = []
    prompt_of = prompt_lists(prompts)
    for row in texts.itertuples(index=False):
        prompt = prompt_of[row.prompt_id]
        tokens = int_list(row.token_ids)
        transform = (float(g.temperature), int(g.top_k), float(g.top_p), int(g.new_tokens))
        key = _row_key(str(row.sample_id), prompt, tokens, transform)
        records.append((key, str(row.sample_id), prompt, tokens, *transform, True))
    return pd.DataFrame(records, columns=ROW_COLUMNS)


def _canonical_ids(cfg: Config, texts: list) -> dict[str, list[int]]:
    """Sample id -> the run tokenizer's ids of the text, for texts whose ids differ from the sampled ones
    (and hold no EOS: a continuation never does)."""
    from natprints.corpus import load_tokenizer

    tokenizer = load_tokenizer(cfg.paths.tokenizer)
    unique = list({str(row.sample_id): row for row in texts}.values())
    ids = tokenizer([str(row.text) for row in unique], add_special_tokens=False)["input_ids"] if unique else []
    out = {}
    for row, canonical in zip(unique, ids, strict=True):
        canonical = [int(t) for t in canonical]
        if canonical and canonical != [int(t) for t in row.token_ids] and tokenizer.eos_token_id not in canonical:
            out[str(row.sample_id)] = canonical
    return out


def canonical_rows(texts: list, prompts: pd.Series, canonical: dict[str, list[int]]) -> pd.DataFrame:
    """Rows scoring each text's canonical ids (where ``canonical`` has them) with no end event:
    ``new_tokens`` is their count, so the scorer adds no EOS after them."""
    records = []
    prompt_of = prompt_lists(prompts)
    for row in texts:
        ids = canonical.get(str(row.sample_id))
        if ids is None:
            continue
        prompt = prompt_of[row.prompt_id]
        transform = (float(row.temperature), int(row.top_k), float(row.top_p), len(ids))
        sample_id = str(row.sample_id) + CANONICAL
        records.append((_row_key(sample_id, prompt, ids, transform), sample_id, prompt, ids, *transform, False))
    return pd.DataFrame(records, columns=ROW_COLUMNS)


def string_rows(cfg: Config, texts: list, prompts: pd.Series, canonical: dict[str, list[int]]) -> pd.DataFrame:
    """Rows scoring each text as a string over its segmentations, from its canonical ids (its sampled
    ids where ``canonical`` has none: they are the canonical ones); ``new_tokens`` is their count and
    the beam is part of the row's key."""
    beam = int(cfg.likelihood.segmentation_beam)
    records = []
    prompt_of = prompt_lists(prompts)
    for row in texts:
        ids = canonical.get(str(row.sample_id))
        ids = int_list(row.token_ids) if ids is None else ids
        if not ids:
            continue
        prompt = prompt_of[row.prompt_id]
        transform = (float(row.temperature), int(row.top_k), float(row.top_p), len(ids))
        sample_id = str(row.sample_id) + STRING
        key = _row_key(sample_id, prompt, ids, (*transform, f"beam={beam}"))
        records.append((key, sample_id, prompt, ids, *transform, False))
    return pd.DataFrame(records, columns=ROW_COLUMNS)


ROW_COLUMNS = [
    "row_key",
    "sample_id",
    "prompt",
    "tokens",
    "temperature",
    "top_k",
    "top_p",
    "new_tokens",
    "moments",
]


def text_rows(texts: list, prompts: pd.Series, memo: dict[str, tuple] | None = None) -> pd.DataFrame:
    """Generated rows (with ``sample_id``, ``prompt_id``, ``token_ids`` and the sampling transform) as
    the rows :func:`score_model` scores; ``prompts``: prompt id -> its token ids. Each row's
    ``moments`` (score its per-position entropy and variance too) is False. ``memo``: sample id -> its
    row, shared by calls that make rows of the same texts for many scorers (a sample id names one
    generated text: its row is the same for every scorer)."""
    records = []
    memo = {} if memo is None else memo
    prompt_of = None
    for row in texts:
        sample_id = str(row.sample_id)
        record = memo.get(sample_id)
        if record is None:
            prompt_of = prompt_lists(prompts) if prompt_of is None else prompt_of
            prompt = prompt_of[row.prompt_id]
            tokens = int_list(row.token_ids)
            transform = (float(row.temperature), int(row.top_k), float(row.top_p), int(row.new_tokens))
            key = _row_key(sample_id, prompt, tokens, transform)
            record = memo[sample_id] = (key, sample_id, prompt, tokens, *transform, False)
        records.append(record)
    return pd.DataFrame(records, columns=ROW_COLUMNS)


def _model_sha256(model_dir: Path) -> str:
    return read_manifest(model_dir, f"model {model_dir.name}")["files"]["model.safetensors"]


SCORES_DIGEST = b"natprints_scores_sha256"  # parquet metadata: a digest of the file's rows, written with them


def _decoded_digest(table) -> str:
    """sha256 of the rows as parquet decodes them (Arrow IPC bytes, metadata left out): the same for
    the table a writer hands to parquet and for the file read back, whatever its row groups."""
    import hashlib

    import pyarrow as pa

    table = table.replace_schema_metadata(None).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()


def read_cache(
    path: Path, model_sha256: str, trusted: frozenset[str] = frozenset(), command: str = "natprints likelihood"
) -> pd.DataFrame:
    """The rows a scorer already has, when they were scored by these weights (else none).

    A file of these weights must prove its rows are the ones scored: it carries the digest written
    with them, or it matches a hash in ``trusted`` (the file hashes the stage's manifest recorded,
    for files written before the digest existed). Anything else is refused, naming the file, never
    re-hashed into a manifest: an edited score would otherwise reach every table. ``command``: the
    stage that rebuilds the file once it is removed.
    """
    import pyarrow.parquet as pq

    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    refusal = f"{path} does not match the scores written to it (tampered or corrupt); remove it and rerun `{command}`"
    try:
        table = pq.read_table(path)
    except Exception:
        raise NatprintsError(refusal) from None
    meta = table.schema.metadata or {}
    if (
        meta.get(b"model_sha256", b"").decode() != model_sha256
        or meta.get(b"likelihood_version", b"").decode() != str(LIKELIHOOD_VERSION)
        or table.column_names != COLUMNS
    ):
        return pd.DataFrame(columns=COLUMNS)  # scores of other weights or another version: scored anew
    recorded = meta.get(SCORES_DIGEST)
    if (recorded is None or recorded.decode() != _decoded_digest(table)) and sha256_file(path) not in trusted:
        raise NatprintsError(refusal)
    return table.to_pandas()


def _write(path: Path, frame: pd.DataFrame, model_sha256: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame[COLUMNS], preserve_index=False)
    encoded = pa.BufferOutputStream()
    pq.write_table(table, encoded)
    digest = _decoded_digest(pq.read_table(pa.BufferReader(encoded.getvalue())))
    meta = {
        b"model_sha256": model_sha256.encode(),
        b"likelihood_version": str(LIKELIHOOD_VERSION).encode(),
        SCORES_DIGEST: digest.encode(),
    }
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    tmp = temp_path_for(path)
    try:
        pq.write_table(table, tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_caches(jobs: list[Job], trusted: frozenset[str], command: str = "natprints likelihood") -> None:
    """Refuse an edited score file before its stage's manifest is invalidated, so that a refusal
    leaves the last good manifest in place (and the stages after it refusing too). ``jobs``: the
    stage's :func:`score_model` jobs, whose arguments are ``(cfg, model_dir, rows, path, ...)``."""
    for job in jobs:
        model_dir, path = job.args[1], job.args[3]
        if path.is_file() and (model_dir / MANIFEST_NAME).is_file():
            read_cache(path, _model_sha256(model_dir), trusted, command)


def recorded_files(manifest: Manifest) -> frozenset[str]:
    """The file hashes a stage's manifest recorded (none when it is missing or unreadable)."""
    try:
        files = manifest.read().get("files") if manifest.exists() else None
    except NatprintsError:
        return frozenset()
    return frozenset(files.values()) if isinstance(files, dict) else frozenset()


def score_model(
    cfg: Config,
    model_dir: Path,
    rows: pd.DataFrame,
    path: Path,
    sha: str | None = None,
    trusted: frozenset[str] = frozenset(),
    command: str = "natprints likelihood",
    *,
    progress: bool = True,
) -> int:
    """Score the rows the model at ``model_dir`` lacks in ``path``; returns how many were scored now.

    ``sha``: the weights' hash the cache is keyed by (default: from the model's own manifest). A row
    with ``moments`` True whose cached score lacks them is scored again, with them. ``trusted`` and
    ``command``: see :func:`read_cache`.
    """
    import torch
    from tqdm.auto import tqdm

    from natprints.corpus import load_tokenizer
    from natprints.likelihood.scorer import as_scorer, score_texts
    from natprints.likelihood.segmentations import string_reader

    model_id = model_dir.name
    sha = sha or _model_sha256(model_dir)
    cached = read_cache(path, sha, trusted, command)
    cached = cached[cached["row_key"].isin(set(rows["row_key"]))]
    # scored without moments (a string's sum over paths has none: it is never scored again for them)
    lacking = set(cached.loc[cached["entropy_sum"].isna() & ~cached["sample_id"].str.endswith(STRING), "row_key"])
    keys = rows["row_key"]
    missing = rows[~keys.isin(set(cached["row_key"])) | (rows["moments"].astype(bool) & keys.isin(lacking))]
    cached = cached[~cached["row_key"].isin(set(missing["row_key"]))]
    if missing.empty:
        return 0
    device = setup_torch(cfg)
    eos = load_tokenizer(cfg.paths.tokenizer).eos_token_id
    model = as_scorer(load_lm(model_dir, device=device))
    frames = [cached] if len(cached) else []
    chunk = 4 * cfg.likelihood.batch_size
    is_string = missing["sample_id"].astype(str).str.endswith(STRING)
    strings, missing = missing[is_string], missing[~is_string]
    scored = len(strings) + len(missing)
    bar = tqdm(total=scored, desc=f"likelihood {model_id}", unit="text", leave=False, disable=not progress)
    transforms = missing.groupby(["temperature", "top_k", "top_p", "new_tokens", "moments"], sort=True)
    with torch.inference_mode():
        reader = string_reader(load_tokenizer(cfg.paths.tokenizer)) if len(strings) else None
        for start in range(0, len(strings), chunk):
            part = strings.iloc[start : start + chunk]
            frames.append(_score_strings(cfg, model, reader, part, eos, device))
            bar.update(len(part))
            merged = pd.concat(frames, ignore_index=True).sort_values("row_key", kind="stable")
            _write(path, merged.reset_index(drop=True), sha)
            frames = [merged]
        for (temperature, top_k, top_p, new_tokens, moments), group in transforms:
            for start in range(0, len(group), chunk):
                part = group.iloc[start : start + chunk]
                scores = score_texts(
                    model,
                    part["prompt"].tolist(),
                    part["tokens"].tolist(),
                    eos_id=eos,
                    new_tokens=int(new_tokens),
                    temperature=float(temperature),
                    top_k=int(top_k),
                    top_p=float(top_p),
                    batch_size=cfg.likelihood.batch_size,
                    device=device,
                    moments=bool(moments),
                )
                frames.append(
                    pd.DataFrame(
                        {
                            "row_key": part["row_key"].to_numpy(),
                            "sample_id": part["sample_id"].to_numpy(),
                            "events": [len(s.token_logprobs) for s in scores],
                            "ends_with_eos": [s.ends_with_eos for s in scores],
                            "loglik": [s.loglik for s in scores],
                            "entropy_sum": [_sum(s.entropy) for s in scores],
                            "variance_sum": [_sum(s.logprob_variance) for s in scores],
                            "token_logprobs": [s.token_logprobs for s in scores],
                            "token_entropy": [_float32(s.entropy) for s in scores],
                            "token_variance": [_float32(s.logprob_variance) for s in scores],
                        },
                        columns=COLUMNS,
                    )
                )
                bar.update(len(part))
                merged = pd.concat(frames, ignore_index=True).sort_values("row_key", kind="stable")
                _write(path, merged.reset_index(drop=True), sha)  # resumable: a killed job keeps its rows
                frames = [merged]
    bar.close()
    return scored


def _score_strings(cfg: Config, model, reader: tuple, rows: pd.DataFrame, eos: int, device: str) -> pd.DataFrame:
    """Rows of :func:`string_rows` scored over their segmentations (one sampling transform per group)."""
    from natprints.likelihood.segmentations import score_segmentations

    surf, tokenize = reader
    parts = []
    for (temperature, top_k, top_p), group in rows.groupby(["temperature", "top_k", "top_p"], sort=True):
        scores = score_segmentations(
            model,
            surf,
            tokenize,
            group["prompt"].tolist(),
            group["tokens"].tolist(),
            pad_id=eos,
            temperature=float(temperature),
            top_k=int(top_k),
            top_p=float(top_p),
            batch_size=cfg.likelihood.batch_size,
            device=device,
            beam=cfg.likelihood.segmentation_beam,
        )
        nan = float("nan")
        parts.append(
            pd.DataFrame(
                {
                    "row_key": group["row_key"].to_numpy(),
                    "sample_id": group["sample_id"].to_numpy(),
                    "events": [s.paths for s in scores],
                    "ends_with_eos": False,
                    "loglik": [s.loglik for s in scores],
                    "entropy_sum": nan,
                    "variance_sum": nan,
                    "token_logprobs": [np.zeros(0) for _ in scores],
                    "token_entropy": None,
                    "token_variance": None,
                },
                columns=COLUMNS,
            )
        )
    return pd.concat(parts, ignore_index=True)


def _sum(values: np.ndarray | None) -> float:
    return float("nan") if values is None else float(values.sum())


def _float32(values: np.ndarray | None) -> np.ndarray | None:
    return None if values is None else values.astype(np.float32)


def stage_key(cfg: Config, rows: dict[str, pd.DataFrame]) -> str:
    return hash_obj(
        {
            "version": LIKELIHOOD_VERSION,
            "scorers": {m: _model_sha256(cfg.paths.zoo / m) for m in sorted(rows)},
            "rows": {m: _rows_hash(r) for m, r in sorted(rows.items())},
        }
    )


def _rows_hash(rows: pd.DataFrame) -> str:
    """What a scorer's rows are: their keys and which of them carry moments."""
    return hash_obj(sorted([str(k), bool(m)] for k, m in zip(rows["row_key"], rows["moments"], strict=True)))


def _manifest(cfg: Config) -> Manifest:
    return Manifest(cfg.paths.likelihood, "likelihood scores", remake="natprints likelihood")


def score_all(cfg: Config, *, progress: bool = True) -> dict:
    """The `likelihood` stage; returns its manifest (``scored``: rows scored by this call)."""
    from natprints.zoo.stage import verified_model

    conditions = load_conditions(cfg)
    rows = scoring_rows(cfg, conditions, canonical=True, outsiders=True, own_train=True)
    for model_id in rows:
        verified_model(cfg, model_id)  # cached scores of weights that changed on disk are not trusted
    key = stage_key(cfg, rows)
    manifest = _manifest(cfg)
    if manifest.is_current(key):
        return {**manifest.read(), "scored": 0}
    trusted = recorded_files(manifest)
    sizes = {m: _scoring_cost(cfg, m, len(r)) for m, r in rows.items()}
    order = sorted(rows, key=lambda m: -sizes[m])
    jobs = [
        Job(m, (cfg, cfg.paths.zoo / m, rows[m], cfg.paths.likelihood / f"{m}.parquet", None, trusted)) for m in order
    ]
    check_caches(jobs, trusted)
    manifest.invalidate()
    cfg.paths.likelihood.mkdir(parents=True, exist_ok=True)
    scored = sum(run_jobs(cfg.run.worker_count(), score_model, jobs, "likelihood"))
    fields = {
        "stage": "likelihood",
        "run": cfg.run.name,
        "splits": list(SCORED_SPLITS),
        "scorers": {
            m: {"file": f"{m}.parquet", "rows": len(r), "model_sha256": _model_sha256(cfg.paths.zoo / m)}
            for m, r in rows.items()
        },
    }
    written = manifest.write(key, fields, [f"{m}.parquet" for m in rows])
    return {**written, "scored": scored}


def _scoring_cost(cfg: Config, model_id: str, n_rows: int) -> float:
    """Rows times the weights of the model's linear maps: the order in which jobs start (costliest first)."""
    from natprints.zoo.spec import linear_weights, zoo_specs

    return n_rows * linear_weights(cfg, zoo_specs(cfg)[model_id][0])


def likelihood_key(cfg: Config) -> str | None:
    """The key of the run's likelihood scores, or None when the stage has not run."""
    manifest = _manifest(cfg)
    return manifest.read().get("key") if manifest.exists() else None


def load_scores(cfg: Config, manifest: Manifest | None = None) -> dict[str, pd.DataFrame]:
    """Scoring model -> its scores indexed by sample id (verified against the stage's manifest)."""
    manifest = manifest or _manifest(cfg)
    if not manifest.exists():
        raise NatprintsError(f"no {manifest.what} for run '{cfg.run.name}'; run its stage first")
    fields = manifest.verify()
    out = {}
    for model_id, entry in fields["scorers"].items():
        frame = pd.read_parquet(manifest.directory / entry["file"])
        out[model_id] = frame.set_index("sample_id", drop=False)
    return out


def run(cfg: Config) -> StageResult:
    """The `likelihood` stage: the zoo's texts under the zoo's models, then the texts of models with
    tokenizers of their own as strings (:mod:`natprints.likelihood.declared`)."""
    from natprints.likelihood.declared import score_declared

    lines = []
    scored = 0
    for what, manifest in (
        ("", score_all(cfg)),
        (
            " (own tokenizers, as strings)",
            score_declared(cfg, load_conditions(cfg, declared=True))
            if cfg.models or cfg.conditions.tokenizer or cfg.conditions.families
            else None,
        ),
    ):
        if manifest is None:
            continue
        rows = sum(entry["rows"] for entry in manifest["scorers"].values())
        scored += manifest["scored"]
        lines.append(
            f"likelihood{what}: {rows} (text, model) scores from {len(manifest['scorers'])} models, "
            f"{manifest['scored']} new"
        )
    return StageResult(scored > 0, tuple(lines))
