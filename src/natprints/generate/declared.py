"""Texts of models with tokenizers of their own (declared models, ``[[models]]``, and the zoo's
``tokenizer`` condition): the run's prompts as text, each model reading them with its own tokenizer,
every continuation cut to one budget in characters.

The prompt of a row is the run's prompt string (the held-out paragraph's first ``prompt_tokens``
tokens of the run's tokenizer, decoded). Each model tokenizes it, samples up to ``new_tokens`` of its
own tokens with the run's transform, and its continuation (decoded alone, as the likelihood scorer
reads it) is cut before any undecodable bytes (:func:`valid_prefix`), then at the last word boundary
within ``max_chars`` characters. ``token_ids`` holds the model's own sampled tokens that the cut text
keeps. Rows are planned as the zoo's are (ids from
model, prompt and sample index); prompts of one own-token length are sampled together, so each
chunk's generator seed, and with it every text, is the same on a resumed run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from natprints.config import Config, GenerateSettings


def cut_at_word(text: str, max_chars: int) -> str:
    """``text`` within ``max_chars`` characters, cut at the last whitespace inside the budget (a
    single word longer than the budget is cut inside it); trailing whitespace of a cut text dropped."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    if not text[max_chars].isspace():
        space = max((i for i, c in enumerate(head) if c.isspace()), default=0)
        head = head[:space] if head[:space].strip() else head
    return head.rstrip()


UNDECODABLE = "\ufffd"  # what a byte-level decoder writes for bytes that are no UTF-8


def valid_prefix(text: str) -> str:
    """``text`` up to its first undecodable byte sequence: many byte sequences decode to the same
    replacement character, so a string holding one is not what the model wrote (its score as a string
    would be of other bytes). A small or early model writes them; a trained one rarely does."""
    cut = text.find(UNDECODABLE)
    return text if cut < 0 else text[:cut]


def kept_tokens(tokenizer, ids: list[int], text: str) -> int:
    """How many of the sampled ``ids`` the cut ``text`` keeps: the longest prefix whose decoding fits
    in it (decoded lengths grow with the prefix, so a binary search finds it)."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer.decode(ids[:mid])) <= len(text):
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_declared(
    label: str,
    prompt_ids: list[list[int]],
    prompts: pd.DataFrame,
    g: GenerateSettings,
    seed: int,
    train: frozenset[str],
) -> pd.DataFrame:
    """Every row to generate for one model with its own tokenizer; ``chunk`` groups rows of one own-token prompt
    length, at most ``batch_size`` of them (the extra training continuations in chunks of their own)."""
    from natprints.generate.stage import plan_rows

    plan = plan_rows(label, prompts, g, seed, train)
    lengths = np.array([len(prompt_ids[i]) for i in plan["prompt_row"]])
    extra = (plan["sample_index"] >= g.samples_per_prompt).to_numpy()
    chunk = np.zeros(len(plan), dtype=np.int64)
    next_chunk = 0
    for part in (~extra, extra):
        rows = np.flatnonzero(part)
        for length in sorted(set(lengths[rows])):
            same = rows[lengths[rows] == length]
            chunk[same] = next_chunk + np.arange(len(same)) // g.batch_size
            next_chunk += -(-len(same) // g.batch_size)
    return plan.assign(chunk=chunk)


def generate_declared(
    cfg: Config,
    label: str,
    directory: Path,
    prompts: pd.DataFrame,
    out_path: Path,
    seed: int,
    max_chunks: int | None = None,
    train_prompts: frozenset[str] = frozenset(),
    *,
    progress: bool = True,
) -> int:
    """Fill the missing rows of one model's file (its own tokenizer, else the run's for a zoo model
    without one); returns how many rows were generated now."""
    import torch
    from tqdm.auto import tqdm

    from natprints.corpus import load_tokenizer
    from natprints.generate.sampler import sample_batch
    from natprints.generate.stage import Filling, _chunk_seed, generated_row
    from natprints.modeldir import encode_texts, fit_context, has_tokenizer, inspect_model, load_model_tokenizer
    from natprints.runtime import load_lm, resolve_device

    g = cfg.generate
    # its own tokenizer; a zoo model without one (the base of the tokenizer condition) reads the run's
    tokenizer = load_model_tokenizer(directory) if has_tokenizer(directory) else load_tokenizer(cfg.paths.tokenizer)
    limit = inspect_model(directory).max_positions  # a prompt longer than the room the model has is cut from the left
    prompt_ids = [
        fit_context(ids, g.new_tokens, limit, f"model {label}, prompt {i}")
        for i, ids in zip(prompts["prompt_id"], encode_texts(tokenizer, prompts["prompt"].tolist()), strict=True)
    ]
    plan = plan_declared(label, prompt_ids, prompts, g, seed, train_prompts)
    filling = Filling(out_path, plan)
    have = filling.done
    missing = plan[~plan["sample_id"].isin(have)]
    if missing.empty:
        filling.finish()
        return 0
    device = resolve_device(cfg.run.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    model = load_lm(directory, device=device)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1
    added = 0
    with torch.inference_mode():
        for chunk in tqdm(
            sorted(missing["chunk"].unique())[:max_chunks], desc=f"generate {label}", leave=False, disable=not progress
        ):
            rows = plan[plan["chunk"] == chunk]
            batch = torch.tensor([prompt_ids[i] for i in rows["prompt_row"]], dtype=torch.long)
            gen = torch.Generator().manual_seed(_chunk_seed(label, seed, int(chunk)))
            out = sample_batch(model, batch, g, gen, eos, device).numpy()
            new = []
            for (_, row), ids in zip(rows.iterrows(), out, strict=True):
                if row["sample_id"] in have:
                    continue
                n = int(np.argmax(ids == eos)) if (ids == eos).any() else len(ids)
                sampled = ids[:n].tolist()
                text = cut_at_word(valid_prefix(tokenizer.decode(sampled)), g.max_chars)
                kept = sampled[: kept_tokens(tokenizer, sampled, text)]
                new.append(generated_row(row, label, prompts, text, kept, seed, g))
            added += len(new)
            filling.add(int(chunk), new)
    filling.finish()
    return added


def short_of_budget(path: Path, g: GenerateSettings) -> int:
    """Texts that used every one of ``new_tokens`` tokens yet stayed short of ``max_chars`` by more than
    a word: the token cap, not the character budget, ended them (raise new_tokens)."""
    frame = pd.read_parquet(path, columns=["text", "n_tokens"])
    capped = frame["n_tokens"].to_numpy() >= g.new_tokens
    short = frame["text"].str.len().to_numpy() < g.max_chars - 20
    return int((capped & short).sum())
