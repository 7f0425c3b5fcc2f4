"""`natprints lineage`: compare two model directories, place one in a library, or run the lineage
experiments of a run."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from natprints.cli.base import ConfigOpt, MaybeConfigOpt, WaitOpt, app, run_stage
from natprints.config import DEFAULT_CONFIG, LineageSettings, load_config


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

    run_stage(config, wait, "lineage", lambda c: run(c, force=force))


app.add_typer(lineage_app, name="lineage")
