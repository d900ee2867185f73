"""The TLS scenarios: both proxies terminate TLS with the same certificate, side by side in one run.

8: HTTPS keep-alive HTTP/1.1, small responses over 64 connections (target: canary-proxy's requests
   per CPU-second at least 0.6x nginx's).
9: new TLS handshakes per second: `Connection: close` on every request over HTTPS, so each request
   pays for a full handshake (wrk never resumes a session).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loadtests import wrk
from loadtests.harness import CoreLoad, Usage
from loadtests.report import NGINX, OURS, Check, Sample, ScenarioResult

if TYPE_CHECKING:
    from loadtests.scenarios import Context, Target

CONNECTIONS = 64
MIB = 1024 * 1024


def _sample(ctx: Context, target: Target, script_path: object, conns: int, per: str) -> Sample:
    usage, load = Usage(target.pid), CoreLoad(ctx.cores.load)
    res = wrk.run(target.port, script_path, conns, ctx.duration, ctx.cores.load, scheme="https")  # type: ignore[arg-type]
    cpu = usage.cpu_percent()
    return {
        per: res.rps,
        "p50 ms": res.p50_ms,
        "p99 ms": res.p99_ms,
        "peak RSS MiB": usage.peak_rss() / MIB,
        "CPU %": cpu,
        f"{per.split('/')[0]} per CPU-s": res.rps / (cpu / 100) if cpu else 0.0,
        "load-side CPU %": load.percent(),
        "errors": float(res.errors + res.status_errors),
    }


def _run(ctx: Context, key: str, title: str, close: bool, per: str, checks: tuple[Check, ...]) -> ScenarioResult | None:
    if ctx.tls is None:
        return None
    script = wrk.write_script(ctx.work, f"s{key}", "/small", close=close)
    samples: dict[str, list[Sample]] = {OURS: [], NGINX: []}
    with ctx.tls() as (ours, theirs):
        for target in (ours, theirs):  # warm-up
            wrk.run(target.port, script, CONNECTIONS, 1, ctx.cores.load, scheme="https")
        for r in range(ctx.rounds):
            order = (ours, theirs) if r % 2 == 0 else (theirs, ours)
            for target in order:
                samples[target.key].append(_sample(ctx, target, script, CONNECTIONS, per))
    unit = per.split("/")[0]
    metrics = (per, "p50 ms", "p99 ms", "peak RSS MiB", "CPU %", f"{unit} per CPU-s", "load-side CPU %", "errors")
    return ScenarioResult(key, title, metrics, samples, checks=checks, notes=_notes())


def _notes() -> tuple[str, ...]:
    return (
        "both proxies serve the same self-signed EC P-256 certificate, TLS 1.2+ (wrk negotiates TLS 1.3 "
        "with both); nginx with ssl_session_cache and tickets, canary-proxy with its defaults (tickets); "
        "upstream legs are cleartext for both",
    )


def keep_alive(ctx: Context) -> ScenarioResult | None:
    """8: HTTPS keep-alive small responses (TLS record work per request, no handshakes)."""
    return _run(
        ctx,
        "8",
        f"HTTPS keep-alive (HTTP/1.1), small responses, {CONNECTIONS} connections",
        close=False,
        per="req/s",
        checks=(Check("req per CPU-s", ">=", 0.6),),
    )


def handshakes(ctx: Context) -> ScenarioResult | None:
    """9: a new TLS connection (full handshake) per request."""
    return _run(
        ctx,
        "9",
        f"new TLS handshake per request (Connection: close over HTTPS), {CONNECTIONS} concurrent",
        close=True,
        per="handshakes/s",
        checks=(),
    )
