"""Streaming with backpressure: 1 GiB each way through the proxy as a real process, whose peak RSS
must stay under 100 MiB. The client and the upstream generate/consume data as they go (no buffering)."""

from __future__ import annotations

import asyncio
import os
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from conftest import ProxyProcess, RawUpstream, config_text, read_head

GIB = 1 << 30
BLOCK = 1 << 20
RSS_LIMIT_KIB = 100 * 1024
RawFactory = Callable[..., Awaitable[RawUpstream]]


def blocks(n: int) -> tuple[bytes, int]:
    """A 1 MiB block template and the crc32 of n blocks, each stamped with its index."""
    tail = os.urandom(BLOCK - 8)
    crc = 0
    for i in range(n):
        crc = zlib.crc32(tail, zlib.crc32(i.to_bytes(8, "big"), crc))
    return tail, crc


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def write_blocks(writer: asyncio.StreamWriter, tail: bytes, n: int, chunked: bool) -> None:
    for i in range(n):
        block = i.to_bytes(8, "big") + tail
        if chunked:
            writer.writelines((b"%x\r\n" % len(block), block, b"\r\n"))
        else:
            writer.write(block)
        await writer.drain()
    if chunked:
        writer.write(b"0\r\n\r\n")
        await writer.drain()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_1gib_upload_streams_in_bounded_memory(
    chunked: bool, raw_upstream: RawFactory, proxy_process: Callable[..., ProxyProcess]
) -> None:
    n = GIB // BLOCK
    tail, expected_crc = blocks(n)

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers, _ = await read_head(reader)
        te = dict((k.lower(), v) for k, v in headers).get(b"transfer-encoding")
        crc = total = 0
        if te == b"chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                left = size
                while left:
                    data = await reader.read(min(left, 1 << 20))
                    if not data:
                        raise ConnectionError("eof in chunk")
                    crc = zlib.crc32(data, crc)
                    left -= len(data)
                    total += len(data)
                assert await reader.readexactly(2) == b"\r\n"
        else:
            length = int(dict((k.lower(), v) for k, v in headers)[b"content-length"])
            while total < length:
                data = await reader.read(min(length - total, 1 << 20))
                if not data:
                    raise ConnectionError("eof in body")
                crc = zlib.crc32(data, crc)
                total += len(data)
        body = b"%d %d" % (total, crc)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()

    up = await raw_upstream(sink)
    proxy = proxy_process(config_text(up.url, up.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % GIB
    writer.write(b"POST /upload HTTP/1.1\r\nHost: h\r\n%s\r\n\r\n" % framing)
    await write_blocks(writer, tail, n, chunked)
    start, headers, _ = await asyncio.wait_for(read_head(reader), 30)
    length = int(dict((k.lower(), v) for k, v in headers)[b"content-length"])
    body = await reader.readexactly(length)
    writer.close()
    assert start == b"HTTP/1.1 200 OK"
    assert body == b"%d %d" % (GIB, expected_crc)
    peak = peak_rss_kib(proxy.proc.pid)
    assert peak < RSS_LIMIT_KIB, f"proxy peak RSS {peak} KiB"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_1gib_download_streams_in_bounded_memory(
    chunked: bool, raw_upstream: RawFactory, proxy_process: Callable[..., ProxyProcess]
) -> None:
    n = GIB // BLOCK
    tail, expected_crc = blocks(n)

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % GIB
        writer.write(b"HTTP/1.1 200 OK\r\n%s\r\n\r\n" % framing)
        await write_blocks(writer, tail, n, chunked)
        await reader.read()

    up = await raw_upstream(source)
    proxy = proxy_process(config_text(up.url, up.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=1 << 21)
    writer.write(b"GET /download HTTP/1.1\r\nHost: h\r\n\r\n")
    start, headers, _ = await asyncio.wait_for(read_head(reader), 30)
    hdrs = dict((k.lower(), v) for k, v in headers)
    assert start == b"HTTP/1.1 200 OK"
    crc = total = 0
    if chunked:
        assert hdrs[b"transfer-encoding"] == b"chunked"
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            if size == 0:
                assert await reader.readexactly(2) == b"\r\n"
                break
            left = size
            while left:
                data = await reader.read(min(left, 1 << 20))
                assert data, "eof in chunk"
                crc = zlib.crc32(data, crc)
                left -= len(data)
                total += len(data)
            assert await reader.readexactly(2) == b"\r\n"
    else:
        assert int(hdrs[b"content-length"]) == GIB
        while total < GIB:
            data = await reader.read(1 << 20)
            assert data, "eof in body"
            crc = zlib.crc32(data, crc)
            total += len(data)
    writer.close()
    assert (total, crc) == (GIB, expected_crc)
    peak = peak_rss_kib(proxy.proc.pid)
    assert peak < RSS_LIMIT_KIB, f"proxy peak RSS {peak} KiB"
