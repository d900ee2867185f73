"""The compiled hot path (proxy.native, proxy.build_native): used only when it matches the sources.

`make test` builds the compiled modules first and sets CANARY_PROXY_REQUIRE_NATIVE=1 when a C
compiler exists, so these tests cannot quietly skip there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from proxy import native

PROBE = (
    "import importlib, proxy.native as n\n"
    "files = [importlib.import_module(m).__file__ for m in n.MODULES]\n"
    "print(n.state()); print('\\n'.join(files))\n"
)


def _built() -> bool:
    if native.is_current():
        return True
    if os.environ.get("CANARY_PROXY_REQUIRE_NATIVE") == "1":
        pytest.fail("the hot path is not compiled (or stale): `make setup` should have built it")
    pytest.skip("hot path not compiled here (no C compiler?): `make setup` builds it")


def _probe(cwd: Path, **env: str) -> tuple[str, list[str]]:
    full = {k: v for k, v in os.environ.items() if k != native.PURE_ENV}
    full.update(env)
    full["PYTHONPATH"] = str(cwd)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=cwd, env=full, capture_output=True, text=True, timeout=60, check=True
    )
    state, *files = out.stdout.splitlines()
    return state, files


def _copy_package(dst: Path) -> Path:
    shutil.copytree(ROOT / "src" / "proxy", dst / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    return dst / "proxy"


def test_compiled_modules_are_used_when_current() -> None:
    _built()
    state, files = _probe(ROOT)
    assert state == "compiled (mypyc)"
    assert all(f.endswith(".so") for f in files), files


def test_pure_env_forces_the_sources() -> None:
    state, files = _probe(ROOT, CANARY_PROXY_PURE="1")
    assert state.startswith("pure")
    assert all(f.endswith(".py") for f in files), files


def test_an_edited_source_is_never_shadowed_by_a_stale_build(tmp_path: Path) -> None:
    _built()
    pkg = _copy_package(tmp_path)
    state, files = _probe(tmp_path)
    assert state == "compiled (mypyc)", "the copy should start out current"
    server = pkg / "dataplane" / "legs" / "http1_client.py"
    server.write_text(server.read_text() + "\nEDITED = True\n")
    state, files = _probe(tmp_path)
    assert "stale" in state
    assert all(f.endswith(".py") for f in files), files
    out = subprocess.run(
        [sys.executable, "-c", "import proxy.dataplane.legs.http1_client as s; print(s.EDITED)"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == "True", out.stderr


def test_clean_removes_every_compiled_file(tmp_path: Path) -> None:
    _built()
    pkg = _copy_package(tmp_path)
    assert native.is_current(pkg)
    native.clean(pkg)
    assert not list(pkg.rglob("*.so"))
    assert not (pkg / native.STAMP).exists()
    state, files = _probe(tmp_path)
    assert state == "pure (not built)"
    assert all(f.endswith(".py") for f in files)
