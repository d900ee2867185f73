"""proxy.control.tuning: allocator and GC settings applied at start-up, checked in a real process."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable

import pytest
from conftest import ROOT, ProxyProcess, RawUpstream, config_text, read_head

from proxy.control import tuning

RawFactory = Callable[..., Awaitable[RawUpstream]]

PROBE = "from proxy.control import tuning; print(tuning.tune_malloc())"


def _run(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


def test_tune_malloc_applies_on_glibc() -> None:
    assert _run({}) == "True"


def test_explicit_malloc_environment_wins() -> None:
    assert _run({"MALLOC_TRIM_THRESHOLD_": "131072"}) == "False"


def test_freeze_moves_loaded_objects_out_of_the_collector() -> None:
    before = gc.get_freeze_count()
    tuning.freeze_loaded_objects()
    try:
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()


SIZE = 256 << 20
BLOCK = b"\xa5" * (1 << 20)


def minor_faults(pid: int) -> int:
    """Minor page faults of a process so far (/proc/PID/stat field 10)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


async def _download_faults(raw_upstream: RawFactory, proxy_process: Callable[..., ProxyProcess]) -> int:
    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % SIZE)
        for _ in range(SIZE // len(BLOCK)):
            writer.write(BLOCK)
            await writer.drain()
        await reader.read()

    up = await raw_upstream(source)
    proxy = proxy_process(config_text(up.url, up.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, limit=1 << 21)
    writer.write(b"GET /download HTTP/1.1\r\nHost: h\r\n\r\n")
    start, _, _ = await asyncio.wait_for(read_head(reader), 30)
    assert start == b"HTTP/1.1 200 OK"
    before = minor_faults(proxy.proc.pid)
    total = 0
    while total < SIZE:
        data = await reader.read(1 << 20)
        assert data, "eof in body"
        total += len(data)
    writer.close()
    return minor_faults(proxy.proc.pid) - before


@pytest.mark.timeout(120)
async def test_streamed_download_reuses_memory(
    raw_upstream: RawFactory, proxy_process: Callable[..., ProxyProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    tuned = await _download_faults(raw_upstream, proxy_process)
    # An explicit glibc setting switches our tuning off: the allocator then returns memory to the
    # kernel and faults fresh pages in for the reads.
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    default = await _download_faults(raw_upstream, proxy_process)
    print(f"\nminor page faults during a 256 MiB download: tuned {tuned}, trimming {default}")
    # 256 MiB in fresh 4 KiB pages would be 65,536. Since both legs read into one shared buffer
    # (proxy/http1/buffers.py) a download allocates nothing per read, so glibc's own trimming no
    # longer costs faults either: both stay low, and either figure rising means per-read allocation
    # came back.
    assert tuned < 2000, tuned
    assert default < 2000, default
