"""The emergence stage on the smoke run: the text fingerprint at every saved step of the seed condition."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pandas as pd
import pytest

from natprints.artifacts import read_manifest
from natprints.config import load_config
from natprints.errors import NatprintsError
from tests.conftest import SMOKE, copy_stage, run_cli

SEED_MODELS = ["xs-lr3e-3-bs8-init0-data0", "xs-lr3e-3-bs8-init1-data1", "xs-lr3e-3-bs8-init2-data2"]


def _table(home) -> pd.DataFrame:
    return pd.read_csv(home / "reports" / "smoke" / "emergence.csv")


def test_every_saved_step_has_the_ceiling_and_each_pipeline(smoke_home):
    table = _table(smoke_home)
    assert sorted(table["step"].unique()) == [0, 10, 20, 40]  # init, checkpoints [10, 20], final
    pipelines = load_config(SMOKE).emergence.pipelines
    for _, rows in table.groupby("step"):
        assert rows["method"].tolist() == ["likelihood+bayes", *pipelines]
        assert rows["best"].sum() == 1 and not rows.loc[rows["white_box"], "best"].any()
        assert (rows["n_test"] == 24).all() and np.allclose(rows["chance"], 1 / 3)
        black = rows[~rows["white_box"]]
        top = rows[rows["white_box"]].iloc[0]
        share = (black["accuracy"] - top["chance"]) / (top["accuracy"] - top["chance"])
        assert np.allclose(black["ceiling_share"], share)
        assert (rows["kl_per_token"] > 0).all() and (rows["kl_min"] <= rows["kl_per_token"]).all()


def test_last_step_reproduces_the_seed_ceiling_of_the_tables(smoke_home):
    table = _table(smoke_home)
    final = table[(table["step"] == 40) & table["white_box"]].iloc[0]
    accuracy = pd.read_csv(smoke_home / "reports" / "smoke" / "accuracy.csv")
    ceiling = accuracy[(accuracy["condition"] == "seed") & (accuracy["pipeline"] == "likelihood+bayes")].iloc[0]
    assert final["accuracy"] == pytest.approx(ceiling["accuracy"], abs=1e-6)  # the csv keeps 6 digits
    assert final["n_test"] == ceiling["n_test"]


def test_heldout_loss_is_the_training_curve_at_its_eval_steps(smoke_home):
    table = _table(smoke_home)
    curves = [dict(read_manifest(smoke_home / "models" / "smoke" / "zoo" / m)["heldout_curve"]) for m in SEED_MODELS]
    for step in (10, 20, 40):
        loss = table.loc[table["step"] == step, "heldout_loss"].iloc[0]
        assert loss == pytest.approx(np.mean([c[step] for c in curves]), abs=1e-5)
    step0 = table.loc[table["step"] == 0, "heldout_loss"].iloc[0]
    assert step0 == pytest.approx(np.log(512), abs=0.3)  # an untrained model is near uniform over the vocabulary


def test_report_has_the_section_and_figure(smoke_home):
    index = (smoke_home / "reports" / "smoke" / "index.md").read_text()
    assert "## The text fingerprint over training" in index
    assert "![text fingerprint over training](figures/emergence.png)" in index
    assert (smoke_home / "reports" / "smoke" / "figures" / "emergence.png").stat().st_size > 10_000
    row = _table(smoke_home).query("step == 0 and white_box").iloc[0]
    assert f"| 0 | {row.heldout_loss:.3f} | {row.kl_per_token:.3f} " in index


def _digests(home) -> dict[str, str]:
    out = home / "data" / "emergence" / "smoke" / "generated"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.parquet"))}


def test_checkpoint_generation_resumes_to_the_same_texts_and_refuses_tampering(smoke_home, tmp_path):
    for part in (("data", "corpus"), ("data", "generated"), ("models", "smoke")):
        copy_stage(smoke_home, tmp_path, *part)
    (tmp_path / "models" / "smoke" / ".lock").unlink(missing_ok=True)
    partial = run_cli("emergence", "--config", str(SMOKE), "--max-chunks", "1", home=tmp_path)
    assert "(partial)" in partial.stdout
    assert not (tmp_path / "reports" / "smoke" / "emergence.csv").exists()
    done = run_cli("emergence", "--config", str(SMOKE), home=tmp_path)
    assert "texts generated now" in done.stdout and "0 texts generated now" not in done.stdout
    assert _digests(tmp_path) == _digests(smoke_home)  # 3 models x (init + 2 checkpoints)
    assert len(_digests(tmp_path)) == 9
    assert _table(tmp_path).equals(_table(smoke_home))
    again = run_cli("emergence", "--config", str(SMOKE), home=tmp_path)
    assert "0 texts generated now" in again.stdout

    path = tmp_path / "data" / "emergence" / "smoke" / "generated" / f"{SEED_MODELS[1]}@step-000010.parquet"
    frame = pd.read_parquet(path)
    frame.loc[0, "text"] = "edited"
    frame.to_parquet(path, index=False)
    (tmp_path / "data" / "emergence" / "smoke" / "likelihood" / f"{SEED_MODELS[0]}.parquet").unlink()  # force a redo
    refused = run_cli("emergence", "--config", str(SMOKE), home=tmp_path, check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip().endswith("remove it and rerun `natprints emergence`")
    assert "does not match the manifest that wrote it" in refused.stderr


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[emergence]\npipelines = ['word1+lasso']\n", "unknown pipeline 'word1+lasso'"),
        ("[emergence]\npipelines = ['embed+nb']\n", "unknown pipeline 'embed+nb'"),
        ("[emergence]\npipelines = []\n", "needs at least one pipeline"),
        ("[emergence]\nenabled = true\ncondition = 'lr'\n", "emergence.condition = 'lr'"),
        ("[emergence]\ncondition = 'order'\n", "'emergence.condition'"),
    ],
)
def test_bad_emergence_settings_are_config_errors(tmp_path, body, message):
    path = tmp_path / "c.toml"
    path.write_text('[run]\nname = "x"\n[conditions]\nseed = [1]\n' + body)
    with pytest.raises(NatprintsError, match=re.escape(message)):
        load_config(path)


def test_a_step_without_saved_weights_is_refused(smoke_cfg):
    from natprints.emergence import run_emergence

    cfg = smoke_cfg.model_copy(update={"emergence": smoke_cfg.emergence.model_copy(update={"steps": [0, 30]})})
    with pytest.raises(NatprintsError, match=r"no saved weights at step\(s\) \[30\].*saved: \[0, 10, 20, 40\]"):
        run_emergence(cfg)
