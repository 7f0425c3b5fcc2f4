"""Bench section: our frozen-encoder featurizer against plain ``SentenceTransformer.encode``.

Both sides embed the same unique texts with the same model object and the same torch thread count;
ours is :class:`natprints.features.SentenceEmbedder` with a fresh (cold) on-disk cache every run.
The embeddings must agree within ``TOLERANCE`` or the bench raises.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from natprints.attribution.features import (
    DEFAULT_ENCODER,
    EMBED_BATCH_TOKENS,
    SentenceEmbedder,
    _load_encoder,
    as_texts,
)
from natprints.bench.timing import interleaved, measure, torch_profile

TOLERANCE = 1e-4  # max abs difference per coordinate of the unit-length embeddings
MIN_COSINE = 0.9999
ST_BATCH_SIZE = 32  # SentenceTransformer.encode's default batch size
PROFILE_TEXTS = 400  # the profiles run on a prefix: they only rank operators


def _check_equal(reference: np.ndarray, ours: np.ndarray, what: str) -> float:
    """Max abs difference of two embedding matrices; raises past ``TOLERANCE`` or ``MIN_COSINE``."""
    if reference.shape != ours.shape:
        raise AssertionError(f"{what}: shape {ours.shape} != {reference.shape}")
    diff = float(np.abs(reference.astype(np.float64) - ours).max()) if reference.size else 0.0
    cosine = np.sum(reference * ours, axis=1) / np.maximum(
        np.linalg.norm(reference, axis=1) * np.linalg.norm(ours, axis=1), 1e-12
    )
    if diff > TOLERANCE or (cosine.size and float(cosine.min()) < MIN_COSINE):
        raise AssertionError(f"{what}: max abs diff {diff:.2e}, min cosine {cosine.min():.6f}")
    return diff


def _token_slots(model: Any, texts: list[str]) -> tuple[int, int]:
    """(tokens, token slots of ST's batches): ST sorts by characters and pads each batch of 32."""
    lengths = np.array(
        [len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)["input_ids"]]
    )
    order = np.argsort([-len(t) for t in texts], kind="stable")
    slots = sum(
        int(lengths[order[i : i + ST_BATCH_SIZE]].max()) * len(order[i : i + ST_BATCH_SIZE])
        for i in range(0, len(order), ST_BATCH_SIZE)
    )
    return int(lengths.sum()), slots


def _linear_flops_per_token(model: Any) -> int:
    """FLOPs of the encoder's linear layers for one token (2 per weight)."""
    import torch

    encoder = model[0].auto_model.encoder
    return 2 * sum(m.weight.numel() for m in encoder.modules() if isinstance(m, torch.nn.Linear))


def _gemm_gflops(rows: int = 2048, inner: int = 384, cols: int = 1536) -> float:
    """This core's best fp32 GEMM rate on the encoder's FFN shape: the ceiling of the whole forward.

    The fastest of many runs, not the median: a peak, so a noisy neighbour cannot lower the ceiling.
    """
    import torch

    x, w, b = torch.randn(rows, inner), torch.randn(inner, cols), torch.randn(cols)
    seconds = min(measure(lambda: torch.addmm(b, x, w), reps=30, warmup=2)["runs_s"])
    return 2 * rows * inner * cols / seconds / 1e9


def bench_embed(texts: list[str], *, reps: int = 3, cache_dir: Path, threads: int = 1) -> dict[str, Any]:
    """Throughput of ``SentenceEmbedder`` (cold and cached) and of ``SentenceTransformer.encode``.

    Duplicates are dropped first, so both sides embed exactly the same texts. Timings are medians of
    ``reps`` interleaved runs after one warm-up run of each side (which is also the equality check).
    """
    import torch

    unique = list(dict.fromkeys(as_texts(texts)))
    if not unique:
        raise ValueError("bench_embed needs at least one text")
    cache_dir = Path(cache_dir)
    model = _load_encoder(DEFAULT_ENCODER, "cpu")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cold = itertools.count()

        def ours() -> np.ndarray:
            embedder = SentenceEmbedder(cache_dir=str(cache_dir / f"cold-{next(cold)}"), threads=threads)
            return embedder.fit(unique).transform(unique)

        def baseline() -> np.ndarray:
            return model.encode(unique)

        reference = baseline()  # the warm-up of both sides
        max_diff = _check_equal(reference, ours(), "SentenceEmbedder vs SentenceTransformer.encode")
        timings = interleaved({"sentence_transformers": baseline, "ours": ours}, reps=reps, warmup=0)

        cached = SentenceEmbedder(cache_dir=str(cache_dir / "cold-0"), threads=threads).fit(unique)
        _check_equal(reference, cached.transform(unique), "cached SentenceEmbedder")
        cached_timing = measure(lambda: cached.transform(unique), reps=reps, warmup=0)

        gemm_gflops = _gemm_gflops()
        head = unique[:PROFILE_TEXTS]
        st_shares: dict[str, float] = {}
        st_profile = torch_profile(lambda: model.encode(head), top=8, shares=st_shares)
        our_profile = torch_profile(lambda: SentenceEmbedder(threads=threads).fit(head).transform(head), top=8)
    finally:
        torch.set_num_threads(previous_threads)

    n = len(unique)
    ours_s = timings["ours"]["median_s"]
    st_s = timings["sentence_transformers"]["median_s"]
    ratio = st_s / ours_s
    tokens, st_slots = _token_slots(model, unique)
    addmm = 100 * st_shares.get("aten::addmm", 0.0)
    notes = [
        f"`SentenceEmbedder.transform` (cold cache) embeds {n} unique texts in {ours_s:.2f} s against "
        f"{st_s:.2f} s for `SentenceTransformer.encode` with its defaults, {threads} torch thread(s): "
        f"{ratio:.2f}x; max abs difference {max_diff:.1e} (tolerance {TOLERANCE:g}).",
        f"Texts are tokenized once and run in equal-length batches (at most {EMBED_BATCH_TOKENS} tokens): "
        f"{tokens} token slots, where ST's batches of {ST_BATCH_SIZE} (sorted by characters, padded to the "
        f"longest) take {st_slots} ({100 * (st_slots - tokens) / st_slots:.1f}% padding), and no attention mask.",
        "The forward is the model's own BertModel (SDPA) under `torch.inference_mode()`; mean pooling is a "
        "plain mean and L2 normalization runs once over all rows.",
        f"A rerun on the warm on-disk cache embeds {n / cached_timing['median_s']:.0f} texts/s.",
    ]
    gflop = tokens * _linear_flops_per_token(model) / 1e9
    notes.append(
        f"Ours does {gflop:.0f} GFLOP of linear-layer work, {gflop / ours_s:.0f} GFLOP/s over the whole run "
        f"(ST: {gflop * st_slots / tokens:.0f} GFLOP, {gflop * st_slots / tokens / st_s:.0f} GFLOP/s)."
    )
    notes.append(
        f"This core's fp32 GEMM runs at {gemm_gflops:.0f} GFLOP/s (2048x384 by 384x1536): even with no other "
        f"op, the {gflop:.0f} GFLOP would take {gflop / gemm_gflops:.1f} s, so "
        f"{st_s * gemm_gflops / gflop:.2f}x over ST is the ceiling of any exact same-precision, same-threads change."
    )
    if addmm is not None:
        notes.append(
            f"`aten::addmm` (fp32 GEMM, one core) is {addmm:.0f}% of ST's self CPU time, so the padding removed "
            f"({st_slots / tokens:.2f}x fewer token slots) sets about the gain an exact same-precision, "
            f"same-threads change can reach here; attention, GELU, norms, copies: the other {100 - addmm:.0f}%."
        )
    return {
        "results": {
            "embed_texts_per_s": n / ours_s,
            "embed_st_texts_per_s": n / st_s,
            "embed_ratio_vs_sentence_transformers": ratio,
            "embed_cached_texts_per_s": n / cached_timing["median_s"],
            "embed_max_abs_diff": max_diff,
            "embed_texts": n,
            "embed_threads": threads,
        },
        "profile": [f"sentence-transformers encode ({len(head)} texts): {line}" for line in st_profile]
        + [f"SentenceEmbedder.transform ({len(head)} texts): {line}" for line in our_profile],
        "notes": notes,
        "timings": {**timings, "cached": cached_timing},
    }
