"""Likelihood scoring throughput: ours against the loop a user would write and against the unavoidable work.

All five contenders score the same texts with the same model on the same torch threads (temperature 1, no
filters, so the plain loop computes the same numbers):
- ``ours``: :func:`natprints.likelihood.score_texts` (log p of each event, entropy and variance: the
  stage's test texts of a condition with an open-set test);
- ``ours_logp``: the same without the moments (every other text the stages score);
- ``naive``: per batch of rows in input order, ``model(ids).logits``, ``log_softmax``, ``gather``;
- ``limit``: only the trunk forward ``model.model(ids)`` and the LM head on the event positions,
  on our batches;
- ``normalizer``: the limit plus ``logsumexp`` and ``gather``, the least an exact log p needs (ours
  adds each position's entropy and variance of log p).
Throughput counts scored events (continuation tokens plus EOS events) per second. The timing unit is one
batch of rows (a quarter of a second): each of ``reps`` rounds runs every contender on batch j before
any on batch j + 1 (:func:`natprints.bench.timing.rounds`), so all see the same machine speed; tokens/s
come from the median round, and each ratio is the median over rounds of that round's paired ratio.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np

from natprints.bench.timing import paired_ratio, rounds
from natprints.likelihood.scorer import event_hidden, head_chunks, plan_batches, score_texts

BATCH_SIZE = 64
TOLERANCE = 1e-5  # per event log-probability, ours against the plain loop


def _naive_scores(model: Any, prompts, continuations, *, eos_id: int, new_tokens: int) -> list[np.ndarray]:
    """What a user writes: full logits of every position, log-softmax, gather, slice out the continuation."""
    import torch

    out = []
    for start in range(0, len(prompts), BATCH_SIZE):
        rows = []
        for prompt, cont in zip(
            prompts[start : start + BATCH_SIZE], continuations[start : start + BATCH_SIZE], strict=True
        ):
            events = list(cont) + ([eos_id] if len(cont) < new_tokens else [])
            rows.append((len(prompt), list(prompt) + events))
        width = max(len(ids) for _, ids in rows)
        ids = torch.full((len(rows), width), eos_id, dtype=torch.long)
        for b, (_, row) in enumerate(rows):
            ids[b, : len(row)] = torch.tensor(row)
        logits = model(ids[:, :-1]).logits.float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        for b, (p, row) in enumerate(rows):
            out.append(logp[b, p - 1 : len(row) - 1].numpy().astype(np.float64))
    return out


def _limit(model: Any, batches) -> None:
    """The trunk forward and the LM head on the event positions (in our cache-sized chunks), nothing else."""
    for batch in batches:
        for _ in head_chunks(model, event_hidden(model, batch)):
            pass


def _normalizer(model: Any, batches) -> None:
    """The limit plus the softmax normalizer and the target's logit: exact log p and nothing more."""
    import torch

    for batch in batches:
        for span, logits in head_chunks(model, event_hidden(model, batch)):
            logits.gather(1, batch.targets[span, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def bench_likelihood(
    model: Any,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    eos_id: int,
    new_tokens: int,
    reps: int = 3,
    threads: int = 1,
) -> dict[str, Any]:
    """Time ours, the plain loop and the limit on one model and text set; check ours equals the plain loop."""
    import torch

    kwargs = {"eos_id": eos_id, "new_tokens": new_tokens}
    sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    batches = plan_batches(prompts, continuations, batch_size=BATCH_SIZE, vocab_size=model.config.vocab_size, **kwargs)
    events = sum(len(b.targets) for b in batches)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            ours = score_texts(model, prompts, continuations, batch_size=BATCH_SIZE, **kwargs, **sampling)
            naive = _naive_scores(model, prompts, continuations, **kwargs)
            # one unit per batch of rows: sub-second turns, so every contender sees the same machine speed
            ours_rows = [([prompts[i] for i in b.rows], [continuations[i] for i in b.rows]) for b in batches]
            naive_rows = [
                (prompts[start : start + BATCH_SIZE], continuations[start : start + BATCH_SIZE])
                for start in range(0, len(prompts), BATCH_SIZE)
            ]
            timed = rounds(
                {
                    "ours": [
                        partial(score_texts, model, p, c, batch_size=BATCH_SIZE, **kwargs, **sampling)
                        for p, c in ours_rows
                    ],
                    "ours_logp": [
                        partial(score_texts, model, p, c, batch_size=BATCH_SIZE, moments=False, **kwargs, **sampling)
                        for p, c in ours_rows
                    ],
                    "naive": [partial(_naive_scores, model, p, c, **kwargs) for p, c in naive_rows],
                    "limit": [partial(_limit, model, [b]) for b in batches],
                    "normalizer": [partial(_normalizer, model, [b]) for b in batches],
                },
                reps=reps,
            )
            seconds = {name: t["median_s"] for name, t in timed.items()}
    finally:
        torch.set_num_threads(previous)
    token_diff = max(float(np.max(np.abs(s.token_logprobs - n))) for s, n in zip(ours, naive, strict=True))
    text_diff = max(abs(s.loglik - float(n.sum())) for s, n in zip(ours, naive, strict=True))
    rate = {name: events / s for name, s in seconds.items()}
    return {
        "results": {
            "likelihood_ours_tokens_per_s": round(rate["ours"], 1),
            "likelihood_naive_tokens_per_s": round(rate["naive"], 1),
            "likelihood_limit_tokens_per_s": round(rate["limit"], 1),
            "likelihood_ratio_vs_naive": round(paired_ratio(timed, "ours", "naive"), 3),
            "likelihood_ratio_vs_limit": round(paired_ratio(timed, "ours", "limit"), 3),
            "likelihood_logp_tokens_per_s": round(rate["ours_logp"], 1),
            "likelihood_logp_ratio_vs_limit": round(paired_ratio(timed, "ours_logp", "limit"), 3),
            "likelihood_normalizer_tokens_per_s": round(rate["normalizer"], 1),
            "likelihood_normalizer_ratio_vs_limit": round(paired_ratio(timed, "normalizer", "limit"), 3),
            "likelihood_agree": bool(token_diff <= TOLERANCE),
            "likelihood_max_token_diff": token_diff,
            "likelihood_max_text_diff": text_diff,
        },
        "rows": len(prompts),
        "events": events,
        "batch_size": BATCH_SIZE,
        "threads": threads,
        "reps": reps,
        "notes": [
            "tokens/s = scored events (continuation tokens + EOS events) per second in the median of reps rounds;"
            " ratios = median over rounds of the paired ratio (contenders alternate batch by batch)",
            "ours also computes the entropy and variance of log p at every position, ours_logp and naive do not",
            f"agreement: max |log p| difference per event {token_diff:.2e} (tolerance {TOLERANCE:g})",
        ],
    }
