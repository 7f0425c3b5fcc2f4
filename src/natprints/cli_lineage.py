"""CLI commands for lineage (`lineage`); registered on the main app.

``natprints lineage A B`` compares one pair (the ``compare`` command is implied when the first
argument is not a sub-command), ``natprints lineage identify MODEL --library DIR`` ranks a library,
``natprints lineage run`` runs the experiments over a run's zoo. Heavy imports happen inside the
commands so that ``natprints --help`` stays fast.
"""

from __future__ import annotations

import json
import math
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from natprints.config import DEFAULT_CONFIG, LineageSettings
from natprints.errors import NatprintsError


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

_ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Take lineage settings and the feature cache from this run config."),
]
_DeviceOpt = Annotated[Device, typer.Option(help="Where SeedPrints runs its forward passes.")]
_JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON object instead of text.")]


def _settings(config: Path | None) -> tuple[LineageSettings, Path | None]:
    """Lineage settings and cache dir: from a config when given, else the defaults and no cache."""
    if config is None:
        return LineageSettings(), None
    from natprints.config import load_config

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
    config: _ConfigOpt = None,
    device: _DeviceOpt = Device.auto,
) -> None:
    """Is B from A's lineage? SeedPrints (same init seed) and/or weight-std (derived from)."""
    from natprints.lineage import seedprints as sp
    from natprints.lineage import weightstd as ws

    settings, cache = _settings(config)
    info_a, info_b = sp.inspect_model(model_a), sp.inspect_model(model_b)
    methods = ["seedprints", "weights"] if method is Method.all else [method.value]
    results: dict[str, Any] = {}
    for name in methods:
        try:
            if name == "seedprints":
                sp.check_comparable(info_a, info_b)
                r = sp.seedprints_compare(info_a.path, info_b.path, settings, cache_dir=cache, device=device.value)
                results[name] = r.to_dict() | {"verdict": "related" if r.same_lineage else "unrelated"}
            else:
                w = ws.weights_compare(info_a.path, info_b.path, settings.weights_threshold)
                results[name] = w.to_dict() | {"verdict": "related" if w.related else "unrelated"}
        except NatprintsError as exc:
            # a shape mismatch is an error for one method asked for by name; with --method all the
            # other method may still answer
            if method is not Method.all or "cannot compare" not in str(exc):
                raise
            results[name] = {"verdict": "incomparable", "reason": str(exc)}
    if all(r["verdict"] == "incomparable" for r in results.values()):
        raise NatprintsError("; ".join(r["reason"] for r in results.values()))
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
    config: _ConfigOpt = None,
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
    config: Annotated[Path, typer.Option("--config", "-c", help="The run config.")] = DEFAULT_CONFIG,
    force: Annotated[bool, typer.Option(help="Recompute even when the outputs are current.")] = False,
) -> None:
    """Lineage experiments over the run's zoo: reports/<run>/lineage.csv, lineage.json, figures."""
    from natprints.config import check_run_lock, load_config
    from natprints.lineage.experiments import run_lineage
    from natprints.timings import output_changed, stage_timer

    cfg = load_config(config)
    check_run_lock(cfg, config)
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


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.add_typer(lineage_app, name="lineage")
