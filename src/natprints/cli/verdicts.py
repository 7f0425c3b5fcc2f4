"""`natprints attribute` and `natprints verify`: options in, one library call
(:mod:`natprints.attribution.verdicts`), verdicts out."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from natprints.cli.base import MaybeConfigOpt, app


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
            help="likelihood: the open-set test's level (default 0.05). With a run's zoo whose reference LM "
            "scored the run's texts: the joint test, `unknown` when the best model's ratio against the "
            "reference LM and its typicality, joined, are rarer than this among pools of as many of its own "
            "texts. Else (and with --sequential) the analytic test: reject a model when its own samples are "
            "less likely than this to be as far from typical as the text, either way; `unknown` when every "
            "model is rejected.",
        ),
    ] = None,
    segmentations: Annotated[
        int,
        typer.Option(
            "--segmentations",
            min=0,
            help="likelihood: rank the models by each re-tokenized text's probability summed over its most "
            "probable token paths, this many per search round (8 is the runs' default; 0: its canonical "
            "tokenization alone). About ten times the scoring work.",
        ),
    ] = 0,
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
    jsonl: Annotated[
        bool,
        typer.Option(
            "--jsonl",
            help="Each FILE (or stdin) holds JSONL records, each an input: `text`, and optionally `prompt` (the "
            "string it continues; else --prompt) and `token_ids` (the ids it was sampled as: the likelihood method "
            "scores them under each model whose tokenizer reads them back as the text, and says so).",
        ),
    ] = False,
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
        jsonl=jsonl,
        segmentations=segmentations,
    )
    if attribute_files(list(files or []), request):
        raise typer.Exit(1)


@app.command()
def verify(bundle: Annotated[Path, typer.Argument(metavar="BUNDLE", help="A file from `attribute --bundle`.")]) -> None:
    """Check an evidence bundle: every hash again, every score and verdict recomputed from its files."""
    from natprints.attribution.verdicts import verify_bundle

    typer.echo(verify_bundle(bundle))
