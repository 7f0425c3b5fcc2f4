"""The `natprints` command line: a thin layer over the importable stage functions.

Imports of heavy libraries happen inside commands, so `natprints --help` and the n-gram
`attribute` path start fast. Every user-facing error is one line on stderr and exit code 1.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import typer

from natprints import cli_attribution, cli_lineage
from natprints.config import DEFAULT_CONFIG, Config, check_run_lock, load_config
from natprints.errors import NatprintsError
from natprints.timings import stage_timer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="natprints: natural fingerprints, attribution and lineage of language models.",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

ConfigOption = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="Run config (TOML).")


def open_run(config: Path) -> Config:
    """Load a config and check that its run name is not reused with other settings."""
    cfg = load_config(config)
    check_run_lock(cfg, config)
    return cfg


@app.command()
def data(config: Path = ConfigOption) -> None:
    """Read the corpus, split train/held-out, train the shared tokenizer."""
    from natprints.corpus import build_corpus

    cfg = open_run(config)
    with stage_timer(cfg, "data") as run:
        run.did_work = not (cfg.paths.corpus / "manifest.json").is_file()
        manifest = build_corpus(cfg)
    c = manifest["counts"]
    typer.echo(
        f"corpus: {c['train_paragraphs']} train / {c['heldout_paragraphs']} held-out paragraphs, "
        f"{c['train_tokens']:,} train tokens, vocab {c['vocab_size']}, sha256 {manifest['corpus_sha256'][:12]}"
    )


@app.command()
def zoo(
    config: Path = ConfigOption,
    model: list[str] = typer.Option(None, "--model", help="Train only this model id (repeatable)."),
    stop_after: int = typer.Option(None, "--stop-after", help="Stop each model at this step (resumable)."),
) -> None:
    """Train every model of the config's conditions (resumes interrupted training)."""
    from natprints.report import write_zoo_report
    from natprints.zoo import build_zoo

    cfg = open_run(config)
    with stage_timer(cfg, "zoo") as run:
        trained = build_zoo(cfg, only=model or None, stop_after=stop_after)
        run.did_work = bool(trained) and not model
    typer.echo(f"zoo: trained {len(trained)} model(s) now")
    if stop_after is None:
        typer.echo(f"wrote {write_zoo_report(cfg)}")


@app.command()
def derive(config: Path = ConfigOption) -> None:
    """Continue the chosen zoo models on the shift corpus (the derived models of lineage tests)."""
    from natprints.report import write_zoo_report
    from natprints.zoo import build_derived

    cfg = open_run(config)
    with stage_timer(cfg, "derive") as run:
        trained = build_derived(cfg)
        run.did_work = bool(trained)
    typer.echo(f"derive: trained {len(trained)} derived model(s) now")
    typer.echo(f"wrote {write_zoo_report(cfg)}")


@app.command()
def generate(
    config: Path = ConfigOption,
    max_chunks: int = typer.Option(None, "--max-chunks", help="Generate at most this many chunks per model."),
) -> None:
    """Sample every zoo model on the held-out prompts, plus the null control."""
    from natprints.generate import generate_all

    cfg = open_run(config)
    with stage_timer(cfg, "generate") as run:
        manifest = generate_all(cfg, max_chunks=max_chunks)
        run.did_work = manifest["added"] > 0 and manifest["complete"]
    state = "complete" if manifest["complete"] else "partial"
    typer.echo(f"generate: {len(manifest['rows'])} files, {manifest['rows_per_model']} rows each ({state})")


@app.command()
def report(config: Path = ConfigOption) -> None:
    """Render reports/<run>/index.md and zoo.md from the records and manifests."""
    from natprints.report import write_index

    typer.echo(f"wrote {write_index(open_run(config))}")


@app.command()
def bench(
    config: Path = ConfigOption,
    section: list[str] = typer.Option(None, "--section", help="Run only this section (repeatable)."),
    reps: int = typer.Option(3, "--reps", min=1, help="Timed repetitions per figure (after one warm-up)."),
) -> None:
    """Time every hot path against the plain alternative; writes reports/bench/bench.json and bench.md."""
    from natprints.bench import SECTIONS, bench_dir, run_bench
    from natprints.zoo import quiet_transformers

    cfg = open_run(config)
    quiet_transformers()
    run_bench(cfg, section or list(SECTIONS), reps, log=lambda line: typer.echo(line, err=True))
    typer.echo(f"wrote {bench_dir(cfg) / 'bench.md'}")


@app.command()
def clean(
    config: Path = ConfigOption,
    reports: bool = typer.Option(False, "--reports", help="Also remove reports/<run>/."),
) -> None:
    """Remove a run's data and models (and, with --reports, its reports)."""
    cfg = load_config(config)
    p = cfg.paths
    targets = [p.corpus, p.shift_corpus, p.generated, p.models] + ([p.reports] if reports else [])
    for target in targets:
        if target.exists():
            shutil.rmtree(target)
            typer.echo(f"removed {target}")


cli_attribution.register(app)
cli_lineage.register(app)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except NatprintsError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)
