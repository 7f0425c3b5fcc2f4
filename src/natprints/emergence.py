"""The `emergence` stage: how the text fingerprint forms over training.

One condition's models (``[emergence] condition``, the `seed` condition by default) are taken at every
saved step: the untrained init (step 0), each checkpoint, and the final weights. At each step every
model continues the run's prompts under the run's sampling settings, and the condition's attribution
problem is posed again among the models at that step, on the run's prompt split:

- the exact ceiling: each model's likelihood of the test texts, argmax (see ``attribution.ceiling``);
- the black-box pipelines of ``[emergence] pipelines``, fit on that step's training-prompt texts;
- the mean per-token KL divergence between the models' text distributions (on test and cal texts);
- each model's held-out loss, on the validation blocks training reports (equal to its curve).

The final step's texts are the generate stage's own (its first continuation of every prompt), so that
row reproduces the condition's ceiling in ``accuracy.csv``. A checkpoint's texts are named
``model@step-XXXXXX`` and sampled from that name, chunk by chunk: a killed run resumes where it stopped
and writes the texts an uninterrupted one would. Scores are cached by weights hash and row, as in the
likelihood stage. Writes ``data/emergence/<run>/`` (texts, scores, manifest) and ``reports/<run>/
emergence.csv``; `natprints report` draws it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from natprints.artifacts import MANIFEST, Manifest, atomic_write_text, hash_obj, sha256_file
from natprints.attribution import ceiling
from natprints.conditions import CALIBRATION_FRACTION, REQUIRED_COLUMNS, ConditionData, first_samples, split_prompts
from natprints.config import Config
from natprints.errors import NatprintsError
from natprints.records import TEXT_EMERGENCE_CSV
from natprints.runtime import Job, StageResult, run_jobs

EMERGENCE_VERSION = 2  # bump when the records change meaning
CSV_COLUMNS = [
    "condition",
    "step",
    "method",
    "white_box",
    "accuracy",
    "ci_low",
    "ci_high",
    "chance",
    "n_test",
    "ceiling_share",
    "best",
    "heldout_loss",
    "kl_per_token",
    "kl_min",
    "kl_max",
]


@dataclass(frozen=True)
class Point:
    """One model at one saved step: where its weights are and what its texts are named."""

    model_id: str
    step: int
    final: bool
    directory: Path
    weights: str  # the zoo manifest's sha256 of the weights file

    @property
    def label(self) -> str:
        return self.model_id if self.final else f"{self.model_id}@step-{self.step:06d}"


def _points(cfg: Config) -> tuple[list[str], dict[int, list[Point]]]:
    """The condition's models and, per step, each model's weights at that step (verified)."""
    from natprints.zoo import condition_members
    from natprints.zoo.stage import verified_model

    e = cfg.emergence
    members = sorted(condition_members(cfg).get(e.condition, []))
    if len(members) < 2:
        raise NatprintsError(f"emergence.condition = {e.condition!r} holds {len(members)} model(s); it needs two")
    steps: dict[int, list[Point]] = {}
    for model_id in members:
        fields = verified_model(cfg, model_id)
        zoo = cfg.paths.zoo / model_id
        saved = {0: ("init", False), int(fields["steps"]): ("", True)}
        saved |= {int(name.split("-")[1]): (f"checkpoints/{name}", False) for name in fields["checkpoints"]}
        for step, (sub, final) in sorted(saved.items()):
            weights = fields["files"][f"{sub}/model.safetensors" if sub else "model.safetensors"]
            steps.setdefault(step, []).append(Point(model_id, step, final, zoo / sub if sub else zoo, weights))
    common = {s: p for s, p in steps.items() if len(p) == len(members)}
    if e.steps:
        unknown = sorted(set(e.steps) - set(common))
        if unknown:
            raise NatprintsError(
                f"emergence.steps: no saved weights at step(s) {unknown} for every model of {e.condition!r} "
                f"(saved: {sorted(common)}); add them to train.checkpoint_steps and retrain, or drop them"
            )
        common = {s: common[s] for s in sorted(set(e.steps))}
    return members, dict(sorted(common.items()))


def _sampling(cfg: Config) -> Config:
    """The run's sampling settings with one continuation per prompt (the test texts' own settings)."""
    return cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"train_samples_per_prompt": 0})})


def _manifest(cfg: Config) -> Manifest:
    return Manifest(cfg.paths.emergence, "emergence texts and scores", remake="natprints emergence")


def _text_path(cfg: Config, point: Point) -> Path:
    return cfg.paths.emergence / "generated" / f"{point.label}.parquet"


def _score_path(cfg: Config, point: Point) -> Path:
    return cfg.paths.emergence / "likelihood" / f"{point.label}.parquet"


def _check_texts(cfg: Config, points: list[Point]) -> None:
    """Refuse to extend a text file this stage did not write as it is now, or written by other weights."""
    from natprints.generate.stage import check_written

    def recorded(fields: dict) -> dict[str, str | None]:
        return fields.get("weights") if isinstance(fields.get("weights"), dict) else {}

    paths = {_text_path(cfg, p): (p.label, p.weights) for p in points}
    check_written(_manifest(cfg), paths, recorded, "natprints emergence")


def _step_texts(cfg: Config, points: list[Point]) -> pd.DataFrame:
    """The texts of one step's models, one continuation per prompt, labelled by model id."""
    frames = []
    for point in points:
        path = cfg.paths.generated / f"{point.model_id}.parquet" if point.final else _text_path(cfg, point)
        frame = pd.read_parquet(path, columns=list(REQUIRED_COLUMNS))
        frame = frame[first_samples(frame, cfg)]
        frames.append(frame.assign(base_model=point.model_id))
    return pd.concat(frames, ignore_index=True)


def _score_job(
    cfg: Config,
    label: str,
    point: Point,
    rows: pd.DataFrame,
    path: Path,
    trusted: frozenset[str] = frozenset(),
    *,
    progress: bool = True,
) -> float:
    """Score ``rows`` under the point's weights (cached; ``trusted``: see ``read_cache``); return its
    held-out loss."""
    from natprints.corpus import load_tokens
    from natprints.likelihood.stage import score_model
    from natprints.runtime import load_lm, setup_torch
    from natprints.zoo.train import eval_blocks, heldout_loss

    score_model(cfg, point.directory, rows, path, point.weights, trusted, "natprints emergence", progress=progress)
    device = setup_torch(cfg)
    t = cfg.train
    blocks = eval_blocks(load_tokens(cfg.paths.corpus / "heldout_tokens.npy"), t.seq_len, t.eval_batches * t.batch_size)
    return heldout_loss(load_lm(point.directory, device=device), blocks, t.batch_size, False, device)


def _stage_key(cfg: Config, members: list[str], steps: dict[int, list[Point]]) -> str:
    parts = {
        "version": EMERGENCE_VERSION,
        "emergence": cfg.emergence.model_dump(),
        "generate": cfg.keyed_dump()["generate"],
        "split": [cfg.attribution.test_fraction, cfg.attribution.split_seed, CALIBRATION_FRACTION],
        "featurize": [cfg.attribution.max_features],
        "weights": {p.label: p.weights for points in steps.values() for p in points},
        "final_texts": {m: sha256_file(cfg.paths.generated / f"{m}.parquet") for m in members},
    }
    return hash_obj(parts)


def run_emergence(cfg: Config, *, max_chunks: int | None = None) -> dict[str, Any]:
    """The `emergence` stage; returns its manifest (``added``: texts generated by this call)."""
    from natprints.generate.stage import build_prompts, generate_for_model
    from natprints.likelihood.stage import recorded_files, text_rows

    start = time.time()
    members, steps = _points(cfg)
    if not (cfg.paths.generated / MANIFEST).is_file():
        raise NatprintsError(f"no generated corpora for run '{cfg.run.name}'; run `natprints generate` first")
    Manifest(cfg.paths.generated, "generated corpora", remake="natprints generate").verify()
    key = _stage_key(cfg, members, steps)
    manifest = _manifest(cfg)
    if max_chunks is None and manifest.is_current(key) and (cfg.paths.reports / TEXT_EMERGENCE_CSV).is_file():
        return {**manifest.read(), "added": 0}
    checkpoints = [p for points in steps.values() for p in points if not p.final]
    _check_texts(cfg, checkpoints)
    trusted = recorded_files(manifest)
    manifest.invalidate()
    (cfg.paths.emergence / "generated").mkdir(parents=True, exist_ok=True)
    (cfg.paths.emergence / "likelihood").mkdir(parents=True, exist_ok=True)
    prompts = build_prompts(cfg)
    sampling = _sampling(cfg)
    jobs = [
        Job(
            p.label,
            (sampling, p.label, prompts, _text_path(cfg, p), cfg.generate.seed, max_chunks, frozenset(), p.directory),
        )
        for p in checkpoints
    ]
    added = sum(run_jobs(cfg.run.worker_count(), generate_for_model, jobs, "emergence generate"))
    fields: dict[str, Any] = {"stage": "emergence", "run": cfg.run.name, "complete": False, "added": added}
    if max_chunks is not None:
        return fields
    split = split_prompts(
        prompts["prompt_id"], cfg.attribution.test_fraction, CALIBRATION_FRACTION, cfg.attribution.split_seed
    )
    token_ids = prompts.set_index("prompt_id")["prompt_token_ids"]
    texts = {step: _step_texts(cfg, points) for step, points in steps.items()}
    score_jobs = []
    for step, points in steps.items():
        scored = texts[step][texts[step]["prompt_id"].astype(str).map(split).isin(("test", "cal"))]
        rows = text_rows(list(scored.itertuples(index=False)), token_ids)
        score_jobs += [Job(p.label, (cfg, p.label, p, rows, _score_path(cfg, p), trusted)) for p in points]
    losses = run_jobs(cfg.run.worker_count(), _score_job, score_jobs, "emergence likelihood")
    heldout = {job.name: float(loss) for job, loss in zip(score_jobs, losses, strict=True)}
    records = _records(cfg, members, steps, texts, split, heldout, trusted)
    reports = cfg.paths.reports
    reports.mkdir(parents=True, exist_ok=True)
    atomic_write_text(reports / TEXT_EMERGENCE_CSV, pd.DataFrame(records, columns=CSV_COLUMNS).to_csv(index=False))
    fields |= {
        "complete": True,
        "condition": cfg.emergence.condition,
        "models": members,
        "steps": list(steps),
        "weights": {p.label: p.weights for points in steps.values() for p in points},
        "heldout_loss": heldout,
        "wall_s": round(time.time() - start, 2),
    }
    files = [str(_text_path(cfg, p).relative_to(cfg.paths.emergence)) for p in checkpoints]
    files += [str(_score_path(cfg, p).relative_to(cfg.paths.emergence)) for points in steps.values() for p in points]
    return {**manifest.write(key, fields, files), "added": added}


def _records(
    cfg: Config,
    members: list[str],
    steps: dict[int, list[Point]],
    texts: dict[int, pd.DataFrame],
    split: dict[str, str],
    heldout: dict[str, float],
    trusted: frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """Per step: the ceiling's row and each pipeline's, each with the step's held-out loss and KL."""
    from natprints.conditions import condition_data, split_parts
    from natprints.likelihood.stage import read_cache
    from natprints.records import ceiling_share
    from natprints.stats import classification_summary

    name = cfg.emergence.condition
    out = []
    for step, points in steps.items():
        data = condition_data(name, texts[step], "base_model", {})
        parts = split_parts(data, split)
        scores = {
            p.model_id: read_cache(_score_path(cfg, p), p.weights, trusted, "natprints emergence").set_index(
                "sample_id", drop=False
            )
            for p in points
        }
        # condition_view reads the scorer of label j from the frame's model_id: here the step's models
        frame = data.frame.assign(model_id=data.frame["base_model"])
        view_data = ConditionData(name, data.labels, frame, {})
        test = parts["test"]
        y_test = test["label"].to_numpy()
        view = ceiling.condition_view(view_data, test, scores, [])
        both = pd.concat([parts["test"], parts["cal"]], ignore_index=True)
        kl_view = ceiling.concat_views(view, ceiling.condition_view(view_data, parts["cal"], scores, []))
        y_both = both["label"].to_numpy()
        kls = [
            ceiling.kl_per_token(kl_view, y_both, a, b)[0]
            for a in range(len(members))
            for b in range(len(members))
            if a != b
        ]
        shared = {
            "condition": name,
            "step": step,
            "heldout_loss": float(np.mean([heldout[p.label] for p in points])),
            "kl_per_token": float(np.mean(kls)),
            "kl_min": float(np.min(kls)),
            "kl_max": float(np.max(kls)),
            "n_test": len(test),
        }
        top = classification_summary(y_test, ceiling.bayes_predict(view.loglik), len(members))
        rows = [{**shared, "method": "likelihood+bayes", "white_box": True, **_acc(top), "ceiling_share": 1.0}]
        cal_accuracy = {}
        for pipeline in cfg.emergence.pipelines:
            predicted, predicted_cal = _pipeline_predictions(cfg, pipeline, parts)
            s = classification_summary(y_test, predicted, len(members))
            share = ceiling_share(s["accuracy"], s["chance"], top["accuracy"])
            y_cal = parts["cal"]["label"].to_numpy()
            cal_accuracy[pipeline] = float((predicted_cal == y_cal).mean()) if len(y_cal) else 0.0
            rows.append({**shared, "method": pipeline, "white_box": False, **_acc(s), "ceiling_share": share})
        # chosen on the calibration split, as the experiments stage chooses (never on the test texts)
        best = max(rows[1:], key=lambda r: cal_accuracy[r["method"]])
        out += [r | {"best": r is best} for r in rows]
    return out


def _acc(summary: dict[str, Any]) -> dict[str, float]:
    return {k: summary[k] for k in ("accuracy", "ci_low", "ci_high", "chance")}


def _pipeline_predictions(cfg: Config, pipeline: str, parts: dict[str, pd.DataFrame]) -> tuple[np.ndarray, np.ndarray]:
    """The experiments stage's own fit: ``pipeline`` on the training texts only; its predictions of
    the test texts and of the calibration texts."""
    from natprints.attribution.grid import Setup, fit_predict

    feat, _, clf = pipeline.partition("+")
    setup = Setup(cfg, split={}, tokenizer=None, progress=False)
    pipe, predicted = fit_predict(setup, feat, clf, parts["train"], parts["test"])
    cal = parts["cal"]["text"].tolist()
    return predicted, np.asarray(pipe.predict(cal), dtype=np.int64) if cal else np.zeros(0, dtype=np.int64)


def run(cfg: Config, *, max_chunks: int | None = None) -> StageResult:
    """The `emergence` stage (a config may turn it off)."""
    from natprints.records import TEXT_EMERGENCE_CSV

    if not cfg.emergence.enabled:
        return StageResult(False, ("emergence: off in this config ([emergence] enabled = false)",), current=False)
    manifest = run_emergence(cfg, max_chunks=max_chunks)
    if not manifest["complete"]:
        return StageResult(False, (f"emergence: {manifest['added']} texts generated now (partial)",), current=False)
    return StageResult(
        manifest["added"] > 0,
        (
            f"emergence: {cfg.emergence.condition} at steps {', '.join(map(str, manifest['steps']))}; "
            f"{manifest['added']} texts generated now; wrote {cfg.paths.reports / TEXT_EMERGENCE_CSV}",
        ),
    )
