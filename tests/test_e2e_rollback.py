"""End to end: real upstreams, the real proxy (in this process or as `python -m proxy run`), real
traffic, and the admin API, proving the automatic rollback and the rollout commands.

Every wait polls a condition with a deadline; nothing relies on a bare sleep for correctness
(the one exception is the `--workers` test, whose "within 1 second" bound is the specification).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from support.polling import wait_for

from proxy.control.app import ProxyApp
from tests.conftest import ROOT, ProxyProcess, Upstream, config_text

pytestmark = pytest.mark.timeout(60)

SPLIT_ROUTES = (
    "  - name: beta\n    match: {headers: {x-canary: {exact: always}}}\n    to: canary\n"
    "  - name: default\n    split: {stable: 90, canary: 10}\n"
)


# -- helpers -----------------------------------------------------------------------------------------


class Switch:
    """A canary upstream's behaviour, flipped by the test while traffic runs."""

    def __init__(self) -> None:
        self.fail = False

    async def handler(self, request: web.Request) -> web.StreamResponse:
        if self.fail:
            return web.Response(status=500, text="canary broken\n", headers={"X-Upstream": "canary"})
        return web.Response(text="canary ok\n", headers={"X-Upstream": "canary"})


def _worker_up(line: str) -> bool:
    """A worker's start line: the leader's "listening on", a follower's "ready on"."""
    return "listening on" in line or "ready on" in line


async def admin(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """One admin API call; returns (status, decoded JSON or text)."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"http://127.0.0.1:{port}{path}", json=body) as resp,
    ):
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


async def status(port: int) -> dict[str, Any]:
    code, doc = await admin(port, "GET", "/status")
    assert code == 200, doc
    assert isinstance(doc, dict)
    return doc


async def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics parsed by prometheus_client: {(sample name, sorted labels): value}."""
    code, text = await admin(port, "GET", "/metrics")
    assert code == 200
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float | None:
    return m.get((name, tuple(sorted(labels.items()))))


async def phase_is(port: int, phase: str) -> dict[str, Any] | None:
    doc = await status(port)
    return doc if doc["rollout"]["phase"] == phase else None


async def get(session: aiohttp.ClientSession, port: int, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    """One GET through the proxy: (status, X-Upstream, X-Request-Id)."""
    async with session.get(f"http://127.0.0.1:{port}/", headers=headers or {}) as resp:
        await resp.read()
        return resp.status, resp.headers.get("X-Upstream", "?"), resp.headers.get("X-Request-Id", "")


async def burst(
    port: int, n: int, headers: dict[str, str] | None = None, close: bool = False
) -> list[tuple[int, str, str]]:
    """`n` sequential GETs (new connection each when `close`)."""
    conn = aiohttp.TCPConnector(force_close=close)
    async with aiohttp.ClientSession(connector=conn) as session:
        return [await get(session, port, headers) for _ in range(n)]


class Traffic:
    """Background user traffic at about `rate` req/s over keep-alive (users with x-user-id)."""

    def __init__(self, port: int, rate: int = 100) -> None:
        self.port = port
        self.rate = rate
        self.served: Counter[tuple[str, int]] = Counter()  # (X-Upstream, status)
        self.failures = 0  # connection-level failures
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random(1)

    async def _one(self, session: aiohttp.ClientSession) -> None:
        try:
            code, up, _ = await get(session, self.port, {"x-user-id": f"u{self._rng.randrange(1000)}"})
            self.served[(up, code)] += 1
        except aiohttp.ClientError:
            self.failures += 1

    async def _run(self) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:
            pending: set[asyncio.Task[None]] = set()
            try:
                while True:
                    for _ in range(max(self.rate // 20, 1)):
                        t = asyncio.create_task(self._one(session))
                        pending.add(t)
                        t.add_done_callback(pending.discard)
                    await asyncio.sleep(0.05)
            finally:
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)

    def count(self, upstream: str) -> int:
        return sum(n for (up, _), n in self.served.items() if up == upstream)

    async def __aenter__(self) -> Traffic:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def stop_process(pp: ProxyProcess, timeout: float = 15.0) -> int:
    """SIGTERM (graceful: `run --workers` forwards it to its workers) and wait for the exit code."""
    if pp.proc.poll() is None:
        pp.proc.send_signal(signal.SIGTERM)
    return await asyncio.to_thread(pp.proc.wait, timeout)


def rollout_yaml(
    state_file: Path | None = None,
    *,
    window: str = "5s",
    min_requests: int = 20,
    fast_fail: int = 0,
    steps: str = "",
    webhook: str = "",
    interval: str = "1s",
    thresholds: str = "",
) -> str:
    lines = [
        "rollout:",
        "  canary: canary",
        "  baseline: stable",
        f"  interval: {interval}",
        f"  window: {window}",
        f"  min_requests: {min_requests}",
        f"  fast_fail: {{consecutive_errors: {fast_fail}}}",
    ]
    if steps:
        lines.append(f"  steps: {steps}")
    if state_file is not None:
        lines.append(f"  state_file: {state_file}")
    if webhook:
        lines.append(f"  webhook: {webhook}")
    if thresholds:
        lines.append(f"  thresholds: {thresholds}")
    return "\n".join(lines) + "\nshutdown_grace: 2s\n"


def ports(app: ProxyApp) -> tuple[int, int]:
    assert app.plane is not None and app.admin is not None
    return app.plane.bound_port, app.admin.bound_port


# -- automatic rollback, latched across restarts, reset by the CLI -------------------------------------


async def test_failing_canary_is_rolled_back_latched_across_restart_and_reset_by_cli(
    upstream_factory: Callable[..., Awaitable[Upstream]],
    proxy_process: Callable[..., ProxyProcess],
    tmp_path: Path,
) -> None:
    stable = await upstream_factory("stable")
    switch = Switch()
    canary = await upstream_factory("canary", handler=switch.handler)
    state_file = tmp_path / "state" / "rollout.json"
    text = config_text(stable.url, canary.url, rollout_yaml(state_file), routes=SPLIT_ROUTES)
    pp = proxy_process(text)

    # Healthy traffic first: both sides get requests, nothing trips.
    async with Traffic(pp.port, rate=100) as traffic:
        await wait_for(
            lambda: _true(traffic.count("canary") >= 30 and traffic.count("stable") >= 100),
            10,
            "traffic on both upstreams",
        )
        doc = await status(pp.admin_port)
        assert doc["rollout"]["phase"] == "steady"
        # The canary goes bad mid-run.
        switch.fail = True
        flipped = time.time()
        doc = await wait_for(lambda: phase_is(pp.admin_port, "rolled_back"), 10, "the automatic rollback")
    assert traffic.failures == 0

    # /status: phase, reason, effective weights.
    ro = doc["rollout"]
    assert ro["reason"] and "error" in ro["reason"], ro
    assert ro["canary_weight"] == 0
    routes = {r["name"]: r for r in doc["routes"]}
    assert routes["default"]["weights"]["canary"] == 0
    assert routes["default"]["weights"]["stable"] == 100
    assert routes["beta"]["effective_to"] == "stable"

    # /metrics says the same.
    m = await metrics(pp.admin_port)
    assert sample(m, "canary_proxy_upstream_weight", route="default", upstream="canary") == 0
    assert sample(m, "canary_proxy_upstream_weight", route="default", upstream="stable") == 100
    assert sample(m, "canary_proxy_rollbacks_total", upstream="canary") == 1
    assert sample(m, "canary_proxy_rollout_phase", rollout="default", phase="rolled_back") == 1
    assert sample(m, "canary_proxy_rollout_phase", rollout="default", phase="steady") == 0

    # No user request reaches the canary any more, header-routed ones included.
    switch.fail = False  # so that a leak would show up as a 200 from the canary, not only a 500
    seen = len(canary.seen)
    results = await burst(pp.port, 50, {"x-user-id": "u1"}) + await burst(pp.port, 50, {"x-canary": "always"})
    assert {(code, up) for code, up, _ in results} == {(200, "stable")}
    assert len(canary.seen) == seen

    # The rollback is one JSON line in the log, with the reason and the figures.
    def rollback_lines() -> list[dict[str, Any]]:
        found = []
        for line in list(pp.lines):
            if '"rollback"' in line and "{" in line:
                doc = json.loads(line[line.index("{") :])
                if doc.get("event") == "rollback":
                    found.append(doc)
        return found

    events = await wait_for(lambda: _true(rollback_lines()), 5, "the rollback log line")
    assert len(events) == 1, events
    event = events[0]
    assert event["logger"] == "canary_proxy.rollout"
    assert event["data"]["canary"] == "canary" and event["data"]["baseline"] == "stable"
    assert event["data"]["reason"] == ro["reason"]
    assert event["data"]["canary_errors"] > 0
    assert flipped - 1 <= event["at"] <= time.time()

    # The latch is on disk and survives a restart.
    assert json.loads(state_file.read_text())["phase"] == "rolled_back"
    assert await stop_process(pp) == 0
    pp = proxy_process(text)
    doc = await status(pp.admin_port)
    assert doc["rollout"]["phase"] == "rolled_back"
    assert doc["rollout"]["reason"] == ro["reason"]
    m = await metrics(pp.admin_port)
    assert sample(m, "canary_proxy_upstream_weight", route="default", upstream="canary") == 0
    assert sample(m, "canary_proxy_rollout_phase", rollout="default", phase="rolled_back") == 1
    seen = len(canary.seen)
    results = await burst(pp.port, 30, {"x-user-id": "u1"}) + await burst(pp.port, 30, {"x-canary": "always"})
    assert {up for _, up, _ in results} == {"stable"}
    assert len(canary.seen) == seen

    # `canary-proxy reset` (the CLI verb, against the admin API) brings the canary back.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "reset", "--admin", f"http://127.0.0.1:{pp.admin_port}",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, out
    doc = await status(pp.admin_port)
    assert doc["rollout"]["phase"] == "steady"
    assert doc["rollout"]["reason"] is None
    routes = {r["name"]: r for r in doc["routes"]}
    assert routes["default"]["weights"] == {"stable": 90, "canary": 10}
    assert routes["beta"]["effective_to"] == "canary"
    assert json.loads(state_file.read_text())["phase"] == "steady"
    results = await burst(pp.port, 5, {"x-canary": "always"})
    assert {(code, up) for code, up, _ in results} == {(200, "canary")}
    assert await stop_process(pp) == 0


async def _true(value: Any) -> Any:
    return value


async def test_new_canary_version_clears_the_latch_on_restart(
    upstream_factory: Callable[..., Awaitable[Upstream]],
    proxy_process: Callable[..., ProxyProcess],
    tmp_path: Path,
) -> None:
    stable = await upstream_factory("stable")
    canary = await upstream_factory("canary")
    state_file = tmp_path / "rollout.json"
    text = config_text(stable.url, canary.url, rollout_yaml(state_file), routes=SPLIT_ROUTES)
    pp = proxy_process(text)
    code, body = await admin(pp.admin_port, "POST", "/rollout/rollback", {"reason": "bad build"})
    assert code == 200, body
    assert body["phase"] == "rolled_back"
    assert await stop_process(pp) == 0

    # Same version: still latched.
    pp = proxy_process(text)
    assert (await status(pp.admin_port))["rollout"]["phase"] == "rolled_back"
    assert await stop_process(pp) == 0

    # A new canary version: the rollout starts afresh and the canary gets its share again.
    text_v3 = text.replace(
        f"canary: {{endpoints: [{canary.url}], version: v2}}", f"canary: {{endpoints: [{canary.url}], version: v3}}"
    )
    assert text_v3 != text
    pp = proxy_process(text_v3)
    doc = await status(pp.admin_port)
    assert doc["rollout"]["phase"] == "steady"
    assert doc["rollout"]["canary_version"] == "v3"
    routes = {r["name"]: r for r in doc["routes"]}
    assert routes["default"]["weights"]["canary"] == 10
    assert any(e["kind"] == "reset" and "v3" in e["message"] for e in doc["events"]), doc["events"]
    results = await burst(pp.port, 3, {"x-canary": "always"})
    assert {up for _, up, _ in results} == {"canary"}
    assert json.loads(state_file.read_text())["canary_version"] == "v3"
    assert await stop_process(pp) == 0


# -- steps and the operator commands over the admin API ----------------------------------------------


async def test_steps_advance_while_healthy_until_promoted(
    upstream_factory: Callable[..., Awaitable[Upstream]],
    proxy_factory: Callable[..., Awaitable[ProxyApp]],
) -> None:
    stable = await upstream_factory("stable")
    canary = await upstream_factory("canary")
    extra = rollout_yaml(steps="[10, 50, 100]", window="5s", min_requests=20, interval="1s")
    app = await proxy_factory(config_text(stable.url, canary.url, extra, routes=SPLIT_ROUTES))
    port, admin_port = ports(app)
    doc = await status(admin_port)
    assert doc["rollout"]["phase"] == "progressing"
    assert doc["rollout"]["canary_weight"] == 10
    # Without traffic there is no data: the step holds however long we wait for verdicts.
    idle_after = time.time() + 1.0
    await wait_for(lambda: _verdict_after(admin_port, idle_after, "insufficient_data"), 5, "an idle verdict")
    assert (await status(admin_port))["rollout"]["step"] == 0

    async with Traffic(port, rate=150) as traffic:
        doc = await wait_for(lambda: phase_is(admin_port, "promoted"), 20, "the promotion")
    assert traffic.count("canary") > 0 and traffic.failures == 0
    kinds = [(e["kind"], e["data"].get("from"), e["data"].get("to")) for e in doc["events"]]
    assert kinds == [("step", 10, 50), ("promoted", 50, 100.0)], kinds
    assert doc["rollout"]["canary_weight"] == 100
    m = await metrics(admin_port)
    assert sample(m, "canary_proxy_upstream_weight", route="default", upstream="canary") == 100
    assert sample(m, "canary_proxy_upstream_weight", route="default", upstream="stable") == 0
    assert sample(m, "canary_proxy_rollout_phase", rollout="default", phase="promoted") == 1
    results = await burst(port, 20, {"x-user-id": "u7"})
    assert {up for _, up, _ in results} == {"canary"}


async def _verdict_after(admin_port: int, after: float, kind: str) -> dict[str, Any] | None:
    doc = await status(admin_port)
    last = doc["rollout"]["last_verdict"]
    if last is not None and last["at"] is not None and last["at"] >= after and last["result"] == kind:
        return doc
    return None


async def test_pause_freezes_promote_jumps_rollback_trips(
    upstream_factory: Callable[..., Awaitable[Upstream]],
    proxy_factory: Callable[..., Awaitable[ProxyApp]],
) -> None:
    stable = await upstream_factory("stable")
    canary = await upstream_factory("canary")
    extra = rollout_yaml(steps="[10, 50, 100]", window="5s", min_requests=20, interval="1s")
    app = await proxy_factory(config_text(stable.url, canary.url, extra, routes=SPLIT_ROUTES))
    port, admin_port = ports(app)

    code, body = await admin(admin_port, "POST", "/rollout/pause", {"reason": "looking"})
    assert code == 200, body
    assert body["phase"] == "paused"
    paused_at = time.time()
    async with Traffic(port, rate=150):
        # Three healthy verdicts with enough data, each a full interval apart: unpaused, the rollout
        # would have been promoted by now.
        await wait_for(
            lambda: _verdict_after(admin_port, paused_at + 3.0, "healthy"), 15, "healthy verdicts while paused"
        )
        doc = await status(admin_port)
        assert doc["rollout"]["phase"] == "paused"
        assert doc["rollout"]["step"] == 0
        assert doc["rollout"]["canary_weight"] == 10
        assert [e["kind"] for e in doc["events"]] == ["paused"]

        code, body = await admin(admin_port, "POST", "/rollout/promote?full=1")
        assert code == 200, body
        assert body["phase"] == "promoted" and body["canary_weight"] == 100
        m = await metrics(admin_port)
        assert sample(m, "canary_proxy_upstream_weight", route="default", upstream="canary") == 100
        assert {up for _, up, _ in await burst(port, 10)} == {"canary"}

        code, body = await admin(admin_port, "POST", "/rollout/rollback", {"reason": "by hand"})
        assert code == 200, body
        assert body["phase"] == "rolled_back" and body["canary_weight"] == 0
        assert body["reason"] == "manual rollback: by hand"
        assert {up for _, up, _ in await burst(port, 10, {"x-canary": "always"})} == {"stable"}
        # Latched: neither analysis nor other commands bring it back; only reset does.
        code, body = await admin(admin_port, "POST", "/rollout/resume")
        assert code == 409, body
    m = await metrics(admin_port)
    assert sample(m, "canary_proxy_upstream_weight", route="default", upstream="canary") == 0
    assert sample(m, "canary_proxy_rollbacks_total", upstream="canary") == 1
    assert sample(m, "canary_proxy_rollout_phase", rollout="default", phase="rolled_back") == 1
    doc = await status(admin_port)
    assert [e["kind"] for e in doc["events"]] == ["paused", "promoted", "rollback"]


# -- min_requests and fast_fail ----------------------------------------------------------------------


async def test_below_min_requests_a_healthy_canary_holds_and_a_failing_one_trips(
    upstream_factory: Callable[..., Awaitable[Upstream]],
    proxy_factory: Callable[..., Awaitable[ProxyApp]],
) -> None:
    """min_requests guards passing, not failing: a few proven failures trip without fast_fail."""
    stable = await upstream_factory("stable")
    switch = Switch()
    canary = await upstream_factory("canary", handler=switch.handler)
    extra = rollout_yaml(window="60s", min_requests=20, fast_fail=0)
    app = await proxy_factory(config_text(stable.url, canary.url, extra))  # default: stable 100, beta -> canary
    port, admin_port = ports(app)

    assert {up for _, up, _ in await burst(port, 40)} == {"stable"}
    results = await burst(port, 10, {"x-canary": "always"})
    assert {(code, up) for code, up, _ in results} == {(200, "canary")}
    done = time.time()
    # Healthy but below min_requests: verdicts hold ("insufficient data"), nothing trips.
    doc = await wait_for(
        lambda: _verdict_after(admin_port, done + 1.0, "insufficient_data"), 5, "verdicts after the requests"
    )
    assert doc["upstreams"]["canary"]["window"]["requests"] == 10
    assert doc["rollout"]["phase"] == "steady"
    assert "need 20" in doc["rollout"]["last_verdict"]["reason"]

    # Now every canary request fails: well below min_requests, the test proves it within a few.
    switch.fail = True
    failed = 0
    deadline = time.monotonic() + 15
    while (await status(admin_port))["rollout"]["phase"] != "rolled_back":
        assert time.monotonic() < deadline, "no rollback"
        code, up, _ = (await burst(port, 1, {"x-canary": "always"}))[0]
        failed += (code, up) == (500, "canary")
        await asyncio.sleep(0.2)
    assert failed <= 8
    doc = await status(admin_port)
    assert "consecutive" not in doc["rollout"]["reason"]
    assert "canary error rate" in doc["rollout"]["reason"]


async def test_fast_fail_trips_at_once_on_consecutive_errors(
    upstream_factory: Callable[..., Awaitable[Upstream]],
    proxy_factory: Callable[..., Awaitable[ProxyApp]],
) -> None:
    stable = await upstream_factory("stable")
    switch = Switch()
    canary = await upstream_factory("canary", handler=switch.handler)
    # Thresholds off: only fast_fail can trip.
    off = "{max_error_rate: null, max_error_rate_increase: null, max_p99_ratio: null}"
    extra = rollout_yaml(window="60s", min_requests=1000, fast_fail=5, thresholds=off)
    app = await proxy_factory(config_text(stable.url, canary.url, extra))
    port, admin_port = ports(app)
    canary_hdr = {"x-canary": "always"}

    switch.fail = True
    assert [c for c, _, _ in await burst(port, 4, canary_hdr)] == [500] * 4
    switch.fail = False
    assert [c for c, _, _ in await burst(port, 1, canary_hdr)] == [200]  # breaks the run
    switch.fail = True
    assert [c for c, _, _ in await burst(port, 4, canary_hdr)] == [500] * 4
    done = time.time()
    # 8 errors in all, never 5 in a row: a tick later, still steady.
    await wait_for(lambda: _verdict_after(admin_port, done, "insufficient_data"), 5, "a verdict")
    assert (await status(admin_port))["rollout"]["phase"] == "steady"

    # The fifth in a row trips at once, without waiting for the window.
    assert [c for c, _, _ in await burst(port, 1, canary_hdr)] == [500]
    doc = await wait_for(lambda: phase_is(admin_port, "rolled_back"), 2, "the fast-fail rollback", every=0.01)
    assert doc["rollout"]["reason"] == "fast fail: 5 consecutive errors from canary"
    assert {up for _, up, _ in await burst(port, 5, canary_hdr)} == {"stable"}


# -- webhook -----------------------------------------------------------------------------------------


async def test_webhook_gets_the_rollback_as_json_and_is_retried(
    upstream_factory: Callable[..., Awaitable[Upstream]],
    proxy_factory: Callable[..., Awaitable[ProxyApp]],
) -> None:
    calls: list[tuple[str, Any]] = []  # (content type, JSON body) of every POST

    async def hook(request: web.Request) -> web.StreamResponse:
        calls.append((request.content_type, await request.json() if request.method == "POST" else None))
        return web.Response(status=500 if len(calls) == 1 else 204)  # the first attempt fails

    receiver = await upstream_factory("hook", handler=hook)
    stable = await upstream_factory("stable")
    switch = Switch()
    switch.fail = True
    canary = await upstream_factory("canary", handler=switch.handler)
    extra = rollout_yaml(window="60s", min_requests=1000, fast_fail=3, webhook=f"{receiver.url}/hook")
    app = await proxy_factory(config_text(stable.url, canary.url, extra))
    port, admin_port = ports(app)

    await burst(port, 3, {"x-canary": "always"})
    await wait_for(lambda: _true(len(calls) >= 2), 10, "the webhook retry")
    assert [(s["method"], s["path"]) for s in receiver.seen] == [("POST", "/hook")] * 2
    (ctype1, first), (ctype2, second) = calls
    assert ctype1 == ctype2 == "application/json"
    assert first == second  # the same event, retried
    assert second["event"] == "rollback"
    assert second["canary"] == "canary" and second["baseline"] == "stable"
    assert second["phase"] == "rolled_back" and second["weight"] == 0
    assert second["data"]["reason"] == "fast fail: 3 consecutive errors from canary"
    assert (await status(admin_port))["rollout"]["phase"] == "rolled_back"


# -- run --workers 2 -----------------------------------------------------------------------------------


async def test_workers_share_metrics_and_follow_a_rollback(
    upstream_factory: Callable[..., Awaitable[Upstream]],
    proxy_process: Callable[..., ProxyProcess],
    tmp_path: Path,
) -> None:
    stable = await upstream_factory("stable")
    canary = await upstream_factory("canary")
    routes = (
        "  - name: beta\n    match: {headers: {x-canary: {exact: always}}}\n    to: canary\n"
        "  - name: default\n    split: {stable: 50, canary: 50}\n"
    )
    extra = rollout_yaml(tmp_path / "state.json", window="60s", min_requests=100, fast_fail=0)
    pp = proxy_process(config_text(stable.url, canary.url, extra, routes=routes), args=("--workers", "2"))
    try:
        await wait_for(lambda: _true(sum(_worker_up(line) for line in list(pp.lines)) >= 2), 15, "both workers")
        # New connections each: SO_REUSEPORT spreads them over both workers.
        results = await burst(pp.port, 200, close=True)
        assert all(code == 200 for code, _, _ in results)
        # X-Request-Id is "<per-process prefix>-<counter>": two prefixes, two workers served.
        prefixes = Counter(rid.split("-")[0] for _, _, rid in results)
        assert len(prefixes) == 2, prefixes

        async def total() -> float | None:
            m = await metrics(pp.admin_port)
            n = sum(v for (name, _), v in m.items() if name == "canary_proxy_requests_total")
            return n if n >= 200 else None

        assert await wait_for(total, 3, "/metrics adding up both workers") == 200

        code, body = await admin(pp.admin_port, "POST", "/rollout/rollback")
        assert code == 200, body
        # The bound is the spec: every worker applies the leader's state within one second.
        await asyncio.sleep(1.0)
        results = await burst(pp.port, 50, close=True) + await burst(pp.port, 50, {"x-canary": "always"}, close=True)
        assert len({rid.split("-")[0] for _, _, rid in results}) == 2
        assert Counter(up for _, up, _ in results) == {"stable": 100}
    finally:
        assert await stop_process(pp) == 0


async def test_workers_reset_starts_the_fast_fail_count_afresh(
    upstream_factory: Callable[..., Awaitable[Upstream]],
    proxy_process: Callable[..., ProxyProcess],
) -> None:
    stable = await upstream_factory("stable")
    switch = Switch()
    switch.fail = True
    canary = await upstream_factory("canary", handler=switch.handler)
    # Thresholds off: only fast_fail can trip (a few proven failures would trip the verdict).
    off = "{max_error_rate: null, max_error_rate_increase: null, max_p99_ratio: null}"
    extra = rollout_yaml(window="60s", min_requests=1000, fast_fail=20, thresholds=off)
    pp = proxy_process(config_text(stable.url, canary.url, extra), args=("--workers", "2"))
    canary_hdr = {"x-canary": "always"}
    try:
        await wait_for(lambda: _true(sum(_worker_up(line) for line in list(pp.lines)) >= 2), 15, "both workers")
        # Failing requests on new connections until the fast-fail rollback: both workers count far
        # more than 20 errors in a row before the rollback reaches them.
        await burst(pp.port, 100, canary_hdr, close=True)
        await wait_for(lambda: phase_is(pp.admin_port, "rolled_back"), 5, "the fast-fail rollback")
        code, body = await admin(pp.admin_port, "POST", "/rollout/reset")
        assert code == 200 and body["phase"] == "steady", body
        await asyncio.sleep(1.0)  # every follower adopts the reset (they sync every 0.5 s)

        # After a reset the count starts afresh: fewer than 20 errors on each worker never trip.
        # Send one at a time until both workers (X-Request-Id prefixes) got some, at most 19 each.
        per_worker: Counter[str] = Counter()
        while len(per_worker) < 2 and max(per_worker.values(), default=0) < 19:
            ((_code, _up, rid),) = await burst(pp.port, 1, canary_hdr, close=True)
            per_worker[rid.split("-")[0]] += 1
        await asyncio.sleep(1.0)  # a follower's trip request would have reached the leader by now
        doc = await status(pp.admin_port)
        assert doc["rollout"]["phase"] == "steady", (doc["rollout"]["reason"], per_worker)
    finally:
        assert await stop_process(pp) == 0
