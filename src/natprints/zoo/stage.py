"""The stages `zoo` and `derive`: train every model the config's conditions ask for, and the derived models.

Each model lives at ``models/<run>/zoo/<model-id>/``: a Hugging Face directory (``config.json``,
``model.safetensors``), its step-0 init under ``init/``, intermediate checkpoints under
``checkpoints/``, and a ``manifest.json`` that records the exact data it saw.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from natprints.artifacts import MANIFEST, Manifest, hash_obj, read_manifest, sha256_text
from natprints.config import Config, CorpusSettings
from natprints.errors import NatprintsError
from natprints.runtime import Job, StageResult, load_lm, run_jobs, setup_torch
from natprints.zoo.spec import ModelSpec, condition_members, linear_weights, zoo_specs


def use_autocast(cfg: Config, device: str) -> bool:
    """Whether training runs under bf16 autocast: the config's ``train_dtype``; ``auto`` is bf16 on CUDA
    and fp32 on a CPU. Never decided by a timing: numerics follow from the config and the device alone,
    so the same config trains the same weights on the same kind of CPU."""
    if cfg.run.train_dtype == "auto":
        return device == "cuda"
    return cfg.run.train_dtype == "bf16"


def _file_list(directory: Path) -> list[str]:
    return sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    )


def _spec_fields(spec: ModelSpec, cfg: Config) -> dict:
    preset = cfg.sizes[spec.size]
    # keys leave out `arch` for Llama and `tokenizer` for the run's: models trained before the factors
    # existed stay complete
    dump = spec.model_dump(mode="json")
    if spec.arch == "llama":
        del dump["arch"]
    if not spec.own_tokenizer:
        del dump["tokenizer"]
    return {"spec": dump, "architecture": preset.model_dump()}


def _model_done(out_dir: Path, spec_fields: dict, model_id: str) -> bool:
    """True when the model is complete; a complete model whose files fail their hashes is retrained."""
    manifest = Manifest(out_dir, f"model {model_id}")
    key = hash_obj(spec_fields)
    if manifest.exists() and manifest.read().get("key") == key:
        bad = manifest.mismatched()
        if bad:
            what = f"{', '.join(bad)} {'does' if len(bad) == 1 else 'do'} not match its manifest hash (corrupt)"
            print(f"model {model_id}: {what}; retraining it", file=sys.stderr, flush=True)
            manifest.invalidate()
            for name in bad:
                (out_dir / name).unlink(missing_ok=True)
            return False
    return manifest.is_current(key, refuse_other="use a new [run] name or `natprints clean`")


def verified_model(cfg: Config, model_id: str) -> dict:
    """A zoo or derived model's manifest, after checking its config and weights against it and that
    its training ended finite: a stage that uses a model, even one that then skips, refuses a bad one."""
    directory = cfg.paths.zoo / model_id
    manifest = Manifest(directory, f"zoo model {model_id}")
    stage = "derive" if "+" in model_id else "zoo"  # derived ids are <parent>+<source>
    if not manifest.exists():
        raise NatprintsError(f"zoo model {model_id} is missing; run `natprints {stage}` first")
    fields = manifest.read()
    stage = "derive" if fields.get("parent") else "zoo"
    bad = manifest.mismatched(("config.json", "model.safetensors"))
    if bad:
        raise NatprintsError(
            f"zoo model {model_id}: {bad[0]} does not match its manifest hash (tampered or corrupt); "
            f"rerun `natprints {stage}` to retrain it"
        )
    loss = fields.get("final_heldout_loss")
    if not isinstance(loss, int | float) or not math.isfinite(loss):
        raise NatprintsError(f"zoo model {model_id}: training ended with held-out loss {loss}; it is not used")
    return fields


def _check_fits(specs: list[ModelSpec], counts: dict) -> None:
    """Refuse, before any training, a block length the corpus cannot fill: one held-out block and a
    batch of distinct training blocks (rather than train on repeats, or run out of memory)."""
    for spec in specs:
        blocks = (counts["train_tokens"] - 1) // spec.seq_len
        if counts["heldout_tokens"] < spec.seq_len + 1 or blocks < spec.batch_size:
            raise NatprintsError(
                f"train.seq_len = {spec.seq_len} is too long for the corpus: {counts['heldout_tokens']} held-out "
                f"tokens (needs {spec.seq_len + 1}) and {blocks} training blocks (needs a batch of {spec.batch_size}); "
                "lower train.seq_len or use more text (corpus.max_chars, corpus.heldout_fraction)"
            )


def train_one(
    cfg: Config,
    model_id: str,
    spec: ModelSpec,
    fields: dict,
    tokens,
    heldout,
    *,
    init_from: Path | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    out_dir: Path | None = None,
    tokenizer_dir: Path | None = None,
) -> dict | None:
    """Train (or resume) one model into the zoo (or ``out_dir``); write its manifest when it completes.
    ``tokenizer_dir``: the model's own tokenizer (saved into its directory), else the run's."""
    from natprints.corpus import load_tokenizer
    from natprints.zoo.train import _save_hf, clear_resume, init_model, train

    out_dir = out_dir or cfg.paths.zoo / model_id
    spec_fields = _spec_fields(spec, cfg)
    if _model_done(out_dir, spec_fields, model_id):
        return None
    device = setup_torch(cfg)
    autocast = use_autocast(cfg, device)
    start = time.time()
    if init_from is None:
        tokenizer = load_tokenizer(tokenizer_dir or cfg.paths.tokenizer)
        model = init_model(
            cfg.sizes[spec.size], len(tokenizer), spec.seq_len, tokenizer.eos_token_id, spec.init_seed, spec.arch
        )
        if not (out_dir / "init" / "model.safetensors").is_file():
            _save_hf(model, out_dir / "init")
    else:
        model = load_lm(init_from)
    state = train(
        model,
        spec,
        tokens,
        heldout,
        out_dir,
        device=device,
        autocast=autocast,
        stop_after=stop_after,
        progress=progress,
    )
    if state.step < spec.steps:
        return None  # stopped early on request; resumable state is on disk
    _save_hf(model.to("cpu"), out_dir / "final")
    for path in (out_dir / "final").iterdir():
        path.replace(out_dir / path.name)
    (out_dir / "final").rmdir()
    if tokenizer_dir is not None:  # the model reads text with its own tokenizer: it travels with it
        load_tokenizer(tokenizer_dir).save_pretrained(str(out_dir))
    clear_resume(out_dir)
    steps = spec.steps
    tokens_seen = steps * spec.batch_size * spec.seq_len
    manifest = {
        "model_id": model_id,
        "run": cfg.run.name,
        **fields,
        **spec_fields,
        "n_params": sum(p.numel() for p in model.parameters()),
        "token_stream_sha256": state.stream_sha256,
        "steps": steps,
        "tokens_seen": tokens_seen,
        "train_curve": state.train_curve,
        "heldout_curve": state.heldout_curve,
        "final_heldout_loss": state.heldout_curve[-1][1],
        "tokens_per_second": round(tokens_seen / max(state.train_seconds, 1e-9), 1),
        "train_seconds": round(state.train_seconds, 2),
        "wall_s": round(time.time() - start, 2),
        "device": device,
        "train_dtype": "bf16-autocast" if autocast else "fp32",
        "threads": __import__("torch").get_num_threads(),
        "checkpoints": sorted(p.name for p in (out_dir / "checkpoints").glob("step-*")),
    }
    return Manifest(out_dir, f"model {model_id}").write(hash_obj(spec_fields), manifest, _file_list(out_dir))


def _zoo_job(cfg: Config, model_id: str, stop_after: int | None, *, progress: bool) -> bool:
    from natprints.corpus import corpus_manifest, load_tokens, variant_tokenizer

    corpus = corpus_manifest(cfg)
    spec, conditions = zoo_specs(cfg)[model_id]
    streams, tokenizer_dir = cfg.paths.corpus, None
    tokenizer_sha256 = corpus["tokenizer_sha256"]
    if spec.own_tokenizer:  # the same training paragraphs, as its own tokenizer's stream
        streams = variant_tokenizer(cfg, spec.tokenizer)
        tokenizer_dir = streams / "tokenizer"
        tokenizer_sha256 = Manifest(streams, f"tokenizer {spec.tokenizer}").read()["tokenizer_sha256"]
    fields = {
        "conditions": conditions,
        "init_seed": spec.init_seed,
        "data_seed": spec.data_seed,
        "parent": None,
        "corpus_sha256": corpus["corpus_sha256"],
        "tokenizer_sha256": tokenizer_sha256,
    }
    tokens = load_tokens(streams / "train_tokens.npy")
    heldout = load_tokens(streams / "heldout_tokens.npy")
    done = train_one(
        cfg,
        model_id,
        spec,
        fields,
        tokens,
        heldout,
        stop_after=stop_after,
        progress=progress,
        tokenizer_dir=tokenizer_dir,
    )
    return done is not None


def build_zoo(cfg: Config, only: list[str] | None = None, stop_after: int | None = None) -> list[str]:
    """Train every model of the config (or ``only`` these ids); returns the ids trained now."""
    from natprints.corpus import corpus_manifest

    corpus = corpus_manifest(cfg)
    specs = zoo_specs(cfg)
    _check_fits([spec for spec, _ in specs.values() if not spec.own_tokenizer], corpus["counts"])
    if only:
        unknown = [m for m in only if m not in specs]
        if unknown:
            raise NatprintsError(f"unknown model id(s) {unknown}; known: {', '.join(specs)}")
    ids = [m for m in specs if not only or m in only]
    # Longest first, so the largest model does not start last and leave a worker idle at the end.
    ids.sort(key=lambda m: -train_cost(cfg, specs[m][0]))
    done = run_jobs(cfg.run.worker_count(), _zoo_job, [Job(m, (cfg, m, stop_after)) for m in ids], "zoo")
    return [m for m in specs if m in ids and done[ids.index(m)]]


def train_cost(cfg: Config, spec: ModelSpec) -> float:
    """Relative training cost: tokens seen times the weights of the linear maps (LM head included)."""
    return spec.steps * spec.batch_size * spec.seq_len * linear_weights(cfg, spec)


def shift_corpus(cfg: Config) -> dict:
    """The derived models' corpus (another domain), tokenized with the run's shared tokenizer."""
    from natprints.corpus import (
        corpus_manifest,
        encode_stream,
        is_heldout,
        load_tokenizer,
        read_paragraphs,
        save_npy,
    )

    out = cfg.paths.shift_corpus
    settings = CorpusSettings(source=cfg.lineage.derive_source, paths=cfg.lineage.derive_paths)
    key = hash_obj({"settings": settings.model_dump(), "tokenizer_sha256": corpus_manifest(cfg)["tokenizer_sha256"]})
    manifest = Manifest(out, "shift corpus")
    if manifest.is_current(key):
        return manifest.read()
    manifest.invalidate()
    paragraphs = read_paragraphs(settings)
    held = [is_heldout(p, 0.05, "natprints-shift") for p in paragraphs]
    train = [p for p, h in zip(paragraphs, held, strict=True) if not h]
    heldout = [p for p, h in zip(paragraphs, held, strict=True) if h] or train[-1:]
    tokenizer = load_tokenizer(cfg.paths.tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    save_npy(out / "train_tokens.npy", encode_stream(tokenizer, train))
    save_npy(out / "heldout_tokens.npy", encode_stream(tokenizer, heldout))
    return manifest.write(
        key,
        {"stage": "derive", "source": settings.source, "corpus_sha256": sha256_text("\n\n".join(train))},
        ["train_tokens.npy", "heldout_tokens.npy"],
    )


def derived_ids(cfg: Config) -> dict[str, str]:
    """Derived model id -> parent id, for every model of the conditions named in the config."""
    members = condition_members(cfg)
    suffix = cfg.lineage.derive_source
    parents: list[str] = []
    for condition in cfg.lineage.derive_conditions:
        for model_id in members.get(condition, []):
            if model_id not in parents:
                parents.append(model_id)
    return {f"{p}+{suffix}": p for p in parents}


def _derive_job(cfg: Config, model_id: str, parent_id: str, *, progress: bool) -> bool:
    from natprints.corpus import load_tokens

    parent_dir = cfg.paths.zoo / parent_id
    parent = read_manifest(parent_dir, f"model {parent_id}")
    shift = read_manifest(cfg.paths.shift_corpus, "shift corpus")
    base = ModelSpec.model_validate(parent["spec"])
    steps = cfg.lineage.derive_steps
    spec = base.model_copy(
        update={
            "lr": cfg.lineage.derive_lr,
            "steps": steps,
            "warmup_steps": min(base.warmup_steps, steps // 10),
            "eval_every": max(1, steps // 4),
            "checkpoint_steps": (),
            "resume_every": max(1, steps // 2),
        }
    )
    fields = {
        "conditions": ["derived"],
        "init_seed": parent["init_seed"],
        "data_seed": parent["data_seed"],
        "parent": parent_id,
        "derived_from_corpus": shift["source"],
        "corpus_sha256": shift["corpus_sha256"],
        "tokenizer_sha256": parent["tokenizer_sha256"],
    }
    tokens = load_tokens(cfg.paths.shift_corpus / "train_tokens.npy")
    heldout = load_tokens(cfg.paths.shift_corpus / "heldout_tokens.npy")
    trained = train_one(cfg, model_id, spec, fields, tokens, heldout, init_from=parent_dir, progress=progress)
    return trained is not None


def build_derived(cfg: Config) -> list[str]:
    """Continue chosen zoo models on the shift corpus: the derived models of lineage tests."""

    derived = derived_ids(cfg)
    if not derived:
        return []
    for parent_id in derived.values():
        verified_model(cfg, parent_id)
    shift_corpus(cfg)
    jobs = [Job(model_id, (cfg, model_id, parent_id)) for model_id, parent_id in derived.items()]
    done = run_jobs(cfg.run.worker_count(), _derive_job, jobs, "derive")
    return [job.name for job, trained in zip(jobs, done, strict=True) if trained]


def run(cfg: Config, only: list[str] | None = None, stop_after: int | None = None) -> StageResult:
    """The `zoo` stage; training only some models (``only``) is not a run of the stage's timing. The
    run's declared models are found first: one missing is an error before any training, not after it."""
    from natprints.declared import model_directory
    from natprints.modeldir import inspect_model

    for model in cfg.models:
        try:
            inspect_model(model_directory(model))
        except NatprintsError as exc:
            raise NatprintsError(f"model {model.label}: {str(exc).removeprefix(f'model {model.label}: ')}") from None
    trained = build_zoo(cfg, only=only, stop_after=stop_after)
    return StageResult(bool(trained) and not only, (f"zoo: trained {len(trained)} model(s) now",))


def run_derive(cfg: Config) -> StageResult:
    """The `derive` stage."""
    trained = build_derived(cfg)
    return StageResult(bool(trained), (f"derive: trained {len(trained)} derived model(s) now",))
