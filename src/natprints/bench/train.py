"""Training throughput: our loop against ``transformers.Trainer`` on the same model, batches and steps.

Both sides start from the same step-0 weights of the run's base model and see the same batches in
the same order (the zoo's :class:`BatchSchedule`), with the same optimizer settings, learning-rate
schedule and gradient clipping. The bench checks that both compute the same loss on the first batch
and reach the same held-out loss after the last step (within float rounding of
the two step loops), so the tokens per second compare equal work.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from natprints.bench.timing import interleaved, torch_profile
from natprints.config import Config
from natprints.errors import NatprintsError

#: Held-out loss after the bench's steps may differ by this much between the two loops (nats).
HELDOUT_TOLERANCE = 1e-3


def model_flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight of every linear map, plus attention scores and mixing."""
    import torch

    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    cfg = model.config
    attention = 12 * cfg.num_hidden_layers * seq_len * cfg.hidden_size
    return 6.0 * linear + attention


def peak_matmul_flops(dtype_name: str, reps: int) -> float:
    """The best square-matmul FLOP/s this process reaches with its torch threads, for one dtype."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    n = 1024 if dtype_name == "fp32" else 512
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    runs = []
    a @ b
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        runs.append(time.perf_counter() - t0)
    return 2 * n**3 / min(runs)


def _bench_spec(cfg: Config, steps: int):
    from natprints.zoo.spec import base_spec

    spec = base_spec(cfg)
    return spec.model_copy(
        update={
            "steps": steps,
            "warmup_steps": min(spec.warmup_steps, max(1, steps // 4)),
            "eval_every": steps,
            "eval_batches": 1,
            "checkpoint_steps": [],
            "resume_every": steps + 1,
        }
    )


def _hf_trainer(model, spec, schedule, steps: int, workdir: Path):
    """A ``transformers.Trainer`` with default settings except what must match our loop.

    It gets our optimizer (AdamW, decay on matrices only) and our warmup + cosine schedule, so both
    loops take the same optimization steps; everything else (collation, loss, clipping, the step
    loop) is the Trainer's own.
    """
    import torch
    from transformers import Trainer, TrainingArguments

    from natprints.zoo.train import lr_at, make_optimizer

    class Batches(torch.utils.data.IterableDataset):
        """The rows of our batch schedule, in order (an iterable dataset: no sampler reorders it)."""

        def __iter__(self):
            for step in range(steps):
                for row in torch.from_numpy(schedule.batch(step)):
                    yield {"input_ids": row[:-1], "labels": row[1:], "shift_labels": row[1:]}

    args = TrainingArguments(
        output_dir=str(workdir),
        per_device_train_batch_size=spec.batch_size,
        max_steps=steps,
        learning_rate=spec.lr,
        weight_decay=spec.weight_decay,
        adam_beta1=spec.beta1,
        adam_beta2=spec.beta2,
        max_grad_norm=spec.grad_clip,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        remove_unused_columns=False,  # keep shift_labels: the targets are given, not re-shifted
        seed=spec.init_seed,
    )
    opt = make_optimizer(model, spec)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step, spec) / spec.lr)
    return Trainer(model=model, args=args, train_dataset=Batches(), optimizers=(opt, sched))


def _dtype_reason(cfg: Config) -> str:
    """Why the run trains in its dtype: the config says so, or what `auto` means on the device."""
    if cfg.run.train_dtype != "auto":
        return f'`train_dtype = "{cfg.run.train_dtype}"` in the config.'
    return '`train_dtype = "auto"`: fp32 on a CPU, bf16 autocast on CUDA (never chosen by a timing).'


def bench_train(cfg: Config, *, steps: int = 8, reps: int = 3, workdir: Path | None = None) -> dict[str, Any]:
    """Tokens/s of our loop and of ``transformers.Trainer``, model FLOP utilization, bf16 vs fp32."""
    import torch

    from natprints.corpus import corpus_manifest, load_tokenizer, load_tokens
    from natprints.zoo.stage import use_autocast
    from natprints.zoo.train import BatchSchedule, eval_blocks, heldout_loss, init_model, loss_of, train

    corpus_manifest(cfg)
    tokenizer = load_tokenizer(cfg.paths.tokenizer)
    tokens = load_tokens(cfg.paths.corpus / "train_tokens.npy")
    heldout = load_tokens(cfg.paths.corpus / "heldout_tokens.npy")
    spec = _bench_spec(cfg, steps)
    preset = cfg.sizes[spec.size]
    schedule = BatchSchedule(tokens, spec.seq_len, spec.batch_size, spec.data_seed)
    val = eval_blocks(heldout, spec.seq_len, spec.batch_size)
    dtype = "bf16" if use_autocast(cfg, "cpu") else "fp32"

    def fresh():
        return init_model(preset, len(tokenizer), spec.seq_len, tokenizer.eos_token_id, spec.init_seed)

    # Same work: both loops compute the same loss on the first batch from the same weights.
    probe, block = fresh(), torch.from_numpy(schedule.batch(0))
    with torch.no_grad():
        ours0 = loss_of(probe, block, False, "cpu").item()
        target = block[:, 1:].contiguous()
        hf0 = probe(input_ids=block[:, :-1], labels=target, shift_labels=target).loss.item()
    if abs(ours0 - hf0) > 1e-4:
        raise NatprintsError(f"bench: first-batch loss differs (ours {ours0:.6f}, Trainer {hf0:.6f})")

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-", dir=workdir))
    finals: dict[str, list[float]] = {"ours": [], "trainer": []}
    counter = iter(range(10**6))

    def ours():
        model = fresh()
        out = tmp / f"ours-{next(counter)}"
        out.mkdir()
        state = train(model, spec, tokens, heldout, out, progress=False)
        finals["ours"].append(state.heldout_curve[-1][1])

    def trainer():
        model = fresh()
        _hf_trainer(model, spec, schedule, steps, tmp / "trainer").train()
        finals["trainer"].append(heldout_loss(model, val, spec.batch_size, False, "cpu"))

    times = interleaved({"ours": ours, "trainer": trainer}, reps=reps, warmup=1)
    gap = abs(statistics.median(finals["ours"]) - statistics.median(finals["trainer"]))
    if gap > HELDOUT_TOLERANCE:
        raise NatprintsError(f"bench: held-out loss after {steps} steps differs by {gap:.3f} between the loops")

    n_tokens = steps * spec.batch_size * spec.seq_len
    ours_tps = n_tokens / times["ours"]["median_s"]
    hf_tps = n_tokens / times["trainer"]["median_s"]

    # One optimizer step in fp32 and under bf16 autocast, and the matmul peaks they are measured against.
    model = fresh()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr)

    def step(autocast: bool):
        def run():
            loss_of(model, block, autocast, "cpu").backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    step_fp32 = interleaved({"fp32": step(False)}, reps=reps, warmup=1)["fp32"]["median_s"]
    step_bf16 = interleaved({"bf16": step(True)}, reps=max(1, reps // 2), warmup=1)["bf16"]["median_s"]
    shares: dict[str, float] = {}
    profile = torch_profile(step(dtype == "bf16"), top=8, shares=shares)
    mm = shares.get("aten::mm", 0.0) + shares.get("aten::bmm", 0.0) + shares.get("aten::addmm", 0.0)
    flops_token = model_flops_per_token(model, spec.seq_len)
    peaks = {d: peak_matmul_flops(d, reps=max(3, reps)) for d in ("fp32", "bf16")}
    tokens_step = spec.batch_size * spec.seq_len
    return {
        "results": {
            "train_tokens_per_s": round(ours_tps, 1),
            "train_hf_trainer_tokens_per_s": round(hf_tps, 1),
            "train_ratio_vs_hf_trainer": round(ours_tps / hf_tps, 3),
            "train_dtype": dtype,
            "train_mfu": round(ours_tps * flops_token / peaks[dtype], 4),
            "train_flops_per_token": flops_token,
            "train_peak_flops_fp32": round(peaks["fp32"]),
            "train_peak_flops_bf16": round(peaks["bf16"]),
            "train_step_s_fp32": round(step_fp32, 4),
            "train_step_s_bf16_autocast": round(step_bf16, 4),
            "train_mfu_fp32_step": round(tokens_step * flops_token / step_fp32 / peaks["fp32"], 4),
            "train_mfu_bf16_step": round(tokens_step * flops_token / step_bf16 / peaks["bf16"], 4),
            "train_heldout_loss_ours": round(statistics.median(finals["ours"]), 4),
            "train_heldout_loss_hf_trainer": round(statistics.median(finals["trainer"]), 4),
            "train_first_batch_loss": round(ours0, 6),
            "train_bench_steps": steps,
            "train_batch_shape": [spec.batch_size, spec.seq_len],
            "train_model": f"{spec.size} (init seed {spec.init_seed})",
            "train_runs_s": {k: v["runs_s"] for k, v in times.items()},
        },
        "profile": ["one training step of our loop (torch.profiler, self CPU time):", *profile],
        "notes": [
            f"Matrix multiplies took {mm:.0%} of one step's self CPU time; both loops run the same "
            f"matmuls, so with every other operator free the ratio could not exceed {1 / max(mm, 1e-9):.2f}.",
            "Same work, checked in the run: the first-batch loss of both loops agrees to 1e-4 and the "
            f"held-out loss after {steps} steps to {HELDOUT_TOLERANCE}. The Trainer gets our AdamW groups "
            "and warmup + cosine schedule; its collation, loss, clipping and step loop are its own. "
            "Each timed run includes its setup (the Trainer's accelerator, our optimizer).",
            f"bf16 autocast on this CPU: one step took {step_bf16:.2f} s against {step_fp32:.2f} s in fp32 "
            f"(peak matmul {peaks['bf16'] / 1e9:.1f} vs {peaks['fp32'] / 1e9:.1f} GFLOP/s). The run trains in "
            f"{dtype}: {_dtype_reason(cfg)}",
        ],
    }
