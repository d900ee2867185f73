"""Issue 15, item 10: memory per connection with slow peers stays under 64 KiB.

Runs `loadtests/memory.py` (the real proxy process, real sockets): hundreds of clients that stop
reading a fast 1 GiB download after its head, and hundreds of 1 GiB uploads to an upstream that
never reads. The proxy's peak RSS growth divided by the connections must stay under the issue's
target, with every connection still in flight at the peak (a refused or failed one would make the
figure look smaller than it is).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CONNECTIONS = 500
TARGET_KIB = 64


def _env() -> dict[str, str]:
    """The loadtest needs the repository on its path; the proxy it starts runs the installed package."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@pytest.fixture(scope="module")
def measured() -> dict[str, dict[str, object]]:
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 8 * CONNECTIONS:
        pytest.skip("the descriptor limit is too low for the clients, the proxy and the upstreams")
    out = subprocess.run(
        [sys.executable, "-m", "loadtests.memory", "--connections", str(CONNECTIONS), "--only", "canary-proxy"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env(),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {str(r["scenario"]): r for r in rows}


@pytest.mark.parametrize("scenario", ["slow_readers", "stalled_uploads"])
def test_memory_per_slow_connection_is_bounded(scenario: str, measured: dict[str, dict[str, object]]) -> None:
    row = measured[scenario]
    assert row["in_flight_at_peak"] == CONNECTIONS, row
    assert float(str(row["kib_per_connection"])) < TARGET_KIB, row
