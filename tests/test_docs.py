"""The README's command table is `make help`, and the commands it names exist."""

import importlib
import re
import subprocess
from pathlib import Path
from typing import Any

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


# What README.md and docs/*.md mention exists: link targets, repository paths, `natprints` commands and
# their options, `make` targets, test names and Python names. Every failure names the file and the thing.

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REPO_PREFIXES = ("src/", "configs/", "tests/", "docs/", "reports/", "models/", "data/")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")


def _split(text: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """The prose (fenced blocks blanked out, lines kept) and the fenced blocks as (info string, lines)."""
    prose: list[str] = []
    blocks: list[tuple[str, list[str]]] = []
    fence = None
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(2)
            blocks.append((m.group(3).strip(), []))
            prose.append("")
        elif fence is not None and m and m.group(2).startswith(fence) and not m.group(3).strip():
            fence = None
            prose.append("")
        elif fence is not None:
            blocks[-1][1].append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def _spans(prose: str) -> list[str]:
    """Inline code spans, in order, whitespace normalized (a span may wrap over a line break)."""
    return [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose)]


def _docs() -> list[tuple[str, Path, str, list[str], list[tuple[str, list[str]]]]]:
    out = []
    for path in DOC_FILES:
        prose, blocks = _split(path.read_text(encoding="utf-8"))
        out.append((str(path.relative_to(ROOT)), path, prose, _spans(prose), blocks))
    return out


def _shell_lines(blocks: list[tuple[str, list[str]]]) -> list[str]:
    return [line.strip() for info, lines in blocks if info in ("sh", "bash", "shell", "console") for line in lines]


def _checked_repo_path(token: str) -> bool:
    """Whether a backticked token is a repository path this test checks (generated ones are not)."""
    if not token.startswith(REPO_PREFIXES) or any(c in token for c in "<*{") or " " in token:
        return False
    if token.startswith(("models/", "data/")):
        return False
    if token.startswith("reports/"):
        return token.startswith(("reports/default", "reports/bench"))
    return True


def test_docs_exist():
    assert (ROOT / "docs").is_dir() and len(DOC_FILES) > 1, "docs/*.md: none found"
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200, "README.md: over 200 lines"


def test_doc_links_point_at_files_that_exist():
    missing = []
    for name, path, prose, _, _ in _docs():
        for target in re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same file
            relative = target.split("#", 1)[0]
            if relative and not (path.parent / relative).exists():
                missing.append(f"{name}: link target {target!r} does not exist")
    assert not missing, "\n".join(missing)


def test_doc_repository_paths_exist():
    missing = []
    for name, _, _, spans, blocks in _docs():
        for token in spans:
            path = token.split("::", 1)[0]
            if _checked_repo_path(path) and not (ROOT / path).exists():
                missing.append(f"{name}: `{token}` does not exist")
            top_doc = re.fullmatch(r"[A-Z][\w-]*\.md", token)
            if top_doc and not any((d / token).is_file() for d in (ROOT, ROOT / "docs")):
                missing.append(f"{name}: `{token}` is in neither the repository root nor docs/")
        for info, lines in blocks:  # layout blocks: the first column of each line is a path
            if info or not lines or not lines[0].startswith("src/natprints/"):
                continue
            if lines[0].strip() == "src/natprints/":  # the package, module by module
                folder = None
                for line in lines[1:]:
                    entry = line.split()[0] if line.strip() and not line[:3].isspace() else None
                    if entry is not None:
                        folder = entry if entry.endswith("/") else None
                        if not (ROOT / "src/natprints" / entry).exists():
                            missing.append(f"{name}: code layout names src/natprints/{entry}, which does not exist")
                    for module in re.findall(r"\b(\w+\.py)\b", line.split(None, 1)[1] if entry else line):
                        where = ROOT / "src/natprints" / (folder or "") / module
                        if not where.exists():
                            missing.append(f"{name}: code layout names {where.relative_to(ROOT)}, which does not exist")
            else:
                for line in lines:
                    entry = line.split()[0] if line.strip() else ""
                    if _checked_repo_path(entry) and not (ROOT / entry).exists():
                        missing.append(f"{name}: layout names {entry}, which does not exist")
    assert not missing, "\n".join(missing)


def _cli() -> dict[str, Any]:
    """The app's commands by name, as Typer registers them (its click is its own: groups are told by
    their `commands`)."""
    import typer

    from natprints.cli import app

    return dict(typer.main.get_command(app).commands)


def _options(command: Any) -> set[str]:
    return {opt for p in command.params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("-")} | {"--help"}


def test_doc_natprints_commands_exist():
    """Every `natprints SUBCOMMAND ...` (inline, or a line of a shell block) names a command of the Typer
    app, `lineage` with its own sub-commands (`lineage A B` is `lineage compare A B`), and only options
    that command has."""
    commands = _cli()
    wrong = []
    for name, _, _, spans, blocks in _docs():
        for text in [s for s in spans if s.startswith("natprints ")] + [
            line for line in _shell_lines(blocks) if line.startswith("natprints ")
        ]:
            words = text.split("#", 1)[0].split() if not text.startswith("#") else []
            if len(words) < 2 or words[1].startswith("<"):
                continue
            if words[1].startswith("-"):
                if words[1] != "--help":
                    wrong.append(f"{name}: `{text}`: natprints has no option {words[1]}")
                continue
            command, rest = commands.get(words[1]), words[2:]
            if command is None:
                wrong.append(f"{name}: `{text}`: natprints has no command {words[1]!r} (has {sorted(commands)})")
                continue
            if hasattr(command, "commands"):
                sub = rest[0] if rest and rest[0] in command.commands else "compare"
                rest = rest[1:] if rest and rest[0] == sub else rest
                command = command.commands[sub]
            for word in rest:
                option = word.split("=", 1)[0]
                if option.startswith("--") and option not in _options(command):
                    wrong.append(f"{name}: `{text}`: `natprints {words[1]}` has no option {option}")
    assert not wrong, "\n".join(wrong)


def test_doc_make_targets_exist():
    targets = set(re.findall(r"^([a-z][\w-]*)\s*:", (ROOT / "Makefile").read_text(), re.M))
    wrong = []
    for name, _, _, spans, blocks in _docs():
        for text in [s for s in spans if s.startswith("make ")] + [
            line for line in _shell_lines(blocks) if line.startswith("make ")
        ]:
            words = [w for w in text.split("#", 1)[0].split()[1:] if not w.startswith("-") and "=" not in w]
            for target in words[:1]:
                if target not in targets:
                    wrong.append(f"{name}: `{text}`: the Makefile has no target {target!r}")
    assert not wrong, "\n".join(wrong)


def _resolve(dotted: str) -> object:
    """Import the longest module prefix of a dotted name, then get the rest as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as exc:
            if exc.name is not None and not ".".join(parts[:cut]).startswith(exc.name):
                raise  # the module exists but one of its imports is missing
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_doc_python_names_resolve():
    """Every backticked `natprints.module.name`, and every `from natprints... import ...` of a Python block,
    imports and resolves."""
    wrong = []
    for name, _, _, spans, blocks in _docs():
        dotted = [s.removesuffix("()") for s in spans if re.fullmatch(r"natprints(\.\w+)+(\(\))?", s)]
        for info, lines in blocks:
            if info == "python":
                for line in lines:
                    m = re.match(r"\s*from (natprints[\w.]*) import (.+)$", line)
                    if m:
                        dotted += [f"{m.group(1)}.{n.split(' as ')[0].strip()}" for n in m.group(2).split(",")]
                    m = re.match(r"\s*import (natprints[\w.]*)", line)
                    if m:
                        dotted.append(m.group(1))
        for thing in dotted:
            try:
                _resolve(thing)
            except (ImportError, AttributeError) as exc:
                wrong.append(f"{name}: `{thing}` does not resolve ({exc})")
    assert not wrong, "\n".join(wrong)


def test_doc_test_names_exist():
    """`test_x.py::test_y` (and a following `::test_z`, of the same file) name tests that exist."""
    wrong = []
    for name, _, _, spans, _ in _docs():
        current = None
        for span in spans:
            m = re.fullmatch(r"(?:tests/)?(test_\w+\.py)(?:::(\w+))?|::(\w+)", span)
            if not m:
                continue
            if m.group(1):
                current = ROOT / "tests" / m.group(1)
                if not current.is_file():
                    wrong.append(f"{name}: `{span}`: tests/{m.group(1)} does not exist")
                    current = None
                    continue
            test = m.group(2) or m.group(3)
            if test is None:
                continue
            if current is None:
                wrong.append(f"{name}: `{span}`: no test file before it")
            elif not re.search(rf"^\s*(?:async\s+)?def {test}\(", current.read_text(encoding="utf-8"), re.M):
                wrong.append(f"{name}: `{span}`: {current.relative_to(ROOT)} has no test {test}")
    assert not wrong, "\n".join(wrong)
