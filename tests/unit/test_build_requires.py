"""The wheel build compiles the hot path with mypyc, which type-checks every module the hot modules
import, third-party packages included. With build isolation (`pip install .`, the Dockerfile) only
`[build-system] requires` is installed: a typed dependency the hot path reaches must be listed there
(or be one mypy is told to skip), else `pip install .` fails outright (it did after HTTP/2 landed)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib

from test_import_graph import SRC, graph

from proxy import native

# Import name -> the build requirement that provides its types (name as in pyproject).
PROVIDES = {"yaml": "types-PyYAML", "h2": "h2", "hyperframe": "h2", "hpack": "h2"}  # h2 brings both


def _reachable() -> set[str]:
    edges = graph()
    seen: set[str] = set()
    todo = [m for m in native.MODULES if m in edges]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(edges.get(m, ()))
    return seen


def _third_party(module: str) -> set[str]:
    path = SRC / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = SRC / module.replace(".", "/") / "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top != "proxy" and top not in sys.stdlib_module_names and top != "__future__":
                out.add(top)
    return out


def test_typed_dependencies_of_the_hot_path_are_build_requirements() -> None:
    project = tomllib.loads((SRC / "pyproject.toml").read_text())
    requires = {re.split(r"[<>=!~ \[]", r)[0] for r in project["build-system"]["requires"]}
    skipped = {
        m.split(".")[0] for o in project["tool"]["mypy"].get("overrides", []) if o.get("ignore_missing_imports")
        for m in o["module"]
    }  # fmt: skip
    used = set().union(*(_third_party(m) for m in _reachable()))
    assert "httptools" in used  # the walk reached the legs
    missing = {top for top in used - skipped if PROVIDES.get(top, top) not in requires}
    assert not missing, f"add to [build-system] requires in pyproject.toml (or to PROVIDES here): {missing}"
