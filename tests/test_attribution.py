"""Attribution experiments on a small synthetic generated corpus (no zoo, no GPU, a few seconds).

The builder below writes what the generator stage would: one parquet per "model" with texts whose
word distributions differ per model, a null-control file drawn from the base model's distribution
with another seed, the generated manifest, and a word-level tokenizer.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import confusion_matrix, f1_score

from natprints import conditions as adata
from natprints import records as rec
from natprints.artifacts import Manifest, sha256_text
from natprints.attribution import experiments as ex
from natprints.attribution import features, grid
from natprints.config import load_config
from natprints.errors import NatprintsError
from natprints.stats import binomial_p_value, wilson_interval

VOCAB = [f"w{i:03d}" for i in range(240)] + [",", ".", "the", "of", "and"]
MODELS = {  # model id -> how many words it boosts (0 = the base distribution)
    "base": 0,
    "seed-1": 1,
    "seed-2": 2,
    "lr-0.002": 3,
}
CONDITIONS = {"seed": ["base", "seed-1", "seed-2"], "lr": ["base", "lr-0.002"], "all": list(MODELS)}
N_PROMPTS = 80
N_TOKENS = 24


class FakeEncoder:
    """Stands in for the sentence encoder: hashed bag of words, 16 dims, unit length."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, **_):
        self.calls += 1
        out = np.zeros((len(texts), 16), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.split():
                out[i, int(sha256_text(word)[:4], 16) % 16] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def _distribution(boost: int) -> np.ndarray:
    p = 1.0 / np.arange(1, len(VOCAB) + 1) ** 1.1
    if boost:
        rng = np.random.default_rng(100 + boost)
        p[rng.choice(len(VOCAB) - 5, size=12, replace=False)] *= 6.0
    return p / p.sum()


def _texts(model_id: str, boost: int, seed: int, n_prompts: int = N_PROMPTS, n_tokens: int = N_TOKENS):
    rng = np.random.default_rng(seed * 1000 + sum(map(ord, model_id)))
    p = _distribution(boost)
    rows = []
    for j in range(n_prompts):
        ids = rng.choice(len(VOCAB), size=n_tokens, p=p).tolist()
        rows.append(
            {
                "sample_id": sha256_text(f"{model_id}/{j}/{seed}")[:16],
                "model_id": model_id,
                "prompt_id": f"p{j:04d}",
                "prompt": f"prompt {j}",
                "text": " ".join(VOCAB[i] for i in ids),
                "n_tokens": n_tokens,
                "token_ids": ids,
                "sample_index": 0,
                "sampling_seed": seed,
                "temperature": 1.0,
                "top_k": 0,
                "top_p": 1.0,
                "new_tokens": n_tokens,
            }
        )
    return pd.DataFrame(rows)


CONFIG = """
[run]
name = "synth"
[attribution]
featurizers = {featurizers}
classifiers = ["logreg", "svm", "xgb", "mlp"]
max_features = 2000
evidence_tokens = [4, 12, 0]
evidence_train_fractions = [0.5, 1.0]
top_ngrams = 5
"""


def make_run(
    root: Path,
    featurizers: list[str] | None = None,
    models: dict[str, int] | None = None,
    conditions: dict[str, list[str]] | None = None,
    n_prompts: int = N_PROMPTS,
    n_tokens: int = N_TOKENS,
) -> Path:
    """Write a synthetic generated run under ``root`` (use as NATPRINTS_HOME); returns the config path."""
    models_boost = models or MODELS
    conditions = conditions or CONDITIONS
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    featurizers = featurizers or ["word1", "word12", "char14", "embed", "union"]
    config = root / "synth.toml"
    config.write_text(CONFIG.format(featurizers=json.dumps(featurizers)), encoding="utf-8")
    gen = root / "data" / "generated" / "synth"
    (gen / "null").mkdir(parents=True, exist_ok=True)
    models = {}
    for model_id, boost in models_boost.items():
        _texts(model_id, boost, 0, n_prompts, n_tokens).to_parquet(gen / f"{model_id}.parquet")
        conds = [c for c, ids in conditions.items() if model_id in ids]
        models[model_id] = {"conditions": conds, "file": f"{model_id}.parquet"}
    _texts("base", 0, 1, n_prompts, n_tokens).to_parquet(gen / "null" / "base.parquet")
    Manifest(gen, "generated corpora").write(
        "synth",
        {
            "base_model": "base",
            "models": models,
            "null_control": {"model_id": "base", "file": "null/base.parquet"},
            "conditions": conditions,
        },
        [*(m["file"] for m in models.values()), "null/base.parquet"],
    )
    tok_dir = root / "data" / "corpus" / "synth" / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="w000"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer.save(str(tok_dir / "tokenizer.json"))
    return config


@pytest.fixture(scope="module")
def fake_encoder():
    encoder = FakeEncoder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(features, "_load_encoder", lambda name, device: encoder)
        yield encoder


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory, fake_encoder):
    """One experiments run over the synthetic corpus, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NATPRINTS_HOME", str(root))
        cfg = load_config(make_run(root))
        ex.run_experiments(cfg, progress=False, log=lambda m: None)
        yield cfg


def _records(cfg):
    return rec.load_records(cfg.paths.reports)


def test_split_is_by_prompt_and_deterministic():
    prompts = [f"p{i}" for i in range(40)] * 3
    split = adata.split_prompts(prompts, 0.25, 0.15, seed=0)
    assert split == adata.split_prompts(prompts, 0.25, 0.15, seed=0)
    assert len(split) == 40
    counts = {s: sum(v == s for v in split.values()) for s in ("train", "cal", "test")}
    assert counts == {"train": 24, "cal": 6, "test": 10}
    assert split != adata.split_prompts(prompts, 0.25, 0.15, seed=1)


def test_fitting_never_sees_test_rows(tmp_path, monkeypatch, fake_encoder):
    """Every text a featurizer or classifier is fit on comes from training prompts only."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    seen: list[str] = []
    fit, fit_transform = TfidfVectorizer.fit, TfidfVectorizer.fit_transform

    def recording_fit(self, X, y=None):
        seen.extend(X)
        return fit(self, X, y)

    def recording_fit_transform(self, X, y=None):
        seen.extend(X)
        return fit_transform(self, X, y)

    monkeypatch.setattr(TfidfVectorizer, "fit", recording_fit)
    monkeypatch.setattr(TfidfVectorizer, "fit_transform", recording_fit_transform)
    monkeypatch.setenv("NATPRINTS_HOME", str(tmp_path))
    cfg = load_config(make_run(tmp_path, ["word1"]))
    # the run's split only: the repeated splits are other partitions (test_repeated_splits_...)
    cfg = cfg.model_copy(update={"attribution": cfg.attribution.model_copy(update={"splits": 1})})
    ex.run_experiments(cfg, progress=False, log=lambda m: None)
    records = rec.load_records(cfg.paths.reports)
    assert not [r for r in records if r["kind"] == "split_repeat"]
    frames = adata.load_conditions(cfg)
    test_ids = {sid for r in records if r["kind"] == "split" for sid in r["test_sample_ids"]}
    texts = pd.concat([d.frame for d in frames.values()])
    test_texts = set(texts[texts["sample_id"].isin(test_ids)]["text"])
    assert seen and test_texts
    assert not test_texts & set(seen)
    split = [r for r in records if r["kind"] == "split"]
    for r in split:  # and no prompt is on both sides
        assert r["prompts"]["test"] > 0 and r["prompts"]["train"] > 0
    prompts = {c: d.frame.set_index("sample_id")["prompt_id"] for c, d in frames.items()}
    for r in split:
        test_prompts = set(prompts[r["condition"]].loc[r["test_sample_ids"]])
        train_prompts = set(prompts[r["condition"]]) - test_prompts
        assert test_prompts.isdisjoint(train_prompts)


def test_results_cover_grid_and_table_matches_records(synth_run):
    cfg = synth_run
    records = _records(cfg)
    pipelines = [r for r in records if r["kind"] == "pipeline"]
    conditions = {r["condition"] for r in pipelines}
    assert conditions == {"seed", "lr", "all", "null_control"}
    assert len(pipelines) == 4 * 5 * 4
    with open(cfg.paths.reports / "accuracy.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(pipelines)
    for row in rows:
        rec = next(
            r
            for r in pipelines
            if (r["condition"], r["featurizer"], r["classifier"])
            == (row["condition"], row["featurizer"], row["classifier"])
        )
        # Recompute every table value from the stored predictions.
        y_true, y_pred = np.array(rec["y_true"]), np.array(rec["y_pred"])
        k = len(rec["labels"])
        correct = int((y_true == y_pred).sum())
        assert int(row["n_test"]) == len(y_true) and int(row["n_classes"]) == k
        assert float(row["chance"]) == pytest.approx(1 / k)
        assert float(row["accuracy"]) == pytest.approx(correct / len(y_true), rel=1e-5)
        low, high = wilson_interval(correct, len(y_true))
        assert float(row["ci_low"]) == pytest.approx(low, rel=1e-5, abs=1e-9)
        assert float(row["ci_high"]) == pytest.approx(high, rel=1e-5)
        assert float(row["p_value"]) == pytest.approx(binomial_p_value(correct, len(y_true), 1 / k), rel=1e-4)
        f1 = f1_score(y_true, y_pred, labels=list(range(k)), average="macro", zero_division=0)
        assert float(row["macro_f1"]) == pytest.approx(f1, rel=1e-5)
        confusion = confusion_matrix(y_true, y_pred, labels=list(range(k)))
        assert rec["confusion"] == confusion.tolist()


def test_fingerprints_found_and_null_control_at_chance(synth_run):
    table = rec.accuracy_table(_records(synth_run))
    best = table[table["best"]].set_index("condition")
    assert set(best.index) == {"seed", "lr", "all", "null_control"}
    for condition in ("seed", "lr", "all"):
        row = best.loc[condition]
        assert row["ci_low"] > row["chance"], condition  # real differences are detected
        assert row["p_value"] < 0.01
    null = table[
        (table["condition"] == "null_control") & (table["featurizer"] == "word1") & (table["classifier"] == "logreg")
    ]
    assert len(null) == 1
    row = null.iloc[0]
    assert row["n_classes"] == 2 and row["chance"] == 0.5
    assert row["ci_low"] <= 0.5 <= row["ci_high"]


def test_best_pipeline_is_chosen_on_the_calibration_split(synth_run):
    grid = [r for r in _records(synth_run) if r["kind"] == "pipeline" and r.get("cal_accuracy") is not None]
    for condition in {r["condition"] for r in grid}:
        rows = [r for r in grid if r["condition"] == condition]
        (best,) = [r for r in rows if r["best"]]
        # the highest calibration accuracy, ties to the earlier (simpler) pipeline of the grid order
        assert best["cal_accuracy"] == max(r["cal_accuracy"] for r in rows), condition
        first = next(r for r in rows if r["cal_accuracy"] == best["cal_accuracy"])
        assert best["pipeline"] == first["pipeline"] and best["selected_by"] == "calibration"
        assert best["n_cal"] > 0


def test_best_record_never_looks_at_the_test_accuracy():
    def row(feat, clf, test, cal):
        return {"featurizer": feat, "classifier": clf, "accuracy": test, "macro_f1": test, "cal_accuracy": cal}

    rows = [row("word1", "logreg", 0.50, 0.40), row("word12", "svm", 0.90, 0.45), row("char14", "nb", 0.60, 0.55)]
    assert grid.best_record(rows)["featurizer"] == "char14"  # not word12, the test-set maximum
    tie = [row("char14", "svm", 0.5, 0.5), row("word12", "logreg", 0.9, 0.5)]
    assert grid.best_record(tie)["featurizer"] == "word12"  # ties go to the earlier pipeline of the grid
    # without calibration texts: the baseline, fixed in advance
    blind = [{**r, "cal_accuracy": None} for r in rows]
    assert (grid.best_record(blind)["featurizer"], grid.best_record(blind)["classifier"]) == grid.BASELINE


def test_a_failed_null_control_is_flagged_and_the_test_maximum_corrected(synth_run):
    from natprints.reports.attribution import _null_section
    from natprints.reports.tables import test_maximum

    records = _records(synth_run)
    table = rec.accuracy_table(records)
    null = table[(table["condition"] == "null_control") & ~table["white_box"].astype(bool)]
    top = test_maximum(null)
    assert top["accuracy"] == null["accuracy"].max()
    assert top["p_bonferroni"] == pytest.approx(min(1.0, top["p_value"] * len(null)))
    text, facts = _null_section(table, records)
    assert not facts["failed"] and "The null control failed" not in text
    # a chosen pipeline whose interval excludes chance fails the control, loudly
    chosen = table.index[(table["condition"] == "null_control") & table["best"].astype(bool)]
    failing = table.copy()
    failing.loc[chosen, ["accuracy", "ci_low", "ci_high"]] = [0.75, 0.62, 0.85]
    text, facts = _null_section(failing, records)
    assert facts["failed"] and "**The null control failed**" in text and "0.750" in text


def test_evidence_explanations_open_set_attributor_records(synth_run):
    records = _records(synth_run)
    evidence = [r for r in records if r["kind"] == "evidence" and r["condition"] == "all"]
    roles = {r["role"] for r in evidence}
    assert "baseline" in roles and "best" in roles
    tokens = sorted(r["value"] for r in evidence if r["axis"] == "tokens" and r["role"] == "baseline")
    assert tokens == [0, 4, 12]
    fractions = sorted(r["value"] for r in evidence if r["axis"] == "train_fraction" and r["role"] == "baseline")
    assert fractions == [0.5, 1.0]
    by_tokens = {r["value"]: r for r in evidence if r["axis"] == "tokens" and r["role"] == "baseline"}
    assert by_tokens[4]["accuracy"] <= by_tokens[0]["accuracy"] + 0.05  # fewer tokens, less evidence
    explained = [r for r in records if r["kind"] == "explanation" and r["condition"] == "all"]
    assert {r["model_id"] for r in explained} == set(MODELS)
    seed2 = next(r for r in explained if r["model_id"] == "seed-2")
    assert len(seed2["ngrams"]) == 5
    # The top n-grams of a boosted model are words it uses more often than the others.
    assert np.mean([g["share_model"] > g["share_rest"] for g in seed2["ngrams"]]) >= 0.8
    open_set = [r for r in records if r["kind"] == "open_set"]
    assert len(open_set) == 3 and all(r["condition"] == "all" for r in open_set)
    for r in open_set:
        assert 0 <= r["known_rejected"] <= 1 and 0 <= r["unknown_rejected"] <= 1
    attributors = {r["condition"]: r for r in records if r["kind"] == "attributor"}
    assert set(attributors) == {"seed", "lr", "all"}
    for condition in attributors:
        assert (synth_run.paths.attributors / condition / "manifest.json").is_file()


def test_rerun_is_idempotent_and_detects_changes(synth_run, monkeypatch):
    cfg = synth_run
    monkeypatch.setenv("NATPRINTS_HOME", str(cfg.paths.root.resolve()))
    results = cfg.paths.reports / "results.jsonl"
    before = results.read_bytes()
    assert ex.experiments_up_to_date(cfg)
    monkeypatch.setattr(ex, "run_condition", lambda *a, **k: pytest.fail("recomputed"))
    messages = []
    ex.run_experiments(cfg, progress=False, log=messages.append)
    assert results.read_bytes() == before and "up to date" in messages[0]
    # An input changed behind its manifest's back is refused, naming the file, never read.
    path = cfg.paths.generated / "lr-0.002.parquet"
    frame = pd.read_parquet(path)
    frame.loc[0, "text"] = frame.loc[0, "text"] + " w001"
    original = path.read_bytes()
    frame.to_parquet(path)
    try:
        with pytest.raises(NatprintsError, match="lr-0.002.parquet does not match its manifest hash"):
            ex.experiments_up_to_date(cfg)
    finally:
        path.write_bytes(original)
    assert ex.experiments_up_to_date(cfg)


def test_a_finished_condition_is_kept_and_an_edited_one_redone(synth_run, monkeypatch, tmp_path):
    """A stage interrupted after some conditions keeps them (their records' manifest verifies); records
    edited behind the manifest's back are redone, never read."""
    import shutil

    expected = (synth_run.paths.reports / "results.jsonl").read_bytes()
    home = tmp_path / "home"
    shutil.copytree(synth_run.paths.root, home)
    monkeypatch.setenv("NATPRINTS_HOME", str(home))  # the config's paths follow the home
    cfg = synth_run
    results, stage_manifest = cfg.paths.reports / "results.jsonl", cfg.paths.reports / "experiments.json"
    stage_manifest.unlink()  # as if the stage had stopped before writing its own manifest
    keys = ex.condition_keys(cfg, adata.load_conditions(cfg))
    cached = ex._condition_cache(cfg, "seed")
    assert cached.read()["key"] == keys["seed"] and set(cached.read()["files"]) == {"seed.json"}
    redone: list[str] = []
    real = ex.run_condition

    def counted(setup, data, views):
        redone.append(data.name)
        return real(setup, data, views)

    monkeypatch.setattr(ex, "run_condition", counted)
    ex.run_experiments(cfg, progress=False, log=lambda m: None)
    assert redone == [] and results.read_bytes() == expected  # every condition kept
    records = cached.directory / "seed.json"
    records.write_text(records.read_text() + " ")  # still JSON, no longer what the manifest hashed
    stage_manifest.unlink()
    ex.run_experiments(cfg, progress=False, log=lambda m: None)
    assert redone == ["seed"] and results.read_bytes() == expected


def test_report_section_renders_from_records(synth_run):
    from natprints.reports.attribution import render_section
    from natprints.reports.tables import headline_table

    cfg = synth_run
    markdown = render_section(cfg)
    figures = cfg.paths.reports / "figures"
    for name in [
        "confusion_seed.png",
        "confusion_lr.png",
        "confusion_all.png",
        "evidence_tokens.png",
        "evidence_train.png",
    ]:
        assert (figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"](figures/{name})" in markdown
    pngs = {p.name: p.read_bytes() for p in figures.glob("*.png")}
    assert render_section(cfg) == markdown  # rendering is deterministic, figures included
    assert {p.name: p.read_bytes() for p in figures.glob("*.png")} == pngs
    for row in headline_table(_records(cfg)).itertuples():
        assert f"{row.accuracy:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}]" in markdown
        assert f"| `{row.condition}` | {row.n_classes} |" in markdown
    assert markdown.count("**") >= 2 * 4  # the best pipeline of each condition in bold
    for heading in [
        "### Null control",
        "### Evidence curves",
        "### Open set",
        "### Findings",
        "### What sets each model apart",
    ]:
        assert heading in markdown
    assert all(f"`{m}`" in markdown for m in MODELS)


def test_same_config_gives_identical_records_and_attributors(synth_run, tmp_path, monkeypatch):
    monkeypatch.setenv("NATPRINTS_HOME", str(tmp_path))
    cfg = load_config(make_run(tmp_path))
    ex.run_experiments(cfg, progress=False, log=lambda m: None)
    first, second = synth_run.paths, cfg.paths
    for name in ("results.jsonl", "accuracy.csv"):
        assert (second.reports / name).read_bytes() == (first.reports / name).read_bytes(), name
    for condition in ("seed", "lr", "all"):
        for name in ("pipeline.skops", "attributor.json"):
            a = (first.attributors / condition / name).read_bytes()
            assert (second.attributors / condition / name).read_bytes() == a, (condition, name)


def test_summary_json_restates_the_headline_table(synth_run):
    from natprints.reports.summary import write_summary
    from natprints.reports.tables import headline_table

    path = write_summary(synth_run)
    summary = json.loads(path.read_text())
    assert summary["config_hash"] == synth_run.hash() and summary["run"] == synth_run.run.name
    head = headline_table(_records(synth_run)).set_index("condition")
    assert set(summary["conditions"]) == set(head.index)
    for condition, entry in summary["conditions"].items():
        row = head.loc[condition]
        assert entry["best"]["pipeline"] == row["best"] and entry["best"]["selected_on"] == "calibration split"
        assert entry["best"]["accuracy"] == pytest.approx(row["accuracy"])
        assert entry["best"]["ci"] == pytest.approx([row["ci_low"], row["ci_high"]])
        assert entry["baseline"]["accuracy"] == pytest.approx(row["baseline"])
        assert entry["test_maximum"]["accuracy"] >= entry["best"]["accuracy"]
        assert entry["length_control"]["leaks"] is False
        assert "ceiling" not in entry  # the synthetic run has no likelihood scores
    assert summary["conditions"]["null_control"]["verdict"] == "at chance"
    assert summary["conditions"]["all"]["open_set_attributor"]["held_out_models"] == 3
    assert "lineage" not in summary


def test_short_labels_keep_what_tells_models_apart():
    from natprints.reports.figures import short_labels

    ids = ["s-lr2e-3-bs32-init1-data1", "s-lr2e-3-bs32-init2-data2", "s-lr2e-3-bs32-init3-data3"]
    assert short_labels(ids) == (["init1-data1", "init2-data2", "init3-data3"], "s-lr2e-3-bs32")
    mixed = ["s-lr2e-3-bs32-init0-data0", "s-lr4e-3-bs32-init0-data0", "m-lr2e-3-bs32-init0-data0"]
    assert short_labels(mixed) == (["s-lr2e-3", "s-lr4e-3", "m-lr2e-3"], "bs32-init0-data0")
    # ids of different shapes (another family's prefix) lose what they share at both ends; an id that
    # would be left empty stays whole
    families = [
        "bpe-1024-gptneox-s-lr2e-3-bs32-init0-data0",
        "bpe-16384-gpt2-s-lr2e-3-bs32-init0-data0",
        "s-lr2e-3-bs32-init0-data0",
        "unigram-4096-qwen2-s-lr2e-3-bs32-init0-data0",
    ]
    assert short_labels(families) == (
        ["bpe-1024-gptneox", "bpe-16384-gpt2", "s-lr2e-3-bs32-init0-data0", "unigram-4096-qwen2"],
        "s-lr2e-3-bs32-init0-data0",
    )
    assert short_labels(["run-a-gpt2-s-x", "run-a-s-x"]) == (["gpt2", "run-a-s-x"], "run-a-…-s-x")
    assert short_labels(["gpt2-xs", "llama"]) == (["gpt2-xs", "llama"], "")


def test_confusion_with_unknown_column_and_calibration_error(synth_run):
    from natprints.reports.tables import confusion_panels, expected_calibration_error

    records = _records(synth_run)
    for attributor in [r for r in records if r["kind"] == "attributor"]:
        best = next(
            r for r in records if r["kind"] == "pipeline" and r["best"] and r["condition"] == attributor["condition"]
        )
        ((title, matrix, columns),) = confusion_panels(best, None, attributor)
        k = len(best["labels"])
        assert matrix.shape == (k, k + 1) and columns[-1] == "unknown"
        confidence = np.array(attributor["confidence"])
        assert matrix[:, k].sum() == (confidence < attributor["threshold"]).sum()
        assert matrix.sum() == attributor["n_test"]
        assert matrix.sum(axis=1).tolist() == np.bincount(attributor["y_true"], minlength=k).tolist()
        # accepted texts: the diagonal counts exactly the accepted, correct verdicts
        right = (np.array(attributor["y_true"]) == np.array(attributor["y_pred"])) & ~(
            confidence < attributor["threshold"]
        )
        assert np.trace(matrix[:, :k]) == right.sum()
        # ECE by hand, 10 equal bins of the top probability
        correct = np.array(attributor["y_true"]) == np.array(attributor["y_pred"])
        ece = 0.0
        for b in range(10):
            lo, hi = b / 10, (b + 1) / 10
            inside = (confidence >= lo) & ((confidence < hi) if b < 9 else (confidence <= hi))
            if inside.any():
                ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
        assert expected_calibration_error(attributor) == pytest.approx(ece)
    from natprints.reports.attribution import render_section

    markdown = render_section(synth_run)
    assert "### Calibration of the saved attributors" in markdown and "unknown" in markdown
    assert (synth_run.paths.reports / "figures" / "reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_repeated_splits_refit_on_their_own_training_texts(synth_run):
    from natprints.reports.tables import split_table

    records = _records(synth_run)
    frames = adata.load_conditions(synth_run)
    repeats = [r for r in records if r["kind"] == "split_repeat"]
    assert len(repeats) == 4 * len(frames)  # splits = 5: the run's and four more, per condition
    setup = grid.Setup(synth_run, split={}, tokenizer=None, progress=False)
    s = synth_run.attribution
    for r in repeats:
        assert r["split_seed"] in (1, 2, 3, 4) and "ceiling" not in r  # no likelihood scores here
        data = frames[r["condition"]]
        fractions = (s.test_fraction, adata.CALIBRATION_FRACTION)
        split = adata.split_prompts(data.frame["prompt_id"], *fractions, r["split_seed"])
        parts = adata.split_parts(data, split)
        assert (r["n_train"], r["n_test"]) == (len(parts["train"]), len(parts["test"]))
        assert set(parts["train"]["prompt_id"]).isdisjoint(parts["test"]["prompt_id"])
        feat, clf = r["baseline"]["pipeline"].split("+")
        predicted = grid.fit_predict(setup, feat, clf, parts["train"], parts["test"])[1]
        assert r["baseline"]["accuracy"] == pytest.approx((predicted == parts["test"]["label"].to_numpy()).mean())
        chosen = next(p for p in records if p["kind"] == "pipeline" and p["best"] and p["condition"] == r["condition"])
        assert r["best"]["pipeline"] == chosen["pipeline"]
    table = split_table(records)
    assert set(table["role"]) == {"best", "baseline"} and (table["splits"] == 5).all()
    for row in table.itertuples():
        values = [row.first] + [r[row.role]["accuracy"] for r in repeats if r["condition"] == row.condition]
        assert row.mean == pytest.approx(np.mean(values)) and row.sd == pytest.approx(np.std(values, ddof=1))


def test_every_pipeline_of_the_registry_belongs_to_one_approach():
    """The report's approaches come from the registry: a featurizer or pipeline added without one would
    drop out of the comparison silently."""
    from natprints.attribution.estimators import compatible
    from natprints.attribution.whitebox import APPROACHES, COMBINED, ENCODER, HEAD, REFERENCE, approach
    from natprints.config import CLASSIFIERS, FEATURIZERS

    kinds = {(f, c): approach(f, c) for f in FEATURIZERS for c in CLASSIFIERS if compatible(f, c)} | {
        pair: approach(*pair) for pair in (REFERENCE, HEAD, ENCODER, COMBINED)
    }
    assert None not in kinds.values()
    assert set(kinds.values()) == set(APPROACHES)
    assert kinds[("tok13", "nb")] == kinds[("word1", "nb")] == "naive Bayes on n-grams (generative)"
    assert kinds[("union", "svm")] == kinds[("embed", "xgb")] != kinds[("word12", "svm")]
    assert approach("likelihood", "bayes") is None and approach("length", "logreg") is None
    assert APPROACHES.index("naive Bayes on n-grams (generative)") == 2  # after the n-grams it reads


def test_every_record_follows_its_kind_and_an_edited_one_is_refused(synth_run):
    """results.jsonl has one schema: each record has its kind's fields and no others, on writing and on
    reading (a record without a field would have surfaced as a KeyError deep in a report)."""
    records = _records(synth_run)
    kinds = {r["kind"] for r in records}
    assert {"pipeline", "evidence", "length_control", "split", "split_repeat", "attributor"} <= kinds
    assert all(rec.record_problem(r) is None for r in records)
    assert rec.record_problem({"kind": "pipeline", "condition": "seed"}).startswith("pipeline record lacks accuracy")
    assert rec.record_problem({"kind": "verdict"}) == "unknown record kind 'verdict'"
    path = synth_run.paths.reports / rec.RESULTS_FILE
    lines = path.read_text().splitlines()
    edited = json.loads(lines[0]) | {"note": 1}
    with pytest.raises(NatprintsError, match=r"^record 1 breaks the results schema: .* record has unknown note$"):
        rec.write_results(synth_run.paths.reports, [edited])  # refused before anything is written
    assert path.read_text().splitlines() == lines
    path.write_text("\n".join([json.dumps(edited), *lines[1:]]) + "\n")
    try:
        with pytest.raises(NatprintsError, match=r"line 1: .* record has unknown note \(rerun"):
            rec.load_records(synth_run.paths.reports)
    finally:
        path.write_text("\n".join(lines) + "\n")


def test_the_experiments_command_descends_into_the_stage(synth_run):
    """Following the run's config from the `experiments` command into the stage: the command layer
    gets at most 3 values back from the library (here 2: the config and the stage's result); the stage
    itself gathers its inputs and computes its keys, once."""
    import os
    import sys

    from typer.testing import CliRunner

    from natprints.cli import app
    from natprints.config import Config

    stack: list[tuple[str, str, bool]] = []
    returns: list[str] = []
    followed: list[str] = []

    def profile(frame, event, arg):
        if event not in ("call", "return") or not frame.f_globals.get("__name__", "").startswith("natprints"):
            return
        module, code = frame.f_globals["__name__"], frame.f_code
        if event == "call":
            caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
            stack.append((module, code.co_name, caller))
            names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
            # calls that take the run's config, its own accessors aside
            if module != "natprints.config" and any(isinstance(frame.f_locals.get(n), Config) for n in names):
                followed.append(f"{module}.{code.co_name}")
            return
        module, name, caller = stack.pop()
        if arg is not None and caller.startswith("natprints.cli") and not module.startswith("natprints.cli"):
            returns.append(f"{module}.{name}")

    config = Path(os.environ["NATPRINTS_HOME"]) / "synth.toml"
    sys.setprofile(profile)
    try:
        result = CliRunner().invoke(app, ["experiments", "--config", str(config)])
    finally:
        sys.setprofile(None)
    assert result.exit_code == 0, result.output
    assert returns == ["natprints.config.load_config", "natprints.attribution.experiments.run"]
    assert "natprints.attribution.experiments.condition_keys" in followed
    assert followed.count("natprints.attribution.experiments.condition_keys") == 1  # keys computed once
