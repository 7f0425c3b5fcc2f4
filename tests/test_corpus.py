import numpy as np
import pytest

from natprints.config import CorpusSettings
from natprints.corpus import corpus_manifest, is_heldout, load_tokenizer, read_jsonl_texts, read_paragraphs
from natprints.errors import NatprintsError


def test_heldout_split_is_a_stable_hash_of_the_text():
    paras = [f"paragraph number {i} about the union" for i in range(2000)]
    share = np.mean([is_heldout(p, 0.1, "s") for p in paras])
    assert 0.08 < share < 0.12
    assert [is_heldout(p, 0.1, "s") for p in paras[::-1]] == [is_heldout(p, 0.1, "s") for p in paras][::-1]


def test_sotu_source_and_kjv_source():
    sotu = read_paragraphs(CorpusSettings(max_chars=20000))
    assert sotu[0].startswith("Fellow-Citizens of the Senate")
    assert all("\n" not in p and "  " not in p for p in sotu)
    kjv = read_paragraphs(CorpusSettings(source="kjv", max_chars=5000))
    assert kjv[0].startswith("In the beginning God created the heaven and the earth.")


def test_files_source_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(NatprintsError, match="not UTF-8"):
        read_paragraphs(CorpusSettings(source="files", paths=[str(bad)]))
    with pytest.raises(NatprintsError, match="corpus file not found"):
        read_paragraphs(CorpusSettings(source="files", paths=[str(tmp_path / "none.txt")]))


def test_corpus_manifest_and_tokenizer_round_trip(smoke_cfg):
    manifest = corpus_manifest(smoke_cfg)
    counts = manifest["counts"]
    assert counts["vocab_size"] == 512
    assert counts["train_paragraphs"] + counts["heldout_paragraphs"] == counts["paragraphs"]
    train = read_jsonl_texts(smoke_cfg.paths.corpus / "train.jsonl")
    heldout = set(read_jsonl_texts(smoke_cfg.paths.corpus / "heldout.jsonl"))
    assert not heldout & set(train)
    from natprints.artifacts import sha256_text

    assert manifest["corpus_sha256"] == sha256_text("\n\n".join(train))
    tok = load_tokenizer(smoke_cfg.paths.tokenizer)
    text = "Fellow-Citizens: the état of the Union — 1790, ünïcode & spaces  ok.\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    stream = np.load(smoke_cfg.paths.corpus / "train_tokens.npy")
    assert stream.size == counts["train_tokens"] and (stream == tok.eos_token_id).sum() == len(train)
