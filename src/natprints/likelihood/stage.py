"""The `likelihood` stage: every text the tables use, scored under every model of its conditions.

For each condition, each member model scores the test- and calibration-split continuations of every
member (the null control: the base model scores both of its sampling seeds' texts). One job per
scoring model (loaded once), ``[run] workers`` at a time, largest first. Each scorer's rows go to
``data/likelihood/<run>/<model-id>.parquet``, cached by the model's weights hash and a hash of each
row (sample id, prompt and continuation tokens, sampling transform): a rerun scores only what is
missing, and a retrained model is scored anew.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from natprints.artifacts import Manifest, hash_obj, read_manifest, sha256_text, temp_path_for
from natprints.attribution.data import ConditionData, load_conditions, run_split
from natprints.config import Config
from natprints.errors import NatprintsError
from natprints.runtime import load_lm, run_jobs, setup_torch

SCORED_SPLITS = ("test", "cal")
LIKELIHOOD_VERSION = 1
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


def _row_key(sample_id: str, prompt: list[int], tokens: list[int], transform: tuple) -> str:
    return sha256_text(f"{sample_id}|{prompt}|{tokens}|{transform}")[:24]


def scoring_rows(cfg: Config, conditions: dict[str, ConditionData]) -> dict[str, pd.DataFrame]:
    """Scoring model -> the rows it scores (each text of a scored split, once per model)."""
    from natprints.generate.stage import build_prompts

    prompts = build_prompts(cfg).set_index("prompt_id")["prompt_token_ids"]
    split = run_split(cfg, conditions)
    wanted: dict[str, dict[str, pd.Series]] = {}
    for data in conditions.values():
        frame = data.frame[data.frame["prompt_id"].astype(str).map(split).isin(SCORED_SPLITS)]
        scorers = sorted(data.frame["model_id"].astype(str).unique())  # the null control: its one model
        for scorer in scorers:
            rows = wanted.setdefault(scorer, {})
            for row in frame.itertuples(index=False):
                rows.setdefault(str(row.sample_id), row)
    return {scorer: text_rows(list(rows.values()), prompts) for scorer, rows in wanted.items()}


ROW_COLUMNS = ["row_key", "sample_id", "prompt", "tokens", "temperature", "top_k", "top_p", "new_tokens"]


def text_rows(texts: list, prompts: pd.Series) -> pd.DataFrame:
    """Generated rows (with ``sample_id``, ``prompt_id``, ``token_ids`` and the sampling transform) as
    the rows :func:`score_model` scores; ``prompts``: prompt id -> its token ids."""
    records = []
    for row in texts:
        prompt = [int(t) for t in prompts.loc[row.prompt_id]]
        tokens = [int(t) for t in row.token_ids]
        transform = (float(row.temperature), int(row.top_k), float(row.top_p), int(row.new_tokens))
        records.append(
            (_row_key(str(row.sample_id), prompt, tokens, transform), str(row.sample_id), prompt, tokens, *transform)
        )
    return pd.DataFrame(records, columns=ROW_COLUMNS)


def _model_sha256(model_dir: Path) -> str:
    return read_manifest(model_dir, f"model {model_dir.name}")["files"]["model.safetensors"]


def _read_cache(path: Path, model_sha256: str) -> pd.DataFrame:
    """The rows a scorer already has, when they were scored by these weights (else none)."""
    import pyarrow.parquet as pq

    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    try:
        table = pq.read_table(path)
    except Exception:  # a truncated or foreign file is rescored, not trusted
        return pd.DataFrame(columns=COLUMNS)
    meta = table.schema.metadata or {}
    if meta.get(b"model_sha256", b"").decode() != model_sha256 or table.column_names != COLUMNS:
        return pd.DataFrame(columns=COLUMNS)
    return table.to_pandas()


def _write(path: Path, frame: pd.DataFrame, model_sha256: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame[COLUMNS], preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"model_sha256": model_sha256.encode()})
    tmp = temp_path_for(path)
    try:
        pq.write_table(table, tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def score_model(
    cfg: Config, model_dir: Path, rows: pd.DataFrame, path: Path, sha: str | None = None, *, progress: bool = True
) -> int:
    """Score the rows the model at ``model_dir`` lacks in ``path``; returns how many were scored now.

    ``sha``: the weights' hash the cache is keyed by (default: from the model's own manifest).
    """
    import torch
    from tqdm.auto import tqdm

    from natprints.corpus import load_tokenizer
    from natprints.likelihood.scorer import score_texts

    model_id = model_dir.name
    sha = sha or _model_sha256(model_dir)
    cached = _read_cache(path, sha)
    cached = cached[cached["row_key"].isin(set(rows["row_key"]))]
    missing = rows[~rows["row_key"].isin(set(cached["row_key"]))]
    if missing.empty:
        return 0
    device = setup_torch(cfg)
    eos = load_tokenizer(cfg.paths.tokenizer).eos_token_id
    model = load_lm(model_dir, device=device)
    frames = [cached] if len(cached) else []
    chunk = 4 * cfg.likelihood.batch_size
    transforms = missing.groupby(["temperature", "top_k", "top_p", "new_tokens"], sort=True)
    bar = tqdm(total=len(missing), desc=f"likelihood {model_id}", unit="text", leave=False, disable=not progress)
    with torch.inference_mode():
        for (temperature, top_k, top_p, new_tokens), group in transforms:
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
                )
                frames.append(
                    pd.DataFrame(
                        {
                            "row_key": part["row_key"].to_numpy(),
                            "sample_id": part["sample_id"].to_numpy(),
                            "events": [len(s.token_logprobs) for s in scores],
                            "ends_with_eos": [s.ends_with_eos for s in scores],
                            "loglik": [s.loglik for s in scores],
                            "entropy_sum": [float(s.entropy.sum()) for s in scores],
                            "variance_sum": [float(s.logprob_variance.sum()) for s in scores],
                            "token_logprobs": [s.token_logprobs for s in scores],
                            "token_entropy": [s.entropy.astype(np.float32) for s in scores],
                            "token_variance": [s.logprob_variance.astype(np.float32) for s in scores],
                        },
                        columns=COLUMNS,
                    )
                )
                bar.update(len(part))
                merged = pd.concat(frames, ignore_index=True).sort_values("row_key", kind="stable")
                _write(path, merged.reset_index(drop=True), sha)  # resumable: a killed job keeps its rows
                frames = [merged]
    bar.close()
    return len(missing)


def stage_key(cfg: Config, rows: dict[str, pd.DataFrame]) -> str:
    return hash_obj(
        {
            "version": LIKELIHOOD_VERSION,
            "scorers": {m: _model_sha256(cfg.paths.zoo / m) for m in sorted(rows)},
            "rows": {m: hash_obj(sorted(r["row_key"])) for m, r in sorted(rows.items())},
        }
    )


def _manifest(cfg: Config) -> Manifest:
    return Manifest(cfg.paths.likelihood, "likelihood scores", remake="natprints likelihood")


def score_all(cfg: Config, *, progress: bool = True) -> dict:
    """The `likelihood` stage; returns its manifest (``scored``: rows scored by this call)."""
    from natprints.zoo.stage import verified_model

    conditions = load_conditions(cfg)
    rows = scoring_rows(cfg, conditions)
    for model_id in rows:
        verified_model(cfg, model_id)  # cached scores of weights that changed on disk are not trusted
    key = stage_key(cfg, rows)
    manifest = _manifest(cfg)
    if manifest.is_current(key):
        return {**manifest.read(), "scored": 0}
    manifest.invalidate()
    cfg.paths.likelihood.mkdir(parents=True, exist_ok=True)
    sizes = {m: _scoring_cost(cfg, m, len(r)) for m, r in rows.items()}
    order = sorted(rows, key=lambda m: -sizes[m])
    jobs = [(cfg, cfg.paths.zoo / m, rows[m], cfg.paths.likelihood / f"{m}.parquet") for m in order]
    scored = sum(run_jobs(cfg.run.workers, score_model, jobs, "likelihood"))
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
