"""`canary-proxy demo`: two demo upstreams, the proxy on the shipped demo config, and traffic.

The story it tells, printed live: traffic splits per route, the rollout advances step by step
while the canary is healthy, then the demo canary starts failing and the proxy rolls it back on
its own. Everything runs in this one process and stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.resources
import logging
import random
import socket
import sys
import time
from collections import Counter
from typing import TextIO

import aiohttp
from aiohttp import web

from proxy.config import Config, parse_config
from proxy.config.model import Address, Endpoint, Upstream
from proxy.control.app import ProxyApp

USERS = 500
RATE = 200  # requests per second generated


def demo_config_text() -> str:
    """The shipped demo config (proxy/demo.yaml)."""
    return importlib.resources.files("proxy").joinpath("demo.yaml").read_text()


def _free_port(preferred: int) -> int:
    """`preferred` if it can be bound on 127.0.0.1, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            bound: int = s.getsockname()[1]
            return bound
    raise OSError("no free port")


class DemoUpstream:
    """A tiny HTTP service answering with its version; the canary can be told to fail."""

    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self.failure_rate = 0.0
        self.runner: web.AppRunner | None = None
        self.rng = random.Random(name)

    async def handle(self, request: web.Request) -> web.Response:
        if self.failure_rate and self.rng.random() < self.failure_rate:
            return web.Response(
                status=500,
                text=f"{self.name} {self.version}: simulated failure\n",
                headers={"X-Served-By": self.name},
            )
        await asyncio.sleep(0.002 if self.name == "stable" else 0.003)
        return web.Response(text=f"{self.name} {self.version}\n", headers={"X-Served-By": self.name})

    async def start(self, port: int) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def build_demo_config(port: int, admin_port: int, stable_port: int, canary_port: int) -> Config:
    """The demo config with the ports actually used on this machine."""
    cfg = parse_config(demo_config_text(), source="demo.yaml")
    ups = dict(cfg.upstreams)
    ports = {"stable": stable_port, "canary": canary_port}
    for name, up in ups.items():
        ups[name] = Upstream(name, (Endpoint("127.0.0.1", ports[name]),), up.version)
    access_log = dataclasses.replace(cfg.access_log, enabled=False)
    return dataclasses.replace(
        cfg,
        listen=Address("127.0.0.1", port),
        admin=Address("127.0.0.1", admin_port),
        upstreams=ups,
        access_log=access_log,
    )


class Traffic:
    """Open-loop-ish traffic: users with ids, a few beta testers and opt-in cookies."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.rng = random.Random(7)
        self.tick: Counter[tuple[str, str]] = Counter()  # (route-ish, served by) this second
        self.total: Counter[tuple[str, str]] = Counter()
        self.failed = 0

    async def one(self, session: aiohttp.ClientSession) -> None:
        r = self.rng.random()
        headers = {"x-user-id": f"user-{self.rng.randrange(USERS)}"}
        kind = "default"
        if r < 0.03:
            headers["x-canary"] = "always"
            kind = "header"
        elif r < 0.05:
            headers["cookie"] = "canary=always"
            kind = "cookie"
        try:
            async with session.get(self.url, headers=headers) as resp:
                await resp.read()
                served = resp.headers.get("X-Served-By", "?")
                if resp.status >= 500:
                    self.failed += 1
                    served = f"{served or '?'}!{resp.status}"
        except aiohttp.ClientError:
            self.failed += 1
            served = "error"
        self.tick[(kind, served)] += 1
        self.total[(kind, served)] += 1

    async def run(self, until: float) -> None:
        conn = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=conn) as session:
            pending: set[asyncio.Task[None]] = set()
            try:
                while time.monotonic() < until:
                    for _ in range(RATE // 20):
                        t = asyncio.create_task(self.one(session))
                        pending.add(t)
                        t.add_done_callback(pending.discard)
                    await asyncio.sleep(0.05)
                if pending:
                    await asyncio.wait(pending, timeout=5)
            finally:
                for t in pending:
                    t.cancel()


def _line(app: ProxyApp, traffic: Traffic, elapsed: float) -> str:
    """One live line: per route, who served this second's requests; weights; errors; phase."""
    tick = traffic.tick
    total = sum(tick.values())
    parts = []
    for kind in ("header", "cookie", "default"):
        stable = sum(n for (k, s), n in tick.items() if k == kind and s.startswith("stable"))
        canary = sum(n for (k, s), n in tick.items() if k == kind and s.startswith("canary"))
        parts.append(f"{kind} {stable:3d}s/{canary:3d}c")
    errors = sum(n for (_, s), n in tick.items() if "!" in s or s == "error")
    state = app.controller.state if app.controller else None
    phase = state.phase if state else "-"
    weights = ""
    if app.plane is not None:
        for _name, _to, split in app.plane.snapshot.effective:
            if split:
                weights = "/".join(f"{w:g}" for _n, w in split)
                break
    return (
        f"t={elapsed:4.0f}s {total:4d} req/s  " + "  ".join(parts)
        + f"  weights {weights}  5xx {errors:3d}  phase {phase}"
    )


async def run_demo(
    duration: float = 30.0, keep_running: bool = False, port: int = 8080, out: TextIO = sys.stdout
) -> int:
    """Run the demo; returns the exit code."""
    stable = DemoUpstream("stable", "v1.0.0")
    canary = DemoUpstream("canary", "v1.1.0")
    stable_port, canary_port = _free_port(9001), _free_port(9002)
    proxy_port = _free_port(port) if port else _free_port(0)
    admin_port = _free_port(9901)
    await stable.start(stable_port)
    await canary.start(canary_port)
    config = build_demo_config(proxy_port, admin_port, stable_port, canary_port)
    # The live lines below tell the story; the JSON event log would repeat it on stderr.
    logging.getLogger("canary_proxy.rollout").setLevel(logging.ERROR)
    app = ProxyApp(config, watch=False)
    await app.start()
    url = f"http://127.0.0.1:{proxy_port}/"

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    say(f"canary-proxy demo: proxy on {url}  admin on http://127.0.0.1:{admin_port}/ (status page)")
    say(f"  stable v1.0.0 on :{stable_port}, canary v1.1.0 on :{canary_port}")
    say("  routes: header x-canary: always -> canary; cookie canary=always -> canary;")
    say("          default: weighted split, sticky on x-user-id")
    say("  live lines: requests per route served by stable (s) / canary (c), default split weights stable/canary")
    rollout = config.rollout
    fail_at = duration * 0.55
    if rollout is not None:
        # Fail before the last step's interval runs out: later, the canary would be promoted first.
        fail_at = min(fail_at, rollout.interval * max(len(rollout.steps) - 1, 1) - 1.0)
        say(
            f"  rollout steps {', '.join(f'{w:g}%' for w in rollout.steps)} every {rollout.interval:g}s; "
            f"the canary starts failing at t={fail_at:.0f}s"
        )
    traffic = Traffic(url)
    start = time.monotonic()
    gen = asyncio.create_task(traffic.run(start + duration))
    seen = 0
    try:
        while not gen.done():
            await asyncio.sleep(1.0)
            elapsed = time.monotonic() - start
            if elapsed >= fail_at and not canary.failure_rate:
                canary.failure_rate = 0.5
                say(f"t={elapsed:4.0f}s  !! the demo canary starts failing half of its requests")
            say(_line(app, traffic, elapsed))
            traffic.tick.clear()
            if app.controller is not None:
                events = list(app.controller.events)
                for ev in events[seen:]:
                    say(f"t={elapsed:4.0f}s  >> {ev.kind}: {ev.message}")
                seen = len(events)
        await gen
        if app.controller is not None:  # events after the last live line
            for ev in list(app.controller.events)[seen:]:
                say(f"t={time.monotonic() - start:4.0f}s  >> {ev.kind}: {ev.message}")
        say("")
        say("summary (requests by route and by who served them):")
        for (kind, served), n in sorted(traffic.total.items()):
            say(f"  {kind:8s} -> {served:14s} {n:6d}")
        state = app.controller.state if app.controller else None
        if state is not None:
            say(f"rollout phase: {state.phase}" + (f" ({state.reason})" if state.reason else ""))
        say(f"failed requests seen by users: {traffic.failed}")
        if keep_running:
            say(f"still serving on {url} (Ctrl-C to stop); try: curl -H 'x-canary: always' {url}")
            app.install_signals()
            await app.stopping.wait()
    finally:
        gen.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gen
        await app.stop()
        await stable.stop()
        await canary.stop()
    return 0
