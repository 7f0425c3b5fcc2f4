"""Evidence bundles: `natprints attribute --bundle` and `natprints verify`, for both methods.

A bundle round-trips to ``verified``; a text, a model's weights, an attributor's file or a recorded
score changed after the fact fails verification with one line naming it.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from natprints.artifacts import sha256_text
from natprints.attribution.attributor import Attributor, save_attributor
from tests.test_attribute_cli import GOOD, _fit
from tests.test_attribute_likelihood import invoke, zoo  # noqa: F401  (the module's tiny models)


def _flip(path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _by_likelihood(copied, *args):
    return invoke("attribute", "--method", "likelihood", "--models", copied / "a", "--models", copied / "b", *args)


@pytest.fixture
def copied(zoo, tmp_path):  # noqa: F811
    """Models a and b copied, so that a test may tamper with them."""
    for name in ("a", "b"):
        shutil.copytree(zoo.dirs[name], tmp_path / name)
    return tmp_path


def test_a_likelihood_bundle_records_every_score_and_verifies(zoo, copied, tmp_path):  # noqa: F811
    files = zoo.files("b", 3)
    out = tmp_path / "evidence.json"
    result = _by_likelihood(
        copied,
        "--bundle",
        out,
        "--json",
        *files,
    )
    assert result.exit_code == 0, result.output
    bundle = json.loads(out.read_text())
    assert bundle["method"] == "likelihood" and list(bundle["sources"]) == ["a", "b"]
    assert [e["sha256"] for e in bundle["inputs"]] == [sha256_text(f.read_text()[:-1]) for f in files]
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    for i, (scores, verdict) in enumerate(zip(bundle["texts"], bundle["verdicts"], strict=True)):
        assert verdict["input"] == i and verdict["label"] == printed[i]["label"]
        for m in ("a", "b"):  # the per-token log-probabilities add up to the log-likelihood printed
            assert np.isclose(sum(scores["token_logprobs"][m]), printed[i]["loglik"][m], atol=1e-9)
            assert len(scores["token_logprobs"][m]) == printed[i]["model_tokens"][m]
    assert bundle["provenance"]["machine"]["cpu_capability"]
    checked = invoke("verify", out)
    assert checked.exit_code == 0, checked.output
    assert checked.stdout.startswith("verified: 3 inputs and 2 models hash as recorded; every score and verdict")


def test_a_changed_text_model_or_score_fails_verification(zoo, copied, tmp_path):  # noqa: F811
    files = zoo.files("b", 2)
    out = tmp_path / "evidence.json"
    assert (
        _by_likelihood(
            copied,
            "--pool",
            "--bundle",
            out,
            *files,
        ).exit_code
        == 0
    )
    assert invoke("verify", out).exit_code == 0
    recorded = json.loads(out.read_text())
    recorded["texts"][1]["token_logprobs"]["b"][0] -= 0.01
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(recorded))
    result = invoke("verify", forged)
    assert result.exit_code == 1 and result.stderr.startswith("error: text token_logprobs b: ")
    assert "recorded" in result.stderr and result.stderr.count("\n") == 1
    original = files[0].read_text()
    files[0].write_text(original.replace("w", "W", 1))
    result = invoke("verify", out)
    assert result.exit_code == 1
    assert result.stderr == f"error: input {files[0]}: changed since the bundle was written (sha256 differs)\n"
    files[0].write_text(original)
    _flip(copied / "b" / "model.safetensors")
    result = invoke("verify", out)
    assert result.exit_code == 1
    assert (
        result.stderr.startswith("error: model b (") and "weights changed since the bundle was written" in result.stderr
    )


def test_an_attributor_bundle_verifies_and_a_changed_attributor_fails(tmp_path):
    directory = tmp_path / "attributor"
    pipeline = _fit()
    save_attributor(directory, Attributor(pipeline, ["m0", "m1", "m2"]), {})
    files = []
    for i, text in enumerate([GOOD, "war and peace in congress", "tax money trade"]):
        files.append(tmp_path / f"t{i}.txt")
        files[-1].write_text(text)
    out = tmp_path / "evidence.json"
    result = invoke("attribute", "--attributor", directory, "--bundle", out, *files)
    assert result.exit_code == 0, result.output
    bundle = json.loads(out.read_text())
    proba = pipeline.predict_proba([f.read_text() for f in files])
    assert np.allclose([t["proba"] for t in bundle["texts"]], proba, atol=1e-6)
    assert [v["input"] for v in bundle["verdicts"]] == [0, 1, 2]
    assert invoke("verify", out).stdout.startswith("verified: 3 inputs and 1 attributor hash as recorded")
    victim = next(p for p in sorted(directory.iterdir()) if p.name != "manifest.json" and p.is_file())
    _flip(victim)
    result = invoke("verify", out)
    assert result.exit_code == 1 and result.stderr.startswith("error: attributor ")
    assert "its files changed since the bundle was written" in result.stderr


def test_a_bundle_needs_files_and_a_verdict_set(tmp_path):
    out = tmp_path / "evidence.json"
    piped = invoke("attribute", "--bundle", out)
    assert piped.exit_code == 1
    assert "--bundle needs FILE arguments: standard input cannot be read again to verify" in piped.stderr
    streamed = invoke("attribute", "--sequential", "--bundle", out, out)
    assert streamed.exit_code == 1 and "--bundle records a verdict set: not with --sequential" in streamed.stderr
    assert not out.exists()
    out.write_text("{}")
    assert invoke("verify", out).stderr == f"error: {out}: not a natprints evidence bundle\n"
