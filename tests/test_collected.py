"""`natprints collected`: attribution on a labelled corpus the user brings, in four input formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from natprints.attribution.collected import (
    COLLECTED_MANIFEST,
    collected_conditions,
    collected_config,
    read_collected,
    run_collected,
)
from natprints.attribution.grid import length_features
from natprints.cli import app
from natprints.config import NULL_CONDITION, load_config, use_home
from natprints.errors import NatprintsError
from natprints.reports.index import write_collected_index
from tests.conftest import run_cli

SOURCES = ("alpha", "beta", "gamma")
VOCAB = [f"w{i:02d}" for i in range(60)]  # one length: only the words differ
CONFIG = """
[run]
name = "collected-test"
threads = 1

[attribution]
featurizers = ["word1", "char14"]
classifiers = ["logreg", "nb"]
test_fraction = 0.3
evidence_tokens = [5, 0]
evidence_train_fractions = [0.5, 1.0]
top_ngrams = 3
"""


def _corpus(groups: int = 30, lengths: dict[str, int] | None = None) -> pd.DataFrame:
    """Three sources that prefer different words, every source continuing every group (prompt)."""
    rng = np.random.default_rng(7)
    rows = []
    for k, source in enumerate(SOURCES):
        weights = np.ones(len(VOCAB))
        weights[k * 10 : k * 10 + 10] = 4.0  # each source's favourite words
        weights /= weights.sum()
        for g in range(groups):
            n = (lengths or {}).get(source, 0) or int(rng.integers(20, 30))
            rows.append({"text": " ".join(rng.choice(VOCAB, n, p=weights)), "source": source, "group": f"p{g:03d}.txt"})
    return pd.DataFrame(rows)


def _write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")), encoding="utf-8")
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        for r in frame.to_dict("records"):
            (path / r["source"]).mkdir(parents=True, exist_ok=True)
            (path / r["source"] / r["group"]).write_text(r["text"], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "collected.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


def test_four_formats_give_the_same_tables_and_a_working_attributor(tmp_path: Path, config: Path) -> None:
    frame = _corpus()
    results = {}
    for name in ("texts.jsonl", "texts.csv", "texts.parquet", "texts"):
        home = tmp_path / name.replace(".", "_")
        (home / name if "." not in name else home).mkdir(parents=True)
        corpus = _write(frame, home / name)
        if name.endswith(".jsonl"):  # the command, as a user runs it; the other formats through the library
            proc = run_cli("collected", str(corpus), "--name", "mine", "--config", str(config), home=home)
            assert "wrote" in proc.stdout and "length only" in proc.stdout
        else:
            with use_home(home):
                run_collected(load_config(config), corpus, name="mine", progress=False)
        results[name] = (home / "reports" / "mine" / "results.jsonl").read_bytes()
    assert len(set(results.values())) == 1, "the four formats gave different records"
    records = [json.loads(line) for line in results["texts.jsonl"].decode().splitlines()]
    best = next(r for r in records if r["kind"] == "pipeline" and r["best"] and r["condition"] == "mine")
    assert best["labels"] == list(SOURCES)
    assert best["n_test"] == 27 and best["accuracy"] > 0.8  # 9 test groups x 3 sources; clearly separable
    length = {r["condition"]: r for r in records if r["kind"] == "length_control"}
    assert set(length) == {"mine", NULL_CONDITION}
    assert length["mine"]["features"] == ["characters", "words", "bytes"]
    assert not length["mine"]["leaks"] and length["mine"]["ci_low"] <= 1 / 3
    null = length[NULL_CONDITION]["labels"]
    assert null == ["alpha@a", "alpha@b"]  # the largest source (a tie: the first name) halved
    assert {r["axis"] for r in records if r["kind"] == "evidence"} == {"words", "train_fraction"}
    assert any(r["kind"] == "open_set" and r["condition"] == "mine" for r in records)
    home = tmp_path / "texts_jsonl"
    index = (home / "reports" / "mine" / "index.md").read_text(encoding="utf-8")
    assert "**No ceiling.**" in index and "length only [95% CI]" in index
    assert "One source's texts split at random in two" in index
    assert (home / "reports" / "mine" / "figures" / "confusion_mine.png").is_file()
    again = run_cli("collected", str(home / "texts.jsonl"), "--name", "mine", "--config", str(config), home=home)
    assert "up to date" in again.stdout
    sample = home / "sample.txt"
    sample.write_text(frame[frame["source"] == "gamma"]["text"].iloc[0], encoding="utf-8")
    verdict = run_cli("attribute", "--run", "mine", str(sample), home=home)
    assert verdict.stdout.startswith(f"{sample}: gamma ")


def test_length_control_flags_a_corpus_whose_lengths_give_the_source_away(tmp_path: Path, config: Path) -> None:
    frame = _corpus(lengths={"alpha": 10, "beta": 25, "gamma": 40})
    cfg = load_config(config)
    corpus = _write(frame, tmp_path / "lengths.jsonl")
    with use_home(tmp_path):
        result = run_collected(cfg, corpus, progress=False)
        write_collected_index(collected_config(cfg, "lengths"), COLLECTED_MANIFEST)
    length = next(r for r in result.records if r["kind"] == "length_control" and r["condition"] == "lengths")
    assert length["accuracy"] == 1.0 and length["leaks"]
    index = (tmp_path / "reports" / "lengths" / "index.md").read_text(encoding="utf-8")
    assert "**Length leaks** in `lengths`" in index


def test_length_features_count_characters_words_and_tokens() -> None:
    names, x = length_features(pd.DataFrame({"text": ["a bc", "déf"], "token_ids": [[1, 2, 3], [4]]}))
    assert names == ["characters", "words", "tokens"]
    assert np.allclose(np.expm1(x), [[4, 2, 3], [3, 1, 1]])


def test_bad_corpora_get_one_line_errors(tmp_path: Path, config: Path) -> None:
    frame = _corpus(groups=6)
    cases = {
        "one.jsonl": (frame.assign(source="alpha"), "one source only ('alpha'); attribution needs two or more"),
        "few.jsonl": (frame[~((frame["source"] == "beta") & (frame.index % 6 > 1))], "source 'beta' has 2 text(s)"),
        "nocol.csv": (frame.rename(columns={"source": "model"}), "no `source` column (columns: text, model, group)"),
    }
    runner = CliRunner()
    for name, (bad, message) in {**cases, "x.txt": (None, "x.txt: no such file or folder")}.items():
        corpus = tmp_path / name if bad is None else _write(bad, tmp_path / name)
        with use_home(tmp_path):
            result = runner.invoke(app, ["collected", str(corpus), "--config", str(config)])
        assert result.exit_code == 1 and message in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "reports").exists()  # nothing written for a refused corpus


def test_unusable_texts_are_counted_and_left_out(tmp_path: Path) -> None:
    frame = _corpus(groups=8)
    extra = pd.DataFrame(
        [
            {"text": "", "source": "alpha", "group": "e1"},
            {"text": "   ", "source": "beta", "group": "e2"},
            {"text": "\x00\x01\x02\x03 bin", "source": "beta", "group": "e3"},
            {"text": "no source", "source": "", "group": "e4"},
        ]
    )
    collected = read_collected(_write(pd.concat([frame, extra]), tmp_path / "mixed.jsonl"))
    assert len(collected.frame) == len(frame)
    assert collected.skipped == {"empty text": 2, "binary": 1, "without a source": 1}
    assert collected.skipped_line().endswith("skipped 4 text(s): 1 binary, 2 empty text, 1 without a source")
    conditions = collected_conditions(collected, "mixed", seed=0)
    assert conditions["mixed"].labels == list(SOURCES)
    # 8 groups of the largest source: halved into 4 + 4, disjoint
    null = conditions[NULL_CONDITION].frame
    halves = null.groupby("source")["prompt_id"].apply(set)
    assert [len(h) for h in halves] == [4, 4] and not halves.iloc[0] & halves.iloc[1]


def test_a_folder_of_sources_reads_non_utf8_files_as_skipped(tmp_path: Path) -> None:
    _write(_corpus(groups=5), tmp_path)
    (tmp_path / "beta" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    collected = read_collected(tmp_path)
    assert collected.skipped == {"not UTF-8 text": 1}
    assert sorted(collected.frame["source"].unique()) == list(SOURCES)
    with pytest.raises(NatprintsError, match="unknown corpus format '.txt'"):
        read_collected(tmp_path / "alpha" / "p000.txt")
