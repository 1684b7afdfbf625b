"""The package's shape: no import cycle among alignment's modules, counting the imports inside functions too (an
import moved into a function to dodge a cycle still is one), and no stage imported by anything."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, known: set[str]) -> set[str]:
    """The project modules path imports, anywhere in the file: `from alignment import x` names alignment.x when
    that is a module, else alignment."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in known else node.module)
    return {m for m in out if m in known}


def graph(folder: str) -> dict[str, set[str]]:
    files = sorted((ROOT / folder).rglob("*.py"))
    known = {module_name(f) for f in files} | {folder}
    return {module_name(f): imported(f, known) - {module_name(f)} for f in files}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first again at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if nxt == "alignment":  # the package's __init__ imports nothing of its own
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node, [node])):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
    edges = graph("alignment")
    assert "alignment.training" in edges and edges["alignment.rl.loop"]  # the graph was read
    found = cycle(edges)
    assert found is None, "import cycle: " + " -> ".join(found)


def test_nothing_imports_a_stage():
    importers = [p for folder in ("stages", "alignment", "bench") for p in (ROOT / folder).rglob("*.py")]
    for path in importers:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "stages" or n.startswith("stages.") for n in names), f"{path} imports a stage"
