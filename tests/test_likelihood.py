"""Likelihood scoring against direct computations on tiny Llama models built in the test."""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import numpy as np
import pytest

from natprints.errors import NatprintsError
from natprints.likelihood import TextScore, prefix_loglik, sampling_logits, score_texts
from natprints.stats import posterior

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 97
EOS = 0


def tiny_model(seed: int, head_scale: float = 1.0):
    """A freshly initialised tiny Llama; ``head_scale`` sharpens its (at init nearly uniform) outputs."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model(0, head_scale=10.0)


def random_rows(rng: np.random.Generator, prompt_lens, cont_lens) -> tuple[list[list[int]], list[list[int]]]:
    """Random prompts and continuations of the given lengths, EOS never inside."""
    prompts = [rng.integers(1, VOCAB, size=p).tolist() for p in prompt_lens]
    conts = [rng.integers(1, VOCAB, size=n).tolist() for n in cont_lens]
    return prompts, conts


def reference_transform(logits, temperature: float, top_k: int, top_p: float):
    """One position's (vocab,) logits -> transformed logits, written plainly from the sampler's definition."""
    z = logits / temperature
    if top_k:
        z = torch.where(z >= torch.sort(z, descending=True).values[top_k - 1], z, -torch.inf)
    if top_p < 1.0:
        values, order = torch.sort(z, descending=True)
        probs = torch.softmax(values, dim=-1)
        before = torch.cumsum(probs, 0) - probs
        z = z.clone()
        z[order[before >= top_p]] = -torch.inf
    return z


def direct_logprobs(model, prompt, cont, *, new_tokens, temperature=1.0, top_k=0, top_p=1.0):
    """One row, no padding: model(ids).logits, the transform position by position, log_softmax, gather."""
    events = cont + [EOS] if len(cont) < new_tokens else cont
    with torch.no_grad():
        logits = model(torch.tensor([prompt + events])).logits[0]
    out, entropy, variance = [], [], []
    for j, token in enumerate(events):
        z = reference_transform(logits[len(prompt) - 1 + j], temperature, top_k, top_p)
        logp = torch.log_softmax(z.double(), dim=-1)
        p = logp.exp()
        finite = torch.where(p > 0, logp, 0.0)
        h = -(p * finite).sum()
        out.append(logp[token].item())
        entropy.append(h.item())
        variance.append((p * (finite + h) ** 2).sum().item())
    return np.array(out), np.array(entropy), np.array(variance)


def project_sampler(name: str):
    """A function of the project's sampler (being moved and renamed; the test skips when it is not found)."""
    for module_name in ("natprints.generate.sampler", "natprints.generate"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for attr in (name, f"_{name}"):
            if hasattr(module, attr):
                return getattr(module, attr)
    pytest.skip(f"natprints' sampler function {name} not found")


def own_sampler(model, prompts, *, new_tokens, temperature, top_k, top_p, seed):
    """Ancestral samples by torch.multinomial on the transform, with the exact log-probability of each draw."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for prompt in prompts:
        ids, logps = list(prompt), []
        for _ in range(new_tokens):
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1]
            z = reference_transform(logits, temperature, top_k, top_p)
            logp = torch.log_softmax(z.double(), dim=-1)
            token = int(torch.multinomial(logp.exp(), 1, generator=gen))
            logps.append(logp[token].item())
            if token == EOS:
                break
            ids.append(token)
        rows.append((ids[len(prompt) :], float(np.sum(logps))))
    return [c for c, _ in rows], np.array([lp for _, lp in rows])


def test_matches_direct_log_softmax_at_temperature_one(model):
    rng = np.random.default_rng(1)
    prompts, conts = random_rows(rng, [4, 7, 5, 4, 6], [10, 3, 0, 10, 9])
    scores = score_texts(model, prompts, conts, eos_id=EOS, new_tokens=10, temperature=1.0, top_k=0, top_p=1.0)
    for prompt, cont, s in zip(prompts, conts, scores, strict=True):
        expected, entropy, variance = direct_logprobs(model, prompt, cont, new_tokens=10)
        assert s.token_logprobs.dtype == np.float64
        np.testing.assert_allclose(s.token_logprobs, expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(s.entropy, entropy, rtol=0, atol=1e-5)
        np.testing.assert_allclose(s.logprob_variance, variance, rtol=0, atol=1e-4)
        assert s.loglik == pytest.approx(expected.sum(), abs=1e-5)


def test_transformed_entropy_and_variance_match_direct(model):
    rng = np.random.default_rng(2)
    prompts, conts = random_rows(rng, [5, 5, 3], [8, 2, 6])
    kw = {"temperature": 0.7, "top_k": 0, "top_p": 0.8}
    scores = score_texts(model, prompts, conts, eos_id=EOS, new_tokens=8, **kw)
    for prompt, cont, s in zip(prompts, conts, scores, strict=True):
        expected, entropy, variance = direct_logprobs(model, prompt, cont, new_tokens=8, **kw)
        np.testing.assert_allclose(s.token_logprobs, expected, rtol=0, atol=1e-5)  # -inf where filtered out
        np.testing.assert_allclose(s.entropy, entropy, rtol=0, atol=1e-5)
        np.testing.assert_allclose(s.logprob_variance, variance, rtol=0, atol=1e-4)


def test_score_is_the_exact_sampling_probability(model):
    """Ancestral samples at temperature 0.7 with top-p: the scorer's log-lik is the log-probability of the draws."""
    rng = np.random.default_rng(3)
    prompts, _ = random_rows(rng, [6] * 24, [0] * 24)
    kw = {"temperature": 0.7, "top_k": 0, "top_p": 0.95}
    conts, exact = own_sampler(model, prompts, new_tokens=12, seed=0, **kw)
    scores = score_texts(model, prompts, conts, eos_id=EOS, new_tokens=12, **kw)
    np.testing.assert_allclose([s.loglik for s in scores], exact, rtol=0, atol=1e-4)
    stops = [len(c) < 12 for c in conts]
    assert any(stops) and not all(stops)  # both ways of ending are exercised
    assert [s.ends_with_eos for s in scores] == stops
    z = np.array([s.analytic_z for s in scores])
    assert abs(z.mean()) < 3 / np.sqrt(len(z)) * 1.5 and 0.4 < z.std() < 1.8  # calibrated on own samples


def test_bayes_posterior_improves_with_the_transform():
    """One network at two logit scales, both sampled at temperature 0.7: a classic temperature confound.

    Scored at temperature 1, the flatter model's samples look like the sharper model's (its
    softmax(z / 0.7) is exactly the sharper one's distribution at temperature 1), so they are
    attributed to it; scored under the transform they were drawn with, the Bayes argmax is right.
    """
    flat, sharp = tiny_model(11, head_scale=10.0), tiny_model(11, head_scale=10.0 / 0.7)
    models = [flat, sharp]
    rng = np.random.default_rng(4)
    prompts, truth, conts = [], [], []
    for label, m in enumerate(models):
        p, _ = random_rows(rng, [4] * 30, [0] * 30)
        c, _ = own_sampler(m, p, new_tokens=16, temperature=0.7, top_k=0, top_p=1.0, seed=label)
        prompts += p
        conts += c
        truth += [label] * len(p)
    truth = np.array(truth)
    result = {}
    for temperature in (0.7, 1.0):
        kw = {"eos_id": EOS, "new_tokens": 16, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        loglik = np.array([[s.loglik for s in score_texts(m, prompts, conts, **kw)] for m in models]).T
        post = posterior(loglik)
        right = post.argmax(1) == truth
        result[temperature] = (
            right.mean(),
            right[truth == 0].mean(),
            np.log(post[np.arange(len(truth)), truth]).mean(),
        )
    (acc, _, logscore), (acc_t1, flat_acc_t1, logscore_t1) = result[0.7], result[1.0]
    assert acc >= 0.7 and acc >= acc_t1 + 0.1
    assert flat_acc_t1 < 0.5  # the confound: the flat model's texts go to the sharp one
    assert logscore > logscore_t1


def test_top_k_support(model):
    rng = np.random.default_rng(5)
    prompts, _ = random_rows(rng, [5] * 8, [0] * 8)
    conts, _ = own_sampler(model, prompts, new_tokens=8, temperature=1.0, top_k=5, top_p=1.0, seed=1)
    filtered = score_texts(model, prompts, conts, eos_id=EOS, new_tokens=8, temperature=1.0, top_k=5, top_p=1.0)
    plain = score_texts(model, prompts, conts, eos_id=EOS, new_tokens=8, temperature=1.0, top_k=0, top_p=1.0)
    assert all(np.isfinite(s.token_logprobs).all() for s in filtered + plain)
    assert all(f.loglik > p.loglik for f, p in zip(filtered, plain, strict=True))  # mass renormalised on 5 tokens
    # replace the third token of the first text by one ranked below the top 5: -inf there, nothing else moves
    prompt, cont = prompts[0], [t for t in conts[0]]
    assert len(cont) >= 3
    with torch.no_grad():
        logits = model(torch.tensor([prompt + cont])).logits[0, len(prompt) + 1]
    ranked = [t for t in torch.argsort(logits, descending=True).tolist() if t != EOS]
    cont[2] = ranked[10]
    (s,) = score_texts(model, [prompt], [cont], eos_id=EOS, new_tokens=8, temperature=1.0, top_k=5, top_p=1.0)
    assert np.isneginf(s.token_logprobs[2]) and np.isneginf(s.loglik)
    np.testing.assert_allclose(s.token_logprobs[:2], filtered[0].token_logprobs[:2], rtol=0, atol=1e-6)
    (u,) = score_texts(model, [prompt], [cont], eos_id=EOS, new_tokens=8, temperature=1.0, top_k=0, top_p=1.0)
    assert np.isfinite(u.loglik)


def test_top_k_keeps_ties_and_matches_the_sampler_bit_for_bit():
    kept = sampling_logits(torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0]]), 1.0, 2, 1.0)
    assert torch.isfinite(kept).tolist() == [[True, True, True, False, False]]
    filter_logits = project_sampler("filter_logits")
    gen = torch.Generator().manual_seed(0)
    logits = torch.cat(
        [torch.randint(-3, 4, (40, VOCAB), generator=gen).float(), torch.randn(40, VOCAB, generator=gen)]
    )
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9), (0.7, 10, 0.5), (1.0, 1, 0.3)]:
        ours = sampling_logits(logits, temperature, top_k, top_p)
        theirs = filter_logits(logits / temperature, top_k, top_p)
        assert torch.equal(ours, theirs), (temperature, top_k, top_p)


def test_project_sampler_samples_score_finite(model):
    """Texts drawn by natprints.generate.sample_batch lie in the support and stop exactly where EOS was drawn."""
    sample_batch = project_sampler("sample_batch")
    rng = np.random.default_rng(6)
    prompts, _ = random_rows(rng, [6] * 32, [0] * 32)
    g = SimpleNamespace(temperature=0.7, top_k=5, top_p=0.9, new_tokens=12)
    with torch.inference_mode():
        out = sample_batch(model, torch.tensor(prompts), g, torch.Generator().manual_seed(0), EOS, "cpu")
    conts = [row[: row.index(EOS)] if EOS in row else row for row in out.tolist()]
    scores = score_texts(model, prompts, conts, eos_id=EOS, new_tokens=12, temperature=0.7, top_k=5, top_p=0.9)
    assert all(np.isfinite(s.loglik) for s in scores)
    assert [s.ends_with_eos for s in scores] == [len(c) < 12 for c in conts]


def test_padding_and_order_invariance(model):
    rng = np.random.default_rng(7)
    prompts, conts = random_rows(rng, [3, 8, 5, 2, 6, 4, 7], [0, 10, 4, 10, 1, 7, 9])
    kw = {"eos_id": EOS, "new_tokens": 10, "temperature": 0.8, "top_k": 20, "top_p": 1.0}
    batched = score_texts(model, prompts, conts, batch_size=64, **kw)
    single = score_texts(model, prompts, conts, batch_size=1, **kw)
    for b, s, cont in zip(batched, single, conts, strict=True):
        assert b.n_tokens == len(cont) and b.ends_with_eos == s.ends_with_eos
        for field in ("token_logprobs", "entropy", "logprob_variance"):
            np.testing.assert_allclose(getattr(b, field), getattr(s, field), rtol=0, atol=1e-5)


def test_without_moments_log_p_is_unchanged(model):
    rng = np.random.default_rng(9)
    prompts, conts = random_rows(rng, [3, 8, 5, 2], [0, 10, 4, 10])
    kw = {"eos_id": EOS, "new_tokens": 10, "temperature": 0.8, "top_k": 20, "top_p": 0.9}
    full = score_texts(model, prompts, conts, **kw)
    bare = score_texts(model, prompts, conts, moments=False, **kw)
    for f, b in zip(full, bare, strict=True):
        assert np.array_equal(f.token_logprobs, b.token_logprobs) and f.ends_with_eos == b.ends_with_eos
        assert b.entropy is None and b.logprob_variance is None
        assert (f.logprob_variance >= 0).all()
    with pytest.raises(NatprintsError, match="moments"):
        _ = bare[0].analytic_z


def test_eos_term_and_empty_continuation(model):
    rng = np.random.default_rng(8)
    prompts, conts = random_rows(rng, [5, 5, 5], [6, 4, 0])
    scores = score_texts(model, prompts, conts, eos_id=EOS, new_tokens=6, temperature=1.0, top_k=0, top_p=1.0)
    full, short, empty = scores
    assert not full.ends_with_eos and len(full.token_logprobs) == 6
    assert short.ends_with_eos and len(short.token_logprobs) == 5
    with torch.no_grad():
        last = torch.log_softmax(model(torch.tensor([prompts[1] + conts[1]])).logits[0, -1], -1)
        first = torch.log_softmax(model(torch.tensor([prompts[2]])).logits[0, -1], -1)
    assert short.token_logprobs[-1] == pytest.approx(last[EOS].item(), abs=1e-5)
    assert empty.ends_with_eos and empty.n_tokens == 0 and len(empty.token_logprobs) == 1
    assert empty.loglik == pytest.approx(first[EOS].item(), abs=1e-5)


def test_rejects_inconsistent_rows(model):
    kw = {"eos_id": EOS, "new_tokens": 3, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    for conts, problem in [
        ([[2, EOS]], f"row 1 holds EOS \\({EOS}\\) inside its continuation"),
        ([[2, 3, 4, 5]], "row 1 has 4 tokens, more than new_tokens=3"),
        ([[VOCAB]], f"row 1 holds a token id outside the vocabulary \\[0, {VOCAB}\\)"),
        ([[-1]], "row 1 holds a token id outside the vocabulary"),
    ]:
        with pytest.raises(NatprintsError, match=problem):
            score_texts(model, [[1], [1]], [[2]] + conts, **kw)
    with pytest.raises(NatprintsError, match="row 1 has an empty prompt"):
        score_texts(model, [[1], []], [[2], [2]], **kw)
    with pytest.raises(NatprintsError, match="temperature"):
        score_texts(model, [[1]], [[2]], **{**kw, "temperature": 0.0})


def test_posterior():
    loglik = np.array([[-10.0, -11.0, -12.0], [-5000.0, -5001.0, -np.inf], [-np.inf, -np.inf, -np.inf]])
    post = posterior(loglik)
    np.testing.assert_allclose(post.sum(axis=1), 1.0)
    e = np.exp([0.0, -1.0, -2.0])
    np.testing.assert_allclose(post[0], e / e.sum())
    np.testing.assert_allclose(post[1], [1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1)), 0.0])
    np.testing.assert_allclose(post[2], [1 / 3] * 3)
    with pytest.raises(NatprintsError):
        posterior(np.array([[0.0, np.nan]]))
    with pytest.raises(NatprintsError):
        posterior(np.zeros(3))


def test_prefix_loglik():
    s = TextScore(np.array([-1.0, -2.0, -3.0, -0.5]), np.zeros(4), np.zeros(4), ends_with_eos=True)
    assert s.n_tokens == 3
    assert prefix_loglik(s.token_logprobs, 2) == -3.0
    assert prefix_loglik(s.token_logprobs, 3) == -6.0  # the EOS event (at index 3) is outside a 3-token prefix
    assert prefix_loglik(s.token_logprobs, 4) == -6.5
    assert prefix_loglik(s.token_logprobs, 32) == s.loglik
    assert prefix_loglik(s.token_logprobs, 0) == 0.0


def test_bench_likelihood(model):
    bench = importlib.import_module("natprints.bench.likelihood")
    rng = np.random.default_rng(9)
    prompts, conts = random_rows(rng, [6] * 10, [8] * 8 + [3, 0])
    record = bench.bench_likelihood(model, prompts, conts, eos_id=EOS, new_tokens=8, reps=1)
    results = record["results"]
    for name in ("ours", "logp", "naive", "limit", "normalizer"):
        assert results[f"likelihood_{name}_tokens_per_s"] > 0
    ratios = {"ratio_vs_naive", "ratio_vs_limit", "logp_ratio_vs_limit", "normalizer_ratio_vs_limit"}
    assert {f"likelihood_{r}" for r in ratios} <= set(results)
    assert results["likelihood_agree"] is True and results["likelihood_max_token_diff"] <= 1e-5
    assert record["events"] == 8 * 8 + 4 + 1 and record["threads"] == 1
    json.dumps(record)


def test_rows_made_once_per_text_are_the_rows_made_per_scorer():
    """`text_rows` with a memo shared by scorers gives the same rows (keys included) as without it, for
    list and integer-array token ids alike; a text's row is made once, and its key reads its ids."""
    import pandas as pd

    from natprints.likelihood.stage import text_rows

    def row(sid: str, pid: str, ids) -> SimpleNamespace:
        return SimpleNamespace(
            sample_id=sid, prompt_id=pid, token_ids=ids, temperature=1.0, top_k=0, top_p=1.0, new_tokens=3
        )

    prompts = pd.Series({"p0": [5, 6], "p1": np.array([7], dtype=np.int32)})
    texts = [row("a", "p0", np.array([1, 2, 3])), row("b", "p1", [4, 4]), row("c", "p0", (9,))]
    memo: dict[str, tuple] = {}
    first = text_rows(texts, prompts, memo)
    second = text_rows(texts[::-1], prompts, memo)
    pd.testing.assert_frame_equal(first, text_rows(texts, prompts))
    pd.testing.assert_frame_equal(second, text_rows(texts[::-1], prompts))
    assert sorted(memo) == ["a", "b", "c"] and first["prompt"].tolist() == [[5, 6], [7], [5, 6]]
    assert first["tokens"].tolist() == [[1, 2, 3], [4, 4], [9]]
    assert all(type(t) is int for ids in first["tokens"] for t in ids)
    other = text_rows([row("a", "p0", np.array([1, 2, 4]))], prompts)
    assert other["row_key"][0] != first["row_key"][0] and len(set(first["row_key"])) == 3
