"""CLI commands for attribution (`experiments`, `attribute`); registered on the main app.

Heavy imports happen inside the commands: `natprints attribute` with an n-gram attributor never
imports torch, and with a TF-IDF + logistic regression one not even scikit-learn. Both commands
turn a :class:`NatprintsError` into one `error:` line and exit 1.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from natprints.errors import NatprintsError

if TYPE_CHECKING:
    from natprints.attributor import Prediction


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def experiments(
    config: Annotated[Path, typer.Option("--config", "-c", help="Run config (TOML).")] = Path("configs/default.toml"),
    force: Annotated[bool, typer.Option("--force", help="Redo every condition, even when up to date.")] = False,
) -> None:
    """Fit every condition's pipelines; write results.jsonl, accuracy.csv and the attributors."""
    from natprints.attribution import accuracy_table, load_records, run_experiments
    from natprints.config import check_run_lock, load_config
    from natprints.timings import output_changed, stage_timer

    try:
        cfg = load_config(config)
        check_run_lock(cfg, config)
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
    from natprints.config import DEFAULT_CONFIG, RunPaths, load_config

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
    return RunPaths(run).attributors / (condition or "all"), limit


def _read_inputs(files: list[str], max_bytes: int) -> list[tuple[str, str | None, str | None]]:
    """(name, text, error) per input, in order; `-` (or no FILE) reads standard input."""
    from natprints.attributor import decode_text, read_text_file

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


def attribute(
    files: Annotated[
        list[str] | None,
        typer.Argument(metavar="FILE", help="Text files to attribute; `-` or none reads stdin."),
    ] = None,
    run: Annotated[str | None, typer.Option("--run", help="Use this run's attributors.")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Use this config's run (default configs/default.toml).")
    ] = None,
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
    from natprints.attributor import DEFAULT_MAX_TEXT_BYTES, load_attributor

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


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("experiments")(experiments)
    app.command("attribute")(attribute)
