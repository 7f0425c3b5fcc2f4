"""The `natprints` command line: one Typer app, a thin layer over the importable stage functions.

Every stage takes the same ``--config`` (and ``--wait``) options and opens its run through
:func:`running` (in :mod:`natprints.cli.base`), which holds the run's lock while it writes. Heavy
libraries are imported inside commands, so `natprints --help` and the n-gram `attribute` path start
fast (an n-gram attributor never imports torch, a TF-IDF + logistic regression one not even
scikit-learn). Every user-facing error is one line on stderr and exit code 1; Ctrl-C says how to resume
and exits 130.

The commands live by kind: the stages and run management in :mod:`natprints.cli.stages`, attribution
in :mod:`natprints.cli.verdicts`, lineage in :mod:`natprints.cli.lineage`; importing them registers
them on :data:`app`.
"""

from __future__ import annotations

import shlex
import sys

import typer

from natprints.cli import lineage, stages, verdicts
from natprints.cli.base import app, running
from natprints.config import offline_environment
from natprints.errors import NatprintsError

__all__ = ["app", "lineage", "main", "running", "stages", "verdicts"]


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
