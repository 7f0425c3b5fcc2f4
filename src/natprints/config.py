"""Typed run configuration, read from one TOML file (one file = one run, named by ``[run] name``).

Every key is validated: an unknown or mistyped key is an error naming the key and the file. The
module does no work at import time; paths are derived from the run name by :class:`RunPaths`.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from natprints.artifacts import atomic_write_json, canonical_json, hash_obj
from natprints.errors import NatprintsError

DEFAULT_CONFIG = Path("configs/default.toml")
HOME_VARIABLE = "NATPRINTS_HOME"  # where data/, models/ and reports/ live (default: the working directory)

# The one registry of what a config can name: conditions, featurizers, classifiers, in report order.
CONDITIONS = ("seed", "init", "data_order", "size", "lr", "batch_size", "arch", "tokenizer", "families")
# conditions whose models read text with tokenizers of their own: their texts are cut to the character
# budget and scored as strings (natprints.generate.declared, natprints.likelihood.declared)
STRING_CONDITIONS = ("tokenizer", "families")
# a zoo tokenizer other than the run's: byte-level BPE (the run's algorithm) or a unigram LM
# (SentencePiece's, with its word marks), at a vocabulary size
TokenizerName = Annotated[str, Field(pattern=r"^(bpe|unigram)-[0-9]+$")]
# Model families the zoo builds from config (transformers' classes, never downloaded), at matched
# parameter counts: llama (the base), gpt2 (learned positions, LayerNorm, GELU MLP), gptneox (Pythia's:
# parallel attention and MLP, partial rotary), qwen2 (Llama's shape with biased query/key/value).
ARCHS = ("llama", "gpt2", "gptneox", "qwen2")
Arch = Literal["llama", "gpt2", "gptneox", "qwen2"]
# a model family as real families differ: an architecture with a tokenizer of its own (``run``: the
# run's), e.g. ``gpt2/bpe-16384``
FamilyName = Annotated[str, Field(pattern=r"^(llama|gpt2|gptneox|qwen2)/(run|(bpe|unigram)-[0-9]+)$")]
# Settings added after configs were first hashed: left out of the hash while at these defaults, so a
# run (and its committed report) made before they existed keeps its config hash.
ADDED_SETTINGS = {
    ("train", "arch"): "llama",
    ("conditions", "arch"): [],
    ("attribution", "splits"): 5,
    ("conditions", "declared"): [],
    ("generate", "max_chars"): 0,
    ("conditions", "tokenizer"): [],
    (None, "models"): [],
    ("likelihood", "segmentation_beam"): 8,
    ("conditions", "families"): [],
    ("reference", "encoder_conditions"): [],
    ("reference", "encoder_epochs"): 3,
    ("reference", "encoder_patience"): 1,
    ("reference", "encoder_lr"): 3e-5,
    ("reference", "encoder_batch_size"): 16,
    ("reference", "encoder_max_length"): 128,
    ("reference", "repeat_splits"): True,
}
CONDITION_ORDER = (*CONDITIONS, "all")
NULL_CONDITION = "null_control"  # one model under two sampling seeds: must come out at chance
FEATURIZERS = ("word1", "word12", "char14", "tok13", "embed", "union")
CLASSIFIERS = ("logreg", "svm", "xgb", "mlp", "nb")
Featurizer = Literal["word1", "word12", "char14", "tok13", "embed", "union"]
Classifier = Literal["logreg", "svm", "xgb", "mlp", "nb"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # "40" or true for an int is an error


class RunSettings(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0)  # torch threads per process; 0 = leave torch's default
    # jobs (models trained, sampled, scored; conditions fitted) at once, each in its own process with
    # `threads` torch threads; "auto": as many as this machine's cores allow (a Ray instance's: its CPUs)
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    train_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    # where jobs run: worker processes of this machine, or Ray tasks (num_cpus = threads, one GPU on CUDA)
    executor: Literal["local", "ray"] = "local"
    # executor = "ray": "" starts a local Ray instance of workers x threads CPUs; "auto" joins the
    # cluster this machine belongs to, "ray://host:port" (Ray Client) or "host:port" (GCS) another
    ray_address: str = ""

    @field_validator("ray_address")
    @classmethod
    def _ray_address_form(cls, value: str) -> str:
        if value in ("", "auto") or re.fullmatch(r"(ray://)?[A-Za-z0-9_.-]+:[0-9]{1,5}", value):
            return value
        raise ValueError("must be '' (a local Ray instance), 'auto', 'ray://host:port' or 'host:port'")

    def worker_count(self) -> int:
        """``workers`` as a number: for ``auto``, the cores this process may use over ``threads`` (at
        least one). The count never changes a result (each job runs alone in its own process)."""
        if self.workers != "auto":
            return self.workers
        return max(1, len(os.sched_getaffinity(0)) // max(self.threads, 1)) if self.threads else 1

    @model_validator(mode="after")
    def _executor_options(self) -> RunSettings:
        if self.ray_address and self.executor != "ray":
            raise ValueError("ray_address is only used with executor = 'ray'")
        if self.executor == "ray" and self.threads == 0:
            # a task reserves num_cpus = threads, and torch's default thread count differs from node to node
            raise ValueError("executor = 'ray' needs threads >= 1 (each job is a Ray task with num_cpus = threads)")
        return self


class CorpusSettings(_Section):
    source: Literal["sotu", "kjv", "files", "hf"] = "sotu"
    paths: list[str] = []  # for source = "files": UTF-8 text files, paragraphs split on blank lines
    hf_dataset: str = ""  # for source = "hf": a dataset id, needs network access
    hf_split: str = "train"
    hf_text_field: str = "text"
    max_chars: int = Field(0, ge=0)  # 0 = the whole corpus
    min_paragraph_chars: int = Field(40, ge=1)
    heldout_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    split_salt: str = "natprints"

    @model_validator(mode="after")
    def _source_options(self) -> CorpusSettings:
        if self.source == "files" and not self.paths:
            raise ValueError("source = 'files' needs paths = [...]")
        if self.source == "hf" and not self.hf_dataset:
            raise ValueError("source = 'hf' needs hf_dataset = '<dataset id>'")
        return self


class TokenizerSettings(_Section):
    vocab_size: int = Field(4096, ge=300, le=262144)
    min_frequency: int = Field(2, ge=1)


class SizePreset(_Section):
    hidden_size: int = Field(ge=8)
    num_layers: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    intermediate_size: int = Field(ge=8)

    @model_validator(mode="after")
    def _heads_divide(self) -> SizePreset:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        return self


class TrainSettings(_Section):
    """The base model's spec; conditions vary one factor of it."""

    size: str = "s"
    arch: Arch = "llama"
    init_seed: int = Field(0, ge=0)
    data_seed: int = Field(0, ge=0)
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    batch_size: int = Field(32, ge=1)
    # tokens per training block; the zoo stage also checks it against the corpus's token counts
    seq_len: int = Field(128, ge=8, le=4096)
    steps: int = Field(1000, ge=1)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.1, ge=0, allow_inf_nan=False)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = Field(1.0, ge=0, allow_inf_nan=False)  # 0 = no clipping
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(8, ge=1)
    checkpoint_steps: list[int] = []  # intermediate checkpoints kept (fingerprint emergence)
    resume_every: int = Field(200, ge=1)  # how often resumable state is written


class ConditionSettings(_Section):
    """Groups of models that differ from the base in exactly one factor."""

    seed: list[int] = []  # init and data-order seed together
    init: list[int] = []
    data_order: list[int] = []
    size: list[str] = []
    lr: list[float] = []
    batch_size: list[int] = []
    arch: list[Arch] = []  # other model families on the identical token stream
    # other tokenizers, each trained on the run's training paragraphs; the model on the identical text
    # stream (its own tokens of it), with the base's seeds and settings
    tokenizer: list[TokenizerName] = []
    # other families: each differs from the base in architecture and tokenizer at once (``arch/tokenizer``),
    # trained on the identical text stream with the base's seeds and settings
    families: list[FamilyName] = []
    # factors of the declared models ([[models]]): per factor, each group of models that agree on every
    # other declared factor and differ in this one is a condition (see natprints.declared)
    declared: list[str] = []


class GenerateSettings(_Section):
    prompts: int = Field(1000, ge=1)
    prompt_tokens: int = Field(16, ge=1)
    new_tokens: int = Field(64, ge=1)
    samples_per_prompt: int = Field(1, ge=1)
    # continuations per training-split prompt (0 = samples_per_prompt): more texts to learn from, while
    # the test and calibration texts stay the ones samples_per_prompt gives
    train_samples_per_prompt: int = Field(0, ge=0)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)  # 0 = off
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, ge=0)
    null_seed: int = Field(1, ge=0)  # the null control: the base model again, another sampling seed
    batch_size: int = Field(128, ge=1)
    # a budget in characters, the same for every model: each continuation is cut at the last word
    # boundary within it (0 = off: continuations end after new_tokens tokens). Models with their own
    # tokenizers need it, or text length alone would tell them apart; new_tokens is then the cap.
    max_chars: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _distinct_seeds(self) -> GenerateSettings:
        if self.seed == self.null_seed:
            raise ValueError("null_seed must differ from seed")
        if 0 < self.train_samples_per_prompt < self.samples_per_prompt:
            raise ValueError("train_samples_per_prompt must be 0 or at least samples_per_prompt")
        return self

    @property
    def train_samples(self) -> int:
        """Continuations generated per training-split prompt."""
        return self.train_samples_per_prompt or self.samples_per_prompt


class AttributionSettings(_Section):
    featurizers: list[Featurizer] = list(FEATURIZERS)
    classifiers: list[Classifier] = list(CLASSIFIERS)
    test_fraction: float = Field(0.25, gt=0, lt=1)
    split_seed: int = Field(0, ge=0)
    # prompt splits the headline figures are repeated over (split_seed, split_seed + 1, ...): the best
    # pipeline (as chosen on the first) and the baseline refit on each, the ceiling on each test set
    splits: int = Field(5, ge=1, le=50)
    max_features: int = Field(50000, ge=10)
    evidence_tokens: list[Annotated[int, Field(ge=0)]] = [8, 16, 32, 64, 0]  # 0 = the whole continuation
    evidence_train_fractions: list[Annotated[float, Field(gt=0, le=1)]] = [0.1, 0.25, 0.5, 1.0]
    # accuracy against continuations per training prompt (each <= generate.train_samples_per_prompt),
    # for the best pipeline, the baseline and the reference LMs (fine-tuned once per value)
    evidence_train_samples: list[Annotated[int, Field(ge=1)]] = []
    # combined+product: the reference LMs' posterior times the best pipeline's calibrated posterior
    combine_reference: bool = False
    top_ngrams: int = Field(10, ge=1)
    embed_batch_size: int = Field(64, ge=1)
    open_set_reject_rate: float = Field(0.05, ge=0, lt=1)  # share of known texts rejected
    max_text_bytes: int = Field(1_000_000, ge=1)


class LikelihoodSettings(_Section):
    """Scoring texts under the models that may have written them: the exact ceiling of attribution."""

    batch_size: int = Field(64, ge=1)  # rows teacher-forced together
    # paths teacher-forced per round when a test text is scored as a string over its segmentations
    # (natprints.likelihood.segmentations); 0 scores only its canonical tokenization
    segmentation_beam: int = Field(8, ge=0)
    pool_sizes: list[Annotated[int, Field(ge=1)]] = [1, 2, 4, 8, 16, 32]  # texts of one source pooled into one verdict
    open_set_alpha: float = Field(0.05, gt=0, lt=1)  # false-rejection rate of "model M wrote this"
    open_set_resamples: int = Field(2000, ge=100)  # bootstrap pools drawn to calibrate each threshold


class ReferenceSettings(_Section):
    """The auditor's own reference LM and its per-candidate fine-tuned copies (black-box attribution)."""

    enabled: bool = True
    seed: int = Field(1000, ge=0)  # init and data-order seed of the reference LM: no zoo model's
    epochs: int = Field(4, ge=1)  # passes over a candidate's training-split texts
    lr: float = Field(1e-3, gt=0)  # constant fine-tuning learning rate
    # fine-tune the candidates' copies anew on each further prompt split of `[attribution] splits` too,
    # so the reference LMs' figure is repeated over splits as the headline figures are
    repeat_splits: bool = True
    # a classification head on the reference LM, fine-tuned end to end per condition (reflm+head)
    head: bool = False
    head_epochs: int = Field(3, ge=1)
    head_lr: float = Field(1e-4, gt=0)
    head_batch_size: int = Field(32, ge=1)
    # the frozen sentence encoder fine-tuned end to end as a classifier (minilm+ft), for these conditions
    # only (it costs about 0.1 s of CPU per training text and epoch), early-stopped on calibration log-loss
    encoder_conditions: list[str] = []
    encoder_epochs: int = Field(3, ge=1)
    encoder_patience: int = Field(1, ge=1)  # epochs without a lower calibration log-loss before stopping
    encoder_lr: float = Field(3e-5, gt=0)
    encoder_batch_size: int = Field(16, ge=1)
    encoder_max_length: int = Field(128, ge=8)  # encoder tokens of a continuation (longer ones are cut)


class EmergenceSettings(_Section):
    """The text fingerprint over training (`natprints emergence`): one condition's models at each saved step."""

    enabled: bool = False
    condition: Literal["seed", "init", "data_order", "size", "lr", "batch_size"] = "seed"
    steps: list[Annotated[int, Field(ge=0)]] = []  # empty: step 0, every checkpoint and the final step
    # black-box pipelines ("featurizer+classifier") fit anew at every step
    pipelines: list[str] = ["word1+logreg", "word12+logreg", "char14+svm", "tok13+svm"]

    @field_validator("pipelines")
    @classmethod
    def _known_pipelines(cls, value: list[str]) -> list[str]:
        for name in value:
            feat, _, clf = name.partition("+")
            if feat not in FEATURIZERS or clf not in CLASSIFIERS or (clf == "nb" and feat in ("embed", "union")):
                raise ValueError(
                    f"unknown pipeline {name!r}: featurizer+classifier with featurizer in {', '.join(FEATURIZERS)} "
                    f"and classifier in {', '.join(CLASSIFIERS)} (nb takes n-gram counts only)"
                )
        if not value:
            raise ValueError("needs at least one pipeline")
        return value


class LineageSettings(_Section):
    derive_conditions: list[str] = ["seed"]  # whose models get continued on the shift corpus
    derive_source: Literal["kjv", "sotu", "files", "hf"] = "kjv"
    derive_paths: list[str] = []
    derive_steps: int = Field(200, ge=1)
    derive_lr: float = Field(5e-4, gt=0)
    # SeedPrints reads N random-token inputs; N = 512 of length 128 gives the verdicts N = 2000 gives
    # at a quarter of the cost (see natprints.lineage.seedprints)
    seedprints_inputs: int = Field(512, ge=4)
    seedprints_seq_len: int = Field(128, ge=1)
    # disliked dimensions per model: a count, a fraction of the hidden size in (0, 1], or "all"
    seedprints_k: int | float | Literal["all"] = "all"
    seedprints_temperature: float = Field(10.0, gt=0)
    seedprints_seed: int = Field(0, ge=0)
    alpha: float = Field(0.01, gt=0, lt=1)  # SeedPrints: the p cut-off and the calibrated threshold's target FPR
    weights_threshold: float = Field(0.9, ge=-1, le=1)

    @field_validator("seedprints_k", mode="before")
    @classmethod
    def _k_form(cls, value: object) -> object:
        if value == "all" and isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        if isinstance(value, float) and 0.0 < value <= 1.0:
            return value
        raise ValueError("must be a count >= 1, a fraction of the hidden size in (0, 1], or 'all'")


FactorValue = Annotated[str, Field(min_length=1)] | int | float | bool


class DeclaredModel(_Section):
    """A model the run did not train: a local Hugging Face causal-LM directory (with its tokenizer) or
    a hub id (read from the local cache; downloaded only when ``HF_HUB_OFFLINE=0``), its label, and
    the factors it declares (free-form: family, size, seed, step, ...)."""

    label: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    path: str = ""  # relative paths are read from the natprints home (NATPRINTS_HOME, else the working directory)
    hub: str = ""
    revision: str = ""  # with hub: a branch, tag or commit (e.g. PolyPythias' "step143000")
    factors: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], FactorValue] = {}
    # its transformers config (model_type and the fields that differ from that type's defaults), read
    # where the model is not at hand: `natprints plan` builds it on the meta device to size the run
    architecture: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], FactorValue] = {}

    @model_validator(mode="after")
    def _one_source(self) -> DeclaredModel:
        if bool(self.path) == bool(self.hub):
            raise ValueError(f"model {self.label!r}: give exactly one of path (a local directory) or hub (a hub id)")
        if self.revision and not self.hub:
            raise ValueError(f"model {self.label!r}: revision is only read with hub")
        if self.architecture and not isinstance(self.architecture.get("model_type"), str):
            raise ValueError(f'model {self.label!r}: architecture needs its model_type (e.g. "gpt_neox")')
        return self


DEFAULT_SIZES = {
    "xs": SizePreset(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=176),
    "s": SizePreset(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=344),
    "m": SizePreset(hidden_size=192, num_layers=6, num_heads=6, intermediate_size=512),
}


class Config(_Section):
    run: RunSettings
    corpus: CorpusSettings = CorpusSettings()
    tokenizer: TokenizerSettings = TokenizerSettings()
    sizes: dict[str, SizePreset] = DEFAULT_SIZES
    train: TrainSettings = TrainSettings()
    conditions: ConditionSettings = ConditionSettings()
    generate: GenerateSettings = GenerateSettings()
    attribution: AttributionSettings = AttributionSettings()
    likelihood: LikelihoodSettings = LikelihoodSettings()
    reference: ReferenceSettings = ReferenceSettings()
    lineage: LineageSettings = LineageSettings()
    emergence: EmergenceSettings = EmergenceSettings()
    models: list[DeclaredModel] = []  # [[models]]: candidates the run did not train

    @field_validator("sizes", mode="before")
    @classmethod
    def _merge_sizes(cls, value: object) -> object:
        if isinstance(value, dict):
            return {**DEFAULT_SIZES, **value}
        return value

    @model_validator(mode="after")
    def _known_sizes(self) -> Config:
        for size in [self.train.size, *self.conditions.size]:
            if size not in self.sizes:
                raise ValueError(f"unknown size preset {size!r} (known: {', '.join(self.sizes)})")
        too_many = [n for n in self.attribution.evidence_train_samples if n > self.generate.train_samples]
        if too_many:
            raise ValueError(
                f"attribution.evidence_train_samples: {too_many} exceed the {self.generate.train_samples} "
                "continuations generated per training prompt (generate.train_samples_per_prompt)"
            )
        if self.emergence.enabled and not getattr(self.conditions, self.emergence.condition):
            raise ValueError(
                f"emergence.condition = {self.emergence.condition!r}: the config declares no such condition"
            )
        if "gpt2" in (self.train.arch, *self.conditions.arch, *(f.split("/")[0] for f in self.conditions.families)):
            # GPT-2 learns one embedding per position of its training blocks and has no others
            longest = {
                "generate.prompt_tokens + generate.new_tokens": self.generate.prompt_tokens + self.generate.new_tokens,
                "lineage.seedprints_seq_len": self.lineage.seedprints_seq_len,
            }
            for name, length in longest.items():
                if length > self.train.seq_len:
                    raise ValueError(
                        f"{name} = {length} exceeds train.seq_len = {self.train.seq_len}, "
                        "the positions a gpt2 model has"
                    )
        unknown = set(self.lineage.derive_conditions) - set(ConditionSettings.model_fields)
        if unknown:
            raise ValueError(f"lineage.derive_conditions: unknown condition(s) {sorted(unknown)}")
        self._check_declared()
        self._check_tokenizers()
        return self

    def _check_tokenizers(self) -> None:
        c = self.conditions
        for condition, names in (("tokenizer", c.tokenizer), ("families", c.families)):
            if not names:
                continue
            if not self.generate.max_chars:
                raise ValueError(
                    f"conditions.{condition}: models with their own tokenizers need generate.max_chars (a budget "
                    "in characters), so that length carries no label"
                )
            for name in names:
                tokenizer = name.split("/")[-1]
                if tokenizer != "run" and not 300 <= int(tokenizer.split("-")[1]) <= 262144:
                    raise ValueError(f"conditions.{condition}: {name!r}: the vocabulary size must be in [300, 262144]")
            if condition in self.lineage.derive_conditions:
                raise ValueError("lineage.derive_conditions: the shift corpus is tokenized by the run's tokenizer only")
        base = f"{self.train.arch}/run"
        if base in c.families:
            raise ValueError(f"conditions.families: {base!r} is the base model (the condition holds it already)")
        twice = sorted({f for f in c.families if c.families.count(f) > 1})
        if twice:
            raise ValueError(f"conditions.families: {twice} listed more than once")

    def _check_declared(self) -> None:
        labels = [m.label for m in self.models]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ValueError(f"models: label(s) {twice} declared more than once")
        if self.models and not self.generate.max_chars:
            raise ValueError(
                "models: declared models read text with their own tokenizers; set generate.max_chars "
                "(a budget in characters) so that length carries no label"
            )
        if self.conditions.declared and not self.models:
            raise ValueError("conditions.declared needs declared models ([[models]])")
        factors = {f for m in self.models for f in m.factors}
        unknown = sorted(set(self.conditions.declared) - factors)
        if unknown:
            raise ValueError(f"conditions.declared: no declared model has factor(s) {unknown}")

    def hash(self) -> str:
        return hash_obj(self.keyed_dump())

    def keyed_dump(self) -> dict:
        """The settings as hashes and stage keys read them: without the :data:`ADDED_SETTINGS` at their
        defaults, so that adding a setting changes no key of a run made before it."""
        dump = self.model_dump(mode="json")
        for (section, key), default in ADDED_SETTINGS.items():
            where = dump if section is None else dump[section]
            if where.get(key) == default:
                del where[key]
        return dump

    @property
    def paths(self) -> RunPaths:
        return RunPaths(home(), self.run.name)


def home() -> Path:
    """The directory holding data/, models/ and reports/: ``NATPRINTS_HOME``, else the working one."""
    root = Path(os.environ.get(HOME_VARIABLE, "."))
    if root.exists() and not root.is_dir():
        raise NatprintsError(f"{HOME_VARIABLE}={root} is not a directory")
    return root


@contextmanager
def use_home(root: Path | str) -> Iterator[None]:
    """``NATPRINTS_HOME=root`` for the duration (for tools that read another project's runs)."""
    old = os.environ.get(HOME_VARIABLE)
    os.environ[HOME_VARIABLE] = str(root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(HOME_VARIABLE, None)
        else:
            os.environ[HOME_VARIABLE] = old


def offline_environment() -> None:
    """No hub access at run time, and no tokenizer threads beside the stages' own workers."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class RunPaths:
    """Where a run's artifacts live under ``root``."""

    root: Path
    run: str

    @property
    def corpus(self) -> Path:
        return self.root / "data" / "corpus" / self.run

    @property
    def tokenizer(self) -> Path:
        return self.corpus / "tokenizer"

    @property
    def shift_corpus(self) -> Path:
        return self.root / "data" / "corpus" / f"{self.run}-shift"

    @property
    def generated(self) -> Path:
        return self.root / "data" / "generated" / self.run

    @property
    def likelihood(self) -> Path:
        return self.root / "data" / "likelihood" / self.run

    @property
    def reference_scores(self) -> Path:
        return self.root / "data" / "reference" / self.run

    @property
    def emergence(self) -> Path:
        return self.root / "data" / "emergence" / self.run

    def folders(self, reports: bool = False) -> list[Path]:
        """The folders that hold this run's own artifacts (what `natprints clean` removes); the shared
        feature cache is not one of them."""
        owned = [self.corpus, self.shift_corpus, self.generated, self.likelihood, self.reference_scores]
        return owned + [self.emergence, self.models] + ([self.reports] if reports else [])

    @property
    def cache(self) -> Path:
        return self.root / "data" / "cache"

    @property
    def models(self) -> Path:
        return self.root / "models" / self.run

    @property
    def zoo(self) -> Path:
        return self.models / "zoo"

    @property
    def attributors(self) -> Path:
        return self.models / "attributors"

    @property
    def reports(self) -> Path:
        return self.root / "reports" / self.run

    @property
    def run_lock(self) -> Path:
        return self.models / "run.json"


def _format_error(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key '{loc}'"
    if err["type"] == "missing":
        return f"missing key '{loc}'"
    msg = err["msg"].removeprefix("Value error, ")
    return f"'{loc}': {msg}" if loc else msg


def load_config(path: Path | str) -> Config:
    """Read and validate a TOML config; any problem is one :class:`NatprintsError` line."""
    path = Path(path)
    if not path.is_file():
        raise NatprintsError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise NatprintsError(f"{path}: not a UTF-8 text file") from None
    except tomllib.TOMLDecodeError as exc:
        raise NatprintsError(f"{path}: invalid TOML: {exc}") from None
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise NatprintsError(f"{path}: {_format_error(first)}{more}") from None


# Keys a run may change without changing any result, so the run lock ignores them. `run.workers` only
# says how many jobs run at once: each job runs in its own process with the same torch threads, and
# the work is cut into the same chunks whatever the count (natprints.runtime.run_jobs). `run.executor`
# and `run.ray_address` only say where those processes run (a test checks that the local and the Ray
# executor write byte-identical artifacts). `run.threads` is not here: torch's CPU reductions and
# matrix products split their work by thread count, so floating point, and with it weights and texts,
# can differ from one thread count to another.
RESULT_NEUTRAL_KEYS = frozenset({"run.workers", "run.executor", "run.ray_address"})


def _diff_keys(old: object, new: object, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, less :data:`RESULT_NEUTRAL_KEYS`. A key the recorded config
    lacks is a setting added to natprints after the run was made; it holds its default and does not
    count as a change."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            if key in old and f"{prefix}{key}" not in RESULT_NEUTRAL_KEYS:
                out += _diff_keys(old[key], new.get(key), f"{prefix}{key}.")
        return out
    return [] if canonical_json(old) == canonical_json(new) else [prefix.rstrip(".")]


def check_run_lock(cfg: Config, config_path: Path | str) -> None:
    """Refuse a run name reused with a changed config (other than :data:`RESULT_NEUTRAL_KEYS`); record
    the config on first use."""
    lock = cfg.paths.run_lock
    current = cfg.model_dump(mode="json")
    if lock.is_file():
        try:
            recorded = json.loads(lock.read_text(encoding="utf-8"))["config"]
        except (OSError, ValueError, KeyError):
            raise NatprintsError(f"{lock} is unreadable; remove it or `make clean`") from None
        changed = _diff_keys(recorded, current)
        if changed:
            keys = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
            raise NatprintsError(
                f"run '{cfg.run.name}' already exists with a different config (changed: {keys}); "
                f"give {config_path} a new [run] name, or remove the old run with "
                f"`natprints clean --config {config_path}`"
            )
        return
    atomic_write_json(lock, {"config": current, "config_hash": cfg.hash(), "source": str(config_path)})
