"""A fine-tuned sentence encoder as a text classifier (pipeline ``minilm+ft``).

The frozen all-MiniLM-L6-v2 encoder of the ``embed`` featurizer, trained end to end with a linear
head on the mean of its last hidden states (the pooling the frozen encoder was trained with) under
cross-entropy, on one condition's training continuations labelled by model. After each epoch the
calibration texts' log-loss is measured; the weights of the epoch with the lowest one are kept, and
training stops after ``patience`` epochs without a better one (early stopping on the calibration
split, never on the test texts). Dropout, the batch order and the head's initialisation follow
``seed``: a refit on the same texts on the same kind of CPU gives the same weights.

:class:`FineTunedEncoder` is a scikit-learn classifier (``fit``, ``predict_proba``, ``predict``,
``get_params``) and is saved as ``model.safetensors`` (encoder and head) beside ``encoder.json``
(its settings and classes); the tokenizer and architecture are those of the encoder package named
in ``encoder.json``, so a saved model reloads offline to identical predictions.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from natprints.artifacts import Manifest, atomic_write_text, hash_obj, temp_path_for
from natprints.config import Config
from natprints.errors import NatprintsError

ENCODER_FILE = "encoder.json"
WEIGHTS_FILE = "model.safetensors"
ENCODER_PREFIX = "encoder"  # its scores' file stem in the reference stage's output


class FineTunedEncoder(ClassifierMixin, BaseEstimator):
    """A sentence encoder fine-tuned end to end as a sequence classifier.

    ``fit(texts, y, validation=(texts, y))``: the validation texts choose the epoch kept and stop the
    training early; without them every epoch runs and the last is kept."""

    def __init__(
        self,
        encoder: str = "all-MiniLM-L6-v2",
        epochs: int = 3,
        lr: float = 3e-5,
        batch_size: int = 16,
        max_length: int = 128,
        patience: int = 1,
        seed: int = 0,
        threads: int = 0,
        verbose: bool = False,
    ):
        self.encoder = encoder
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.max_length = max_length
        self.patience = patience
        self.seed = seed
        self.threads = threads
        self.verbose = verbose  # a progress bar over the training steps

    # --- the network ---------------------------------------------------------------------------

    def _build(self, n_classes: int) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from natprints.config import offline_environment
        from natprints.modeldir import encoder_path

        offline_environment()
        hf_logging.disable_progress_bar()
        path = encoder_path(self.encoder)
        torch.manual_seed(self.seed)
        self.tokenizer_ = AutoTokenizer.from_pretrained(path)
        self.model_ = AutoModel.from_pretrained(path)
        self.head_ = torch.nn.Linear(self.model_.config.hidden_size, n_classes)
        torch.nn.init.zeros_(self.head_.weight)  # the untrained classifier is uniform
        torch.nn.init.zeros_(self.head_.bias)

    def _logits(self, texts: list[str]) -> Any:
        batch = self.tokenizer_(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        hidden = self.model_(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        return self.head_((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))

    def _log_proba(self, texts: list[str]) -> np.ndarray:
        import torch

        self.model_.eval()
        rows = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                logits = self._logits(texts[start : start + self.batch_size])
                rows.append(torch.log_softmax(logits, -1).double().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, len(self.classes_)))

    def _state(self) -> dict[str, Any]:
        state = {f"encoder.{k}": v for k, v in self.model_.state_dict().items()}
        state.update({f"head.{k}": v for k, v in self.head_.state_dict().items()})
        return {k: v.detach().clone().contiguous() for k, v in state.items()}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model_.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("encoder.")})
        self.head_.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})

    # --- scikit-learn ----------------------------------------------------------------------------

    def fit(self, X: Any, y: Any, validation: tuple[Any, Any] | None = None) -> FineTunedEncoder:
        import torch
        from sklearn.preprocessing import LabelEncoder
        from tqdm.auto import tqdm

        texts = [str(t) for t in X]
        encoder = LabelEncoder().fit(np.asarray(y))
        self.classes_ = encoder.classes_
        if len(self.classes_) < 2:
            raise NatprintsError("a classifier needs texts of at least two sources")
        labels = torch.as_tensor(encoder.transform(np.asarray(y)), dtype=torch.long)
        if self.threads:
            torch.set_num_threads(self.threads)
        self._build(len(self.classes_))
        params = list(self.model_.parameters()) + list(self.head_.parameters())
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01)
        rng = np.random.default_rng(self.seed)
        val_texts, val_y = [], None
        if validation is not None and len(validation[0]):
            val_texts, val_y = [str(t) for t in validation[0]], encoder.transform(np.asarray(validation[1]))
        best_state, best_loss, since = None, np.inf, 0
        self.history_: list[dict[str, float]] = []
        steps = self.epochs * -(-len(texts) // self.batch_size)
        bar = tqdm(total=steps, desc="fine-tune encoder", unit="step", leave=False, disable=not self.verbose)
        for epoch in range(self.epochs):
            self.model_.train()
            total = 0.0
            order = rng.permutation(len(texts))
            for start in range(0, len(texts), self.batch_size):
                batch = order[start : start + self.batch_size]
                loss = torch.nn.functional.cross_entropy(self._logits([texts[i] for i in batch]), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                total += float(loss.detach()) * len(batch)
                bar.update()
            entry = {"epoch": epoch + 1, "train_loss": total / max(len(texts), 1)}
            if val_y is not None:
                val_loss = float(-self._log_proba(val_texts)[np.arange(len(val_y)), val_y].mean())
                entry["validation_loss"] = val_loss
                if val_loss < best_loss:
                    best_state, best_loss, since = self._state(), val_loss, 0
                else:
                    since += 1
            self.history_.append(entry)
            if val_y is not None and since >= self.patience:
                break
        bar.close()
        if best_state is not None:
            self._load_state(best_state)
        self.best_epoch_ = (
            int(np.argmin([e["validation_loss"] for e in self.history_]) + 1) if val_y is not None else self.epochs
        )
        self.model_.eval()
        return self

    def predict_log_proba(self, X: Any) -> np.ndarray:
        return self._log_proba([str(t) for t in X])

    def predict_proba(self, X: Any) -> np.ndarray:
        return np.exp(self.predict_log_proba(X))

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[self.predict_log_proba(X).argmax(axis=1)]

    # --- files -----------------------------------------------------------------------------------

    def save(self, directory: Path | str) -> None:
        """``model.safetensors`` (encoder and head weights) and ``encoder.json`` (settings, classes)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / WEIGHTS_FILE
        tmp = temp_path_for(path)
        save_file(self._state(), str(tmp))
        tmp.replace(path)
        params = self.get_params() | {"verbose": False}
        meta = {"params": params, "classes": self.classes_.tolist(), "history": self.history_}
        atomic_write_text(directory / ENCODER_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: Path | str) -> FineTunedEncoder:
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / ENCODER_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise NatprintsError(f"{directory}: not a saved fine-tuned encoder (needs {ENCODER_FILE}, {WEIGHTS_FILE})")
        meta = json.loads((directory / ENCODER_FILE).read_text(encoding="utf-8"))
        model = cls(**meta["params"])
        model.classes_ = np.asarray(meta["classes"])
        model.history_ = meta.get("history", [])
        model._build(len(model.classes_))
        model._load_state(load_file(str(directory / WEIGHTS_FILE)))
        model.model_.eval()
        return model


# --- the reference stage's fine-tuned encoders -----------------------------------------------------

ENCODER_VERSION = 1


@dataclass(frozen=True)
class EncoderTask:
    """One encoder to fine-tune: a condition's training continuations (or the first ``n`` per prompt,
    ``name`` = condition@s<n>), scored on its test and calibration continuations."""

    name: str
    train_texts: list[str]
    train_labels: np.ndarray
    scored_ids: list[str]
    scored_texts: list[str]
    cal_labels: np.ndarray  # label of each scored text in the calibration split, -1 elsewhere
    save: bool  # keep the weights (the condition's full training split)


def encoder_estimator(cfg: Config, *, progress: bool = False) -> FineTunedEncoder:
    r = cfg.reference
    return FineTunedEncoder(
        epochs=r.encoder_epochs,
        lr=r.encoder_lr,
        batch_size=r.encoder_batch_size,
        max_length=r.encoder_max_length,
        patience=r.encoder_patience,
        seed=r.seed,
        threads=cfg.run.threads,
        verbose=progress,
    )


def encoder_dir(cfg: Config, name: str) -> Path:
    return cfg.paths.models / "encoders" / name


def train_encoder(cfg: Config, name: str, task: EncoderTask, out: Path, *, progress: bool = True) -> bool:
    """Fine-tune one task's encoder (``name`` = ``task.name``, the job's label); write
    ``encoder-<name>.parquet`` (sample id, log-probabilities) and, for a full training split, the
    weights under ``models/<run>/encoders/<name>/``. Returns whether it trained now."""
    from natprints.modeldir import encoder_version
    from natprints.reference.head import head_manifest, write_scores

    manifest = head_manifest(out, task.name, ENCODER_PREFIX)
    estimator = encoder_estimator(cfg, progress=progress)
    key = hash_obj(
        {
            "version": ENCODER_VERSION,
            "estimator": estimator.get_params() | {"verbose": False},  # a progress bar changes no weight
            "package": encoder_version(estimator.encoder),
            "train": hash_obj([task.train_texts, task.train_labels.tolist()]),
            "scored": hash_obj([task.scored_ids, task.scored_texts, task.cal_labels.tolist()]),
            "save": task.save,
        }
    )
    saved = Manifest(encoder_dir(cfg, task.name), f"fine-tuned encoder {task.name}")
    if manifest.is_current(key) and (not task.save or saved.is_current(key)):
        return False
    is_cal = task.cal_labels >= 0
    cal_texts = [t for t, c in zip(task.scored_texts, is_cal, strict=True) if c]
    started = time.perf_counter()
    estimator.fit(task.train_texts, task.train_labels, validation=(cal_texts, task.cal_labels[is_cal]))
    seconds = time.perf_counter() - started
    log_proba = estimator.predict_log_proba(task.scored_texts)  # columns: labels 0..k-1, all trained on
    path = write_scores(out, ENCODER_PREFIX, task.name, task.scored_ids, log_proba)
    fields = {
        "stage": "reference",
        "encoder": task.name,
        "n_train": len(task.train_texts),
        "history": estimator.history_,
        "best_epoch": estimator.best_epoch_,
        "fit_seconds": round(seconds, 1),
    }
    if task.save:
        saved.invalidate()
        estimator.save(saved.directory)
        saved.write(key, fields, [WEIGHTS_FILE, ENCODER_FILE])
    manifest.write(key, fields, [path.name])
    return True
