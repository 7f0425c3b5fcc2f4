"""The package layout is the pipeline: no module imports a stage that runs after its own, and no
import cycle. Every import counts, the ones inside functions too."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "natprints"

# Bottom up. Shared pieces beneath every stage (rank 0); stages in run order; then what reads them all.
# Stages of one rank run side by side and import neither each other.
RANK = {
    **dict.fromkeys(
        (
            "errors",
            "artifacts",
            "config",
            "stats",
            "runtime",
            "corpus",
            "conditions",
            "modeldir",
            "records",
            "declared",
        ),
        0,
    ),
    "zoo": 1,
    "generate": 2,
    "lineage": 2,
    "likelihood": 3,
    "reference": 4,
    "attribution": 5,
    "emergence": 6,
    "reports": 7,
    "cli": 9,
    "bench": 8,
}


def _imports(tree: ast.AST, *, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(imported natprints module, line) of each import; ``from natprints.a import b`` gives a and a.b."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "natprints":
            found += [(node.module, node.lineno)] + [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "natprints"]
    return found


def _modules() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        names[".".join(("natprints", *parts)).removesuffix(".__init__")] = path
    return names


def test_every_top_level_module_has_a_rank():
    tops = {path.relative_to(PACKAGE).parts[0].removesuffix(".py") for path in PACKAGE.rglob("*.py")}
    assert tops - {"__init__"} == set(RANK)


def test_no_import_runs_against_the_pipeline():
    against = []
    for name, path in _modules().items():
        own = name.split(".")[1] if "." in name else None
        if own is None:
            continue  # the package's lazy public API
        for target, line in _imports(ast.parse(path.read_text())):
            parts = target.split(".")
            if len(parts) < 2 or parts[1] not in RANK or parts[1] == own:
                continue
            if RANK[parts[1]] > RANK[own] or (RANK[parts[1]] == RANK[own] and RANK[own] > 0):
                against.append(f"{path.relative_to(PACKAGE)}:{line} imports {target}")
    assert not against, "\n".join(against)


def test_no_import_cycle_between_modules():
    modules = _modules()
    graph = {
        name: {t for t, _ in _imports(ast.parse(path.read_text()), top_level_only=True) if t in modules and t != name}
        for name, path in modules.items()
    }
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, "\n".join(cycles)


def test_the_manifest_file_name_is_written_once():
    """Every module names a manifest through ``artifacts.MANIFEST`` (one up-to-date mechanism)."""
    literal = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if '"manifest.json"' in p.read_text()]
    assert literal == ["artifacts.py"]
