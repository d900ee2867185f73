"""HTTP/2 attacks against a real `canary-proxy run` process, with a raw client (python-hyper `h2`
and hand-made frames over a socket): each gets GOAWAY or RST_STREAM, memory stays bounded, and the
proxy keeps serving another client. Also the per-connection deadlines and flow control both ways."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import ProxyProcess, Upstream, config_text, wait_running
from h2.errors import ErrorCodes
from hpack import Decoder, Encoder
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame, SettingsFrame
from support.h2raw import ENHANCE_YOUR_CALM, NO_ERROR, PROTOCOL_ERROR, RawH2, request_headers
from support.polling import holds, wait_until

StartUpstream = Callable[..., Awaitable[Upstream]]
StartProcess = Callable[..., ProxyProcess]
MIB = 1 << 20
BIG = 32 * MIB  # the large download of the backpressure test


class Source:
    """An upstream: `/big` streams BIG bytes (counting what it could write), `/hold` reads its body
    only once `release` is set, anything else answers small."""

    def __init__(self) -> None:
        self.written = 0
        self.release = asyncio.Event()
        self.read = 0
        self.held = 0  # /hold requests that arrived

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/big":
            resp = web.StreamResponse(headers={"Content-Length": str(BIG)})
            await resp.prepare(request)
            chunk = b"z" * 65536
            for _ in range(BIG // len(chunk)):
                await resp.write(chunk)
                self.written += len(chunk)
            await resp.write_eof()
            return resp
        if request.path == "/hold":
            self.held += 1
            await asyncio.wait_for(self.release.wait(), 30)
            self.read = len(await request.read())
            return web.Response(text=f"read {self.read}\n")
        return web.Response(text=f"ok {request.path}\n")


@pytest.fixture
async def source(upstream_factory: StartUpstream) -> AsyncIterator[tuple[Source, Upstream]]:
    src = Source()
    up = await upstream_factory("stable", src.handle)
    yield src, up
    src.release.set()


def start(proxy_process: StartProcess, up: Upstream, extra: str = "") -> ProxyProcess:
    pp = proxy_process(config_text(up.url, up.url, extra))
    wait_running(pp)
    return pp


def rss(pp: ProxyProcess) -> int:
    """The proxy process's resident memory, bytes."""
    status = Path(f"/proc/{pp.proc.pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match is not None
    return int(match.group(1)) * 1024


async def serves(pp: ProxyProcess) -> None:
    """Another client still gets answers (HTTP/2 and HTTP/1.1)."""
    other = await RawH2.open(pp.port)
    try:
        status, _, body = await other.get("/after")
        assert (status, body) == (200, b"ok /after\n")
    finally:
        other.close()
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{pp.port}/h1") as r:
        assert r.status == 200


async def in_flight(pp: ProxyProcess) -> float:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{pp.admin_port}/metrics") as r:
        text = await r.text()
    match = re.search(r"^canary_proxy_in_flight_requests (\S+)$", text, re.M)
    assert match is not None
    return float(match.group(1))


async def test_rapid_reset_gets_goaway_and_frees_upstream_work(
    proxy_process: StartProcess, source: tuple[Source, Upstream]
) -> None:
    _, up = source
    pp = start(proxy_process, up)
    base = rss(pp)
    client = await RawH2.open(pp.port)
    sent = 0
    try:
        for _ in range(50):  # up to 5000 streams opened and cancelled at once (CVE-2023-44487)
            for _ in range(100):
                sid = client.conn.get_next_available_stream_id()
                client.conn.send_headers(sid, request_headers("/hold"), end_stream=True)
                client.conn.reset_stream(sid, ErrorCodes.CANCEL)
                sent += 1
            client.flush()
            try:
                await client.writer.drain()
            except ConnectionError:
                break
            if await client.peek():
                break
        await client.closes()
    finally:
        client.close()
    assert client.goaway_code() == ENHANCE_YOUR_CALM, client.frames[-3:]
    assert sent < 5000 or client.closed
    await serves(pp)
    assert await in_flight(pp) == 0  # every cancelled stream let go of its upstream work
    assert rss(pp) - base < 40 * MIB


async def test_continuation_flood_closes_with_bounded_memory(
    proxy_process: StartProcess, source: tuple[Source, Upstream]
) -> None:
    _, up = source
    pp = start(proxy_process, up)
    base = rss(pp)
    for size in (0, 4096):  # empty frames (the library's count) and full ones (our byte cap)
        client = await RawH2.open(pp.port, validate=False)
        block = Encoder().encode(request_headers("/"))
        client.raw(HeadersFrame(1, data=block, flags=["END_STREAM"]).serialize())  # no END_HEADERS
        pushed = 0
        try:
            for _ in range(2000):  # "endless": 8 MiB of CONTINUATION frames at most
                client.raw(ContinuationFrame(1, data=b"\x00" * size).serialize())
                pushed += size
                await client.writer.drain()
                if await client.peek():
                    break
        except ConnectionError:
            pass
        await client.closes()
        client.close()
        assert client.goaway_code() in (PROTOCOL_ERROR, ENHANCE_YOUR_CALM), client.frames[-3:]
        assert not any(ftype == 0x1 for ftype, *_ in client.frames), "no response to a header block never finished"
    assert rss(pp) - base < 40 * MIB
    await serves(pp)


async def test_oversized_header_lists(proxy_process: StartProcess, source: tuple[Source, Upstream]) -> None:
    _, up = source
    pp = start(proxy_process, up)
    # Over limits.max_header_size (32 KiB) but decodable: that stream gets 431, the connection lives.
    client = await RawH2.open(pp.port)
    status, _, _ = await client.get("/", x_big="b" * 33000)
    assert status == 431
    status, _, _ = await client.get("/fine")
    assert status == 200
    client.close()
    # Far over SETTINGS_MAX_HEADER_LIST_SIZE (200 KB; not Huffman-coded: hpack's encoder is slow at
    # that size): refused before it is decoded, GOAWAY.
    client = await RawH2.open(pp.port, validate=False)
    block = Encoder().encode(request_headers("/", x_huge="h" * 200_000), huffman=False)
    pieces = [block[i : i + 16384] for i in range(0, len(block), 16384)]
    client.raw(HeadersFrame(1, data=pieces[0], flags=["END_STREAM"]).serialize())
    for i, piece in enumerate(pieces[1:], 2):
        client.raw(ContinuationFrame(1, data=piece, flags=["END_HEADERS"] if i == len(pieces) else []).serialize())
    await client.closes()
    client.close()
    assert client.goaway_code() == ENHANCE_YOUR_CALM, client.frames
    # An HPACK bomb: one 4 KB field in the dynamic table, then 500 one-byte references to it.
    client = await RawH2.open(pp.port, validate=False)
    hdrs = request_headers("/") + [(b"x-bomb", b"B" * 4000)] * 500
    block = Encoder().encode(hdrs)
    assert len(block) < 10_000  # what travels is small; decoded it would be 2 MB
    client.raw(HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize())
    await client.closes()
    client.close()
    assert client.goaway_code() == ENHANCE_YOUR_CALM
    await serves(pp)


@pytest.mark.parametrize("kind", ["settings", "ping"])
async def test_control_frame_floods_get_goaway(
    kind: str, proxy_process: StartProcess, source: tuple[Source, Upstream]
) -> None:
    _, up = source
    pp = start(proxy_process, up)
    client = await RawH2.open(pp.port)
    frame = SettingsFrame(0, settings={0x4: 65535}) if kind == "settings" else PingFrame(0, opaque_data=b"12345678")
    data = frame.serialize() * 100
    try:
        for _ in range(100):  # up to 10 000 frames
            client.raw(data)
            await client.writer.drain()
            if await client.peek():
                break
    except ConnectionError:
        pass
    await client.closes()
    client.close()
    assert client.goaway_code() == ENHANCE_YOUR_CALM
    await serves(pp)


async def test_concurrent_stream_limit_and_idle_timeout(
    proxy_process: StartProcess, source: tuple[Source, Upstream]
) -> None:
    src, up = source
    extra = "limits: {http2_max_concurrent_streams: 4}\ntimeouts: {idle: 1s, client_header: 1s}\n"
    pp = start(proxy_process, up, extra)
    client = await RawH2.open(pp.port)
    await client.pump(lambda c: any(f[0] == 0x4 for f in c.frames))  # the server's SETTINGS
    settings = client.conn.remote_settings
    assert settings.max_concurrent_streams == 4
    assert settings.max_header_list_size is not None and settings.max_header_list_size >= 32 * 1024
    # Five streams at once where four are allowed: the library answers GOAWAY PROTOCOL_ERROR.
    encoder = Encoder()
    for sid in (1, 3, 5, 7, 9):
        client.raw(HeadersFrame(sid, data=encoder.encode(request_headers("/hold")), flags=["END_HEADERS"]).serialize())
    await client.closes()
    client.close()
    assert client.goaway_code() == PROTOCOL_ERROR
    src.release.set()
    # Idle: no stream for timeouts.idle -> GOAWAY NO_ERROR and close.
    client = await RawH2.open(pp.port)
    status, _, _ = await client.get("/x")
    assert status == 200
    await client.closes(timeout=5.0)
    client.close()
    assert client.goaway_code() == NO_ERROR
    # The first HEADERS must come within timeouts.client_header.
    client = await RawH2.open(pp.port)
    await client.closes(timeout=5.0)
    client.close()
    assert client.goaway_code() == NO_ERROR


async def test_slow_reader_keeps_memory_bounded(proxy_process: StartProcess, source: tuple[Source, Upstream]) -> None:
    src, up = source
    pp = start(proxy_process, up)
    base = rss(pp)
    client = await RawH2.open(pp.port)
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, request_headers("/big"), end_stream=True)
    client.flush()
    # We open no window beyond the first 64 KiB: the proxy must stop reading the upstream.
    await wait_until(lambda: src.written >= MIB, what="the upstream to start")
    await holds(lambda: src.written < 16 * MIB and rss(pp) - base < 24 * MIB, 2.0, "bounded while nobody reads")
    # Now read it all, opening the window as we go.
    got = 0

    def read_some(c: RawH2) -> bool:
        nonlocal got
        for e in c.events:
            data = getattr(e, "data", None)
            if data is not None and getattr(e, "stream_id", None) == sid:
                got += len(data)
                c.conn.acknowledge_received_data(e.flow_controlled_length, sid)  # type: ignore[attr-defined]
        c.events.clear()
        c.flush()
        return got >= BIG

    peak = 0

    def reading(c: RawH2) -> bool:
        nonlocal peak
        peak = max(peak, rss(pp))
        return read_some(c)

    await client.pump(reading, timeout=120.0)
    client.close()
    assert got == BIG
    assert peak - base < 40 * MIB, f"proxy grew {(peak - base) / MIB:.1f} MiB for a {BIG // MIB} MiB download"


async def test_upload_to_a_slow_upstream_is_held_by_flow_control(
    proxy_process: StartProcess, source: tuple[Source, Upstream]
) -> None:
    src, up = source
    pp = start(proxy_process, up)
    client = await RawH2.open(pp.port)
    sid = client.conn.get_next_available_stream_id()
    total = 64 * MIB
    client.conn.send_headers(sid, request_headers("/hold", method="POST", content_length=str(total)))
    client.flush()
    sent = 0
    chunk = b"u" * 16384

    def push(c: RawH2) -> bool:
        nonlocal sent
        while sent < total and c.conn.local_flow_control_window(sid) >= len(chunk):
            c.conn.send_data(sid, chunk, end_stream=sent + len(chunk) >= total)
            sent += len(chunk)
        c.flush()
        return sent >= total

    # The upstream does not read: the proxy acknowledges only what the upstream socket took.
    with pytest.raises(AssertionError, match="timed out"):
        await client.pump(push, timeout=3.0)
    assert sent < 24 * MIB, f"{sent / MIB:.1f} MiB accepted by a proxy whose upstream reads nothing"
    src.release.set()
    await client.pump(push, timeout=60.0)
    await client.pump(lambda c: c.ended(sid), timeout=60.0)
    status, _, body = client.response(sid)
    client.close()
    assert (status, body) == (200, f"read {total}\n".encode())


async def test_sigterm_sends_goaway_and_lets_streams_in_flight_finish(
    proxy_process: StartProcess, source: tuple[Source, Upstream]
) -> None:
    src, up = source
    pp = start(proxy_process, up, "shutdown_grace: 10s\n")
    client = await RawH2.open(pp.port)
    client.conn.send_headers(1, request_headers("/hold"), end_stream=True)
    client.flush()
    await wait_until(lambda: src.held == 1, what="the request to reach the upstream")
    pp.proc.send_signal(signal.SIGTERM)
    await client.pump(lambda c: c.goaway_code() is not None)
    assert client.goaway_code() == NO_ERROR
    (payload,) = [p for ftype, _, _, p in client.frames if ftype == 0x7]
    assert int.from_bytes(payload[:4], "big") == 1  # the last stream it will serve: ours
    assert pp.proc.poll() is None  # still serving stream 1
    src.release.set()
    # Our state machine stops at a GOAWAY (h2 closes the connection state): read the frames raw.
    await client.pump(lambda c: any(t == 0x0 and sid == 1 and flags & 0x1 for t, flags, sid, _ in c.frames))
    (block,) = [p for t, _, sid, p in client.frames if t == 0x1 and sid == 1]
    assert dict(Decoder().decode(block, raw=True))[b":status"] == b"200"
    assert b"".join(p for t, _, sid, p in client.frames if t == 0x0 and sid == 1) == b"read 0\n"
    await client.closes()
    client.close()
    await wait_until(lambda: pp.proc.poll() is not None, timeout=10.0, what="the proxy to exit")
    assert pp.proc.returncode == 0
