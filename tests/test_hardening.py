"""Cases from a hostile-user review: FIFOs, binary detection, control characters in file names,
symlink loops, refusal messages, file modes under a umask, result-neutral config keys, and the
weight-std fingerprint on shallow or non-finite models."""

from __future__ import annotations

import json
import os
import signal
import stat
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from natprints import artifacts
from natprints.attribution.attributor import Attributor, decode_text, read_text_file, save_attributor
from natprints.cli import app as APP
from natprints.config import check_run_lock, load_config
from natprints.errors import NatprintsError
from natprints.lineage import experiments as lineage
from natprints.lineage import weightstd as ws
from natprints.modeldir import inspect_model
from tests.conftest import SMOKE, run_cli
from tests.test_attribute_cli import GOOD, _fit

RUNNER = CliRunner()


@contextmanager
def deadline(seconds: float):
    """Raise TimeoutError if the body blocks longer than ``seconds`` (interrupts a blocking open())."""

    def expired(signum, frame):
        raise TimeoutError(f"blocked for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def attributor_dir(tmp_path) -> Path:
    return save_attributor(tmp_path / "attributor", Attributor(_fit(), ["base", "seed-1", "seed-2"]), {})


# --- 1. a FIFO without a writer -------------------------------------------------------------------


def test_fifo_is_refused_at_once(tmp_path, attributor_dir):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with deadline(5), pytest.raises(NatprintsError, match=r"pipe: not a regular file \(a FIFO\)$"):
        read_text_file(fifo)
    good = tmp_path / "good.txt"
    good.write_text(GOOD)
    with deadline(10):  # the CLI refuses it and still classifies the other input
        result = RUNNER.invoke(APP, ["attribute", str(fifo), str(good), "--attributor", str(attributor_dir)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {fifo}: not a regular file (a FIFO)"
    assert result.stdout.startswith(f"{good}: ") and len(result.stdout.splitlines()) == 1


def test_device_is_refused(tmp_path):
    with deadline(5), pytest.raises(NatprintsError, match=r"not a regular file \(a device\)"):
        read_text_file("/dev/null")


# --- 2. binary is a share of control characters, not one NUL ---------------------------------------


def test_one_nul_among_words_is_text():
    data = b"we shall defend the union\x00 and the nation"
    assert decode_text(data, "x") == data.decode()


def test_binary_and_non_utf8_are_refused():
    random_bytes = np.random.default_rng(0).integers(0, 256, size=4096, dtype=np.uint8).tobytes()
    with pytest.raises(NatprintsError, match="x: binary data, not text"):
        decode_text(random_bytes, "x")
    mostly_control = ("ab" + "\x01\x02\x03" * 10 + "cd").encode()  # valid UTF-8, 30 of 34 are controls
    with pytest.raises(NatprintsError, match=r"binary data, not text \(30 of 34 characters"):
        decode_text(mostly_control, "x")
    with pytest.raises(NatprintsError, match="x: not UTF-8 text"):
        decode_text("café, déjà vu".encode("latin-1"), "x")
    # tabs, newlines and carriage returns are text; an empty or blank text keeps its own message
    assert decode_text(b"a\tb\r\nc\n" * 20, "x")
    for blank in (b"", b" \n\t\r\n"):
        with pytest.raises(NatprintsError, match="x: empty text"):
            decode_text(blank, "x")


# --- 3. a newline in a file name cannot forge a result line -----------------------------------------


def test_control_characters_in_names_are_escaped(tmp_path, attributor_dir):
    forged = tmp_path / "a\nb: fake 1.000"
    forged.write_text(GOOD)
    missing = tmp_path / "gone\n: base 1.000"
    args = ["attribute", str(forged), str(missing), "--attributor", str(attributor_dir)]
    result = RUNNER.invoke(APP, args)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tmp_path}/a\\nb: fake 1.000: base ")
    assert result.stderr.splitlines() == [f"error: {tmp_path}/gone\\n: base 1.000: no such file"]
    data = json.loads(RUNNER.invoke(APP, [*args[:2], *args[3:], "--json"]).stdout)  # JSON keeps the name
    assert data["input"] == str(forged)


# --- 4. a symlink loop is not "no such file" ---------------------------------------------------------


def test_symlink_loop(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(NatprintsError, match=r"a: too many levels of symbolic links \(a symlink loop\)$"):
        read_text_file(tmp_path / "a")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(NatprintsError, match="dangling: no such file"):
        read_text_file(tmp_path / "dangling")


# --- 5. refusals do not repeat torch's advice to unpickle ------------------------------------------


class Payload:
    """An object a weights-only torch.load refuses (a pickled class)."""


def test_pickled_checkpoint_refusal_gives_no_unsafe_advice(tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    state = {f"model.layers.{i}.self_attn.{p}.weight": torch.ones(2, 2) for i in range(3) for p in ws.PROJECTIONS}
    torch.save(state | {"extra": Payload()}, path / "pytorch_model.bin")
    (path / "config.json").write_text(
        json.dumps({"model_type": "llama", "hidden_size": 2, "num_hidden_layers": 3, "vocab_size": 10})
    )
    with pytest.raises(NatprintsError) as caught:
        ws.weight_profile(path)
    message = str(caught.value)
    assert "holds pickled objects, which natprints does not load" in message and "\n" not in message
    assert "weights_only" not in message and "arbitrary code" not in message


# --- 6. artifacts get the mode the umask gives ---------------------------------------------------------


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_artifact_modes_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    artifacts._new_file_mode.cache_clear()
    try:
        artifacts.atomic_write_json(tmp_path / "a.json", {"x": 1})
        temp = artifacts.temp_path_for(tmp_path / "b.parquet")
    finally:
        os.umask(old)
        artifacts._new_file_mode.cache_clear()
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == mode
    assert stat.S_IMODE(temp.stat().st_mode) == mode


# --- 7. result-neutral keys do not lock the run ------------------------------------------------------


def test_run_lock_ignores_workers_only(tmp_path, monkeypatch):
    monkeypatch.setenv("NATPRINTS_HOME", str(tmp_path))

    def config(extra: str = ""):
        path = tmp_path / "run.toml"
        path.write_text(f"[run]\nname = 't'\n{extra}")
        return load_config(path), path

    check_run_lock(*config("workers = 1\n"))  # records the run
    check_run_lock(*config("workers = 4\n"))  # how many jobs at once: no result changes
    for changed, key in [("threads = 2\n", "run.threads"), ("[train]\nsteps = 7\n", "train.steps")]:
        with pytest.raises(NatprintsError, match=rf"different config \(changed: {key}\)"):
            check_run_lock(*config(changed))


# --- 8. weight-std: too few layers is incomparable, non-finite weights an error ---------------------


def _llama(path: Path, layers: int, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_two_layers_are_incomparable(tmp_path):
    a, b = _llama(tmp_path / "a", 2, seed=0), _llama(tmp_path / "b", 2, seed=1)
    with pytest.raises(NatprintsError, match=r"cannot compare .*: 2 layer\(s\), fewer than 3"):
        ws.weights_compare(a, b)
    result = ws.compare_profiles(ws.weight_profile(a), ws.weight_profile(b))
    assert result.verdict == "incomparable" and not result.related and "fewer than 3" in result.reason
    assert result.to_dict()["score"] is None and set(result.per_matrix.values()) == {None}
    # `natprints lineage A B`: weight-std says why it cannot compare; asked for by name, it is an error
    settings = lineage.LineageSettings(seedprints_inputs=8, seedprints_seq_len=8)
    out = lineage.compare(a, b, "all", settings, device="cpu")
    assert out["weights"]["verdict"] == "incomparable" and "fewer than 3" in out["weights"]["reason"]
    with pytest.raises(NatprintsError, match="fewer than 3"):
        lineage.compare(a, b, "weights", settings, device="cpu")
    three = _llama(tmp_path / "c", 3)
    assert ws.weights_compare(three, three).verdict == "related"


def test_non_finite_weights_are_an_error(tmp_path):
    path = _llama(tmp_path / "nan", 3)
    model = LlamaForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    model.save_pretrained(path)
    assert inspect_model(path).num_layers == 3
    with pytest.raises(NatprintsError, match=r"layers\.1\.self_attn\.k_proj\.weight holds non-finite values"):
        ws.weight_profile(path)
    with pytest.raises(NatprintsError, match="non-finite"):
        ws.weights_compare(path, _llama(tmp_path / "ok", 3))


# --- 9. numeric keys: bounded, finite, strictly typed ---------------------------------------------


@pytest.mark.parametrize(
    ("section", "line", "message"),
    [
        ("train", "seq_len = 100000", "'train.seq_len': Input should be less than or equal to 4096"),
        ("train", "seq_len = 200000", "'train.seq_len': Input should be less than or equal to 4096"),
        ("train", "lr = inf", "'train.lr': Input should be a finite number"),
        ("train", "lr = nan", "'train.lr': Input should be a finite number"),
        ("train", "lr = 0.0", "'train.lr': Input should be greater than 0"),
        ("train", "grad_clip = inf", "'train.grad_clip': Input should be a finite number"),
        ("train", 'steps = "40"', "'train.steps': Input should be a valid integer"),
        ("train", "steps = true", "'train.steps': Input should be a valid integer"),
        (
            "attribution",
            "evidence_tokens = [8, -1]",
            "'attribution.evidence_tokens.1': Input should be greater than or",
        ),
        (
            "attribution",
            "evidence_train_fractions = [0.0]",
            "'attribution.evidence_train_fractions.0': Input should be gr",
        ),
        (
            "attribution",
            "evidence_train_fractions = [1.5]",
            "'attribution.evidence_train_fractions.0': Input should be le",
        ),
    ],
)
def test_numeric_keys_are_checked_at_once(tmp_path, section, line, message):
    import time

    path = tmp_path / "bad.toml"
    path.write_text(f"[run]\nname = 'x'\n[{section}]\n{line}\n")
    start = time.perf_counter()
    with pytest.raises(NatprintsError) as caught:
        load_config(path)
    assert time.perf_counter() - start < 1.0
    assert str(caught.value).startswith(f"{path}: {message}") and "\n" not in str(caught.value)


# --- 10. small evidence splits: left out, and said so, where a classifier cannot fit ----------------


@pytest.mark.parametrize("clf", ["logreg", "svm", "xgb", "mlp", "nb"])
def test_small_split_rule_matches_what_scikit_learn_can_fit(clf):
    """``too_few`` accepts a training set exactly when the classifier can be fit on it."""
    import warnings

    import pandas as pd

    from natprints.attribution.estimators import make_classifier
    from natprints.attribution.evidence import too_few

    rng = np.random.default_rng(0)
    for k in (2, 3, 4):
        for per_model in range(1, 7):
            y = np.repeat(np.arange(k), per_model)
            reason = too_few(clf, pd.Series(y), k)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    make_classifier(clf).fit(rng.random((len(y), 30)), y)
                fits = True
            except ValueError:
                fits = False
            assert (reason is None) == fits, (clf, k, per_model, reason)
    assert too_few(clf, pd.Series([0, 0, 1]), 3) == "no training text for some model"


def test_tiny_training_fraction_is_left_out_not_a_crash(smoke_home, tmp_path, monkeypatch, capfd):
    import shutil

    from natprints.attribution.experiments import run_experiments
    from natprints.records import load_records
    from tests.conftest import SMOKE

    for part in ("data", "models"):
        shutil.copytree(smoke_home / part, tmp_path / part)
    monkeypatch.setenv("NATPRINTS_HOME", str(tmp_path))
    cfg = load_config(SMOKE)
    settings = {"featurizers": ["word1"], "classifiers": ["mlp"], "evidence_train_fractions": [0.05, 1.0]}
    cfg = cfg.model_copy(update={"attribution": cfg.attribution.model_copy(update=settings)})
    run_experiments(cfg, progress=False)
    err = capfd.readouterr().err
    assert "all: evidence point train_fraction = 0.05 of word1+mlp left out: 6 training texts, " in err
    points = [
        r for r in load_records(cfg.paths.reports) if r.get("axis") == "train_fraction" and r["condition"] == "all"
    ]
    assert {(r["classifier"], r["value"]) for r in points} == {("mlp", 1.0), ("logreg", 0.05), ("logreg", 1.0)}


# --- 11. lineage: derived models missing; a method that cannot read a model -------------------------


def test_lineage_run_before_derive_says_so(smoke_home, tmp_path, monkeypatch, capfd):
    import shutil

    from tests.conftest import SMOKE

    for part in ("data", "models"):
        shutil.copytree(smoke_home / part, tmp_path / part)
    for derived in (tmp_path / "models" / "smoke" / "zoo").glob("*+kjv"):
        shutil.rmtree(derived)
    monkeypatch.setenv("NATPRINTS_HOME", str(tmp_path))
    summary = lineage.run_lineage(load_config(SMOKE))
    expected = ["xs-lr3e-3-bs8-init0-data0+kjv", "xs-lr3e-3-bs8-init1-data1+kjv", "xs-lr3e-3-bs8-init2-data2+kjv"]
    assert summary["missing_derived"] == expected
    assert (
        f"warning: 3 derived model(s) missing ({', '.join(expected)}); lineage results leave them out: "
        "run `natprints derive` first to include them" in capfd.readouterr().err
    )
    assert not [e for e in summary["entries"] if e["kind"] == "derived"]


def _bloom(path: Path, seed: int) -> Path:
    """A family whose fused attention weights the weight-std fingerprint does not split."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    BloomForCausalLM(BloomConfig(vocab_size=50, hidden_size=32, n_layer=3, n_head=4)).save_pretrained(path)
    return path


def test_a_method_that_cannot_read_a_model_is_incomparable(tmp_path):
    a, b = _bloom(tmp_path / "a", 0), _bloom(tmp_path / "b", 1)
    settings = lineage.LineageSettings(seedprints_inputs=16, seedprints_seq_len=16)
    out = lineage.compare(a, b, "all", settings, device="cpu")
    assert (
        out["weights"]["verdict"] == "incomparable" and "no q_proj, k_proj, v_proj, o_proj" in out["weights"]["reason"]
    )
    assert out["seedprints"]["verdict"] in ("related", "unrelated", "uncalibrated")
    assert out["seedprints"]["n_inputs"] == 16
    with pytest.raises(NatprintsError, match="no q_proj"):
        lineage.compare(a, b, "weights", settings, device="cpu")
    result = RUNNER.invoke(APP, ["lineage", str(a), str(b), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"]["weights"]["verdict"] == "incomparable"


def test_non_finite_weights_get_an_error_not_a_verdict(tmp_path):
    path = _llama(tmp_path / "nan", 3)
    model = LlamaForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.fill_(float("inf"))
    model.save_pretrained(path)
    settings = lineage.LineageSettings(seedprints_inputs=8, seedprints_seq_len=8)
    for method in ("all", "seedprints", "weights"):
        with pytest.raises(NatprintsError, match="non-finite"):
            lineage.compare(path, _llama(tmp_path / "ok", 3), method, settings, device="cpu")


def test_clean_needs_a_run_and_a_yes(tmp_path):
    proc = run_cli("clean", home=tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "error: name the run to remove: natprints clean --config FILE (nothing is removed by default)"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NATPRINTS_HOME", str(tmp_path))
        paths = load_config(SMOKE).paths
    for folder in (paths.models, paths.likelihood, paths.reference_scores, paths.generated, paths.reports):
        folder.mkdir(parents=True)
    proc = run_cli("clean", "--config", str(SMOKE), home=tmp_path, check=False)  # stdin is no terminal
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: would remove 4 folder(s) of run 'smoke'; confirm with --yes"
    assert paths.models.is_dir() and paths.likelihood.is_dir()
    proc = run_cli("clean", "--config", str(SMOKE), "--yes", home=tmp_path)
    assert not paths.models.exists() and not paths.likelihood.exists() and not paths.reference_scores.exists()
    assert paths.reports.is_dir()  # reports stay unless --reports
    assert f"removed {paths.likelihood}" in proc.stdout


@pytest.mark.parametrize("command", [("data",), ("zoo",), ("experiments",), ("report",), ("clean", "--yes")])
def test_a_home_that_is_a_file_is_one_line(tmp_path, command):
    home = tmp_path / "home"
    home.write_text("not a folder")
    proc = run_cli(*command, "--config", str(SMOKE), home=home, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: NATPRINTS_HOME={home} is not a directory"


def _full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_a_full_disk_keeps_the_old_file_and_says_what_was_needed(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    artifacts.atomic_write_json(path, {"kept": True})
    monkeypatch.setattr(artifacts.os, "fsync", _full_disk)
    with pytest.raises(NatprintsError) as info:
        artifacts.atomic_write_bytes(path, b"x" * 3_000_000)
    message = str(info.value)
    assert message.startswith(f"no space left to write {path} (3.0 MB needed, ") and "MB free there" in message
    assert "\n" not in message
    assert json.loads(path.read_text()) == {"kept": True}  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary file left


def test_a_full_disk_under_any_writer_is_one_line_from_every_command(tmp_path, monkeypatch):
    import natprints.corpus

    def build_corpus(cfg):
        raise OSError(28, "No space left on device", str(tmp_path / "data" / "corpus" / "train.bin"))

    monkeypatch.setattr(natprints.corpus, "build_corpus", build_corpus)
    monkeypatch.setenv("NATPRINTS_HOME", str(tmp_path))
    result = CliRunner().invoke(APP, ["data", "--config", str(SMOKE)])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: no space left to write {tmp_path / 'data' / 'corpus' / 'train.bin'} (")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
