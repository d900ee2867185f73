"""Issue 17 end to end: the real proxy with real upstreams, real traffic and the admin API.

Two rollouts in one proxy stepping and rolling back independently; pause steps (timed and until
promote, `promote` and `--full`); a gate that says no then yes; a breach while a gate hangs; the
progress deadline; observe mode; the analysis on /metrics against /status and `promtool`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.cli.admin import format_status
from proxy.cli.main import main
from proxy.control.app import ProxyApp
from tests.conftest import ProxyProcess, Upstream, free_port
from tests.test_e2e_rollback import Switch, _true, _worker_up, admin, metrics, sample, status, stop_process, wait_for

pytestmark = pytest.mark.timeout(90)

UpstreamFactory = Callable[..., Awaitable[Upstream]]
ProxyFactory = Callable[..., Awaitable[ProxyApp]]


class Load:
    """Background traffic to a few paths at about `rate` req/s each; counts (path, upstream)."""

    def __init__(self, port: int, paths: tuple[str, ...] = ("/",), rate: int = 150) -> None:
        self.port = port
        self.paths = paths
        self.rate = rate
        self.served: Counter[tuple[str, str]] = Counter()
        self._task: asyncio.Task[None] | None = None

    async def _one(self, session: aiohttp.ClientSession, path: str) -> None:
        try:
            async with session.get(f"http://127.0.0.1:{self.port}{path}") as resp:
                await resp.read()
                self.served[(path, resp.headers.get("X-Upstream", "?"))] += 1
        except aiohttp.ClientError:
            pass

    async def _run(self) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:
            pending: set[asyncio.Task[None]] = set()
            try:
                while True:
                    for path in self.paths:
                        for _ in range(max(self.rate // 20, 1)):
                            t = asyncio.create_task(self._one(session, path))
                            pending.add(t)
                            t.add_done_callback(pending.discard)
                    await asyncio.sleep(0.05)
            finally:
                for t in pending:
                    t.cancel()

    async def __aenter__(self) -> Load:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def switchable(factory: UpstreamFactory, name: str) -> tuple[Upstream, Switch]:
    switch = Switch()

    async def handler(request: web.Request) -> web.StreamResponse:
        if switch.fail:
            return web.Response(status=500, text="broken\n", headers={"X-Upstream": name})
        return web.Response(text=f"{name} ok\n", headers={"X-Upstream": name})

    return await factory(name, handler=handler), switch


def ports(app: ProxyApp) -> tuple[int, int]:
    assert app.plane is not None and app.admin is not None
    return app.plane.bound_port, app.admin.bound_port


def one_rollout_config(stable: str, canary: str, rollout: str, split: str = "{stable: 100, canary: 0}") -> str:
    return (
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\naccess_log: false\n"
        f"upstreams:\n  stable: {{endpoints: [{stable}], version: v1}}\n"
        f"  canary: {{endpoints: [{canary}], version: v2}}\n"
        f"routes:\n  - name: default\n    split: {split}\n"
        f"rollout:\n{rollout}"
    )


async def rollout_doc(port: int, name: str) -> dict[str, Any]:
    doc = await status(port)
    found = [r for r in doc["rollouts"] if r["name"] == name]
    assert found, doc["rollouts"]
    return found[0]


async def until(port: int, name: str, what: str, ok: Callable[[dict[str, Any]], bool], timeout: float = 20) -> Any:
    async def check() -> dict[str, Any] | None:
        ro = await rollout_doc(port, name)
        return ro if ok(ro) else None

    return await wait_for(check, timeout, what)


async def ticks(port: int, name: str, n: int) -> None:
    """Wait until the rollout has been evaluated `n` more times (its last evaluation moves on)."""
    for _ in range(n):
        before = (await rollout_doc(port, name))["analysis"]
        at: float = before["at"] if before else 0.0

        def later(ro: dict[str, Any], at: float = at) -> bool:
            return bool(ro["analysis"]) and ro["analysis"]["at"] > at

        await until(port, name, "the next evaluation", later)


# -- two rollouts --------------------------------------------------------------------------------------


async def test_two_rollouts_step_and_roll_back_independently(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    a1 = await upstream_factory("a1")
    a2, a2_switch = await switchable(upstream_factory, "a2")
    b1 = await upstream_factory("b1")
    b2, _ = await switchable(upstream_factory, "b2")
    text = f"""
listen: 127.0.0.1:0
admin: 127.0.0.1:0
access_log: false
upstreams:
  a1: {{endpoints: [{a1.url}], version: v1}}
  a2: {{endpoints: [{a2.url}], version: v2}}
  b1: {{endpoints: [{b1.url}], version: v1}}
  b2: {{endpoints: [{b2.url}], version: v2}}
routes:
  - {{name: web, match: {{path_prefix: /web}}, split: {{a1: 100, a2: 0}}}}
  - {{name: api, split: {{b1: 100, b2: 0}}}}
rollouts:
  - name: web
    canary: a2
    baseline: a1
    steps: [20, 40, 60, 100]
    interval: 1s
    window: 4s
    min_requests: 15
    fast_fail: {{consecutive_errors: 0}}
    state_file: {tmp_path / "web.json"}
  - name: api
    canary: b2
    baseline: b1
    steps: [20, 30, 40, 50, 100]
    interval: 1s
    window: 4s
    min_requests: 15
    fast_fail: {{consecutive_errors: 0}}
    state_file: {tmp_path / "api.json"}
"""
    app = await proxy_factory(text)
    port, admin_port = ports(app)
    # With two rollouts the unnamed API is ambiguous; an unknown name is a 404.
    code, body = await admin(admin_port, "POST", "/rollout/pause")
    assert code == 409 and "several rollouts (web, api)" in body["error"], body
    code, body = await admin(admin_port, "POST", "/rollouts/nope/pause")
    assert code == 404 and "known: web, api" in body["error"], body

    async with Load(port, ("/web", "/api"), rate=160):
        await until(admin_port, "web", "web at step 2", lambda ro: ro["step"] >= 1)
        await until(admin_port, "api", "api at step 2", lambda ro: ro["step"] >= 1)
        a2_switch.fail = True
        web_ro = await until(admin_port, "web", "web rolled back", lambda ro: ro["phase"] == "rolled_back")
        assert "error rate" in web_ro["reason"]
        api_ro = await rollout_doc(admin_port, "api")
        assert api_ro["phase"] in ("progressing", "promoted"), api_ro
        await until(admin_port, "api", "api promoted", lambda ro: ro["phase"] == "promoted")

    doc = await status(admin_port)
    by_name = {r["name"]: r for r in doc["rollouts"]}
    assert by_name["web"]["canary_weight"] == 0 and by_name["api"]["canary_weight"] == 100
    kinds = [(e["data"].get("rollout") or e.get("rollout"), e["kind"]) for e in doc["events"]]
    assert ("web", "rollback") in [(r, k) for r, k in kinds] or any(
        e["kind"] == "rollback" and "a2" in e["message"] for e in doc["events"]
    )
    assert json.loads((tmp_path / "web.json").read_text())["phase"] == "rolled_back"
    assert json.loads((tmp_path / "api.json").read_text())["phase"] == "promoted"
    m = await metrics(admin_port)
    assert sample(m, "canary_proxy_rollout_phase", rollout="web", phase="rolled_back") == 1
    assert sample(m, "canary_proxy_rollout_phase", rollout="api", phase="promoted") == 1
    assert sample(m, "canary_proxy_rollout_step", rollout="api", upstream="b2") == 5
    assert sample(m, "canary_proxy_rollbacks_total", upstream="a2") == 1
    assert sample(m, "canary_proxy_rollbacks_total", upstream="b2") == 0
    text_out = format_status(doc, ascii_only=True)
    assert "web: a2 vs baseline a1" in text_out and "api: b2 vs baseline b1" in text_out

    # Commands by name act on that rollout only.
    code, body = await admin(admin_port, "POST", "/rollouts/web/reset", {"reason": "fixed"})
    assert code == 200 and body["name"] == "web" and body["phase"] == "progressing", body
    assert (await rollout_doc(admin_port, "api"))["phase"] == "promoted"


# -- pause steps ----------------------------------------------------------------------------------------


async def test_pause_steps_timed_and_until_promote(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory
) -> None:
    stable = await upstream_factory("stable")
    canary = await upstream_factory("canary")
    rollout = (
        "  canary: canary\n  baseline: stable\n  interval: 1s\n  window: 4s\n  min_requests: 10\n"
        "  steps: [20, {pause: 2s}, {pause: {}}, 40, 60]\n"
    )
    app = await proxy_factory(one_rollout_config(stable.url, canary.url, rollout))
    port, admin_port = ports(app)
    async with Load(port, rate=100):
        ro = await until(admin_port, "default", "the timed pause", lambda ro: ro["step"] == 1)
        assert ro["step_kind"] == "pause" and ro["canary_weight"] == 20
        entered = time.time()
        ro = await until(admin_port, "default", "the indefinite pause", lambda ro: ro["step"] == 2)
        assert time.time() - entered >= 1.5  # the timed pause took its time
        assert ro["step_kind"] == "pause"
        await ticks(admin_port, "default", 3)  # healthy ticks do not end `pause: {}`
        ro = await rollout_doc(admin_port, "default")
        assert ro["step"] == 2 and ro["phase"] == "progressing" and ro["last_verdict"]["result"] == "healthy"

        code, body = await admin(admin_port, "POST", "/rollouts/default/promote", {"reason": "ok by me"})
        assert code == 200 and body["step"] == 3 and body["canary_weight"] == 40, body
        code, body = await admin(admin_port, "POST", "/rollout/promote?full=1")
        assert code == 200 and body["phase"] == "promoted" and body["canary_weight"] == 100, body
    events = [e for e in (await status(admin_port))["events"] if e["kind"] in ("step", "promoted")]
    assert [e["data"]["to"] for e in events] == [20, 20, 40, 100]
    assert events[2]["data"]["by"] == "operator: ok by me"


async def test_cli_promote_one_step_then_full(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory
) -> None:
    stable = await upstream_factory("stable")
    canary = await upstream_factory("canary")
    rollout = "  name: shop\n  canary: canary\n  baseline: stable\n  steps: [{pause: {}}, 30, {pause: {}}, 60]\n"
    app = await proxy_factory(one_rollout_config(stable.url, canary.url, rollout))
    _, admin_port = ports(app)
    url = f"http://127.0.0.1:{admin_port}"
    assert await asyncio.to_thread(main, ["promote", "shop", "--admin", url]) == 0
    assert (await rollout_doc(admin_port, "shop"))["step"] == 1
    assert await asyncio.to_thread(main, ["promote", "--admin", url, "--full"]) == 0
    ro = await rollout_doc(admin_port, "shop")
    assert ro["phase"] == "promoted" and ro["canary_weight"] == 100


# -- gates ------------------------------------------------------------------------------------------------


class GateServer:
    """A gate webhook: answers `code` (or hangs), records each ask."""

    def __init__(self) -> None:
        self.code = 503
        self.hang = False
        self.asks: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.asks.append(await request.json())
        if self.hang:
            await asyncio.sleep(60)
        return web.Response(status=self.code, text="gate\n")

    async def __aenter__(self) -> GateServer:
        app = web.Application()
        app.router.add_post("/gate", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/gate"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def test_gate_says_no_then_yes(upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory) -> None:
    stable = await upstream_factory("stable")
    canary = await upstream_factory("canary")
    async with GateServer() as gate:
        rollout = (
            "  canary: canary\n  baseline: stable\n  interval: 1s\n  window: 4s\n  min_requests: 10\n"
            f"  steps: [20, {{gate: {{webhook: '{gate.url}', timeout: 1s}}}}, 50, 80]\n"
        )
        app = await proxy_factory(one_rollout_config(stable.url, canary.url, rollout))
        port, admin_port = ports(app)
        async with Load(port, rate=100):
            await until(admin_port, "default", "the gate step", lambda ro: ro["step"] == 1)
            await wait_for(lambda: _true(len(gate.asks) >= 3), 10, "the gate asked again every interval")
            ro = await rollout_doc(admin_port, "default")
            assert ro["step"] == 1 and ro["gate"]["open"] is False and ro["gate"]["answer"] == "HTTP 503", ro
            assert gate.asks[0]["rollout"] == "default" and gate.asks[0]["step"] == 1
            gate.code = 200
            await until(admin_port, "default", "past the gate", lambda ro: ro["step"] >= 2)


async def test_a_breach_rolls_back_while_the_gate_hangs(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory
) -> None:
    stable = await upstream_factory("stable")
    canary, switch = await switchable(upstream_factory, "canary")
    async with GateServer() as gate:
        gate.hang = True
        rollout = (
            "  canary: canary\n  baseline: stable\n  interval: 1s\n  window: 4s\n  min_requests: 10\n"
            "  fast_fail: {consecutive_errors: 0}\n"
            f"  steps: [20, {{gate: {{webhook: '{gate.url}', timeout: 500ms}}}}, 50]\n"
        )
        app = await proxy_factory(one_rollout_config(stable.url, canary.url, rollout))
        port, admin_port = ports(app)
        async with Load(port, rate=100):
            await until(admin_port, "default", "the gate step", lambda ro: ro["step"] == 1)
            await ticks(admin_port, "default", 2)  # the controller keeps ticking while the gate hangs
            ro = await until(admin_port, "default", "a timed-out ask", lambda ro: bool(ro["gate"]))
            assert ro["gate"]["open"] is False and "Timeout" in ro["gate"]["answer"], ro["gate"]
            switch.fail = True
            ro = await until(admin_port, "default", "the rollback", lambda ro: ro["phase"] == "rolled_back")
            assert "error rate" in ro["reason"]


# -- progress deadline ----------------------------------------------------------------------------------


async def test_progress_deadline_stalls_and_rolls_back(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory
) -> None:
    stable = await upstream_factory("stable")
    canary = await upstream_factory("canary")
    rollout = (
        "  canary: canary\n  baseline: stable\n  interval: 1s\n  window: 4s\n  min_requests: 100000\n"
        "  steps: [20, 50]\n  progress_deadline: 2s\n  on_deadline: rollback\n"
    )
    app = await proxy_factory(one_rollout_config(stable.url, canary.url, rollout))
    port, admin_port = ports(app)
    async with Load(port, rate=40):
        ro = await until(admin_port, "default", "the deadline rollback", lambda ro: ro["phase"] == "rolled_back")
    assert ro["stalled"] is True and "progress deadline" in ro["reason"]
    assert ro["last_verdict"]["result"] == "insufficient_data"
    kinds = [e["kind"] for e in (await status(admin_port))["events"]]
    assert kinds[-2:] == ["stalled", "rollback"], kinds
    m = await metrics(admin_port)
    assert sample(m, "canary_proxy_rollout_stalled", rollout="default") == 1
    assert sample(m, "canary_proxy_analysis_verdict", rollout="default", result="insufficient_data") == 1


# -- observe mode -----------------------------------------------------------------------------------------


async def test_observe_mode_reports_but_never_moves_weights(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory
) -> None:
    stable = await upstream_factory("stable")
    canary, switch = await switchable(upstream_factory, "canary")
    rollout = (
        "  canary: canary\n  baseline: stable\n  interval: 1s\n  window: 4s\n  min_requests: 10\n"
        "  fast_fail: {consecutive_errors: 3}\n  steps: [20, 50, 100]\n  mode: observe\n"
    )
    app = await proxy_factory(one_rollout_config(stable.url, canary.url, rollout, "{stable: 70, canary: 30}"))
    port, admin_port = ports(app)
    async with Load(port, rate=100) as load:
        ro = await until(admin_port, "default", "an observed step", lambda ro: ro["step"] >= 1)
        assert ro["mode"] == "observe" and ro["canary_weight"] is None and ro["would_weight"] >= 50
        switch.fail = True
        ro = await until(admin_port, "default", "an observed rollback", lambda ro: ro["phase"] == "rolled_back")
        assert ro["would_weight"] == 0
        before = load.served[("/", "canary")]
        await wait_for(lambda: _true(load.served[("/", "canary")] > before + 50), 10, "canary traffic after")
    m = await metrics(admin_port)
    assert sample(m, "canary_proxy_upstream_weight", route="default", upstream="canary") == 30
    events = [e for e in (await status(admin_port))["events"] if e["kind"] in ("step", "rollback")]
    assert events and all(e["message"].startswith("observe mode, not applied: ") for e in events)
    assert all(e["data"]["observe"] is True for e in events)


# -- the analysis on /metrics ------------------------------------------------------------------------------


async def test_analysis_metrics_match_status_and_pass_promtool(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    stable = await upstream_factory("stable")
    canary = await upstream_factory("canary")
    rollout = (
        "  name: shop\n  canary: canary\n  baseline: stable\n  interval: 1s\n  window: 5s\n"
        "  min_requests: 20\n  steps: [40, {pause: {}}]\n"
    )
    app = await proxy_factory(one_rollout_config(stable.url, canary.url, rollout, "{stable: 60, canary: 40}"))
    port, admin_port = ports(app)
    async with Load(port, rate=100):
        def enough(ro: dict[str, Any]) -> bool:
            return bool(ro["analysis"]) and ro["analysis"]["canary"]["requests"] > 20

        await until(admin_port, "shop", "evidence", enough)

    async def consistent() -> tuple[str, dict[str, Any]] | None:
        # One tick's figures: the evaluation time is the same before and after reading /status.
        _, before = await admin(admin_port, "GET", "/metrics")
        ro = await rollout_doc(admin_port, "shop")
        _, after = await admin(admin_port, "GET", "/metrics")
        return (after, ro) if before == after or _eval_at(before) == _eval_at(after) == ro["analysis"]["at"] else None

    text, ro = await wait_for(consistent, 10, "a scrape within one tick")
    m = await metrics(admin_port)
    analysis = ro["analysis"]
    assert sample(m, "canary_proxy_analysis_last_evaluation_timestamp_seconds", rollout="shop") == analysis["at"]
    for upstream in ("canary", "stable"):
        window = analysis["canary" if upstream == "canary" else "baseline"]
        labels = {"rollout": "shop", "upstream": upstream}
        assert sample(m, "canary_proxy_analysis_window_requests", **labels) == window["requests"]
        assert sample(m, "canary_proxy_analysis_window_errors", **labels) == window["errors"]
        assert sample(m, "canary_proxy_analysis_error_rate", **labels) == pytest.approx(window["error_rate"])
        assert sample(m, "canary_proxy_analysis_p99_seconds", **labels) == pytest.approx(window["p99"])
    for result in ("healthy", "breach", "insufficient_data"):
        want = 1.0 if result == analysis["verdict"] else 0.0
        assert sample(m, "canary_proxy_analysis_verdict", rollout="shop", result=result) == want
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool not found: apt-get install -y prometheus (CI installs it)"
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    problems = [line for line in (res.stdout + res.stderr).splitlines() if "canary_proxy_analysis" in line
                or "canary_proxy_rollout" in line]
    assert not problems, problems


def _eval_at(text: str) -> float | None:
    for line in text.splitlines():
        if line.startswith('canary_proxy_analysis_last_evaluation_timestamp_seconds{rollout="shop"}'):
            return float(line.rsplit(" ", 1)[1])
    return None


# -- reloads -----------------------------------------------------------------------------------------------


async def test_reload_adds_and_removes_named_rollouts_keeping_state_by_name(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    ups = {name: await upstream_factory(name) for name in ("a1", "a2", "b1", "b2")}
    head = (
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\naccess_log: false\nupstreams:\n"
        + "".join(f"  {n}: {{endpoints: [{u.url}], version: v1}}\n" for n, u in ups.items())
        + "routes:\n  - {name: web, match: {path_prefix: /web}, split: {a1: 90, a2: 10}}\n"
        "  - {name: api, split: {b1: 90, b2: 10}}\n"
    )
    web_rollout = "{name: web, canary: a2, baseline: a1, steps: [{pause: {}}, 20, 40], interval: 1h}"
    app = await proxy_factory(head + f"rollout: {web_rollout}\n")
    _, admin_port = ports(app)
    code, body = await admin(admin_port, "POST", "/rollout/promote")  # one rollout: the short API works
    assert code == 200 and body["name"] == "web" and body["step"] == 1, body

    path = Path(app.config.source_path)
    path.write_text(head + f"rollouts:\n  - {web_rollout}\n  - {{name: api, canary: b2, baseline: b1, steps: [30]}}\n")
    ok, detail = await app.reload("test")
    assert ok, detail
    doc = await status(admin_port)
    assert [r["name"] for r in doc["rollouts"]] == ["web", "api"]
    assert doc["rollouts"][0]["step"] == 1  # kept by name
    assert doc["rollouts"][1]["canary_weight"] == 30
    effective = {name: dict(split or ()) for name, _, split in app.plane.snapshot.effective}  # type: ignore[union-attr]
    assert effective["web"]["a2"] == 20 and effective["api"]["b2"] == 30

    path.write_text(head + f"rollout: {web_rollout}\n")
    ok, detail = await app.reload("test")
    assert ok, detail
    doc = await status(admin_port)
    assert [r["name"] for r in doc["rollouts"]] == ["web"]
    effective = {name: dict(split or ()) for name, _, split in app.plane.snapshot.effective}  # type: ignore[union-attr]
    assert effective["api"]["b2"] == 10  # back to the configured weights
    code, body = await admin(admin_port, "POST", "/rollouts/api/pause")
    assert code == 404


# -- run --workers 2 ---------------------------------------------------------------------------------------


async def test_workers_follow_each_rollout_and_trip_the_right_one(
    upstream_factory: UpstreamFactory, proxy_process: Callable[..., ProxyProcess]
) -> None:
    a1 = await upstream_factory("a1")
    a2, a2_switch = await switchable(upstream_factory, "a2")
    a2_switch.fail = True
    b1 = await upstream_factory("b1")
    b2 = await upstream_factory("b2")
    text = f"""
listen: 127.0.0.1:0
admin: 127.0.0.1:0
access_log: false
upstreams:
  a1: {{endpoints: [{a1.url}], version: v1}}
  a2: {{endpoints: [{a2.url}], version: v2}}
  b1: {{endpoints: [{b1.url}], version: v1}}
  b2: {{endpoints: [{b2.url}], version: v2}}
routes:
  - {{name: web, match: {{path_prefix: /web}}, split: {{a1: 50, a2: 50}}}}
  - {{name: api, split: {{b1: 50, b2: 50}}}}
rollouts:
  - {{name: web, canary: a2, baseline: a1, min_requests: 100000, fast_fail: {{consecutive_errors: 5}}}}
  - {{name: api, canary: b2, baseline: b1, min_requests: 100000, fast_fail: {{consecutive_errors: 5}}}}
"""
    pp = proxy_process(text, args=("--workers", "2"))
    try:
        await wait_for(lambda: _true(sum(_worker_up(line) for line in list(pp.lines)) >= 2), 15, "both workers")

        async def spread(path: str) -> list[tuple[int, str, str]]:
            conn = aiohttp.TCPConnector(force_close=True)  # new connections: both workers serve
            out = []
            async with aiohttp.ClientSession(connector=conn) as s:
                for _ in range(60):
                    async with s.get(f"http://127.0.0.1:{pp.port}{path}") as r:
                        await r.read()
                        out.append((r.status, r.headers.get("X-Upstream", "?"), r.headers.get("X-Request-Id", "")))
            return out

        await spread("/web")  # a2 fails: fast fail in whichever worker sees 5 in a row

        async def web_rolled_back() -> bool:
            ro = await rollout_doc(pp.admin_port, "web")
            return bool(ro["phase"] == "rolled_back")

        await wait_for(web_rolled_back, 10, "the web rollback")

        async def all_workers_follow() -> list[tuple[int, str, str]] | None:
            results = await spread("/web")
            ok = {up for _, up, _ in results} == {"a1"} and len({rid.split("-")[0] for _, _, rid in results}) == 2
            return results if ok else None

        await wait_for(all_workers_follow, 10, "every worker sending /web to a1")
        api = await spread("/api")
        assert {up for _, up, _ in api} == {"b1", "b2"}  # the other rollout is untouched
        ro = await rollout_doc(pp.admin_port, "api")
        assert ro["phase"] == "steady", ro
    finally:
        assert await stop_process(pp) == 0


# -- URLs that refuse or answer garbage ---------------------------------------------------------------------


async def test_gate_and_check_urls_that_refuse_or_answer_garbage_stall_nothing(
    upstream_factory: UpstreamFactory, proxy_factory: ProxyFactory
) -> None:
    async def junk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(b"HELLO THERE\r\n\x00\xff garbage\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(junk, "127.0.0.1", 0)
    junk_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    refused = f"http://127.0.0.1:{free_port()}"
    try:
        a1 = await upstream_factory("a1")
        a2, a2_switch = await switchable(upstream_factory, "a2")
        b1 = await upstream_factory("b1")
        b2 = await upstream_factory("b2")
        text = f"""
listen: 127.0.0.1:0
admin: 127.0.0.1:0
access_log: false
upstreams:
  a1: {{endpoints: [{a1.url}], version: v1}}
  a2: {{endpoints: [{a2.url}], version: v2}}
  b1: {{endpoints: [{b1.url}], version: v1}}
  b2: {{endpoints: [{b2.url}], version: v2}}
routes:
  - {{name: web, match: {{path_prefix: /web}}, split: {{a1: 100, a2: 0}}}}
  - {{name: api, split: {{b1: 100, b2: 0}}}}
rollouts:
  - name: web
    canary: a2
    baseline: a1
    interval: 1s
    window: 4s
    min_requests: 10
    fast_fail: {{consecutive_errors: 0}}
    steps: [20, {{gate: {{webhook: "{junk_url}/gate", timeout: 1s}}}}, 50]
  - name: api
    canary: b2
    baseline: b1
    interval: 1s
    window: 4s
    min_requests: 10
    steps: [20, 50]
    checks:
      - {{name: refused, prometheus: "{refused}", query: up, max: 1, failure_limit: 0}}
      - {{name: junk, prometheus: "{junk_url}", query: up, max: 1, failure_limit: 0}}
"""
        app = await proxy_factory(text)
        port, admin_port = ports(app)
        async with Load(port, ("/web", "/api"), rate=100) as load:
            await until(admin_port, "web", "the gate step", lambda ro: ro["step"] == 1)
            ro = await until(admin_port, "web", "a garbage answer", lambda ro: bool(ro["gate"]))
            assert ro["gate"]["open"] is False and ro["gate"]["answer"].startswith("ClientResponseError"), ro["gate"]

            def failing(ro: dict[str, Any]) -> bool:
                return all(int(c["failures"]) >= 2 for c in ro["checks"])

            ro = await until(admin_port, "api", "repeated check failures", failing)
            assert {c["status"] for c in ro["checks"]} == {"hold"}  # failure_limit 0: never trips
            assert ro["phase"] == "progressing" and ro["step"] == 0
            assert ro["last_verdict"]["result"] == "insufficient_data"
            await ticks(admin_port, "api", 2)
            a2_switch.fail = True
            await until(admin_port, "web", "the rollback", lambda ro: ro["phase"] == "rolled_back")
        assert load.served[("/api", "b1")] > 100  # the data plane served all along
    finally:
        server.close()
        await server.wait_closed()
