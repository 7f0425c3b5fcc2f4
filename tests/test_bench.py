"""The generation speedups keep their output, and the bench checks and renders what it measures."""

from __future__ import annotations

import json

import pytest
import torch

from natprints.bench import render_bench, run_bench
from natprints.errors import NatprintsError
from natprints.generate.sampler import LeanDecoder, decode, draw_tokens
from tests.conftest import SMOKE, run_cli


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def test_lean_decoder_gives_the_logits_of_a_full_forward():
    model = tiny_llama()
    ids = torch.randint(1, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(input_ids=ids).logits
        decoder = LeanDecoder(model, 3, 11)
        steps = [decoder.step(ids[:, :6])] + [decoder.step(ids[:, t : t + 1]) for t in range(6, 11)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 5:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="KV slab of 11 positions is full"), torch.inference_mode():
        decoder.step(ids[:, :1])


def test_greedy_decode_matches_model_generate():
    model = tiny_llama(3)
    ids = torch.randint(1, 97, (4, 5), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ours = decode(model, ids, 12, lambda logits: logits.argmax(-1), 0, "cpu")
        hf = model.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=0)[:, 5:]
    assert torch.equal(ours[:, : hf.size(1)], hf)


def test_draw_tokens_samples_the_softmax_and_never_a_masked_token():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 1.0]])).repeat(10_000, 1)
    tokens = draw_tokens(logits, torch.Generator().manual_seed(0)).view(10_000, 2)
    freq = torch.bincount(tokens[:, 0], minlength=4).float() / 10_000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.015) and freq[3] == 0
    assert bool((tokens[:, 1] == 3).all())
    again = draw_tokens(logits, torch.Generator().manual_seed(0)).view(10_000, 2)
    assert torch.equal(tokens, again)  # one generator seed, one draw


def test_bench_stages_and_render(smoke_cfg, tmp_path, monkeypatch):
    record = run_bench(smoke_cfg, ["stages"], reps=1, log=lambda line: None)
    stages = record["sections"]["stages"]["results"]
    assert set(stages["stage_wall_s"]) == {
        "data", "zoo", "generate", "derive", "lineage", "likelihood", "reference", "experiments", "emergence"
    }  # fmt: skip
    assert stages["stage_total_wall_min"] == round(sum(stages["stage_wall_s"].values()) / 60, 1)
    out = smoke_cfg.paths.reports.parent / "bench"
    assert json.loads((out / "bench.json").read_text())["results"]["stage_max_peak_rss_mb"] > 0
    md = (out / "bench.md").read_text()
    assert "| `stage_max_peak_rss_mb` | the largest peak RSS of any stage, MB |" in md
    assert "| `train_ratio_vs_hf_trainer` | our training loop / transformers.Trainer, tokens/s | not measured |" in md
    fake = {**record, "results": {"generate_ratio_vs_hf_generate": 1.5, "stage_total_wall_min": 40.0}}
    assert "| 1.5 | >= 2.0 | **no** |" in render_bench(fake) and "| 40 | <= 45 | yes |" in render_bench(fake)


def test_bench_train_checks_same_work(smoke_cfg):
    from natprints.bench.train import bench_train

    r = bench_train(smoke_cfg, steps=2, reps=1)["results"]
    assert abs(r["train_heldout_loss_ours"] - r["train_heldout_loss_hf_trainer"]) <= 1e-3
    assert r["train_dtype"] == "fp32" and 0 < r["train_mfu"] < 1  # `auto` on a CPU
    assert r["train_tokens_per_s"] > 0 and r["train_batch_shape"] == [8, 64]


def test_bench_generate_checks_same_work(smoke_cfg):
    from natprints.bench.generate import bench_generate

    r = bench_generate(smoke_cfg, reps=1)["results"]
    assert r["generate_greedy_identical"] and r["generate_ratio_vs_hf_generate"] > 0
    assert abs(r["generate_sample_nll_ours"] - r["generate_sample_nll_hf"]) <= 4 * r["generate_sample_nll_se"]


def test_bench_unknown_section_is_one_line_error(smoke_home):
    proc = run_cli("bench", "--config", str(SMOKE), "--section", "nope", home=smoke_home, check=False)
    assert proc.returncode == 1
    sections = "train, generate, likelihood, seedprints, embed, attribute, stages"
    assert proc.stderr.strip() == f"error: unknown bench section(s) nope; choose from {sections}"


def test_bench_missing_stage_timings(fresh_home):
    from natprints.bench import bench_stages
    from natprints.config import load_config

    with pytest.raises(NatprintsError, match="no stage timings for run 'smoke'; run `make all` first"):
        bench_stages(load_config(SMOKE))


def test_draw_tokens_across_block_edges():
    """Mass only at block edges (and a padded last block): the two-level search keeps the softmax."""
    probs = torch.zeros(200)
    probs[[0, 63, 64, 127, 199]] = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15])
    logits = torch.log(probs).repeat(20_000, 1)
    tokens = draw_tokens(logits, torch.Generator().manual_seed(3))
    freq = torch.bincount(tokens, minlength=200).float() / 20_000
    assert set(tokens.unique().tolist()) <= {0, 63, 64, 127, 199}
    assert torch.allclose(freq, probs, atol=0.012)


def test_a_section_measured_elsewhere_says_where(smoke_cfg):
    out = smoke_cfg.paths.reports.parent / "bench"
    path = out / "bench.json"
    before = path.read_text() if path.is_file() else None
    other = {"cpu": "Other CPU", "cores": 8, "torch_threads": 1, "torch_cpu_capability": "AVX2"}
    old = {"wall_s": 1.0, "reps": 1, "results": {}, "profile": [], "notes": []}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"sections": {"train": old}, "run": "default", "machine": other}))
    try:
        record = run_bench(smoke_cfg, ["stages"], reps=1, log=lambda line: None)
        md = (out / "bench.md").read_text()
        train, stages = md.split("## train")[1].split("## ")[0], md.split("## stages")[1]
        assert "Measured in run `default` on Other CPU, CPU capability AVX2." in train
        assert "Measured in" not in stages and record["sections"]["stages"]["run"] == "smoke"
        assert record["sections"]["train"]["machine"] == other and record["machine"] != other
    finally:
        if before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(before)


def test_rounds_alternate_contenders_unit_by_unit_and_pair_their_ratios():
    from natprints.bench.timing import paired_ratio, rounds

    order: list[str] = []
    timed = rounds({name: [lambda n=name, j=j: order.append(f"{n}{j}") for j in range(3)] for name in "ab"}, reps=2)
    assert order == ["a0", "a1", "a2", "b0", "b1", "b2"] + ["a0", "b0", "a1", "b1", "a2", "b2"] * 2
    assert len(timed["a"]["runs_s"]) == 2
    fake = {"ours": {"runs_s": [2.0, 1.0, 4.0]}, "base": {"runs_s": [1.0, 1.0, 1.0]}}
    assert paired_ratio(fake, "ours", "base") == 0.5  # median of 0.5, 1.0, 0.25
    with pytest.raises(ValueError, match="same number of units"):
        rounds({"a": [print], "b": [print, print]})
