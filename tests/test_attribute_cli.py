"""`natprints attribute` and `natprints experiments`: outputs, options and every kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from typer.testing import CliRunner

from natprints.attribution import features
from natprints.attribution.attributor import PIPELINE_FILE, Attributor, save_attributor
from natprints.attribution.features import make_featurizer
from natprints.cli import app as APP

RUNNER = CliRunner()
GOOD = "we shall defend the union and the nation"


def invoke(*args: str, input: str | bytes | None = None):
    return RUNNER.invoke(APP, list(args), input=input)


def _fit(featurizer: str = "word1"):
    rng = np.random.default_rng(0)
    words = [["we", "shall", "union"], ["war", "peace", "congress"], ["tax", "money", "trade"]]
    texts, y = [], []
    for c, favourite in enumerate(words):
        for _ in range(20):
            pool = favourite * 3 + ["the", "and", "of", "nation"]
            texts.append(" ".join(rng.choice(pool, size=12)))
            y.append(c)
    pipe = Pipeline([("features", make_featurizer(featurizer)), ("classifier", LogisticRegression(max_iter=1000))])
    return pipe.fit(texts, np.array(y))


@pytest.fixture
def home(tmp_path, monkeypatch):
    """NATPRINTS_HOME with run `demo`: n-gram attributors for conditions `all` and `seed`."""
    monkeypatch.setenv("NATPRINTS_HOME", str(tmp_path))
    base = tmp_path / "models" / "demo" / "attributors"
    save_attributor(base / "all", Attributor(_fit(), ["base", "seed-1", "seed-2"]), {"condition": "all"})
    save_attributor(base / "seed", Attributor(_fit(), ["s0", "s1", "s2"]), {"condition": "seed"})
    return tmp_path


def test_attribute_files_text_and_json(home):
    f = home / "a.txt"
    f.write_text(GOOD)
    result = invoke("attribute", str(f), "--run", "demo", "--top", "2")
    assert result.exit_code == 0, result.output
    line = result.stdout.strip()
    assert line.startswith(f"{f}: base ")
    assert line.count(",") == 0 and "; then " in line  # --top 2: one alternative
    result = invoke("attribute", str(f), "--run", "demo", "--json", "--top", "3")
    data = json.loads(result.stdout)
    assert data["input"] == str(f) and data["label"] == "base" and len(data["top"]) == 3
    assert abs(sum(t["probability"] for t in data["top"]) - 1) < 1e-6
    # --condition picks another attributor of the run, --attributor a directory.
    result = invoke("attribute", str(f), "--run", "demo", "--condition", "seed", "--json")
    assert json.loads(result.stdout)["label"] == "s0"
    result = invoke("attribute", str(f), "--attributor", str(home / "models/demo/attributors/seed"), "--json")
    assert json.loads(result.stdout)["label"] == "s0"


def test_attribute_reads_stdin(home):
    result = invoke("attribute", "--run", "demo", "--json", input=GOOD)
    assert result.exit_code == 0
    assert json.loads(result.stdout)["input"] == "<stdin>"
    result = invoke("attribute", "-", "--run", "demo", input="   \n")
    assert result.exit_code == 1 and "error: <stdin>: empty text" in result.stderr


def test_every_bad_input_is_one_line_and_the_rest_still_classified(home):
    good = home / "good.txt"
    good.write_text(GOOD)
    (home / "empty.txt").write_text("")
    (home / "blank.txt").write_text("  \n\t \n")
    (home / "binary.bin").write_bytes(b"abc\x00\x01\x02 we shall")
    (home / "latin1.txt").write_bytes("café union".encode("latin-1"))
    (home / "big.txt").write_text("we shall " * 20)
    (home / "adir").mkdir()
    names = ["missing.txt", "adir", "empty.txt", "blank.txt", "binary.bin", "latin1.txt", "big.txt", "good.txt"]
    args = [str(home / n) for n in names]
    result = invoke("attribute", *args, "--run", "demo", "--max-bytes", "100")
    assert result.exit_code == 1
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 7 and all(e.startswith("error: ") for e in errors)
    for fragment in [
        "no such file",
        "is a directory",
        "empty text",
        "empty text",
        "binary data",
        "not UTF-8",
        "over the size limit (180 > 100 bytes)",
    ]:
        assert any(fragment in e for e in errors), fragment
    assert "Traceback" not in result.output
    assert result.stdout.strip() == f"{good}: base " + result.stdout.strip().split(": base ", 1)[1]
    # --json reports the failures in the stream too, in input order.
    result = invoke("attribute", *args, "--run", "demo", "--max-bytes", "100", "--json")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [("error" in d) for d in lines] == [True] * 7 + [False]


def test_size_limit_defaults_to_one_megabyte(home):
    big = home / "big.txt"
    big.write_bytes(b"we shall " * (1_000_001 // 9 + 1))
    result = invoke("attribute", str(big), "--run", "demo")
    assert result.exit_code == 1 and "over the size limit" in result.stderr and "> 1000000 bytes" in result.stderr


def test_missing_foreign_and_tampered_attributors(home):
    f = home / "a.txt"
    f.write_text(GOOD)
    result = invoke("attribute", str(f), "--run", "nope")
    assert result.exit_code == 1 and "no attributor" in result.stderr and "Traceback" not in result.output
    result = invoke("attribute", str(f), "--run", "demo", "--attributor", str(home))
    assert result.exit_code == 1 and "not both" in result.stderr
    result = invoke("attribute", str(f), "--attributor", str(home))
    assert result.exit_code == 1 and "no manifest.json" in result.stderr
    arrays = home / "models/demo/attributors/all" / PIPELINE_FILE
    arrays.write_bytes(arrays.read_bytes() + b"x")
    result = invoke("attribute", str(f), "--run", "demo")
    assert result.exit_code == 1 and "tampered" in result.stderr


def test_config_selects_run_and_size_limit(home):
    config = home / "demo.toml"
    config.write_text('[run]\nname = "demo"\n[attribution]\nmax_text_bytes = 20\n')
    f = home / "a.txt"
    f.write_text(GOOD)
    result = invoke("attribute", str(f), "--config", str(config))
    assert result.exit_code == 1 and "(40 > 20 bytes)" in result.stderr
    result = invoke("attribute", str(f), "--config", str(config), "--max-bytes", "1000")
    assert result.exit_code == 0 and ": base " in result.stdout
    result = invoke("attribute", str(f), "--config", str(config), "--run", "demo")
    assert result.exit_code == 1 and "not both" in result.stderr


def test_ngram_attributor_never_imports_torch(home):
    f = home / "a.txt"
    f.write_text(GOOD)
    script = textwrap.dedent(
        f"""
        import sys
        from natprints.cli import app
        try:
            app(["attribute", {str(f)!r}, "--run", "demo"], standalone_mode=False)
        finally:
            print("torch imported:", "torch" in sys.modules)
            print("sentence_transformers imported:", "sentence_transformers" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert ": base " in out
    assert "torch imported: False" in out and "sentence_transformers imported: False" in out


def test_embedding_attributor_loads_encoder_once_per_call(home, monkeypatch):
    loads = []

    class Encoder:
        def encode(self, texts, **_):
            return np.array([[len(t), t.count("a") + 1.0] for t in texts], dtype=np.float32)

    monkeypatch.setattr(features, "_load_encoder", lambda name, device: loads.append(name) or Encoder())
    directory = home / "embed-att"
    pipe = _fit("union")
    pipe.named_steps["features"].transformer_list[2][1]._encoder_model = None
    save_attributor(directory, Attributor(pipe, ["a", "b", "c"]), {})
    loads.clear()
    files = []
    for i in range(3):
        files.append(home / f"t{i}.txt")
        files[-1].write_text(GOOD + " a" * i)
    result = invoke("attribute", *map(str, files), "--attributor", str(directory))
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 3
    assert loads == ["all-MiniLM-L6-v2"]


def test_experiments_command(tmp_path, monkeypatch):
    from tests.test_attribution import make_run

    monkeypatch.setenv("NATPRINTS_HOME", str(tmp_path))
    config = make_run(tmp_path, ["word1"])
    text = config.read_text().replace('["logreg", "svm", "xgb", "mlp"]', '["logreg"]')
    config.write_text(text)
    result = invoke("experiments", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "all: word1+logreg accuracy" in result.stdout
    assert (tmp_path / "reports/synth/accuracy.csv").is_file()
    result = invoke("experiments", "--config", str(config))
    assert result.exit_code == 0 and "up to date" in result.stderr
    f = tmp_path / "a.txt"
    f.write_text("w001 w002 w003 w004")
    result = invoke("attribute", str(f), "--config", str(config), "--condition", "lr", "--json")
    assert json.loads(result.stdout)["label"] in {"base", "lr-0.002", "unknown"}
    result = invoke("experiments", "--config", str(tmp_path / "missing.toml"))
    assert result.exit_code == 1 and "config file not found" in result.stderr


def test_unknown_condition_lists_the_known_ones(home):
    f = home / "a.txt"
    f.write_text(GOOD)
    result = invoke("attribute", str(f), "--run", "demo", "--condition", "size")
    assert result.exit_code == 1
    assert "no attributor for condition 'size' (this run has: all, seed)" in result.stderr


def test_a_text_the_attributor_learned_on_gets_a_warning(tmp_path):
    """The saved attributor keeps digests of its training and calibration texts (verified with its
    manifest); `attribute` warns on stderr for such a text, per text and pooled, and for no other."""
    from natprints.attribution.attributor import SEEN_FILE, load_attributor, text_digest

    seen_text, cal_text = "we shall union we shall", "war peace congress war"
    attributor = Attributor(_fit(), ["a", "b", "c"])
    attributor.seen = {"train": frozenset({text_digest(seen_text)}), "cal": frozenset({text_digest(cal_text)})}
    directory = save_attributor(tmp_path / "att", attributor, {"condition": "x"})
    assert json.loads((directory / SEEN_FILE).read_text()) == {k: sorted(v) for k, v in attributor.seen.items()}
    assert load_attributor(directory).seen == attributor.seen
    files = []
    for name, text in (("trained.txt", seen_text + "\n"), ("cal.txt", cal_text), ("new.txt", GOOD)):
        (tmp_path / name).write_text(text)
        files.append(str(tmp_path / name))
    for extra in ((), ("--pool",)):
        result = invoke("attribute", *files, "--attributor", str(directory), *extra)
        assert result.exit_code == 0, result.output
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
        assert warnings == [
            f"warning: {files[0]}: this attributor was trained on this text (train split); "
            "its verdict is not a held-out estimate",
            f"warning: {files[1]}: this attributor was calibrated on this text (cal split); "
            "its verdict is not a held-out estimate",
        ]
    # an attributor saved without the digests (an older one) warns about nothing
    plain = save_attributor(tmp_path / "plain", Attributor(_fit(), ["a", "b", "c"]), {"condition": "x"})
    assert not (plain / SEEN_FILE).exists()
    assert "warning" not in invoke("attribute", *files, "--attributor", str(plain)).stderr


def test_sequential_with_an_attributor_names_the_model_its_probabilities_lead_to(home, tmp_path):
    """The attributor's calibrated log-probabilities add up text by text; the verdict comes once the
    leader is ahead by log((K - 1) / error); an attributor has no `unknown` here."""
    from natprints.attribution.attributor import load_attributor
    from natprints.attribution.sequential import decide

    texts = [" ".join(["we", "shall", "union", "the"] * 3)] * 6
    files = []
    for i, text in enumerate(texts):
        files.append(str(tmp_path / f"t{i}.txt"))
        (tmp_path / f"t{i}.txt").write_text(text)
    model = load_attributor(home / "models" / "demo" / "attributors" / "all")
    expected = decide(np.log(model.predict_proba(texts)), 0.001)
    result = invoke("attribute", *files, "--run", "demo", "--sequential", "--error", "0.001", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["label"] == "base" and record["texts"] == expected.texts and expected.label == 0
    result = invoke("attribute", *files[:1], "--run", "demo", "--sequential", "--error", "1e-300")
    assert result.stdout.startswith("sequential (1 text): undecided at error 1e-300 (the inputs ended first)")
    assert invoke("attribute", *files, "--run", "demo", "--sequential", "--error", "1").exit_code != 0
