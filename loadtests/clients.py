"""Non-wrk clients: curl for the streamed transfers, asyncio for idle connections and routing checks."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import struct
import subprocess
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loadtests.harness import BenchError, pinned
from loadtests.topology import CANARY_BODY, CANARY_HEADER, CANARY_VALUE, STABLE_BODY, USER_HEADER


@dataclass(frozen=True)
class Transfer:
    bytes: int
    seconds: float

    @classmethod
    def total(cls, transfers: list[Transfer]) -> Transfer:
        return cls(sum(t.bytes for t in transfers), sum(t.seconds for t in transfers))

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0


def _curl(args: list[str], cpus: str | None, timeout: float) -> list[str]:
    cmd = pinned(["curl", "-sS", "--fail", "-H", "Expect:", "-H", f"{USER_HEADER}: streamer", *args], cpus)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise BenchError(f"curl failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.split()


def download(port: int, size: int, cpus: str | None, timeout: float = 600) -> Transfer:
    """GET the sparse blob through the proxy into /dev/null."""
    code, got, secs = _curl(
        [
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download} %{time_total}",
            f"http://127.0.0.1:{port}/download",
        ],
        cpus,
        timeout,
    )
    if code != "200" or int(got) != size:
        raise BenchError(f"download: status {code}, {got} of {size} bytes")
    return Transfer(int(got), float(secs))


def upload(port: int, blob: Path, cpus: str | None, timeout: float = 600) -> Transfer:
    """PUT the sparse blob (streamed by curl with a Content-Length) to the sink through the proxy."""
    size = blob.stat().st_size
    out = _curl(
        [
            "-T",
            str(blob),
            "-w",
            "\n%{http_code} %{size_upload} %{time_total}",
            f"http://127.0.0.1:{port}/upload",
        ],
        cpus,
        timeout,
    )
    code, sent, secs = out[-3:]
    received = json.loads(" ".join(out[:-3]))["received"]
    if code != "200" or received != size:
        raise BenchError(f"upload: status {code}, sink received {received} of {size} bytes")
    return Transfer(int(sent), float(secs))


def check_routing(port: int, users: int = 2000) -> str:
    """Send ``users`` distinct user ids twice each plus header-rule requests; describe the outcome.

    Fails when stickiness breaks or the header rule does not reach the canary.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    seen: dict[str, str] = {}
    share: Counter[str] = Counter()
    try:
        for repeat in range(2):
            for i in range(users):
                conn.request("GET", "/small", headers={USER_HEADER: f"check-{i}"})
                body = conn.getresponse().read().decode()
                if repeat == 0:
                    seen[f"check-{i}"] = body
                    share[body] += 1
                elif seen[f"check-{i}"] != body:
                    raise BenchError(f"port {port}: user check-{i} not sticky")
        for i in range(50):
            conn.request("GET", "/small", headers={USER_HEADER: f"check-{i}", CANARY_HEADER: CANARY_VALUE})
            if conn.getresponse().read().decode() != CANARY_BODY:
                raise BenchError(f"port {port}: header rule did not route to canary")
    finally:
        conn.close()
    unknown = set(share) - {STABLE_BODY, CANARY_BODY}
    if unknown:
        raise BenchError(f"port {port}: unexpected bodies {unknown}")
    return f"{100 * share[CANARY_BODY] / users:.1f}% canary, sticky, header rule ok"


def warm(port: int, requests: int = 200) -> None:
    """A few requests over one connection, so lazily built state exists before a baseline is taken."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for i in range(requests):
            conn.request("GET", "/small", headers={USER_HEADER: f"warm-{i}"})
            conn.getresponse().read()
    finally:
        conn.close()


_LINGER_RST = struct.pack("ii", 1, 0)


async def _open_one(port: int, i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /small HTTP/1.1\r\nHost: bench\r\n{USER_HEADER}: idle-{i}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return reader, writer


async def _idle(port: int, count: int, measure: asyncio.Future[None], release: asyncio.Event, batch: int) -> int:
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for start in range(0, count, batch):
            conns += await asyncio.gather(*(_open_one(port, i) for i in range(start, min(count, start + batch))))
        await asyncio.sleep(1.0)  # let the proxy settle (buffers released after the response)
        measure.set_result(None)
        await release.wait()
        return sum(1 for reader, _ in conns if not reader.at_eof())
    finally:
        for _, writer in conns:
            # RST instead of FIN: 10k TIME_WAIT sockets per round would exhaust ephemeral ports.
            sock = writer.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            writer.close()


@dataclass(frozen=True)
class IdleResult:
    rss_before: int
    rss_after: int
    count: int
    still_open: int

    @property
    def bytes_per_conn(self) -> float:
        return (self.rss_after - self.rss_before) / self.count


def idle_connections(port: int, count: int, rss: Callable[[], int], batch: int = 200) -> IdleResult:
    """Open ``count`` keep-alive connections, one request each, and measure RSS growth while idle."""

    async def go() -> IdleResult:
        loop = asyncio.get_running_loop()
        measure: asyncio.Future[None] = loop.create_future()
        release = asyncio.Event()
        before = rss()
        task = asyncio.create_task(_idle(port, count, measure, release, batch))
        await asyncio.wait([task, measure], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        if task.done():
            task.result()  # raises the client error
        after = rss()
        release.set()
        still_open = await task
        return IdleResult(before, after, count, still_open)

    try:
        import uvloop
    except ImportError:
        return asyncio.run(go())
    return uvloop.run(go())
