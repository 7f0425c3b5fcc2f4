"""The `natprints` command line: one Typer app, a thin layer over the importable stage functions.

Every stage takes the same ``--config`` (and ``--wait``) options and opens its run through
:func:`running`, which holds the run's lock while it writes. Heavy libraries are imported inside
commands, so `natprints --help` and the n-gram `attribute` path start fast (an n-gram attributor never
imports torch, a TF-IDF + logistic regression one not even scikit-learn). Every user-facing error is
one line on stderr and exit code 1; Ctrl-C says how to resume and exits 130.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from typer.core import TyperGroup

from natprints.artifacts import NO_SPACE, no_space
from natprints.config import (
    DEFAULT_CONFIG,
    HOME_VARIABLE,
    Config,
    LineageSettings,
    check_run_lock,
    home,
    load_config,
    offline_environment,
)
from natprints.errors import NatprintsError
from natprints.runtime import StageResult, exclusive_run, stage_timer

if TYPE_CHECKING:
    pass


class _Group(TyperGroup):
    """The one error handler: a :class:`NatprintsError` from any command, or a full disk, is one line on
    stderr and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NatprintsError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            typer.echo(f"error: {no_space(exc)}", err=True)  # a writer of its own (safetensors, parquet)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    help="natprints: natural fingerprints, attribution and lineage of language models.",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_CONFIG_HELP = "Run config (TOML)."
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help=_CONFIG_HELP)]
MaybeConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help=_CONFIG_HELP + " Default: none.")]
WaitOpt = Annotated[
    bool, typer.Option("--wait", help="When another natprints process is writing this run, wait for it.")
]


@contextmanager
def running(config: Path, wait: bool = False) -> Iterator[Config]:
    """Open a run for writing: load its config, hold the run's lock for the body (one writing process
    per run: another gets "run NAME is busy (pid N)"), and check the run name is not reused with other
    settings."""
    cfg = load_config(config)
    with exclusive_run(cfg, wait=wait):
        check_run_lock(cfg, config)
        if cfg.run.executor == "ray":  # every job's paths absolute: a Ray worker has its own working directory
            os.environ[HOME_VARIABLE] = str(home().resolve())
        yield cfg


def _stage(config: Path, wait: bool, name: str, work: Callable[[Config], StageResult], zoo_table: bool = False) -> None:
    """Open the run, time the stage's work (recorded when it did any), print what it says; with
    ``zoo_table``, rewrite the zoo's table after it."""
    with running(config, wait) as cfg:
        with stage_timer(cfg, name) as timer:
            result = work(cfg)
            timer.did_work = result.did_work
        for line in result.lines:
            typer.echo(line)
        if zoo_table:
            from natprints.reports.index import write_zoo_report

            typer.echo(f"wrote {write_zoo_report(cfg)}")


@app.command()
def data(config: ConfigOpt = DEFAULT_CONFIG, wait: WaitOpt = False) -> None:
    """Read the corpus, split train/held-out, train the shared tokenizer."""
    from natprints.corpus import run

    _stage(config, wait, "data", run)


@app.command()
def zoo(
    config: ConfigOpt = DEFAULT_CONFIG,
    model: list[str] = typer.Option(None, "--model", help="Train only this model id (repeatable)."),
    stop_after: int = typer.Option(None, "--stop-after", help="Stop each model at this step (resumable)."),
    wait: WaitOpt = False,
) -> None:
    """Train every model of the config's conditions (resumes interrupted training)."""
    from natprints.zoo.stage import run

    _stage(config, wait, "zoo", lambda c: run(c, model or None, stop_after), zoo_table=stop_after is None)


@app.command()
def derive(config: ConfigOpt = DEFAULT_CONFIG, wait: WaitOpt = False) -> None:
    """Continue the chosen zoo models on the shift corpus (the derived models of lineage tests)."""
    from natprints.zoo.stage import run_derive

    _stage(config, wait, "derive", run_derive, zoo_table=True)


@app.command()
def generate(
    config: ConfigOpt = DEFAULT_CONFIG,
    max_chunks: int = typer.Option(None, "--max-chunks", help="Generate at most this many chunks per model."),
    wait: WaitOpt = False,
) -> None:
    """Sample every zoo model on the held-out prompts, plus the null control."""
    from natprints.generate.stage import run

    _stage(config, wait, "generate", lambda c: run(c, max_chunks=max_chunks))


@app.command()
def likelihood(config: ConfigOpt = DEFAULT_CONFIG, wait: WaitOpt = False) -> None:
    """Score every text the tables use under every model of its conditions (the exact ceiling)."""
    from natprints.likelihood.stage import run

    _stage(config, wait, "likelihood", run)


@app.command()
def reference(config: ConfigOpt = DEFAULT_CONFIG, wait: WaitOpt = False) -> None:
    """Train the auditor's reference LM, fine-tune it per candidate, score the texts (black-box)."""
    from natprints.reference.stage import run

    _stage(config, wait, "reference", run)


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
    p = cfg.paths
    targets = [p.corpus, p.shift_corpus, p.generated, p.likelihood, p.reference_scores, p.emergence, p.models]
    targets = [t for t in targets + ([p.reports] if reports else []) if t.exists()]
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
def experiments(
    config: ConfigOpt = DEFAULT_CONFIG,
    force: Annotated[bool, typer.Option("--force", help="Redo every condition, even when up to date.")] = False,
    wait: WaitOpt = False,
) -> None:
    """Fit every condition's pipelines; write results.jsonl, accuracy.csv and the attributors."""
    from natprints.attribution.experiments import run

    _stage(config, wait, "experiments", lambda c: run(c, force=force))


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
    from natprints.attribution.collected import COLLECTED_MANIFEST, collected_config, run_collected
    from natprints.records import accuracy_table
    from natprints.reports.index import write_collected_index

    cfg = load_config(config)
    result = run_collected(cfg, corpus, name=name, force=force)
    index = write_collected_index(collected_config(cfg, name or corpus.stem), COLLECTED_MANIFEST)
    table = accuracy_table(result.records)
    lengths = {r["condition"]: r for r in result.records if r["kind"] == "length_control"}
    for row in table[table["best"]].itertuples():
        length = lengths[row.condition]
        typer.echo(
            f"{row.condition}: {row.pipeline} accuracy {row.accuracy:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}], "
            f"chance {row.chance:.3f}; length only {length['accuracy']:.3f}"
            + (" (length leaks)" if length["leaks"] else "")
        )
    typer.echo(f"{'wrote' if result.did_work else 'up to date:'} {index} and {result.attributor}/")


@app.command()
def emergence(
    config: ConfigOpt = DEFAULT_CONFIG,
    max_chunks: int = typer.Option(None, "--max-chunks", help="Generate at most this many chunks per checkpoint."),
    wait: WaitOpt = False,
) -> None:
    """The text fingerprint over training: one condition's models at every saved step ([emergence])."""
    from natprints.emergence import run

    _stage(config, wait, "emergence", lambda c: run(c, max_chunks=max_chunks))


class AttributeMethod(StrEnum):
    attributor = "attributor"
    likelihood = "likelihood"


@app.command()
def attribute(
    files: Annotated[
        list[str] | None,
        typer.Argument(metavar="FILE", help="Text files to attribute; `-` or none reads stdin."),
    ] = None,
    run: Annotated[str | None, typer.Option("--run", help="Use this run's attributors (or zoo).")] = None,
    config: MaybeConfigOpt = None,
    condition: Annotated[
        str | None, typer.Option("--condition", help="Which condition's attributor or zoo models (default: all).")
    ] = None,
    attributor: Annotated[Path | None, typer.Option("--attributor", help="An attributor directory.")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="How many candidate models to show.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per input, one per line.")] = False,
    max_bytes: Annotated[
        int | None, typer.Option("--max-bytes", min=1, help="Refuse texts larger than this (default 1 MB).")
    ] = None,
    method: Annotated[
        AttributeMethod,
        typer.Option(
            "--method",
            help="attributor: the run's saved black-box attributor. likelihood: each candidate model's exact "
            "log-likelihood of the text (the Bayes posterior), with an open-set test per model.",
        ),
    ] = AttributeMethod.attributor,
    models: Annotated[
        list[Path] | None,
        typer.Option(
            "--models",
            "--model",
            help="likelihood: a causal LM directory of any family, labelled by its name (repeat for each "
            "model); each reads the texts with the tokenizer saved in it, else --tokenizer. Default: the run's "
            "zoo models of --condition.",
        ),
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            "--tokenizer",
            help="likelihood: the tokenizer of models that hold none of their own (default: the first --models "
            "directory's, else the run's).",
        ),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", help="likelihood: the prompt every text continues (default: the EOS token)."),
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option("--temperature", help="likelihood: the temperature the texts were sampled with (default 1.0)."),
    ] = None,
    top_k: Annotated[
        int | None, typer.Option("--top-k", help="likelihood: the sampler's top-k (default 0: off).")
    ] = None,
    top_p: Annotated[
        float | None, typer.Option("--top-p", help="likelihood: the sampler's top-p (default 1.0: off).")
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(
            "--alpha",
            help="likelihood: reject a model when its own samples are less likely than this to be as far "
            "from typical as the text, either way (too unlikely or too likely); `unknown` when every model "
            "is rejected (default 0.05).",
        ),
    ] = None,
    pool: Annotated[
        bool, typer.Option("--pool", help="One verdict over all inputs, as texts from one source.")
    ] = False,
    sequential: Annotated[
        bool,
        typer.Option(
            "--sequential",
            help="Read the inputs one at a time, as texts of one source (stdin: one text per line, as lines "
            "arrive), and stop at the first verdict the evidence allows: a model, `unknown` (likelihood only) "
            "or undecided when the inputs end. The chance of ever naming a wrong model is at most --error "
            "(exact for the likelihood method; as far as its calibration holds for an attributor).",
        ),
    ] = False,
    error: Annotated[
        float, typer.Option("--error", min=0, max=1, help="--sequential: the error guaranteed (default 0.01).")
    ] = 0.01,
    bundle: Annotated[
        Path | None,
        typer.Option(
            "--bundle",
            help="Write an evidence bundle (JSON) that `natprints verify` recomputes the verdicts from: the "
            "inputs' and models' hashes, the request, config, code and machine, every per-text score.",
        ),
    ] = None,
) -> None:
    """Attribute each text to the zoo model that most likely wrote it, or `unknown`.

    Results are printed in input order, in batches as they are ready (n-gram attributors), or all
    at once after one prediction over every input (attributors whose results depend on the batch,
    the likelihood method, --pool). The likelihood method scores a file's text without its final
    line ending.
    """
    from natprints.attribution.verdicts import Request, attribute_files

    request = Request(
        method=method.value,
        run=run,
        config=config,
        condition=condition,
        attributor=attributor,
        models=tuple(models or ()),
        tokenizer=tokenizer,
        prompt=prompt,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        alpha=alpha,
        top=top,
        as_json=as_json,
        max_bytes=max_bytes,
        pool=pool,
        sequential=sequential,
        error=error,
        bundle=bundle,
    )
    if attribute_files(list(files or []), request):
        raise typer.Exit(1)


@app.command()
def verify(bundle: Annotated[Path, typer.Argument(metavar="BUNDLE", help="A file from `attribute --bundle`.")]) -> None:
    """Check an evidence bundle: every hash again, every score and verdict recomputed from its files."""
    from natprints.attribution.verdicts import verify_bundle

    typer.echo(verify_bundle(bundle))


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


def _settings(config: Path | None) -> tuple[LineageSettings, Path | None, Path | None]:
    """Lineage settings, cache dir and reports dir (the calibrated threshold of trained pairs): from a
    config when given, else the defaults, no cache and no calibration."""
    if config is None:
        return LineageSettings(), None, None
    cfg = load_config(config)
    return cfg.lineage, cfg.paths.cache, cfg.paths.reports


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
    from natprints.lineage.experiments import comparison_lines

    settings, cache, reports = _settings(config)
    results = compare_models(
        model_a, model_b, method.value, settings, cache_dir=cache, device=device.value, reports_dir=reports
    )
    if as_json:
        payload = {"model_a": str(model_a), "model_b": str(model_b), "results": results}
        typer.echo(json.dumps(payload, indent=2, sort_keys=True))
        return
    typer.echo("\n".join([f"A: {model_a}", f"B: {model_b}", *comparison_lines(results)]))


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
    from natprints.lineage.experiments import identify, ranking_lines

    settings, cache, reports = _settings(config)
    ranking = identify(
        model, library, settings, cache_dir=cache, device=device.value, progress=not as_json, reports_dir=reports
    )
    if top:
        ranking = ranking[:top]
    if as_json:
        typer.echo(json.dumps({"model": str(model), "library": str(library), "ranking": ranking}, indent=2))
        return
    for line in ranking_lines(ranking):
        typer.echo(line)


@lineage_app.command("run")
def run_cmd(
    config: ConfigOpt = DEFAULT_CONFIG,
    force: Annotated[bool, typer.Option(help="Recompute even when the outputs are current.")] = False,
    wait: WaitOpt = False,
) -> None:
    """Lineage experiments over the run's zoo: reports/<run>/lineage.csv, lineage.json, figures."""
    from natprints.lineage.experiments import run

    _stage(config, wait, "lineage", lambda c: run(c, force=force))


app.add_typer(lineage_app, name="lineage")


def _interrupted() -> None:
    """Ctrl-C: say how to go on (every stage resumes where it stopped) and exit 130, as shells expect."""
    typer.echo(f"interrupted; rerun `{shlex.join(['natprints', *sys.argv[1:]])}` to resume", err=True)
    sys.exit(130)


def main() -> None:
    offline_environment()
    try:
        app()
    except NatprintsError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        _interrupted()
    except SystemExit as exc:
        if exc.code == 130:  # Typer turns Ctrl-C into a silent exit 130 before it reaches us
            _interrupted()
        raise
