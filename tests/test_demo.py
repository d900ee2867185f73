"""`canary-proxy demo` as users run it: a subprocess that must tell the whole story and exit 0."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# 12 s of traffic: steps at t=4 s and t=8 s (interval 4 s), the canary fails from t=6.6 s and is
# rolled back about 2 s later, leaving ~3 s of margin before the traffic stops.
DURATION = 12


@pytest.mark.timeout(60)
def test_demo_steps_then_rolls_back_the_failing_canary() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "demo", "--duration", str(DURATION), "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=45,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    lines = out.splitlines()

    def first(pattern: str) -> int:
        for i, line in enumerate(lines):
            if re.search(pattern, line):
                return i
        raise AssertionError(f"no line matching {pattern!r} in:\n{out}")

    # Live lines every second, traffic going to both upstreams.
    assert len([line for line in lines if re.search(r"t=\s*\d+s\s+\d+ req/s", line)]) >= DURATION - 2, out
    served = {
        m.group(1): int(m.group(2))
        for m in (re.match(r"\s+default\s+->\s+(\S+)\s+(\d+)$", line) for line in lines)
        if m
    }
    assert served.get("stable", 0) > 0 and served.get("canary", 0) > 0, served
    # The story, in order: a step up, the canary turning bad, the rollback, the final phase.
    step = first(r">> step: .*->")
    failing = first(r"starts failing")
    rollback = first(r">> rollback: .*rolled back")
    summary = first(r"^summary")
    assert step < rollback < summary, out
    assert failing < rollback, out
    assert re.match(r"rollout phase: rolled_back\b", lines[first(r"^rollout phase:")]), out
    assert len([line for line in lines if ">> rollback" in line]) == 1, out
