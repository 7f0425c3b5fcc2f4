"""Weight-std fingerprint: profiles from crafted safetensors, the correlation score, errors."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from natprints.errors import NatprintsError
from natprints.lineage import weightstd as ws


def crafted(path: Path, stds: dict[str, list[float]], prefix: str = "model.layers") -> Path:
    """A model dir whose projection weights have exactly the given per-layer std."""
    path.mkdir(parents=True)
    layers = len(next(iter(stds.values())))
    tensors = {"model.embed_tokens.weight": torch.randn(10, 8)}
    for proj, values in stds.items():
        for i, sd in enumerate(values):
            base = torch.tensor([1.0, -1.0] * 32).reshape(8, 8)  # population std 1, mean 0
            tensors[f"{prefix}.{i}.self_attn.{proj}.weight"] = base * sd
            tensors[f"{prefix}.{i}.mlp.up_proj.weight"] = torch.randn(16, 8) * 5
    save_file(tensors, str(path / "model.safetensors"))
    config = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": layers, "vocab_size": 10}
    (path / "config.json").write_text(json.dumps(config))
    return path


RISING = {"q_proj": [1.0, 2.0, 3.0, 5.0], "k_proj": [1.0, 1.5, 1.2, 2.0], "v_proj": [3.0, 2.0, 2.5, 1.0]}
RISING["o_proj"] = [0.5, 0.4, 0.9, 1.0]


def test_profile_reads_exact_per_layer_stds(tmp_path):
    profile = ws.weight_profile(crafted(tmp_path / "a", RISING))
    assert profile.num_layers == 4
    for proj, values in RISING.items():
        np.testing.assert_allclose(profile.stds[proj], values, rtol=1e-6)


def test_score_is_mean_pearson_of_zscored_sequences(tmp_path):
    a = ws.weight_profile(crafted(tmp_path / "a", RISING))
    # an affine change of every sequence leaves the z-scores, hence the score, unchanged
    scaled = {p: [2 * v + 0.3 for v in vs] for p, vs in RISING.items()}
    assert ws.compare_profiles(a, ws.weight_profile(crafted(tmp_path / "b", scaled))).score == pytest.approx(1.0)
    other = {p: list(reversed(vs)) for p, vs in RISING.items()}
    result = ws.compare_profiles(a, ws.weight_profile(crafted(tmp_path / "c", other)), threshold=0.9)
    for proj, values in RISING.items():
        expected = np.corrcoef(values, list(reversed(values)))[0, 1]
        assert result.per_matrix[proj] == pytest.approx(expected)
    assert result.score == pytest.approx(np.mean([np.corrcoef(v, v[::-1])[0, 1] for v in RISING.values()]))
    assert not result.related


def test_threshold_decides_related(tmp_path):
    a = ws.weight_profile(crafted(tmp_path / "a", RISING))
    nudged = dict(RISING, q_proj=[1.0, 2.2, 2.9, 5.0])
    b = ws.weight_profile(crafted(tmp_path / "b", nudged))
    score = ws.compare_profiles(a, b).score
    assert 0.9 < score < 1.0
    assert ws.compare_profiles(a, b, threshold=0.9).related
    assert not ws.compare_profiles(a, b, threshold=0.9999).related


def test_constant_sequences_are_undefined_not_related(tmp_path):
    flat = {p: [1.0, 1.0, 1.0, 1.0] for p in RISING}
    a = ws.weight_profile(crafted(tmp_path / "a", flat))
    result = ws.compare_profiles(a, a)
    assert all(v is None for v in result.per_matrix.values())
    assert math.isnan(result.score) and not result.related
    assert result.to_dict()["score"] is None


def test_layer_count_mismatch_names_what_differs(tmp_path):
    a = crafted(tmp_path / "a", RISING)
    b = crafted(tmp_path / "b", {p: vs[:3] for p, vs in RISING.items()})
    with pytest.raises(NatprintsError, match="num_hidden_layers 4 vs 3"):
        ws.weights_compare(a, b)


def test_models_without_llama_projections_are_refused(tmp_path):
    path = tmp_path / "gpt2ish"
    path.mkdir()
    save_file({"h.0.attn.c_attn.weight": torch.randn(8, 24)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"n_embd": 8, "n_layer": 1, "vocab_size": 10}))
    with pytest.raises(NatprintsError, match="q_proj, k_proj, v_proj, o_proj"):
        ws.weight_profile(path)


def test_config_layer_count_must_match_weights(tmp_path):
    path = crafted(tmp_path / "a", RISING)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 6}))
    with pytest.raises(NatprintsError, match="config.json says 6"):
        ws.weight_profile(path)


def test_corrupt_weights_file_is_a_clear_error(tmp_path):
    path = crafted(tmp_path / "a", RISING)
    (path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(NatprintsError, match="cannot read"):
        ws.weight_profile(path)


def test_real_llama_directory(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "init")
    profile = ws.weight_profile(tmp_path / "init")
    q0 = model.model.layers[0].self_attn.q_proj.weight.detach().double()
    assert profile.stds["q_proj"][0] == pytest.approx(float(q0.std(correction=0)))
    assert ws.weights_compare(tmp_path / "init", tmp_path / "init").score == pytest.approx(1.0)
