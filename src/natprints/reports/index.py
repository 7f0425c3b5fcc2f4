"""The run's ``index.md`` and ``zoo.md``, rendered from manifests and result records."""

from __future__ import annotations

from pathlib import Path

from natprints.artifacts import MANIFEST, Manifest, atomic_write_text, read_manifest
from natprints.config import Config
from natprints.declared import DECLARED, STRINGS
from natprints.errors import NatprintsError
from natprints.records import LINEAGE_CSV, RESULTS_FILE, TEXT_EMERGENCE_CSV, read_timings

STAGE_ORDER = (
    "data",
    "zoo",
    "generate",
    "derive",
    "lineage",
    "likelihood",
    "reference",
    "experiments",
    "emergence",
    "report",
)


def relative_improvement_last_20pct(curve: list[list[float]], steps: int) -> float | None:
    """(loss at 80% of steps - final loss) / loss at 80%: how much the held-out loss still moved."""
    if len(curve) < 2:
        return None
    cutoff = 0.8 * steps
    before = [loss for step, loss in curve if step <= cutoff]
    if not before:
        return None
    start = before[-1]
    return (start - curve[-1][1]) / start


def zoo_rows(cfg: Config) -> list[dict]:
    """One record per zoo and derived model that has a manifest, in zoo order."""
    rows = []
    zoo = cfg.paths.zoo
    if not zoo.is_dir():
        return rows
    for model_dir in sorted(zoo.iterdir()):
        if not (model_dir / MANIFEST).is_file():
            continue
        m = read_manifest(model_dir, "model")
        rows.append(
            {
                "model_id": m["model_id"],
                "conditions": ", ".join(m["conditions"]),
                "parent": m.get("parent") or "",
                "n_params": m["n_params"],
                "tokens_seen": m["tokens_seen"],
                "final_heldout_loss": m["final_heldout_loss"],
                "last20_improvement": relative_improvement_last_20pct(m["heldout_curve"], m["steps"]),
                "tokens_per_second": m["tokens_per_second"],
                "wall_s": m["wall_s"],
                "token_stream_sha256": m["token_stream_sha256"],
            }
        )
    return rows


def render_zoo(cfg: Config) -> str:
    rows = zoo_rows(cfg)
    if not rows:
        raise NatprintsError(f"no trained models for run '{cfg.run.name}'; run `natprints zoo` first")
    lines = [
        f"# Zoo of run `{cfg.run.name}`",
        "",
        "Rendered from the models' manifests. *Last 20%*: relative drop of the held-out loss over the "
        "last 20% of training steps (small = flattened). *Stream*: first 12 hex digits of the hash of "
        "the exact token batches the model saw, in order.",
        "",
        "| model | conditions | parent | parameters | tokens seen | held-out loss | last 20% | tokens/s "
        "| wall time (s) | stream |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        imp = "" if r["last20_improvement"] is None else f"{100 * r['last20_improvement']:.2f}%"
        lines.append(
            f"| `{r['model_id']}` | {r['conditions']} | {r['parent']} | {r['n_params']:,} | {r['tokens_seen']:,} "
            f"| {r['final_heldout_loss']:.3f} | {imp} | {r['tokens_per_second']:,.0f} | {r['wall_s']:.0f} "
            f"| `{r['token_stream_sha256'][:12]}` |"
        )
    return "\n".join(lines) + "\n"


def write_zoo_report(cfg: Config) -> Path:
    path = cfg.paths.reports / "zoo.md"
    atomic_write_text(path, render_zoo(cfg))
    return path


def _generated_summary(cfg: Config) -> str:
    path = cfg.paths.generated / MANIFEST
    if not path.is_file():
        return ""
    m = read_manifest(cfg.paths.generated, "generated corpora")
    s = m["sampling"]
    return (
        (
            f"Generated corpora: {len(m['models'])} models + the null control, {m['prompts']} held-out prompts of "
            f"{s['prompt_tokens']} tokens, {s['samples_per_prompt']} sample(s) each, up to {s['new_tokens']} new "
            f"tokens, temperature {s['temperature']:g}, top-k {s['top_k']}, top-p {s['top_p']:g}.\n"
        )
        + _strings_summary(m)
        + _declared_summary(m)
    )


def _strings_summary(m: dict) -> str:
    """The zoo's models with tokenizers of their own: their texts, cut to the character budget."""
    section = m.get(STRINGS)
    if not isinstance(section, dict):
        return ""
    short = sum(e["short_of_budget"] for e in section["models"].values())
    conditions = "; ".join(f"`{c}`: {', '.join(f'`{x}`' for x in ms)}" for c, ms in section["conditions"].items())
    return (
        f"\nModels with tokenizers of their own ({conditions}) read the same prompts as text and write "
        f"continuations cut to {m['sampling'].get('max_chars', 0)} characters at a word boundary (before any "
        f"undecodable bytes); {short} of their texts were ended by the token cap short of that budget.\n"
    )


def _declared_summary(m: dict) -> str:
    """The declared models: where they came from, the digests their texts were written with, and the
    conditions their factors formed."""
    section = m.get(DECLARED)
    if not isinstance(section, dict):
        return ""
    budget = m["sampling"].get("max_chars", 0)
    lines = [
        f"\n### Declared models\n\nModels this run did not train, each reading the prompts as text with its own "
        f"tokenizer; every continuation is cut to {budget} characters at a word boundary. *Short of budget*: "
        "texts that the token cap (`new_tokens`) ended before the character budget did.\n",
        "| model | factors | source | weights sha256 | tokenizer sha256 | short of budget |",
        "|---|---|---|---|---|---:|",
    ]
    for label, e in section["models"].items():
        factors = ", ".join(f"{k} = {v}" for k, v in e["factors"].items()) or "–"
        lines.append(
            f"| `{label}` | {factors} | `{e['source']}` | `{e['model_sha256'][:12]}` | "
            f"`{e['tokenizer_sha256'][:12]}` | {e['short_of_budget']} |"
        )
    conditions = "; ".join(f"`{c}`: {', '.join(ms)}" for c, ms in section["conditions"].items())
    return "\n".join(lines) + f"\n\nConditions: {conditions or 'none (fewer than two models per factor)'}.\n"


def write_index(cfg: Config) -> Path:
    """reports/<run>/index.md: the zoo, then the attribution and lineage sections where they exist."""
    sections = [f"# natprints report: run `{cfg.run.name}`\n", "## Zoo\n\n" + render_zoo(cfg).split("\n", 2)[2]]
    summary = _generated_summary(cfg)
    if summary:
        sections.append(summary)
    if (cfg.paths.reports / RESULTS_FILE).is_file():
        from natprints.reports.attribution import render_section

        sections.append(render_section(cfg))
    if (cfg.paths.reports / LINEAGE_CSV).is_file():
        from natprints.reports.lineage import render_section as render_lineage

        sections.append(render_lineage(cfg))
    if (cfg.paths.reports / TEXT_EMERGENCE_CSV).is_file():
        from natprints.reports.emergence import render_section as render_emergence

        sections.append(render_emergence(cfg))
    timings = render_timings(cfg)
    if timings:
        sections.append(timings)
    sections.insert(1, render_provenance(cfg))
    path = cfg.paths.reports / "index.md"
    atomic_write_text(path, "\n".join(sections))
    write_zoo_report(cfg)
    from natprints.reports.summary import write_summary

    write_summary(cfg)
    return path


def render_timings(cfg: Config) -> str:
    timings = read_timings(cfg.paths.reports)
    if not timings:
        return ""
    lines = [
        "## Stage timings",
        "",
        "Wall time and peak resident memory of the last invocation of each stage that did work "
        "(`reports/<run>/timings.json`).",
        "",
        "| stage | wall time (min) | peak RSS (MB) | workers × threads |",
        "|---|---:|---:|---|",
    ]
    total = 0.0
    for stage in [s for s in STAGE_ORDER if s in timings]:
        t = timings[stage]
        total += t["wall_s"]
        lines.append(
            f"| {stage} | {t['wall_s'] / 60:.1f} | {t['peak_rss_mb']:,.0f} | {t['workers']} × {t['threads']} |"
        )
    lines.append(f"| **total** | **{total / 60:.1f}** | | |")
    return "\n".join(lines) + "\n"


def render_provenance(cfg: Config) -> str:
    """Which code, config, dtype and CPU made the report: from the stage timings and the zoo's manifests.

    Results reproduce bit for bit on one kind of CPU only, so a reader needs all four to compare a rerun.
    """
    from natprints.artifacts import git_revision

    timings = read_timings(cfg.paths.reports)
    stages = [s for s in STAGE_ORDER if s in timings]
    revisions = sorted({str(timings[s].get("git_revision", "unrecorded"))[:12] for s in stages})
    dirty = [s for s in stages if timings[s].get("tree_clean") is not True]
    hashes = {timings[s].get("config_hash") for s in stages}
    manifests = [read_manifest(d, "model") for d in sorted(cfg.paths.zoo.glob("*")) if (d / MANIFEST).is_file()]
    dtypes = sorted({m.get("train_dtype", "unrecorded") for m in manifests})
    cpus = sorted({str(m.get("machine", {}).get("cpu_capability", "unrecorded")) for m in manifests})
    report_rev = git_revision()
    lines = [
        "## Provenance",
        "",
        f"- Config `{cfg.run.name}`: hash `{cfg.hash()[:16]}`"
        + ("" if hashes <= {cfg.hash()} else " (**some stages ran under another config hash**)")
        + ".",
        f"- Code: stages ran at revision {', '.join(f'`{r}`' for r in revisions) or 'none recorded'}"
        + (f"; **not from a clean tree**: {', '.join(dirty)}" if dirty else ", clean tree")
        + f"; rendered at `{report_rev[:12]}`{' (dirty tree)' if report_rev.endswith('+dirty') else ''}.",
        f"- Training dtype: {', '.join(dtypes) or 'no models'}; CPU capability: {', '.join(cpus) or 'unknown'}. "
        "Reruns are bit-identical on the same kind of CPU; across kinds, compare within the intervals.",
        "",
    ]
    return "\n".join(lines)


def write_collected_index(cfg: Config, manifest_name: str) -> Path:
    """reports/<name>/index.md for a labelled corpus the user collected: where the texts came from,
    then the attribution section (tables, confusion matrices, evidence, explanations, open set)."""
    from natprints.artifacts import git_revision
    from natprints.records import load_records
    from natprints.reports.attribution import render_section

    m = Manifest(cfg.paths.reports, "collected-text experiments", manifest_name).read()
    split = next(
        (r for r in load_records(cfg.paths.reports) if r["kind"] == "split" and r["condition"] == cfg.run.name), None
    )
    skipped = m.get("skipped") or {}
    left_out = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())) if skipped else "none"
    inputs = ", ".join(f"`{f}` (sha256 `{h[:16]}`)" for f, h in sorted(m["inputs"].items()))
    lines = [
        f"# natprints report: collected texts `{cfg.run.name}`\n",
        f"- Corpus: {inputs}; texts left out: {left_out}.",
    ]
    if split:
        lines.append(
            f"- {len(split['labels'])} sources; {split['n_train']} training, {split['n_cal']} calibration and "
            f"{split['n_test']} test texts, split by group ({split['prompts']['train']}, {split['prompts']['cal']} "
            f"and {split['prompts']['test']} groups)."
        )
    lines.append(
        f"- Rendered at revision `{git_revision()[:12]}` with the attribution settings of config "
        f"`{cfg.run.name}` (hash `{cfg.hash()[:16]}`); the attributor is at `{cfg.paths.attributors / cfg.run.name}`.\n"
    )
    path = cfg.paths.reports / "index.md"
    from natprints.reports.summary import write_summary

    atomic_write_text(path, "\n".join(lines) + "\n" + render_section(cfg))
    write_summary(cfg)
    return path
