"""The stage `reference`: black-box generative attributors built from a reference LM of the auditor's own.

An auditor has the public training corpus and the tokenizer trained on it, and each candidate
model's generated texts, but none of the zoo's weights. It trains its own reference LM on the corpus
(the base model's size and settings, with seeds no zoo model uses), fine-tunes one copy per
candidate on that candidate's training-split texts (prompt + continuation + EOS, as a token stream),
and attributes a text to the candidate whose fine-tuned LM gives it the highest likelihood (equal
priors). The fine-tuned LMs score the same test and calibration texts as the ceiling, under the
same sampling transform, so the experiments stage reads both alike (pipeline ``reflm+lm``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from natprints.artifacts import Manifest, hash_obj
from natprints.conditions import load_conditions, repeat_seeds, repeat_split, run_split
from natprints.config import Config
from natprints.errors import NatprintsError
from natprints.reference.encoder import ENCODER_PREFIX, EncoderTask, train_encoder
from natprints.reference.head import HeadTask, head_manifest, train_head
from natprints.runtime import Job, StageResult, run_jobs

REFERENCE_VERSION = 1
# the reference LM itself scores every text the ceiling reads, and the outsiders: the background model
# of the likelihood open-set test (a model of the public corpus that wrote none of the texts)
BACKGROUND = "reference"


def reference_dir(cfg: Config) -> Path:
    return cfg.paths.models / "reference"


def background_dir(cfg: Config) -> Path:
    """The reference LM itself: the background model of the likelihood open-set tests."""
    return reference_dir(cfg) / BACKGROUND


def _reference_spec(cfg: Config):
    from natprints.zoo.spec import base_spec

    seed = cfg.reference.seed
    return base_spec(cfg).model_copy(update={"init_seed": seed, "data_seed": seed, "checkpoint_steps": ()})


def _finetune_spec(cfg: Config, stream_tokens: int):
    r = cfg.reference
    base = _reference_spec(cfg)
    per_epoch = max(1, stream_tokens // (base.batch_size * base.seq_len))
    steps = max(1, r.epochs * per_epoch)
    return base.model_copy(
        update={
            "lr": r.lr,
            "steps": steps,
            "warmup_steps": min(base.warmup_steps, steps // 10),
            "eval_every": max(1, steps // 4),
            "resume_every": max(1, steps // 2),
            "data_seed": r.seed,
            "schedule": "constant",
        }
    )


def _stream(frame: pd.DataFrame, prompts: pd.Series, eos: int) -> np.ndarray:
    """Each text's prompt, continuation and an EOS, concatenated: the fine-tuning corpus of one model."""
    from natprints.likelihood.stage import int_list, prompt_lists

    prompt_of = prompt_lists(prompts)
    ids: list[int] = []
    for row in frame.itertuples(index=False):
        ids += prompt_of[row.prompt_id] + int_list(row.token_ids) + [eos]
    return np.asarray(ids, dtype=np.int32)


def _train_reference(cfg: Config, *, progress: bool) -> bool:
    from natprints.corpus import corpus_manifest, load_tokens
    from natprints.zoo.stage import train_one

    corpus = corpus_manifest(cfg)
    fields = {
        "conditions": ["reference"],
        "init_seed": cfg.reference.seed,
        "data_seed": cfg.reference.seed,
        "parent": None,
        "corpus_sha256": corpus["corpus_sha256"],
        "tokenizer_sha256": corpus["tokenizer_sha256"],
    }
    tokens = load_tokens(cfg.paths.corpus / "train_tokens.npy")
    heldout = load_tokens(cfg.paths.corpus / "heldout_tokens.npy")
    out = background_dir(cfg)
    done = train_one(cfg, "reference", _reference_spec(cfg), fields, tokens, heldout, progress=progress, out_dir=out)
    return done is not None


def subset_id(model_id: str, samples: int) -> str:
    """The name of the LM fine-tuned on the first ``samples`` continuations of each training prompt."""
    return f"{model_id}@s{samples}"


def split_id(model_id: str, seed: int) -> str:
    """The name of the LM fine-tuned on the training texts of the repeated prompt split ``seed``."""
    return f"{model_id}@split{seed}"


def _split_rows(
    conditions: dict, cfg: Config, seed: int, prompts: pd.Series, memo: dict[str, tuple] | None = None
) -> dict[str, pd.DataFrame]:
    """Per scoring model: the test texts of split ``seed`` of every condition it is a candidate of
    (``memo``: as :func:`~natprints.likelihood.stage.text_rows` takes it)."""
    from natprints.likelihood.stage import text_rows

    wanted: dict[str, dict[str, object]] = {}
    for data in conditions.values():
        where = data.frame["prompt_id"].astype(str).map(repeat_split(data.frame["prompt_id"], cfg, seed))
        test = data.frame[where == "test"]
        for scorer in sorted(data.frame["model_id"].astype(str).unique()):
            rows = wanted.setdefault(scorer, {})
            for row in test.itertuples(index=False):
                rows.setdefault(str(row.sample_id), row)
    memo = {} if memo is None else memo
    return {scorer: text_rows(list(rows.values()), prompts, memo) for scorer, rows in wanted.items()}


def _finetune_job(
    cfg: Config, name: str, model_id: str, train: np.ndarray, heldout: np.ndarray, *, progress: bool
) -> bool:
    """One candidate's LM (``name``): the reference continued on the candidate's training-split texts."""
    from natprints.zoo.stage import train_one

    fields = {
        "conditions": ["reference-finetuned"],
        "candidate": model_id,
        "init_seed": cfg.reference.seed,
        "data_seed": cfg.reference.seed,
        "parent": "reference",
        "texts_sha256": hash_obj(train.tolist()),
    }
    spec = _finetune_spec(cfg, len(train))
    out = reference_dir(cfg) / name
    ref = background_dir(cfg)
    return train_one(cfg, name, spec, fields, train, heldout, init_from=ref, progress=progress, out_dir=out) is not None


def _manifest(cfg: Config) -> Manifest:
    return Manifest(cfg.paths.reference_scores, "reference-LM scores", remake="natprints reference")


def build_reference(cfg: Config, *, progress: bool = True) -> dict:
    """The `reference` stage: the reference LM, one fine-tuned copy per candidate (on the run's split,
    on each further split of ``[attribution] splits`` and per training-size point), their scores."""
    from natprints.corpus import load_tokenizer
    from natprints.generate.stage import build_prompts
    from natprints.likelihood.stage import check_caches, recorded_files, score_model, scoring_rows

    if not cfg.reference.enabled:
        raise NatprintsError("[reference] enabled = false in this config; nothing to build")
    conditions = load_conditions(cfg)
    split = run_split(cfg, conditions)
    rows = {m: r.assign(moments=False) for m, r in scoring_rows(cfg, conditions).items()}  # log p alone
    trained = _train_reference(cfg, progress=progress)
    eos = load_tokenizer(cfg.paths.tokenizer).eos_token_id
    prompts = build_prompts(cfg).set_index("prompt_id")["prompt_token_ids"]
    frames = {}
    for data in conditions.values():
        for model_id, frame in data.frame.groupby("model_id"):
            if str(model_id) in rows:
                frames.setdefault(str(model_id), frame)
    subsets = [n for n in cfg.attribution.evidence_train_samples if n < cfg.generate.train_samples]
    jobs, scoring = [], {}
    test_ids = {
        str(i)
        for data in conditions.values()
        for i, p in zip(data.frame["sample_id"], data.frame["prompt_id"], strict=True)
        if split.get(str(p)) == "test"
    }
    for model_id in rows:
        frame = frames[model_id]
        where = frame["prompt_id"].astype(str).map(split)
        heldout = _stream(frame[where == "cal"], prompts, eos)
        jobs.append(Job(model_id, (cfg, model_id, model_id, _stream(frame[where == "train"], prompts, eos), heldout)))
        scoring[model_id] = rows[model_id]
        for n in subsets:  # the training-size curve: scored on test texts only
            train = frame[(where == "train") & (frame["sample_index"] < n)]
            name = subset_id(model_id, n)
            jobs.append(Job(name, (cfg, name, model_id, _stream(train, prompts, eos), heldout)))
            scoring[subset_id(model_id, n)] = rows[model_id][rows[model_id]["sample_id"].isin(test_ids)]
    memo: dict[str, tuple] = {}  # each text's row, made once for every split and scorer
    for seed in repeat_seeds(cfg) if cfg.reference.repeat_splits else []:
        # each further split: every candidate fine-tuned on that split's training texts, scoring its tests
        for model_id in rows:
            frame = frames[model_id]
            where = frame["prompt_id"].astype(str).map(repeat_split(frame["prompt_id"], cfg, seed))
            name = split_id(model_id, seed)
            train, heldout = (_stream(frame[where == part], prompts, eos) for part in ("train", "cal"))
            jobs.append(Job(name, (cfg, name, model_id, train, heldout)))
        split_rows = _split_rows(conditions, cfg, seed, prompts, memo)
        scoring.update({split_id(m, seed): split_rows[m] for m in rows})
    tuned = sum(run_jobs(cfg.run.worker_count(), _finetune_job, jobs, "finetune"))
    every = scoring_rows(cfg, conditions, outsiders=True, own_train=True).values()
    scoring[BACKGROUND] = pd.concat(every, ignore_index=True).drop_duplicates("sample_id").assign(moments=False)
    out = cfg.paths.reference_scores
    out.mkdir(parents=True, exist_ok=True)
    trusted = recorded_files(_manifest(cfg))
    command = "natprints reference"
    work = [
        Job(m, (cfg, reference_dir(cfg) / m, r, out / f"{m}.parquet", None, trusted, command))
        for m, r in scoring.items()
    ]
    check_caches(work, trusted, command)
    _manifest(cfg).invalidate()
    scored = sum(run_jobs(cfg.run.worker_count(), score_model, work, "reference scores"))
    heads = _head_tasks(cfg, conditions, split, prompts, subsets) if cfg.reference.head else []
    ref = background_dir(cfg)
    head_jobs = [Job(t.name, (cfg, t.name, t, ref, out)) for t in heads]
    trained_heads = sum(run_jobs(cfg.run.worker_count(), train_head, head_jobs, "classifier head"))
    encoders = []
    if cfg.reference.encoder_conditions:
        # the encoder reads text: conditions of models with tokenizers of their own too, on the experiments' split
        texts = load_conditions(cfg, declared=True)
        encoders = _encoder_tasks(cfg, texts, run_split(cfg, texts), subsets)
    encoder_jobs = [Job(t.name, (cfg, t.name, t, out)) for t in encoders]
    trained_heads += sum(run_jobs(cfg.run.worker_count(), train_encoder, encoder_jobs, "fine-tuned encoder"))
    fields = {
        "stage": "reference",
        "run": cfg.run.name,
        "heads": [t.name for t in heads],
        "encoders": [t.name for t in encoders],
        "settings": cfg.reference.model_dump(mode="json"),
        "scorers": {m: {"file": f"{m}.parquet", "rows": len(r)} for m, r in scoring.items()},
        "trained_now": int(trained) + tuned + trained_heads,
    }
    key = hash_obj(
        {
            "version": REFERENCE_VERSION,
            "rows": {m: hash_obj(sorted(r["row_key"])) for m, r in sorted(scoring.items())},
            "models": {m: Manifest(reference_dir(cfg) / m, m).read()["files"] for m in sorted(scoring)},
            "heads": {t.name: head_manifest(out, t.name).read()["key"] for t in heads},
            **(
                {"encoders": {t.name: head_manifest(out, t.name, ENCODER_PREFIX).read()["key"] for t in encoders}}
                if encoders
                else {}
            ),
        }
    )
    return {**_manifest(cfg).write(key, fields, [f"{m}.parquet" for m in scoring]), "scored": scored}


def _head_tasks(
    cfg: Config, conditions: dict, split: dict[str, str], prompts: pd.Series, subsets: list[int]
) -> list[HeadTask]:
    """One classifier per condition on its training texts, and one per training-size point."""
    from natprints.likelihood.stage import int_list, prompt_lists

    tasks = []
    prompt_of = prompt_lists(prompts)
    for name, data in conditions.items():
        frame = data.frame
        where = frame["prompt_id"].astype(str).map(split)
        scored = frame[where.isin(["test", "cal"])]

        def texts(rows: pd.DataFrame) -> list[tuple[list[int], list[int]]]:
            return [
                (list(prompt_of[p]), int_list(ids)) for p, ids in zip(rows["prompt_id"], rows["token_ids"], strict=True)
            ]

        cal = (where[scored.index] == "cal").to_numpy()
        cal_labels = np.where(cal, scored["label"].to_numpy(), -1)
        for n in [*subsets, None]:
            train = frame[(where == "train") & (frame["sample_index"] < n if n else True)]
            tasks.append(
                HeadTask(
                    name=name if n is None else f"{name}@s{n}",
                    n_classes=len(data.labels),
                    train=texts(train),
                    train_labels=train["label"].to_numpy(),
                    scored_ids=scored["sample_id"].astype(str).tolist(),
                    scored=texts(scored),
                    cal_labels=cal_labels,
                )
            )
    return sorted(tasks, key=lambda t: -len(t.train))  # largest first: the workers finish together


def _encoder_tasks(cfg: Config, conditions: dict, split: dict[str, str], subsets: list[int]) -> list[EncoderTask]:
    """The fine-tuned encoder of each condition of ``[reference] encoder_conditions``: on its training
    continuations, and on the first n per prompt for each training-size point."""
    unknown = sorted(set(cfg.reference.encoder_conditions) - set(conditions))
    if unknown:
        raise NatprintsError(
            f"[reference] encoder_conditions names {', '.join(unknown)}, not a condition of run "
            f"'{cfg.run.name}' (its conditions: {', '.join(conditions)})"
        )
    tasks = []
    for name in cfg.reference.encoder_conditions:
        frame = conditions[name].frame
        where = frame["prompt_id"].astype(str).map(split)
        scored = frame[where.isin(["test", "cal"])]
        cal_labels = np.where((where[scored.index] == "cal").to_numpy(), scored["label"].to_numpy(), -1)
        for n in [*subsets, None]:
            train = frame[(where == "train") & (frame["sample_index"] < n if n else True)]
            tasks.append(
                EncoderTask(
                    name=name if n is None else f"{name}@s{n}",
                    train_texts=train["text"].astype(str).tolist(),
                    train_labels=train["label"].to_numpy(),
                    scored_ids=scored["sample_id"].astype(str).tolist(),
                    scored_texts=scored["text"].astype(str).tolist(),
                    cal_labels=cal_labels,
                    save=n is None,
                )
            )
    return sorted(tasks, key=lambda t: -len(t.train_texts))


def reference_key(cfg: Config) -> str | None:
    """The key of the run's reference-LM scores, or None when the stage has not run."""
    manifest = _manifest(cfg)
    return manifest.read().get("key") if manifest.exists() else None


def run(cfg: Config) -> StageResult:
    """The `reference` stage (a config may turn it off)."""
    if not cfg.reference.enabled:
        return StageResult(False, ("reference: off in this config ([reference] enabled = false)",), current=False)
    manifest = build_reference(cfg)
    return StageResult(
        manifest["scored"] > 0 or manifest["trained_now"] > 0,
        (
            f"reference: {len(manifest['scorers']) - 1} fine-tuned LMs and the reference LM itself, "
            f"{manifest['trained_now']} trained now, "
            f"{manifest['scored']} texts scored now",
        ),
    )
