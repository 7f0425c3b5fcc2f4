"""The unpadded sentence encoder: same embeddings as ``SentenceTransformer.encode``, in input order."""

from __future__ import annotations

import numpy as np
import pytest

from natprints.attribution.features import DEFAULT_ENCODER, SentenceEmbedder, _load_encoder, equal_length_batches

WORDS = ["the", "nation", "shall", "not", "perish", "from", "the", "earth", "but", "we", "the", "people", "of"]
WORDS += ["these", "united", "states", "in", "order", "to", "form", "a", "more", "perfect", "union"]
TEXTS = (
    [
        "",
        " ",
        "a",
        "Peace.",
        "  leading and trailing spaces  ",
        "\n\ttabs and\nnewlines\n",
        "Ünïcödé àccents — 中文文本 テキスト 🙂 emoji ½ ∑",
        "Mixed CASE Words, punctuation!? (and) [brackets]; 'quotes' \"double\"",
        "x" * 3000,  # one over-long word: a single [UNK]
        "the union of the states " * 120,  # far past max_seq_length (256 tokens): truncation matters
        "word " * 300,
        "We shall " * 51,  # just past 256 tokens
        "Fellow citizens of the Senate and of the House of Representatives:",
        "Numerous as are the providential blessings which demand our grateful acknowledgment",
    ]
    + [f"Text {i}: " + " ".join(WORDS[: 1 + i]) for i in range(len(WORDS))]  # 1 to 26 words
)


@pytest.fixture(scope="module")
def encoder():
    return _load_encoder(DEFAULT_ENCODER, "cpu")


def test_equal_length_batches_cover_every_index_once():
    lengths = np.array([5, 3, 5, 9, 3, 5, 5, 5, 200, 3])
    batches = equal_length_batches(lengths, batch_size=2, max_tokens=12)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for batch in batches:
        assert len(set(lengths[batch].tolist())) == 1  # one length: no padding
        assert len(batch) <= 2 and (len(batch) == 1 or len(batch) * lengths[batch[0]] <= 12)
    assert [int(lengths[b[0]]) for b in batches] == sorted(int(lengths[b[0]]) for b in batches)
    assert [len(b) for b in batches if lengths[b[0]] == 5] == [2, 2, 1]  # 5 texts, 2 per batch
    assert equal_length_batches(np.array([], dtype=np.int64), batch_size=4, max_tokens=8) == []


def test_embeddings_equal_sentence_transformers_in_input_order(encoder, monkeypatch):
    texts = TEXTS + TEXTS[:5]  # duplicates get the same row
    reference = encoder.encode(texts, batch_size=8)  # the batch size only changes padding (and speed)
    assert max(len(ids) for ids in encoder.tokenizer(texts)["input_ids"]) > encoder.max_seq_length

    def no_encode(*args, **kwargs):
        raise AssertionError("SentenceEmbedder fell back to SentenceTransformer.encode")

    monkeypatch.setattr(encoder, "encode", no_encode)
    embedder = SentenceEmbedder(batch_size=8, threads=1).fit(texts)
    ours = embedder.transform(texts)
    assert ours.shape == reference.shape == (len(texts), 384) and ours.dtype == np.float32
    assert np.abs(ours - reference).max() <= 1e-4
    assert np.min(np.sum(ours * reference, axis=1)) >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)

    # Order follows the input, whatever the length-bucketing did inside.
    perm = np.random.default_rng(0).permutation(len(TEXTS))
    shuffled = embedder.transform([TEXTS[i] for i in perm])
    np.testing.assert_allclose(shuffled, ours[: len(TEXTS)][perm], atol=1e-5)
    # Rows differ between texts: nothing was broadcast or misplaced.
    assert np.abs(ours[3] - ours[4]).max() > 1e-2


def test_unnormalized_setting_still_gets_the_models_normalize_module(encoder):
    # all-MiniLM-L6-v2 ends in a Normalize module, so encode() is unit length whatever the flag says.
    texts = TEXTS[:6]
    reference = encoder.encode(texts, normalize_embeddings=False)
    ours = SentenceEmbedder(normalize=False, threads=1).fit(texts).transform(texts)
    assert np.abs(ours - reference).max() <= 1e-4
