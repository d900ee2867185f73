"""Drive a proxy with wrk: a Lua script cycles through pre-built requests and prints exact percentiles.

wrk2 is not packaged in Debian; fixed-rate runs use wrk's ``delay()`` hook instead (each connection
waits a random 5-15 ms after every response), with the connection count chosen for the target rate.
Latency is timed from the moment a request is written, so the pause is not counted.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from loadtests.harness import BenchError, pinned
from loadtests.topology import CANARY_HEADER, CANARY_VALUE, USER_HEADER

MEAN_DELAY_MS = 10  # mean of the 5..15 ms pause in fixed-rate mode

_SCRIPT = """\
local reqs = {{}}
local n = 0
local count = 1000
init = function(args)
  for i = 1, count do
    local h = {{["{user}"] = "user-" .. i}}
    if i % 100 == 0 then h["{canary}"] = "{value}" end
    {close}
    reqs[i] = wrk.format("GET", "{path}", h)
  end
end
request = function()
  n = n % count + 1
  return reqs[n]
end
{delay}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {{"requests": %d, "duration_us": %d, "bytes": %d, "errors": %d, "status_errors": %d, '
    .. '"p50_us": %d, "p99_us": %d, "p999_us": %d, "max_us": %d}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect + e.read + e.write + e.timeout,
    e.status, latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    bytes: int
    errors: int  # socket errors + timeouts
    status_errors: int  # non-2xx/3xx responses
    p50_ms: float
    p99_ms: float
    p999_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def write_script(work: Path, name: str, path: str, close: bool = False, paced: bool = False) -> Path:
    """Render the Lua script for one scenario."""
    script = work / f"{name}.lua"
    script.write_text(
        _SCRIPT.format(
            user=USER_HEADER,
            canary=CANARY_HEADER,
            value=CANARY_VALUE,
            path=path,
            close='h["Connection"] = "close"' if close else "",
            delay="delay = function() return math.random(5, 15) end" if paced else "",
        )
    )
    return script


def connections_for_rate(rate: float) -> int:
    """Connections that, each pausing ~MEAN_DELAY_MS between requests, offer ``rate`` req/s."""
    return max(1, round(rate * MEAN_DELAY_MS / 1000))


def run(
    port: int,
    script: Path,
    connections: int,
    duration: float,
    cpus: str | None,
    timeout_s: int = 5,
    scheme: str = "http",
) -> WrkResult:
    """One wrk run (one thread: the load side has a single core on the reference machine). `scheme`
    "https": over TLS (wrk does not verify the certificate, and never resumes a TLS session)."""
    cmd = pinned(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            f"--timeout={timeout_s}s",
            "-s",
            str(script),
            f"{scheme}://127.0.0.1:{port}",
        ],
        cpus,
    )
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    for line in done.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            d = json.loads(line.removeprefix("WRK_JSON "))
            return WrkResult(
                requests=d["requests"],
                seconds=d["duration_us"] / 1e6,
                bytes=d["bytes"],
                errors=d["errors"],
                status_errors=d["status_errors"],
                p50_ms=d["p50_us"] / 1000,
                p99_ms=d["p99_us"] / 1000,
                p999_ms=d["p999_us"] / 1000,
            )
    raise BenchError(f"wrk gave no result (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
