"""What every command shares: the app, its one error handler, the common options, and
:func:`running`, which opens a run for writing."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from natprints.artifacts import NO_SPACE, no_space
from natprints.config import HOME_VARIABLE, Config, check_run_lock, home, load_config
from natprints.errors import NatprintsError
from natprints.runtime import StageResult, exclusive_run, stage_timer


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


def run_stage(
    config: Path, wait: bool, name: str, work: Callable[[Config], StageResult], zoo_table: bool = False
) -> None:
    """Open the run, time the stage's work (recorded when it did any), print what it says; with
    ``zoo_table``, rewrite the zoo's table after it."""
    with running(config, wait) as cfg:
        with stage_timer(cfg, name) as timer:
            result = work(cfg)
            timer.did_work, timer.current = result.did_work, result.current
        for line in result.lines:
            typer.echo(line)
        if zoo_table:
            from natprints.reports.index import write_zoo_report

            typer.echo(f"wrote {write_zoo_report(cfg)}")
