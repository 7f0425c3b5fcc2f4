"""A string scored over its segmentations: bytes per token, bounds against the exact sum, a direct forward."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import transformers

from natprints.likelihood import segmentations as seg
from tests.conftest import trained_tokenizer

TEXTS = [
    "the cat sat on the mat and the dog sat on the log",
    "then the other one sat there with them, thinking",
    "a thin theme: these three think that this is the thing",
] * 20


@functools.cache
def tokenizer(kind: str):
    return trained_tokenizer(kind, TEXTS, 300)


def model(vocab: int, seed: int = 0) -> transformers.LlamaForCausalLM:
    from tests.test_attribute_likelihood import llama

    return llama(seed, vocab)


FORCED = dict(pad_id=0, temperature=1.0, top_k=0, top_p=1.0, batch_size=16, device="cpu")


@pytest.mark.parametrize("kind", ["bytebpe", "unigram"])
def test_each_token_writes_bytes_that_join_to_the_text(kind):
    tok = tokenizer(kind)
    surf = seg.surfaces(tok)
    assert surf is not None and surf.longest > 1
    for text in ["the cat sat", "thinking, these three", "héllo wörld"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        written = surf.path_bytes(ids)
        if kind == "unigram" and "é" in text:  # outside its vocabulary: the unknown piece writes nothing
            assert written is None
            continue
        # a unigram tokenizer marks the first word's start too: its bytes lead with a space
        assert written is not None and written.decode("utf-8").lstrip() == text, (kind, text)


def test_a_tokenizer_it_cannot_read_keeps_the_canonical_score():
    from tests.test_attribute_likelihood import WORDS, word_tokenizer

    assert seg.surfaces(word_tokenizer(WORDS)) is None  # a word-level tokenizer has no byte decoder


def all_segmentations(surf: seg.Surfaces, data: bytes) -> list[list[int]]:
    if not data:
        return [[]]
    out = []
    for length in range(1, min(surf.longest, len(data)) + 1):
        token = surf.index.get(data[:length])
        if token is not None:
            out.extend([token, *rest] for rest in all_segmentations(surf, data[length:]))
    return out


def direct(lm, context: list[int], ids: list[int]) -> float:
    """log p(ids | context) from the model's own logits, one forward."""
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor([context + ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[len(context) - 1 + j, t] for j, t in enumerate(ids)))


def test_the_sum_lies_between_the_canonical_path_and_every_path():
    tok = tokenizer("bytebpe")
    surf, tokenize = seg.string_reader(tok)
    lm = model(len(tok))
    context = tok("the dog", add_special_tokens=False)["input_ids"]
    strings = [" sat on", " theme", " think"]
    canonical = [tok(s, add_special_tokens=False)["input_ids"] for s in strings]
    narrow = seg.score_segmentations(lm, surf, tokenize, [context] * 3, canonical, beam=0, **FORCED)
    wide = seg.score_segmentations(lm, surf, tokenize, [context] * 3, canonical, beam=64, margin=50.0, **FORCED)
    for text, ids, one, many in zip(strings, canonical, narrow, wide, strict=True):
        paths = all_segmentations(surf, text.encode())
        assert ids in paths and len(paths) > 3
        exact = np.logaddexp.reduce([direct(lm, context, p) for p in paths])
        assert one.paths == 1 and one.loglik == pytest.approx(direct(lm, context, ids), abs=1e-4)
        assert one.loglik == pytest.approx(one.canonical)
        # a random model spreads its mass: other paths add to the canonical one, never past the exact sum
        assert many.paths > 1 and many.canonical == pytest.approx(one.canonical, abs=1e-6)
        assert one.loglik + 1e-3 < many.loglik <= exact + 1e-4
        assert many.best in {tuple(p) for p in paths}
        assert max(direct(lm, context, list(many.best)), one.canonical) == pytest.approx(
            direct(lm, context, list(many.best)), abs=1e-4
        )


def test_a_path_the_model_prefers_is_found():
    """A model trained to write " the" as " th" + "e" puts its mass off the canonical path; the search
    recovers it, and the string's score rises by what the canonical path missed."""
    tok = tokenizer("bytebpe")
    surf, tokenize = seg.string_reader(tok)
    th, e = surf.index[b" th"], surf.index[b"e"]
    canonical = tok(" the", add_special_tokens=False)["input_ids"]
    assert canonical == [surf.index[b" the"]]
    lm = model(len(tok), seed=1)
    context = tok("on", add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # bias the head: " th" first, then "e"
        lm.lm_head.weight.zero_()
        lm.lm_head.bias = None
        lm.model.norm.weight.zero_()
    logits_bias = torch.full((len(tok),), -5.0)
    logits_bias[th] = 5.0
    logits_bias[e] = 4.0
    lm.lm_head.register_forward_hook(lambda module, args, out: out + logits_bias)
    found = seg.score_segmentations(lm, surf, tokenize, [context], [canonical], beam=8, **FORCED)[0]
    assert found.best == (th, e)
    expected = np.logaddexp(direct(lm, context, canonical), direct(lm, context, [th, e]))
    assert found.loglik >= expected - 1e-4 and found.loglik > found.canonical + 5


def test_bad_settings_are_one_line_errors():
    tok = tokenizer("bytebpe")
    surf, tokenize = seg.string_reader(tok)
    with pytest.raises(seg.NatprintsError, match="beam >= 0"):
        seg.score_segmentations(model(len(tok)), surf, tokenize, [[1]], [[2]], beam=-1, **FORCED)
