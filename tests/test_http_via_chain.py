"""Issue 15, item 5: two canary-proxies in a row with default configs (the README's edge in front of
a sidecar) work; a request that comes back to the same instance is still a loop (508). Real
processes, real sockets: the default pseudonym is per instance, the same in every worker and
after a restart."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

from conftest import RawClient, Upstream, config_text, free_port, wait_running

UpFactory = Callable[..., Awaitable[Upstream]]
PSEUDONYM = re.compile(rb"^1\.1 canary-proxy-[0-9a-f]{6}$")


def with_listen(text: str, port: int) -> str:
    return text.replace("listen: 127.0.0.1:0", f"listen: 127.0.0.1:{port}")


async def get(port: int, path: bytes = b"/") -> Any:
    client = await RawClient.connect(port)
    try:
        return await client.request(b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % path)
    finally:
        client.close()


async def test_two_default_proxies_in_a_row(upstream_factory: UpFactory, proxy_process: Any) -> None:
    up = await upstream_factory("stable")
    sidecar = proxy_process(config_text(up.url, up.url), name="sidecar.yaml")
    mid = f"http://127.0.0.1:{sidecar.port}"
    edge = proxy_process(config_text(mid, mid), name="edge.yaml")
    resp = await get(edge.port)
    assert resp.status == 200, resp.raw
    vias = resp.get("via")
    assert len(vias) == 2 and all(PSEUDONYM.match(v) for v in vias) and vias[0] != vias[1], vias
    seen = up.seen[0]["headers"].getall("Via")
    assert ", ".join(seen).split(", ") == [vias[1].decode(), vias[0].decode()]  # edge first, then sidecar


async def test_a_request_back_to_the_same_instance_is_a_loop(upstream_factory: UpFactory, proxy_process: Any) -> None:
    port = free_port()
    itself = f"http://127.0.0.1:{port}"
    proxy = proxy_process(with_listen(config_text(itself, itself, extra="retries: {attempts: 0}\n"), port))
    resp = await get(port)
    assert resp.status == 508, resp.raw
    assert proxy.proc.poll() is None


async def test_pseudonym_is_the_same_in_every_worker_and_after_a_restart(
    upstream_factory: UpFactory, proxy_process: Any
) -> None:
    up = await upstream_factory("stable")
    port = free_port()
    text = with_listen(config_text(up.url, up.url), port)
    first = proxy_process(text, args=("--workers", "2"))
    await asyncio.to_thread(wait_running, first)
    seen = {tuple((await get(port)).get("via")) for _ in range(20)}  # new connections: both workers
    assert len(seen) == 1 and PSEUDONYM.match(next(iter(seen))[0]), seen
    first.proc.terminate()
    await asyncio.to_thread(first.proc.wait, 20)
    again = proxy_process(text, name="again.yaml")
    assert again.proc.poll() is None
    assert tuple((await get(port)).get("via")) in seen
    other = proxy_process(config_text(up.url, up.url), name="other.yaml")  # another listen address
    assert tuple((await get(other.port)).get("via")) not in seen
