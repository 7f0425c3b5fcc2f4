"""The training loop: AdamW, warmup + cosine, clipping, periodic held-out loss, resumable.

Reads top to bottom. The batch at step t is a pure function of (token stream, data seed, t), so a
run resumed from a checkpoint sees exactly the batches an uninterrupted run sees, and ends with
bit-identical weights. The hash of every batch seen is chained into ``token_stream_sha256``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from natprints.artifacts import Manifest, atomic_write_json, temp_path_for
from natprints.config import SizePreset
from natprints.errors import NatprintsError, first_line
from natprints.zoo.spec import ModelSpec

RESUME_POINTER = "resume.json"
RESUME_FILES = ("model.safetensors", "optimizer.pt", "state.json")
_RESUME_DIR = re.compile(r"^resume-\d+$")


def llama_config(preset: SizePreset, vocab_size: int, seq_len: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_heads,
        max_position_embeddings=max(seq_len, 512),
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=False,
    )


def model_config(arch: str, preset: SizePreset, vocab_size: int, seq_len: int, eos_id: int):
    """The transformers config of one architecture at one size preset, at matched parameter counts.

    Every family gets 4 h² attention weights and 3·h·i MLP weights per layer, an untied LM head and no
    dropout: Llama and Qwen2 have three MLP matrices of width i (Qwen2 adds query/key/value biases),
    GPT-2 and GPT-NeoX two of width 3i/2 (with biases; GPT-2 also learns an embedding for each of the
    ``seq_len`` positions it trains on, and reads no longer text).
    """
    from transformers import GPT2Config, GPTNeoXConfig, Qwen2Config

    if arch == "llama":
        return llama_config(preset, vocab_size, seq_len, eos_id)
    h, layers, heads, positions = preset.hidden_size, preset.num_layers, preset.num_heads, max(seq_len, 512)
    two_matrix_width = 3 * preset.intermediate_size // 2
    tokens = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id, "tie_word_embeddings": False}
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=seq_len,
            n_embd=h,
            n_layer=layers,
            n_head=heads,
            n_inner=two_matrix_width,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **tokens,
        )
    if arch == "gptneox":
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=h,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=two_matrix_width,
            max_position_embeddings=positions,
            attention_dropout=0.0,
            hidden_dropout=0.0,
            use_parallel_residual=True,
            **tokens,
        )
    if arch == "qwen2":
        return Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=h,
            intermediate_size=preset.intermediate_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=positions,
            use_sliding_window=False,
            **tokens,
        )
    raise NatprintsError(f"unknown architecture {arch!r}")


def init_model(preset: SizePreset, vocab_size: int, seq_len: int, eos_id: int, init_seed: int, arch: str = "llama"):
    """A freshly initialized model of ``arch``; the init depends only on the architecture, preset and seed."""
    from transformers import AutoModelForCausalLM

    config = model_config(arch, preset, vocab_size, seq_len, eos_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = AutoModelForCausalLM.from_config(config)
    return model


class BatchSchedule:
    """Blocks of ``seq_len + 1`` tokens, shuffled per epoch by the data seed; step -> batch."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, data_seed: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.data_seed = data_seed
        self.n_blocks = (len(tokens) - 1) // seq_len
        if self.n_blocks < 1:
            raise ValueError(f"token stream of {len(tokens)} tokens is shorter than one block")
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.data_seed, epoch]).permutation(self.n_blocks)}
        return self._perms[epoch]

    def batch(self, step: int) -> np.ndarray:
        """The (batch_size, seq_len + 1) token block of ``step``."""
        rows = []
        for i in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, j = divmod(i, self.n_blocks)
            start = int(self._perm(epoch)[j]) * self.seq_len
            rows.append(self.tokens[start : start + self.seq_len + 1])
        return np.stack(rows).astype(np.int64)


def eval_blocks(tokens: np.ndarray, seq_len: int, n: int) -> np.ndarray:
    """The first ``n`` consecutive held-out blocks: a fixed validation set."""
    n = max(1, min(n, (len(tokens) - 1) // seq_len))
    return np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]).astype(np.int64)


def lr_at(step: int, spec: ModelSpec) -> float:
    if spec.warmup_steps and step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    if spec.schedule == "constant":
        return spec.lr
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    floor = spec.lr * spec.min_lr_ratio
    return floor + (spec.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, spec: ModelSpec) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": spec.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=(spec.beta1, spec.beta2), foreach=True)


def loss_of(model, block: torch.Tensor, autocast: bool, device: str) -> torch.Tensor:
    ctx = torch.autocast(device, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        logits = model(input_ids=block[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), block[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_loss(model, blocks: np.ndarray, batch_size: int, autocast: bool, device: str) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        chunk = torch.from_numpy(blocks[i : i + batch_size]).to(device)
        total += loss_of(model, chunk, autocast, device).item() * len(chunk)
        count += len(chunk)
    model.train()
    return total / count


@dataclass
class TrainState:
    """What a resumed run needs besides weights and optimizer: the step, stream hash and curves."""

    step: int = 0
    stream_sha256: str = hashlib.sha256(b"natprints-token-stream").hexdigest()
    train_curve: list[list[float]] = field(default_factory=list)
    heldout_curve: list[list[float]] = field(default_factory=list)
    train_seconds: float = 0.0
    interval_losses: list[float] = field(default_factory=list)


def _save_hf(model, directory: Path) -> None:
    """save_pretrained into a temporary sibling, then rename: a directory is complete or absent."""
    tmp = temp_path_for(directory)
    tmp.unlink()
    model.save_pretrained(str(tmp), safe_serialization=True)
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def _save_resume(out_dir: Path, model, opt, state: TrainState) -> None:
    from safetensors.torch import save_file

    name = f"resume-{state.step:06d}"
    tmp = out_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    atomic_write_json(tmp / "state.json", state.__dict__)
    Manifest(tmp, "resume state").write(name, {"step": state.step}, RESUME_FILES)
    target = out_dir / name
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    atomic_write_json(out_dir / RESUME_POINTER, {"dir": name})
    for old in _resume_dirs(out_dir)[2:]:  # the one before stays: the fallback when this one is unreadable
        shutil.rmtree(old, ignore_errors=True)


def _resume_dirs(out_dir: Path) -> list[Path]:
    """The resume states in ``out_dir``, newest first."""
    return sorted((p for p in out_dir.glob("resume-*") if _RESUME_DIR.match(p.name)), reverse=True)


def _read_resume(src: Path, model) -> tuple[dict, dict, TrainState]:
    """A resume state's weights, optimizer state and train state, checked before any is applied."""
    from safetensors.torch import load_file

    manifest = Manifest(src, "resume state")
    bad = manifest.mismatched() if manifest.exists() else []  # older states without one are only parsed
    if bad:
        raise ValueError(f"{bad[0]} does not match its hash")
    weights = load_file(str(src / "model.safetensors"))
    expected = model.state_dict()
    if weights.keys() != expected.keys() or any(weights[k].shape != expected[k].shape for k in expected):
        raise ValueError("its weights do not fit the model")
    optimizer = torch.load(src / "optimizer.pt", weights_only=True)
    return weights, optimizer, TrainState(**json.loads((src / "state.json").read_text()))


def _load_resume(out_dir: Path, model, opt) -> TrainState | None:
    """The newest readable resume state, applied to ``model`` and ``opt``; an unreadable one (a
    truncated file, a failed hash) falls back to the one before it, then to step 0, and says so."""
    pointer = out_dir / RESUME_POINTER
    if not pointer.is_file():
        return None
    try:
        newest = out_dir / json.loads(pointer.read_text())["dir"]
    except (OSError, ValueError, KeyError, TypeError):
        newest = None
    candidates = [p for p in [newest, *_resume_dirs(out_dir)] if p is not None and p.is_dir()]
    candidates = list(dict.fromkeys(candidates))
    for i, src in enumerate(candidates):
        try:
            weights, optimizer, state = _read_resume(src, model)
            opt.load_state_dict(optimizer)  # checks the groups before it changes anything
        except Exception as exc:  # safetensors, torch and json raise many types for a damaged state
            reason = first_line(exc)
            then = candidates[i + 1].name if i + 1 < len(candidates) else "step 0"
            print(
                f"model {out_dir.name}: resume state {src.name} is unreadable ({reason}); resuming from {then}",
                file=sys.stderr,
                flush=True,
            )
            continue
        model.load_state_dict(weights)
        return state
    if not candidates:
        print(f"model {out_dir.name}: no resume state found; training from step 0", file=sys.stderr, flush=True)
    return None


def clear_resume(out_dir: Path) -> None:
    (out_dir / RESUME_POINTER).unlink(missing_ok=True)
    for old in out_dir.glob("resume-*"):
        shutil.rmtree(old, ignore_errors=True)


def _check_finite(out_dir: Path, which: str, loss: float, step: int) -> None:
    """Stop a diverged model: no non-finite weights are saved as a finished model or passed on."""
    if not math.isfinite(loss):
        raise NatprintsError(
            f"model {out_dir.name} diverged: {which} loss is {loss} at step {step}; "
            "it is not saved (lower train.lr, under a new [run] name)"
        )


def train(
    model,
    spec: ModelSpec,
    tokens: np.ndarray,
    heldout: np.ndarray,
    out_dir: Path,
    *,
    device: str = "cpu",
    autocast: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> TrainState:
    """Train ``model`` in place for ``spec.steps`` steps, resuming from ``out_dir`` when it can.

    Intermediate checkpoints go to ``out_dir/checkpoints/step-XXXXXX``; resumable state to
    ``out_dir/resume-*``. ``stop_after`` ends the run early at that step (to test resumption).
    """
    from tqdm.auto import tqdm

    model.to(device).train()
    opt = make_optimizer(model, spec)
    state = _load_resume(out_dir, model, opt) or TrainState()
    schedule = BatchSchedule(tokens, spec.seq_len, spec.batch_size, spec.data_seed)
    val = eval_blocks(heldout, spec.seq_len, spec.eval_batches * spec.batch_size)
    bar = tqdm(total=spec.steps, initial=state.step, desc="train", unit="step", disable=not progress, leave=False)
    t0 = time.perf_counter()
    for step in range(state.step, spec.steps):
        if stop_after is not None and step >= stop_after:
            break
        block = schedule.batch(step)
        state.stream_sha256 = hashlib.sha256(bytes.fromhex(state.stream_sha256) + block.tobytes()).hexdigest()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec)

        loss = loss_of(model, torch.from_numpy(block).to(device), autocast, device)
        loss.backward()
        if spec.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.interval_losses.append(loss.item())
        _check_finite(out_dir, "training", state.interval_losses[-1], step + 1)
        state.step = step + 1

        if state.step % spec.eval_every == 0 or state.step == spec.steps:
            state.train_curve.append([state.step, float(np.mean(state.interval_losses))])
            state.interval_losses = []
            val_loss = heldout_loss(model, val, spec.batch_size, autocast, device)
            _check_finite(out_dir, "held-out", val_loss, state.step)
            state.heldout_curve.append([state.step, val_loss])
            bar.set_postfix(loss=f"{state.train_curve[-1][1]:.3f}", val=f"{val_loss:.3f}")
        if state.step in spec.checkpoint_steps and state.step < spec.steps:
            _save_hf(model, out_dir / "checkpoints" / f"step-{state.step:06d}")
        if state.step % spec.resume_every == 0 and state.step < spec.steps:
            state.train_seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            _save_resume(out_dir, model, opt, state)
        bar.update(1)
    bar.close()
    state.train_seconds += time.perf_counter() - t0
    return state
