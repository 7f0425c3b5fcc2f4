"""The pipeline's stages as commands (each one library call through :func:`run_stage`), and the
commands that manage a run: report, bench, clean, collected."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from natprints.cli.base import ConfigOpt, MaybeConfigOpt, WaitOpt, app, run_stage, running
from natprints.config import DEFAULT_CONFIG, load_config
from natprints.errors import NatprintsError
from natprints.runtime import exclusive_run


@app.command()
def data(config: ConfigOpt = DEFAULT_CONFIG, wait: WaitOpt = False) -> None:
    """Read the corpus, split train/held-out, train the shared tokenizer."""
    from natprints.corpus import run

    run_stage(config, wait, "data", run)


@app.command()
def zoo(
    config: ConfigOpt = DEFAULT_CONFIG,
    model: list[str] = typer.Option(None, "--model", help="Train only this model id (repeatable)."),
    stop_after: int = typer.Option(None, "--stop-after", help="Stop each model at this step (resumable)."),
    wait: WaitOpt = False,
) -> None:
    """Train every model of the config's conditions (resumes interrupted training)."""
    from natprints.zoo.stage import run

    run_stage(config, wait, "zoo", lambda c: run(c, model or None, stop_after), zoo_table=stop_after is None)


@app.command()
def derive(config: ConfigOpt = DEFAULT_CONFIG, wait: WaitOpt = False) -> None:
    """Continue the chosen zoo models on the shift corpus (the derived models of lineage tests)."""
    from natprints.zoo.stage import run_derive

    run_stage(config, wait, "derive", run_derive, zoo_table=True)


@app.command()
def generate(
    config: ConfigOpt = DEFAULT_CONFIG,
    max_chunks: int = typer.Option(None, "--max-chunks", help="Generate at most this many chunks per model."),
    wait: WaitOpt = False,
) -> None:
    """Sample every zoo model on the held-out prompts, plus the null control."""
    from natprints.generate.stage import run

    run_stage(config, wait, "generate", lambda c: run(c, max_chunks=max_chunks))


@app.command()
def likelihood(config: ConfigOpt = DEFAULT_CONFIG, wait: WaitOpt = False) -> None:
    """Score every text the tables use under every model of its conditions (the exact ceiling)."""
    from natprints.likelihood.stage import run

    run_stage(config, wait, "likelihood", run)


@app.command()
def reference(config: ConfigOpt = DEFAULT_CONFIG, wait: WaitOpt = False) -> None:
    """Train the auditor's reference LM, fine-tune it per candidate, score the texts (black-box)."""
    from natprints.reference.stage import run

    run_stage(config, wait, "reference", run)


@app.command()
def report(config: ConfigOpt = DEFAULT_CONFIG, wait: WaitOpt = False) -> None:
    """Render reports/<run>/index.md and zoo.md from the records and manifests."""
    from natprints.reports.index import write_index

    with running(config, wait) as cfg:
        typer.echo(f"wrote {write_index(cfg)}")


@app.command()
def bench(
    config: ConfigOpt = DEFAULT_CONFIG,
    section: list[str] = typer.Option(None, "--section", help="Run only this section (repeatable)."),
    reps: int = typer.Option(3, "--reps", min=1, help="Timed repetitions per figure (after one warm-up)."),
    wait: WaitOpt = False,
) -> None:
    """Time every hot path against the plain alternative; writes reports/bench/bench.json and bench.md."""
    from natprints.bench import SECTIONS, bench_dir, run_bench
    from natprints.runtime import quiet_transformers

    with running(config, wait) as cfg:
        quiet_transformers()
        run_bench(cfg, section or list(SECTIONS), reps, log=lambda line: typer.echo(line, err=True))
        typer.echo(f"wrote {bench_dir(cfg) / 'bench.md'}")


@app.command()
def clean(
    config: MaybeConfigOpt = None,
    reports: bool = typer.Option(False, "--reports", help="Also remove reports/<run>/."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Remove without asking."),
    wait: WaitOpt = False,
) -> None:
    """Remove a run's data, scores and models (and, with --reports, its reports); asks first."""
    if config is None:
        raise NatprintsError("name the run to remove: natprints clean --config FILE (nothing is removed by default)")
    cfg = load_config(config)
    targets = [t for t in cfg.paths.folders(reports) if t.exists()]
    if not targets:
        typer.echo(f"run '{cfg.run.name}' has nothing to remove")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise NatprintsError(f"would remove {len(targets)} folder(s) of run '{cfg.run.name}'; confirm with --yes")
        listing = "\n".join(f"  {t}" for t in targets)
        if not typer.confirm(f"remove these folders of run '{cfg.run.name}'?\n{listing}\n"):
            raise NatprintsError("nothing removed")
    with exclusive_run(cfg, wait=wait):  # never pull a run out from under the process writing it
        for target in targets:
            if target.exists():
                shutil.rmtree(target)
                typer.echo(f"removed {target}")


@app.command()
def plan(config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Size a run's declared models before any is read: each built on the meta device (no weights read
    or allocated) from its config.json where it is at hand, else the architecture its entry declares."""
    from natprints.declared import plan as plan_models

    cfg = load_config(config)
    planned = plan_models(cfg)
    if not planned:
        typer.echo(f"run '{cfg.run.name}' declares no models")
        return
    typer.echo(
        f"{'model':<28} {'type':<10} {'layers':>6} {'hidden':>6} {'vocab':>7} {'parameters':>13} {'fp32 GiB':>9}  from"
    )
    for p in planned:
        typer.echo(
            f"{p.label:<28} {p.model_type:<10} {p.layers:>6} {p.hidden_size:>6} {p.vocab_size:>7} "
            f"{p.parameters:>13,} {p.fp32_gib:>9.2f}  {p.source}"
        )
    total = sum(p.parameters for p in planned)
    typer.echo(f"{len(planned)} models, {total:,} parameters, {total * 4 / 2**30:.1f} GiB of fp32 weights in all")


@app.command()
def experiments(
    config: ConfigOpt = DEFAULT_CONFIG,
    force: Annotated[bool, typer.Option("--force", help="Redo every condition, even when up to date.")] = False,
    wait: WaitOpt = False,
) -> None:
    """Fit every condition's pipelines; write results.jsonl, accuracy.csv and the attributors."""
    from natprints.attribution.experiments import run

    run_stage(config, wait, "experiments", lambda c: run(c, force=force))


@app.command()
def collected(
    corpus: Annotated[
        Path,
        typer.Argument(
            metavar="CORPUS",
            help="Labelled texts: JSONL, CSV or parquet with `text` and `source` (optional `prompt`, `group`), "
            "or a folder with one subfolder per source, one text per file.",
        ),
    ],
    name: Annotated[
        str | None, typer.Option("--name", help="Name of its reports and attributor (default: the corpus's stem).")
    ] = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    force: Annotated[bool, typer.Option("--force", help="Redo the experiments even when up to date.")] = False,
) -> None:
    """Attribution experiments on texts you collected: tables, confusion matrices, a saved attributor."""
    from natprints.attribution.collected import COLLECTED_MANIFEST, collected_config, run_collected, summary_lines
    from natprints.reports.index import write_collected_index

    cfg = load_config(config)
    result = run_collected(cfg, corpus, name=name, force=force)
    index = write_collected_index(collected_config(cfg, name or corpus.stem), COLLECTED_MANIFEST)
    for line in summary_lines(result.records):
        typer.echo(line)
    typer.echo(f"{'wrote' if result.did_work else 'up to date:'} {index} and {result.attributor}/")


@app.command()
def emergence(
    config: ConfigOpt = DEFAULT_CONFIG,
    max_chunks: int = typer.Option(None, "--max-chunks", help="Generate at most this many chunks per checkpoint."),
    wait: WaitOpt = False,
) -> None:
    """The text fingerprint over training: one condition's models at every saved step ([emergence])."""
    from natprints.emergence import run

    run_stage(config, wait, "emergence", lambda c: run(c, max_chunks=max_chunks))
