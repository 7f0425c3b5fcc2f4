"""Integrity of every artifact (issue 11): tampered generated text is refused, not laundered, by every
stage that reads it; a corrupt zoo model is retrained by `zoo` and refused by the stages that use it; a
damaged resume state falls back; a diverging model stops with its name and step; a block length the
corpus cannot fill is refused before training. Each test tampers with a copy of the session's smoke run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from natprints.artifacts import sha256_file
from natprints.config import load_config
from natprints.errors import NatprintsError
from natprints.generate.stage import _own_rows, _write_parquet
from natprints.zoo import zoo_specs
from natprints.zoo.stage import build_zoo, verified_model
from tests.conftest import SMOKE, run_cli

BASE = "xs-lr3e-3-bs8-init0-data0"
OTHER = "xs-lr3e-3-bs8-init1-data1"  # a seed-condition model: generated from, and a parent of a derived model


def _copy_run(smoke_home: Path, dst: Path) -> Path:
    for part in ("data", "models"):
        shutil.copytree(smoke_home / part, dst / part)
    return dst


def _corpus_only(smoke_home: Path, dst: Path) -> Path:
    shutil.copytree(smoke_home / "data" / "corpus" / "smoke", dst / "data" / "corpus" / "smoke")
    return dst


def _rows(path: Path) -> pd.DataFrame:
    frame = pd.read_parquet(path)
    return frame.assign(token_ids=frame["token_ids"].map(list))


def _error_line(proc) -> str:
    """The one-line error a refusing command prints (and no traceback)."""
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return next(line for line in proc.stderr.splitlines() if line.startswith("error: "))


# --- tampered generated text ----------------------------------------------------------------------


def test_tampered_generated_text_is_refused_not_laundered(smoke_home, tmp_path):
    home = _copy_run(smoke_home, tmp_path)
    generated = home / "data" / "generated" / "smoke"
    path = generated / f"{OTHER}.parquet"
    original = _rows(path)
    tampered = pd.read_parquet(path)
    tampered.loc[3, "text"] = "we the people, edited"
    tampered.to_parquet(path, index=False)
    manifest_before = (generated / "manifest.json").read_text()

    line = _error_line(run_cli("generate", "--config", str(SMOKE), home=home, check=False))
    assert line == (
        f"error: {path} does not match the manifest that wrote it (tampered or corrupt); "
        "remove it and rerun `natprints generate`"
    )
    assert (generated / "manifest.json").read_text() == manifest_before  # not re-hashed into the manifest
    for stage in ("likelihood", "reference", "experiments"):
        line = _error_line(run_cli(stage, "--config", str(SMOKE), home=home, check=False))
        assert f"{path.name} does not match its manifest hash (tampered or corrupt)" in line, stage
        assert line.endswith(f"remove {path} and rerun `natprints generate`"), stage

    path.unlink()  # the recovery the message gives
    run_cli("generate", "--config", str(SMOKE), home=home)
    pd.testing.assert_frame_equal(_rows(path), original)


def test_a_file_a_killed_generate_was_filling_is_extended(smoke_home, tmp_path):
    """A partial file natprints wrote carries the digest of its rows: resumed, not refused."""
    home = _copy_run(smoke_home, tmp_path)
    path = home / "data" / "generated" / "smoke" / f"{BASE}.parquet"
    original = _rows(path)
    _write_parquet(path, pd.read_parquet(path).iloc[:10])  # what a run killed after its first chunk leaves
    assert _own_rows(path)
    run_cli("generate", "--config", str(SMOKE), home=home)
    pd.testing.assert_frame_equal(_rows(path), original)
    partial = pd.read_parquet(path).iloc[:10]
    partial.to_parquet(path, index=False)  # the same rows, but not as natprints wrote them
    assert not _own_rows(path)
    assert "does not match the manifest" in _error_line(
        run_cli("generate", "--config", str(SMOKE), home=home, check=False)
    )


def test_chunks_a_killed_generate_wrote_beside_its_file_are_read_back(smoke_home, tmp_path):
    """Each chunk's rows go to a side file as they are sampled and the model's file is written once at
    its end: a run killed before that leaves the side files, and the next run samples only the rest
    and writes the same file. A side file whose rows no longer match their digest is refused."""
    home = _copy_run(smoke_home, tmp_path)
    path = home / "data" / "generated" / "smoke" / f"{BASE}.parquet"
    original = _rows(path)
    rows = pd.read_parquet(path)
    path.unlink()
    parts = path.with_name(path.name + ".part")
    parts.mkdir()
    _write_parquet(parts / "000000.parquet", rows.iloc[:10])  # what a run killed after its first chunk leaves
    run_cli("generate", "--config", str(SMOKE), home=home)
    pd.testing.assert_frame_equal(_rows(path), original)
    assert not parts.exists()
    path.unlink()
    parts.mkdir()
    edited = rows.iloc[:10].copy()
    edited.loc[3, "text"] = "we the people, edited"
    _write_parquet(parts / "000000.parquet", rows.iloc[:10])
    edited.to_parquet(parts / "000001.parquet", index=False)  # not as natprints wrote it
    line = _error_line(run_cli("generate", "--config", str(SMOKE), home=home, check=False))
    assert line == (
        f"error: {parts / '000001.parquet'} does not match the digest of its rows (tampered or corrupt); "
        "remove it and rerun"
    )


# --- a corrupt zoo model --------------------------------------------------------------------------


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupt_zoo_model_is_refused_then_retrained(smoke_home, tmp_path):
    home = _copy_run(smoke_home, tmp_path)
    weights = home / "models" / "smoke" / "zoo" / OTHER / "model.safetensors"
    good = sha256_file(weights)
    _flip_byte(weights)
    refusal = (
        f"error: zoo model {OTHER}: model.safetensors does not match its manifest hash (tampered or corrupt); "
        "rerun `natprints zoo` to retrain it"
    )
    for stage in ("generate", "derive", "likelihood"):  # each would otherwise skip: its outputs are done
        assert _error_line(run_cli(stage, "--config", str(SMOKE), home=home, check=False)) == refusal, stage

    proc = run_cli("zoo", "--config", str(SMOKE), home=home)
    assert f"model {OTHER}: model.safetensors does not match its manifest hash (corrupt); retraining it" in (
        proc.stderr
    )
    assert "zoo: trained 1 model(s) now" in proc.stdout
    assert sha256_file(weights) == good  # training is deterministic: the same weights again
    run_cli("generate", "--config", str(SMOKE), home=home)  # and the texts made from them still hold


def test_a_diverged_manifest_is_not_used(smoke_home, tmp_path, monkeypatch):
    home = _copy_run(smoke_home, tmp_path)
    monkeypatch.setenv("NATPRINTS_HOME", str(home))
    path = home / "models" / "smoke" / "zoo" / BASE / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["final_heldout_loss"] = float("nan")
    path.write_text(json.dumps(manifest))
    with pytest.raises(NatprintsError, match=f"zoo model {BASE}: training ended with held-out loss nan"):
        verified_model(load_config(SMOKE), BASE)


# --- a damaged resume state -----------------------------------------------------------------------


@pytest.mark.parametrize("damaged", [("resume-000020",), ("resume-000020", "resume-000010")])
def test_truncated_resume_state_falls_back(smoke_home, tmp_path, monkeypatch, capfd, damaged):
    home = _corpus_only(smoke_home, tmp_path)
    monkeypatch.setenv("NATPRINTS_HOME", str(home))
    cfg = load_config(SMOKE)
    model_dir = home / "models" / "smoke" / "zoo" / BASE
    assert build_zoo(cfg, only=[BASE], stop_after=25) == []
    assert sorted(p.name for p in model_dir.glob("resume-*")) == ["resume-000010", "resume-000020"]
    for name in damaged:
        weights = model_dir / name / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    capfd.readouterr()
    assert build_zoo(cfg, only=[BASE]) == [BASE]
    err = capfd.readouterr().err
    then = "step 0" if len(damaged) == 2 else "resume-000010"
    assert (
        f"model {BASE}: resume state {damaged[-1]} is unreadable (model.safetensors does not match its hash); "
        f"resuming from {then}" in err
    )
    assert "SafetensorError" not in err and "Traceback" not in err
    # resumed from an earlier state (or from scratch), the model is the one an uninterrupted run trains
    assert sha256_file(model_dir / "model.safetensors") == sha256_file(
        smoke_home / "models" / "smoke" / "zoo" / BASE / "model.safetensors"
    )
    assert not list(model_dir.glob("resume-*"))


# --- a diverging model; a block length the corpus cannot fill ------------------------------------


def test_diverging_model_stops_with_its_name_and_step(smoke_home, tmp_path):
    home = _corpus_only(smoke_home, tmp_path)
    config = tmp_path / "diverge.toml"
    config.write_text(SMOKE.read_text().replace("lr = 3e-3", "lr = 1e6"))
    line = _error_line(run_cli("zoo", "--config", str(config), home=home, check=False))
    assert line.startswith("error: model xs-lr1e6-bs8-")
    assert " diverged: training loss is nan at step " in line and line.endswith(
        "it is not saved (lower train.lr, under a new [run] name)"
    )
    zoo = home / "models" / "smoke" / "zoo"
    assert not list(zoo.glob("*/manifest.json")) and not list(zoo.glob("*/model.safetensors"))
    line = _error_line(run_cli("generate", "--config", str(config), home=home, check=False))
    assert line.endswith("is missing; run `natprints zoo` first")  # no non-finite model reaches later stages


def test_seq_len_longer_than_the_corpus_allows(smoke_home, tmp_path, monkeypatch):
    home = _corpus_only(smoke_home, tmp_path)
    monkeypatch.setenv("NATPRINTS_HOME", str(home))
    cfg = load_config(SMOKE)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seq_len": 4096, "batch_size": 64})})
    counts = json.loads((home / "data" / "corpus" / "smoke" / "manifest.json").read_text())["counts"]
    blocks = (counts["train_tokens"] - 1) // 4096
    expected = rf"train.seq_len = 4096 is too long for the corpus: .* {blocks} training blocks \(needs a batch of 64\)"
    with pytest.raises(NatprintsError, match=expected):
        build_zoo(cfg, only=[next(iter(zoo_specs(cfg)))])
    assert not list((home / "models").rglob("*.safetensors"))


# --- score caches and saved attributors ------------------------------------------------------------


def _edit_score(path: Path) -> None:
    """Change one log-likelihood and keep the file's own metadata (weights hash, version, digest), as a
    careful forger would."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    loglik = table.column("loglik").to_pylist()
    loglik[0] += 5.0
    index = table.schema.get_field_index("loglik")
    edited = table.set_column(index, "loglik", pa.array(loglik, type=table.schema.field("loglik").type))
    pq.write_table(edited.replace_schema_metadata(table.schema.metadata), path)


def test_an_edited_score_cache_is_refused_not_rehashed(smoke_home, tmp_path):
    """The likelihood stage's scores; the reference stage's and emergence's are read and written by
    the same two functions (``read_cache``, ``score_model``)."""
    stage = "likelihood"
    home = _copy_run(smoke_home, tmp_path)
    path = home / "data" / "likelihood" / "smoke" / f"{OTHER}.parquet"
    original = pd.read_parquet(path)
    manifest = path.parent / "manifest.json"
    recorded = json.loads(manifest.read_text())["files"][path.name]
    _edit_score(path)
    line = _error_line(run_cli(stage, "--config", str(SMOKE), home=home, check=False))
    assert line == (
        f"error: {path} does not match the scores written to it (tampered or corrupt); "
        f"remove it and rerun `natprints {stage}`"
    )
    assert not manifest.exists() or json.loads(manifest.read_text())["files"][path.name] == recorded
    # every reader refuses it too: the edited value never reaches a table
    line = _error_line(run_cli("experiments", "--force", "--config", str(SMOKE), home=home, check=False))
    assert path.name in line and "remove" in line
    path.unlink()  # the recovery the message gives: the rows are scored again, to the same values
    run_cli(stage, "--config", str(SMOKE), home=home)
    pd.testing.assert_frame_equal(pd.read_parquet(path), original)


def test_a_damaged_saved_attributor_is_rebuilt_not_reported_up_to_date(smoke_home, tmp_path):
    home = _copy_run(smoke_home, tmp_path)
    shutil.copytree(smoke_home / "reports", home / "reports")
    saved = home / "models" / "smoke" / "attributors" / "init"  # the smallest condition: two models
    good = {p.name: p.read_bytes() for p in saved.iterdir()}
    _flip_byte(saved / "pipeline.skops")
    text = tmp_path / "a.txt"
    text.write_text("The state of the Union is strong and the Congress")
    attribute = ("attribute", str(text), "--config", str(SMOKE), "--condition", "init")
    line = _error_line(run_cli(*attribute, home=home, check=False))
    assert "pipeline.skops does not match its manifest hash" in line
    assert line.endswith(f"remove {saved / 'pipeline.skops'} and rerun `natprints experiments`")
    proc = run_cli("experiments", "--config", str(SMOKE), home=home)
    assert "up to date" not in proc.stderr + proc.stdout
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == good  # rebuilt byte for byte
    run_cli(*attribute, home=home)
