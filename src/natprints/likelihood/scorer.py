"""Exact log-likelihood of a continuation under a model and the sampling transform that drew it.

The zoo's texts are ancestral samples: continuation token t was drawn from
softmax(filter(logits_t / temperature, top_k, top_p)) (see ``natprints.generate``), and sampling
stopped when EOS was drawn. Scoring a text by teacher forcing under the same transform gives the
exact probability that the model wrote it: the Bayes posterior over a condition's models is the
ceiling of attribution. On request (``moments``) each position also gets the transformed
distribution's entropy and the variance of log p, for an analytic (Fast-DetectGPT-style) "did this
model write it" test; they cost about a third of the work beyond the trunk and the LM head, so
callers ask for them only where that test reads them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from natprints.errors import NatprintsError

if TYPE_CHECKING:
    import torch

CPU_CHUNK_ELEMENTS = 2**18  # logits per chunk of positions on the CPU (1 MB of float32)
ACCELERATOR_CHUNK_ELEMENTS = 2**26  # elsewhere: few large kernels beat cache residency


@dataclass(frozen=True)
class TextScore:
    """One text scored under one model; entry t of each array is the event at continuation position t.

    The arrays (float64) have one entry per continuation token, plus a last one for the EOS event when
    the sampler stopped early (``ends_with_eos``: fewer than ``new_tokens`` tokens). ``entropy`` and
    ``logprob_variance`` are None when the text was scored without its moments.
    """

    token_logprobs: np.ndarray  # log p(event_t | prefix) under the transform; -inf outside its support
    entropy: np.ndarray | None  # H_t = -sum_v p_v log p_v of the transformed distribution at position t
    logprob_variance: np.ndarray | None  # Var_t[log p] under that same distribution
    ends_with_eos: bool

    @property
    def n_tokens(self) -> int:
        """Continuation tokens, the EOS event excluded."""
        return len(self.token_logprobs) - int(self.ends_with_eos)

    @property
    def loglik(self) -> float:
        """log P(continuation, and where it stopped | prompt): the exact log-probability of the sample."""
        return float(self.token_logprobs.sum())

    @property
    def analytic_z(self) -> float:
        """(loglik - sum_t(-H_t)) / sqrt(sum_t Var_t): about N(0, 1) on the model's own samples.

        log p_t + H_t has mean 0 and variance Var_t given the prefix, so the sum is a martingale and the
        ratio is asymptotically standard normal (martingale CLT). A zero variance sum gives nan or +-inf.
        """
        if self.entropy is None or self.logprob_variance is None:
            raise NatprintsError("analytic_z needs the text scored with its moments (score_texts(..., moments=True))")
        with np.errstate(divide="ignore", invalid="ignore"):
            centred = np.float64(self.loglik) + self.entropy.sum()
            return float(centred / np.sqrt(self.logprob_variance.sum()))


def sampling_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """(N, vocab) logits -> logits / temperature with the sampler's filters applied (-inf = dropped).

    The sampler's own :func:`natprints.generate.sampler.filter_logits` (a test checks bit-identity):
    - top-k keeps every entry >= the k-th largest value, so all entries tied with the k-th are kept
      (more than k tokens may survive); it is applied to the temperature-scaled logits, as sampled.
    - top-p sorts the survivors descending with ``torch.sort`` and drops an entry when the softmax mass
      of the entries sorted before it already reaches ``top_p``; the first always stays. Among entries
      tied at that boundary, which are kept follows ``torch.sort``'s order, the sampler's own call.
    The sampler's logits come from its incremental decoder, ours from one full forward: they differ by
    float rounding (~1e-6), so a token whose logit sits within rounding of a filter boundary can be in
    one support and not the other. That is the only way a model's own sample can score -inf here.
    """
    from natprints.generate.sampler import filter_logits

    return filter_logits(logits / temperature if temperature != 1.0 else logits, top_k, top_p)


def score_positions(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    moments: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(N, vocab) float32 logits and their (N,) targets -> (log p of target, entropy, variance of log p).

    Everything is under the transformed distribution. With x = z - max z, e = exp(x) and s = sum e:
    log p = x - log s, and with m1 = sum(e x) / s and m2 = sum(e x^2) / s, H = log s - m1 and
    Var[log p] = Var[x] = m2 - m1^2. One exponential pass and, for the moments, two in-place products
    (e x, then e x^2) each summed. ``logits`` is overwritten (callers pass the head's output for a
    chunk of positions). Without ``moments`` the entropy and variance are None.
    """

    x = sampling_logits(logits, temperature, top_k, top_p)
    x.sub_(x.amax(dim=-1, keepdim=True))
    target = x.gather(1, targets[:, None]).squeeze(1)
    if not moments:  # x is not read again: exponentiate in place (a fresh tensor made this 1.5x slower)
        return target - x.exp_().sum(dim=-1).log(), None, None
    e = x.exp()
    total = e.sum(dim=-1)
    log_total = total.log()
    picked = target - log_total
    if top_k or top_p < 1.0:
        x.masked_fill_(e == 0, 0.0)  # dropped tokens (-inf): p = 0 and p log p counts as 0
    ex = e.mul_(x)  # in place: a fresh product costs more than the multiply (and vecdot makes one)
    m1 = ex.sum(dim=-1) / total
    m2 = ex.mul_(x).sum(dim=-1) / total
    # m2 - m1^2 loses ~1e-7 of m2 to rounding (|m1| is a few nats): clamp the rare tiny negative
    return picked, log_total - m1, (m2 - m1.square()).clamp_(min=0.0)


@dataclass(frozen=True)
class Batch:
    """Rows teacher-forced together: right-padded inputs and the flat positions that predict events."""

    rows: list[int]  # indices into the caller's lists, in this batch's order
    input_ids: torch.Tensor  # (B, L) int64: prompt + events without the last, right-padded
    positions: torch.Tensor  # (N,) indices into the flattened (B * L) positions, row by row
    targets: torch.Tensor  # (N,) the event each position predicts (continuation tokens, then EOS)
    events: list[int]  # events per row (sums to N)
    ends_with_eos: list[bool]


def plan_batches(
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    eos_id: int,
    new_tokens: int,
    batch_size: int,
    vocab_size: int,
    sort: bool = True,
) -> list[Batch]:
    """Validate the rows and group them (sorted by input length unless ``sort`` is False) into batches.

    Row i's events are its continuation, plus EOS when it is shorter than ``new_tokens``; its input is
    prompt + events minus the last event (nothing reads the position after it). The event at
    continuation position j is predicted at input position len(prompt) - 1 + j. Padding uses
    ``eos_id``: causal attention never lets a later position change an earlier one, so no mask is needed.
    """
    import torch

    if len(prompts) != len(continuations):
        raise NatprintsError(f"likelihood: {len(prompts)} prompts but {len(continuations)} continuations")
    if new_tokens < 1 or batch_size < 1:
        raise NatprintsError(f"likelihood: new_tokens ({new_tokens}) and batch_size ({batch_size}) must be >= 1")
    n = len(prompts)
    prompt_ids = [np.asarray(p, dtype=np.int64).ravel() for p in prompts]
    cont_ids = [np.asarray(c, dtype=np.int64).ravel() for c in continuations]
    prompt_len = np.array([len(p) for p in prompt_ids], dtype=np.int64)
    cont_len = np.array([len(c) for c in cont_ids], dtype=np.int64)
    _reject(np.flatnonzero(prompt_len == 0), "has an empty prompt (nothing predicts its first token)")
    long = np.flatnonzero(cont_len > new_tokens)
    if long.size:
        i = int(long[0])
        raise NatprintsError(f"likelihood: row {i} has {cont_len[i]} tokens, more than new_tokens={new_tokens}")
    cont_row = np.repeat(np.arange(n), cont_len)
    flat_cont = np.concatenate([*cont_ids, np.zeros(0, np.int64)])
    _reject(cont_row[flat_cont == eos_id], f"holds EOS ({eos_id}) inside its continuation")
    row = np.concatenate([np.repeat(np.arange(n), prompt_len), cont_row])
    flat = np.concatenate([*prompt_ids, flat_cont])
    _reject(row[(flat < 0) | (flat >= vocab_size)], f"holds a token id outside the vocabulary [0, {vocab_size})")
    stops = cont_len < new_tokens
    n_events = cont_len + stops
    input_len = prompt_len + n_events - 1
    order = np.argsort(input_len, kind="stable") if sort else np.arange(n)
    stop_event = np.array([eos_id], dtype=np.int64)
    batches = []
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size].tolist()
        width = int(input_len[rows].max())
        ids = np.full((len(rows), width), eos_id, dtype=np.int64)
        for b, i in enumerate(rows):
            ids[b, : prompt_len[i]] = prompt_ids[i]
            ids[b, prompt_len[i] : input_len[i]] = cont_ids[i][: input_len[i] - prompt_len[i]]
        counts = n_events[rows]
        first = np.arange(len(rows)) * width + prompt_len[rows] - 1  # the position predicting each first event
        offsets = np.cumsum(counts) - counts  # where each row's events start among the batch's targets
        targets = [part for i in rows for part in ((cont_ids[i], stop_event) if stops[i] else (cont_ids[i],))]
        batches.append(
            Batch(
                rows=rows,
                input_ids=torch.from_numpy(ids),
                positions=torch.from_numpy(np.repeat(first - offsets, counts) + np.arange(counts.sum())),
                targets=torch.from_numpy(np.concatenate(targets)),
                events=counts.tolist(),
                ends_with_eos=stops[rows].tolist(),
            )
        )
    return batches


def _reject(rows: np.ndarray, problem: str) -> None:
    """Raise for the first of ``rows`` (indices of rows that have ``problem``), if any."""
    if rows.size:
        raise NatprintsError(f"likelihood: row {int(rows.min())} {problem}")


def event_hidden(model: Any, batch: Batch, device: Any = "cpu") -> torch.Tensor:
    """(N, hidden) last hidden states of the positions that predict events: one trunk forward per batch."""
    hidden = model.model(input_ids=batch.input_ids.to(device), use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.size(-1)).index_select(0, batch.positions.to(device))


def head_chunks(model: Any, hidden: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """The LM head's float32 logits, a few positions at a time: the (N, vocab) logits never exist at once.

    On the CPU a chunk is about 1 MB, so its temporaries are recycled by the allocator and stay in
    cache (a fresh full-size tensor costs more in page faults than the arithmetic on it).
    """
    vocab = model.lm_head.out_features
    elements = CPU_CHUNK_ELEMENTS if hidden.device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    rows = max(1, elements // vocab)
    for start in range(0, hidden.size(0), rows):
        span = slice(start, start + rows)
        yield span, model.lm_head(hidden[span]).float()


class _FullLogits:
    """Any causal LM in the shape :func:`score_texts` reads (``.model``, ``.lm_head``, ``.config``).

    The trunk returns the model's own final logits and the head is the identity, so whatever the
    architecture applies after its output embedding (soft-capping, logit scales) is kept. It costs the
    full (batch, length, vocab) logits; a Llama model is scored directly, from its hidden states.
    """

    def __init__(self, lm: Any):
        import torch

        self.config = lm.config
        self._lm = lm
        self.lm_head = torch.nn.Identity()
        self.lm_head.out_features = lm.config.vocab_size

    def model(self, input_ids: Any, use_cache: bool = False) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(last_hidden_state=self._lm(input_ids=input_ids, use_cache=use_cache).logits)


def as_scorer(lm: Any) -> Any:
    """``lm`` in the shape :func:`score_texts` reads: a Llama model as it is, any other through its full logits."""
    return lm if type(lm).__name__ == "LlamaForCausalLM" else _FullLogits(lm)


def score_texts(
    model: Any,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    eos_id: int,
    new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    batch_size: int = 64,
    device: Any = "cpu",
    moments: bool = True,
) -> list[TextScore]:
    """Score each continuation given its prompt under ``model`` and the sampling transform, in input order.

    ``model`` is a ``LlamaForCausalLM`` (anything with ``.model`` returning ``last_hidden_state`` and
    ``.lm_head``) already on ``device``. Rows are teacher-forced in batches of ``batch_size``, sorted by
    length to limit padding; the LM head runs only on the positions that predict continuation tokens
    and the EOS event. Logits and per-position values are float32; the arrays returned are float64.
    ``moments``: also each position's entropy and variance of log p (else None in every score).
    """
    import torch

    if not temperature > 0:
        raise NatprintsError(f"likelihood: temperature must be > 0, got {temperature}")
    if top_k < 0 or not 0 < top_p <= 1:
        raise NatprintsError(f"likelihood: need top_k >= 0 and 0 < top_p <= 1, got {top_k} and {top_p}")
    batches = plan_batches(
        prompts,
        continuations,
        eos_id=eos_id,
        new_tokens=new_tokens,
        batch_size=batch_size,
        vocab_size=model.config.vocab_size,
    )
    scores: list[TextScore | None] = [None] * len(prompts)
    with torch.inference_mode():
        for batch in batches:
            targets = batch.targets.to(device)
            parts = [
                score_positions(logits, targets[span], temperature, top_k, top_p, moments)
                for span, logits in head_chunks(model, event_hidden(model, batch, device))
            ]
            picked = _float64([p for p, _, _ in parts])
            entropy = _float64([h for _, h, _ in parts]) if moments else None
            variance = _float64([v for _, _, v in parts]) if moments else None
            ends = np.cumsum(batch.events)
            for i, end, count, stops in zip(batch.rows, ends, batch.events, batch.ends_with_eos, strict=True):
                span = slice(end - count, end)
                scores[i] = TextScore(
                    picked[span],
                    None if entropy is None else entropy[span],
                    None if variance is None else variance[span],
                    stops,
                )
    return scores  # type: ignore[return-value]  # every row was filled


def _float64(chunks: list) -> np.ndarray:
    import torch

    return torch.cat(chunks).cpu().numpy().astype(np.float64)


def prefix_loglik(per_token: np.ndarray, n_tokens: int) -> float:
    """The log-likelihood of only the first ``n_tokens`` events of a text (an evidence curve's point).

    ``per_token`` is a :attr:`TextScore.token_logprobs`: the EOS event sits at index n, so it counts
    only when n < ``n_tokens``; a text with fewer events contributes all it has.
    """
    if n_tokens < 0:
        raise NatprintsError(f"prefix_loglik: n_tokens must be >= 0, got {n_tokens}")
    return float(np.asarray(per_token, dtype=np.float64)[:n_tokens].sum())
