"""`natprints attribute --method likelihood` and `--pool`, on tiny models built and sampled here.

Three Llama models (a, b, c) form the library, a fourth (d) stays outside it; texts are the models'
own samples (the project's sampler), so the truth is known. The tokenizer is a word-level one whose
decode/encode round trip is exact, so a text's log-likelihood is that of the sample itself.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from typer.testing import CliRunner

from natprints.attribution.likelihood import attribute_by_likelihood, attribute_pooled
from natprints.cli import app as APP
from natprints.errors import NatprintsError
from tests.conftest import trained_tokenizer

VOCAB = 64
EOS = 0
NEW_TOKENS = 24
HEAD_SCALE = 5.0  # sharpens the (at init nearly uniform) outputs, so that the models differ
RUNNER = CliRunner()


def invoke(*args: str | Path):
    return RUNNER.invoke(APP, [str(a) for a in args])


def word_tokenizer(words: list[str]) -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]")


WORDS = ["</s>", "[UNK]", *(f"w{i}" for i in range(VOCAB - 2))]


def llama(seed: int, vocab: int = VOCAB) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        bos_token_id=EOS,
        eos_token_id=EOS,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    return model


@dataclass
class Zoo:
    root: Path
    tokenizer: transformers.PreTrainedTokenizerFast
    models: dict[str, transformers.PreTrainedModel]  # in memory, the same weights as the saved dirs
    dirs: dict[str, Path]
    texts: dict[str, list[str]]  # b: b's samples; d: the outsider's; a07: a's samples at temperature 0.7

    def library(self, *names: str) -> dict[str, Path]:
        return {n: self.dirs[n] for n in names or "abc"}

    def files(self, key: str, n: int = 8) -> list[Path]:
        out = []
        for i, text in enumerate(self.texts[key][:n]):
            path = self.root / "texts" / f"{key}-{i}.txt"
            path.parent.mkdir(exist_ok=True)
            path.write_text(text + "\n")  # a final newline, as `echo` writes: not part of the text
            out.append(path)
        return out


def samples(model, tokenizer, n: int, temperature: float, seed: int) -> list[str]:
    """n texts sampled after EOS by the project's sampler, each up to its EOS."""
    from natprints.config import GenerateSettings
    from natprints.generate.sampler import sample_batch

    settings = GenerateSettings(new_tokens=NEW_TOKENS, temperature=temperature)
    generator = torch.Generator().manual_seed(seed)
    rows = sample_batch(model, torch.full((n, 1), EOS), settings, generator, EOS, "cpu").tolist()
    texts = [tokenizer.decode(row[: row.index(EOS)] if EOS in row else row) for row in rows]
    return [t for t in texts if t]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Zoo:
    root = tmp_path_factory.mktemp("likelihood-zoo")
    tokenizer = word_tokenizer(WORDS)
    models = {name: llama(seed) for name, seed in zip("abcd", (1, 2, 3, 4), strict=True)}
    dirs = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        dirs[name] = root / name
    tokenizer.save_pretrained(root / "a")  # the first --models directory holds the tokenizer
    tokenizer.save_pretrained(root / "tokenizer")
    texts = {
        "b": samples(models["b"], tokenizer, 16, 1.0, seed=7),
        "d": samples(models["d"], tokenizer, 16, 1.0, seed=7),
        "a07": samples(models["a"], tokenizer, 16, 0.7, seed=7),
    }
    assert all(len(t) >= 12 for t in texts.values())
    return Zoo(root, tokenizer, models, dirs, texts)


def direct(model, context: list[int], ids: list[int], temperature: float = 1.0) -> tuple[float, float]:
    """model(ids).logits, log_softmax in float64: the text's log-likelihood and its discrepancy z."""
    with torch.no_grad():
        logits = model(torch.tensor([context + ids])).logits[0].double() / temperature
    logp = torch.log_softmax(logits[len(context) - 1 : len(context) - 1 + len(ids)], dim=-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    variance = (p * (logp + entropy[:, None]) ** 2).sum(-1)
    loglik = logp.gather(1, torch.tensor(ids)[:, None]).sum()
    return float(loglik), float((loglik + entropy.sum()) / variance.sum().sqrt())


def test_loglik_and_z_equal_a_direct_forward(zoo):
    texts = zoo.texts["b"][:6] + ["w3 w4 [UNK] w5"]
    ids = [zoo.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    predictions = attribute_by_likelihood(texts, zoo.library(), zoo.tokenizer, batch_size=4)
    for p, row in zip(predictions, ids, strict=True):
        assert p.tokens == len(row) and p.texts == 1
        for name in "abc":
            loglik, z = direct(zoo.models[name], [EOS], row)
            assert p.loglik[name] == pytest.approx(loglik, abs=1e-5)
            assert p.z[name] == pytest.approx(z, abs=1e-4)
        assert p.probability == pytest.approx(max(q for _, q in p.top))
    # A prompt and a temperature: the loglik is that of softmax(logits / 0.7) after the prompt.
    prompt = "w10 w11 w12"
    context = zoo.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    predictions = attribute_by_likelihood(
        texts[:3], zoo.library("a"), zoo.tokenizer, prompts=[prompt] * 3, temperature=0.7
    )
    for p, row in zip(predictions, ids[:3], strict=True):
        loglik, z = direct(zoo.models["a"], context, row, temperature=0.7)
        assert p.loglik["a"] == pytest.approx(loglik, abs=1e-5) and p.z["a"] == pytest.approx(z, abs=1e-4)


def test_any_causal_lm_scores_from_its_own_logits(zoo):
    """A non-Llama model (GPT-2) goes through its full forward; the result is the same direct value."""
    torch.manual_seed(5)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    gpt2.save_pretrained(zoo.root / "gpt2")
    texts = zoo.texts["b"][:3]
    predictions = attribute_by_likelihood(texts, {"gpt2": zoo.root / "gpt2"}, zoo.tokenizer)
    for p, text in zip(predictions, texts, strict=True):
        loglik, _ = direct(gpt2, [EOS], zoo.tokenizer(text, add_special_tokens=False)["input_ids"])
        assert p.loglik["gpt2"] == pytest.approx(loglik, abs=1e-5)


def test_models_of_three_families_each_read_the_text_with_their_own_tokenizer(zoo):
    """Llama with the word-level tokenizer, GPT-2 with a byte-level BPE, GPT-NeoX with a unigram: every
    log-likelihood equals the model's own logits on its own tokenizer's ids, after its own start token."""
    corpus = zoo.texts["b"] + zoo.texts["d"]
    gpt2_tok, neox_tok = trained_tokenizer("bytebpe", corpus, 300), trained_tokenizer("unigram", corpus, 40)
    torch.manual_seed(11)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=len(gpt2_tok), n_embd=32, n_layer=2, n_head=4, n_positions=128)
    ).eval()
    neox = transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(
            vocab_size=len(neox_tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    ).eval()
    for name, model, tok in (("gpt2-own", gpt2, gpt2_tok), ("neox-own", neox, neox_tok)):
        model.save_pretrained(zoo.root / name)
        tok.save_pretrained(zoo.root / name)
    library = {"a": zoo.dirs["a"], "gpt2-own": zoo.root / "gpt2-own", "neox-own": zoo.root / "neox-own"}
    texts = zoo.texts["b"][:3]
    predictions = attribute_by_likelihood(texts, library)  # no shared tokenizer: each model has its own
    for p, text in zip(predictions, texts, strict=True):
        for name, model, tok, start in (
            ("a", zoo.models["a"], zoo.tokenizer, EOS),
            ("gpt2-own", gpt2, gpt2_tok, gpt2_tok.bos_token_id),
            ("neox-own", neox, neox_tok, neox_tok.bos_token_id),
        ):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert p.model_tokens[name] == len(ids)
            assert p.loglik[name] == pytest.approx(direct(model, [start], ids)[0], abs=1e-4)
    assert len(set(predictions[0].model_tokens.values())) == 3  # three tokenizations of one string
    # With a prompt: each tokenizer encodes prompt and text apart.
    prompt = "w10 w11"
    p = attribute_by_likelihood(texts[:1], library, prompts=[" ".join([prompt])])[0]
    ids = neox_tok(texts[0], add_special_tokens=False)["input_ids"]
    context = neox_tok(prompt, add_special_tokens=False)["input_ids"]
    assert p.loglik["neox-own"] == pytest.approx(direct(neox, context, ids)[0], abs=1e-4)
    # The command, per text and pooled, with no --tokenizer.
    models = [arg for directory in library.values() for arg in ("--models", directory)]
    result = invoke("attribute", *zoo.files("b", 3), "--method", "likelihood", *models, "--json")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["loglik"]["gpt2-own"] for r in records] == pytest.approx([p.loglik["gpt2-own"] for p in predictions])
    result = invoke("attribute", *zoo.files("b", 3), "--method", "likelihood", *models, "--pool", "--json")
    pooled = json.loads(result.stdout)
    assert pooled["texts"] == 3
    assert pooled["loglik"]["neox-own"] == pytest.approx(sum(p.loglik["neox-own"] for p in predictions))
    # Over segmentations: the byte-level and unigram models sum more paths than the canonical one (never
    # less); the word-level one has no byte pieces to search and keeps its canonical score.
    searched = attribute_by_likelihood(texts, library, segmentations=8)
    for p, q in zip(predictions, searched, strict=True):
        assert q.loglik["a"] == p.loglik["a"] and q.z == p.z  # the open-set test reads the canonical path
        for name in ("gpt2-own", "neox-own"):
            assert q.loglik[name] >= p.loglik[name] - 1e-4  # float32 passes of their own
    assert any(q.loglik["gpt2-own"] > p.loglik["gpt2-own"] + 1e-3 for p, q in zip(predictions, searched, strict=True))
    result = invoke(
        "attribute", *zoo.files("b", 3), "--method", "likelihood", *models, "--json", "--segmentations", "8"
    )
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["loglik"]["neox-own"] for r in records] == pytest.approx([q.loglik["neox-own"] for q in searched])
    result = invoke(
        "attribute", *zoo.files("b", 1), "--method", "likelihood", *models, "--sequential", "--segmentations", "8"
    )
    assert result.exit_code == 1 and "not with --sequential" in result.output
    # The model holding a tokenizer with other ids for the same words is read with its own.
    other = zoo.root / "other-vocab"
    shutil.copytree(zoo.dirs["b"], other, dirs_exist_ok=True)
    swapped = word_tokenizer(WORDS[:2] + WORDS[2:][::-1])
    swapped.save_pretrained(other)
    p = attribute_by_likelihood(texts[:1], {"other": other}, zoo.tokenizer)[0]
    ids = swapped(texts[0], add_special_tokens=False)["input_ids"]
    assert p.loglik["other"] == pytest.approx(direct(zoo.models["b"], [EOS], ids)[0], abs=1e-5)


def test_true_model_wins_and_an_outsider_is_unknown(zoo):
    own = attribute_by_likelihood(zoo.texts["b"], zoo.library(), zoo.tokenizer)
    accuracy = np.mean([p.label == "b" for p in own])
    assert accuracy >= 0.8  # measured 0.94 (15 of 16) on single texts of about 24 tokens
    assert np.mean([p.unknown for p in own]) <= 0.2  # the open set rejects about alpha of own texts
    pooled = attribute_by_likelihood(zoo.texts["b"][:8], zoo.library(), zoo.tokenizer, pool=True)
    assert pooled.label == "b" and not pooled.unknown and pooled.probability > 0.999
    assert pooled.texts == 8 and pooled.tokens == sum(len(t.split()) for t in zoo.texts["b"][:8])
    single = attribute_by_likelihood(zoo.texts["b"][:8], zoo.library(), zoo.tokenizer)
    assert pooled.loglik["a"] == pytest.approx(sum(p.loglik["a"] for p in single))
    # d is outside the library: most of its texts, and its pooled texts, are rejected by every model.
    outsider = attribute_by_likelihood(zoo.texts["d"], zoo.library(), zoo.tokenizer)
    assert np.mean([p.unknown for p in outsider]) >= 0.4  # measured 0.62
    pooled = attribute_by_likelihood(zoo.texts["d"][:8], zoo.library(), zoo.tokenizer, pool=True)
    assert pooled.label == "unknown" and pooled.unknown and pooled.rejected == ["a", "b", "c"]
    assert pooled.best_model in "abc" and all(z < -3 for z in pooled.z.values())


def test_cli_labels_json_and_pool(zoo):
    files = zoo.files("b")
    models = ["--models", zoo.dirs["a"], "--models", zoo.dirs["b"], "--models", zoo.dirs["c"]]
    result = invoke("attribute", *files, "--method", "likelihood", *models, "--json")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    expected = attribute_by_likelihood(zoo.texts["b"][:8], zoo.library(), zoo.tokenizer)
    assert [r["input"] for r in records] == [str(f) for f in files]
    assert [r["label"] for r in records] == [p.label for p in expected]
    assert sum(r["label"] == "b" for r in records) >= 6
    for record, p in zip(records, expected, strict=True):
        assert set(record["loglik"]) == set(record["z"]) == {"a", "b", "c"}
        assert record["loglik"]["b"] == pytest.approx(p.loglik["b"], abs=1e-9)  # the final newline is not scored
        assert {"probability", "best_model", "unknown", "top", "rejected", "alpha", "tokens"} <= set(record)
        assert record["alpha"] == 0.05 and len(record["top"]) == 3
    result = invoke("attribute", *files, "--method", "likelihood", *models, "--top", "2")
    lines = result.stdout.splitlines()
    assert len(lines) == 8 and lines[0].startswith(f"{files[0]}: {expected[0].label} ") and "; then " in lines[0]
    result = invoke("attribute", *files, "--method", "likelihood", *models, "--pool")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [result.stdout.strip()]
    assert result.stdout.startswith("pooled (8 texts): b 1.000; then ")
    result = invoke("attribute", *files, "--method", "likelihood", *models, "--pool", "--json")
    record = json.loads(result.stdout)
    assert record["input"] == "pooled" and record["texts"] == 8 and record["label"] == "b"
    # The outsider's texts, pooled: unknown, every model rejected.
    result = invoke("attribute", *zoo.files("d"), "--method", "likelihood", *models, "--pool")
    assert result.exit_code == 0 and result.stdout.startswith("pooled (8 texts): unknown (best ")
    assert "every model rejected at alpha 0.05" in result.stdout
    # A stricter --alpha reaches the test: at 1e-12 no model is rejected.
    result = invoke("attribute", *zoo.files("d"), "--method", "likelihood", *models, "--pool", "--alpha", "1e-12")
    assert "unknown" not in result.stdout


def test_the_sampling_transform_reaches_the_score(zoo):
    """a's samples at temperature 0.7: scored under that transform, a's own test is calibrated."""
    files = zoo.files("a07", 16)
    models = ["--models", zoo.dirs["a"], "--models", zoo.dirs["b"], "--models", zoo.dirs["c"]]
    right = invoke("attribute", *files, "--method", "likelihood", *models, "--json", "--temperature", "0.7")
    wrong = invoke("attribute", *files, "--method", "likelihood", *models, "--json")
    right, wrong = ([json.loads(line) for line in r.stdout.splitlines()] for r in (right, wrong))

    def mean_log_posterior(records):  # the log score of the truth: the Bayes posterior maximizes it
        return np.mean([math.log(next(t["probability"] for t in r["top"] if t["model"] == "a")) for r in records])

    assert mean_log_posterior(right) > mean_log_posterior(wrong)
    # Under the right transform a's z is N(0, 1) on its own texts; at temperature 1 they look too likely.
    z = {}
    for key, flags in (("right", ["--temperature", "0.7"]), ("wrong", [])):
        result = invoke("attribute", *files[:8], "--method", "likelihood", *models, "--pool", "--json", *flags)
        z[key] = json.loads(result.stdout)["z"]["a"]
    assert abs(z["right"]) < 2.0 and z["wrong"] > 3.0  # measured 0.52 and 3.63
    # --top-k and --top-p reach the scorer too: top-k 1 keeps only the argmax (most texts impossible).
    result = invoke("attribute", files[0], "--method", "likelihood", *models, "--json", "--top-k", "1")
    assert json.loads(result.stdout)["loglik"]["a"] in (None, 0.0)
    result = invoke("attribute", files[0], "--method", "likelihood", *models, "--json", "--top-p", "0.5")
    assert json.loads(result.stdout)["loglik"]["a"] != right[0]["loglik"]["a"]


def test_attributor_method_pools_log_probabilities(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    from natprints.attribution.attributor import Attributor, load_attributor, save_attributor
    from natprints.attribution.features import make_featurizer

    rng = np.random.default_rng(0)
    words = [["we", "shall", "union"], ["war", "peace", "congress"], ["tax", "money", "trade"]]
    texts, y = [], []
    for c, favourite in enumerate(words):
        for _ in range(20):
            texts.append(" ".join(rng.choice(favourite * 3 + ["the", "and", "of", "nation"], size=12)))
            y.append(c)
    pipe = Pipeline([("features", make_featurizer("word1")), ("classifier", LogisticRegression(max_iter=1000))])
    directory = save_attributor(
        tmp_path / "attr", Attributor(pipe.fit(texts, np.array(y)), ["x", "y", "z"], threshold=0.5), {}
    )
    inputs = ["we shall the nation", "war and the union", "we of tax and union"]
    files = []
    for i, text in enumerate(inputs):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text(text)
    log_sum = np.log(load_attributor(directory, light=True).predict_proba(inputs)).sum(axis=0)
    expected = np.exp(log_sum - log_sum.max()) / np.exp(log_sum - log_sum.max()).sum()
    result = invoke("attribute", *files, "--attributor", directory, "--pool", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["input"] == "pooled" and record["texts"] == 3 and record["label"] == "x"
    assert record["probability"] == pytest.approx(expected.max(), rel=1e-12)
    assert {t["model"]: t["probability"] for t in record["top"]} == pytest.approx(
        dict(zip("xyz", expected, strict=True))
    )
    result = invoke("attribute", *files, "--attributor", directory, "--pool")
    assert result.stdout.splitlines() == [
        f"pooled (3 texts): x {expected.max():.3f}; then " + result.stdout.split("; then ")[1].strip()
    ]
    # A bad file among good ones: its error line, the verdict over the rest, exit 1.
    result = invoke("attribute", tmp_path / "missing.txt", *files, "--attributor", directory, "--pool")
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing.txt'}: no such file"
    ]
    assert result.stdout.startswith("pooled (3 texts): x ") and len(result.stdout.splitlines()) == 1
    # The importable API gives the same verdict; without --pool the output is one line per input.
    assert attribute_pooled(inputs, load_attributor(directory)).probability == pytest.approx(expected.max())
    assert len(invoke("attribute", *files, "--attributor", directory).stdout.splitlines()) == 3
    # Likelihood-only options are refused with the attributor method, not ignored.
    result = invoke("attribute", *files, "--attributor", directory, "--temperature", "0.7")
    assert result.exit_code == 1 and "--temperature: only with --method likelihood" in result.stderr
    for flag in ("--temperature", "--top-k"):  # a value of 0 is given too, not taken for "not given"
        result = invoke("attribute", *files, "--attributor", directory, flag, "0")
        assert result.exit_code == 1 and f"{flag}: only with --method likelihood" in result.stderr


def test_bad_models_and_texts_are_one_line_errors(zoo):
    files = zoo.files("b", 3)
    ok = ["--models", zoo.dirs["a"], "--models", zoo.dirs["b"]]
    not_model = zoo.root / "not-a-model"
    not_model.mkdir(exist_ok=True)
    small = zoo.root / "small"
    llama(9, vocab=32).save_pretrained(small)
    other = zoo.root / "other-vocab"
    shutil.copytree(zoo.dirs["b"], other, dirs_exist_ok=True)
    word_tokenizer(WORDS[:2] + WORDS[2:][::-1]).save_pretrained(other)  # same size, other ids
    cases = [
        (["--models", not_model], "not a model directory (no config.json)"),
        (["--models", zoo.root / "missing"], "model directory not found"),
        ([*ok, "--models", small], "model small"),
        ([*ok, "--models", zoo.root / "b"], "two --models are named 'b'"),
        ([*ok, "--condition", "seed"], "not both"),
        ([*ok, "--attributor", zoo.root], "--attributor is for --method attributor"),
        ([*ok, "--temperature", "0"], "need temperature > 0"),
        (["--models", zoo.dirs["b"], "--tokenizer", zoo.root / "missing"], "no tokenizer at"),
    ]
    for args, fragment in cases:
        result = invoke("attribute", *files, "--method", "likelihood", *args)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.count("error: ") == 1 and fragment in result.stderr, (fragment, result.stderr)
        assert result.stdout == "" and "Traceback" not in result.output
    assert (
        "vocab_size 32, smaller than the tokenizer's 64"
        in invoke("attribute", *files, "--method", "likelihood", *ok, "--models", small).stderr
    )
    # The API: an empty text, a vocabulary mismatch.
    with pytest.raises(NatprintsError, match="text 1: empty text after tokenization"):
        attribute_by_likelihood(["w1", ""], zoo.library("a"), zoo.tokenizer)
    with pytest.raises(NatprintsError, match="model small"):
        attribute_by_likelihood(["w1"], {"small": small}, zoo.tokenizer)


def test_bad_inputs_among_good_ones(zoo, tmp_path):
    good = zoo.files("b", 3)
    (tmp_path / "blank.txt").write_text(" \n")
    (tmp_path / "eos.txt").write_text("w1 </s> w2")
    (tmp_path / "long.txt").write_text(" ".join(["w3"] * 64))
    bad = [tmp_path / "missing.txt", tmp_path / "blank.txt", tmp_path / "eos.txt", tmp_path / "long.txt"]
    models = ["--method", "likelihood", "--models", zoo.dirs["a"], "--models", zoo.dirs["b"]]
    result = invoke("attribute", bad[0], *good, *bad[1:], *models)
    assert result.exit_code == 1
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 4 and all(e.startswith("error: ") for e in errors)
    too_long = "1 context + 64 text tokens exceed model a's context of 64 positions"
    for fragment in ["no such file", "empty text", "holds the EOS token", too_long]:
        assert any(fragment in e for e in errors), fragment
    assert len(result.stdout.splitlines()) == 3 and "Traceback" not in result.output
    # --pool: one verdict over the good files, each bad one an error line, exit 1.
    result = invoke("attribute", bad[0], *good, bad[2], *models, "--pool")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 2
    assert result.stdout.splitlines() == [result.stdout.strip()] and result.stdout.startswith("pooled (3 texts): ")
    result = invoke("attribute", bad[0], *good, *models, "--pool", "--json")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 1 and "error" in lines[0] and lines[1]["texts"] == 3


def test_zoo_models_of_a_run_condition(zoo, tmp_path, monkeypatch):
    from natprints.config import check_run_lock, load_config
    from natprints.zoo import condition_members

    monkeypatch.setenv("NATPRINTS_HOME", str(tmp_path))
    config = tmp_path / "lk.toml"
    config.write_text('[run]\nname = "lk"\n\n[conditions]\nseed = [1]\n')
    text = zoo.files("b", 1)
    result = invoke("attribute", *text, "--method", "likelihood", "--config", config)
    assert result.exit_code == 1 and "no zoo at" in result.stderr and result.stderr.count("error: ") == 1
    cfg = load_config(config)
    members = condition_members(cfg)["seed"]
    for model_id, source in zip(members, "ab", strict=True):
        shutil.copytree(zoo.dirs[source], cfg.paths.zoo / model_id)
        (cfg.paths.zoo / model_id / "manifest.json").write_text(json.dumps({"files": {}}))
    shutil.copytree(zoo.root / "tokenizer", cfg.paths.tokenizer)
    result = invoke("attribute", *text, "--method", "likelihood", "--config", config, "--condition", "seed", "--json")
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)["loglik"]) == set(members)
    result = invoke("attribute", *text, "--method", "likelihood", "--config", config, "--condition", "lr")
    assert result.exit_code == 1 and "no condition 'lr' in run 'lk' (it has: seed)" in result.stderr
    result = invoke("attribute", *text, "--method", "likelihood", "--run", "lk")
    assert result.exit_code == 1 and "no run 'lk'" in result.stderr  # no run lock recorded its config
    check_run_lock(cfg, config)  # what every stage does first: --run NAME then reads the config from it
    result = invoke("attribute", *text, "--method", "likelihood", "--run", "lk", "--json")
    assert result.exit_code == 0, result.output
    # `all` (the default) is the one condition that holds every model: no separate copy of it
    assert "all" not in condition_members(cfg)
    assert set(json.loads(result.stdout)["loglik"]) == set(condition_members(cfg)["seed"])


def test_the_open_set_test_is_two_sided():
    """A text far *more* likely than a model's own samples (z = +9 under both) is foreign to both, as
    one far less likely is; a typical one (z = 0 under one model) is not `unknown`. The experiments'
    pooled test agrees."""
    from natprints.attribution.ceiling import LikelihoodView, analytic_rejects, analytic_statistic
    from natprints.attribution.likelihood import _predict

    def verdict(loglik: list[float], entropy: list[float]):
        ones = np.ones(2)
        return _predict(["a", "b"], np.array(loglik), np.array(entropy), ones, ones * 5, 1, 0.05, 2, np.array(loglik))

    too_likely, too_unlikely, typical = (
        verdict([-1, -1], [10, 10]),
        verdict([-19, -19], [10, 10]),
        verdict([-10, -19], [10, 10]),
    )
    assert too_likely.unknown and too_likely.rejected == ["a", "b"] and too_likely.z == {"a": 9.0, "b": 9.0}
    assert too_unlikely.unknown and too_unlikely.rejected == ["a", "b"]
    assert not typical.unknown and typical.label == "a" and typical.rejected == ["b"]
    rows = np.array([[-1.0, -1.0], [-19.0, -19.0], [-10.0, -19.0]])
    view = LikelihoodView(np.array(["x", "y", "z"]), rows, {}, np.full((3, 2), 10.0), np.ones((3, 2)), np.ones(3))
    groups = [np.array([0]), np.array([1]), np.array([2])]
    assert analytic_rejects(view, groups, [0, 1], 0.05).tolist() == [True, True, False]
    assert analytic_statistic(view, groups, [0, 1]).tolist() == [9.0, 9.0, 0.0]


def test_sequential_attribution_stops_at_the_verdict_the_whole_stream_gives(zoo):
    """`--sequential` reads texts one at a time and stops at the first verdict; it is the verdict of
    the stopping rule on the per-text scores (files, and stdin lines alike), and reading stops there."""
    from natprints.attribution.sequential import UNDECIDED, UNKNOWN, decide

    models = [arg for key in "abc" for arg in ("--models", zoo.dirs[key])]
    for key in ("b", "d"):
        files = zoo.files(key, 16)
        texts = zoo.texts[key][:16]
        single = attribute_by_likelihood(texts, zoo.library(), zoo.tokenizer)
        parts = [
            np.array([[getattr(p, part)[m] for m in "abc"] for p in single])
            for part in ("loglik", "centred", "variance")
        ]
        expected = decide(parts[0], 0.01, parts[1], parts[2])
        label = {UNKNOWN: "unknown", UNDECIDED: "undecided"}.get(expected.label) or "abc"[expected.label]
        result = invoke("attribute", *files, "--method", "likelihood", *models, "--sequential", "--json")
        assert result.exit_code == 0, result.output
        record = json.loads(result.stdout)
        assert (record["label"], record["texts"], record["error"]) == (label, expected.texts, 0.01)
        piped = RUNNER.invoke(
            APP,
            ["attribute", "--method", "likelihood", *map(str, models), "--sequential"],
            input="\n".join(texts) + "\n",
        )
        assert piped.exit_code == 0, piped.output
        count = f"{expected.texts} text{'' if expected.texts == 1 else 's'}"
        assert piped.stdout.startswith(f"sequential ({count}): {label} at error 0.01 (")
    b = json.loads(
        invoke("attribute", *zoo.files("b", 16), "--method", "likelihood", *models, "--sequential", "--json").stdout
    )
    assert b["label"] == "b" and b["texts"] <= 4  # measured: named after 1 text
    # reading stops at the verdict: a bad input after it is never read
    missing = str(zoo.root / "no-such-file.txt")
    late = invoke("attribute", *zoo.files("b", 16), missing, "--method", "likelihood", *models, "--sequential")
    assert late.exit_code == 0 and "no-such-file" not in late.output
    wrong = invoke("attribute", *zoo.files("b", 2), "--method", "likelihood", *models, "--sequential", "--pool")
    assert wrong.exit_code != 0 and "--sequential and --pool: choose one" in wrong.output


def test_jsonl_records_score_their_sampled_token_ids_where_a_tokenizer_reads_them_back(zoo, tmp_path):
    """A record's `token_ids` (a segmentation other than the tokenizer's own, as a sampler may draw)
    are what a model whose tokenizer decodes them to the text scores; a model with another tokenizer
    re-tokenizes the text; the output says which did which. A record's `prompt` is its own."""
    corpus = zoo.texts["b"] + zoo.texts["d"]
    tok = trained_tokenizer("bytebpe", corpus, 300)
    torch.manual_seed(12)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128)
    ).eval()
    gpt2.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    text = zoo.texts["b"][0]
    canonical = tok(text, add_special_tokens=False)["input_ids"]
    # split the first token of two or more characters into its characters: another path to the same text
    at = next(i for i, t in enumerate(canonical) if len(tok.convert_ids_to_tokens(t)) > 1)
    pieces = tok.convert_tokens_to_ids(list(tok.convert_ids_to_tokens(canonical[at])))
    sampled = canonical[:at] + pieces + canonical[at + 1 :]
    assert tok.decode(sampled) == text and sampled != canonical
    library = {"a": zoo.dirs["a"], "gpt2": tmp_path / "gpt2"}
    p = attribute_by_likelihood([text], library, sampled=[sampled])[0]
    start = tok.bos_token_id
    assert p.loglik["gpt2"] == pytest.approx(direct(gpt2, [start], sampled)[0], abs=1e-4)
    assert p.loglik["gpt2"] != pytest.approx(direct(gpt2, [start], canonical)[0], abs=1e-4)
    words = zoo.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert p.loglik["a"] == pytest.approx(direct(zoo.models["a"], [EOS], words)[0], abs=1e-4)
    assert p.as_sampled == {"a": 0, "gpt2": 1} and p.model_tokens["gpt2"] == len(sampled)
    # the command: records with and without ids and a prompt of their own, and bad records among them
    prompt = "w10 w11"
    records = [
        {"text": text, "token_ids": sampled, "source": "ignored"},
        {"text": text},
        {"text": text, "prompt": prompt},
        {"txt": text},
        {"text": text, "token_ids": [-1]},
    ]
    path = tmp_path / "texts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")
    models = ["--method", "likelihood", "--models", library["a"], "--models", library["gpt2"]]
    result = invoke("attribute", path, *models, "--json", "--jsonl")
    assert result.exit_code == 1
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["input"] for r in out] == [f"{path}:{i}" for i in range(1, 7)]  # in input order, errors too
    assert [("error" in r) for r in out] == [False] * 3 + [True] * 3
    assert out[0]["loglik"]["gpt2"] == pytest.approx(p.loglik["gpt2"], abs=1e-4)
    assert out[0]["scored_as_sampled_ids"] == {"a": 0, "gpt2": 1} and "scored_as_sampled_ids" not in out[1]
    assert out[1]["loglik"]["gpt2"] == pytest.approx(direct(gpt2, [start], canonical)[0], abs=1e-4)
    context = tok(prompt, add_special_tokens=False)["input_ids"]
    assert out[2]["loglik"]["gpt2"] == pytest.approx(direct(gpt2, context, canonical)[0], abs=1e-4)
    assert result.stderr.strip().splitlines() == [
        f"error: {path}:4: needs a `text` string",
        f"error: {path}:5: its `token_ids` must be a non-empty list of non-negative integers",
        f"error: {path}:6: not a JSON record (Expecting value)",
    ]
    lines = invoke("attribute", path, *models, "--jsonl").stdout.splitlines()
    assert lines[0].endswith("; the given token ids scored by 1 of 2 models, re-tokenized by the rest")
    assert "token ids" not in lines[1]
    pooled = invoke("attribute", path, *models, "--jsonl", "--pool", "--json")
    assert json.loads(pooled.stdout.splitlines()[-1])["scored_as_sampled_ids"] == {"a": 0, "gpt2": 1}
    wrong = invoke("attribute", path, *models, "--jsonl", "--sequential")
    assert wrong.exit_code == 1 and "--jsonl reads whole files of records: not with --sequential" in wrong.output


def test_the_background_test_rejects_texts_no_more_likely_under_the_models_than_under_the_background():
    """Own texts are likelier under their model than under a background model of the same corpus (here
    by 0.5 nats a token, with noise); texts no known model wrote are not (ratio 0): at alpha 0.05 the
    threshold falls between the two, so those pools are `unknown` and the known ones are not."""
    from natprints.attribution import ceiling

    rng = np.random.default_rng(0)
    n, events = 200, np.full(200, 20)
    y = np.repeat([0, 1], n // 2)
    background = -100.0 + rng.normal(0, 1, n)
    loglik = np.stack([background - 5.0, background - 5.0], axis=1)  # a model that did not write the text
    loglik[np.arange(n), y] = background + 10.0 + rng.normal(0, 2, n)  # its own: 0.5 nats a token above
    limits = ceiling.background_thresholds(loglik, background, events, y, [0, 1], 4, 0.05, 2000, seed=1)
    assert all(0.3 < limits[m] < 0.5 for m in (0, 1))  # the 5% quantile of the own pools' 0.5 per token
    pools = ceiling.pool_groups(y, 4, seed=2)
    known = ceiling.background_statistic(loglik, background, events, pools, [0, 1], limits)
    assert (known > 0).mean() <= 0.1
    stranger = background - 0.1 * rng.random(n)  # as likely under every model as under the background
    outsiders = ceiling.background_statistic(
        np.stack([stranger, stranger], axis=1), background, events, pools, [0, 1], limits
    )
    assert (outsiders > 0).all()


def test_the_joint_test_catches_what_each_side_alone_misses_at_one_false_rejection_rate():
    """Own texts: 0.5 nats a token above the background model, centred under their model (z ~ N(0, 1)).
    Human-like texts (ratio 0, far less likely under the model than its own texts) are caught by the
    background side, junk (and less likely still under the background) by the analytic side. Borderline
    pools, 1.5 of the own pools' standard deviations low in the ratio and z = +1.8, pass the background
    test and the two-sided analytic test each at alpha, and the min-p union of the two; Fisher's sum
    catches them. The known pools are rejected at about alpha, not at the sum of the two tests' rates."""
    from scipy.stats import norm

    from natprints.attribution import ceiling

    rng = np.random.default_rng(0)
    n, events = 400, np.full(400, 20)
    y = np.repeat([0, 1], n // 2)
    background = -100.0 + rng.normal(0, 1, n)
    loglik = np.stack([background - 5.0, background - 5.0], axis=1)
    loglik[np.arange(n), y] = background + 10.0 + rng.normal(0, 2, n)
    variance = np.full((n, 2), 16.0)
    entropy = -loglik + rng.normal(0, 4, (n, 2))  # z = N(0, 4) / sqrt(16): standard normal
    view = ceiling.LikelihoodView(np.arange(n).astype(str), loglik, {}, entropy, variance, events)
    limits = ceiling.joint_thresholds(view, background, y, [0, 1], 4, 0.05, 4000, seed=1)
    # independent uniform p-values: -log p1 - log p2 is Gamma(2, 1), whose 0.95-quantile is 4.74
    assert all(4.3 < limits[m].threshold < 5.2 for m in (0, 1))
    pools = ceiling.pool_groups(y, 4, seed=2)
    assert (ceiling.joint_statistic(view, background, pools, [0, 1], limits) > 0).mean() <= 0.1

    def strangers(lik: np.ndarray, bg: np.ndarray, ent: np.ndarray = entropy) -> np.ndarray:
        texts = ceiling.LikelihoodView(view.sample_ids, lik, {}, ent, variance, events)
        return ceiling.joint_statistic(texts, bg, pools, [0, 1], limits)

    human = background - 0.1 * rng.random(n)
    assert (strangers(np.stack([human, human], axis=1), background) > 0).all()
    junk = loglik - 60.0  # z about -15 under every model; the background finds it 90 nats less likely still
    assert (ceiling.background_statistic(junk, background - 150.0, events, pools, [0, 1], {0: 0.4, 1: 0.4}) < 0).all()
    assert (strangers(junk, background - 150.0) > 0).all()
    # borderline: every text 0.425 nats a token above the background (own pools of 4: 0.5 +- 0.05), z = 1.8
    edge = np.stack([background + 8.5, background + 8.5], axis=1)
    edge_entropy = -edge + 3.6  # pooled z = 4 * 3.6 / sqrt(4 * 16) = 1.8
    backgrounds = ceiling.background_thresholds(loglik, background, events, y, [0, 1], 4, 0.05, 4000, seed=1)
    assert (ceiling.background_statistic(edge, background, events, pools, [0, 1], backgrounds) < 0).all()
    assert all(limits[m].p_background(np.array([0.425]))[0] > 0.05 for m in (0, 1)) and 2 * norm.sf(1.8) > 0.05
    assert (strangers(edge, background, edge_entropy) > 0).all()


def test_the_joint_test_reads_the_background_models_scores_and_each_best_models_limit(zoo):
    """With a background model (here d, outside the library) and limits, each verdict's statistic is
    Fisher's sum for its best model: -log p_background(ratio) - log p_analytic(z) minus the threshold,
    the ratio being the best model's log-likelihood minus d's, per token. Half the background p's mass
    lies at ratio 0 (the own ratios [-1, 1]); a threshold of 50 is never reached, one of -50 always."""
    from scipy.stats import norm

    from natprints.attribution.ceiling import JointLimit
    from natprints.likelihood.strings import load_candidates

    texts = zoo.texts["b"][:4]
    candidates = load_candidates(zoo.library(), zoo.tokenizer)
    background = load_candidates({"d": zoo.dirs["d"]}, zoo.tokenizer)["d"]
    under_d = attribute_by_likelihood(texts, {"d": zoo.dirs["d"]}, zoo.tokenizer)
    for threshold, unknown in ((50.0, False), (-50.0, True)):
        limits = {m: JointLimit(np.array([-1.0, 1.0]), threshold) for m in "abc"}
        verdicts = attribute_by_likelihood(texts, candidates, background=background, joint=limits)
        for p, d in zip(verdicts, under_d, strict=True):
            ratio = (p.loglik[p.best_model] - d.loglik["d"]) / p.tokens
            p_background = (np.searchsorted([-1.0, 1.0], ratio, side="right") + 1) / 3
            expected = -np.log(p_background) - np.log(2 * norm.sf(abs(p.z[p.best_model]))) - threshold
            assert p.open_set == "joint" and p.joint == pytest.approx(expected)
            assert p.unknown is unknown and p.rejected == ([p.best_model] if unknown else [])
            assert p.to_dict()["joint_threshold"] == threshold
    pooled = attribute_by_likelihood(texts, candidates, background=background, joint=limits, pool=True)
    assert pooled.open_set == "joint" and pooled.texts == 4 and pooled.unknown
    with pytest.raises(NatprintsError, match="needs both a background model and each model's limit"):
        attribute_by_likelihood(texts, candidates, background=background)
    with pytest.raises(NatprintsError, match="has limits for"):
        attribute_by_likelihood(texts, candidates, background=background, joint={"a": limits["a"]})
