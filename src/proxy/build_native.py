"""`python -m proxy.build_native [--optional] [--if-stale] [--clean] [-v]`: compile the hot path (mypyc).

See :mod:`proxy.native` for what is compiled and how a stale build is never used. `--optional`
exits 0 when no compiler (or no mypy) is available: the pure-Python modules then run. `--if-stale`
does nothing when the compiled modules match the sources.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from proxy import native
from proxy.native import GROUP, MODULES, PACKAGE_DIR, STAMP, clean, source_digest


def build(root: Path = PACKAGE_DIR, verbose: bool = False) -> None:
    """Compile :data:`proxy.native.MODULES` in place (needs mypy and a C compiler; raises on failure)."""
    from mypyc.build import mypycify  # only the build needs mypy and setuptools

    setup = importlib.import_module("setuptools").setup  # untyped in older setuptools
    warnings.filterwarnings("ignore", module="setuptools")  # it reads our pyproject.toml: noise

    clean(root)
    project = root.parent
    digest = source_digest(root)
    work = Path(tempfile.mkdtemp(prefix="canary-proxy-build-"))
    cwd = Path.cwd()
    try:
        os.chdir(project)  # mypycify takes paths relative to the project
        paths = [str(root.joinpath(*m.split(".")[1:]).with_suffix(".py").relative_to(project)) for m in MODULES]
        ext_modules = mypycify(paths, opt_level="3", target_dir=str(work / "c"), group_name=GROUP)
        args = ["build_ext", "--inplace", "--build-temp", str(work / "tmp"), "--build-lib", str(work / "lib")]
        setup(name="canary-proxy-native", ext_modules=ext_modules, script_args=args if verbose else ["-q", *args])
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)
    (root / STAMP).write_text(digest + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--if-stale" in args and native.is_current():
        print("canary-proxy: compiled hot path is up to date")
        return 0
    if "--clean" in args:
        clean()
        print("canary-proxy: compiled hot path removed; running pure Python")
        return 0
    try:
        build(verbose="-v" in args)
    except (Exception, SystemExit) as exc:  # no compiler or no mypy: pure Python still works
        print(f"canary-proxy: hot path not compiled ({type(exc).__name__}: {exc}); running pure Python")
        return 0 if "--optional" in args else 1
    print(f"canary-proxy: hot path compiled with mypyc ({len(MODULES)} modules)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
