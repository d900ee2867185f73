"""/metrics: exposition validity, names/labels, and counters moved by real proxied traffic."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import Upstream, config_text, free_port
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import parse_config
from proxy.control.app import ProxyApp
from proxy.control.metrics import CONTENT_TYPE, ProxyCollector, make_registry, render

StartProxy = Callable[..., Awaitable[ProxyApp]]
StartUpstream = Callable[..., Awaitable[Upstream]]

ROUTES = (
    "  - name: beta\n    match: {headers: {x-canary: {exact: always}}}\n    to: canary\n"
    "  - name: api\n    match: {path_prefix: /api}\n    split: {stable: 80, canary: 20}\n"
)
ROLLOUT = "rollout:\n  canary: canary\n  baseline: stable\n  steps: [10, 50]\n  interval: 1h\n"
PROMTOOL = shutil.which("promtool")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(app: ProxyApp) -> tuple[str, str]:
    assert app.admin is not None
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{app.admin.bound_port}/metrics") as r:
        assert r.status == 200
        return r.headers["Content-Type"], await r.text()


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(all_samples: Samples, name: str, **labels: str) -> float:
    return all_samples[(name, frozenset(labels.items()))]


async def get(app: ProxyApp, path: str, **headers: str) -> int:
    assert app.plane is not None
    url = f"http://127.0.0.1:{app.plane.bound_port}{path}"
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        await r.read()
        return r.status


@pytest.fixture
async def app(proxy_factory: StartProxy, upstream_factory: StartUpstream) -> ProxyApp:
    async def failing(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503, text="canary is sick")

    stable = await upstream_factory("stable")
    canary = await upstream_factory("canary", handler=failing)
    return await proxy_factory(config_text(stable.url, canary.url, ROLLOUT, ROUTES))


async def test_exposition_parses_and_has_every_family(app: ProxyApp) -> None:
    content_type, text = await scrape(app)
    assert content_type == CONTENT_TYPE
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    expected = {
        "canary_proxy_requests": "counter",
        "canary_proxy_request_duration_seconds": "histogram",
        "canary_proxy_upstream_errors": "counter",
        "canary_proxy_upstream_weight": "gauge",
        "canary_proxy_rollbacks": "counter",
        "canary_proxy_rollout_step": "gauge",
        "canary_proxy_rollout_phase": "gauge",
        "canary_proxy_config_reloads": "counter",
        "canary_proxy_in_flight_requests": "gauge",
        "canary_proxy_upstream_ejections": "counter",
        "canary_proxy_retries": "counter",
        "canary_proxy_requests_rejected": "counter",
        "canary_proxy_build_info": "gauge",
        "process_cpu_seconds": "counter",
        "python_info": "gauge",
        "python_gc_collections": "counter",
    }
    assert {k: families.get(k) for k in expected} == expected
    s = samples(text)
    assert value(s, "canary_proxy_build_info", version="0.1.0") == 1.0
    assert value(s, "canary_proxy_rollbacks_total", upstream="canary") == 0.0
    assert value(s, "canary_proxy_rollout_step", rollout="default", upstream="canary") == 1.0
    phases = {
        dict(labels)["phase"]: v for (name, labels), v in s.items() if name == "canary_proxy_rollout_phase"
    }
    assert phases == {
        "progressing": 1.0,
        "steady": 0.0,
        "paused": 0.0,
        "promoted": 0.0,
        "rolled_back": 0.0,
        "unknown_state": 0.0,
    }
    assert value(s, "canary_proxy_upstream_weight", route="beta", upstream="canary") == 100.0
    assert value(s, "canary_proxy_upstream_weight", route="api", upstream="stable") == 90.0
    assert value(s, "canary_proxy_upstream_weight", route="api", upstream="canary") == 10.0


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`)")
async def test_promtool_check_metrics(app: ProxyApp) -> None:
    assert await get(app, "/api/x") in (200, 503)
    assert await get(app, "/unrouted") == 404
    _, text = await scrape(app)
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # promtool is quiet on a clean exposition; any lint finding is a failure too.
    assert done.stdout.strip() == "" and done.stderr.strip() == ""


async def test_traffic_moves_the_right_counters(app: ProxyApp) -> None:
    before = samples((await scrape(app))[1])
    for _ in range(3):
        assert await get(app, "/x", **{"x-canary": "always"}) == 503
    assert await get(app, "/nothing-matches") == 404
    after = samples((await scrape(app))[1])

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after[key] - before.get(key, 0.0)

    assert delta("canary_proxy_requests_total", route="beta", upstream="canary", code_class="5xx") == 3
    assert delta("canary_proxy_requests_total", route="beta", upstream="canary", code_class="2xx") == 0
    assert delta("canary_proxy_requests_total", route="(none)", upstream="(none)", code_class="4xx") == 1
    assert delta("canary_proxy_request_duration_seconds_count", upstream="canary") == 3
    assert delta("canary_proxy_request_duration_seconds_bucket", upstream="canary", le="+Inf") == 3
    assert delta("canary_proxy_request_duration_seconds_bucket", upstream="canary", le="10.0") == 3
    assert delta("canary_proxy_request_duration_seconds_sum", upstream="canary") > 0
    assert delta("canary_proxy_request_duration_seconds_count", upstream="stable") == 0
    assert value(after, "canary_proxy_in_flight_requests") == 0


async def test_connect_errors_counted(proxy_factory: StartProxy, upstream_factory: StartUpstream) -> None:
    stable = await upstream_factory("stable")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    app = await proxy_factory(config_text(stable.url, dead, "retries: {attempts: 0}\n", ROUTES))
    assert await get(app, "/x", **{"x-canary": "always"}) == 502
    s = samples((await scrape(app))[1])
    assert value(s, "canary_proxy_upstream_errors_total", upstream="canary", kind="connect") == 1
    assert value(s, "canary_proxy_upstream_errors_total", upstream="canary", kind="timeout") == 0
    assert value(s, "canary_proxy_upstream_errors_total", upstream="stable", kind="connect") == 0
    assert value(s, "canary_proxy_requests_total", route="beta", upstream="canary", code_class="5xx") == 1
    # Without a rollout there are no rollout series.
    assert not [k for k in s if k[0] in ("canary_proxy_rollout_phase", "canary_proxy_rollout_step")]


async def test_rollback_moves_weights_phase_and_counter(app: ProxyApp) -> None:
    assert app.controller is not None
    app.controller.command("rollback", "test")
    s = samples((await scrape(app))[1])
    assert value(s, "canary_proxy_rollbacks_total", upstream="canary") == 1
    assert value(s, "canary_proxy_rollout_phase", rollout="default", phase="rolled_back") == 1
    assert value(s, "canary_proxy_rollout_phase", rollout="default", phase="progressing") == 0
    assert value(s, "canary_proxy_rollout_step", rollout="default", upstream="canary") == 0
    assert value(s, "canary_proxy_upstream_weight", route="api", upstream="canary") == 0.0
    assert value(s, "canary_proxy_upstream_weight", route="api", upstream="stable") == 100.0
    # `to: canary` now serves the baseline; the canary stays visible at 0.
    assert value(s, "canary_proxy_upstream_weight", route="beta", upstream="stable") == 100.0
    assert value(s, "canary_proxy_upstream_weight", route="beta", upstream="canary") == 0.0


async def test_reload_counters(app: ProxyApp) -> None:
    path = Path(app.config.source_path)
    path.write_text(path.read_text() + "bogus_key: 1\n")
    ok, _ = await app.reload("test")
    assert not ok
    path.write_text(path.read_text().replace("bogus_key: 1\n", "shutdown_grace: 2s\n"))
    ok, _ = await app.reload("test")
    assert ok
    s = samples((await scrape(app))[1])
    assert value(s, "canary_proxy_config_reloads_total", result="failure") == 1
    assert value(s, "canary_proxy_config_reloads_total", result="success") == 1


def test_histogram_buckets_are_cumulative() -> None:
    """The collector on its own (app not started): non-cumulative counts -> cumulative `le`."""
    cfg = parse_config(
        "listen: 127.0.0.1:0\nupstreams:\n  a: {endpoints: [http://127.0.0.1:1]}\n"
        "routes:\n  - {name: r, to: a}\nmetrics: {buckets: [0.1, 1]}\n"
    )
    app = ProxyApp(cfg, watch=False)
    us = app.stats.upstream("a", cfg.metrics.buckets)
    for d in (0.05, 0.1, 0.5, 2.0, 3.0):
        us.observe(1000.0, d, False)
    app.stats.rejected = 7
    registry = make_registry(app, process=False)
    s = samples(render(registry).decode())
    buckets = {
        dict(k[1])["le"]: v for k, v in s.items() if k[0] == "canary_proxy_request_duration_seconds_bucket"
    }
    assert buckets == {"0.1": 2, "1.0": 3, "+Inf": 5}
    assert value(s, "canary_proxy_request_duration_seconds_count", upstream="a") == 5
    assert value(s, "canary_proxy_request_duration_seconds_sum", upstream="a") == pytest.approx(5.65)
    assert value(s, "canary_proxy_requests_rejected_total") == 7
    # Only the proxy's families: no process collectors were asked for.
    assert all(name.startswith("canary_proxy_") for name, _ in s)
    assert next(m.name for m in ProxyCollector(app).collect()) == "canary_proxy_build_info"
