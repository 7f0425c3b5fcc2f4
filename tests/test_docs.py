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
