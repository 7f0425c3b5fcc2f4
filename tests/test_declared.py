"""Models with tokenizers of their own: declared models ([[models]], checkpoints the run did not train)
and the zoo's `tokenizer` condition (trained on the identical text with other tokenizers), through
generate, likelihood, experiments and the report; the config's rules; conditions from declared factors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import transformers

from natprints.config import load_config
from natprints.declared import declared_conditions
from natprints.errors import NatprintsError
from natprints.generate.declared import cut_at_word, kept_tokens
from tests.conftest import ROOT, run_cli, trained_tokenizer

CONFIG = """
[run]
name = "dec"
threads = 1
workers = 1

[corpus]
source = "sotu"
max_chars = 200000
heldout_fraction = 0.08

[tokenizer]
vocab_size = 512

[train]
size = "xs"
batch_size = 8
seq_len = 64
steps = 5
warmup_steps = 1
eval_every = 5
eval_batches = 1
resume_every = 5

[conditions]
declared = ["family", "seed"]
tokenizer = ["bpe-300", "unigram-400"]
families = ["gpt2/bpe-300", "gptneox/run"]

[generate]
prompts = 24
prompt_tokens = 8
new_tokens = 48
max_chars = 60
batch_size = 16

[attribution]
test_fraction = 0.34
featurizers = ["word1", "char14"]
classifiers = ["logreg", "nb"]
evidence_tokens = [4, 0]
evidence_train_fractions = [1.0]

[reference]
enabled = false

[lineage]
derive_conditions = []
seedprints_inputs = 16
seedprints_seq_len = 16
seedprints_k = 8
"""
MODELS = {  # label -> (family, seed, the tokenizer it reads)
    "gpt2-s0": ("gpt2", 0, "bytebpe"),
    "gpt2-s1": ("gpt2", 1, "bytebpe"),
    "neox-s0": ("gptneox", 0, "unigram"),
    "llama-s0": ("llama", 0, "run"),
}


def write_config(path: Path, extra: str = "") -> Path:
    entries = "".join(
        f'\n[[models]]\nlabel = "{label}"\npath = "ckpt/{label}"\nfactors = {{ family = "{family}", seed = {seed} }}\n'
        for label, (family, seed, _) in MODELS.items()
    )
    path.write_text(CONFIG + extra + entries)
    return path


def build(family: str, seed: int, vocab: int):
    torch.manual_seed(seed)
    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256}
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256)
        return transformers.GPT2LMHeadModel(config).eval()
    if family == "gptneox":
        return transformers.GPTNeoXForCausalLM(
            transformers.GPTNeoXConfig(vocab_size=vocab, intermediate_size=64, **shape)
        ).eval()
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=vocab, intermediate_size=64, **shape)
    ).eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run with one small zoo model and four declared models saved by the test (three families,
    three tokenizers), through every attribution stage."""
    home = tmp_path_factory.mktemp("declared")
    config = write_config(home / "dec.toml")
    run_cli("data", "--config", str(config), home=home)
    corpus = home / "data" / "corpus" / "dec"
    texts = [json.loads(line)["text"] for line in (corpus / "train.jsonl").read_text().splitlines()]
    tokenizers = {
        "bytebpe": trained_tokenizer("bytebpe", texts, 400),
        "unigram": trained_tokenizer("unigram", texts, 300),
        "run": transformers.AutoTokenizer.from_pretrained(corpus / "tokenizer"),
    }
    models = {}
    for label, (family, seed, kind) in MODELS.items():
        tok = tokenizers[kind]
        models[label] = (build(family, seed, len(tok)), tok)
        models[label][0].save_pretrained(home / "ckpt" / label)
        tok.save_pretrained(home / "ckpt" / label)
    for stage in ("zoo", "generate", "lineage run", "likelihood", "experiments", "report"):  # (no derived models)
        run_cli(*stage.split(), "--config", str(config), home=home)
    return home, config, models


def generated(home: Path, label: str, where: str = "declared") -> pd.DataFrame:
    return pd.read_parquet(home / "data" / "generated" / "dec" / where / f"{label}.parquet")


BASE = "xs-lr1e-3-bs8-init0-data0"
VARIANTS = [f"bpe-300-{BASE}", f"unigram-400-{BASE}"]
FAMILIES = [f"bpe-300-gpt2-{BASE}", f"gptneox-{BASE}"]


def test_texts_are_cut_to_one_character_budget_with_each_model_s_own_tokens(run):
    home, _, models = run
    for label, (_, tok) in models.items():
        frame = generated(home, label)
        assert len(frame) == 24 and frame["model_id"].eq(label).all()
        assert frame["text"].str.len().max() <= 60
        for row in frame.itertuples():
            assert len(row.token_ids) == row.n_tokens <= 48
            assert len(tok.decode(list(row.token_ids))) <= len(row.text)
    # The prompts are the run's prompt strings, shared by every model.
    prompts = {label: generated(home, label).set_index("prompt_id")["prompt"] for label in models}
    first = prompts["gpt2-s0"]
    assert all(p.loc[first.index].equals(first) for p in prompts.values())


def test_the_cut_is_at_a_word_boundary():
    assert cut_at_word("one two three", 13) == "one two three"
    assert cut_at_word("one two three", 9) == "one two"
    assert cut_at_word("one two three", 7) == "one two"  # the budget ends at a space
    assert cut_at_word("onetwothree four", 5) == "onetw"  # one word longer than the budget
    assert cut_at_word("  leading", 4) == "  le"


def test_kept_tokens_are_those_the_cut_text_holds():
    words = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_word_tokenizer(), eos_token="<eos>", unk_token="<unk>"
    )
    ids = words("a bb ccc dddd", add_special_tokens=False)["input_ids"]
    assert kept_tokens(words, ids, cut_at_word("a bb ccc dddd", 9)) == 3


def _word_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1, "a": 2, "bb": 3, "ccc": 4, "dddd": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def test_declared_scores_equal_each_model_s_own_logits(run):
    """Each declared model scores a text as its own tokenizer reads the prompt and the text."""
    home, _, models = run
    for label in ("neox-s0", "gpt2-s0"):
        model, tok = models[label]
        scores = pd.read_parquet(home / "data" / "likelihood" / "dec" / "declared" / f"{label}.parquet")
        texts = generated(home, "neox-s0").set_index("sample_id")
        checked = 0
        for row in scores.itertuples():
            if row.sample_id not in texts.index or checked == 3:
                continue
            prompt, text = texts.at[row.sample_id, "prompt"], texts.at[row.sample_id, "text"]
            context = tok(prompt, add_special_tokens=False)["input_ids"]
            ids = tok(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([context + ids])).logits[0].double()
            logp = torch.log_softmax(logits, -1)[len(context) - 1 : -1].gather(1, torch.tensor(ids)[:, None])
            assert row.events == len(ids)
            assert row.canonical == pytest.approx(float(logp.sum()), abs=1e-3)
            assert row.loglik >= row.canonical  # the sum over segmentations holds the canonical path
            checked += 1
        assert checked == 3


def test_attribute_by_likelihood_among_a_declared_condition(run):
    """`attribute --condition declared-family` reads the declared models from the config; the scores
    are the stage's."""
    home, config, _ = run
    table = pd.read_parquet(home / "data" / "likelihood" / "dec" / "declared" / "gpt2-s0.parquet")
    texts = generated(home, "gpt2-s0").set_index("sample_id")
    table = table[table["sample_id"].isin(texts.index)]  # its own texts among those it scored
    row = texts.loc[table["sample_id"].iloc[0]]
    text = home / "declared-text.txt"
    text.write_text(row["text"])
    result = run_cli(
        "attribute", "--method", "likelihood", "--config", str(config), "--condition", "declared-family",
        "--prompt", row["prompt"], "--json", str(text), home=home,
    )  # fmt: skip
    verdict = json.loads(result.stdout)
    assert set(verdict["loglik"]) == {"gpt2-s0", "neox-s0", "llama-s0"}
    assert verdict["loglik"]["gpt2-s0"] == pytest.approx(table["canonical"].iloc[0], abs=1e-3)


def test_declared_conditions_get_tables_a_ceiling_and_the_length_control(run):
    home, _, _ = run
    reports = home / "reports" / "dec"
    accuracy = pd.read_csv(reports / "accuracy.csv")
    assert {"declared-family", "declared-seed", "null_control"} <= set(accuracy["condition"])
    records = [json.loads(line) for line in (reports / "results.jsonl").read_text().splitlines()]
    ceiling = [r for r in records if r.get("featurizer") == "likelihood" and r["condition"] == "declared-family"]
    assert ceiling and ceiling[0]["n_test"] == 24
    controls = [r for r in records if r["kind"] == "length_control" and r["condition"].startswith("declared")]
    assert {r["condition"] for r in controls} == {"declared-family", "declared-seed"}
    assert not any("tokens" in r["features"] for r in controls)  # no token count of one tokenizer
    index = (reports / "index.md").read_text()
    assert "### Declared models" in index and "family = gptneox, seed = 0" in index
    assert "`declared-family`: gpt2-s0, neox-s0, llama-s0" in index
    assert (home / "models" / "dec" / "attributors" / "declared-family" / "manifest.json").is_file()


def test_reruns_do_nothing_and_changed_weights_are_refused(run):
    home, config, models = run
    again = run_cli("generate", "--config", str(config), home=home)
    assert "generate (declared)" not in again.stderr
    before = generated(home, "gpt2-s0")
    moved = home / "ckpt" / "gpt2-s0.bak"
    shutil.copytree(home / "ckpt" / "gpt2-s0", moved)
    try:
        build("gpt2", 7, len(models["gpt2-s0"][1])).save_pretrained(home / "ckpt" / "gpt2-s0")
        refused = run_cli("generate", "--config", str(config), home=home, check=False)
        assert refused.returncode == 1
        assert "generated by other weights of gpt2-s0" in refused.stderr
        assert generated(home, "gpt2-s0").equals(before)  # nothing already written lost
    finally:
        shutil.rmtree(home / "ckpt" / "gpt2-s0")
        moved.rename(home / "ckpt" / "gpt2-s0")


def test_zoo_tokenizer_variants_train_on_the_same_text_and_are_scored_as_strings(run):
    """The `tokenizer` condition: the base (the run's BPE) beside a smaller BPE and a unigram tokenizer
    trained on the run's training paragraphs; each model carries its tokenizer and writes texts cut to
    the character budget; the ceiling reads them as strings, and `attribute --condition tokenizer`
    gives the stage's scores."""
    home, config, _ = run
    zoo = home / "models" / "dec" / "zoo"
    sizes = {}
    for model in VARIANTS:
        manifest = json.loads((zoo / model / "manifest.json").read_text())
        assert manifest["conditions"] == ["tokenizer"] and "tokenizer.json" in manifest["files"]
        sizes[model] = len(transformers.AutoTokenizer.from_pretrained(zoo / model))
        assert manifest["spec"]["tokenizer"] == model.split(f"-{BASE}")[0]
        assert (
            manifest["tokenizer_sha256"] != json.loads((zoo / BASE / "manifest.json").read_text())["tokenizer_sha256"]
        )
    assert sizes == {VARIANTS[0]: 300, VARIANTS[1]: 400}
    assert not (zoo / BASE / "tokenizer.json").is_file()  # the base reads the run's tokenizer
    members = json.loads((home / "data" / "generated" / "dec" / "manifest.json").read_text())["strings"]["conditions"]
    assert members == {"tokenizer": [BASE, *VARIANTS], "families": [BASE, *FAMILIES]}
    for model in [BASE, *VARIANTS, *FAMILIES]:
        frame = generated(home, model, "strings")
        assert (
            len(frame) == 24 and frame["text"].str.len().max() <= 60 and not frame["text"].str.contains("\ufffd").any()
        )
    accuracy = pd.read_csv(home / "reports" / "dec" / "accuracy.csv")
    assert "tokenizer" in set(accuracy["condition"]) and "all" not in set(accuracy["condition"])
    records = [json.loads(line) for line in (home / "reports" / "dec" / "results.jsonl").read_text().splitlines()]
    assert any(r.get("featurizer") == "likelihood" and r["condition"] == "tokenizer" for r in records)
    # One test text through the command, every model with its own tokenizer, equals the stage's scores.
    scores = {m: pd.read_parquet(home / "data" / "likelihood" / "dec" / "declared" / f"{m}.parquet") for m in VARIANTS}
    row = generated(home, VARIANTS[1], "strings").set_index("sample_id").loc[scores[VARIANTS[1]]["sample_id"].iloc[0]]
    text = home / "text.txt"
    text.write_text(row["text"])
    command = ("attribute", "--method", "likelihood", "--config", str(config), "--condition", "tokenizer")
    command += ("--prompt", row["prompt"], "--json", str(text))
    loglik = json.loads(run_cli(*command, home=home).stdout)["loglik"]
    summed = json.loads(run_cli(*command, "--segmentations", "8", home=home).stdout)
    for model in VARIANTS:
        table = scores[model].set_index("sample_id")
        for column, got in (("canonical", loglik), ("loglik", summed["loglik"])):  # the stage sums over paths
            expected = table.at[row.name, column]
            assert got[model] == pytest.approx(expected, abs=1e-3) if np.isfinite(expected) else got[model] is None


def test_families_differ_in_architecture_and_tokenizer_and_their_ceiling_sums_over_segmentations(run):
    """The `families` condition: the base beside GPT-2 with a BPE of its own and GPT-NeoX with the run's
    tokenizer, scored as strings; over segmentations the true model's score never falls below its
    canonical path's, and the report gives both ceilings."""
    home, _, _ = run
    zoo = home / "models" / "dec" / "zoo"
    gpt2, neox = (json.loads((zoo / m / "manifest.json").read_text()) for m in FAMILIES)
    assert (
        gpt2["conditions"] == ["families"] and gpt2["spec"]["arch"] == "gpt2" and gpt2["spec"]["tokenizer"] == "bpe-300"
    )
    assert neox["spec"]["arch"] == "gptneox" and "tokenizer" not in neox["spec"]  # the run's, as the base's
    accuracy = pd.read_csv(home / "reports" / "dec" / "accuracy.csv")
    assert {"families", "tokenizer"} <= set(accuracy["condition"]) and "all" not in set(accuracy["condition"])
    records = [json.loads(line) for line in (home / "reports" / "dec" / "results.jsonl").read_text().splitlines()]
    ceilings = {r["condition"]: r for r in records if r["kind"] == "segmented_ceiling"}
    assert set(ceilings) == {"families", "tokenizer", *(c for c in ceilings if c.startswith("declared"))}
    for model in [BASE, *FAMILIES]:
        table = pd.read_parquet(home / "data" / "likelihood" / "dec" / "declared" / f"{model}.parquet")
        finite = table[np.isfinite(table["canonical"])]
        assert (finite["loglik"] >= finite["canonical"] - 1e-6).all() and (finite["paths"] >= 1).all()
        assert (table.loc[table["paths"] > 1, "loglik"] > table.loc[table["paths"] > 1, "canonical"]).all()
    assert ceilings["families"]["true_gain"] >= 0 and ceilings["families"]["n_test"] == 3 * 8
    report = (home / "reports" / "dec" / "index.md").read_text()
    assert "### The ceiling across tokenizers" in report and "| `families` | 24 |" in report


def test_a_text_a_tokenizer_cannot_read_back_scores_minus_infinity(run):
    """A unigram tokenizer reads characters outside its vocabulary as one unknown piece: its model
    cannot write such a text, so the score is -inf (not the unknown piece's probability)."""
    home, _, models = run
    table = pd.read_parquet(home / "data" / "likelihood" / "dec" / "declared" / "neox-s0.parquet")
    texts = pd.concat([generated(home, m) for m in models]).set_index("sample_id")
    tok = models["neox-s0"][1]
    for row in table.itertuples():
        text = texts.at[row.sample_id, "text"]
        back = tok.decode(tok(text, add_special_tokens=False)["input_ids"]).lstrip() == text.lstrip()
        assert row.representable == back and (np.isfinite(row.loglik) == back)
    assert (~table["representable"]).any() and table["representable"].any()


def test_lineage_compares_declared_models_without_a_ground_truth(run):
    """Declared models enter the lineage matrix beside the zoo's; a pair with one of them has no known
    relation, so it counts in no AUC or check (the zoo's pairs alone do)."""
    home, _, _ = run
    rows = pd.read_csv(home / "reports" / "dec" / "lineage.csv")
    declared = rows["model_a"].isin(MODELS) | rows["model_b"].isin(MODELS)
    assert declared.any() and rows.loc[declared, "related"].isna().all()
    assert rows.loc[~declared, "related"].notna().all()
    pair = rows[(rows["model_a"].isin(["gpt2-s0", "gpt2-s1"])) & (rows["model_b"].isin(["gpt2-s0", "gpt2-s1"]))]
    assert set(pair["method"]) == {"seedprints", "weights"}
    assert pair.loc[pair["method"] == "seedprints", "verdict"].ne("incomparable").all()  # one shape, one vocabulary
    summary = json.loads((home / "reports" / "dec" / "lineage.json").read_text())
    known = rows[~declared]
    for method in ("seedprints", "weights"):
        assert summary["methods"][method]["pairs"] == int((known["method"] == method).sum())
    assert {e["label"] for e in summary["entries"] if e["kind"] == "declared"} == set(MODELS)


def test_config_rules_for_declared_models(tmp_path):
    ok = write_config(tmp_path / "ok.toml")
    cfg = load_config(ok)
    assert declared_conditions(cfg) == {
        "declared-family": ["gpt2-s0", "neox-s0", "llama-s0"],
        "declared-seed": ["gpt2-s0", "gpt2-s1"],
    }
    cases = {
        "max_chars = 60\n": ("", "generate.max_chars (a budget in characters)"),
        'declared = ["family", "seed"]': ('declared = ["lr"]', "no declared model has factor(s) ['lr']"),
        'path = "ckpt/gpt2-s1"': ('path = "ckpt/gpt2-s0"\nhub = "x/y"', "give exactly one of path"),
        'label = "gpt2-s1"': ('label = "gpt2-s0"', "label(s) ['gpt2-s0'] declared more than once"),
        "derive_conditions = []": ('derive_conditions = ["tokenizer"]', "the shift corpus"),
        '"bpe-300"': ('"bpe-100"', "'bpe-100': the vocabulary size must be in [300, 262144]"),
    }
    for old, (new, message) in cases.items():
        bad = tmp_path / "bad.toml"
        bad.write_text(ok.read_text().replace(old, new, 1))
        with pytest.raises(NatprintsError, match=re.escape(message)):
            load_config(bad)


def test_polypythias_validates_offline_and_forms_its_conditions():
    cfg = load_config(ROOT / "configs" / "polypythias.toml")
    conditions = declared_conditions(cfg)
    sizes = sorted({m.factors["size"] for m in cfg.models})
    seeds = sorted({m.factors["seed"] for m in cfg.models})
    assert len(cfg.models) == len(sizes) * len(seeds) == 50
    assert {f"declared-seed-{s}" for s in sizes} <= set(conditions)
    assert all(len(conditions[f"declared-seed-{s}"]) == len(seeds) for s in sizes)
    assert all(m.hub.startswith("EleutherAI/pythia-") for m in cfg.models)


def test_a_missing_declared_model_stops_the_zoo_before_it_trains(tmp_path):
    config = write_config(tmp_path / "dec.toml")
    run_cli("data", "--config", str(config), home=tmp_path)
    result = run_cli("zoo", "--config", str(config), home=tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: model gpt2-s0: model directory not found: {tmp_path / 'ckpt' / 'gpt2-s0'}"
    )
    assert not (tmp_path / "models" / "dec" / "zoo").exists()


def test_a_hub_model_not_in_the_cache_is_one_line_offline(tmp_path, monkeypatch):
    from natprints.declared import model_directory

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = load_config(ROOT / "configs" / "polypythias.toml")
    with pytest.raises(NatprintsError, match=r"cannot read hub model EleutherAI/pythia-.*HF_HUB_OFFLINE=1"):
        model_directory(cfg.models[0])


def test_polypythias_plans_offline_on_the_meta_device(tmp_path, monkeypatch):
    """Every PolyPythias model is built from its declared architecture without a weight: the parameter
    counts are Pythia's published ones (pythia-70m: 70,426,624) and match each size's name within 5%."""
    from natprints.declared import plan

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached: the declared shapes are read
    planned = plan(load_config(ROOT / "configs" / "polypythias.toml"))
    assert len(planned) == 50 and {p.source for p in planned} == {"run config"}
    for p in planned:
        named = float(p.label.split("-")[1].rstrip("m")) * 1e6
        assert abs(p.parameters / named - 1) < 0.05, p
    counts = {p.label: p.parameters for p in planned}
    assert counts["pythia-70m"] == counts["pythia-70m-seed9"] == 70_426_624
    assert counts["pythia-410m"] == 405_334_016
    result = run_cli("plan", "--config", str(ROOT / "configs" / "polypythias.toml"), home=tmp_path)
    assert (
        result.stdout.strip().splitlines()[-1] == "50 models, 6,826,460,160 parameters, 25.4 GiB of fp32 weights in all"
    )


def test_a_model_at_hand_is_planned_from_its_own_config(tmp_path):
    """A local model's config.json wins over a declared architecture; a bad architecture is one line."""
    from natprints.config import DeclaredModel
    from natprints.declared import architecture, plan

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2))
    model.save_pretrained(tmp_path / "gpt2")
    declared = DeclaredModel(
        label="g", path=str(tmp_path / "gpt2"), architecture={"model_type": "llama", "hidden_size": 8}
    )
    config, source = architecture(declared)
    assert source == "config.json" and config.model_type == "gpt2"
    cfg = load_config(ROOT / "configs" / "smoke.toml").model_copy(update={"models": [declared]})
    assert plan(cfg)[0].parameters == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="architecture needs its model_type"):
        DeclaredModel(label="x", hub="org/x", architecture={"hidden_size": 8})
    missing = DeclaredModel(label="x", path=str(tmp_path / "nowhere"), architecture={"model_type": "no_such_type"})
    with pytest.raises(NatprintsError, match=r"^model x: architecture: .*no_such_type"):
        architecture(missing)
