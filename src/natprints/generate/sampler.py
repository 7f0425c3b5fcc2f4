"""The sampler: incremental decoding with a preallocated KV slab, and one-uniform-per-row draws.

Both are measured against ``model.generate`` in ``make bench``; greedy continuations are
token-identical to it, and the tests check the logits against a full forward pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from natprints.config import GenerateSettings


def filter_logits(logits, top_k: int, top_p: float):
    import torch

    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


class LeanDecoder:
    """Incremental decoding of a Llama model with a preallocated KV slab and fused projections.

    ``model.generate`` spends most of its time outside the model (see make bench): its KV cache grows
    by ``torch.cat`` at every step, copying the whole cache. Here each layer's keys and values go into
    one slab allocated up front, attention reads a view of the filled part (no mask needed when one
    token attends to all earlier ones), the query/key/value and the gate/up projections run as one
    matrix product each (their weights concatenated once), and only the last position reaches the
    LM head. Norms, rotary tables and activations are the model's own modules; the
    tests check the logits against a full forward pass.
    """

    def __init__(self, model, batch: int, capacity: int):
        import torch

        cfg = model.config
        self.model = model
        self.capacity = capacity
        self.length = 0
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.gqa = cfg.num_key_value_heads != cfg.num_attention_heads
        q_width = cfg.num_attention_heads * self.head_dim
        kv_width = cfg.num_key_value_heads * self.head_dim
        self.qkv_split = [q_width, kv_width, kv_width]
        # the LM head as a (hidden, vocab) matrix: the same products, 15% faster than F.linear here
        self.head = model.lm_head.weight.t().contiguous()
        self.layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            biases = [m.bias for m in projections]
            self.layers.append(
                {
                    "layer": layer,
                    "qkv": torch.cat([m.weight for m in projections]),
                    "qkv_bias": None if biases[0] is None else torch.cat(biases),
                    "gate_up": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                    "gate_up_bias": None
                    if mlp.gate_proj.bias is None
                    else torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]),
                    "keys": attn.q_proj.weight.new_empty(batch, cfg.num_key_value_heads, capacity, self.head_dim),
                    "values": attn.q_proj.weight.new_empty(batch, cfg.num_key_value_heads, capacity, self.head_dim),
                }
            )

    def step(self, input_ids):
        """Feed (B, n) new tokens; return the (B, vocab) logits of the last position."""
        import torch
        import torch.nn.functional as F
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        inner = self.model.model
        batch, n = input_ids.shape
        start, end = self.length, self.length + n
        if end > self.capacity:
            raise ValueError(f"KV slab of {self.capacity} positions is full")
        h = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(h, torch.arange(start, end, device=h.device).unsqueeze(0))
        for entry in self.layers:
            layer, keys, values = entry["layer"], entry["keys"], entry["values"]
            attn, mlp = layer.self_attn, layer.mlp
            qkv = F.linear(layer.input_layernorm(h), entry["qkv"], entry["qkv_bias"])
            q, k, v = (t.view(batch, n, -1, self.head_dim).transpose(1, 2) for t in qkv.split(self.qkv_split, -1))
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            if n == 1 and not self.gqa:
                # one query per row: two batched products beat the flash kernel's setup here
                scores = torch.matmul(q, keys[:, :, :end].transpose(-1, -2)).mul_(attn.scaling)
                o = torch.matmul(torch.softmax(scores, dim=-1), values[:, :, :end])
            else:
                o = F.scaled_dot_product_attention(
                    q,
                    keys[:, :, :end],
                    values[:, :, :end],
                    is_causal=n > 1 and start == 0,
                    scale=attn.scaling,
                    enable_gqa=self.gqa,
                )
            h = h + attn.o_proj(o.transpose(1, 2).reshape(batch, n, -1))
            gate_up = F.linear(layer.post_attention_layernorm(h), entry["gate_up"], entry["gate_up_bias"])
            gate, up = gate_up.chunk(2, dim=-1)
            h = h + mlp.down_proj(mlp.act_fn(gate) * up)
        self.length = end
        return inner.norm(h[:, -1]) @ self.head


class CacheDecoder:
    """Incremental decoding of any causal LM through its own forward and KV cache (``LeanDecoder`` is
    written for Llama's modules; other families go this way)."""

    def __init__(self, model):
        self.model = model
        self.cache = None

    def step(self, input_ids):
        out = self.model(input_ids=input_ids, cache=self.cache, use_cache=True)
        self.cache = out.cache
        return out.logits[:, -1]


def make_decoder(model, batch: int, capacity: int):
    return LeanDecoder(model, batch, capacity) if type(model).__name__ == "LlamaForCausalLM" else CacheDecoder(model)


SAMPLE_BLOCK = 64  # vocabulary entries per block of the two-level inverse CDF


def _last_positive(x):
    """(B, n) -> (B, 1): the index of each row's last entry above zero."""
    import torch

    return torch.where(x > 0, torch.arange(x.size(1)), 0).amax(dim=1, keepdim=True)


def _first_positive(x):
    """(B, n) -> (B, 1): the index of each row's first entry above zero."""
    import torch

    return torch.where(x > 0, torch.arange(x.size(1)), x.size(1)).amin(dim=1, keepdim=True)


def draw_tokens(logits, generator):
    """One token per row from softmax(logits), by inverse CDF: one uniform per row.

    ``torch.multinomial`` draws an exponential variate for every vocabulary entry (a fifth of
    ``model.generate``'s time in the profile); this draws from the same distribution with one uniform
    per row, found in two levels: the block of ``SAMPLE_BLOCK`` entries whose cumulative mass
    passes it, then the entry inside that block. Zero-probability tokens (top-k, top-p) are never
    picked: a search lands on an entry whose mass exceeds the uniform, and the clamps keep float
    rounding at a block's edges inside its positive entries.
    """
    import torch
    import torch.nn.functional as F

    probs = torch.softmax(logits, dim=-1)
    batch, vocab = probs.shape
    pad = -vocab % SAMPLE_BLOCK
    blocks = (F.pad(probs, (0, pad)) if pad else probs).view(batch, -1, SAMPLE_BLOCK)
    mass = blocks.sum(-1)
    cdf = mass.cumsum(-1)
    u = torch.rand(batch, 1, generator=generator) * cdf[:, -1:]
    block = torch.searchsorted(cdf, u, right=True).minimum(_last_positive(mass))
    rest = u - (cdf.gather(1, block) - mass.gather(1, block))
    inside = blocks[torch.arange(batch), block.squeeze(1)]
    entry = torch.searchsorted(inside.cumsum(-1), rest, right=True)
    entry = entry.minimum(_last_positive(inside)).maximum(_first_positive(inside))
    return (block * SAMPLE_BLOCK + entry).squeeze(1)


def decode(model, prompt_ids, new_tokens: int, pick, eos_id: int, device: str):
    """Continue a (B, P) batch of equal-length prompts by up to ``new_tokens`` tokens.

    ``pick`` maps the (B, vocab) float32 logits of the last position (on the CPU) to B token ids.
    Returns a (B, new_tokens) int tensor; positions
    after a row's EOS hold EOS.
    """
    import torch

    batch, prompt_len = prompt_ids.shape
    out = torch.full((batch, new_tokens), eos_id, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    decoder = make_decoder(model, batch, prompt_len + new_tokens)
    inputs = prompt_ids.to(device)
    for t in range(new_tokens):
        token = pick(decoder.step(inputs).float().cpu())
        token = torch.where(done, torch.full_like(token, eos_id), token)
        out[:, t] = token
        done |= token == eos_id
        if bool(done.all()):
            break
        inputs = token.unsqueeze(1).to(device)
    return out


def sample_batch(model, prompt_ids, g: GenerateSettings, generator, eos_id: int, device: str):
    """Sample up to ``g.new_tokens`` tokens per prompt with the config's temperature, top-k and top-p."""

    def pick(logits):
        return draw_tokens(filter_logits(logits / g.temperature, g.top_k, g.top_p), generator)

    return decode(model, prompt_ids, g.new_tokens, pick, eos_id, device)
