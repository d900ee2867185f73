"""Shared fixtures: real upstream servers, the real proxy (in-process or as a subprocess)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support import package
from support.polling import holds, wait_for, wait_until

package.select()  # the installed package, or the sources with CANARY_PROXY_PURE=1: before importing proxy

from proxy.config import load_config  # noqa: E402
from proxy.control.app import ProxyApp  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
__all__ = ["holds", "wait_for", "wait_until"]  # shared polling helpers, importable from here too


def pytest_sessionstart(session: pytest.Session) -> None:
    stale = package.stale_files()
    if stale:
        pytest.exit(
            f"the installed canary-proxy differs from proxy/ ({', '.join(stale[:3])}...): run `make setup` "
            "(reinstalls it), or set CANARY_PROXY_PURE=1 to test the sources as pure Python",
            returncode=4,
        )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Upstream:
    """A real aiohttp server; `seen` records every request it received (method, path, headers)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.seen: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def upstream_factory() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    """Start aiohttp upstreams. Default handler echoes `<name> <method> <path_qs>`;
    pass `handler=` for custom behaviour (it receives the aiohttp request)."""
    started: list[Upstream] = []

    async def start(name: str = "stable", handler: Handler | None = None, port: int = 0) -> Upstream:
        up = Upstream(name)

        async def default(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            return web.Response(
                text=f"{name} {request.method} {request.path_qs} {len(body)}\n", headers={"X-Upstream": name}
            )

        async def recording(request: web.Request) -> web.StreamResponse:
            up.seen.append({"method": request.method, "path": request.raw_path, "headers": request.headers})
            return await (handler or default)(request)

        app = web.Application(client_max_size=2**40)
        app.router.add_route("*", "/{tail:.*}", recording)
        up.runner = web.AppRunner(app, access_log=None)
        await up.runner.setup()
        site = web.TCPSite(up.runner, "127.0.0.1", port)
        await site.start()
        up.port = up.runner.addresses[0][1]
        started.append(up)
        return up

    yield start
    for up in started:
        if up.runner is not None:
            await up.runner.cleanup()


def config_text(stable: str, canary: str, extra: str = "", routes: str | None = None) -> str:
    """A config for tests: listen/admin on ephemeral ports, the two upstreams, given routes."""
    routes = routes or (
        "  - name: beta\n    match: {headers: {x-canary: {exact: always}}}\n    to: canary\n"
        "  - name: default\n    split: {stable: 100, canary: 0}\n"
    )
    return (
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\naccess_log: false\n"
        f"upstreams:\n  stable: {{endpoints: [{stable}], version: v1}}\n"
        f"  canary: {{endpoints: [{canary}], version: v2}}\n"
        f"routes:\n{routes}{extra}"
    )


@pytest.fixture
async def proxy_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[ProxyApp]]]:
    """Start the real proxy in this process from YAML text; `app.plane.bound_port` is its port."""
    apps: list[ProxyApp] = []

    async def start(text: str, watch: bool = False, name: str = "canary.yaml") -> ProxyApp:
        path = tmp_path / name
        path.write_text(text)
        app = ProxyApp(load_config(str(path)), watch=watch)
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.stop()


async def raw_request(port: int, data: bytes, timeout: float = 5.0, read_until_close: bool = True) -> bytes:
    """Send raw bytes to 127.0.0.1:port; return everything read until the peer closes (or timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_until_close and b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)
    finally:
        writer.close()


class ProxyProcess:
    def __init__(self, proc: subprocess.Popen[str], port: int, admin_port: int, config: Path) -> None:
        self.proc = proc
        self.port = port
        self.admin_port = admin_port
        self.config = config
        self.lines: list[str] = []


def _drain(pp: ProxyProcess) -> None:
    # Keep reading so a chatty process never blocks on a full pipe.
    assert pp.proc.stdout is not None
    for line in pp.proc.stdout:
        pp.lines.append(line)


@pytest.fixture
def proxy_process(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Run `python -m proxy run -c FILE` as a real process; waits until it is listening."""
    procs: list[ProxyProcess] = []

    def start(
        text: str,
        name: str = "canary.yaml",
        args: tuple[str, ...] = (),
        timeout: float = 15.0,
        prefix: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> ProxyProcess:
        port, admin = free_port(), free_port()
        text = text.replace("listen: 127.0.0.1:0", f"listen: 127.0.0.1:{port}")
        text = text.replace("admin: 127.0.0.1:0", f"admin: 127.0.0.1:{admin}")
        path = tmp_path / name
        path.write_text(text)
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "proxy", "run", "-c", str(path), *args],  # prefix: e.g. prlimit
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,  # teardown signals the whole group (`--workers` children too)
        )
        pp = ProxyProcess(proc, port, admin, path)
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            pp.lines.append(line)
            if re.search(r"listening on", line):
                procs.append(pp)
                threading.Thread(target=_drain, args=(pp,), daemon=True).start()
                return pp
        proc.kill()
        raise AssertionError("proxy did not start:\n" + "".join(pp.lines))

    yield start
    for pp in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pp.proc.pid, signal.SIGKILL)
        pp.proc.wait(timeout=10)


# -- raw HTTP/1.1 helpers for the data plane tests (tests/test_http_*.py) ------------------------

RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawUpstream:
    """A plain asyncio TCP server: `handler(reader, writer)` runs once per accepted connection."""

    def __init__(self, handler: RawHandler) -> None:
        self.handler = handler
        self.port = 0
        self.accepted = 0
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[RawHandler], Awaitable[RawUpstream]]]:
    """Start raw asyncio upstream servers that speak whatever bytes the test writes."""
    servers: list[RawUpstream] = []

    async def start(handler: RawHandler) -> RawUpstream:
        up = RawUpstream(handler)
        up.server = await asyncio.start_server(up._serve, "127.0.0.1", 0)
        up.port = up.server.sockets[0].getsockname()[1]
        servers.append(up)
        return up

    yield start
    for up in servers:
        assert up.server is not None
        up.server.close()
        # Handlers may still sit on open connections; closing the listener is enough for cleanup.


class RawMessage:
    """A parsed request or response: first line, header list (order kept), body, raw bytes."""

    def __init__(self, start: bytes, headers: list[tuple[bytes, bytes]], body: bytes, raw: bytes) -> None:
        self.start = start
        self.headers = headers
        self.body = body
        self.raw = raw

    @property
    def status(self) -> int:
        return int(self.start.split(b" ", 2)[1])

    def get(self, name: str) -> list[bytes]:
        """Every value of header `name` (case-insensitive), in order."""
        key = name.lower().encode()
        return [v for n, v in self.headers if n.lower() == key]

    def one(self, name: str) -> bytes | None:
        values = self.get(name)
        assert len(values) <= 1, f"{name} repeated: {values}"
        return values[0] if values else None

    def names(self) -> list[bytes]:
        return [n.lower() for n, _ in self.headers]


async def read_head(reader: asyncio.StreamReader) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """Read one message head; returns (start line, headers, raw head bytes)."""
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw[:-4].split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip()))
    return lines[0], headers, raw


async def read_body(
    reader: asyncio.StreamReader, headers: list[tuple[bytes, bytes]], until_close: bool
) -> tuple[bytes, bytes]:
    """Read a body framed by the headers; returns (decoded body, raw bytes on the wire)."""
    te = [v.lower() for n, v in headers if n.lower() == b"transfer-encoding"]
    cl = [v for n, v in headers if n.lower() == b"content-length"]
    if te:
        assert te == [b"chunked"], te
        body, raw = bytearray(), bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            raw += size_line
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    line = await reader.readuntil(b"\r\n")
                    raw += line
                    if line == b"\r\n":
                        return bytes(body), bytes(raw)
            chunk = await reader.readexactly(size + 2)
            assert chunk[-2:] == b"\r\n", chunk[-10:]
            raw += chunk
            body += chunk[:-2]
    if cl:
        data = await reader.readexactly(int(cl[0]))
        return data, data
    if until_close:
        data = await reader.read()
        return data, data
    return b"", b""


async def read_request(reader: asyncio.StreamReader) -> RawMessage:
    """Read one request (head and body) from a raw upstream connection."""
    start, headers, raw = await read_head(reader)
    body, raw_body = await read_body(reader, headers, until_close=False)
    return RawMessage(start, headers, body, raw + raw_body)


async def read_response(reader: asyncio.StreamReader, method: bytes = b"GET") -> RawMessage:
    """Read one response from the proxy (1xx included: the caller reads again for the final one)."""
    start, headers, raw = await read_head(reader)
    status = int(start.split(b" ", 2)[1])
    if method == b"HEAD" or status < 200 or status in (204, 304):
        return RawMessage(start, headers, b"", raw)
    body, raw_body = await read_body(reader, headers, until_close=True)
    return RawMessage(start, headers, body, raw + raw_body)


class RawClient:
    """One raw TCP connection to the proxy."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, method: bytes = b"GET", timeout: float = 5.0) -> RawMessage:
        return await asyncio.wait_for(read_response(self.reader, method), timeout)

    async def request(self, data: bytes, method: bytes = b"GET", timeout: float = 5.0) -> RawMessage:
        await self.send(data)
        return await self.response(method, timeout)

    async def at_eof(self, timeout: float = 5.0) -> bytes:
        """Everything until the proxy closes the connection (fails on timeout)."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def raw_client() -> AsyncIterator[Callable[[int], Awaitable[RawClient]]]:
    """Open raw client connections to a port; all are closed at teardown."""
    clients: list[RawClient] = []

    async def connect(port: int) -> RawClient:
        client = await RawClient.connect(port)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


def admin_get(pp: ProxyProcess, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET on a proxy process's admin listener: (status, body)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{pp.admin_port}{path}", timeout=timeout) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_running(pp: ProxyProcess) -> None:
    """Block until the process runs its loop, which means its signal handlers are installed.

    `listening on` is logged at the end of `ProxyApp.start`; the handlers are installed right after,
    with no await between. An admin response can only be produced once the loop runs again, so
    after one, a SIGHUP or SIGTERM meets our handlers and not the default action (terminate).
    """
    status, body = admin_get(pp, "/healthz")
    assert status == 200, body


# -- hardening helpers (tests/test_hardening_*.py) -----------------------------------------------


class SeenRequest:
    """One complete request an instrumented upstream parsed from the bytes it received."""

    def __init__(self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.method = method
        self.url = url
        self.headers = headers
        self.body = body

    def get(self, name: str) -> list[bytes]:
        key = name.lower().encode()
        return [v for n, v in self.headers if n.lower() == key]

    def __repr__(self) -> str:
        return f"SeenRequest({self.method!r} {self.url!r} body={self.body[:40]!r})"


class _LoggedConnection(asyncio.Protocol):
    """Upstream side of one proxy connection: logs every byte, parses requests with llhttp and
    answers each complete one with `200` and its path as the body (or the owner's `respond`)."""

    def __init__(self, owner: LoggingUpstream) -> None:
        import httptools

        self.owner = owner
        self.raw = bytearray()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.in_message = False
        self.broken = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.owner.connections.append(self)
        self.owner.open += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.open -= 1
        self.owner.closed_at.append(time.monotonic())

    def data_received(self, data: bytes) -> None:
        import httptools

        self.raw += data
        if self.broken:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.broken = True  # the proxy sent bytes that are not a clean request stream
            self.owner.parse_errors += 1

    def on_message_begin(self) -> None:
        self.in_message = True
        self.url, self.headers, self.body = b"", [], bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.in_message = False
        method = self.parser.get_method()
        req = SeenRequest(method, self.url, self.headers, bytes(self.body))
        self.owner.requests.append(req)
        assert self.transport is not None
        self.transport.write(self.owner.respond(req))


class LoggingUpstream:
    """A raw TCP upstream that logs the exact bytes it receives (`raw`) and the requests they
    parse into (`requests`); `parse_errors` counts connections whose bytes were not clean HTTP."""

    def __init__(self) -> None:
        self.port = 0
        self.server: asyncio.Server | None = None
        self.connections: list[_LoggedConnection] = []
        self.requests: list[SeenRequest] = []
        self.parse_errors = 0
        self.open = 0
        self.closed_at: list[float] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def raw(self) -> bytes:
        return b"".join(bytes(c.raw) for c in self.connections)

    @property
    def partial(self) -> int:
        """Connections that hold an incomplete request (a head or body that never ended)."""
        return sum(1 for c in self.connections if c.in_message and not c.broken)

    def respond(self, req: SeenRequest) -> bytes:
        body = b"" if req.method == b"HEAD" else req.url
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(req.url), body)

    def urls(self) -> list[bytes]:
        return [r.url for r in self.requests]


@pytest.fixture
async def logging_upstream() -> AsyncIterator[Callable[[], Awaitable[LoggingUpstream]]]:
    """Start instrumented raw upstreams (see `LoggingUpstream`)."""
    servers: list[LoggingUpstream] = []

    async def start() -> LoggingUpstream:
        up = LoggingUpstream()
        loop = asyncio.get_running_loop()
        up.server = await loop.create_server(lambda: _LoggedConnection(up), "127.0.0.1", 0)
        up.port = up.server.sockets[0].getsockname()[1]
        servers.append(up)
        return up

    yield start
    for up in servers:
        assert up.server is not None
        up.server.close()
        for c in up.connections:
            if c.transport is not None:
                c.transport.abort()


def fd_count(pid: int | None = None) -> int:
    """Open file descriptors of a process (this one by default)."""
    return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))
