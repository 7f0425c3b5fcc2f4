"""Attribute texts read from files or standard input, as `natprints attribute` does, in one call.

:func:`attribute_files` takes the inputs and a :class:`Request` (the method and what it reads: a
saved attributor, a run's zoo, or model directories of any family), and writes one result line per
input, in input order, through the ``out`` and ``err`` writers (stdout and stderr by default); it
returns how many inputs were bad. A bad input is one line on ``err`` and never stops the others; a
bad request (a missing run, a directory that is no model, options that do not go together) is a
:class:`~natprints.errors.NatprintsError` before any text is read. For texts already in memory,
call :func:`natprints.attribute` or :func:`natprints.attribution.likelihood.attribute_by_likelihood`.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import click

from natprints.artifacts import MANIFEST
from natprints.attribution.bundle import Bundle, check_hashes, compare, finite, read_bundle
from natprints.config import DEFAULT_CONFIG, Config, RunPaths, home, load_config
from natprints.errors import NatprintsError

if TYPE_CHECKING:
    from natprints.attribution.attributor import Attributor, Prediction
    from natprints.attribution.likelihood import LikelihoodPrediction

Writer = Callable[[str], None]
JSONL_TEXTS = 1000  # a JSONL file may hold up to this many times --max-bytes
FIRST_BATCH = 32  # the first answers come after this many inputs ...
MAX_BATCH = 2048  # ... then batches double up to this many
METHODS = ("attributor", "likelihood")
BACKGROUND_SOURCE = "reference"  # the run's reference LM among a bundle's sources (the joint open-set test)


def _stdout(line: str) -> None:
    click.echo(line)


def _stderr(line: str) -> None:
    click.echo(line, err=True)


class Input(NamedTuple):
    """One input: its name (a path, ``<stdin>``, ``<stdin>:LINE``, ``FILE:LINE`` of a JSONL file), and
    its text or why it has none; a JSONL record may give the text's prompt and sampled token ids."""

    name: str
    text: str | None
    error: str | None
    prompt: str | None = None
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Request:
    """What `natprints attribute` was asked. ``temperature``, ``top_k``, ``top_p`` and ``alpha`` are None
    when not given (their defaults are 1.0, 0, 1.0 and 0.05); giving one, or ``models``, ``tokenizer``
    or ``prompt``, is for the likelihood method only."""

    method: str = "attributor"
    run: str | None = None
    config: Path | None = None
    condition: str | None = None
    attributor: Path | None = None
    models: tuple[Path, ...] = ()
    tokenizer: Path | None = None
    prompt: str | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    alpha: float | None = None
    top: int = 3
    as_json: bool = False
    max_bytes: int | None = None
    pool: bool = False
    sequential: bool = False
    error: float = 0.01
    bundle: Path | None = None  # write an evidence bundle here
    device: str | None = None  # likelihood: where to score (default: the run's, else auto)
    batch_size: int | None = None  # likelihood: texts per batch (default: the run's, else 64)
    jsonl: bool = False  # each FILE holds JSONL records: `text`, optional `prompt` and `token_ids`
    segmentations: int = 0  # likelihood: rank by each string over its most probable segmentations (the beam)

    def check(self) -> None:
        """Options that do not go together, as one-line errors."""
        if self.method not in METHODS:
            raise NatprintsError(f"unknown method '{self.method}' (choose from: {', '.join(METHODS)})")
        if self.sequential and self.pool:
            raise NatprintsError("--sequential and --pool: choose one (both read the inputs as texts of one source)")
        if self.sequential and self.bundle is not None:
            raise NatprintsError("--bundle records a verdict set: not with --sequential")
        if self.jsonl and (self.sequential or self.bundle is not None):
            raise NatprintsError("--jsonl reads whole files of records: not with --sequential or --bundle")
        if self.segmentations < 0:
            raise NatprintsError(f"--segmentations must be >= 0, got {self.segmentations}")
        if self.segmentations and (self.sequential or self.bundle is not None):
            raise NatprintsError(
                "--segmentations ranks by lower bounds on each string's probability: not with --sequential or "
                "--bundle (their guarantees and recomputation read exact path probabilities)"
            )
        if self.sequential and not 0 < self.error < 1:
            raise NatprintsError(f"--error must lie strictly between 0 and 1, got {self.error}")
        if self.method == "likelihood":
            if self.attributor is not None:
                raise NatprintsError("--attributor is for --method attributor; give --models DIR or a run's zoo")
            self._one_run()
            if self.models and self.condition is not None:
                raise NatprintsError("give --models DIR, or --condition of a run's zoo, not both")
            return
        given = {
            "--models": self.models or None,
            "--tokenizer": self.tokenizer,
            "--prompt": self.prompt,
            "--temperature": self.temperature,
            "--top-k": self.top_k,
            "--top-p": self.top_p,
            "--alpha": self.alpha,
            "--segmentations": self.segmentations or None,
        }
        misplaced = [flag for flag, value in given.items() if value is not None]  # 0 is given, too
        if misplaced:
            raise NatprintsError(f"{', '.join(misplaced)}: only with --method likelihood")
        if self.attributor is not None and (self.condition is not None or self.run is not None):
            raise NatprintsError("give --attributor DIR, or --run/--config with --condition, not both")
        self._one_run()

    def _one_run(self) -> None:
        if self.run is not None and self.config is not None:
            raise NatprintsError("give --run NAME or --config PATH, not both")


def attribute_files(files: list[str], request: Request, *, out: Writer = _stdout, err: Writer = _stderr) -> int:
    """Attribute each input (``-`` or none: standard input) as ``request`` says; returns the bad inputs.
    With ``request.bundle``, the evidence bundle of the verdicts is written there (inputs must be files)."""
    request.check()
    files = list(files) or ["-"]
    if request.bundle is None:
        return _attribute(files, request, out, err, None)
    if "-" in files:
        raise NatprintsError("--bundle needs FILE arguments: standard input cannot be read again to verify")
    bundle = Bundle(request.method, {})
    failed = _attribute(files, request, out, err, bundle)
    bundle.write(request.bundle)
    err(f"wrote {request.bundle} ({len(bundle.inputs)} inputs; check it with `natprints verify {request.bundle}`)")
    return failed


def verify_bundle(path: Path | str) -> str:
    """Check every hash an evidence bundle records, recompute its scores and verdicts from the files it
    names, and return one line saying so; the first difference is a :class:`NatprintsError`."""
    data = read_bundle(path)
    check_hashes(data)
    r, sources = data["request"], data["sources"]
    common = {"top": r["top"], "max_bytes": r["max_bytes"], "pool": r["pool"]}
    if data["method"] == "likelihood":
        joint = r.get("open_set")  # the run's zoo, with the joint test calibrated on the run's scores
        request = Request(
            method="likelihood",
            run=joint["run"] if joint else None,
            condition=joint["condition"] if joint else None,
            models=() if joint else tuple(Path(source["path"]) for source in sources.values()),
            tokenizer=Path(r["tokenizer"]),
            prompt=r["prompt"],
            temperature=r["temperature"],
            top_k=r["top_k"],
            top_p=r["top_p"],
            alpha=r["alpha"],
            device=r["device"],
            batch_size=r["batch_size"],
            **common,
        )
    else:
        request = Request(method="attributor", attributor=Path(sources["attributor"]["path"]), **common)
    again = Bundle(data["method"], {})
    messages: list[str] = []
    failed = _attribute([entry["path"] for entry in data["inputs"]], request, messages.append, messages.append, again)
    if failed:
        raise NatprintsError(f"{path}: {failed} input(s) could not be scored again: {messages[-1]}")
    recomputed = _normalized(again)
    if [e["sha256"] for e in recomputed["inputs"]] != [e["sha256"] for e in data["inputs"]]:
        raise NatprintsError(f"{path}: the inputs read again are not the ones recorded")
    largest = max(
        compare(data["texts"], recomputed["texts"], "text"),
        compare(data["verdicts"], recomputed["verdicts"], "verdict"),
    )
    models = f"{len(sources)} model{'s' if len(sources) != 1 else ''}"
    what = models if data["method"] == "likelihood" else "1 attributor"
    return (
        f"verified: {len(data['inputs'])} inputs and {what} hash as recorded; every score and verdict recomputed "
        f"(largest difference {largest:.2g})"
    )


def _normalized(bundle: Bundle) -> dict[str, Any]:
    """A bundle as its JSON file reads back (tuples as lists, non-finite numbers as null)."""
    parts = {"inputs": bundle.inputs, "texts": bundle.texts, "verdicts": bundle.verdicts}
    return json.loads(json.dumps(finite(parts)))


def _attribute(files: list[str], request: Request, out: Writer, err: Writer, bundle: Bundle | None) -> int:
    if request.method == "likelihood":
        return _by_likelihood(files, request, out, err, bundle)
    model, directory, config_limit = open_attributor(request.run, request.config, request.condition, request.attributor)
    limit = _limit(request.max_bytes, config_limit)
    if bundle is not None:
        bundle.add_attributor(directory)
        bundle.request = {"top": request.top, "max_bytes": limit, "pool": request.pool}
    if request.sequential:

        def score(text: str) -> tuple:
            import numpy as np

            return np.log(np.clip(model.predict_proba([text])[0], 1e-300, 1.0)), None, None

        return _sequential(files, limit, model.labels, score, request, model, out, err)
    if request.pool:
        from natprints.attribution.likelihood import attribute_pooled

        inputs = read_inputs(files, limit, request.jsonl)
        texts = [item.text for item in inputs if item.text is not None]
        failed = _emit(inputs, None, request.as_json, out, err)
        _warn_seen(model, inputs, err)
        if texts:
            p = attribute_pooled(texts, model, top=request.top)
            if bundle is not None:
                _record_attributor(bundle, model, inputs, texts, [p], pooled=True)
            if request.as_json:
                out(json.dumps({"input": "pooled", **p.to_dict(), "texts": len(texts)}))
            else:
                out(_line(_pooled_name(len(texts)), p, False, _why_unknown(model)))
        return failed
    failed = 0
    _warn_blind(model, err)
    for batch in _batches(files, model.batch_invariant):
        inputs = read_inputs(batch, limit, request.jsonl)
        texts = [item.text for item in inputs if item.text is not None]
        _warn_seen(model, inputs, err)
        predictions = model.predict(texts, top_k=request.top) if texts else []
        good = [item.name for item in inputs if item.error is None]
        if bundle is not None and texts:
            _record_attributor(bundle, model, inputs, texts, predictions, pooled=False)
        lines = (_line(n, p, request.as_json, _why_unknown(model)) for n, p in zip(good, predictions, strict=True))
        failed += _emit(inputs, lines, request.as_json, out, err)
    return failed


def _record_attributor(
    bundle: Bundle, model: Attributor, inputs: list[Input], texts: list[str], predictions: list, *, pooled: bool
) -> None:
    """An attributor's inputs, calibrated probabilities per text, and verdicts, into ``bundle``."""
    first = len(bundle.inputs)
    for name, text, *_ in inputs:
        if text is not None:
            bundle.add_input(name, text)
    bundle.texts += [{"input": first + i, "proba": row.tolist()} for i, row in enumerate(model.predict_proba(texts))]
    if pooled:
        bundle.verdicts.append({"input": "pooled", **predictions[0].to_dict(), "texts": len(texts)})
    else:
        bundle.verdicts += [{"input": first + i, **p.to_dict()} for i, p in enumerate(predictions)]


def _limit(max_bytes: int | None, config_limit: int | None) -> int:
    from natprints.attribution.attributor import DEFAULT_MAX_TEXT_BYTES

    return max_bytes or config_limit or DEFAULT_MAX_TEXT_BYTES


def open_attributor(
    run: str | None, config: Path | None, condition: str | None, attributor: Path | None
) -> tuple[Attributor, Path, int | None]:
    """The saved attributor asked for (a directory, or a run's condition: ``all`` by default), its
    directory, and the config's text size limit when a config was read."""
    from natprints.attribution.attributor import load_attributor

    directory, limit = _attributor_dir(run, config, condition, attributor)
    if attributor is None and not directory.is_dir() and directory.parent.is_dir():
        known = ", ".join(sorted(p.name for p in directory.parent.iterdir() if p.is_dir()))
        raise NatprintsError(f"no attributor for condition '{directory.name}' (this run has: {known})")
    return load_attributor(directory, light=True), directory, limit  # n-gram logreg: no scikit-learn import


def _attributor_dir(
    run: str | None, config: Path | None, condition: str | None, attributor: Path | None
) -> tuple[Path, int | None]:
    from natprints.zoo.spec import resolve_condition

    if attributor is not None:
        return attributor, None
    limit = None
    if run is None:
        cfg = load_config(config or DEFAULT_CONFIG)
        run, limit = cfg.run.name, cfg.attribution.max_text_bytes
    paths = RunPaths(home(), run)
    saved = sorted(p for p in paths.attributors.glob("*") if (p / MANIFEST).is_file())
    if condition is None and len(saved) == 1:  # e.g. `natprints collected`: one attributor, its own name
        return saved[0], limit
    if condition is None and not (paths.attributors / "all").is_dir():
        # a run whose one condition holds every model has no separate `all`: that condition is it
        manifest = paths.generated / MANIFEST
        members = json.loads(manifest.read_text(encoding="utf-8")).get("conditions", {}) if manifest.is_file() else {}
        condition = resolve_condition(members if isinstance(members, dict) else {}, "all")
    return paths.attributors / (condition or "all"), limit


def read_inputs(files: list[str], max_bytes: int, jsonl: bool = False) -> list[Input]:
    """Each input read whole, in order; `-` reads standard input. A bad one carries its error. With
    ``jsonl``, each file (or stdin) holds one record per line, each an input (:func:`read_record`)."""
    from natprints.attribution.attributor import decode_text, read_text_file

    out: list[Input] = []
    limit = max_bytes * JSONL_TEXTS if jsonl else max_bytes
    for name in files or ["-"]:
        shown = "<stdin>" if name == "-" else name
        try:
            if name == "-":
                if sys.stdin is None or sys.stdin.isatty():
                    raise NatprintsError("<stdin>: no text piped in (give FILE arguments or pipe text)")
                stream = getattr(sys.stdin, "buffer", None)
                data = stream.read(limit + 1) if stream is not None else sys.stdin.read().encode("utf-8")
                content = decode_text(data, "<stdin>", limit)
            else:
                content = read_text_file(name, limit)
        except NatprintsError as exc:
            out.append(Input(shown, None, str(exc)))
            continue
        if not jsonl:
            out.append(Input(shown, content, None))
            continue
        lines = [(i, line) for i, line in enumerate(content.splitlines(), start=1) if line.strip()]
        out += [read_record(f"{shown}:{i}", line, max_bytes) for i, line in lines]
    return out


def read_record(name: str, line: str, max_bytes: int) -> Input:
    """One JSONL record as an input: ``text`` (required), ``prompt`` (the string it continues) and
    ``token_ids`` (the ids it was sampled as, which the likelihood method scores instead of a
    re-tokenization under each model whose tokenizer reads them back as the text); other keys are left
    alone. A bad record is an input that carries its error."""
    from natprints.attribution.attributor import decode_text

    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return Input(name, None, f"{name}: not a JSON record ({exc.msg})")
    if not isinstance(record, dict):
        return Input(name, None, f"{name}: not a JSON object")
    text, prompt, ids = record.get("text"), record.get("prompt"), record.get("token_ids")
    why = None
    if not isinstance(text, str):
        why = "needs a `text` string"
    elif prompt is not None and not isinstance(prompt, str):
        why = "its `prompt` must be a string"
    elif ids is not None and not (
        isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
    ):
        why = "its `token_ids` must be a non-empty list of non-negative integers"
    if why is not None:
        return Input(name, None, f"{name}: {why}")
    try:
        decode_text(text.encode("utf-8", "surrogatepass"), name, max_bytes)
    except NatprintsError as exc:
        return Input(name, None, str(exc))
    return Input(name, text, None, prompt, None if ids is None else tuple(ids))


def _batches(names: list[str], streaming: bool) -> Iterator[list[str]]:
    """Inputs in growing batches; one batch of all when results depend on the batch."""
    if not streaming:
        yield names
        return
    start, size = 0, FIRST_BATCH
    while start < len(names):
        yield names[start : start + size]
        start, size = start + size, min(size * 2, MAX_BATCH)


def one_line(text: str) -> str:
    """``text`` as one printed line: a newline or other unprintable character (in a file name, say) and
    a backslash are escaped as ``repr`` writes them, so no input can forge or split a result line."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else repr(c)[1:-1] for c in text)


def _then(p: Prediction) -> str:
    others = ", ".join(f"{m} {q:.3f}" for m, q in p.top if m != p.best_model)
    return f"; then {others}" if others else ""


def _line(name: str, p: Prediction, as_json: bool, why_unknown: str) -> str:
    """One input's result line; ``why_unknown`` follows the best model's probability in an `unknown`."""
    if as_json:
        return json.dumps({"input": name, **p.to_dict()})
    if p.unknown:
        head = f"unknown (best {p.best_model} {p.probability:.3f}{why_unknown})"
    else:
        head = f"{p.label} {p.probability:.3f}"
    return one_line(f"{name}: {head}" + _then(p))


def _why_unknown(model: Attributor) -> str:
    """Why an attributor's verdict is `unknown`: its outsider test, or its probability threshold."""
    if model.outsider is not None:
        return f"; unlike its own texts to the outsider detector at alpha {model.outsider.alpha:g}"
    return f" < threshold {model.threshold:.3f}"


def _likelihood_line(name: str, p: LikelihoodPrediction, as_json: bool) -> str:
    if p.open_set == "joint":
        why = f"; rejected by the joint test against the reference LM at alpha {p.alpha:g}"
    else:
        why = f"; every model rejected at alpha {p.alpha:g}"
    line = _line(name, p, as_json, why)
    return line if as_json else line + p.scored_line()


def _pooled_name(texts: int) -> str:
    return f"pooled ({texts} text{'' if texts == 1 else 's'})"


def _emit(inputs: list[Input], lines: Iterator[str] | None, as_json: bool, out: Writer, err: Writer) -> int:
    """Write the next of ``lines`` for each good input and an error for each bad one, in input order.

    With ``lines`` None (one pooled verdict follows), only the errors. Returns how many inputs were bad.
    """
    failed = 0
    pending: list[str] = []
    for name, _text, error, *_ in inputs:
        if error is None:
            if lines is not None:
                pending.append(next(lines))
            continue
        failed += 1
        if as_json:
            pending.append(json.dumps({"input": name, "error": error}))
        if pending:  # keep stdout and stderr in input order
            out("\n".join(pending))
            pending = []
        err(f"error: {one_line(error)}")  # the error names the input
    if pending:
        out("\n".join(pending))
    return failed


class Library(NamedTuple):
    """The candidate models of a likelihood attribution, their tokenizer, the run config if one was read,
    and the run's condition where the models are its zoo's."""

    models: dict[str, Path]
    tokenizer: Path
    cfg: Config | None
    condition: str | None = None


def recorded_config(run: str) -> Config:
    """The config a run was made with, as its run lock recorded it."""
    lock = RunPaths(home(), run).run_lock
    if not lock.is_file():
        raise NatprintsError(f"no run '{run}' at {lock.parent} (no {lock.name}); give --config PATH")
    try:
        return Config.model_validate(json.loads(lock.read_text(encoding="utf-8"))["config"])
    except (OSError, ValueError, KeyError, TypeError):  # pydantic's ValidationError is a ValueError
        raise NatprintsError(f"{lock}: cannot read the config the run recorded; give --config PATH") from None


def likelihood_library(
    run: str | None,
    config: Path | None,
    condition: str | None,
    models: tuple[Path, ...] | list[Path],
    tokenizer: Path | None,
) -> Library:
    """``models`` (labels: directory names), else the run's zoo models of ``condition``; and the tokenizer."""
    from natprints.declared import declared_conditions, model_directory
    from natprints.zoo import condition_members
    from natprints.zoo.spec import resolve_condition, string_members

    cfg = load_config(config) if config is not None else None
    if models:
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
        return Library(library, tokenizer, cfg)
    cfg = cfg or (recorded_config(run) if run is not None else load_config(DEFAULT_CONFIG))
    members = {**condition_members(cfg), **string_members(cfg)}  # each model reads with its own tokenizer
    declared = declared_conditions(cfg)
    condition = resolve_condition(members, condition or "all")
    if condition in declared:  # models the run did not train, where the config says they are
        paths = {m.label: model_directory(m) for m in cfg.models}
        return Library({label: paths[label] for label in declared[condition]}, tokenizer or cfg.paths.tokenizer, cfg)
    if condition not in members:
        known = ", ".join([*members, *declared])
        raise NatprintsError(f"no condition '{condition}' in run '{cfg.run.name}' (it has: {known})")
    zoo_dir = cfg.paths.zoo
    if not zoo_dir.is_dir():
        raise NatprintsError(f"no zoo at {zoo_dir}; run `natprints zoo` first")
    for model_id in members[condition]:
        if not (zoo_dir / model_id / MANIFEST).is_file():
            raise NatprintsError(f"zoo model {model_id} is missing at {zoo_dir}; run `natprints zoo` first")
    return Library({m: zoo_dir / m for m in members[condition]}, tokenizer or cfg.paths.tokenizer, cfg, condition)


def _joint_open_set(library: Library, k: int, alpha: float, shared: Any) -> tuple[Any, dict[str, Any]] | None:
    """The joint open-set test for verdicts on ``k`` texts each, where the models are a run's zoo and the
    run has the scores it is calibrated on: the run's reference LM (a candidate, reading with ``shared``,
    the run's tokenizer where already loaded) and each model's limit; else None (the analytic test decides)."""
    from natprints.attribution.whitebox import run_joint_limits
    from natprints.likelihood.strings import load_candidates
    from natprints.modeldir import load_model_tokenizer
    from natprints.reference.stage import background_dir

    if library.cfg is None or library.condition is None or not (background_dir(library.cfg) / MANIFEST).is_file():
        return None
    limits = run_joint_limits(library.cfg, library.condition, k, alpha)
    if limits is None:
        return None
    shared = shared if shared is not None else load_model_tokenizer(library.tokenizer)
    return load_candidates({BACKGROUND_SOURCE: background_dir(library.cfg)}, shared)[BACKGROUND_SOURCE], limits


def _by_likelihood(files: list[str], request: Request, out: Writer, err: Writer, bundle: Bundle | None) -> int:
    """The likelihood method: every model checked before any text is read; then every input read first
    (with ``sequential``, one at a time until a verdict)."""
    from natprints.attribution.attributor import without_final_newline
    from natprints.attribution.likelihood import attribute_by_likelihood
    from natprints.likelihood.strings import encode_for, load_candidates
    from natprints.modeldir import has_tokenizer, inspect_model, load_model_tokenizer
    from natprints.runtime import resolve_device

    library = likelihood_library(request.run, request.config, request.condition, request.models, request.tokenizer)
    for directory in library.models.values():  # a directory that is no model: said before the tokenizer
        inspect_model(directory)
    shared = None
    if not all(has_tokenizer(d) for d in library.models.values()):  # some model reads the shared one
        shared = load_model_tokenizer(library.tokenizer)
    candidates = load_candidates(library.models, shared)
    cfg = library.cfg
    limit = _limit(request.max_bytes, cfg.attribution.max_text_bytes if cfg else None)
    prompt = request.prompt
    options = {
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "top_k": 0 if request.top_k is None else request.top_k,
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "device": resolve_device(request.device or (cfg.run.device if cfg else "auto")),  # a bundle records where
        "batch_size": request.batch_size or (cfg.likelihood.batch_size if cfg else 64),
    }
    alpha = 0.05 if request.alpha is None else request.alpha
    if bundle is not None:
        bundle.add_models(library.models, library.tokenizer)
        bundle.config = cfg.model_dump(mode="json") if cfg else None
        bundle.request = {
            "prompt": prompt,
            "alpha": alpha,
            "top": request.top,
            "max_bytes": limit,
            "pool": request.pool,
            "tokenizer": str(Path(library.tokenizer).resolve()),
            **options,
        }
    if request.sequential:
        loaded: dict = {}  # each model loaded once for the whole stream
        labels = list(candidates)

        def score(text: str) -> tuple:
            import numpy as np

            prompts = None if prompt is None else [prompt]
            p = attribute_by_likelihood(
                [without_final_newline(text)], candidates, prompts=prompts, loaded=loaded, **options
            )[0]
            return tuple(np.array([part[m] for m in labels]) for part in (p.loglik, p.centred, p.variance))

        return _sequential(files, limit, labels, score, request, None, out, err)
    inputs = read_inputs(files, limit, request.jsonl)
    if not request.jsonl:  # a record's text is exact; a file's last line ending is the file's
        inputs = [item._replace(text=without_final_newline(item.text)) if item.text else item for item in inputs]
    inputs = [item._replace(prompt=prompt) if item.prompt is None else item for item in inputs]
    readable = [i for i, item in enumerate(inputs) if item.text is not None]
    given = any(item.token_ids is not None for item in inputs)
    _, errors, _ = encode_for(
        candidates,
        [inputs[i].text for i in readable],
        [inputs[i].prompt for i in readable],
        [inputs[i].name for i in readable],
        [inputs[i].token_ids for i in readable] if given else None,
    )
    for j, error in errors.items():
        inputs[readable[j]] = Input(inputs[readable[j]].name, None, error)
    good_inputs = [item for item in inputs if item.error is None]
    good = [(item.name, item.text) for item in good_inputs]
    result: Any = []
    per_token: dict[str, list[list[float]]] = {}
    joint = _joint_open_set(library, len(good) if request.pool else 1, alpha, shared) if good else None
    if bundle is not None and joint is not None:
        bundle.add_models({BACKGROUND_SOURCE: joint[0].info.path}, library.tokenizer)
        bundle.request["open_set"] = {"test": "joint", "run": cfg.run.name, "condition": library.condition}
    if good:
        result = attribute_by_likelihood(
            [text for _, text in good],
            candidates,
            prompts=[item.prompt for item in good_inputs],
            sampled=[item.token_ids for item in good_inputs] if given else None,
            alpha=alpha,
            pool=request.pool,
            top=request.top,
            progress=bundle is None,
            token_logprobs=per_token if bundle is not None else None,  # only a bundle keeps them
            segmentations=request.segmentations,
            background=joint[0] if joint else None,
            joint=joint[1] if joint else None,
            **options,
        )
    if bundle is not None:
        for name, text in good:
            bundle.add_input(name, text)
        for i in range(len(good)):
            scores: dict[str, Any] = {"input": i, "token_logprobs": {m: per_token[m][i] for m in per_token}}
            if not request.pool:
                scores |= {"loglik": result[i].loglik, "z": result[i].z, "tokens": result[i].model_tokens}
            bundle.texts.append(scores)
        verdicts = [result] if request.pool else result
        bundle.verdicts += [{"input": "pooled" if request.pool else i, **p.to_dict()} for i, p in enumerate(verdicts)]
    if request.pool:
        failed = _emit(inputs, None, request.as_json, out, err)
        if good:
            out(_likelihood_line("pooled" if request.as_json else _pooled_name(len(good)), result, request.as_json))
        return failed
    lines = (_likelihood_line(name, p, request.as_json) for (name, _), p in zip(good, result, strict=True))
    return _emit(inputs, lines, request.as_json, out, err)


def _arriving(files: list[str], max_bytes: int, failed: list[str], err: Writer) -> Iterator[tuple[str, str]]:
    """(name, text) per input, read only when asked for: files in order, stdin one line per text (as
    lines arrive; blank lines skipped). A bad input is reported on ``err``, counted in ``failed``, skipped."""
    for name in files or ["-"]:
        if name != "-":
            for read, text, error, *_ in read_inputs([name], max_bytes):
                if error is not None:
                    failed.append(read)
                    err(f"error: {one_line(error)}")
                elif text is not None:
                    yield read, text
            continue
        if sys.stdin is None or sys.stdin.isatty():
            failed.append("<stdin>")
            err("error: <stdin>: no text piped in (give FILE arguments or pipe text)")
            continue
        for i, line in enumerate(sys.stdin, start=1):
            if line.strip():
                yield f"<stdin>:{i}", line.rstrip("\r\n")


def _sequential(
    files: list[str],
    max_bytes: int,
    labels: list[str],
    score: Callable[[str], tuple],
    request: Request,
    attributor: Attributor | None,
    out: Writer,
    err: Writer,
) -> int:
    """`--sequential`: the verdict of :func:`natprints.attribution.sequential.attribute_stream` over the
    inputs as they arrive, one line; returns the bad inputs."""
    from natprints.attribution.sequential import UNDECIDED, UNKNOWN, attribute_stream

    failed: list[str] = []

    def texts() -> Iterator[str]:
        for name, text in _arriving(files, max_bytes, failed, err):
            if attributor is not None:
                _warn_seen(attributor, [Input(name, text, None)], err)
            yield text

    error = request.error
    verdict, lead = attribute_stream(texts(), score, len(labels), error)
    label = {UNKNOWN: "unknown", UNDECIDED: "undecided"}.get(verdict.label) or labels[verdict.label]
    if request.as_json:
        finite = lead if math.isfinite(lead) else None  # JSON has no infinity (a text impossible under the rest)
        out(json.dumps({"input": "sequential", "label": label, "texts": verdict.texts, "error": error, "lead": finite}))
    else:
        why = {
            "unknown": "every model rejected by the open-set test",
            "undecided": "the inputs ended first",
        }.get(label, f"leads every other model by {lead:.1f} nats")
        count = f"{verdict.texts} text{'' if verdict.texts == 1 else 's'}"
        out(f"sequential ({count}): {label} at error {error:g} ({why})")
    return len(failed)


def _warn_blind(model: Attributor, err: Writer) -> None:
    """A warning where the outsider test cannot call one text of some model `unknown`: too few of that
    model's texts calibrated it (a pool of texts, ``--pool``, still can be)."""
    blind = model.outsider.blind(1) if model.outsider is not None else []
    if blind:
        alpha = model.outsider.alpha
        names = ", ".join(model.labels[m] for m in blind)
        err(
            f"warning: the outsider test has fewer than {math.ceil(2 / alpha - 1)} calibration texts of {names}: "
            f"a single text attributed to them is never `unknown` at alpha {alpha:g} (--pool can be)"
        )


def _warn_seen(model: Attributor, inputs: list[Input], err: Writer) -> None:
    """A warning for each text the attributor learned or was calibrated on: its verdict there is no
    estimate of how it does on new texts."""
    for name, text, *_ in inputs:
        part = model.seen_in(text) if text is not None else None
        if part is not None:
            what = "trained" if part == "train" else "calibrated"
            err(
                f"warning: {name}: this attributor was {what} on this text ({part} split); "
                "its verdict is not a held-out estimate"
            )
