"""The README's command table is `make help`, and the commands it names exist."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_shows_make_help_verbatim():
    help_text = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    readme = (ROOT / "README.md").read_text()
    assert help_text.strip() in readme
    assert "make all" in readme and "make test" in readme


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


# Reports made before stages recorded their config hash and code revision: the commit that holds them.
# They are regenerated (`make texts`, `make long`) once the open work has changed what they report.
UNRECORDED_REPORTS = {"texts": "306423b", "long": "1c73930"}


def test_committed_reports_come_from_the_committed_configs():
    """Each committed reports/<run>/ was made under the hash of configs/<run>.toml as it stands now, by
    every stage it timed, from a clean tree; one made before that was recorded says which commit holds it."""
    import json

    from natprints.config import load_config

    runs = [d.name for d in sorted((ROOT / "reports").iterdir()) if (ROOT / "configs" / f"{d.name}.toml").is_file()]
    assert "default" in runs and "default" not in UNRECORDED_REPORTS
    for run in runs:
        timings = json.loads((ROOT / "reports" / run / "timings.json").read_text())
        index = (ROOT / "reports" / run / "index.md").read_text()
        if run in UNRECORDED_REPORTS:
            assert all("config_hash" not in t for t in timings.values())
            assert f"commit `{UNRECORDED_REPORTS[run]}`" in index.split("\n## ", 2)[1]
            continue
        want = load_config(ROOT / "configs" / f"{run}.toml").hash()
        for stage, t in timings.items():
            assert t["config_hash"] == want, f"reports/{run}: stage {stage} ran under another config; rerun it"
            assert t["tree_clean"] is True, f"reports/{run}: stage {stage} ran from a tree with local changes"
        assert f"hash `{want[:16]}`." in index
