"""Attribution on the smoke run's real generated corpora: tables, null control, saved attributors."""

import json

import pandas as pd

from natprints import attribute
from tests.conftest import SMOKE, run_cli
from tests.test_zoo import BASE, SEED1


def test_accuracy_table_covers_every_condition_and_pipeline(smoke_cfg):
    acc = pd.read_csv(smoke_cfg.paths.reports / "accuracy.csv", keep_default_na=False)
    assert set(acc["condition"]) == {"seed", "init", "all", "null_control"}
    for condition, rows in acc.groupby("condition"):
        assert len(rows) == 5 * 4, condition  # featurizers x classifiers
        assert rows["best"].sum() == 1
    seed = acc[acc["condition"] == "seed"]
    assert (seed["n_classes"] == 3).all() and (seed["chance"].round(6) == round(1 / 3, 6)).all()
    assert ((acc["ci_low"] <= acc["accuracy"]) & (acc["accuracy"] <= acc["ci_high"])).all()


def test_null_control_lands_at_chance(smoke_cfg):
    acc = pd.read_csv(smoke_cfg.paths.reports / "accuracy.csv", keep_default_na=False)
    null = acc[acc["condition"] == "null_control"]
    assert (null["n_classes"] == 2).all()
    # The same model sampled twice. Twenty pipelines on 16 test texts each: about one 95% interval
    # misses chance by luck alone, so a leak shows as many misses and a high mean, not as one miss.
    misses = ((null["ci_low"] > 0.5) | (null["ci_high"] < 0.5)).sum()
    assert misses <= 3 and 0.35 <= null["accuracy"].mean() <= 0.65


def test_saved_attributor_classifies_generated_text(smoke_cfg):
    text = pd.read_parquet(smoke_cfg.paths.generated / f"{SEED1}.parquet")["text"].iloc[0]
    preds = attribute([text], smoke_cfg.paths.attributors / "seed", top_k=3)
    assert len(preds) == 1 and len(preds[0].top) == 3
    labels = {model for model, _ in preds[0].top}
    assert BASE in labels and SEED1 in labels


def test_attribute_cli_json_and_per_input_errors(smoke_home, tmp_path):
    good = tmp_path / "a.txt"
    good.write_text("The state of the Union is strong and the Congress")
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    proc = run_cli(
        "attribute",
        str(good),
        str(empty),
        str(tmp_path / "missing.txt"),
        "--config",
        str(SMOKE),
        "--condition",
        "seed",
        "--json",
        home=smoke_home,
        check=False,
    )
    assert proc.returncode == 1
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["input"] == str(good) and lines[0]["label"] in (lines[0]["best_model"], "unknown")
    assert "error" in lines[1] and "error" in lines[2]
    assert "Traceback" not in proc.stderr
