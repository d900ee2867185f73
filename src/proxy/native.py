"""Optional ahead-of-time compilation of the hot path with mypyc.

The data plane is plain, strictly typed Python. `python -m proxy.build_native` (run by `make setup`)
compiles the modules in :data:`MODULES` to C extensions next to their sources; they run the same
code about 1.4x faster end to end. Without a C compiler nothing is built and the pure-Python
modules run: the behaviour is identical, only slower.

A compiled module is used only when it was built from the sources on disk: the build writes a
digest of those sources (:data:`STAMP`), and :func:`guard` (called when `proxy` is imported) routes
the imports back to the `.py` files when the digest no longer matches, so an edited source is never
shadowed by a stale extension. `CANARY_PROXY_PURE=1` forces the pure-Python modules.

This module must stay importable without mypy and cheap to import: it runs on every start.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# The per-request path: parsing, routing, dispatch, recording. Only these are compiled.
MODULES = (
    "proxy.dataplane.legs.http1_buffers",
    "proxy.dataplane.legs.http1_headers",
    "proxy.dataplane.request",
    "proxy.dataplane.legs.http1_client",
    "proxy.dataplane.legs.http1_upstream",
    "proxy.dataplane",
    "proxy.routing.router",
    "proxy.analysis.stats",
    "proxy.analysis.window",
    "proxy.routing.snapshot",
    "proxy.config.model",
)
GROUP = "proxy.native"  # the shared runtime library: proxy/native__mypyc.*.so
STAMP = ".native-stamp"
PURE_ENV = "CANARY_PROXY_PURE"

PACKAGE_DIR = Path(__file__).resolve().parent
_state = "pure (not built)"


def _source(module: str, root: Path = PACKAGE_DIR) -> Path:
    return root.joinpath(*module.split(".")[1:]).with_suffix(".py")


def source_digest(root: Path = PACKAGE_DIR) -> str:
    """SHA-256 over the compiled modules' sources (names and contents)."""
    h = hashlib.sha256()
    for module in MODULES:
        h.update(module.encode() + b"\0" + _source(module, root).read_bytes() + b"\0")
    return h.hexdigest()


def _extensions(root: Path = PACKAGE_DIR) -> list[Path]:
    """Compiled files of ours that exist under `root` (module extensions and the shared library)."""
    found: list[Path] = []
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    for module in (*MODULES, GROUP + "__mypyc"):
        stem = root.joinpath(*module.split(".")[1:])
        found += [p for s in suffixes if (p := stem.with_name(stem.name + s)).exists()]
    return found


class _PureFinder(importlib.abc.MetaPathFinder):
    """Loads the compiled modules from their `.py` sources instead of the extensions."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, _source(fullname, self.root))


def is_current(root: Path = PACKAGE_DIR) -> bool:
    """Whether compiled modules exist and were built from the sources on disk."""
    if not _extensions(root):
        return False
    try:
        return (root / STAMP).read_text().strip() == source_digest(root)
    except OSError:
        return False


def guard(root: Path = PACKAGE_DIR) -> str:
    """Decide, before any hot-path module is imported, whether the compiled modules may be used."""
    global _state
    if not _extensions(root):
        _state = "pure (not built)"
        return _state
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        _state = f"pure ({PURE_ENV} set)"
    elif is_current(root):
        _state = "compiled (mypyc)"
        return _state
    else:
        _state = "pure (compiled modules are stale: run `make setup`)"
    if not any(isinstance(f, _PureFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PureFinder(root))
    return _state


def state() -> str:
    """How the hot path runs in this process: `compiled (mypyc)` or `pure (why)`."""
    return _state


def clean(root: Path = PACKAGE_DIR) -> None:
    """Remove every compiled file and the stamp (back to pure Python)."""
    for path in _extensions(root):
        path.unlink()
    (root / STAMP).unlink(missing_ok=True)
