"""Bounded soak: wrk drives the proxy process (`python -m proxy run`) for SOAK_SECONDS (default 60)
with mixed paths: small, medium and 1 MiB responses, uploads, upstream 500s and upstream resets.
Afterwards the process' RSS is flat, its file descriptors are back at their start count and the
number of metric series is unchanged. Skipped when wrk is not installed."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from conftest import ProxyProcess, Upstream, admin_get, config_text, fd_count, wait_until

SOAK_SECONDS = int(os.environ.get("SOAK_SECONDS", "60"))
WRK = shutil.which("wrk") or "/usr/bin/wrk"
pytestmark = [
    pytest.mark.timeout(SOAK_SECONDS + 120),
    pytest.mark.skipif(not os.path.exists(WRK), reason="wrk not installed"),
]

LUA = """
local paths = {"/s", "/s", "/s", "/s", "/m", "/m", "/l", "/err", "/reset", "/up"}
local up_body = string.rep("u", 20000)
counter = 0
request = function()
  counter = counter + 1
  local p = paths[(counter % #paths) + 1]
  if p == "/up" then
    return wrk.format("POST", p, {["Content-Length"] = tostring(#up_body)}, up_body)
  end
  return wrk.format("GET", p .. "?n=" .. counter)
end
"""
MEDIUM = b"m" * 10_000
LARGE = b"l" * (1 << 20)


async def handler(request: web.Request) -> web.StreamResponse:
    path = request.path
    if path == "/s":
        return web.Response(body=b"small")
    if path == "/m":
        return web.Response(body=MEDIUM)
    if path == "/l":
        return web.Response(body=LARGE)
    if path == "/up":
        return web.Response(body=b"%d" % len(await request.read()))
    if path == "/reset":
        assert request.transport is not None
        request.transport.abort()  # the connection dies before any response byte
        return web.Response(body=b"never sent")
    return web.Response(status=500, body=b"boom")


def open_sockets(pid: int) -> str:
    """What the process holds, for a failure message: fd targets and its TCP sockets."""
    import subprocess

    fds = sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    ss = subprocess.run(["ss", "-tanp"], capture_output=True, text=True, check=False).stdout
    return "\n".join(fds) + "\n" + "\n".join(line for line in ss.splitlines() if f"pid={pid}," in line)


async def settled_fd_count(pid: int, quiet: float = 2.0, timeout: float = 30.0) -> int:
    """The process' fd count once it has not changed for `quiet` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last, since = fd_count(pid), loop.time()
    while loop.time() < deadline:
        await asyncio.sleep(0.2)
        now = fd_count(pid)
        if now != last:
            last, since = now, loop.time()
        elif loop.time() - since >= quiet:
            return now
    raise AssertionError(f"fd count never settled (last {last})\n{open_sockets(pid)}")


async def fds_back(pid: int, start: int, what: str) -> None:
    try:
        # At most `start`: the count taken right after start-up may include a readiness probe's socket.
        await wait_until(lambda: fd_count(pid) <= start, timeout=30, what=f"fds back at {start} {what}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {fd_count(pid)} open\n{open_sockets(pid)}") from None


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def series(pp: ProxyProcess) -> set[str]:
    status, text = admin_get(pp, "/metrics")
    assert status == 200
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


async def wrk(pp: ProxyProcess, seconds: int, script: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        WRK, "-t2", "-c32", f"-d{seconds}s", "-s", str(script), f"http://127.0.0.1:{pp.port}/",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out
    return out.decode()


async def test_soak_leaves_rss_fds_and_series_flat(
    upstream_factory: Callable[..., Awaitable[Upstream]],
    proxy_process: Callable[..., ProxyProcess],
    tmp_path: Path,
) -> None:
    stable = await upstream_factory("stable", handler=handler)
    canary = await upstream_factory("canary", handler=handler)
    routes = "  - name: default\n    split: {stable: 90, canary: 10}\n"
    extra = "timeouts: {idle: 1s}\nretries: {attempts: 1}\noutlier_detection: {consecutive_failures: 0}\n"
    pp = proxy_process(config_text(stable.url, canary.url, extra, routes=routes))
    pid = pp.proc.pid
    script = tmp_path / "mixed.lua"
    script.write_text(LUA)
    await wrk(pp, 5, script)  # warm-up: allocator arenas, pools, every label combination
    # The baseline is taken once the warm-up's connections have closed (idle timeout 1 s) and the
    # count holds still: right after start-up, background threads may still be opening theirs.
    fds_start = await settled_fd_count(pid)
    rss_before, series_before = rss_kib(pid), series(pp)

    out = await wrk(pp, SOAK_SECONDS, script)
    assert pp.proc.poll() is None, "".join(pp.lines[-30:])
    await fds_back(pid, fds_start, "after the soak")
    rss_after, series_after = rss_kib(pid), series(pp)
    growth = rss_after - rss_before
    print(
        f"\nsoak {SOAK_SECONDS}s: RSS {rss_before} -> {rss_after} KiB ({growth:+d}), fds {fds_start},"
        f" series {len(series_before)} -> {len(series_after)}\n{out}"
    )
    assert series_after == series_before
    assert growth < max(8 * 1024, rss_before // 10), f"RSS grew {growth} KiB"
    assert "requests in" in out
    _, metrics = admin_get(pp, "/metrics")
    assert 'code_class="5xx"' in metrics and 'kind="reset"' in metrics
