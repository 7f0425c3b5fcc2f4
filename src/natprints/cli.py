"""The `natprints` command line: one Typer app, a thin layer over the importable stage functions.

Every stage takes the same ``--config`` option and opens its run through :func:`open_run`. Heavy
libraries are imported inside commands, so `natprints --help` and the n-gram `attribute` path start
fast (an n-gram attributor never imports torch, a TF-IDF + logistic regression one not even
scikit-learn). Every user-facing error is one line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import click
import typer
from typer.core import TyperGroup

from natprints.config import DEFAULT_CONFIG, Config, LineageSettings, check_run_lock, load_config, offline_environment
from natprints.errors import NatprintsError
from natprints.runtime import output_changed, stage_timer

if TYPE_CHECKING:
    from natprints.attribution.attributor import Prediction

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="natprints: natural fingerprints, attribution and lineage of language models.",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_CONFIG_HELP = "Run config (TOML)."
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help=_CONFIG_HELP)]
MaybeConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help=_CONFIG_HELP + " Default: none.")]


def open_run(config: Path) -> Config:
    """Load a config and check that its run name is not reused with other settings."""
    cfg = load_config(config)
    check_run_lock(cfg, config)
    return cfg


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


@app.command()
def data(config: ConfigOpt = DEFAULT_CONFIG) -> None:
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
    config: ConfigOpt = DEFAULT_CONFIG,
    model: list[str] = typer.Option(None, "--model", help="Train only this model id (repeatable)."),
    stop_after: int = typer.Option(None, "--stop-after", help="Stop each model at this step (resumable)."),
) -> None:
    """Train every model of the config's conditions (resumes interrupted training)."""
    from natprints.reports.index import write_zoo_report
    from natprints.zoo.stage import build_zoo

    cfg = open_run(config)
    with stage_timer(cfg, "zoo") as run:
        trained = build_zoo(cfg, only=model or None, stop_after=stop_after)
        run.did_work = bool(trained) and not model
    typer.echo(f"zoo: trained {len(trained)} model(s) now")
    if stop_after is None:
        typer.echo(f"wrote {write_zoo_report(cfg)}")


@app.command()
def derive(config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Continue the chosen zoo models on the shift corpus (the derived models of lineage tests)."""
    from natprints.reports.index import write_zoo_report
    from natprints.zoo.stage import build_derived

    cfg = open_run(config)
    with stage_timer(cfg, "derive") as run:
        trained = build_derived(cfg)
        run.did_work = bool(trained)
    typer.echo(f"derive: trained {len(trained)} derived model(s) now")
    typer.echo(f"wrote {write_zoo_report(cfg)}")


@app.command()
def generate(
    config: ConfigOpt = DEFAULT_CONFIG,
    max_chunks: int = typer.Option(None, "--max-chunks", help="Generate at most this many chunks per model."),
) -> None:
    """Sample every zoo model on the held-out prompts, plus the null control."""
    from natprints.generate.stage import generate_all

    cfg = open_run(config)
    with stage_timer(cfg, "generate") as run:
        manifest = generate_all(cfg, max_chunks=max_chunks)
        run.did_work = manifest["added"] > 0 and manifest["complete"]
    state = "complete" if manifest["complete"] else "partial"
    typer.echo(f"generate: {len(manifest['rows'])} files, {manifest['rows_per_model']} rows each ({state})")


@app.command()
def report(config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Render reports/<run>/index.md and zoo.md from the records and manifests."""
    from natprints.reports.index import write_index

    typer.echo(f"wrote {write_index(open_run(config))}")


@app.command()
def bench(
    config: ConfigOpt = DEFAULT_CONFIG,
    section: list[str] = typer.Option(None, "--section", help="Run only this section (repeatable)."),
    reps: int = typer.Option(3, "--reps", min=1, help="Timed repetitions per figure (after one warm-up)."),
) -> None:
    """Time every hot path against the plain alternative; writes reports/bench/bench.json and bench.md."""
    from natprints.bench import SECTIONS, bench_dir, run_bench
    from natprints.runtime import quiet_transformers

    cfg = open_run(config)
    quiet_transformers()
    run_bench(cfg, section or list(SECTIONS), reps, log=lambda line: typer.echo(line, err=True))
    typer.echo(f"wrote {bench_dir(cfg) / 'bench.md'}")


@app.command()
def clean(
    config: ConfigOpt = DEFAULT_CONFIG,
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


@app.command()
def experiments(
    config: ConfigOpt = DEFAULT_CONFIG,
    force: Annotated[bool, typer.Option("--force", help="Redo every condition, even when up to date.")] = False,
) -> None:
    """Fit every condition's pipelines; write results.jsonl, accuracy.csv and the attributors."""
    from natprints.attribution.experiments import run_experiments
    from natprints.records import accuracy_table, load_records

    try:
        cfg = open_run(config)
        with stage_timer(cfg, "experiments") as run:
            with output_changed(cfg.paths.reports / "experiments.json") as changed:
                run_experiments(cfg, force=force)
            run.did_work = changed()
        table = accuracy_table(load_records(cfg.paths.reports))
    except NatprintsError as exc:
        raise _fail(str(exc)) from None
    for row in table[table["best"]].itertuples():
        typer.echo(
            f"{row.condition}: {row.pipeline} accuracy {row.accuracy:.3f} "
            f"[{row.ci_low:.3f}, {row.ci_high:.3f}], chance {row.chance:.3f}, p = {row.p_value:.2g}"
        )
    typer.echo(f"wrote {cfg.paths.reports / 'accuracy.csv'} and {cfg.paths.attributors}/")


def _attributor_dir(
    run: str | None, config: Path | None, condition: str | None, attributor: Path | None
) -> tuple[Path, int | None]:
    """Where the attributor is, and the config's text size limit when a config was read."""
    from natprints.config import RunPaths, home

    if attributor is not None:
        if condition is not None or run is not None:
            raise NatprintsError("give --attributor DIR, or --run/--config with --condition, not both")
        return attributor, None
    if run is not None and config is not None:
        raise NatprintsError("give --run NAME or --config PATH, not both")
    limit = None
    if run is None:
        cfg = load_config(config or DEFAULT_CONFIG)
        run, limit = cfg.run.name, cfg.attribution.max_text_bytes
    return RunPaths(home(), run).attributors / (condition or "all"), limit


def _read_inputs(files: list[str], max_bytes: int) -> list[tuple[str, str | None, str | None]]:
    """(name, text, error) per input, in order; `-` (or no FILE) reads standard input."""
    from natprints.attribution.attributor import decode_text, read_text_file

    out: list[tuple[str, str | None, str | None]] = []
    for name in files or ["-"]:
        try:
            if name == "-":
                if sys.stdin is None or sys.stdin.isatty():
                    raise NatprintsError("<stdin>: no text piped in (give FILE arguments or pipe text)")
                stream = getattr(sys.stdin, "buffer", None)
                data = stream.read(max_bytes + 1) if stream is not None else sys.stdin.read().encode("utf-8")
                out.append(("<stdin>", decode_text(data, "<stdin>", max_bytes), None))
            else:
                out.append((name, read_text_file(name, max_bytes), None))
        except NatprintsError as exc:
            out.append(("<stdin>" if name == "-" else name, None, str(exc)))
    return out


FIRST_BATCH = 32  # the first answers come after this many inputs ...
MAX_BATCH = 2048  # ... then batches double up to this many


def _batches(names: list[str], streaming: bool) -> Iterator[list[str]]:
    """Inputs in growing batches; one batch of all when results depend on the batch (see below)."""
    if not streaming:
        yield names
        return
    start, size = 0, FIRST_BATCH
    while start < len(names):
        yield names[start : start + size]
        start, size = start + size, min(size * 2, MAX_BATCH)


def _line(name: str, p: Prediction, as_json: bool, threshold: float) -> str:
    if as_json:
        return json.dumps({"input": name, **p.to_dict()})
    others = ", ".join(f"{m} {q:.3f}" for m, q in p.top if m != p.best_model)
    if p.unknown:
        head = f"unknown (best {p.best_model} {p.probability:.3f} < threshold {threshold:.3f})"
    else:
        head = f"{p.label} {p.probability:.3f}"
    return f"{name}: {head}" + (f"; then {others}" if others else "")


@app.command()
def attribute(
    files: Annotated[
        list[str] | None,
        typer.Argument(metavar="FILE", help="Text files to attribute; `-` or none reads stdin."),
    ] = None,
    run: Annotated[str | None, typer.Option("--run", help="Use this run's attributors.")] = None,
    config: MaybeConfigOpt = None,
    condition: Annotated[
        str | None, typer.Option("--condition", help="Which condition's attributor (default: all).")
    ] = None,
    attributor: Annotated[Path | None, typer.Option("--attributor", help="An attributor directory.")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="How many candidate models to show.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per input, one per line.")] = False,
    max_bytes: Annotated[
        int | None, typer.Option("--max-bytes", min=1, help="Refuse texts larger than this (default 1 MB).")
    ] = None,
) -> None:
    """Attribute each text to the zoo model that most likely wrote it, or `unknown`.

    Results are printed in input order, in batches as they are ready (n-gram attributors), or all
    at once after one prediction over every input (attributors whose results depend on the batch).
    """
    from natprints.attribution.attributor import DEFAULT_MAX_TEXT_BYTES, load_attributor

    try:
        directory, config_limit = _attributor_dir(run, config, condition, attributor)
        if attributor is None and not directory.is_dir() and directory.parent.is_dir():
            known = ", ".join(sorted(p.name for p in directory.parent.iterdir() if p.is_dir()))
            raise NatprintsError(f"no attributor for condition '{directory.name}' (this run has: {known})")
        model = load_attributor(directory, light=True)  # n-gram logreg: no scikit-learn import
    except NatprintsError as exc:
        raise _fail(str(exc)) from None
    limit = max_bytes or config_limit or DEFAULT_MAX_TEXT_BYTES
    failed = 0
    for names in _batches(list(files or []) or ["-"], model.batch_invariant):
        inputs = _read_inputs(names, limit)
        texts = [text for _, text, _ in inputs if text is not None]
        predictions = iter(model.predict(texts, top_k=top) if texts else [])
        lines: list[str] = []
        for name, _text, error in inputs:
            if error is None:
                lines.append(_line(name, next(predictions), as_json, model.threshold))
                continue
            failed += 1
            if as_json:
                lines.append(json.dumps({"input": name, "error": error}))
            if lines:  # keep stdout and stderr in input order
                typer.echo("\n".join(lines))
                lines = []
            typer.echo(f"error: {error}", err=True)
        if lines:
            typer.echo("\n".join(lines))
    if failed:
        raise typer.Exit(1)


class _LineageGroup(TyperGroup):
    """A group whose first argument, when not a sub-command, is the start of ``compare A B``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["compare", *args]
        return super().parse_args(ctx, args)


class Method(StrEnum):
    seedprints = "seedprints"
    weights = "weights"
    all = "all"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


lineage_app = typer.Typer(
    cls=_LineageGroup,
    no_args_is_help=True,
    help="Model lineage from the weights: SeedPrints and the weight-std fingerprint. "
    "`natprints lineage A B` compares two model directories.",
)

_DeviceOpt = Annotated[Device, typer.Option(help="Where SeedPrints runs its forward passes.")]
_JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON object instead of text.")]


def _settings(config: Path | None) -> tuple[LineageSettings, Path | None]:
    """Lineage settings and cache dir: from a config when given, else the defaults and no cache."""
    if config is None:
        return LineageSettings(), None
    cfg = load_config(config)
    return cfg.lineage, cfg.paths.cache


def _log10p_text(log10_p: float) -> str:
    return "p = 1" if log10_p == 0 else f"p = 10^{log10_p:.1f}" if log10_p < -3 else f"p = {10**log10_p:.3g}"


@lineage_app.command("compare")
def compare(
    model_a: Annotated[Path, typer.Argument(metavar="A", help="A model directory (Hugging Face format).")],
    model_b: Annotated[Path, typer.Argument(metavar="B", help="Another model directory.")],
    method: Annotated[Method, typer.Option(help="Which method(s) to run.")] = Method.all,
    as_json: _JsonOpt = False,
    config: MaybeConfigOpt = None,
    device: _DeviceOpt = Device.auto,
) -> None:
    """Is B from A's lineage? SeedPrints (same init seed) and/or weight-std (derived from)."""
    from natprints.lineage.experiments import compare as compare_models

    settings, cache = _settings(config)
    results = compare_models(model_a, model_b, method.value, settings, cache_dir=cache, device=device.value)
    if as_json:
        payload = {"model_a": str(model_a), "model_b": str(model_b), "results": results}
        typer.echo(json.dumps(payload, indent=2, sort_keys=True))
        return
    typer.echo(f"A: {model_a}\nB: {model_b}")
    for name, r in results.items():
        if r["verdict"] == "incomparable":
            typer.echo(f"{name}: incomparable — {r['reason']}")
        elif name == "seedprints":
            z = "n/a" if r["z"] is None else f"{r['z']:.2f}"
            typer.echo(
                f"seedprints: {_log10p_text(r['log10_p'])} (log10 p = {r['log10_p']:.2f}, z = {z}, "
                f"|S| = {r['kept']}/{r['k']}, N = {r['n_inputs']}) -> "
                f"{'same seed lineage' if r['same_lineage'] else 'no evidence of shared seed'} "
                f"at alpha = {r['alpha']:g}"
            )
        else:
            score = r["score"]
            per = ", ".join(f"{k[0]} {'n/a' if v is None else f'{v:.3f}'}" for k, v in r["per_matrix"].items())
            shown = "n/a" if score is None or not math.isfinite(score) else f"{score:.3f}"
            typer.echo(
                f"weights: score = {shown} ({per}) -> "
                f"{'related' if r['related'] else 'not related'} at threshold {r['threshold']:g}"
            )


@lineage_app.command("identify")
def identify_cmd(
    model: Annotated[Path, typer.Argument(help="The model directory to place.")],
    library: Annotated[Path, typer.Option("--library", help="A directory of model directories (e.g. a run's zoo).")],
    top: Annotated[int, typer.Option(min=0, help="Show only the best N (0 = all).")] = 0,
    as_json: _JsonOpt = False,
    config: MaybeConfigOpt = None,
    device: _DeviceOpt = Device.auto,
) -> None:
    """Rank a library's models by SeedPrints evidence that MODEL shares their seed."""
    from natprints.lineage.experiments import identify

    settings, cache = _settings(config)
    ranking = identify(model, library, settings, cache_dir=cache, device=device.value, progress=not as_json)
    if top:
        ranking = ranking[:top]
    if as_json:
        typer.echo(json.dumps({"model": str(model), "library": str(library), "ranking": ranking}, indent=2))
        return
    for rank, r in enumerate(ranking, 1):
        if r["verdict"] == "incomparable":
            typer.echo(f"  -  {r['model']}: incomparable ({r['reason']})")
        else:
            typer.echo(f"{rank:3d}  {r['model']}: log10 p = {r['log10_p']:.2f}  {r['verdict']}")


@lineage_app.command("run")
def run_cmd(
    config: ConfigOpt = DEFAULT_CONFIG,
    force: Annotated[bool, typer.Option(help="Recompute even when the outputs are current.")] = False,
) -> None:
    """Lineage experiments over the run's zoo: reports/<run>/lineage.csv, lineage.json, figures."""
    from natprints.lineage.experiments import run_lineage

    cfg = open_run(config)
    with stage_timer(cfg, "lineage") as run:
        with output_changed(cfg.paths.reports / "lineage.json") as changed:
            summary = run_lineage(cfg, force=force)
        run.did_work = changed()
    for method, m in summary["methods"].items():
        auc = "n/a" if m["auc"] is None else f"{m['auc']:.3f}"
        typer.echo(
            f"{method}: {m['comparable']} comparable pairs, AUC {auc}, "
            f"TP {m['tp']} FP {m['fp']} TN {m['tn']} FN {m['fn']}"
        )
    typer.echo(f"wrote {cfg.paths.reports / 'lineage.csv'}")


app.add_typer(lineage_app, name="lineage")


def main() -> None:
    offline_environment()
    try:
        app()
    except NatprintsError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)
