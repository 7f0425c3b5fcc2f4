"""The `natprints` command line: one Typer app, a thin layer over the importable stage functions.

Every stage takes the same ``--config`` (and ``--wait``) options and opens its run through
:func:`running`, which holds the run's lock while it writes. Heavy libraries are imported inside
commands, so `natprints --help` and the n-gram `attribute` path start fast (an n-gram attributor never
imports torch, a TF-IDF + logistic regression one not even scikit-learn). Every user-facing error is
one line on stderr and exit code 1; Ctrl-C says how to resume and exits 130.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple

import click
import typer
from typer.core import TyperGroup

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
from natprints.runtime import exclusive_run, output_changed, stage_timer

if TYPE_CHECKING:
    from natprints.attribution.attributor import Prediction
    from natprints.likelihood.attribute import LikelihoodPrediction

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


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


@app.command()
def data(config: ConfigOpt = DEFAULT_CONFIG, wait: WaitOpt = False) -> None:
    """Read the corpus, split train/held-out, train the shared tokenizer."""
    from natprints.corpus import build_corpus

    with running(config, wait) as cfg, stage_timer(cfg, "data") as run:
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
    wait: WaitOpt = False,
) -> None:
    """Train every model of the config's conditions (resumes interrupted training)."""
    from natprints.reports.index import write_zoo_report
    from natprints.zoo.stage import build_zoo

    with running(config, wait) as cfg:
        with stage_timer(cfg, "zoo") as run:
            trained = build_zoo(cfg, only=model or None, stop_after=stop_after)
            run.did_work = bool(trained) and not model
        typer.echo(f"zoo: trained {len(trained)} model(s) now")
        if stop_after is None:
            typer.echo(f"wrote {write_zoo_report(cfg)}")


@app.command()
def derive(config: ConfigOpt = DEFAULT_CONFIG, wait: WaitOpt = False) -> None:
    """Continue the chosen zoo models on the shift corpus (the derived models of lineage tests)."""
    from natprints.reports.index import write_zoo_report
    from natprints.zoo.stage import build_derived

    with running(config, wait) as cfg:
        with stage_timer(cfg, "derive") as run:
            trained = build_derived(cfg)
            run.did_work = bool(trained)
        typer.echo(f"derive: trained {len(trained)} derived model(s) now")
        typer.echo(f"wrote {write_zoo_report(cfg)}")


@app.command()
def generate(
    config: ConfigOpt = DEFAULT_CONFIG,
    max_chunks: int = typer.Option(None, "--max-chunks", help="Generate at most this many chunks per model."),
    wait: WaitOpt = False,
) -> None:
    """Sample every zoo model on the held-out prompts, plus the null control."""
    from natprints.generate.stage import generate_all

    with running(config, wait) as cfg, stage_timer(cfg, "generate") as run:
        manifest = generate_all(cfg, max_chunks=max_chunks)
        run.did_work = manifest["added"] > 0 and manifest["complete"]
    state = "complete" if manifest["complete"] else "partial"
    typer.echo(f"generate: {len(manifest['rows'])} files, {manifest['rows_per_model']} rows each ({state})")


@app.command()
def likelihood(config: ConfigOpt = DEFAULT_CONFIG, wait: WaitOpt = False) -> None:
    """Score every text the tables use under every model of its conditions (the exact ceiling)."""
    from natprints.likelihood.stage import score_all

    with running(config, wait) as cfg, stage_timer(cfg, "likelihood") as run:
        manifest = score_all(cfg)
        run.did_work = manifest["scored"] > 0
    rows = sum(entry["rows"] for entry in manifest["scorers"].values())
    typer.echo(
        f"likelihood: {rows} (text, model) scores from {len(manifest['scorers'])} models, {manifest['scored']} new"
    )


@app.command()
def reference(config: ConfigOpt = DEFAULT_CONFIG, wait: WaitOpt = False) -> None:
    """Train the auditor's reference LM, fine-tune it per candidate, score the texts (black-box)."""
    from natprints.attribution.reference import build_reference

    with running(config, wait) as cfg:
        if not cfg.reference.enabled:
            typer.echo("reference: off in this config ([reference] enabled = false)")
            return
        with stage_timer(cfg, "reference") as run:
            manifest = build_reference(cfg)
            run.did_work = manifest["scored"] > 0 or manifest["trained_now"] > 0
    typer.echo(
        f"reference: {len(manifest['scorers'])} fine-tuned LMs, {manifest['trained_now']} trained now, "
        f"{manifest['scored']} texts scored now"
    )


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
        raise _fail("name the run to remove: natprints clean --config FILE (nothing is removed by default)")
    cfg = load_config(config)
    p = cfg.paths
    targets = [p.corpus, p.shift_corpus, p.generated, p.likelihood, p.reference_scores, p.emergence, p.models]
    targets = [t for t in targets + ([p.reports] if reports else []) if t.exists()]
    if not targets:
        typer.echo(f"run '{cfg.run.name}' has nothing to remove")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise _fail(f"would remove {len(targets)} folder(s) of run '{cfg.run.name}'; confirm with --yes")
        listing = "\n".join(f"  {t}" for t in targets)
        if not typer.confirm(f"remove these folders of run '{cfg.run.name}'?\n{listing}\n"):
            raise _fail("nothing removed")
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
    from natprints.attribution.experiments import run_experiments
    from natprints.records import accuracy_table, load_records

    try:
        with running(config, wait) as cfg, stage_timer(cfg, "experiments") as run:
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

    try:
        cfg = load_config(config)
        result = run_collected(cfg, corpus, name=name, force=force)
        index = write_collected_index(collected_config(cfg, name or corpus.stem), COLLECTED_MANIFEST)
    except NatprintsError as exc:
        raise _fail(str(exc)) from None
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
    from natprints.emergence import run_emergence
    from natprints.records import TEXT_EMERGENCE_CSV

    with running(config, wait) as cfg:
        if not cfg.emergence.enabled:
            typer.echo("emergence: off in this config ([emergence] enabled = false)")
            return
        with stage_timer(cfg, "emergence") as run:
            manifest = run_emergence(cfg, max_chunks=max_chunks)
            run.did_work = manifest["added"] > 0 and manifest["complete"]
    if not manifest["complete"]:
        typer.echo(f"emergence: {manifest['added']} texts generated now (partial)")
        return
    typer.echo(
        f"emergence: {cfg.emergence.condition} at steps {', '.join(map(str, manifest['steps']))}; "
        f"{manifest['added']} texts generated now; wrote {cfg.paths.reports / TEXT_EMERGENCE_CSV}"
    )


def _attributor_dir(
    run: str | None, config: Path | None, condition: str | None, attributor: Path | None
) -> tuple[Path, int | None]:
    """Where the attributor is, and the config's text size limit when a config was read."""
    from natprints.config import RunPaths, home
    from natprints.zoo.spec import resolve_condition

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
    paths = RunPaths(home(), run)
    saved = sorted(p for p in paths.attributors.glob("*") if (p / "manifest.json").is_file())
    if condition is None and len(saved) == 1:  # e.g. `natprints collected`: one attributor, its own name
        return saved[0], limit
    if condition is None and not (paths.attributors / "all").is_dir():
        # a run whose one condition holds every model has no separate `all`: that condition is it
        manifest = paths.generated / "manifest.json"
        members = json.loads(manifest.read_text(encoding="utf-8")).get("conditions", {}) if manifest.is_file() else {}
        condition = resolve_condition(members if isinstance(members, dict) else {}, "all")
    return paths.attributors / (condition or "all"), limit


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


def _then(p: Prediction) -> str:
    others = ", ".join(f"{m} {q:.3f}" for m, q in p.top if m != p.best_model)
    return f"; then {others}" if others else ""


def _one_line(text: str) -> str:
    """``text`` as one printed line: a newline or other unprintable character (in a file name, say) and
    a backslash are escaped as ``repr`` writes them, so no input can forge or split a result line."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else repr(c)[1:-1] for c in text)


def _line(name: str, p: Prediction, as_json: bool, threshold: float) -> str:
    if as_json:
        return json.dumps({"input": name, **p.to_dict()})
    if p.unknown:
        head = f"unknown (best {p.best_model} {p.probability:.3f} < threshold {threshold:.3f})"
    else:
        head = f"{p.label} {p.probability:.3f}"
    return _one_line(f"{name}: {head}" + _then(p))


def _likelihood_line(name: str, p: LikelihoodPrediction, as_json: bool) -> str:
    if as_json:
        return json.dumps({"input": name, **p.to_dict()})
    if p.unknown:
        head = f"unknown (best {p.best_model} {p.probability:.3f}; every model rejected at alpha {p.alpha:g})"
    else:
        head = f"{p.label} {p.probability:.3f}"
    return _one_line(f"{name}: {head}" + _then(p))


def _pooled_name(texts: int) -> str:
    return f"pooled ({texts} text{'' if texts == 1 else 's'})"


def _emit(inputs: list[tuple[str, str | None, str | None]], lines: Iterator[str] | None, as_json: bool) -> int:
    """Print the next of ``lines`` for each good input and an error for each bad one, in input order.

    With ``lines`` None (one pooled verdict follows), only the errors. Returns how many inputs were bad.
    """
    failed = 0
    out: list[str] = []
    for name, _text, error in inputs:
        if error is None:
            if lines is not None:
                out.append(next(lines))
            continue
        failed += 1
        if as_json:
            out.append(json.dumps({"input": name, "error": error}))
        if out:  # keep stdout and stderr in input order
            typer.echo("\n".join(out))
            out = []
        typer.echo(f"error: {_one_line(error)}", err=True)  # the error names the input
    if out:
        typer.echo("\n".join(out))
    return failed


class AttributeMethod(StrEnum):
    attributor = "attributor"
    likelihood = "likelihood"


class _Library(NamedTuple):
    """The candidate models of a likelihood attribution, their tokenizer, and the run config if one was read."""

    models: dict[str, Path]
    tokenizer: Path
    cfg: Config | None


def _recorded_config(run: str) -> Config:
    """The config a run was made with, as its run lock recorded it."""
    from natprints.config import RunPaths, home

    lock = RunPaths(home(), run).run_lock
    if not lock.is_file():
        raise NatprintsError(f"no run '{run}' at {lock.parent} (no {lock.name}); give --config PATH")
    try:
        return Config.model_validate(json.loads(lock.read_text(encoding="utf-8"))["config"])
    except (OSError, ValueError, KeyError, TypeError):  # pydantic's ValidationError is a ValueError
        raise NatprintsError(f"{lock}: cannot read the config the run recorded; give --config PATH") from None


def _likelihood_library(
    run: str | None, config: Path | None, condition: str | None, models: list[Path] | None, tokenizer: Path | None
) -> _Library:
    """--models (labels: directory names), else the run's zoo models of --condition; and the tokenizer."""
    from natprints.config import RunPaths, home
    from natprints.zoo import condition_members
    from natprints.zoo.spec import resolve_condition

    if run is not None and config is not None:
        raise NatprintsError("give --run NAME or --config PATH, not both")
    cfg = load_config(config) if config is not None else None
    if models:
        if condition is not None:
            raise NatprintsError("give --models DIR, or --condition of a run's zoo, not both")
        library: dict[str, Path] = {}
        for directory in models:
            if directory.name in library:
                raise NatprintsError(
                    f"two --models are named '{directory.name}' ({library[directory.name]} and {directory}); "
                    "a model's label is its directory name"
                )
            library[directory.name] = directory
        if tokenizer is None and (models[0] / "tokenizer.json").is_file():
            tokenizer = models[0]
        if tokenizer is None:
            paths = cfg.paths if cfg else RunPaths(home(), run) if run else load_config(DEFAULT_CONFIG).paths
            tokenizer = paths.tokenizer
        return _Library(library, tokenizer, cfg)
    cfg = cfg or (_recorded_config(run) if run is not None else load_config(DEFAULT_CONFIG))
    members = condition_members(cfg)
    condition = resolve_condition(members, condition or "all")
    if condition not in members:
        raise NatprintsError(f"no condition '{condition}' in run '{cfg.run.name}' (it has: {', '.join(members)})")
    zoo_dir = cfg.paths.zoo
    if not zoo_dir.is_dir():
        raise NatprintsError(f"no zoo at {zoo_dir}; run `natprints zoo` first")
    for model_id in members[condition]:
        if not (zoo_dir / model_id / "manifest.json").is_file():
            raise NatprintsError(f"zoo model {model_id} is missing at {zoo_dir}; run `natprints zoo` first")
    return _Library({m: zoo_dir / m for m in members[condition]}, tokenizer or cfg.paths.tokenizer, cfg)


def _without_final_newline(text: str) -> str:
    """A file's last line ending is the file's, not the text's (`echo TEXT > FILE` adds one)."""
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def _attribute_likelihood(
    files: list[str],
    library: _Library,
    *,
    prompt: str | None,
    temperature: float,
    top_k: int,
    top_p: float,
    alpha: float,
    pool: bool,
    top: int,
    as_json: bool,
    max_bytes: int | None,
    sequential: float | None = None,
) -> int:
    """The likelihood method of `natprints attribute`: reads every input first (with ``sequential``,
    the error level, one at a time until a verdict); returns the bad inputs."""
    from natprints.attribution.attributor import DEFAULT_MAX_TEXT_BYTES
    from natprints.likelihood.attribute import (
        attribute_by_likelihood,
        encode_for,
        has_tokenizer,
        load_candidates,
        load_model_tokenizer,
    )
    from natprints.lineage.models import inspect_model

    try:
        for directory in library.models.values():  # a directory that is no model: said before the tokenizer
            inspect_model(directory)
        shared = None
        if not all(has_tokenizer(d) for d in library.models.values()):  # some model reads the shared one
            shared = load_model_tokenizer(library.tokenizer)
        candidates = load_candidates(library.models, shared)  # every directory checked before any text is read
    except NatprintsError as exc:
        raise _fail(str(exc)) from None
    cfg = library.cfg
    limit = max_bytes or (cfg.attribution.max_text_bytes if cfg else None) or DEFAULT_MAX_TEXT_BYTES
    if sequential is not None:
        loaded: dict = {}  # each model loaded once for the whole stream
        labels = list(candidates)

        def score(text: str) -> tuple:
            import numpy as np

            p = attribute_by_likelihood(
                [_without_final_newline(text)],
                candidates,
                prompts=None if prompt is None else [prompt],
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                device=cfg.run.device if cfg else "auto",
                batch_size=cfg.likelihood.batch_size if cfg else 64,
                loaded=loaded,
            )[0]
            return tuple(np.array([part[m] for m in labels]) for part in (p.loglik, p.centred, p.variance))

        return _sequential_verdict(files, limit, labels, score, sequential, as_json, None)
    inputs = [
        (name, None if text is None else _without_final_newline(text), error)
        for name, text, error in _read_inputs(files, limit)
    ]
    readable = [i for i, (_, text, _) in enumerate(inputs) if text is not None]
    _, errors = encode_for(
        candidates,
        [inputs[i][1] for i in readable],
        None if prompt is None else [prompt] * len(readable),
        [inputs[i][0] for i in readable],
    )
    for j, error in errors.items():
        inputs[readable[j]] = (inputs[readable[j]][0], None, error)
    good = [(name, text) for name, text, error in inputs if error is None]
    result = []
    if good:
        try:
            result = attribute_by_likelihood(
                [text for _, text in good],
                candidates,
                prompts=None if prompt is None else [prompt] * len(good),
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                alpha=alpha,
                pool=pool,
                device=cfg.run.device if cfg else "auto",
                batch_size=cfg.likelihood.batch_size if cfg else 64,
                top=top,
                progress=True,
            )
        except NatprintsError as exc:
            raise _fail(str(exc)) from None
    if pool:
        failed = _emit(inputs, None, as_json)
        if good:
            typer.echo(_likelihood_line("pooled" if as_json else _pooled_name(len(good)), result, as_json))
        return failed
    lines = (_likelihood_line(name, p, as_json) for (name, _), p in zip(good, result, strict=True))
    return _emit(inputs, lines, as_json)


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
) -> None:
    """Attribute each text to the zoo model that most likely wrote it, or `unknown`.

    Results are printed in input order, in batches as they are ready (n-gram attributors), or all
    at once after one prediction over every input (attributors whose results depend on the batch,
    the likelihood method, --pool). The likelihood method scores a file's text without its final
    line ending.
    """
    from natprints.attribution.attributor import DEFAULT_MAX_TEXT_BYTES, load_attributor

    names = list(files or []) or ["-"]
    if sequential and pool:
        raise _fail("--sequential and --pool: choose one (both read the inputs as texts of one source)")
    if sequential and not 0 < error < 1:
        raise _fail(f"--error must lie strictly between 0 and 1, got {error}")
    if method is AttributeMethod.likelihood:
        try:
            if attributor is not None:
                raise NatprintsError("--attributor is for --method attributor; give --models DIR or a run's zoo")
            library = _likelihood_library(run, config, condition, models, tokenizer)
        except NatprintsError as exc:
            raise _fail(str(exc)) from None
        failed = _attribute_likelihood(
            names,
            library,
            prompt=prompt,
            temperature=1.0 if temperature is None else temperature,
            top_k=0 if top_k is None else top_k,
            top_p=1.0 if top_p is None else top_p,
            alpha=0.05 if alpha is None else alpha,
            pool=pool,
            top=top,
            as_json=as_json,
            max_bytes=max_bytes,
            sequential=error if sequential else None,
        )
        if failed:
            raise typer.Exit(1)
        return
    given = {
        "--models": models,
        "--tokenizer": tokenizer,
        "--prompt": prompt,
        "--temperature": temperature,
        "--top-k": top_k,
        "--top-p": top_p,
        "--alpha": alpha,
    }
    misplaced = [flag for flag, value in given.items() if value is not None]  # 0 is given, too
    if misplaced:
        raise _fail(f"{', '.join(misplaced)}: only with --method likelihood")
    try:
        directory, config_limit = _attributor_dir(run, config, condition, attributor)
        if attributor is None and not directory.is_dir() and directory.parent.is_dir():
            known = ", ".join(sorted(p.name for p in directory.parent.iterdir() if p.is_dir()))
            raise NatprintsError(f"no attributor for condition '{directory.name}' (this run has: {known})")
        model = load_attributor(directory, light=True)  # n-gram logreg: no scikit-learn import
    except NatprintsError as exc:
        raise _fail(str(exc)) from None
    limit = max_bytes or config_limit or DEFAULT_MAX_TEXT_BYTES
    if sequential:

        def score(text: str) -> tuple:
            import numpy as np

            return np.log(np.clip(model.predict_proba([text])[0], 1e-300, 1.0)), None, None

        _sequential_verdict(names, limit, model.labels, score, error, as_json, model)
        return
    if pool:
        from natprints.likelihood.attribute import attribute_pooled

        inputs = _read_inputs(names, limit)
        texts = [text for _, text, _ in inputs if text is not None]
        failed = _emit(inputs, None, as_json)
        _warn_seen(model, inputs)
        if texts:
            p = attribute_pooled(texts, model, top=top)
            if as_json:
                typer.echo(json.dumps({"input": "pooled", **p.to_dict(), "texts": len(texts)}))
            else:
                typer.echo(_line(_pooled_name(len(texts)), p, False, model.threshold))
        if failed:
            raise typer.Exit(1)
        return
    failed = 0
    for batch in _batches(names, model.batch_invariant):
        inputs = _read_inputs(batch, limit)
        texts = [text for _, text, _ in inputs if text is not None]
        _warn_seen(model, inputs)
        predictions = model.predict(texts, top_k=top) if texts else []
        good = [name for name, _, error in inputs if error is None]
        failed += _emit(
            inputs, (_line(n, p, as_json, model.threshold) for n, p in zip(good, predictions, strict=True)), as_json
        )
    if failed:
        raise typer.Exit(1)


def _arriving(files: list[str], max_bytes: int, failed: list[str]) -> Iterator[tuple[str, str]]:
    """(name, text) per input, read only when asked for: files in order, stdin one line per text (as
    lines arrive; blank lines skipped). A bad input is reported on stderr, counted in ``failed``, skipped."""
    for name in files or ["-"]:
        if name != "-":
            for read, text, error in _read_inputs([name], max_bytes):
                if error is not None:
                    failed.append(read)
                    typer.echo(f"error: {_one_line(error)}", err=True)
                elif text is not None:
                    yield read, text
            continue
        if sys.stdin is None or sys.stdin.isatty():
            failed.append("<stdin>")
            typer.echo("error: <stdin>: no text piped in (give FILE arguments or pipe text)", err=True)
            continue
        for i, line in enumerate(sys.stdin, start=1):
            if line.strip():
                yield f"<stdin>:{i}", line.rstrip("\r\n")


def _sequential_verdict(
    files: list[str],
    max_bytes: int,
    labels: list[str],
    score: Any,
    error: float,
    as_json: bool,
    attributor: Any,
) -> int:
    """`attribute --sequential`: the verdict of :func:`natprints.attribution.sequential.attribute_stream`
    over the inputs as they arrive, one line; exit 1 when an input was bad."""
    from natprints.attribution.sequential import UNDECIDED, UNKNOWN, attribute_stream

    failed: list[str] = []

    def texts() -> Iterator[str]:
        for name, text in _arriving(files, max_bytes, failed):
            if attributor is not None:
                _warn_seen(attributor, [(name, text, None)])
            yield text

    verdict, lead = attribute_stream(texts(), score, len(labels), error)
    label = {UNKNOWN: "unknown", UNDECIDED: "undecided"}.get(verdict.label) or labels[verdict.label]
    if as_json:
        finite = lead if math.isfinite(lead) else None  # JSON has no infinity (a text impossible under the rest)
        record = {"input": "sequential", "label": label, "texts": verdict.texts, "error": error, "lead": finite}
        typer.echo(json.dumps(record))
    else:
        why = {
            "unknown": "every model rejected by the open-set test",
            "undecided": "the inputs ended first",
        }.get(label, f"leads every other model by {lead:.1f} nats")
        count = f"{verdict.texts} text{'' if verdict.texts == 1 else 's'}"
        typer.echo(f"sequential ({count}): {label} at error {error:g} ({why})")
    if failed:
        raise typer.Exit(1)
    return 0


def _warn_seen(model: Any, inputs: list[tuple[str, str | None, str | None]]) -> None:
    """A warning on stderr for each text the attributor learned or was calibrated on: its verdict
    there is no estimate of how it does on new texts."""
    for name, text, _ in inputs:
        part = model.seen_in(text) if text is not None else None
        if part is not None:
            what = "trained" if part == "train" else "calibrated"
            typer.echo(
                f"warning: {name}: this attributor was {what} on this text ({part} split); "
                "its verdict is not a held-out estimate",
                err=True,
            )


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

    settings, cache, reports = _settings(config)
    results = compare_models(
        model_a, model_b, method.value, settings, cache_dir=cache, device=device.value, reports_dir=reports
    )
    if as_json:
        payload = {"model_a": str(model_a), "model_b": str(model_b), "results": results}
        typer.echo(json.dumps(payload, indent=2, sort_keys=True))
        return
    typer.echo(f"A: {model_a}\nB: {model_b}")
    for name, r in results.items():
        if r["verdict"] == "incomparable":
            typer.echo(f"{name}: incomparable — {r['reason']}")
        elif r["verdict"] == "identical":
            typer.echo(f"{name}: identical — {r['note']}")
        elif name == "seedprints":
            z = "n/a" if r["z"] is None else f"{r['z']:.2f}"
            if r["verdict"] == "uncalibrated":
                analytic = "same seed lineage" if r["analytic_verdict"] == "related" else "no evidence of shared seed"
                verdict = f"{analytic} by the analytic test, UNCALIBRATED (two trained models: may be a false link)"
            else:
                verdict = f"{'same seed lineage' if r['same_lineage'] else 'no evidence of shared seed'}"
            typer.echo(
                f"seedprints: {_log10p_text(r['log10_p'])} (log10 p = {r['log10_p']:.2f}, z = {z}, "
                f"|S| = {r['kept']}/{r['k']}, N = {r['n_inputs']}) -> {verdict} at alpha = {r['alpha']:g}"
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

    settings, cache, reports = _settings(config)
    ranking = identify(
        model, library, settings, cache_dir=cache, device=device.value, progress=not as_json, reports_dir=reports
    )
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
    wait: WaitOpt = False,
) -> None:
    """Lineage experiments over the run's zoo: reports/<run>/lineage.csv, lineage.json, figures."""
    from natprints.lineage.experiments import run_lineage

    with running(config, wait) as cfg, stage_timer(cfg, "lineage") as run:
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
