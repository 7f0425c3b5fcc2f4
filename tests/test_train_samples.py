"""More training texts: extra continuations of the training prompts, and the curve against them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from natprints.config import load_config
from natprints.errors import NatprintsError
from natprints.generate.stage import plan_rows
from natprints.records import load_records
from tests.conftest import SMOKE, run_cli


def _settings(**update):
    return load_config(SMOKE).generate.model_copy(update={"batch_size": 4, **update})


def test_extra_rows_come_after_the_base_plan_in_chunks_of_their_own():
    prompts = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(10)]})
    base = plan_rows("m", prompts, _settings(), 0)
    plan = plan_rows("m", prompts, _settings(train_samples_per_prompt=3), 0, frozenset({"p1", "p3"}))
    pd.testing.assert_frame_equal(plan.iloc[: len(base)], base)  # the first texts do not change
    extra = plan.iloc[len(base) :]
    assert len(extra) == 4 and set(extra["prompt_id"]) == {"p1", "p3"} and set(extra["sample_index"]) == {1, 2}
    assert extra["chunk"].min() == base["chunk"].max() + 1 and plan["sample_id"].is_unique


@pytest.mark.parametrize(
    ("generate", "attribution", "message"),
    [
        ("samples_per_prompt = 2\ntrain_samples_per_prompt = 1", "", "at least samples_per_prompt"),
        ("train_samples_per_prompt = 2", "evidence_train_samples = [1, 4]", "exceed the 2 continuations"),
        ("", "evidence_train_samples = [0]", "evidence_train_samples"),
    ],
)
def test_train_samples_keys_are_checked(tmp_path, generate, attribution, message):
    text = SMOKE.read_text().replace("[generate]\n", f"[generate]\n{generate}\n")
    text = text.replace("[attribution]\n", f"[attribution]\n{attribution}\n")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(NatprintsError, match=message):
        load_config(path)


def test_more_texts_reproduce_the_run_at_one_text_per_prompt(smoke_home, tmp_path):
    """Two continuations per training prompt: the first is the smoke run's text, and the curve's 1x point
    refits the baseline and fine-tunes the reference LMs on exactly the smoke run's training texts.
    The smoke run's Llama models only (its `seed` and `init` conditions): the other families' texts
    are made by the same code."""
    home = tmp_path / "home"
    for part in ("data", "models"):
        shutil.copytree(smoke_home / part, home / part)
    (home / "models" / "smoke" / "run.json").unlink()  # the same run, on purpose, with a changed config
    config = tmp_path / "smoke.toml"
    text = SMOKE.read_text()
    families = next(line for line in text.splitlines() if line.startswith("arch = "))
    text = text.replace(families + "\n", "")
    text = text.replace("[generate]\n", "[generate]\ntrain_samples_per_prompt = 2\n")
    text = text.replace("[attribution]\n", "[attribution]\nevidence_train_samples = [1, 2]\n")
    reference = '\n[reference]\nhead = true\nhead_epochs = 1\nencoder_conditions = ["seed"]\nencoder_epochs = 1\n'
    config.write_text(text + reference)
    for stage in ("generate", "likelihood", "reference", "experiments", "report"):
        run_cli(stage, "--config", str(config), home=home)

    old = load_records(smoke_home / "reports" / "smoke")
    split = next(r for r in old if r.get("kind") == "split")
    generated = smoke_home / "data" / "generated" / "smoke"
    made = json.loads((home / "data" / "generated" / "smoke" / "manifest.json").read_text())["files"]
    assert len(made) == 5  # the base, two seeds, one init, and the null control
    for path in sorted(generated / name for name in made):
        before = pd.read_parquet(path)
        after = pd.read_parquet(home / "data" / "generated" / "smoke" / path.relative_to(generated))
        pd.testing.assert_frame_equal(after.iloc[: len(before)], before)
        extra = after.iloc[len(before) :]
        assert len(extra) == split["prompts"]["train"] and (extra["sample_index"] == 1).all()

    new = load_records(home / "reports" / "smoke")
    accuracy = {(r["condition"], r["pipeline"]): r["accuracy"] for r in old if r.get("kind") == "pipeline"}
    n_train = {r["condition"]: r["n_train"] for r in old if r.get("kind") == "split"}
    curve = [r for r in new if r.get("kind") == "evidence" and r["axis"] == "train_samples"]
    for condition in ("seed", "init"):
        points = {(r["role"], r["value"]): r for r in curve if r["condition"] == condition}
        roles = {"best", "baseline", "reflm", "head"} | ({"minilm"} if condition == "seed" else set())
        assert {role for role, _ in points} == roles
        for role in ("baseline", "reflm"):
            one, two = points[role, 1], points[role, 2]
            assert one["n_train"] == n_train[condition] and two["n_train"] == 2 * n_train[condition]
            assert one["accuracy"] == accuracy[condition, one["pipeline"]]
    heads = [r for r in new if r.get("kind") == "pipeline" and r["pipeline"] == "reflm+head"]
    assert {r["condition"] for r in heads} == {"seed", "init", "all", "null_control"}
    for r in heads:  # the classifier's verdicts are its stored log-probabilities' argmax
        posterior = next(
            p for p in new if p.get("kind") == "posteriors" and p["condition"] == r["condition"] and p["role"] == "head"
        )
        stored = np.asarray(posterior["log_posterior"]).argmax(1)
        assert r["accuracy"] == pytest.approx((stored == np.asarray(posterior["y_true"])).mean())
    # the fine-tuned encoder: its condition only, its verdicts the argmax of its stored log-probabilities,
    # and the condition's saved model reloads to the same probabilities of its test texts
    from natprints.reference.encoder import FineTunedEncoder

    encoders = [r for r in new if r.get("kind") == "pipeline" and r["pipeline"] == "minilm+ft"]
    assert [r["condition"] for r in encoders] == ["seed"] and encoders[0]["n_train"] == n_train["seed"] * 2
    posterior = next(p for p in new if p.get("kind") == "posteriors" and p["role"] == "minilm")
    stored = np.asarray(posterior["log_posterior"])
    assert encoders[0]["accuracy"] == pytest.approx((stored.argmax(1) == np.asarray(posterior["y_true"])).mean())
    saved = FineTunedEncoder.load(home / "models" / "smoke" / "encoders" / "seed")
    assert saved.history_[0]["epoch"] == 1 and "validation_loss" in saved.history_[0]
    generated = pd.concat(pd.read_parquet(p) for p in (home / "data" / "generated" / "smoke").glob("*.parquet"))
    texts = generated.set_index(generated["sample_id"].astype(str)).loc[posterior["sample_ids"], "text"].tolist()
    again = saved.predict_log_proba(texts)
    np.testing.assert_allclose(again - np.logaddexp.reduce(again, axis=1, keepdims=True), stored, atol=2e-5)
    # a config that no longer asks for the encoder: its files of the earlier config stay on disk, and
    # are not read into the tables
    config.write_text(text + "\n[reference]\nhead = true\nhead_epochs = 1\n")
    (home / "models" / "smoke" / "run.json").unlink()  # the same run, with a changed config, on purpose
    for stage in ("reference", "experiments"):
        run_cli(stage, "--config", str(config), home=home)
    assert (home / "models" / "smoke" / "encoders" / "seed" / "model.safetensors").is_file()
    assert not any(r.get("pipeline") == "minilm+ft" for r in load_records(home / "reports" / "smoke"))
