"""`natprints lineage`: pair comparison (JSON and text), identify, and the experiments over a tiny zoo."""

import json
from pathlib import Path

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


def test_compare_json_both_forms(home):
    zoo = _zoo(home)
    a, b = str(zoo / "s0" / "init"), str(zoo / "s0")
    explicit = runner.invoke(APP, ["lineage", "compare", a, b, "--json", "--device", "cpu"])
    assert explicit.exit_code == 0, explicit.output
    out = json.loads(explicit.stdout)
    assert out["model_a"] == a and set(out["results"]) == {"seedprints", "weights"}
    seed = out["results"]["seedprints"]
    assert seed["same_lineage"] and seed["verdict"] == "related" and seed["log10_p"] < -2
    assert seed["n_inputs"] == 128 and seed["k"] == 16  # the defaults, no --config given
    assert -1.0 <= out["results"]["weights"]["score"] <= 1.0
    bare = runner.invoke(APP, ["lineage", a, b, "--json", "--device", "cpu"])
    assert bare.exit_code == 0, bare.output
    assert json.loads(bare.stdout) == out


def test_compare_method_option_and_unrelated_pair(home):
    zoo = _zoo(home)
    result = runner.invoke(
        APP, ["lineage", "--method", "seedprints", str(zoo / "s0"), str(zoo / "s1"), "--json", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)["results"]
    assert set(out) == {"seedprints"}
    assert out["seedprints"]["verdict"] == "unrelated" and out["seedprints"]["log10_p"] > -2
    weights = runner.invoke(APP, ["lineage", str(zoo / "s0"), str(zoo / "s1"), "--method", "weights", "--json"])
    assert set(json.loads(weights.stdout)["results"]) == {"weights"}


def test_compare_text_output(home):
    zoo = _zoo(home)
    result = runner.invoke(APP, ["lineage", str(zoo / "s0"), str(zoo / "s0+kjv"), "--device", "cpu"])
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
    assert "no CUDA device is available" in str(result.exception)


def test_shape_mismatch_errors(tmp_path, home):
    wide, deep = new_model(0, hidden=96, layers=4), new_model(0, layers=4)
    wide.save_pretrained(tmp_path / "wide")
    deep.save_pretrained(tmp_path / "deep")
    s0 = str(_zoo(home) / "s0")
    one = runner.invoke(APP, ["lineage", s0, str(tmp_path / "wide"), "--method", "seedprints"])
    assert one.exit_code == 1 and isinstance(one.exception, NatprintsError)
    assert "hidden_size 64 vs 96" in str(one.exception)
    both = runner.invoke(APP, ["lineage", s0, str(tmp_path / "wide")])
    assert both.exit_code == 1
    assert "hidden_size 64 vs 96" in str(both.exception) and "num_hidden_layers 3 vs 4" in str(both.exception)
    # same hidden size, different depth: SeedPrints answers, weight-std says why it cannot
    partial = runner.invoke(APP, ["lineage", s0, str(tmp_path / "deep"), "--json", "--device", "cpu"])
    assert partial.exit_code == 0, partial.output
    out = json.loads(partial.stdout)["results"]
    assert out["weights"]["verdict"] == "incomparable"
    assert "num_hidden_layers 3 vs 4" in out["weights"]["reason"]
    assert out["seedprints"]["verdict"] in {"related", "unrelated"}


def test_bad_inputs(tmp_path, home):
    s0 = str(_zoo(home) / "s0")
    missing = runner.invoke(APP, ["lineage", s0, str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "not found" in str(missing.exception)
    (tmp_path / "notamodel").mkdir()
    not_model = runner.invoke(APP, ["lineage", str(tmp_path / "notamodel"), s0])
    assert not_model.exit_code == 1 and "no config.json" in str(not_model.exception)
    bad_lib = runner.invoke(APP, ["lineage", "identify", s0, "--library", s0])
    assert bad_lib.exit_code == 1 and "is a model directory" in str(bad_lib.exception)
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
    assert all(r["verdict"] == "same seed" for r in ranking[: len(same_seed)])
    assert all(r["verdict"] == "no evidence" for r in ranking if r["model"].startswith("s1"))
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
    assert "lineage_heatmap_seedprints.png" in section

    def no_forward(*args, **kwargs):
        raise AssertionError("an up-to-date lineage stage recomputed features")

    before = (reports / "lineage.json").stat().st_mtime_ns
    monkeypatch.setattr(sp, "model_features", no_forward)
    again = runner.invoke(APP, ["lineage", "run", "--config", str(in_home / "t.toml")])
    assert again.exit_code == 0, again.output
    assert (reports / "lineage.json").stat().st_mtime_ns == before


def test_run_without_zoo_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NATPRINTS_HOME", str(tmp_path))
    (tmp_path / "c.toml").write_text("[run]\nname = 'empty'\n")
    with pytest.raises(NatprintsError, match="no zoo at"):
        ex.run_lineage(load_config(tmp_path / "c.toml"))
