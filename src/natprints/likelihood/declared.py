"""Scores as strings: every test and calibration text of a condition whose models read text with
tokenizers of their own (declared models, the zoo's ``tokenizer`` condition), under each model of the
condition, each with its own tokenizer (:mod:`natprints.likelihood.strings`).

The ceiling of a declared condition is the Bayes attributor on these scores: log p(text | prompt)
under the run's sampling transform, without an end event (a text cut to the character budget did not
end there), summed over the text's most probable segmentations into each model's tokens
(:mod:`natprints.likelihood.segmentations`, ``[likelihood] segmentation_beam``; 0: the canonical
tokens alone). ``canonical`` keeps the canonical path's score, and the moments (``entropy_sum``,
``variance_sum``) are the canonical path's. Scores live in ``data/likelihood/<run>/declared/`` with a
manifest keyed by each model's weights digest, its rows and the search's beam.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from natprints.artifacts import Manifest, hash_obj, sha256_text, temp_path_for
from natprints.conditions import ConditionData, run_split
from natprints.config import Config
from natprints.declared import DECLARED, verify_declared
from natprints.errors import NatprintsError
from natprints.runtime import Job, run_jobs

DECLARED_SCORES_VERSION = 3  # 2: a text the tokenizer cannot read back scores -inf; 3: over segmentations
SCORED = ("test", "cal")  # the ceiling learns nothing: its test and calibration texts are the ones it reads
COLUMNS = [
    "sample_id",
    "events",
    "loglik",
    "canonical",
    "paths",
    "representable",
    "entropy_sum",
    "variance_sum",
    "token_logprobs",
]


def _manifest(cfg: Config) -> Manifest:
    return Manifest(cfg.paths.likelihood / DECLARED, "declared-model scores", remake="natprints likelihood")


def declared_rows(cfg: Config, conditions: dict[str, ConditionData]) -> dict[str, pd.DataFrame]:
    """Model -> the texts it scores (``sample_id``, ``prompt``, ``text``): the test and calibration texts
    of every string condition it belongs to."""
    split = run_split(cfg, conditions)
    rows: dict[str, list[pd.DataFrame]] = {}
    for data in conditions.values():
        if not data.strings:
            continue
        frame = data.frame[data.frame["prompt_id"].astype(str).map(split).isin(SCORED)]
        for label in data.labels:
            rows.setdefault(label, []).append(frame[["sample_id", "prompt", "text"]])
    return {
        m: pd.concat(parts).drop_duplicates("sample_id").sort_values("sample_id", kind="stable").reset_index(drop=True)
        for m, parts in rows.items()
    }


def score_declared_model(
    cfg: Config, label: str, directory: Path, rows: pd.DataFrame, out: Path, *, progress: bool = True
) -> int:
    """Score ``rows`` under one model with its own tokenizer (else the run's); writes ``out`` (parquet)
    and returns the rows scored."""
    import torch

    from natprints.likelihood.scorer import as_scorer
    from natprints.likelihood.segmentations import score_segmentations, string_reader
    from natprints.likelihood.strings import load_candidates, reads_back, score_pairs
    from natprints.modeldir import fit_context
    from natprints.runtime import load_lm, resolve_device

    g = cfg.generate
    device = resolve_device(cfg.run.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    from natprints.corpus import load_tokenizer
    from natprints.modeldir import has_tokenizer

    run_tokenizer = None if has_tokenizer(directory) else load_tokenizer(cfg.paths.tokenizer)
    candidate = load_candidates({label: directory}, run_tokenizer)[label]
    tok = candidate.tokenizer
    texts = [list(ids) for ids in tok(rows["text"].tolist(), add_special_tokens=False)["input_ids"]]
    limit = candidate.info.max_positions
    # a text the tokenizer cannot read back, or longer than the model's positions leave after a context,
    # is one this model cannot write: probability 0 (scored as empty, then -inf)
    representable = np.array(
        [
            reads_back(tok, ids, t) and not (limit and len(ids) >= limit)
            for ids, t in zip(texts, rows["text"], strict=True)
        ],
        dtype=bool,
    )
    texts = [ids if ok else [] for ids, ok in zip(texts, representable, strict=True)]
    contexts = [
        fit_context(ids, len(text), limit, f"model {label}, text {sample_id}")
        for ids, text, sample_id in zip(
            tok(rows["prompt"].tolist(), add_special_tokens=False)["input_ids"], texts, rows["sample_id"], strict=True
        )
    ]
    model = as_scorer(load_lm(directory, device=device))
    transform = dict(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, batch_size=cfg.likelihood.batch_size)
    with torch.inference_mode():
        scores = score_pairs(model, (contexts, texts), end_id=candidate.pad, device=device, **transform)
        summed, paths = scores.loglik.copy(), np.ones(len(texts), dtype=np.int64)
        searched = [i for i, ids in enumerate(texts) if ids and representable[i]]
        if searched and cfg.likelihood.segmentation_beam:
            surf, tokenize = string_reader(tok)
            found = score_segmentations(
                model,
                surf,
                tokenize,
                [contexts[i] for i in searched],
                [texts[i] for i in searched],
                pad_id=candidate.pad,
                device=device,
                beam=cfg.likelihood.segmentation_beam,
                max_positions=limit,
                **transform,
            )
            # the search's gain over its own canonical pass, on the canonical score above (the two passes
            # batch differently, so they can differ in the last digits)
            summed[searched] += [f.loglik - f.canonical for f in found]
            paths[searched] = [f.paths for f in found]
    frame = pd.DataFrame(
        {
            "sample_id": rows["sample_id"].astype(str).to_numpy(),
            "events": scores.tokens,
            "loglik": np.where(representable, summed, -np.inf),
            "canonical": np.where(representable, scores.loglik, -np.inf),
            "paths": paths,
            "representable": representable,
            "entropy_sum": scores.entropy,
            "variance_sum": scores.variance,
            "token_logprobs": [t.astype(np.float32) for t in scores.token_logprobs],
        },
        columns=COLUMNS,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(out)
    frame.to_parquet(tmp, index=False)
    tmp.replace(out)
    return len(frame)


def score_declared(cfg: Config, conditions: dict[str, ConditionData]) -> dict | None:
    """Score what :func:`declared_rows` lists; a model whose rows, weights and file are as the manifest
    recorded them is not scored again. Returns the manifest, or None when the run declares no model."""
    rows = declared_rows(cfg, conditions)
    if not rows:
        return None
    weights = string_weights(cfg)
    manifest = _manifest(cfg)
    transform = [cfg.generate.temperature, cfg.generate.top_k, cfg.generate.top_p]
    keys = {
        m: hash_obj(
            {
                "version": DECLARED_SCORES_VERSION,
                "model_sha256": weights[m][1],
                "rows": _rows_hash(r),
                "transform": transform,
                "segmentation_beam": cfg.likelihood.segmentation_beam,
            }
        )
        for m, r in rows.items()
    }
    key = hash_obj(keys)
    if manifest.is_current(key):
        return {**manifest.read(), "scored": 0}
    try:
        recorded = manifest.read().get("scorers", {}) if manifest.exists() else {}
        damaged = set(manifest.mismatched()) if recorded else set()
    except NatprintsError:
        recorded, damaged = {}, set()
    redo = [m for m in rows if (recorded.get(m) or {}).get("key") != keys[m] or f"{m}.parquet" in damaged]
    manifest.invalidate()
    jobs = [Job(m, (cfg, m, weights[m][0], rows[m], manifest.directory / f"{m}.parquet")) for m in redo]
    scored = sum(run_jobs(cfg.run.worker_count(), score_declared_model, jobs, "likelihood (strings)")) if jobs else 0
    fields = {
        "stage": "likelihood",
        "run": cfg.run.name,
        "scorers": {
            m: {"file": f"{m}.parquet", "rows": len(r), "key": keys[m], "model_sha256": weights[m][1]}
            for m, r in rows.items()
        },
    }
    return {**manifest.write(key, fields, [f"{m}.parquet" for m in rows]), "scored": scored}


def string_weights(cfg: Config) -> dict[str, tuple[Path, str]]:
    """Every model that reads text as strings -> (its directory, its weights digest): the declared
    models and the zoo's models of string conditions (checked against their manifests)."""
    from natprints.zoo.spec import string_members
    from natprints.zoo.stage import verified_model

    out = {m: (d.path, d.model_sha256) for m, d in verify_declared(cfg).items()}
    for members in string_members(cfg).values():
        for m in members:
            out[m] = (cfg.paths.zoo / m, verified_model(cfg, m)["files"]["model.safetensors"])
    return out


def _rows_hash(rows: pd.DataFrame) -> str:
    lines = (f"{s}\t{sha256_text(p)}\t{sha256_text(t)}" for s, p, t in rows.itertuples(index=False))
    return sha256_text("\n".join(lines))


def declared_key(cfg: Config) -> str | None:
    """The key of the string scores, or None when they were not scored."""
    manifest = _manifest(cfg)
    return manifest.read().get("key") if manifest.exists() else None


def load_declared_scores(cfg: Config) -> dict[str, pd.DataFrame]:
    """Model -> its string scores indexed by sample id (verified against the manifest)."""
    from natprints.likelihood.stage import load_scores

    return load_scores(cfg, _manifest(cfg))
