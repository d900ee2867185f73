"""Per-connection memory with slow peers, canary-proxy beside nginx in the same run.

    python -m loadtests.memory [--connections 1000] [--only canary-proxy]

Two scenarios, each against the real proxy process (and an nginx proxy with its defaults):

- slow readers: N clients each GET a 1 GiB download from a fast upstream and stop reading after
  the response head; the upstream keeps writing as fast as the proxy takes it.
- stalled uploads: N clients each POST a 1 GiB body as fast as they can to an upstream that reads
  the request head and then never reads again.

The proxy's resident set size is sampled until it stops growing; the figure reported is
(peak RSS - RSS before the connections) / N, in KiB per connection. The target of issue 15 is
under 64 KiB per connection. Kernel socket buffers are not part of RSS (they are the same for
every proxy). Prints one JSON object per scenario and proxy, then a summary table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from loadtests.harness import Proc, raise_nofile, rss_bytes, wait_port
from loadtests.nginx import command as nginx_command

BLOB = 1 << 30
CHUNK = 64 * 1024
ZEROS = b"\0" * CHUNK


async def _fast_download(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Upstream: answer every request with a 1 GiB body, written as fast as it is taken."""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BLOB)
        for _ in range(BLOB // CHUNK):
            writer.write(ZEROS)
            await writer.drain()
    writer.close()


# The never-reading upstream's connections. Held here: with reading paused nothing else refers to
# them, and the garbage collector would close them (a reset the proxy counts as an upstream fault,
# and a connection fewer to measure).
STALLED: list[asyncio.StreamWriter] = []


async def _never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Upstream: read the head, then never read again (the body piles up in front of it)."""
    STALLED.append(writer)
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        await reader.readuntil(b"\r\n\r\n")
        reader._transport.pause_reading()  # type: ignore[attr-defined]  # the kernel buffer fills
        await asyncio.Event().wait()


async def _slow_reader(port: int, held: list[asyncio.StreamWriter]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=CHUNK)
    writer.write(b"GET /download HTTP/1.1\r\nHost: bench\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    writer.transport.pause_reading()  # then stop reading: everything queues towards us
    held.append(writer)


async def _stalled_upload(port: int, held: list[asyncio.StreamWriter]) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    held.append(writer)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n" % BLOB)
    with contextlib.suppress(ConnectionError):
        for _ in range(BLOB // CHUNK):
            writer.write(ZEROS)
            await writer.drain()  # blocks for good once the proxy stops reading


async def _settle(pid: int, max_wait: float) -> int:
    """Sample RSS until it has not grown for 2 s (or max_wait); return the peak seen."""
    peak, last_growth = rss_bytes(pid), time.monotonic()
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline and time.monotonic() - last_growth < 2.0:
        await asyncio.sleep(0.2)
        now = rss_bytes(pid)
        if now > peak * 1.002:
            last_growth = time.monotonic()
        peak = max(peak, now)
    return peak


def _in_flight(admin: int) -> int | None:
    """canary_proxy_in_flight_requests from the proxy's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("canary_proxy_in_flight_requests "):
                return int(float(line.split()[1]))
    return None


async def _scenario(name: str, pid: int, port: int, n: int, admin: int = 0) -> dict[str, object]:
    held: list[asyncio.StreamWriter] = []
    before = rss_bytes(pid)
    opener = _slow_reader if name == "slow_readers" else _stalled_upload
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(opener(port, held)))
        if i % 100 == 99:
            await asyncio.sleep(0.05)  # let the proxy accept: no SYN-queue overflow
    if name == "slow_readers":
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    peak = await _settle(pid, 30.0)
    # Requests the proxy still has in flight at the peak (a refused or failed one would make the
    # per-connection figure look smaller than it is); None for nginx.
    alive = await asyncio.to_thread(_in_flight, admin) if admin else None
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for w in held + STALLED:
        w.transport.abort()
    STALLED.clear()
    return {
        "scenario": name,
        "connections": n,
        "in_flight_at_peak": alive,
        "rss_before_mib": round(before / 2**20, 1),
        "rss_peak_mib": round(peak / 2**20, 1),
        "kib_per_connection": round((peak - before) / 1024 / n, 1),
    }


def _proxy_config(port: int, admin: int, download: int, upload: int) -> str:
    return (
        f"listen: 127.0.0.1:{port}\nadmin: 127.0.0.1:{admin}\naccess_log: false\n"
        f"limits: {{max_connections: 100000}}\n"
        "timeouts: {connect: 30s, response: 5m, send: 5m, client_body: 5m}\n"
        # A busy load generator must not get an endpoint ejected (every later request a 503).
        "outlier_detection: {consecutive_failures: 0}\nretries: {attempts: 0}\n"
        f"upstreams:\n  down: {{endpoints: ['http://127.0.0.1:{download}']}}\n"
        f"  up: {{endpoints: ['http://127.0.0.1:{upload}']}}\n"
        "routes:\n  - name: upload\n    match: {path_prefix: /upload}\n    to: up\n"
        "  - name: download\n    to: down\n"
    )


def _nginx_config(prefix: Path, port: int, download: int, upload: int, nofile: int) -> str:
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    return f"""\
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections {nofile}; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    client_max_body_size 0;
    proxy_http_version 1.1;
    proxy_read_timeout 300s;
    proxy_send_timeout 300s;
    proxy_request_buffering off;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /upload {{ proxy_pass http://127.0.0.1:{upload}; }}
        location / {{ proxy_pass http://127.0.0.1:{download}; }}
    }}
}}
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _run(args: argparse.Namespace) -> list[dict[str, object]]:
    nofile = raise_nofile(65536)
    down = await asyncio.start_server(_fast_download, "127.0.0.1", 0, backlog=4096)
    up = await asyncio.start_server(_never_reads, "127.0.0.1", 0, backlog=4096)
    dport, uport = down.sockets[0].getsockname()[1], up.sockets[0].getsockname()[1]
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for scenario in ("slow_readers", "stalled_uploads"):
            for proxy in ("canary-proxy", "nginx"):
                if args.only and proxy != args.only:
                    continue
                # A fresh instance per scenario: freed heap is kept by the allocator, so a second
                # scenario in the same process would start from the first one's peak.
                port, admin = _free_port(), 0
                if proxy == "canary-proxy":
                    cfg = work / "canary.yaml"
                    admin = _free_port()
                    cfg.write_text(_proxy_config(port, admin, dport, uport))
                    proc = Proc(proxy, [sys.executable, "-m", "proxy", "run", "-c", str(cfg)], work)
                else:
                    conf = work / "nginx.conf"
                    conf.write_text(_nginx_config(work, port, dport, uport, nofile))
                    proc = Proc(proxy, nginx_command(work, conf), work)
                try:
                    await asyncio.to_thread(wait_port, port, proc)
                    result = {"proxy": proxy, **await _scenario(scenario, proc.pid, port, args.connections, admin)}
                    print(json.dumps(result), flush=True)
                    results.append(result)
                finally:
                    proc.stop()
    down.close()
    up.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--only", choices=("canary-proxy", "nginx"))
    args = parser.parse_args()
    results = asyncio.run(_run(args))
    by = {(r["proxy"], r["scenario"]): r["kib_per_connection"] for r in results}
    print(f"\n{'scenario':<18}{'canary-proxy KiB/conn':>24}{'nginx KiB/conn':>18}{'ratio':>8}")
    for scenario in ("slow_readers", "stalled_uploads"):
        ours, theirs = by.get(("canary-proxy", scenario)), by.get(("nginx", scenario))
        ratio = f"{float(ours) / float(theirs):.2f}" if ours is not None and theirs else "-"  # type: ignore[arg-type]
        print(f"{scenario:<18}{ours!s:>24}{theirs!s:>18}{ratio:>8}")


if __name__ == "__main__":
    main()
