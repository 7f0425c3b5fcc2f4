import pandas as pd
import torch

from natprints.artifacts import read_manifest
from natprints.conditions import GENERATED_COLUMNS as COLUMNS
from natprints.config import GenerateSettings
from natprints.generate.sampler import filter_logits
from natprints.generate.stage import generate_all
from tests.conftest import copy_stage
from tests.test_zoo import BASE


def test_generated_files_schema_and_pairing(smoke_cfg):
    out = smoke_cfg.paths.generated
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["base_model"] == BASE
    assert manifest["null_control"]["file"] == f"null/{BASE}.parquet"
    assert set(manifest["conditions"]) == {"seed", "init", "arch", "all"}
    frames = {m: pd.read_parquet(out / info["file"]) for m, info in manifest["models"].items()}
    for model_id, df in frames.items():
        assert list(df.columns) == COLUMNS and len(df) == 24
        assert (df["model_id"] == model_id).all() and df["sample_id"].is_unique
        assert (df["n_tokens"] == df["token_ids"].map(len)).all() and df["n_tokens"].max() <= 24
        assert (df["sampling_seed"] == 0).all()
    prompt_sets = {tuple(df["prompt_id"]) for df in frames.values()}
    assert len(prompt_sets) == 1  # every model continues every prompt
    null = pd.read_parquet(out / "null" / f"{BASE}.parquet")
    assert (null["sampling_seed"] == 1).all() and list(null["prompt_id"]) == list(frames[BASE]["prompt_id"])
    assert (null["text"] != frames[BASE]["text"]).mean() > 0.5
    assert not set(null["sample_id"]) & set(frames[BASE]["sample_id"])


def test_generation_resume_fills_only_missing_rows(smoke_cfg, smoke_home, fresh_home):
    want = pd.read_parquet(smoke_home / "data" / "generated" / "smoke" / f"{BASE}.parquet")
    copy_stage(smoke_home, fresh_home, "data", "corpus", "smoke")
    copy_stage(smoke_home, fresh_home, "models", "smoke", "zoo")
    path = fresh_home / "data" / "generated" / "smoke" / f"{BASE}.parquet"
    partial = generate_all(smoke_cfg, max_chunks=1)
    assert not partial["complete"] and len(pd.read_parquet(path)) == 16
    first = pd.read_parquet(path)
    generate_all(smoke_cfg)
    got = pd.read_parquet(path)
    assert len(got) == 24 and got["sample_id"].is_unique
    pd.testing.assert_frame_equal(got.iloc[:16], first)  # rows already written are kept as they were
    pd.testing.assert_frame_equal(got, want)  # and the resumed file equals an uninterrupted run
    mtime = path.stat().st_mtime_ns
    assert generate_all(smoke_cfg)["complete"] and path.stat().st_mtime_ns == mtime  # nothing to do


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True, True]]
    probs = torch.softmax(logits, -1)[0]
    kept = ~torch.isinf(filter_logits(logits, 0, float(probs[0] + probs[1] * 0.5)))
    assert kept.tolist() == [[True, True, False, False, False]]
    assert GenerateSettings().top_p == 1.0
