"""The generate stage: every zoo model continues every prompt; one parquet file per model.

Prompts are the first P tokens of held-out paragraphs (never seen in training), shared by every
model (a paired design). Generation is manifest-first: the rows to generate are listed (ids derived
from model, prompt and sample index), then filled chunk by chunk; a rerun fills only missing rows.
Each chunk's sampling generator is seeded from (model, seed, chunk), so a resumed run writes the
same texts an uninterrupted one would.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from natprints.artifacts import (
    atomic_write_json,
    git_revision,
    hash_obj,
    package_versions,
    sha256_file,
    sha256_text,
    temp_path_for,
)
from natprints.config import Config, GenerateSettings
from natprints.errors import NatprintsError

COLUMNS = [
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


def build_prompts(cfg: Config) -> pd.DataFrame:
    """The first ``prompt_tokens`` tokens of the first held-out paragraphs long enough to have them."""
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


def sample_id(model_id: str, prompt_id: str, index: int, seed: int) -> str:
    return sha256_text(f"{model_id}|{prompt_id}|{index}|{seed}")[:20]


def plan_rows(model_id: str, prompts: pd.DataFrame, g: GenerateSettings, seed: int) -> pd.DataFrame:
    """Every row to generate for one model, in a fixed order; ``chunk`` groups rows sampled together."""
    rows = [
        {"sample_id": sample_id(model_id, pid, j, seed), "prompt_id": pid, "sample_index": j, "prompt_row": i}
        for i, pid in enumerate(prompts["prompt_id"])
        for j in range(g.samples_per_prompt)
    ]
    plan = pd.DataFrame(rows)
    plan["chunk"] = np.arange(len(plan)) // g.batch_size
    return plan


def _filter_logits(logits, top_k: int, top_p: float):
    import torch

    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


class LeanDecoder:
    """Incremental decoding of a Llama model with a preallocated KV slab and fused projections.

    ``model.generate`` spends most of its time outside the model (see make bench): its KV cache grows
    by ``torch.cat`` at every step, copying the whole cache. Here each layer's keys and values go into
    one slab allocated up front, attention reads a view of the filled part (no mask needed when one
    token attends to all earlier ones), the query/key/value and the gate/up projections run as one
    matrix product each (their weights concatenated once), and only the last position reaches the
    LM head. Norms, rotary tables and activations are the model's own modules; the
    tests check the logits against a full forward pass.
    """

    def __init__(self, model, batch: int, capacity: int):
        import torch

        cfg = model.config
        self.model = model
        self.capacity = capacity
        self.length = 0
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.gqa = cfg.num_key_value_heads != cfg.num_attention_heads
        q_width = cfg.num_attention_heads * self.head_dim
        kv_width = cfg.num_key_value_heads * self.head_dim
        self.qkv_split = [q_width, kv_width, kv_width]
        # the LM head as a (hidden, vocab) matrix: the same products, 15% faster than F.linear here
        self.head = model.lm_head.weight.t().contiguous()
        self.layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            biases = [m.bias for m in projections]
            self.layers.append(
                {
                    "layer": layer,
                    "qkv": torch.cat([m.weight for m in projections]),
                    "qkv_bias": None if biases[0] is None else torch.cat(biases),
                    "gate_up": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                    "gate_up_bias": None
                    if mlp.gate_proj.bias is None
                    else torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]),
                    "keys": attn.q_proj.weight.new_empty(batch, cfg.num_key_value_heads, capacity, self.head_dim),
                    "values": attn.q_proj.weight.new_empty(batch, cfg.num_key_value_heads, capacity, self.head_dim),
                }
            )

    def step(self, input_ids):
        """Feed (B, n) new tokens; return the (B, vocab) logits of the last position."""
        import torch
        import torch.nn.functional as F
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        inner = self.model.model
        batch, n = input_ids.shape
        start, end = self.length, self.length + n
        if end > self.capacity:
            raise ValueError(f"KV slab of {self.capacity} positions is full")
        h = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(h, torch.arange(start, end, device=h.device).unsqueeze(0))
        for entry in self.layers:
            layer, keys, values = entry["layer"], entry["keys"], entry["values"]
            attn, mlp = layer.self_attn, layer.mlp
            qkv = F.linear(layer.input_layernorm(h), entry["qkv"], entry["qkv_bias"])
            q, k, v = (t.view(batch, n, -1, self.head_dim).transpose(1, 2) for t in qkv.split(self.qkv_split, -1))
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            if n == 1 and not self.gqa:
                # one query per row: two batched products beat the flash kernel's setup here
                scores = torch.matmul(q, keys[:, :, :end].transpose(-1, -2)).mul_(attn.scaling)
                o = torch.matmul(torch.softmax(scores, dim=-1), values[:, :, :end])
            else:
                o = F.scaled_dot_product_attention(
                    q,
                    keys[:, :, :end],
                    values[:, :, :end],
                    is_causal=n > 1 and start == 0,
                    scale=attn.scaling,
                    enable_gqa=self.gqa,
                )
            h = h + attn.o_proj(o.transpose(1, 2).reshape(batch, n, -1))
            gate_up = F.linear(layer.post_attention_layernorm(h), entry["gate_up"], entry["gate_up_bias"])
            gate, up = gate_up.chunk(2, dim=-1)
            h = h + mlp.down_proj(mlp.act_fn(gate) * up)
        self.length = end
        return inner.norm(h[:, -1]) @ self.head


SAMPLE_BLOCK = 64  # vocabulary entries per block of the two-level inverse CDF


def _last_positive(x):
    """(B, n) -> (B, 1): the index of each row's last entry above zero."""
    import torch

    return torch.where(x > 0, torch.arange(x.size(1)), 0).amax(dim=1, keepdim=True)


def _first_positive(x):
    """(B, n) -> (B, 1): the index of each row's first entry above zero."""
    import torch

    return torch.where(x > 0, torch.arange(x.size(1)), x.size(1)).amin(dim=1, keepdim=True)


def draw_tokens(logits, generator):
    """One token per row from softmax(logits), by inverse CDF: one uniform per row.

    ``torch.multinomial`` draws an exponential variate for every vocabulary entry (a fifth of
    ``model.generate``'s time in the profile); this draws from the same distribution with one uniform
    per row, found in two levels: the block of ``SAMPLE_BLOCK`` entries whose cumulative mass
    passes it, then the entry inside that block. Zero-probability tokens (top-k, top-p) are never
    picked: a search lands on an entry whose mass exceeds the uniform, and the clamps keep float
    rounding at a block's edges inside its positive entries.
    """
    import torch
    import torch.nn.functional as F

    probs = torch.softmax(logits, dim=-1)
    batch, vocab = probs.shape
    pad = -vocab % SAMPLE_BLOCK
    blocks = (F.pad(probs, (0, pad)) if pad else probs).view(batch, -1, SAMPLE_BLOCK)
    mass = blocks.sum(-1)
    cdf = mass.cumsum(-1)
    u = torch.rand(batch, 1, generator=generator) * cdf[:, -1:]
    block = torch.searchsorted(cdf, u, right=True).minimum(_last_positive(mass))
    rest = u - (cdf.gather(1, block) - mass.gather(1, block))
    inside = blocks[torch.arange(batch), block.squeeze(1)]
    entry = torch.searchsorted(inside.cumsum(-1), rest, right=True)
    entry = entry.minimum(_last_positive(inside)).maximum(_first_positive(inside))
    return (block * SAMPLE_BLOCK + entry).squeeze(1)


def decode(model, prompt_ids, new_tokens: int, pick, eos_id: int, device: str):
    """Continue a (B, P) batch of equal-length prompts by up to ``new_tokens`` tokens.

    ``pick`` maps the (B, vocab) float32 logits of the last position (on the CPU) to B token ids.
    Returns a (B, new_tokens) int tensor; positions
    after a row's EOS hold EOS.
    """
    import torch

    batch, prompt_len = prompt_ids.shape
    out = torch.full((batch, new_tokens), eos_id, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    decoder = LeanDecoder(model, batch, prompt_len + new_tokens)
    inputs = prompt_ids.to(device)
    for t in range(new_tokens):
        token = pick(decoder.step(inputs).float().cpu())
        token = torch.where(done, torch.full_like(token, eos_id), token)
        out[:, t] = token
        done |= token == eos_id
        if bool(done.all()):
            break
        inputs = token.unsqueeze(1).to(device)
    return out


def sample_batch(model, prompt_ids, g: GenerateSettings, generator, eos_id: int, device: str):
    """Sample up to ``g.new_tokens`` tokens per prompt with the config's temperature, top-k and top-p."""

    def pick(logits):
        return draw_tokens(_filter_logits(logits / g.temperature, g.top_k, g.top_p), generator)

    return decode(model, prompt_ids, g.new_tokens, pick, eos_id, device)


def _chunk_seed(model_id: str, seed: int, chunk: int) -> int:
    return int(sha256_text(f"{model_id}|{seed}|{chunk}")[:15], 16)


def _read_existing(path: Path, plan: pd.DataFrame) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    try:
        existing = pd.read_parquet(path)
    except Exception:
        raise NatprintsError(f"{path} is not a readable parquet file; remove it to regenerate") from None
    if list(existing.columns) != COLUMNS or not set(existing["sample_id"]) <= set(plan["sample_id"]):
        raise NatprintsError(f"{path} holds rows this config does not plan (foreign file); remove it")
    return existing


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    tmp = temp_path_for(path)
    try:
        frame.to_parquet(tmp, index=False)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def generate_for_model(
    cfg: Config,
    model_id: str,
    prompts: pd.DataFrame,
    out_path: Path,
    seed: int,
    max_chunks: int | None = None,
    *,
    progress: bool = True,
) -> int:
    """Fill the missing rows of one model's file; returns how many rows were generated now."""
    import torch
    from tqdm.auto import tqdm

    from natprints.corpus import load_tokenizer
    from natprints.zoo import load_model, resolve_device

    g = cfg.generate
    plan = plan_rows(model_id, prompts, g, seed)
    existing = _read_existing(out_path, plan)
    missing = plan[~plan["sample_id"].isin(set(existing["sample_id"]))]
    if missing.empty:
        return 0
    device = resolve_device(cfg.run.device)
    tokenizer = load_tokenizer(cfg.paths.tokenizer)
    eos = tokenizer.eos_token_id
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    model = load_model(cfg.paths.zoo / model_id).to(device).eval()
    frames = [existing] if len(existing) else []
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
            have = set(existing["sample_id"])
            for (_, row), ids in zip(rows.iterrows(), out, strict=True):
                if row["sample_id"] in have:
                    continue
                n = int(np.argmax(ids == eos)) if (ids == eos).any() else len(ids)
                new.append(
                    {
                        "sample_id": row["sample_id"],
                        "model_id": model_id,
                        "prompt_id": row["prompt_id"],
                        "prompt": prompts["prompt"].iloc[row["prompt_row"]],
                        "text": tokenizer.decode(ids[:n].tolist()),
                        "n_tokens": n,
                        "token_ids": ids[:n].astype(np.int32).tolist(),
                        "sample_index": int(row["sample_index"]),
                        "sampling_seed": seed,
                        "temperature": g.temperature,
                        "top_k": g.top_k,
                        "top_p": g.top_p,
                        "new_tokens": g.new_tokens,
                    }
                )
            added += len(new)
            frames.append(pd.DataFrame(new, columns=COLUMNS))
            merged = pd.concat(frames, ignore_index=True)
            order = {sid: i for i, sid in enumerate(plan["sample_id"])}
            merged = merged.iloc[np.argsort(merged["sample_id"].map(order).to_numpy(), kind="stable")]
            merged = merged.reset_index(drop=True)
            _write_parquet(out_path, merged)
            frames = [merged]
            existing = merged
    return added


def stage_hash(cfg: Config) -> str:
    return hash_obj({"generate": cfg.generate.model_dump(), "train": cfg.train.model_dump()})


def generate_all(cfg: Config, *, max_chunks: int | None = None) -> dict:
    """The generate stage over the whole zoo plus the null control; writes the generated manifest."""
    from natprints.artifacts import read_manifest
    from natprints.parallel import run_jobs
    from natprints.zoo import condition_members, zoo_specs

    start = time.time()
    out = cfg.paths.generated
    specs = zoo_specs(cfg)
    for model_id in specs:
        if not (cfg.paths.zoo / model_id / "manifest.json").is_file():
            raise NatprintsError(f"zoo model {model_id} is missing; run `natprints zoo` first")
    prompts = build_prompts(cfg)
    base = next(iter(specs))
    jobs = [(cfg, m, prompts, out / f"{m}.parquet", cfg.generate.seed, max_chunks) for m in specs]
    jobs.append((cfg, base, prompts, out / "null" / f"{base}.parquet", cfg.generate.null_seed, max_chunks))
    added = sum(run_jobs(cfg.run.workers, generate_for_model, jobs, "generate"))
    expected = len(prompts) * cfg.generate.samples_per_prompt
    counts = {str(job[3].relative_to(out)): len(pd.read_parquet(job[3], columns=["sample_id"])) for job in jobs}
    complete = all(n == expected for n in counts.values())
    manifest = {
        "stage": "generate",
        "run": cfg.run.name,
        "stage_hash": stage_hash(cfg),
        "complete": complete,
        "base_model": base,
        "prompts": len(prompts),
        "rows_per_model": expected,
        "models": {
            m: {
                "conditions": c,
                "file": f"{m}.parquet",
                "model_sha256": read_manifest(cfg.paths.zoo / m)["files"]["model.safetensors"],
            }
            for m, (_, c) in specs.items()
        },
        "null_control": {"model_id": base, "file": f"null/{base}.parquet", "sampling_seed": cfg.generate.null_seed},
        "conditions": condition_members(cfg),
        "sampling": cfg.generate.model_dump(),
        "files": {name: sha256_file(out / name) for name in counts},
        "rows": counts,
        "added": added,
        "wall_s": round(time.time() - start, 2),
    }
    manifest["package_versions"] = package_versions()
    manifest["git_revision"] = git_revision()
    atomic_write_json(out / "manifest.json", manifest)
    return manifest
