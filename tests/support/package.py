"""Which `proxy` package the tests import.

By default the installed one (`make setup` installs the compiled wheel, non-editable): the tests
then run the code users get, compiled when a C compiler was there. The sources live at the top of
the repository (`proxy/`), which is on `sys.path` for the tests (pytest's `pythonpath`, and the
current directory of `python -m`), so `select` imports the installed package first and sets
PYTHONSAFEPATH for every process the tests start (no current directory on their path).
`CANARY_PROXY_PURE=1` puts the sources first instead, for this process and every process it
starts: that is the pure Python run of the same tests. An installed package that differs from the
sources stops the run: it would test old code.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ROOT / "proxy"
PURE_ENV = "CANARY_PROXY_PURE"


def pure_requested() -> bool:
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def _is_root(entry: str) -> bool:
    return Path(entry or os.getcwd()).resolve() == ROOT


def select() -> None:
    """Call before anything imports `proxy`."""
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if pure_requested():
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        if str(ROOT) not in parts:
            os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *parts])
        return
    # Import the installed package with the repository hidden; `proxy.*` then resolves through it.
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if not _is_root(p)]
    try:
        sys.modules.pop("proxy", None)
        importlib.import_module("proxy")
    finally:
        sys.path[:] = saved
    os.environ["PYTHONSAFEPATH"] = "1"  # `python -m proxy` in a child must not find ./proxy
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in parts if not _is_root(p))


def stale_files() -> list[str]:
    """Sources under proxy/ that differ from (or are missing in) the imported package."""
    import proxy

    pkg = Path(proxy.__file__).resolve().parent
    if pkg == SOURCES:
        return []
    stale = []
    for path in sorted(SOURCES.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".html", ".yaml"):
            installed = pkg / path.relative_to(SOURCES)
            if not installed.exists() or installed.read_bytes() != path.read_bytes():
                stale.append(str(path.relative_to(ROOT)))
    return stale
