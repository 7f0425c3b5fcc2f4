"""`natprints lineage`: pair comparison (JSON and text), identify, the experiments over a tiny zoo, and
SeedPrints' calibrated threshold for trained pairs."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

from natprints import records
from natprints.artifacts import Manifest
from natprints.cli import app as APP
from natprints.config import load_config
from natprints.errors import NatprintsError
from natprints.lineage import experiments as ex
from natprints.lineage import seedprints as sp
from natprints.reports.lineage import render_section
from tests.test_seedprints import VOCAB, new_model

STEPS = 20
CONFIG = "[run]\nname = 't'\ndevice = 'cpu'\n\n[lineage]\nseedprints_inputs = 96\nseedprints_seq_len = 32\n"


runner = CliRunner()


def _train(model: LlamaForCausalLM, data_seed: int, steps: int) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(data_seed)
    for _ in range(steps):
        batch = torch.randint(0, VOCAB, (8, 32), generator=generator)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _zoo_model(zoo: Path, model_id: str, init_seed: int, data_seed: int, conditions: list[str]) -> Path:
    """Init, a checkpoint at step 10 and the final model at STEPS, with a manifest, as the zoo saves them."""
    path = zoo / model_id
    model = new_model(init_seed, layers=3)
    model.save_pretrained(path / "init")
    _train(model, data_seed, 10)
    model.save_pretrained(path / "checkpoints" / "step-000010")
    _train(model, data_seed + 500, STEPS - 10)
    model.save_pretrained(path)
    files = ["config.json", "model.safetensors", "init/config.json", "init/model.safetensors"]
    files += ["checkpoints/step-000010/model.safetensors"]
    fields = {
        "model_id": model_id,
        "conditions": conditions,
        "init_seed": init_seed,
        "data_seed": data_seed,
        "spec": {"size": "xs", "steps": STEPS},
        "parent": None,
    }
    Manifest(path, "model").write("test", fields, files)
    return path


def _derived(zoo: Path, parent: str, data_seed: int) -> Path:
    model = LlamaForCausalLM.from_pretrained(zoo / parent)
    _train(model, data_seed, 10)
    path = zoo / f"{parent}+kjv"
    model.save_pretrained(path)
    parent_manifest = json.loads((zoo / parent / "manifest.json").read_text())
    fields = {k: parent_manifest[k] for k in ("conditions", "init_seed", "data_seed")}
    fields |= {"model_id": path.name, "parent": parent, "derived_from_corpus": "kjv", "spec": {"steps": 10}}
    Manifest(path, "model").write("test", fields, ["config.json", "model.safetensors"])
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """NATPRINTS_HOME with a config for run `t` and its tiny zoo: seeds 0 and 1, a data-order variant
    of seed 0, and seed 0 continued on another corpus."""
    root = tmp_path_factory.mktemp("home")
    zoo = root / "models" / "t" / "zoo"
    _zoo_model(zoo, "s0", 0, 0, ["seed", "data_order"])
    _zoo_model(zoo, "s1", 1, 1, ["seed"])
    _zoo_model(zoo, "d1", 0, 7, ["data_order"])
    _derived(zoo, "s0", 99)
    (root / "t.toml").write_text(CONFIG)
    return root


@pytest.fixture
def in_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NATPRINTS_HOME", str(home))
    return home


def _zoo(home: Path) -> Path:
    return home / "models" / "t" / "zoo"


def test_compare_json_both_forms(in_home):
    zoo, config = _zoo(in_home), str(in_home / "t.toml")
    a, b = str(zoo / "s0" / "init"), str(zoo / "s0")
    explicit = runner.invoke(APP, ["lineage", "compare", a, b, "--json", "--device", "cpu"])
    assert explicit.exit_code == 0, explicit.output
    out = json.loads(explicit.stdout)
    assert out["model_a"] == a and set(out["results"]) == {"seedprints", "weights"}
    seed = out["results"]["seedprints"]
    assert seed["same_lineage"] and seed["verdict"] == "related" and seed["log10_p"] < -2
    assert seed["rule"] == "analytic" and seed["with_init"]  # an init in the pair: the analytic p
    assert seed["n_inputs"] == 512 and seed["k"] == 64 == seed["kept"]  # the defaults (k = all), no --config
    assert seed["log10_p_one_sided"] == seed["log10_p"] and seed["log10_p_two_sided"] <= 0.0
    assert -1.0 <= out["results"]["weights"]["score"] <= 1.0
    # the bare form is the same command (at the test config's small N, from the cache)
    small = runner.invoke(APP, ["lineage", "compare", a, b, "--json", "--config", config])
    bare = runner.invoke(APP, ["lineage", a, b, "--json", "--config", config])
    assert small.exit_code == bare.exit_code == 0, bare.output
    assert json.loads(bare.stdout) == json.loads(small.stdout)
    assert json.loads(bare.stdout)["results"]["seedprints"]["n_inputs"] == 96


def test_compare_method_option_and_unrelated_pair(in_home):
    zoo, config = _zoo(in_home), str(in_home / "t.toml")
    args = ["lineage", "--method", "seedprints", str(zoo / "s0"), str(zoo / "s1"), "--json", "--config", config]
    result = runner.invoke(APP, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)["results"]
    assert set(out) == {"seedprints"}
    # two trained models and no run to calibrate on: the analytic test's answer, labelled uncalibrated
    seed = out["seedprints"]
    assert seed["verdict"] == "uncalibrated" and seed["same_lineage"] is None and seed["threshold"] is None
    assert seed["note"].startswith("uncalibrated:") and isinstance(seed["z"], float)
    assert seed["analytic_verdict"] == ("related" if seed["log10_p"] < math.log10(seed["alpha"]) else "unrelated")
    text = runner.invoke(APP, args[:-3] + ["--config", config])
    assert "by the analytic test, UNCALIBRATED (two trained models: may be a false link)" in text.stdout
    # one model compared with itself (or a byte-identical copy): identical, by both methods
    same = runner.invoke(APP, ["lineage", str(zoo / "s0"), str(zoo / "s0"), "--json", "--config", config])
    results = json.loads(same.stdout)["results"]
    assert {r["verdict"] for r in results.values()} == {"identical"} and set(results) == {"seedprints", "weights"}
    assert (
        "seedprints: identical — identical config and weights"
        in runner.invoke(APP, ["lineage", str(zoo / "s0"), str(zoo / "s0"), "--config", config]).stdout
    )
    weights = runner.invoke(APP, ["lineage", str(zoo / "s0"), str(zoo / "s1"), "--method", "weights", "--json"])
    assert set(json.loads(weights.stdout)["results"]) == {"weights"}


def test_compare_text_output(in_home):
    zoo, config = _zoo(in_home), str(in_home / "t.toml")
    result = runner.invoke(APP, ["lineage", str(zoo / "s0" / "init"), str(zoo / "s0+kjv"), "--config", config])
    assert result.exit_code == 0, result.output
    assert "seedprints: p = 10^" in result.stdout and "same seed lineage" in result.stdout
    assert "weights: score = " in result.stdout


def test_compare_config_option_reaches_settings_and_cache(in_home):
    zoo = _zoo(in_home)
    args = ["lineage", str(zoo / "s0"), str(zoo / "s1"), "--method", "seedprints", "--json"]
    result = runner.invoke(APP, [*args, "--config", str(in_home / "t.toml")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"]["seedprints"]["n_inputs"] == 96
    assert len(list((in_home / "data" / "cache" / "seedprints").glob("*.npz"))) >= 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_device_option_reaches_code(home):
    zoo = _zoo(home)
    result = runner.invoke(APP, ["lineage", str(zoo / "s0"), str(zoo / "s1"), "--device", "cuda"])
    assert result.exit_code == 1
    assert "no CUDA device is available" in result.stderr


def test_shape_mismatch_errors(tmp_path, in_home):
    wide, deep = new_model(0, hidden=96, layers=4), new_model(0, layers=4)
    wide.save_pretrained(tmp_path / "wide")
    deep.save_pretrained(tmp_path / "deep")
    s0 = str(_zoo(in_home) / "s0")
    one = runner.invoke(APP, ["lineage", s0, str(tmp_path / "wide"), "--method", "seedprints"])
    assert one.exit_code == 1 and one.stderr.startswith("error: ") and one.stderr.count("\n") == 1
    assert "hidden_size 64 vs 96" in one.stderr
    both = runner.invoke(APP, ["lineage", s0, str(tmp_path / "wide")])
    assert both.exit_code == 1
    assert "hidden_size 64 vs 96" in both.stderr and "num_hidden_layers 3 vs 4" in both.stderr
    # same hidden size, different depth: SeedPrints answers, weight-std says why it cannot
    config = str(in_home / "t.toml")
    partial = runner.invoke(APP, ["lineage", s0, str(tmp_path / "deep"), "--json", "--config", config])
    assert partial.exit_code == 0, partial.output
    out = json.loads(partial.stdout)["results"]
    assert out["weights"]["verdict"] == "incomparable"
    assert "num_hidden_layers 3 vs 4" in out["weights"]["reason"]
    assert out["seedprints"]["verdict"] == "uncalibrated"  # neither is a zoo init


def test_bad_inputs(tmp_path, home):
    s0 = str(_zoo(home) / "s0")
    missing = runner.invoke(APP, ["lineage", s0, str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "not found" in missing.stderr
    (tmp_path / "notamodel").mkdir()
    not_model = runner.invoke(APP, ["lineage", str(tmp_path / "notamodel"), s0])
    assert not_model.exit_code == 1 and "no config.json" in not_model.stderr
    bad_lib = runner.invoke(APP, ["lineage", "identify", s0, "--library", s0])
    assert bad_lib.exit_code == 1 and "is a model directory" in bad_lib.stderr
    assert runner.invoke(APP, ["lineage", "run", "--config", str(tmp_path / "none.toml")]).exit_code == 1


def test_identify_ranks_same_seed_first(in_home):
    zoo, config = _zoo(in_home), str(in_home / "t.toml")
    result = runner.invoke(
        APP, ["lineage", "identify", str(zoo / "d1"), "--library", str(zoo), "--json", "--config", config]
    )
    assert result.exit_code == 0, result.output
    ranking = json.loads(result.stdout)["ranking"]
    names = [r["model"] for r in ranking]
    assert "d1" not in names  # the model itself is left out
    same_seed = {"d1@init", "s0", "s0@init", "s0+kjv"}
    assert set(names[: len(same_seed)]) == same_seed
    verdicts = {r["model"]: r["verdict"] for r in ranking}
    # d1 is a trained model: the inits get the analytic verdict, trained models need a calibrated threshold
    assert verdicts["d1@init"] == verdicts["s0@init"] == "same seed" and verdicts["s1@init"] == "no evidence"
    assert verdicts["s0"] == verdicts["s0+kjv"] == verdicts["s1"] == "uncalibrated"
    top = runner.invoke(
        APP, ["lineage", "identify", str(zoo / "d1"), "--library", str(zoo), "--top", "2", "--config", config]
    )
    assert top.exit_code == 0 and len(top.stdout.strip().splitlines()) == 2


def test_run_writes_tables_and_is_idempotent(in_home, monkeypatch):
    result = runner.invoke(APP, ["lineage", "run", "--config", str(in_home / "t.toml")])
    assert result.exit_code == 0, result.output
    reports = in_home / "reports" / "t"
    frame = pd.read_csv(reports / "lineage.csv")
    assert list(frame.columns) == records.CSV_COLUMNS
    labels = {"s0", "s0@init", "s1", "s1@init", "d1", "d1@init", "s0+kjv"}
    assert set(frame.model_a) | set(frame.model_b) == labels
    assert len(frame) == 2 * len(labels) * (len(labels) - 1) // 2

    def row(a: str, b: str, method: str) -> pd.Series:
        hit = frame[
            (frame.method == method)
            & (((frame.model_a == a) & (frame.model_b == b)) | ((frame.model_a == b) & (frame.model_b == a)))
        ]
        assert len(hit) == 1
        return hit.iloc[0]

    assert row("s0@init", "s0", "seedprints").related and row("s0@init", "s0", "seedprints").verdict == "related"
    assert row("s0@init", "d1", "seedprints").related  # data-order variant: same init seed
    assert not row("s0", "s1", "seedprints").related
    assert row("s0@init", "d1@init", "weights").related  # identical inits
    assert not row("s0", "d1", "weights").related  # siblings are not derived from one another
    assert row("s0@init", "s0+kjv", "weights").related and row("s0", "s0+kjv", "weights").related

    summary = json.loads((reports / "lineage.json").read_text())
    seed = summary["methods"]["seedprints"]
    assert seed["comparable"] == 21 and seed["auc"] is not None and 0.5 < seed["auc"] <= 1.0
    assert seed["tp"] + seed["fn"] == seed["related"]
    assert summary["settings"]["seedprints_k"] == "all" and summary["seedprints"]["k_by_hidden_size"] == {"64": 64}
    assert 0 < summary["seedprints"]["distinct_last_tokens"][str(VOCAB)] <= 96

    # the calibrated threshold, recomputed from the stored rows: trained/derived pairs of different seeds
    init_seed = {"s0": 0, "s1": 1, "d1": 0, "s0+kjv": 0}
    seeds = frame[frame.method == "seedprints"]
    trained = seeds[~seeds.model_a.str.endswith("@init") & ~seeds.model_b.str.endswith("@init")]
    unrelated = trained[[init_seed[a] != init_seed[b] for a, b in zip(trained.model_a, trained.model_b, strict=True)]]
    calibration = summary["seedprints"]["calibration"]
    assert calibration["pairs"] == len(unrelated) == 3 and calibration["target_fpr"] == 0.01
    assert calibration["threshold"] == pytest.approx(unrelated.score.max())  # 3 pairs < 1 / FPR: the largest z
    assert calibration["in_sample"]["false"] == 0 and calibration["leave_one_seed_out"]["folds"] == 0  # 2 seeds
    # every verdict follows its rule: trained pairs z > threshold, pairs with an init one-sided p < alpha
    assert (trained.verdict == np.where(trained.score > calibration["threshold"], "related", "unrelated")).all()
    with_init = seeds[seeds.model_a.str.endswith("@init") | seeds.model_b.str.endswith("@init")]
    assert (with_init.verdict == np.where(with_init.log10_p < -2, "related", "unrelated")).all()
    counts = summary["seedprints"]["counts"]
    assert counts["init_own_trained"]["n"] == 3 and counts["init_own_derived"]["n"] == 1
    assert counts["different_seed_with_init"]["n"] == 7 and counts["different_seed_trained_only"]["n"] == 3
    target = counts["target"]
    assert target["positives"] == 4 and target["negatives"] == 10
    assert target["tpr"] == counts["init_own_trained"]["linked"] / 4 + counts["init_own_derived"]["linked"] / 4
    rules = {c["name"]: c["rule"] for c in summary["checks"] if c["method"] == "seedprints"}
    assert rules["init vs its own trained model"] == "analytic"
    assert rules["trained vs its own derived model"] == "calibrated"
    emergence = pd.read_csv(reports / "lineage_emergence.csv")
    own = emergence[emergence.own & (emergence.model == "s0")]
    assert sorted(own.step) == [10, STEPS]
    assert (own.log10_p < -2).all()
    assert not (reports / "lineage_heatmap_seedprints.png").exists()  # figures are drawn at report time

    section = render_section(load_config(in_home / "t.toml"))
    assert section.startswith("## Lineage")
    for name in ("lineage_heatmap_seedprints.png", "lineage_heatmap_weights.png", "lineage_emergence.png"):
        assert (reports / name).read_bytes().startswith(b"\x89PNG")
    assert "init vs its own trained model: 3/3 pairs at p < 0.01" in section
    assert f"z > {calibration['threshold']:.2f}, the 99% quantile of z over 3 known-unrelated pairs" in section
    assert "Init ↔ its own trained model: linked 3/3" in section and "two-sided 2 sf(|z|)" in section
    assert f"TPR {target['tp']}/4" in section and "with FPR ≤ 0.05)" in section
    assert f"FPR {target['fp']}/{target['negatives']} (" in section and "in-sample (no held-out estimate)" in section
    assert "no leave-one-seed-out estimate with 2 seeds" in section
    assert "lineage_heatmap_seedprints.png" in section

    def no_forward(*args, **kwargs):
        raise AssertionError("an up-to-date lineage stage recomputed features")

    before = (reports / "lineage.json").stat().st_mtime_ns
    monkeypatch.setattr(sp, "model_features", no_forward)
    again = runner.invoke(APP, ["lineage", "run", "--config", str(in_home / "t.toml")])
    assert again.exit_code == 0, again.output
    assert (reports / "lineage.json").stat().st_mtime_ns == before


def test_single_pair_uses_the_runs_calibrated_threshold(in_home):
    cfg = load_config(in_home / "t.toml")
    summary = ex.run_lineage(cfg)  # current after the run test; computed otherwise
    threshold = summary["seedprints"]["calibration"]["threshold"]
    zoo, reports = _zoo(in_home), cfg.paths.reports
    settings, cache = cfg.lineage, cfg.paths.cache

    def seedprints(a: str, b: str, **kwargs) -> dict:
        out = ex.compare(zoo / a, zoo / b, "seedprints", kwargs.pop("settings", settings), cache_dir=cache, **kwargs)
        return out["seedprints"]

    same = seedprints("s0", "d1", reports_dir=reports)  # same init seed, other data order
    other = seedprints("s0", "s1", reports_dir=reports)
    assert same["rule"] == other["rule"] == "calibrated" and same["threshold"] == other["threshold"] == threshold
    assert same["verdict"] == "related" and same["z"] > threshold and same["same_lineage"] is True
    assert other["verdict"] == "unrelated" and other["z"] <= threshold
    assert same["threshold_source"] == str(reports / "lineage.json")
    assert seedprints("s0", "d1")["verdict"] == "uncalibrated"  # no run given
    # a threshold fit at other settings does not apply
    other_settings = settings.model_copy(update={"seedprints_k": 32})
    assert seedprints("s0", "d1", settings=other_settings, reports_dir=reports)["verdict"] == "uncalibrated"
    # an init in the pair: the analytic verdict, whatever the run says
    assert seedprints("s1/init", "s1", reports_dir=reports)["rule"] == "analytic"
    ranking = ex.identify(zoo / "d1", zoo, settings, cache_dir=cache, reports_dir=reports)
    verdicts = {r["model"]: r["verdict"] for r in ranking}
    assert verdicts["s0"] == verdicts["s0+kjv"] == "same seed" and verdicts["s1"] == "no evidence"


def test_run_without_zoo_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NATPRINTS_HOME", str(tmp_path))
    (tmp_path / "c.toml").write_text("[run]\nname = 'empty'\n")
    with pytest.raises(NatprintsError, match="no zoo at"):
        ex.run_lineage(load_config(tmp_path / "c.toml"))
