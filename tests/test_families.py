"""The zoo's `arch` factor: four model families built from config at matched sizes, decoded, scored
and fingerprinted like the Llama base."""

from __future__ import annotations

import pytest
import torch

from natprints.artifacts import hash_obj
from natprints.config import ADDED_SETTINGS, ARCHS, Config, load_config
from natprints.generate.sampler import CacheDecoder, decode, make_decoder
from natprints.likelihood.scorer import as_scorer, score_texts
from natprints.lineage.weightstd import weight_profile
from natprints.zoo.spec import condition_members, zoo_specs
from natprints.zoo.train import init_model, model_config
from tests.conftest import SMOKE

SIZE = load_config(SMOKE).sizes["xs"]


@pytest.mark.parametrize("arch", ARCHS)
def test_each_family_has_the_llama_parameter_count_within_four_percent(arch):
    llama = sum(p.numel() for p in init_model(SIZE, 512, 64, 0, 0).parameters())
    model = init_model(SIZE, 512, 64, 0, 0, arch)
    classes = {
        "llama": "LlamaForCausalLM",
        "gpt2": "GPT2LMHeadModel",
        "gptneox": "GPTNeoXForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
    }
    assert type(model).__name__ == classes[arch]
    assert model.config.tie_word_embeddings is False and model_config(arch, SIZE, 512, 64, 0).vocab_size == 512
    assert abs(sum(p.numel() for p in model.parameters()) / llama - 1) < 0.04
    again = init_model(SIZE, 512, 64, 0, 0, arch)  # the init is a function of (arch, size, seed)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


@pytest.mark.parametrize("arch", ["gpt2", "gptneox", "qwen2"])
def test_other_families_decode_through_their_cache_with_full_forward_logits(arch):
    model = init_model(SIZE, 97, 64, 0, 3, arch).eval()
    assert isinstance(make_decoder(model, 3, 11), CacheDecoder)
    ids = torch.randint(1, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(input_ids=ids).logits
        decoder = CacheDecoder(model)
        steps = [decoder.step(ids[:, :6])] + [decoder.step(ids[:, t : t + 1]) for t in range(6, 11)]
        torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 5:], atol=1e-5, rtol=1e-5)
        greedy = decode(model, ids[:, :5], 8, lambda logits: logits.argmax(-1), 0, "cpu")
        hf = model.generate(ids[:, :5], do_sample=False, max_new_tokens=8, pad_token_id=0)[:, 5:]
    assert torch.equal(greedy[:, : hf.size(1)], hf)
    # the likelihood scorer reads any family through its full logits
    score = score_texts(
        as_scorer(model), [[0]], [ids[0].tolist()], eos_id=0, new_tokens=11, temperature=1.0, top_k=0, top_p=1.0
    )[0]
    with torch.inference_mode():
        direct = torch.log_softmax(model(input_ids=torch.cat([torch.tensor([0]), ids[0]])[None]).logits[0].double(), -1)
    expected = direct[torch.arange(11), ids[0]].sum().item()
    assert score.token_logprobs[:11].sum() == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "gptneox"])
def test_weight_std_splits_fused_query_key_value(arch, tmp_path):
    model = init_model(SIZE, 97, 64, 0, 4, arch)
    model.save_pretrained(tmp_path)
    profile = weight_profile(tmp_path)
    for layer in range(SIZE.num_layers):
        if arch == "gpt2":
            attn = model.transformer.h[layer].attn
            q, k, v = attn.c_attn.weight.chunk(3, dim=1)
            o = attn.c_proj.weight
        else:
            attn = model.gpt_neox.layers[layer].attention
            heads, w = SIZE.num_heads, attn.query_key_value.weight
            grouped = w.view(heads, 3 * (SIZE.hidden_size // heads), SIZE.hidden_size)
            q, k, v = (grouped.chunk(3, dim=1)[i] for i in range(3))
            o = attn.dense.weight
        for name, part in zip(("q_proj", "k_proj", "v_proj", "o_proj"), (q, k, v, o), strict=True):
            assert profile.stds[name][layer] == pytest.approx(float(part.detach().double().std(correction=0)))


def test_arch_condition_ids_and_llama_keys():
    cfg = load_config(SMOKE).model_copy(deep=True)
    cfg = cfg.model_copy(update={"conditions": cfg.conditions.model_copy(update={"arch": ["gpt2", "llama"]})})
    members = condition_members(cfg)
    base = "xs-lr3e-3-bs8-init0-data0"
    assert members["arch"] == [base, f"gpt2-{base}"]  # the base's own family is not a variant
    assert zoo_specs(cfg)[f"gpt2-{base}"][0].arch == "gpt2"
    # a config that declares no arch (nor any other later setting) keeps the hash it had before them
    plain = Config.model_validate({"run": {"name": "plain"}})
    dump = plain.model_dump(mode="json")
    for section, key in ADDED_SETTINGS:
        del (dump if section is None else dump[section])[key]
    assert plain.hash() == hash_obj(dump) != cfg.hash()


def test_gpt2_refuses_texts_longer_than_its_learned_positions():
    bad = {"run": {"name": "x"}, "train": {"seq_len": 64}, "conditions": {"arch": ["gpt2"]}}
    with pytest.raises(
        ValueError, match=r"generate.prompt_tokens \+ generate.new_tokens = 80 exceeds train.seq_len = 64"
    ):
        Config.model_validate(bad)
    Config.model_validate({**bad, "conditions": {"arch": ["gptneox"]}})  # rotary positions: no such limit
