"""The control side never stalls the data plane (issue 12): a 50 MB config, a FIFO and a symlink to
/dev/zero in place of the config, and an admin slowloris. The real process throughout."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ProxyProcess, Upstream, config_text
from tests.test_e2e_rollback import status, wait_for

pytestmark = pytest.mark.timeout(120)

StartProcess = Callable[..., ProxyProcess]
StartUpstream = Callable[..., Awaitable[Upstream]]


async def serving(port: int, n: int = 20, budget: float = 1.0) -> None:
    """`n` sequential requests through the data port, each answered 200 within `budget` seconds."""
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            t0 = time.monotonic()
            async with session.get(f"http://127.0.0.1:{port}/", timeout=aiohttp.ClientTimeout(total=budget)) as r:
                assert r.status == 200
                await r.read()
            assert time.monotonic() - t0 < budget


def swap_in(config: Path, make: Callable[[Path], None]) -> None:
    """Replace the config file atomically by whatever `make(tmp)` creates (as editors and kubectl do)."""
    tmp = config.with_name(".swap")
    if tmp.exists() or tmp.is_symlink():
        tmp.unlink()
    make(tmp)
    os.replace(tmp, config)


async def last_error(pp: ProxyProcess, needle: str) -> str | None:
    err = (await status(pp.admin_port))["config"]["last_error"]
    return err if err and needle in err else None


async def test_big_fifo_and_dev_zero_configs_never_stall_serving_and_the_watch_survives(
    upstream_factory: StartUpstream, proxy_process: StartProcess
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    pp = proxy_process(config_text(stable.url, canary.url))
    good = pp.config.read_text()
    await serving(pp.port)

    # 50 MB: refused by size without being read whole (4 MiB cap), serving carries on.
    swap_in(pp.config, lambda p: p.write_bytes(good.encode() + b"#" * (50 * 1024 * 1024)))
    await serving(pp.port)
    await wait_for(lambda: last_error(pp, "too big"), 10, "the size refusal")

    # A FIFO: opening it must not block anything (nobody ever writes to it).
    swap_in(pp.config, lambda p: os.mkfifo(p))
    await serving(pp.port)
    await wait_for(lambda: last_error(pp, "FIFO"), 10, "the FIFO refusal")
    pp.proc.send_signal(signal.SIGHUP)
    await serving(pp.port)

    # A symlink to /dev/zero: never read (it would never end).
    swap_in(pp.config, lambda p: p.symlink_to("/dev/zero"))
    await serving(pp.port)
    await wait_for(lambda: last_error(pp, "device"), 10, "the device refusal")

    # The watch is alive: a later valid edit is picked up by itself.
    changed = good.replace("split: {stable: 100, canary: 0}", "split: {stable: 0, canary: 100}")
    assert changed != good
    swap_in(pp.config, lambda p: p.write_text(changed))

    async def reloaded() -> bool:
        doc = await status(pp.admin_port)
        return doc["config"]["last_error"] is None and any(
            u == "canary" and w == 100 for r in doc["routes"] for u, w in (r.get("weights") or {}).items()
        )

    await wait_for(reloaded, 10, "the reload of the valid edit")
    await serving(pp.port)
    assert not any("Traceback" in line for line in pp.lines), "".join(pp.lines)[-4000:]


async def _slow_client(port: int, held: list[asyncio.StreamWriter]) -> None:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    held.append(writer)
    try:
        writer.write(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
        await writer.drain()
    except OSError:
        pass


async def test_admin_slowloris_never_takes_the_data_port_down(
    upstream_factory: StartUpstream, proxy_process: StartProcess
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    extra = "admin_header_timeout: 2s\nadmin_max_connections: 50\n"
    pp = proxy_process(config_text(stable.url, canary.url, extra), prefix=("prlimit", "--nofile=1024:1024"))
    held: list[asyncio.StreamWriter] = []
    try:
        await asyncio.gather(*(_slow_client(pp.admin_port, held) for _ in range(1100)))
        assert len(held) > 1000
        # 60 requests on the data port, all answered promptly while the slowloris holds on.
        await serving(pp.port, n=60, budget=2.0)
        # The slow admin connections are cut after the header timeout: the admin API answers again.
        async def admin_ok() -> dict[str, object] | None:
            try:
                return await status(pp.admin_port)
            except (aiohttp.ClientError, OSError):
                return None

        await wait_for(admin_ok, 15, "the admin API after the slowloris")
        await serving(pp.port, n=10)
    finally:
        for w in held:
            w.close()
    assert not any("Traceback" in line for line in pp.lines), "".join(pp.lines)[-4000:]
