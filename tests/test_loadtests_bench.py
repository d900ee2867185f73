"""The benchmark harness itself runs end to end and prints our numbers beside nginx's.

Speed is never asserted here (the machines are noisy): this only proves `make bench` works and
reports a side-by-side ratio, on a one-second, one-scenario run written to a temp file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def _bench_env() -> dict[str, str]:
    """`python -m loadtests.bench` needs the repository on its path (the tests hide it from their
    children so that `python -m proxy` runs the installed package; the bench does that itself)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def test_bench_prints_side_by_side_ratio(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    # The bench listens on fixed ports (base + 0..999). Keep them below the kernel's ephemeral range
    # (32768-60999 by default): a port there may be held by another test's server bound to port 0.
    out = subprocess.run(
        [sys.executable, "-m", "loadtests.bench", "--quick", "--scenarios", "1", "--duration", "1",
         "--base-port", "24000", "--results", str(results)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env=_bench_env(),
    )
    assert out.returncode in (0, 1), out.stdout[-3000:] + out.stderr[-3000:]  # 1 = a target missed
    text = results.read_text()
    assert "| req/s |" in text
    row = next(line for line in text.splitlines() if line.startswith("| req/s |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    ours, nginx, ratio = (float(re.sub(r"[^0-9.]", "", c)) for c in cells[1:4])
    assert ours > 0 and nginx > 0
    assert abs(ratio - ours / nginx) < 0.2 * max(ratio, 0.1)  # median of one round = plain ratio
    assert "nginx" in out.stdout and "canary-proxy" in out.stdout
