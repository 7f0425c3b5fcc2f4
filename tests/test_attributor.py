"""Custom estimators, the no-pickle attributor format, calibration and the open-set threshold."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from natprints.artifacts import Manifest
from natprints.attribution import features
from natprints.attribution.attributor import (
    PIPELINE_FILE,
    Attributor,
    apply_temperature,
    attribute,
    choose_threshold,
    fit_temperature,
    load_attributor,
    save_attributor,
)
from natprints.attribution.estimators import LabelXGBClassifier, make_classifier
from natprints.attribution.features import SentenceEmbedder, make_featurizer
from natprints.errors import NatprintsError

WORDS = ["the", "nation", "union", "war", "peace", "we", "shall", ",", ".", "of", "and", "congress"]


class CountingEncoder:
    """A fake sentence encoder: hashed bag of words; counts loads and encode calls."""

    loads = 0

    def __init__(self) -> None:
        type(self).loads += 1
        self.calls = 0

    def encode(self, texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, **_):
        self.calls += 1
        out = np.zeros((len(texts), 8), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.split():
                out[i, sum(map(ord, word)) % 8] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


@pytest.fixture
def fake_encoder(monkeypatch):
    CountingEncoder.loads = 0
    monkeypatch.setattr(features, "_load_encoder", lambda name, device: CountingEncoder())
    return CountingEncoder


def corpus(n_per_class: int = 30, k: int = 3, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for c in range(k):
        p = np.ones(len(WORDS))
        p[c * 3 : c * 3 + 3] = 4.0  # each class favours three words
        for _ in range(n_per_class):
            texts.append(" ".join(rng.choice(WORDS, size=20, p=p / p.sum())))
            labels.append(c)
    return texts, np.array(labels)


@parametrize_with_checks([LabelXGBClassifier(n_estimators=8, n_jobs=1)])
def test_custom_estimators_pass_sklearn_checks(estimator, check):
    check(estimator)


def test_sentence_embedder_api_and_cache(tmp_path, fake_encoder):
    # sklearn's generic checks need numeric 2-D input; a text transformer is checked here instead.
    texts = ["we shall", "the nation of peace", "we shall"]
    embedder = SentenceEmbedder(cache_dir=str(tmp_path))
    assert clone(embedder).get_params() == embedder.get_params()
    with pytest.raises(NotFittedError):
        embedder.transform(texts)
    with pytest.raises(ValueError, match="single string"):
        embedder.fit("one text")
    assert embedder.fit(texts) is embedder
    first = embedder.transform(texts)
    assert first.shape == (3, 8) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(first[0], first[2])
    encoder = embedder._encoder_model
    assert encoder.calls == 1
    # A new embedder with the same cache reuses the stored vectors and never loads the encoder.
    again = SentenceEmbedder(cache_dir=str(tmp_path)).fit(texts)
    np.testing.assert_array_equal(again.transform(texts), first)
    assert fake_encoder.loads == 1
    assert "_encoder_model" not in embedder.__getstate__()


def test_real_encoder_offline(tmp_path, monkeypatch):
    """The packaged all-MiniLM-L6-v2 loads offline and embeds (384 dims, unit length)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vectors = SentenceEmbedder(cache_dir=str(tmp_path)).fit(["x"]).transform(["The union is strong.", "Peace."])
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-4)
    assert list(tmp_path.rglob("shard-*.npz"))


@pytest.mark.parametrize("featurizer", ["word1", "word12", "char14", "union"])
@pytest.mark.parametrize("classifier", ["logreg", "svm", "xgb", "mlp"])
def test_save_load_gives_identical_predictions(tmp_path, fake_encoder, featurizer, classifier):
    texts, y = corpus()
    pipe = Pipeline(
        [("features", make_featurizer(featurizer, max_features=300)), ("classifier", make_classifier(classifier))]
    )
    pipe.fit(texts, y)
    labels = ["base", "seed-1", "seed-2"]
    saved = Attributor(pipeline=pipe, labels=labels, temperature=1.7, threshold=0.4, meta={"pipeline": "x"})
    save_attributor(tmp_path / "a", saved, {"condition": "all"})
    loaded = load_attributor(tmp_path / "a")
    assert loaded.labels == labels and loaded.temperature == 1.7 and loaded.threshold == 0.4
    np.testing.assert_array_equal(loaded.predict_proba(texts), saved.predict_proba(texts))
    assert [p.to_dict() for p in loaded.predict(texts)] == [p.to_dict() for p in saved.predict(texts)]
    raw = (tmp_path / "a" / PIPELINE_FILE).read_bytes()
    assert raw[:2] == b"PK" and b"pickle" not in raw  # a skops zip archive


def test_saved_pipeline_bytes_do_not_depend_on_the_process(tmp_path):
    """A vectorizer that has transformed caches id(stop_words), a memory address; the saved bytes must
    not carry it (a Ray worker and a local one saving the same fit must agree)."""
    from natprints.attribution.attributor import dump_pipeline

    texts, y = corpus()
    pipe = Pipeline([("features", make_featurizer("union", max_features=300)), ("clf", LogisticRegression())])
    pipe.fit(texts, y)
    first = dump_pipeline(pipe)
    pipe.predict(texts)  # validates the stop words again: a fresh id cached
    for part in pipe.get_params(deep=True).values():
        if hasattr(part, "stop_words"):
            part._stop_words_id = 12345
    assert dump_pipeline(pipe) == first


def _saved(tmp_path):
    texts, y = corpus()
    pipe = Pipeline([("features", make_featurizer("word1")), ("classifier", LogisticRegression())]).fit(texts, y)
    directory = tmp_path / "att"
    save_attributor(directory, Attributor(pipe, ["a", "b", "c"]), {"condition": "all"})
    return directory, texts


def test_tampered_missing_and_foreign_attributors_are_refused(tmp_path):
    directory, _ = _saved(tmp_path)
    arrays = directory / PIPELINE_FILE
    data = bytearray(arrays.read_bytes())
    data[len(data) // 2] ^= 0xFF
    arrays.write_bytes(bytes(data))
    with pytest.raises(NatprintsError, match="does not match its manifest hash"):
        load_attributor(directory)
    with pytest.raises(NatprintsError, match="no attributor"):
        load_attributor(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NatprintsError, match="no manifest.json"):
        load_attributor(tmp_path / "empty")
    # A directory with a valid manifest of another kind is foreign.
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("hello")
    Manifest(other, "artifact").write("k", {"kind": "something-else"}, ["x.txt"])
    with pytest.raises(NatprintsError, match="not a natprints attributor"):
        load_attributor(other)


def test_untrusted_type_is_refused_even_with_matching_hashes(tmp_path):
    directory, _ = _saved(tmp_path)
    import skops.io as sio

    texts, y = corpus()
    pipe = Pipeline([("features", make_featurizer("word1")), ("classifier", Untrusted())]).fit(texts, y)
    (directory / PIPELINE_FILE).write_bytes(sio.dumps(pipe))
    manifest = json.loads((directory / "manifest.json").read_text())
    fields = {k: v for k, v in manifest.items() if k not in ("files", "key")}
    Manifest(directory, "attributor").write(manifest["key"], fields, manifest["files"])
    with pytest.raises(NatprintsError, match="untrusted type.*Untrusted"):
        load_attributor(directory)


class Untrusted(LogisticRegression):
    """A class no trusted list names."""


def test_saving_an_untrusted_object_fails(tmp_path):
    texts, y = corpus()
    pipe = Pipeline([("features", make_featurizer("word1")), ("classifier", Untrusted())]).fit(texts, y)
    with pytest.raises(NatprintsError, match="untrusted type"):
        save_attributor(tmp_path / "x", Attributor(pipe, ["a", "b", "c"]), {})


def test_temperature_and_threshold():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4000, 4)) * 3
    y = np.array([rng.choice(4, p=np.exp(row) / np.exp(row).sum()) for row in logits])
    # Probabilities made overconfident by T = 1/2.5: the fit undoes it.
    overconfident = apply_temperature(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 1 / 2.5)
    assert fit_temperature(overconfident, y) == pytest.approx(2.5, rel=0.1)
    best = rng.uniform(size=1000)
    threshold = choose_threshold(best, 0.05)
    assert np.mean(best < threshold) == pytest.approx(0.05, abs=0.005)
    assert choose_threshold(best, 0.0) == 0.0


def test_attribute_reports_unknown_below_threshold(tmp_path):
    directory, texts = _saved(tmp_path)
    confident = attribute(texts[:3], directory, top_k=2)
    assert all(len(p.top) == 2 and not p.unknown for p in confident)
    assert confident[0].label == "a"
    strict = load_attributor(directory)
    strict.threshold = 1.01
    preds = strict.predict(texts[:3])
    assert all(p.unknown and p.label == "unknown" and p.best_model in {"a", "b", "c"} for p in preds)


def test_a_single_texts_range_is_split_conformal_with_at_most_alpha_of_own_texts_outside():
    """One text's range is the floor((n + 1) alpha/2)-th and ceil((n + 1)(1 - alpha/2))-th smallest of
    the n own scores (unbounded where the rank falls outside), and an own text leaves it at most alpha
    of the time however small n is; the interpolated quantile it replaces leaves it more often."""
    from natprints.attribution.attributor import conformal_range

    assert conformal_range(np.arange(1.0, 151.0), 0.05) == (3.0, 148.0)  # ranks floor(3.775), ceil(147.2)
    assert conformal_range(np.arange(1.0, 39.0), 0.05) == (-math.inf, math.inf)  # 38 < 2 / 0.05 - 1
    assert conformal_range(np.arange(1.0, 40.0), 0.05) == (1.0, 39.0)
    rng = np.random.default_rng(0)
    own, new = rng.normal(size=(4000, 150)), rng.normal(size=(4000, 150))
    ranges = np.array([conformal_range(row, 0.05) for row in own])
    outside = (new < ranges[:, :1]) | (new > ranges[:, 1:])
    assert outside.mean() == pytest.approx(6 / 151, abs=0.002)  # 3 of 151 ranks a side: at most alpha
    low, high = np.quantile(own, [0.025, 0.975], axis=1)  # order statistic 4.725 a side: 9.45 / 151
    assert ((new < low[:, None]) | (new > high[:, None])).mean() == pytest.approx(9.45 / 151, abs=0.002)


def test_the_outsider_test_decides_unknown_and_survives_a_save(tmp_path):
    """An attributor with an outsider test: its detector (a binary char n-gram logistic regression in
    the fast path's form) reproduces scikit-learn's decision function; a pool is `unknown` exactly when
    its mean score leaves the two-sided alpha range of pools of its best label's own calibration texts;
    pooled and single verdicts read it, not the probability threshold, before and after a save."""
    from natprints.attribution.attributor import OutsiderTest
    from natprints.attribution.fastpath import export_ngram_logistic
    from natprints.attribution.likelihood import attribute_pooled

    texts, y = corpus()
    other = [" ".join(np.random.default_rng(i).choice(["zq", "xv", "kj", "the"], size=20)) for i in range(30)]
    detector = Pipeline([("features", features.char_tfidf((1, 4), None)), ("classifier", LogisticRegression())])
    detector.fit(texts + other, np.r_[np.zeros(len(texts)), np.ones(len(other))])
    fields, arrays = export_ngram_logistic(detector, binary=True)
    assert export_ngram_logistic(detector) is None  # two classes: not the attributor's softmax fast path
    test = OutsiderTest(fields, arrays, np.zeros(0), y, alpha=0.1)
    test = OutsiderTest(fields, arrays, test.scores(texts), y, alpha=0.1)
    np.testing.assert_allclose(test.scores(other), detector.decision_function(other), rtol=1e-6)
    low, high = test.limits(0, 1)
    mine = test.own[y == 0]  # 30 texts at alpha 0.1: ranks floor(31 * 0.05) = 1 and ceil(31 * 0.95) = 30
    assert (low, high) == (mine.min(), mine.max()) and test.limits(0, 1) == (low, high)
    assert test.blind(1) == [] and replace(test, alpha=0.05).blind(1) == [0, 1, 2]  # 39 texts needed
    assert replace(test, alpha=0.05).blind(4) == []  # a pool's bootstrap range is always bounded
    assert test.statistic(np.array([high + 1.0]), 0) == pytest.approx(1.0)
    assert test.statistic(np.array([(low + high) / 2]), 0) < 0
    directory, known = _saved(tmp_path)
    model = load_attributor(directory)
    model.outsider = test
    model.threshold = 1.01  # would call everything unknown; the outsider test decides instead
    save_attributor(directory, model, {})
    again = load_attributor(directory, light=True)
    assert again.outsider is not None and again.outsider.limits(0, 4) == test.limits(0, 4)
    for m in (model, again):
        own, strange = m.predict(texts[:10]), m.predict(other[:10])
        assert np.mean([p.unknown for p in own]) <= 0.2 and all(p.unknown for p in strange)
        assert attribute_pooled(other[:4], m).unknown and not attribute_pooled(texts[:4], m).unknown
    # at alpha 0.05 the 30 calibration texts of each label are too few to call one text `unknown`:
    # `attribute` says so once, and a pool still can be
    model.outsider = replace(test, alpha=0.05)
    save_attributor(directory, model, {})
    (tmp_path / "t.txt").write_text(other[0])
    from natprints.attribution.verdicts import Request, attribute_files

    lines, errors = [], []
    request = Request(attributor=directory)
    assert attribute_files([str(tmp_path / "t.txt")] * 2, request, out=lines.append, err=errors.append) == 0
    assert errors == [
        "warning: the outsider test has fewer than 39 calibration texts of a, b, c: a single text attributed "
        "to them is never `unknown` at alpha 0.05 (--pool can be)"
    ]
    verdicts = "\n".join(lines).splitlines()
    assert len(verdicts) == 2 and not any(line.split(": ", 1)[1].startswith("unknown") for line in verdicts)
    assert attribute_pooled(other[:4], load_attributor(directory)).unknown
