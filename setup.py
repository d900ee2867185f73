"""Build hook: compile the hot path with mypyc when the wheel is built, the way mypy and black ship.

`pip install .`, `pip wheel .` and `python -m build` compile the modules listed in
`proxy.native.MODULES` into C extensions inside the wheel (tagged for this interpreter and
platform) whenever a C compiler and Python's headers are present. Otherwise, or with
`CANARY_PROXY_PURE=1` set at build time, the wheel is pure Python (`py3-none-any`): the same code,
slower. `CANARY_PROXY_REQUIRE_NATIVE=1` turns "no compiler" into a build error (image and CI builds).
Editable installs stay pure: nothing is ever written into the source tree.
"""

from __future__ import annotations

import ast
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def _hot_modules() -> list[str]:
    """`MODULES` and `GROUP` from proxy/native.py, read without importing the package."""
    tree = ast.parse((HERE / "proxy" / "native.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "MODULES" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise RuntimeError("proxy/native.py defines no MODULES")


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _why_pure() -> str | None:
    """Why the hot path cannot or must not be compiled here, or None when it can."""
    if _flag("CANARY_PROXY_PURE"):
        return "CANARY_PROXY_PURE is set"
    if len(sys.argv) > 1 and sys.argv[1] in ("dist_info", "egg_info", "sdist"):
        return "metadata only"
    if any(arg.startswith("editable") or arg == "develop" for arg in sys.argv[1:]):
        return "editable install (compiled modules would land in the source tree)"
    if sys.implementation.name != "cpython":
        return f"{sys.implementation.name} is not CPython"
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        return "Python's headers (Python.h) are missing: install python3-dev"
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc}) on PATH"
    try:
        import mypyc.build  # noqa: F401  (a build requirement; absent with --no-build-isolation)
    except ImportError:
        return "mypy (mypyc) is not installed in the build environment"
    return None


def _ext_modules(work: str) -> list[object]:
    why = _why_pure()
    if why == "metadata only":  # pip asks for requirements and metadata before it builds the wheel
        return []
    if why is not None:
        if _flag("CANARY_PROXY_REQUIRE_NATIVE"):
            raise SystemExit(f"canary-proxy: cannot compile the hot path: {why}")
        print(f"canary-proxy: building pure Python ({why})", file=sys.stderr)
        return []
    from mypyc.build import mypycify

    paths = [str(Path(*m.split(".")).with_suffix(".py")) for m in _hot_modules()]
    print(f"canary-proxy: compiling the hot path with mypyc ({len(paths)} modules)", file=sys.stderr)
    cwd = os.getcwd()
    os.chdir(HERE)  # mypycify takes paths relative to the project and reads pyproject's [tool.mypy]
    try:
        return list(
            mypycify(
                paths,
                opt_level="3",
                group_name="proxy.native",
                target_dir=str(Path(work, "mypyc")),
            )
        )
    finally:
        os.chdir(cwd)


# Every build product (C sources, objects, extensions) goes to a scratch directory, never the tree.
WORK = tempfile.mkdtemp(prefix="canary-proxy-build-")
try:
    setup(ext_modules=_ext_modules(WORK), options={"build": {"build_base": WORK}})
finally:
    shutil.rmtree(WORK, ignore_errors=True)
