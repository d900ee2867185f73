"""Which `proxy` package the tests import.

By default the installed one (`make setup` installs the compiled wheel, non-editable): the tests
then run the code users get, compiled when a C compiler was there. `CANARY_PROXY_PURE=1` puts the
sources (`src/`) first instead, for this process and every process it starts: that is the pure
Python run of the same tests. An installed package that differs from `src/` stops the run: it
would test old code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
PURE_ENV = "CANARY_PROXY_PURE"


def pure_requested() -> bool:
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def select() -> None:
    """Call before anything imports `proxy`."""
    if pure_requested():
        if str(SRC) not in sys.path:
            sys.path.insert(0, str(SRC))
        parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if str(SRC) not in parts:
            os.environ["PYTHONPATH"] = os.pathsep.join([str(SRC), *parts])


def stale_files() -> list[str]:
    """Sources under src/proxy that differ from (or are missing in) the imported package."""
    import proxy

    pkg = Path(proxy.__file__).resolve().parent
    src = SRC / "proxy"
    if pkg == src:
        return []
    stale = []
    for path in sorted(src.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".html", ".yaml"):
            installed = pkg / path.relative_to(src)
            if not installed.exists() or installed.read_bytes() != path.read_bytes():
                stale.append(str(path.relative_to(ROOT)))
    return stale
