"""`make bench`: every hot path measured side by side with what a user would otherwise run.

Each section times our code and the plain alternative in one process (or, for the CLI, one bench
run), round-robin after a warm-up, on the same model, data and batch shapes, checks that both did
the same work, and returns its figures, a profiler's top entries and notes. :func:`run_bench` writes
``reports/bench/bench.json`` and ``bench.md``; running some sections updates theirs and keeps the rest.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from natprints.artifacts import atomic_write_json, atomic_write_text, git_revision, package_versions
from natprints.config import Config
from natprints.config import home as config_home
from natprints.errors import NatprintsError

SECTIONS = ("train", "generate", "likelihood", "seedprints", "embed", "attribute", "stages")

#: key -> (what, target as text, predicate on the value or None when the figure is only reported)
TARGETS: dict[str, tuple[str, str, Callable[[Any], bool] | None]] = {
    "train_ratio_vs_hf_trainer": ("our training loop / transformers.Trainer, tokens/s", ">= 2.0", lambda v: v >= 2.0),
    "train_mfu": ("model FLOP/s over measured peak matmul FLOP/s (training dtype)", "report", None),
    "generate_ratio_vs_hf_generate": ("our sampler / model.generate, tokens/s", ">= 2.0", lambda v: v >= 2.0),
    "likelihood_ratio_vs_naive": ("our scorer / model(ids).logits + log_softmax + gather, tokens/s", "report", None),
    "likelihood_logp_ratio_vs_limit": (
        "our scorer, log p alone (what the plain loop computes) / trunk forward + LM head only (the limit)",
        ">= 0.9",
        lambda v: v >= 0.9,
    ),
    "likelihood_ratio_vs_limit": ("our scorer with each position's entropy and variance / the limit", "report", None),
    "seedprints_tau_speedup": ("per-column Kendall tau, O(N log N) / the O(N^2) loop, N=2000, k=128", "report", None),
    "embed_ratio_vs_sentence_transformers": ("our embedder / SentenceTransformer.encode", ">= 1.5", lambda v: v >= 1.5),
    "attribute_ngram_texts_per_s": ("`natprints attribute`, n-gram attributor", ">= 2000", lambda v: v >= 2000),
    "attribute_ngram_cold_start_s": ("launch to first answer, n-gram attributor", "<= 2 s", lambda v: v <= 2.0),
    "attribute_embed_texts_per_s": ("`natprints attribute`, embedding attributor", "report", None),
    "stage_total_wall_min": ("the whole default run (make all), minutes", "<= 45", lambda v: v <= 45),
    "stage_max_peak_rss_mb": ("the largest peak RSS of any stage, MB", "<= 8192", lambda v: v <= 8192),
}

EMBED_TEXTS = 2000
ATTRIBUTE_TEXTS = 10_000


def bench_dir(cfg: Config) -> Path:
    return cfg.paths.reports.parent / "bench"


def bench_stages(cfg: Config) -> dict[str, Any]:
    """Wall time and peak RSS of each stage of the last full run of ``cfg``, from its timings record."""
    from natprints.records import read_timings

    timings = read_timings(cfg.paths.reports)
    if not timings:
        raise NatprintsError(f"bench: no stage timings for run {cfg.run.name!r}; run `make all` first")
    wall = {stage: t["wall_s"] for stage, t in timings.items()}
    rss = {stage: t["peak_rss_mb"] for stage, t in timings.items()}
    return {
        "results": {
            "stage_wall_s": wall,
            "stage_peak_rss_mb": rss,
            "stage_total_wall_min": round(sum(wall.values()) / 60, 1),
            "stage_max_peak_rss_mb": max(rss.values()),
            "stage_workers_threads": {s: f"{t['workers']}x{t['threads']}" for s, t in timings.items()},
            "stage_finished_at": {s: t.get("finished_at") for s, t in timings.items()},
        },
        "profile": [],
        "notes": [],
    }


def _generated_texts(cfg: Config, n: int) -> list[str]:
    import pandas as pd

    files = sorted(cfg.paths.generated.glob("*.parquet"))
    if not files:
        raise NatprintsError(f"bench: no generated texts for run {cfg.run.name!r}; run `natprints generate` first")
    texts: list[str] = []
    for path in files:
        texts.extend(pd.read_parquet(path, columns=["text"])["text"].tolist())
        if len(texts) >= n:
            break
    return texts[:n]


LIKELIHOOD_ROWS = 250  # generated texts of the base model scored under it


def _bench_likelihood(cfg: Config, reps: int) -> dict[str, Any]:
    """The likelihood scorer on the base model's own texts, against the plain loop and the limit."""
    import pandas as pd

    from natprints.bench.likelihood import bench_likelihood
    from natprints.corpus import load_tokenizer
    from natprints.generate.stage import build_prompts
    from natprints.runtime import load_lm
    from natprints.zoo import zoo_specs

    base = next(iter(zoo_specs(cfg)))
    path = cfg.paths.generated / f"{base}.parquet"
    if not path.is_file():
        raise NatprintsError(f"bench: no generated texts of {base}; run `natprints generate` first")
    rows = pd.read_parquet(path, columns=["prompt_id", "token_ids"]).iloc[:LIKELIHOOD_ROWS]
    prompts = build_prompts(cfg).set_index("prompt_id")["prompt_token_ids"]
    model = load_lm(cfg.paths.zoo / base)
    out = bench_likelihood(
        model,
        [[int(t) for t in prompts.loc[p]] for p in rows["prompt_id"]],
        [[int(t) for t in ids] for ids in rows["token_ids"]],
        eos_id=load_tokenizer(cfg.paths.tokenizer).eos_token_id,
        new_tokens=cfg.generate.new_tokens,
        reps=reps,
        threads=cfg.run.threads or 1,
    )
    return {
        "results": out["results"],
        "profile": [],
        "notes": [f"{base}, {len(rows)} texts: " + "; ".join(out["notes"])],
    }


def _run_section(name: str, cfg: Config, reps: int, workdir: Path) -> dict[str, Any]:
    if name == "train":
        from natprints.bench.train import bench_train

        return bench_train(cfg, reps=reps, workdir=workdir)
    if name == "generate":
        from natprints.bench.generate import bench_generate

        return bench_generate(cfg, reps=reps)
    if name == "likelihood":
        return _bench_likelihood(cfg, reps)
    if name == "seedprints":
        from natprints.bench.seedprints import bench_seedprints

        return bench_seedprints(reps=reps)
    if name == "embed":
        from natprints.bench.embed import bench_embed

        return bench_embed(_generated_texts(cfg, EMBED_TEXTS), reps=reps, cache_dir=workdir / "embed-cache")
    if name == "attribute":
        from natprints.bench.attribute import bench_attribute

        home = config_home()
        return bench_attribute(home, cfg.run.name, n_texts=ATTRIBUTE_TEXTS, reps=reps, workdir=workdir)
    return bench_stages(cfg)


def machine() -> dict[str, Any]:
    """What a timing depends on: :func:`natprints.artifacts.machine` (the CPU's vector capability, a
    GPU) plus the CPU's name, its cores, torch's threads and the Python version."""
    import torch

    from natprints.artifacts import machine as artifact_machine

    facts = artifact_machine()
    cpu = platform.processor() or facts["machine"]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": facts["cpu_capability"],
        "python": platform.python_version(),
        **({"gpu": facts["gpu"]} if "gpu" in facts else {}),
    }


def run_bench(cfg: Config, sections: list[str], reps: int, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``sections`` and merge them into ``reports/bench/bench.json``; render ``bench.md``."""
    import torch

    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise NatprintsError(f"unknown bench section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    out = bench_dir(cfg)
    path = out / "bench.json"
    record = json.loads(path.read_text()) if path.is_file() else {"sections": {}}
    for kept in record["sections"].values():  # sections measured earlier keep where they were measured
        kept.setdefault("run", record.get("run"))
        kept.setdefault("machine", record.get("machine"))
    here = machine()
    with tempfile.TemporaryDirectory(prefix="natprints-bench-") as tmp:
        for name in sections:
            log(f"bench: {name} ...")
            t0 = time.perf_counter()
            section = _run_section(name, cfg, reps, Path(tmp))
            section["wall_s"] = round(time.perf_counter() - t0, 1)
            section["reps"] = reps
            section["run"], section["machine"] = cfg.run.name, here
            record["sections"][name] = section
            log(f"bench: {name} done in {section['wall_s']} s")
    record.update(
        {
            "run": cfg.run.name,
            "machine": here,
            "package_versions": package_versions(),
            "git_revision": git_revision(),
            "results": {
                k: v for s in SECTIONS if s in record["sections"] for k, v in record["sections"][s]["results"].items()
            },
        }
    )
    atomic_write_json(path, record)
    atomic_write_text(out / "bench.md", render_bench(record))
    return record


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def render_bench(record: dict[str, Any]) -> str:
    results = record["results"]
    m = record["machine"]
    lines = [
        "# natprints bench",
        "",
        f"Produced by `make bench`, last in run `{record['run']}`. Machine: {m['cpu']}, {m['cores']} cores, "
        f"torch threads {m['torch_threads']} on both sides of every comparison, CPU capability "
        f"{m['torch_cpu_capability']}; a section measured in another run or on another machine says where. "
        "Each figure is the median of the repetitions listed in bench.json, after a warm-up; contenders ran "
        "round-robin in one process.",
        "",
        "## Targets",
        "",
        "| key | what | value | target | met |",
        "|---|---|---|---|---|",
    ]
    for key, (what, target, ok) in TARGETS.items():
        if key not in results:
            lines.append(f"| `{key}` | {what} | not measured | {target} | |")
            continue
        value = results[key]
        met = "" if ok is None else ("yes" if ok(value) else "**no**")
        lines.append(f"| `{key}` | {what} | {_fmt(value)} | {target} | {met} |")
    for name in SECTIONS:
        section = record["sections"].get(name)
        if not section:
            continue
        where = ""
        if section.get("machine") and (section["machine"] != m or section.get("run") != record["run"]):
            sm = section["machine"]
            where = f" Measured in run `{section['run']}` on {sm['cpu']}, CPU capability {sm['torch_cpu_capability']}."
        lines += [
            "",
            f"## {name}",
            "",
            f"Section wall time {section['wall_s']} s, {section['reps']} repetitions.{where}",
            "",
        ]
        lines += ["| key | value |", "|---|---|"]
        lines += [f"| `{k}` | {_fmt(v)} |" for k, v in section["results"].items()]
        if section["notes"]:
            lines += ["", *[f"- {note}" for note in section["notes"]]]
        if section["profile"]:
            lines += ["", "```", *section["profile"], "```"]
    return "\n".join(lines) + "\n"
