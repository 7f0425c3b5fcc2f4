"""A fine-tuned transformer classifier: a classification head on the auditor's reference LM.

The discriminative counterpart of the per-candidate LMs (pipeline ``reflm+head``): the reference
LM's trunk, a linear head on the mean of its last hidden states over the continuation's positions,
both trained end to end with cross-entropy on one condition's training texts (prompt +
continuation, labelled by model). After each epoch the calibration texts' log-loss is measured; the
epoch with the lowest one gives the stored log-probabilities of the test and calibration texts. No
zoo weights are read: the trunk is the auditor's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from natprints.artifacts import Manifest, hash_obj, temp_path_for
from natprints.config import Config

HEAD_VERSION = 1


@dataclass(frozen=True)
class HeadTask:
    """One classifier to train: ``train`` and ``scored`` hold (prompt ids, continuation ids) per text."""

    name: str  # output file stem: condition, with @s<n> for a training-size point
    n_classes: int
    train: list[tuple[list[int], list[int]]]
    train_labels: np.ndarray
    scored_ids: list[str]  # sample ids of the texts scored (test and calibration)
    scored: list[tuple[list[int], list[int]]]
    cal_labels: np.ndarray  # label of each scored text in the calibration split, -1 elsewhere


def head_manifest(directory: Path, name: str, prefix: str = "head") -> Manifest:
    """The manifest of one classifier's scores (``prefix``: ``head``, or ``encoder`` for the fine-tuned
    sentence encoder)."""
    what = "classifier head" if prefix == "head" else f"fine-tuned {prefix}"
    return Manifest(directory, f"{what} {name}", f"{prefix}-{name}.manifest.json")


def _key(cfg: Config, reference_files: dict, task: HeadTask) -> str:
    return hash_obj(
        {
            "version": HEAD_VERSION,
            "settings": [cfg.reference.head_epochs, cfg.reference.head_lr, cfg.reference.head_batch_size],
            "reference": reference_files,
            "train": hash_obj([task.train, task.train_labels.tolist()]),
            "scored": hash_obj([task.scored_ids, task.scored, task.cal_labels.tolist()]),
        }
    )


def _batch(texts: list[tuple[list[int], list[int]]], pad: int):
    """Right-padded ids, and a mask of the continuation positions (the head's mean runs over them)."""
    import torch

    width = max(len(p) + len(c) for p, c in texts)
    ids = torch.full((len(texts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(texts), width), dtype=torch.long)
    continuation = torch.zeros((len(texts), width), dtype=torch.float32)
    for i, (p, c) in enumerate(texts):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        attention[i, :n] = 1
        continuation[i, len(p) : n] = 1.0
    if not continuation.sum(1).all():  # an empty continuation: pool over its prompt instead
        empty = continuation.sum(1) == 0
        continuation[empty] = attention[empty].float()
    return ids, attention, continuation


def train_head(cfg: Config, name: str, task: HeadTask, reference: Path, out: Path, *, progress: bool = True) -> bool:
    """Train one condition's classifier (``name`` = ``task.name``, the job's label); write
    ``head-<name>.parquet`` (sample id, log-probabilities).

    Returns whether it trained now (False: the stored output is current)."""
    import torch
    from torch import nn
    from tqdm.auto import tqdm

    from natprints.runtime import load_lm

    r = cfg.reference
    manifest = head_manifest(out, task.name)
    key = _key(cfg, Manifest(reference, "reference LM").read()["files"], task)
    if manifest.is_current(key):
        return False
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.reference.seed)
    lm = load_lm(reference)
    trunk = lm.model.train()
    pad = int(lm.config.eos_token_id or 0)
    head = nn.Linear(lm.config.hidden_size, task.n_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    params = list(trunk.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=r.head_lr, weight_decay=0.0)
    rng = np.random.default_rng(r.seed)
    size = r.head_batch_size
    is_cal = task.cal_labels >= 0

    def logits_of(texts):
        ids, attention, continuation = _batch(texts, pad)
        hidden = trunk(input_ids=ids, attention_mask=attention).last_hidden_state
        pooled = (hidden * continuation[..., None]).sum(1) / continuation.sum(1, keepdim=True)
        return head(pooled)

    def score() -> np.ndarray:
        trunk.eval()
        out_rows = []
        with torch.inference_mode():
            for start in range(0, len(task.scored), size):
                out_rows.append(torch.log_softmax(logits_of(task.scored[start : start + size]), -1).double().numpy())
        trunk.train()
        return np.concatenate(out_rows)

    best = score()  # the untrained head: uniform, the fallback when no epoch beats it on calibration
    best_loss = -best[is_cal, task.cal_labels[is_cal]].mean() if is_cal.any() else np.inf
    labels = torch.as_tensor(task.train_labels, dtype=torch.long)
    steps = r.head_epochs * -(-len(task.train) // size)
    bar = tqdm(total=steps, desc=f"head {task.name}", unit="step", leave=False, disable=not progress)
    for _ in range(r.head_epochs):
        order = rng.permutation(len(task.train))
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            loss = nn.functional.cross_entropy(logits_of([task.train[i] for i in rows]), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            bar.update()
        scored = score()
        loss_cal = -scored[is_cal, task.cal_labels[is_cal]].mean() if is_cal.any() else 0.0
        if loss_cal < best_loss:
            best, best_loss = scored, loss_cal
    bar.close()
    path = write_scores(out, "head", task.name, task.scored_ids, best)
    manifest.write(key, {"stage": "reference", "head": task.name, "cal_log_loss": float(best_loss)}, [path.name])
    return True


def write_scores(out: Path, prefix: str, name: str, sample_ids: list[str], log_proba: np.ndarray) -> Path:
    """A classifier's log-probabilities of the texts it scored: ``<prefix>-<name>.parquet`` in ``out``."""
    frame = pd.DataFrame({"sample_id": sample_ids, "log_proba": [row.tolist() for row in log_proba]})
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{prefix}-{name}.parquet"
    tmp = temp_path_for(path)
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def load_head(out: Path, name: str, prefix: str = "head") -> pd.DataFrame | None:
    """A stored classifier's log-probabilities indexed by sample id (verified), or None when absent."""
    manifest = head_manifest(out, name, prefix)
    if not manifest.exists():
        return None
    manifest.verify()
    return pd.read_parquet(out / f"{prefix}-{name}.parquet").set_index("sample_id")
