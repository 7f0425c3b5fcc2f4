"""Shared fixtures: the smoke pipeline, run once per test session through the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"


def run_cli(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run `natprints ARGS` with NATPRINTS_HOME=home, as a user would."""
    env = {**os.environ, "NATPRINTS_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", "from natprints.cli import main; main()", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"natprints {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


SMOKE_STAGES = (
    ("data",),
    ("zoo",),
    ("generate",),
    ("derive",),
    ("lineage", "run"),
    ("likelihood",),
    ("reference",),
    ("experiments",),
    ("emergence",),
    ("report",),
)


# Fixtures that run (part of) the smoke pipeline: a test that uses one is `slow`, so that
# `pytest -m "not slow"` is the quick inner loop.
SLOW_FIXTURES = frozenset({"smoke_home", "smoke_cfg", "smoke_data_home"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tests run tiny models, fastest on one thread; on a shared CPU more threads only contend."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# `make test` builds the smoke run once and names it here, for the pytest processes that share it
SHARED_SMOKE = "NATPRINTS_TEST_SMOKE"
BUILT = ".smoke-built"


def build_smoke(home: Path) -> Path:
    """Run every stage of the smoke config under ``home`` through the CLI, then mark it built."""
    home.mkdir(parents=True, exist_ok=True)
    for stage in SMOKE_STAGES:
        run_cli(*stage, "--config", str(SMOKE), home=home)
    (home / BUILT).touch()
    return home


@pytest.fixture(scope="session")
def smoke_home(tmp_path_factory) -> Path:
    """A directory holding the complete smoke run: every stage, through the CLI. Built for the session,
    or the one ``$NATPRINTS_TEST_SMOKE`` names (built by ``tests/run_all.sh`` before the tests that
    read it; they only read it, so several processes can)."""
    shared = os.environ.get(SHARED_SMOKE)
    if shared:
        if not (Path(shared) / BUILT).is_file():
            raise RuntimeError(f"${SHARED_SMOKE}={shared} holds no finished smoke run")
        return Path(shared)
    return build_smoke(tmp_path_factory.mktemp("smoke"))


@pytest.fixture(scope="session")
def smoke_data_home(tmp_path_factory) -> Path:
    """A directory holding only the smoke run's `data` stage (for tests that need no trained model)."""
    home = tmp_path_factory.mktemp("smoke-data")
    run_cli("data", "--config", str(SMOKE), home=home)
    return home


@pytest.fixture(scope="session")
def smoke_cfg(smoke_home):
    """The smoke config, with NATPRINTS_HOME pointing at the smoke run for the session."""
    from natprints.config import load_config

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NATPRINTS_HOME", str(smoke_home))
        yield load_config(SMOKE)


@pytest.fixture
def fresh_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NATPRINTS_HOME", str(tmp_path))
    return tmp_path


def copy_stage(src_home: Path, dst_home: Path, *parts: str) -> None:
    shutil.copytree(src_home.joinpath(*parts), dst_home.joinpath(*parts))


def trained_tokenizer(kind: str, texts: list[str], vocab: int):
    """A tokenizer of another algorithm than the run's, trained on ``texts``, as a model directory holds
    it: a byte-level BPE (GPT-2's kind) or, for ``unigram``, a unigram LM with SentencePiece's word marks."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "bytebpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
        tok.train_from_iterator(texts, trainer)
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
        )
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
