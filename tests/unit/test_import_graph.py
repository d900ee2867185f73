"""The architecture as a test: imports inside `proxy` never form a cycle, modules stay small.

Every import counts, including the ones under `if TYPE_CHECKING:` (a type-only cycle is still two
modules that cannot be understood one without the other). Package `__init__` modules count as the
package; `from proxy.x import y` counts as an import of `proxy.x.y` when that is a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2]
MAX_LINES = 420  # "about 400"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / "proxy").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        out.update(t for t in targets if t in modules and t != name)
    return out


def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_inside_proxy() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_over_about_400_lines() -> None:
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


# The folders, top to bottom: a module may import from its own folder and from folders below it.
LAYERS = ("cli", "control", "dataplane", "routing", "analysis", "config")


def test_folders_import_one_way_down() -> None:
    upward = []
    for importer, imported in ((a, b) for a, bs in graph().items() for b in bs):
        pa, pb = importer.split(".")[1:2], imported.split(".")[1:2]
        if not pa or not pb or pa == pb or pa[0] not in LAYERS or pb[0] not in LAYERS:
            continue
        if LAYERS.index(pb[0]) < LAYERS.index(pa[0]):
            upward.append(f"{importer} -> {imported}")
    assert not upward, upward
