"""The generate stage: every zoo model continues every prompt; one parquet file per model.

Prompts are the first P tokens of held-out paragraphs (never seen in training), shared by every
model (a paired design). Generation is manifest-first: the rows to generate are listed (ids derived
from model, prompt and sample index), then filled chunk by chunk; a rerun fills only missing rows.
Each chunk's sampling generator is seeded from (model, seed, chunk), so a resumed run writes the
same texts an uninterrupted one would.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from natprints.artifacts import Manifest, hash_obj, read_manifest, sha256_file, sha256_text, temp_path_for
from natprints.conditions import GENERATED_COLUMNS
from natprints.config import Config, GenerateSettings
from natprints.declared import DECLARED, STRINGS, Declared, declared_conditions, verify_declared
from natprints.errors import NatprintsError
from natprints.generate.declared import generate_declared, short_of_budget
from natprints.generate.sampler import sample_batch
from natprints.runtime import Job, StageResult, load_lm, resolve_device, run_jobs


def build_prompts(cfg: Config) -> pd.DataFrame:
    """The first ``prompt_tokens`` tokens of the first held-out paragraphs long enough to have them;
    ``human_token_ids``: the paragraph's own next tokens, at most ``new_tokens`` of them (what a person
    wrote after the prompt, for the open-set tests)."""
    from natprints.corpus import corpus_manifest, load_tokenizer, read_jsonl_texts

    corpus_manifest(cfg)
    g = cfg.generate
    tokenizer = load_tokenizer(cfg.paths.tokenizer)
    paragraphs = read_jsonl_texts(cfg.paths.corpus / "heldout.jsonl")
    rows = []
    for ids in tokenizer(paragraphs, add_special_tokens=False)["input_ids"]:
        if len(ids) <= g.prompt_tokens:
            continue
        prompt_ids = ids[: g.prompt_tokens]
        digest = sha256_text(",".join(map(str, prompt_ids)))[:12]
        rows.append(
            {
                "prompt_id": f"p{len(rows):05d}-{digest}",
                "prompt_token_ids": prompt_ids,
                "prompt": tokenizer.decode(prompt_ids),
                "human_token_ids": ids[g.prompt_tokens : g.prompt_tokens + g.new_tokens],
            }
        )
        if len(rows) == g.prompts:
            break
    if len(rows) < g.prompts:
        raise NatprintsError(
            f"only {len(rows)} held-out paragraphs have more than {g.prompt_tokens} tokens; "
            f"lower generate.prompts or raise corpus.heldout_fraction"
        )
    return pd.DataFrame(rows)


OUTSIDERS = ("human", "junk")  # sources no model of the run is: the open-set tests' negatives


def outsider_texts(cfg: Config, prompt_ids: Iterable[str]) -> pd.DataFrame:
    """Texts no model of the run wrote, one of each kind per prompt, as the open-set tests meet them:
    *human*, the held-out paragraph's own continuation of the prompt (at most ``new_tokens`` tokens; a
    paragraph that ends within them ends as a model's text does, at EOS); *junk*, ``new_tokens`` tokens
    drawn uniformly from the vocabulary without its special tokens, seeded by the prompt. Columns: the
    generated corpora's ``sample_id`` (``human:<prompt>``, ``junk:<prompt>``), ``source``,
    ``prompt_id``, ``prompt``, ``token_ids`` and ``text`` (decoded as generated texts are)."""
    from natprints.corpus import load_tokenizer

    tokenizer = load_tokenizer(cfg.paths.tokenizer)
    special = set(tokenizer.all_special_ids)
    vocabulary = np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)
    prompts = build_prompts(cfg).set_index("prompt_id")
    rows = []
    for pid in sorted(set(map(str, prompt_ids))):
        human = [int(t) for t in prompts.at[pid, "human_token_ids"]]
        rng = np.random.default_rng(int(sha256_text(f"junk|{pid}")[:15], 16))
        junk = vocabulary[rng.integers(0, len(vocabulary), size=cfg.generate.new_tokens)].tolist()
        for source, ids in zip(OUTSIDERS, (human, junk), strict=True):
            rows.append(
                {
                    "sample_id": f"{source}:{pid}",
                    "source": source,
                    "prompt_id": pid,
                    "prompt": prompts.at[pid, "prompt"],
                    "token_ids": ids,
                    "text": tokenizer.decode(ids),
                }
            )
    return pd.DataFrame(rows, columns=["sample_id", "source", "prompt_id", "prompt", "token_ids", "text"])


def sample_id(model_id: str, prompt_id: str, index: int, seed: int) -> str:
    return sha256_text(f"{model_id}|{prompt_id}|{index}|{seed}")[:20]


def plan_rows(
    model_id: str, prompts: pd.DataFrame, g: GenerateSettings, seed: int, train_prompts: frozenset[str] = frozenset()
) -> pd.DataFrame:
    """Every row to generate for one model, in a fixed order; ``chunk`` groups rows sampled together.

    The extra continuations of training prompts (``train_samples_per_prompt``) come after the
    ``samples_per_prompt`` rows of every prompt, in chunks of their own: the first rows, and so their
    texts, are the same whether extras are asked for or not.
    """

    def rows(counts: list[tuple[int, str, range]]) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {"sample_id": sample_id(model_id, pid, j, seed), "prompt_id": pid, "sample_index": j, "prompt_row": i}
                for i, pid, indices in counts
                for j in indices
            ],
            columns=["sample_id", "prompt_id", "sample_index", "prompt_row"],
        )

    ids = list(enumerate(prompts["prompt_id"]))
    base = rows([(i, pid, range(g.samples_per_prompt)) for i, pid in ids])
    base["chunk"] = np.arange(len(base)) // g.batch_size
    extra = rows([(i, pid, range(g.samples_per_prompt, g.train_samples)) for i, pid in ids if pid in train_prompts])
    extra["chunk"] = -(-len(base) // g.batch_size) + np.arange(len(extra)) // g.batch_size
    return pd.concat([base, extra], ignore_index=True) if len(extra) else base


def train_prompt_ids(cfg: Config, prompts: pd.DataFrame) -> frozenset[str]:
    """The prompts of the attribution training split (they get ``train_samples_per_prompt`` texts)."""
    from natprints.conditions import CALIBRATION_FRACTION, split_prompts

    if cfg.generate.train_samples == cfg.generate.samples_per_prompt:
        return frozenset()
    a = cfg.attribution
    split = split_prompts(prompts["prompt_id"], a.test_fraction, CALIBRATION_FRACTION, a.split_seed)
    return frozenset(p for p, part in split.items() if part == "train")


def _chunk_seed(model_id: str, seed: int, chunk: int) -> int:
    return int(sha256_text(f"{model_id}|{seed}|{chunk}")[:15], 16)


def _read_existing(path: Path, plan: pd.DataFrame) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame(columns=GENERATED_COLUMNS)
    try:
        existing = pd.read_parquet(path)
    except Exception:
        raise NatprintsError(f"{path} is not a readable parquet file; remove it to regenerate") from None
    if list(existing.columns) != GENERATED_COLUMNS or not set(existing["sample_id"]) <= set(plan["sample_id"]):
        raise NatprintsError(f"{path} holds rows this config does not plan (foreign file); remove it")
    return existing


ROWS_DIGEST = b"natprints_rows_sha256"  # parquet metadata: a digest of the file's rows, written with them


def _rows_digest(table) -> str:
    return hash_obj(table.replace_schema_metadata(None).to_pylist())


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), ROWS_DIGEST: _rows_digest(table).encode()})
    tmp = temp_path_for(path)
    try:
        pq.write_table(table, tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _own_rows(path: Path) -> bool:
    """True when the file carries the digest of its own rows, as :func:`_write_parquet` wrote it."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception:  # a truncated or foreign file is not one this stage wrote
        return False
    recorded = (table.schema.metadata or {}).get(ROWS_DIGEST)
    return recorded is not None and recorded.decode() == _rows_digest(table)


def check_written(
    manifest: Manifest,
    paths: dict[Path, tuple[str, str]],
    recorded_weights: Callable[[dict], dict[str, str | None]],
    command: str,
) -> None:
    """Refuse to skip or extend a text file its stage did not write as it is now.

    A file must match the hash ``manifest`` records, or carry the digest of its own rows (a file a
    killed run was still filling): re-hashing an edited file into the manifest would launder it.
    ``paths`` maps each file to the model that writes it and that model's weights hash now;
    ``recorded_weights`` reads model -> the hash its texts were written with from the
    manifest's fields. Texts of a model whose weights changed since are refused too. ``command``
    reruns the stage.
    """
    try:
        recorded = manifest.read() if manifest.exists() else {}
    except NatprintsError:
        recorded = {}  # an unreadable manifest is rewritten; each file still has to prove itself
    files = recorded.get("files") if isinstance(recorded.get("files"), dict) else {}
    weights = recorded_weights(recorded)
    for path, (model, now) in paths.items():
        if not path.is_file():
            continue
        if files.get(str(path.relative_to(manifest.directory))) != sha256_file(path) and not _own_rows(path):
            raise NatprintsError(
                f"{path} does not match the manifest that wrote it (tampered or corrupt); "
                f"remove it and rerun `{command}`"
            )
        if weights.get(model) not in (None, now):
            raise NatprintsError(
                f"{path} was generated by other weights of {model.rsplit('/', 1)[-1]} than the zoo holds now; "
                f"remove it and rerun `{command}`"
            )


def _recorded_models(fields: dict) -> dict[str, str | None]:
    models = fields.get("models") if isinstance(fields.get("models"), dict) else {}
    out = {m: e.get("model_sha256") for m, e in models.items() if isinstance(e, dict)}
    for section in (DECLARED, STRINGS):  # texts cut to the character budget, under their own names
        own = fields.get(section, {}).get("models") if isinstance(fields.get(section), dict) else None
        for m, e in (own if isinstance(own, dict) else {}).items():
            if isinstance(e, dict):
                out[f"{section}/{m}"] = e.get("model_sha256")
    return out


def _declared_fields(cfg: Config, declared: dict[str, Declared], out: Path) -> dict:
    """The generated manifest's record of the declared models: their texts, digests and conditions."""
    models = {}
    for m, d in declared.items():
        file = f"{DECLARED}/{m}.parquet"
        models[m] = {
            "file": file,
            "source": d.source,
            "model_sha256": d.model_sha256,
            "tokenizer_sha256": d.tokenizer_sha256,
            "factors": d.factors,
            "short_of_budget": short_of_budget(out / file, cfg.generate),
        }
    return {"models": models, "conditions": declared_conditions(cfg)}


def generate_for_model(
    cfg: Config,
    model_id: str,
    prompts: pd.DataFrame,
    out_path: Path,
    seed: int,
    max_chunks: int | None = None,
    train_prompts: frozenset[str] = frozenset(),
    model_dir: Path | None = None,
    *,
    progress: bool = True,
) -> int:
    """Fill the missing rows of one model's file; returns how many rows were generated now.

    ``model_id`` names the rows and seeds the sampler; the weights are the zoo model's, or those at
    ``model_dir`` (a checkpoint of it, named ``model@step``).
    """
    import torch
    from tqdm.auto import tqdm

    from natprints.corpus import load_tokenizer

    g = cfg.generate
    plan = plan_rows(model_id, prompts, g, seed, train_prompts)
    filling = Filling(out_path, plan)
    have = filling.done
    missing = plan[~plan["sample_id"].isin(have)]
    if missing.empty:
        filling.finish()  # a killed run's side files, all there: the file is written from them
        return 0
    device = resolve_device(cfg.run.device)
    tokenizer = load_tokenizer(cfg.paths.tokenizer)
    eos = tokenizer.eos_token_id
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    model = load_lm(model_dir or cfg.paths.zoo / model_id, device=device)
    added = 0
    chunks = sorted(missing["chunk"].unique())[:max_chunks]
    with torch.inference_mode():
        for chunk in tqdm(chunks, desc=f"generate {model_id}", unit="chunk", leave=False, disable=not progress):
            rows = plan[plan["chunk"] == chunk]
            prompt_ids = torch.tensor(
                np.stack(prompts["prompt_token_ids"].iloc[rows["prompt_row"]].to_numpy()), dtype=torch.long
            )
            gen = torch.Generator().manual_seed(_chunk_seed(model_id, seed, int(chunk)))
            out = sample_batch(model, prompt_ids, g, gen, eos, device).numpy()
            new = []
            for (_, row), ids in zip(rows.iterrows(), out, strict=True):
                if row["sample_id"] in have:
                    continue
                n = int(np.argmax(ids == eos)) if (ids == eos).any() else len(ids)
                text = tokenizer.decode(ids[:n].tolist())
                new.append(generated_row(row, model_id, prompts, text, ids[:n].tolist(), seed, g))
            added += len(new)
            filling.add(int(chunk), new)
    filling.finish()
    return added


def generated_row(row, model_id: str, prompts: pd.DataFrame, text: str, ids: list[int], seed: int, g) -> dict:
    """One row of a generated file (:data:`GENERATED_COLUMNS`): ``row`` of the plan, the text and the
    model's own token ids it keeps."""
    return {
        "sample_id": row["sample_id"],
        "model_id": model_id,
        "prompt_id": row["prompt_id"],
        "prompt": prompts["prompt"].iloc[row["prompt_row"]],
        "text": text,
        "n_tokens": len(ids),
        "token_ids": np.asarray(ids, dtype=np.int32).tolist(),
        "sample_index": int(row["sample_index"]),
        "sampling_seed": seed,
        "temperature": g.temperature,
        "top_k": g.top_k,
        "top_p": g.top_p,
        "new_tokens": g.new_tokens,
    }


class Filling:
    """One model's generated file as its chunks come: each chunk's rows go to a side file
    (``NAME.parquet.part/CHUNK.parquet``, carrying its rows' digest) as soon as they are sampled, and
    the file itself is written once, in the plan's order, by :meth:`finish`. A killed run leaves its
    finished chunks beside the file; the next run reads them back (refusing one whose rows do not
    match their digest) and samples only the rest. Writes grow with the number of rows, not with the
    square of the number of chunks."""

    def __init__(self, path: Path, plan: pd.DataFrame) -> None:
        self.path, self.plan = path, plan
        self.parts = path.with_name(path.name + ".part")
        frames = [_read_existing(path, plan)]
        for part in sorted(self.parts.glob("*.parquet")) if self.parts.is_dir() else []:
            if not _own_rows(part):
                raise NatprintsError(
                    f"{part} does not match the digest of its rows (tampered or corrupt); remove it and rerun"
                )
            frames.append(_read_existing(part, plan))
        self.frames = [f for f in frames if len(f)]

    @property
    def done(self) -> set[str]:
        return {sid for f in self.frames for sid in f["sample_id"]}

    def add(self, chunk: int, rows: list[dict]) -> None:
        frame = pd.DataFrame(rows, columns=GENERATED_COLUMNS)
        self.parts.mkdir(parents=True, exist_ok=True)
        _write_parquet(self.parts / f"{chunk:06d}.parquet", frame)
        self.frames.append(frame)

    def finish(self) -> None:
        """Write the file (every row so far, in the plan's order) and remove the side files."""
        if not self.parts.is_dir():
            return  # nothing new since the file was written
        frames = self.frames or [pd.DataFrame(columns=GENERATED_COLUMNS)]
        merged = pd.concat(frames, ignore_index=True).drop_duplicates("sample_id")
        order = {sid: i for i, sid in enumerate(self.plan["sample_id"])}
        merged = merged.iloc[np.argsort(merged["sample_id"].map(order).to_numpy(), kind="stable")]
        _write_parquet(self.path, merged.reset_index(drop=True))
        shutil.rmtree(self.parts)


def stage_key(cfg: Config) -> str:
    keyed = cfg.keyed_dump()
    parts = {"generate": keyed["generate"], "train": keyed["train"]}
    if cfg.generate.train_samples != cfg.generate.samples_per_prompt:  # the split picks the prompts
        parts["split"] = [cfg.attribution.test_fraction, cfg.attribution.split_seed]
    return hash_obj(parts)


def generate_all(cfg: Config, *, max_chunks: int | None = None) -> dict:
    """The generate stage over the whole zoo plus the null control, and the texts of models with
    tokenizers of their own (declared models, the zoo's ``tokenizer`` condition) cut to the character
    budget (:mod:`natprints.generate.declared`); writes the generated manifest."""
    from natprints.zoo import condition_members, zoo_specs
    from natprints.zoo.spec import string_members
    from natprints.zoo.stage import verified_model

    start = time.time()
    out = cfg.paths.generated
    specs = zoo_specs(cfg)
    weights = {m: verified_model(cfg, m)["files"]["model.safetensors"] for m in specs}
    tokens = [m for m, (spec, _) in specs.items() if not spec.own_tokenizer]  # texts of the run's tokens
    prompts = build_prompts(cfg)
    base = next(iter(specs))
    train = train_prompt_ids(cfg, prompts)
    jobs = [Job(m, (cfg, m, prompts, out / f"{m}.parquet", cfg.generate.seed, max_chunks, train)) for m in tokens]
    null = (cfg, base, prompts, out / "null" / f"{base}.parquet", cfg.generate.null_seed, max_chunks, train)
    jobs.append(Job(f"{base} (null control)", null))
    owners = {job.args[3]: (job.args[1], weights[job.args[1]]) for job in jobs}
    declared = verify_declared(cfg)
    zoo_strings = string_members(cfg)
    string_models = {m: cfg.paths.zoo / m for ms in zoo_strings.values() for m in ms}
    sources = [(m, d.path, DECLARED, d.model_sha256) for m, d in declared.items()]
    sources += [(m, path, STRINGS, weights[m]) for m, path in string_models.items()]
    own = [
        Job(
            f"{m} ({'declared' if where == DECLARED else 'own tokenizer'})",
            (cfg, m, path, prompts, out / where / f"{m}.parquet", cfg.generate.seed, max_chunks, train),
        )
        for m, path, where, _ in sources
    ]
    owners.update({out / where / f"{m}.parquet": (f"{where}/{m}", sha) for m, _, where, sha in sources})
    check_written(Manifest(out, "generated corpora"), owners, _recorded_models, "natprints generate")
    added = sum(run_jobs(cfg.run.worker_count(), generate_for_model, jobs, "generate"))
    added += sum(run_jobs(cfg.run.worker_count(), generate_declared, own, "generate (own tokenizers)")) if own else 0
    g = cfg.generate
    expected = len(prompts) * g.samples_per_prompt + len(train) * (g.train_samples - g.samples_per_prompt)
    files = [j.args[3] for j in jobs] + [j.args[4] for j in own]
    counts = {str(f.relative_to(out)): len(pd.read_parquet(f, columns=["sample_id"])) for f in files}
    complete = all(n == expected for n in counts.values())
    fields = {
        "stage": "generate",
        "run": cfg.run.name,
        "complete": complete,
        "base_model": base,
        "prompts": len(prompts),
        "rows_per_model": expected,
        "models": {
            m: {
                "conditions": specs[m][1],
                "file": f"{m}.parquet",
                "model_sha256": read_manifest(cfg.paths.zoo / m)["files"]["model.safetensors"],
            }
            for m in tokens
        },
        "null_control": {"model_id": base, "file": f"null/{base}.parquet", "sampling_seed": cfg.generate.null_seed},
        "conditions": condition_members(cfg),
        "sampling": cfg.generate.model_dump(),
        **({DECLARED: _declared_fields(cfg, declared, out)} if declared else {}),
        **({STRINGS: _strings_fields(cfg, zoo_strings, weights, out)} if zoo_strings else {}),
        "rows": counts,
        "added": added,
        "wall_s": round(time.time() - start, 2),
    }
    return Manifest(out, "generated corpora").write(stage_key(cfg), fields, counts)


def _strings_fields(cfg: Config, members: dict[str, list[str]], weights: dict[str, str], out: Path) -> dict:
    """The generated manifest's record of the zoo's texts cut to the character budget."""
    models = {
        m: {
            "file": f"{STRINGS}/{m}.parquet",
            "model_sha256": weights[m],
            "short_of_budget": short_of_budget(out / STRINGS / f"{m}.parquet", cfg.generate),
        }
        for ms in members.values()
        for m in ms
    }
    return {"models": models, "conditions": members}


def run(cfg: Config, *, max_chunks: int | None = None) -> StageResult:
    """The `generate` stage."""
    manifest = generate_all(cfg, max_chunks=max_chunks)
    state = "complete" if manifest["complete"] else "partial"
    return StageResult(
        manifest["added"] > 0 and manifest["complete"],
        (f"generate: {len(manifest['rows'])} files, {manifest['rows_per_model']} rows each ({state})",),
    )
