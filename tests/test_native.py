"""The compiled hot path: built into the wheel by setup.py, reported by proxy.native.

`make test` installs the package as a wheel (compiled when a C compiler exists) and sets
CANARY_PROXY_REQUIRE_NATIVE=1 when gcc exists, so these tests cannot quietly skip there. With
CANARY_PROXY_PURE=1 the suite imports the sources instead (tests/support/package.py).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT
from support.package import pure_requested

from proxy import native

PROBE = (
    "import importlib, proxy.native as n\n"
    "files = [importlib.import_module(m).__file__ for m in n.MODULES]\n"
    "print(n.state()); print('\\n'.join(files))\n"
)


def _compiled_expected() -> bool:
    if native.state() == native.COMPILED:
        return True
    if os.environ.get("CANARY_PROXY_REQUIRE_NATIVE") == "1" and not pure_requested():
        pytest.fail(f"the hot path is not compiled ({native.state()}): `make setup` should have built it")
    pytest.skip(f"hot path not compiled here ({native.state()})")


def _probe(**env: str) -> tuple[str, list[str]]:
    full = {**os.environ, **env}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=full, capture_output=True, text=True, timeout=60, check=True
    )
    state, *files = out.stdout.splitlines()
    return state, files


def test_compiled_modules_are_used_when_installed_compiled() -> None:
    if pure_requested():
        pytest.skip("this run imports the sources (CANARY_PROXY_PURE=1)")
    _compiled_expected()
    state, files = _probe()
    assert state == native.COMPILED
    assert all(f.endswith(".so") for f in files), files
    # A wheel with extensions is tagged for this interpreter and platform, never py3-none-any.
    # The metadata beside the imported package (a build leaves an egg-info in the repository too).
    site = str(Path(native.__file__).resolve().parents[1])
    (dist,) = importlib.metadata.distributions(name="canary-proxy", path=[site])
    wheel = dist.read_text("WHEEL") or ""
    assert "Root-Is-Purelib: false" in wheel, wheel
    tag = next(line.split(": ", 1)[1] for line in wheel.splitlines() if line.startswith("Tag: "))
    assert tag.startswith(f"cp{sys.version_info.major}{sys.version_info.minor}-") and "none-any" not in tag, tag


def test_pure_env_runs_the_sources() -> None:
    state, files = _probe(CANARY_PROXY_PURE="1", PYTHONPATH=str(ROOT))
    assert state == "pure (CANARY_PROXY_PURE set)"
    assert all(f.endswith(".py") and f.startswith(str(ROOT / "proxy")) for f in files), files
    if pure_requested():
        assert native.state() == "pure (CANARY_PROXY_PURE set)"
        assert all(importlib.import_module(m).__file__.endswith(".py") for m in native.MODULES)  # type: ignore[union-attr]


def test_nothing_compiled_is_written_into_the_source_tree() -> None:
    assert not list((ROOT / "proxy").rglob("*.so")), "compiled files belong in the wheel, not in proxy/"
    assert not (ROOT / "proxy" / ".native-stamp").exists()


def _project_copy(dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, dst / name)
    shutil.copytree(ROOT / "proxy", dst / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_a_pure_wheel_when_asked_for_at_build_time(tmp_path: Path) -> None:
    project = _project_copy(tmp_path / "clone")
    env = {**os.environ, "CANARY_PROXY_PURE": "1"}
    env.pop("CANARY_PROXY_REQUIRE_NATIVE", None)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "w"),
         "."],
        cwd=project, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "w").glob("*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.endswith(".so")]
    assert "proxy/dataplane/plane.py" in names and "proxy/control/static/status.html" in names
    assert not list(project.rglob("*.so")), "the build wrote into the source tree"


def test_require_native_lets_pip_read_metadata_first(tmp_path: Path) -> None:
    """pip asks setup.py for requirements and metadata (egg_info) before it builds the wheel: with
    CANARY_PROXY_REQUIRE_NATIVE=1 (the Dockerfile's build) that step must pass, not demand a compiler."""
    env = {**os.environ, "CANARY_PROXY_REQUIRE_NATIVE": "1"}
    env.pop("CANARY_PROXY_PURE", None)
    done = subprocess.run(
        [sys.executable, "setup.py", "egg_info", "--egg-base", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "canary_proxy.egg-info" / "PKG-INFO").exists()
