"""The fast `natprints attribute` path: the same records as before, batch by batch or one by one."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from typer.testing import CliRunner

from natprints import cli
from natprints.attribution import verdicts
from natprints.attribution.attributor import Attributor, load_attributor, read_text_file, save_attributor
from natprints.attribution.estimators import make_classifier
from natprints.attribution.fastpath import NgramCounter, NgramLogistic
from natprints.attribution.features import make_featurizer
from natprints.bench.attribute import NGRAM_FEATURIZERS, bench_attribute, choose_attributor
from natprints.errors import NatprintsError

RUNNER = CliRunner()
WORDS = ["we", "shall", "union", "war", "peace", "congress", "tax", "money", "trade", "the", "and", "of", "nation"]
# Whitespace runs, tabs and newlines, case, punctuation, characters no vocabulary has (non-BMP too).
ODD = ["", "  \n\n x", "Ab  CD\tef\n\ngh", "a", "café, déjà-vu!", "emoji 🙂 and 𝔘nion", "THE Nation's tax."]


def _texts(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    texts = []
    for label in y:
        favourite = WORDS[3 * label : 3 * label + 3]
        words = rng.choice(favourite * 3 + WORDS, size=int(rng.integers(3, 30)))
        texts.append(" ".join(w.capitalize() if rng.random() < 0.2 else w for w in words) + rng.choice([".", "!", ""]))
    return texts, y


def _attributor(featurizer: str, classifier: str = "logreg") -> Attributor:
    texts, y = _texts(150, seed=0)
    features = make_featurizer(featurizer, max_features=300)
    pipe = Pipeline([("features", features), ("classifier", make_classifier(classifier))]).fit(texts, y)
    return Attributor(pipe, ["base", "seed-1", "seed-2"], temperature=1.7, threshold=0.4)


def _same_csr(a, b) -> bool:
    return type(a) is type(b) and all(
        getattr(a, k).dtype == getattr(b, k).dtype and np.array_equal(getattr(a, k), getattr(b, k))
        for k in ("data", "indices", "indptr")
    )


@pytest.mark.parametrize("featurizer", ["word1", "word12", "char14"])
@pytest.mark.parametrize("lowercase", [False, True])
def test_ngram_counter_matches_scikit_learn_exactly(featurizer, lowercase):
    texts, _ = _texts(200, seed=1)
    vectorizer = make_featurizer(featurizer, max_features=400).set_params(lowercase=lowercase).fit(texts)
    queries = _texts(60, seed=2)[0] + ODD
    assert NgramCounter.supports(vectorizer)
    assert _same_csr(NgramCounter(vectorizer).transform(queries), vectorizer.transform(queries))


@pytest.mark.parametrize(
    "params",
    [
        {"analyzer": "char", "ngram_range": (2, 3)},  # no unigrams
        {"analyzer": "word", "ngram_range": (2, 2)},
        {"analyzer": "char", "ngram_range": (1, 2), "binary": True, "sublinear_tf": True},
        {"analyzer": "word", "ngram_range": (1, 3), "norm": None, "use_idf": False},
    ],
)
def test_ngram_counter_other_vectorizer_settings(params):
    texts, _ = _texts(200, seed=3)
    vectorizer = TfidfVectorizer(**params).fit(texts)
    queries = texts[:40] + ODD
    assert _same_csr(NgramCounter(vectorizer).transform(queries), vectorizer.transform(queries))


def test_ngram_counter_sorted_key_lookup_for_large_vocabularies(monkeypatch):
    """Past the dense-table size the counter looks packed keys up in the sorted vocabulary; same matrix."""
    texts, _ = _texts(200, seed=4)
    vectorizer = make_featurizer("char14", max_features=None).fit(texts)
    monkeypatch.setattr(NgramCounter, "MAX_TABLE", 10)
    counter = NgramCounter(vectorizer)
    assert counter.levels is None and counter.usable
    queries = texts[:40] + ODD
    assert _same_csr(counter.transform(queries), vectorizer.transform(queries))


def test_unsupported_vectorizers_use_scikit_learn():
    texts, y = _texts(100, seed=5)
    for vectorizer in (
        TfidfVectorizer(analyzer="char_wb"),
        TfidfVectorizer(stop_words=["the"]),
        TfidfVectorizer(token_pattern=r"\S+"),  # could match across the space that joins word n-grams
        TfidfVectorizer(strip_accents="unicode"),
    ):
        assert not NgramCounter.supports(vectorizer.fit(texts))
        pipe = Pipeline([("features", vectorizer), ("classifier", LogisticRegression())]).fit(texts, y)
        attributor = Attributor(pipe, ["a", "b", "c"])
        assert np.array_equal(attributor._pipeline_proba(texts), pipe.predict_proba(texts))
        assert attributor._counter is None


@pytest.mark.parametrize(("featurizer", "classifier"), [("char14", "logreg"), ("word12", "svm"), ("word1", "mlp")])
def test_probabilities_identical_to_the_scikit_learn_pipeline(featurizer, classifier):
    attributor = _attributor(featurizer, classifier)
    queries = _texts(50, seed=6)[0] + ODD
    expected = np.asarray(attributor.pipeline.predict_proba(queries), dtype=np.float64)
    assert np.array_equal(attributor._pipeline_proba(queries), expected)


def test_a_refit_pipeline_gets_a_new_counter():
    attributor = _attributor("char14")
    texts, y = _texts(120, seed=8)
    attributor.predict_proba(texts)
    first = attributor._counter
    attributor.pipeline.fit([t.upper() for t in texts], y)  # a new vocabulary
    assert np.array_equal(attributor._pipeline_proba(texts), attributor.pipeline.predict_proba(texts))
    assert attributor._counter is not first


def test_batch_invariance_is_declared_only_where_it_holds():
    assert _attributor("char14", "logreg").batch_invariant
    assert _attributor("word12", "svm").batch_invariant
    assert not _attributor("word1", "mlp").batch_invariant  # hidden layer: a BLAS product per batch
    pipe = _attributor("word1").pipeline
    assert not Attributor(pipe.named_steps["classifier"], ["a"]).batch_invariant  # not a pipeline


def invoke(*args: str):
    return RUNNER.invoke(cli.app, list(args))


BAD = {3: "missing.txt", 20: "empty.txt", 33: "binary.bin", 50: "adir"}


@pytest.fixture
def inputs(tmp_path):
    """74 inputs: text files, and bad inputs among them (missing, empty, binary, a directory)."""
    texts, _ = _texts(64, seed=7)
    paths = []
    for i, text in enumerate(texts + ODD[1:]):
        paths.append(tmp_path / f"t{i:02d}.txt")
        paths[-1].write_text(text)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.bin").write_bytes(b"we\x00shall")
    (tmp_path / "adir").mkdir()
    for at, name in BAD.items():
        paths.insert(at, tmp_path / name)
    return [str(p) for p in paths]


def _records(model: Attributor, inputs: list[str], top_k: int) -> list[dict]:
    """What the CLI's --json should print for the good inputs: one prediction over all of them."""
    good = [p for i, p in enumerate(inputs) if i not in BAD]
    predictions = model.predict([read_text_file(p) for p in good], top_k=top_k)
    return [{"input": p, **q.to_dict()} for p, q in zip(good, predictions, strict=True)]


@pytest.mark.parametrize(
    ("featurizer", "classifier", "as_json"),
    [("char14", "logreg", True), ("char14", "logreg", False), ("word12", "svm", True), ("word1", "logreg", False)],
)
def test_batched_run_gives_the_records_of_one_text_at_a_time(
    tmp_path, inputs, monkeypatch, featurizer, classifier, as_json
):
    directory = save_attributor(tmp_path / "att", _attributor(featurizer, classifier), {})
    monkeypatch.setattr(verdicts, "FIRST_BATCH", 4)  # batches of 4, 8, 16, 16, ...
    monkeypatch.setattr(verdicts, "MAX_BATCH", 16)
    flags = ["--attributor", str(directory), "--top", "2"] + (["--json"] if as_json else [])
    batched = invoke("attribute", *inputs, *flags)
    assert batched.exit_code == 1  # the bad inputs
    singles = [invoke("attribute", path, *flags) for path in inputs]
    assert batched.stdout == "".join(r.stdout for r in singles)
    assert batched.stderr == "".join(r.stderr for r in singles)
    assert len(batched.stderr.splitlines()) == len(BAD)
    if as_json:
        records = [json.loads(line) for line in batched.stdout.splitlines()]
        assert [r["input"] for r in records] == inputs
        assert [i for i, r in enumerate(records) if "error" in r] == list(BAD)
        assert [r for r in records if "error" not in r] == _records(load_attributor(directory), inputs, 2)


def test_batches_stream_for_invariant_attributors_and_not_otherwise(tmp_path, inputs, monkeypatch):
    sizes: list[int] = []
    original = Attributor.predict

    def predict(self, texts, top_k=3):
        sizes.append(len(texts))
        return original(self, texts, top_k)

    monkeypatch.setattr(Attributor, "predict", predict)
    monkeypatch.setattr(verdicts, "FIRST_BATCH", 8)
    monkeypatch.setattr(verdicts, "MAX_BATCH", 32)
    ngram = save_attributor(tmp_path / "ngram", _attributor("char14", "logreg"), {})
    invoke("attribute", *inputs, "--attributor", str(ngram))
    assert sizes == [8 - 1, 16 - 1, 32 - 2, 18]  # 8, 16, 32, the rest; less the bad inputs in each
    sizes.clear()
    # An MLP's results depend on the batch in the last bits: one prediction over every input, as before.
    mlp = save_attributor(tmp_path / "mlp", _attributor("word1", "mlp"), {})
    result = invoke("attribute", *inputs, "--attributor", str(mlp), "--json")
    assert sizes == [len(inputs) - len(BAD)]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r for r in records if "error" not in r] == _records(load_attributor(mlp), inputs, 3)


def test_read_text_file_errors(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("we shall")
    assert read_text_file(f) == "we shall"
    for path, message in [
        (tmp_path / "nope.txt", "no such file"),
        (f / "below", "no such file"),  # a file used as a directory
        (tmp_path, "is a directory, not a text file"),
    ]:
        with pytest.raises(NatprintsError, match=message):
            read_text_file(path)
    with pytest.raises(NatprintsError, match=r"over the size limit \(8 > 4 bytes\)"):
        read_text_file(f, max_bytes=4)


def test_choose_attributor_prefers_condition_all_then_accuracy():
    saved = [
        {"condition": "seed", "featurizer": "char14", "accuracy": 0.30},
        {"condition": "lr", "featurizer": "word12", "accuracy": 0.45},
        {"condition": "all", "featurizer": "union", "accuracy": 0.50},
        {"condition": "init", "featurizer": "embed", "accuracy": 0.36},
    ]
    assert choose_attributor(saved, NGRAM_FEATURIZERS)["condition"] == "lr"  # `all` is not n-gram
    assert choose_attributor(saved, ("union",))["condition"] == "all"
    assert choose_attributor(saved, ("embed",))["condition"] == "init"
    assert choose_attributor(saved[:1], ("embed",)) is None


def test_bench_attribute_runs_the_cli(tmp_path):
    import pandas as pd

    home = tmp_path / "home"
    base = home / "models" / "demo" / "attributors"
    for condition, featurizer in [("all", "char14"), ("seed", "word1")]:
        attributor = _attributor(featurizer)
        attributor.meta = {"featurizer": featurizer, "classifier": "logreg", "test_accuracy": 0.5}
        save_attributor(base / condition, attributor, {})
    generated = home / "data" / "generated" / "demo"
    generated.mkdir(parents=True)
    for i in range(2):
        pd.DataFrame({"text": _texts(15, seed=10 + i)[0] + ["", "bad\x00"]}).to_parquet(generated / f"m{i}.parquet")
    out = bench_attribute(home, "demo", n_texts=40, reps=1, workdir=tmp_path / "work", embed_texts=0)
    r = out["results"]
    assert r["attribute_texts"] == 40 and r["attribute_ngram_condition"].startswith("all (char14+logreg")
    assert (
        r["attribute_ngram_texts_per_s"] > 0
        and 0 < r["attribute_ngram_cold_start_s"] <= r["attribute_ngram_runs_s"][0][1]
    )
    assert "attribute_embed_texts_per_s" not in r  # embed_texts=0 skips the embedding attributor
    assert out["profile"][0].startswith("natprints attribute, all attributor, 40 texts") and len(out["notes"]) == 3
    # 30 usable texts (empty and binary ones dropped), cycled to 40 files.
    files = sorted((tmp_path / "work" / "attribute" / "texts").iterdir())
    assert len(files) == 40 and files[30].read_text() == files[0].read_text()


def _light(attributor: Attributor, tmp_path) -> Attributor:
    return load_attributor(save_attributor(tmp_path / "light", attributor, {}), light=True)


@pytest.mark.parametrize(
    "params",
    [
        {},  # natprints' char14 (sublinear TF, l2)
        {"lowercase": True, "sublinear_tf": False},
        {"norm": None, "use_idf": False, "binary": True},
        {"analyzer": "word", "ngram_range": (1, 2), "token_pattern": r"(?u)\b\w\w+\b"},
    ],
)
def test_light_ngram_logistic_is_bit_identical_to_the_pipeline(tmp_path, params):
    texts, y = _texts(200, seed=12)
    vectorizer = make_featurizer("char14", max_features=500).set_params(**params)
    pipe = Pipeline([("features", vectorizer), ("classifier", make_classifier("logreg"))]).fit(texts, y)
    light = _light(Attributor(pipe, ["a", "b", "c"], temperature=1.3), tmp_path)
    assert isinstance(light.pipeline, NgramLogistic) and light.batch_invariant
    queries = _texts(80, seed=13)[0] + ODD + ["we shall " * 400]  # a long row too
    assert np.array_equal(light.predict_proba(queries), Attributor(pipe, ["a", "b", "c"], 1.3).predict_proba(queries))
    assert np.array_equal(light.pipeline.classes_, pipe.classes_)


def test_light_load_falls_back_to_the_pipeline(tmp_path):
    """SVMs, MLPs and two-class logistic regressions are loaded as scikit-learn pipelines."""
    for attributor in (_attributor("word12", "svm"), _attributor("word1", "mlp")):
        assert isinstance(_light(attributor, tmp_path).pipeline, Pipeline)
    texts, y = _texts(100, seed=14)
    two = Pipeline([("features", make_featurizer("word1")), ("classifier", LogisticRegression())]).fit(texts, y % 2)
    assert isinstance(_light(Attributor(two, ["a", "b"]), tmp_path).pipeline, Pipeline)


def test_cli_with_an_ngram_logistic_attributor_never_imports_scikit_learn(tmp_path):
    directory = save_attributor(tmp_path / "att", _attributor("char14"), {})
    f = tmp_path / "a.txt"
    f.write_text("we shall defend the union")
    code = (
        "import sys; from natprints.cli import main; "
        f"sys.argv = ['natprints', 'attribute', {str(f)!r}, '--attributor', {str(directory)!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('imported:', sorted(m for m in ('sklearn', 'pandas', 'scipy.stats', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert f"{f}: " in out and "imported: []" in out
