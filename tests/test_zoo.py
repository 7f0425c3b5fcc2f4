import numpy as np
import pytest

from natprints.artifacts import read_manifest, sha256_file
from natprints.zoo import zoo_specs
from natprints.zoo.spec import format_lr
from natprints.zoo.stage import build_zoo
from natprints.zoo.train import BatchSchedule, lr_at
from tests.conftest import SMOKE, copy_stage, run_cli

BASE = "xs-lr3e-3-bs8-init0-data0"
SEED1 = "xs-lr3e-3-bs8-init1-data1"
INIT1 = "xs-lr3e-3-bs8-init1-data0"
GPT2 = f"gpt2-{BASE}"
GPTNEOX = f"gptneox-{BASE}"


def test_model_ids_and_conditions(smoke_cfg):
    specs = zoo_specs(smoke_cfg)
    assert {m: c for m, (_, c) in specs.items()} == {
        BASE: ["seed", "init", "arch"],
        SEED1: ["seed"],
        "xs-lr3e-3-bs8-init2-data2": ["seed"],
        INIT1: ["init"],
        GPT2: ["arch"],
        GPTNEOX: ["arch"],
    }
    assert {m: s.arch for m, (s, _) in specs.items() if s.arch != "llama"} == {GPT2: "gpt2", GPTNEOX: "gptneox"}
    assert [format_lr(x) for x in (1e-3, 3e-4, 0.0025, 0.01)] == ["1e-3", "3e-4", "2.5e-3", "1e-2"]


def test_batch_schedule_is_a_pure_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.int32)
    a, b = BatchSchedule(tokens, 10, 4, 0), BatchSchedule(tokens, 10, 4, 0)
    assert np.array_equal(a.batch(30), b.batch(30)) and a.batch(30).shape == (4, 11)
    assert not np.array_equal(a.batch(0), BatchSchedule(tokens, 10, 4, 1).batch(0))
    epoch = np.concatenate([a.batch(s)[:, 0] for s in range(99 // 4)])  # 99 blocks per epoch
    assert len(set(epoch.tolist())) == len(epoch)  # no block repeats within an epoch


def test_lr_schedule_warmup_then_cosine(smoke_cfg):
    spec = zoo_specs(smoke_cfg)[BASE][0]
    assert lr_at(0, spec) == pytest.approx(spec.lr / spec.warmup_steps)
    assert lr_at(spec.warmup_steps, spec) == pytest.approx(spec.lr)
    assert lr_at(spec.steps, spec) == pytest.approx(spec.lr * spec.min_lr_ratio)


def test_manifests_record_identical_data(smoke_cfg):
    m = {mid: read_manifest(smoke_cfg.paths.zoo / mid) for mid in zoo_specs(smoke_cfg)}
    assert len({x["corpus_sha256"] for x in m.values()}) == 1
    # init-only variants see exactly the base's token stream; seed variants do not
    assert m[INIT1]["token_stream_sha256"] == m[BASE]["token_stream_sha256"]
    assert m[SEED1]["token_stream_sha256"] != m[BASE]["token_stream_sha256"]
    base = m[BASE]
    for key in (
        "model_id",
        "conditions",
        "init_seed",
        "data_seed",
        "spec",
        "steps",
        "tokens_seen",
        "train_curve",
        "heldout_curve",
        "tokens_per_second",
        "wall_s",
        "package_versions",
        "git_revision",
        "machine",
        "key",
    ):
        assert key in base
    assert base["machine"]["cpu_capability"]  # which kind of CPU made the weights: bit-identity holds per kind
    assert base["tokens_seen"] == 40 * 8 * 64 and base["steps"] == 40
    assert [s for s, _ in base["heldout_curve"]] == [10, 20, 30, 40]
    assert base["heldout_curve"][-1][1] < base["heldout_curve"][0][1]
    assert base["checkpoints"] == ["step-000010", "step-000020"]
    model_dir = smoke_cfg.paths.zoo / BASE
    assert base["files"]["model.safetensors"] == sha256_file(model_dir / "model.safetensors")
    assert (model_dir / "init" / "model.safetensors").is_file()
    assert not list(model_dir.glob("resume-*"))


def test_automodel_loads_a_zoo_model(smoke_cfg):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smoke_cfg.paths.zoo / BASE))
    assert model.config.model_type == "llama" and model.config.hidden_size == 64
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 512)
    init = AutoModelForCausalLM.from_pretrained(str(smoke_cfg.paths.zoo / BASE / "init"))
    assert not torch.equal(init.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_retraining_is_bit_identical_and_resume_equals_uninterrupted(smoke_cfg, smoke_home, fresh_home):
    copy_stage(smoke_home, fresh_home, "data", "corpus", "smoke")
    smoke_zoo = smoke_home / "models" / "smoke" / "zoo"  # smoke_cfg.paths now point at fresh_home
    want = read_manifest(smoke_zoo / BASE)
    target = fresh_home / "models" / "smoke" / "zoo" / BASE
    # interrupted at step 15 (last resumable state: step 10), then resumed to the end
    build_zoo(smoke_cfg, only=[BASE], stop_after=15)
    assert (target / "resume.json").is_file() and not (target / "manifest.json").exists()
    build_zoo(smoke_cfg, only=[BASE])
    got = read_manifest(target)
    assert got["files"]["model.safetensors"] == want["files"]["model.safetensors"]
    assert got["token_stream_sha256"] == want["token_stream_sha256"]
    assert got["heldout_curve"] == want["heldout_curve"]
    # a second, uninterrupted training of the same spec is bit-identical as well
    proc = run_cli("zoo", "--config", str(SMOKE), "--model", INIT1, home=fresh_home)
    assert "trained 1 model" in proc.stdout
    again = read_manifest(fresh_home / "models" / "smoke" / "zoo" / INIT1)
    assert again["files"]["model.safetensors"] == read_manifest(smoke_zoo / INIT1)["files"]["model.safetensors"]
    # and an existing model is not retrained
    assert "trained 0 model" in run_cli("zoo", "--config", str(SMOKE), "--model", INIT1, home=fresh_home).stdout


def test_derived_models_name_their_parent(smoke_cfg):
    m = read_manifest(smoke_cfg.paths.zoo / f"{SEED1}+kjv")
    assert m["parent"] == SEED1 and m["derived_from_corpus"] == "kjv" and m["init_seed"] == 1
    assert m["corpus_sha256"] != read_manifest(smoke_cfg.paths.zoo / SEED1)["corpus_sha256"]
