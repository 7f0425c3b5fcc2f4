"""The model-directory module: a tokenizer is read as its directory wrote it."""

from __future__ import annotations

import transformers

from natprints.modeldir import load_model_tokenizer
from tests.conftest import trained_tokenizer

TEXTS = ["The nation is strong, and we will keep it so.", "We will work for peace and for the union."] * 40


def test_a_unigram_tokenizer_beside_a_qwen2_model_keeps_its_spaces(tmp_path):
    """A model family's own tokenizer class must not rebuild a tokenizer saved as a plain tokenizer.json
    (Qwen2's class read a unigram tokenizer as byte-level BPE and wrote 'Thenationisstrong')."""
    tok = trained_tokenizer("unigram", TEXTS, 120)
    tok.save_pretrained(tmp_path)
    transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(tmp_path)
    loaded = load_model_tokenizer(tmp_path)
    ids = loaded("The nation is strong", add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == "The nation is strong"
    assert ids == tok("The nation is strong", add_special_tokens=False)["input_ids"]
