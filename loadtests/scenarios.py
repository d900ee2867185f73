"""The six comparison scenarios (plus worker scaling), each returning a ScenarioResult."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from loadtests import clients, tls_scenarios, wrk
from loadtests.harness import CoreLoad, Cores, Usage, rss_bytes
from loadtests.report import NGINX, OURS, Check, Sample, ScenarioResult
from loadtests.topology import Files

MIB = 1024 * 1024
CONNECTIONS = 64


@dataclass(frozen=True)
class Target:
    key: str  # OURS or NGINX
    label: str
    port: int
    pid: int  # root of the process tree whose RSS/CPU is measured


@dataclass
class Context:
    targets: tuple[Target, Target]
    rounds: int
    duration: float
    cores: Cores
    work: Path
    files: Files
    idle_count: int
    # A new, short-lived instance of the OURS or NGINX slot (idle-connection memory).
    fresh: Callable[[str], AbstractContextManager[Target]] | None = None
    # Starts canary-proxy with N workers (for the scaling line); None when --workers is unsupported.
    scaled: Callable[[int], AbstractContextManager[Target]] | None = None
    memo: dict[str, float] = field(default_factory=dict)  # nginx saturation from scenario 1
    # Starts both slots terminating TLS (the TLS scenarios, loadtests/tls_scenarios.py).
    tls: Callable[[], AbstractContextManager[tuple[Target, Target]]] | None = None

    def alternate(self, measure: Callable[[Target], Sample]) -> dict[str, list[Sample]]:
        """Run ``measure`` on both proxies each round, swapping who goes first every round."""
        out: dict[str, list[Sample]] = {OURS: [], NGINX: []}
        for r in range(self.rounds):
            order = self.targets if r % 2 == 0 else self.targets[::-1]
            for target in order:
                out[target.key].append(measure(target))
        return out


def _wrk_sample(ctx: Context, target: Target, script: Path, conns: int, duration: float) -> Sample:
    usage, load = Usage(target.pid), CoreLoad(ctx.cores.load)
    res = wrk.run(target.port, script, conns, duration, ctx.cores.load)
    cpu = usage.cpu_percent()
    return {
        "req/s": res.rps,
        "p50 ms": res.p50_ms,
        "p99 ms": res.p99_ms,
        "p99.9 ms": res.p999_ms,
        "MB/s": res.bytes / res.seconds / 1e6 if res.seconds else 0.0,
        "peak RSS MiB": usage.peak_rss() / MIB,
        "CPU %": cpu,
        "req per CPU-s": res.rps / (cpu / 100) if cpu else 0.0,
        "load-side CPU %": load.percent(),
        "errors": float(res.errors + res.status_errors),
    }


def _saturate(ctx: Context, key: str, title: str, path: str, close: bool = False) -> ScenarioResult:
    script = wrk.write_script(ctx.work, f"s{key}", path, close=close)
    for target in ctx.targets:  # warm-up: connection pools, caches, JIT-free but allocator-warm
        wrk.run(target.port, script, CONNECTIONS, 1, ctx.cores.load)
    samples = ctx.alternate(lambda t: _wrk_sample(ctx, t, script, CONNECTIONS, ctx.duration))
    metrics: tuple[str, ...] = (
        "req/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "peak RSS MiB",
        "CPU %",
        "req per CPU-s",
        "load-side CPU %",
        "errors",
    )
    if path == "/64k":
        metrics = ("req/s", "MB/s", *metrics[1:])
    checks = (Check("req/s", ">=", 0.7),) if key == "1" else ()
    return ScenarioResult(key, title, metrics, samples, checks=checks, notes=_bottleneck(samples))


def _bottleneck(samples: dict[str, list[Sample]]) -> tuple[str, ...]:
    """Say so when nginx was not CPU-bound: then the load side capped it and req/s ratios flatter us."""
    cpu = statistics.median(s["CPU %"] for s in samples[NGINX])
    load = statistics.median(s["load-side CPU %"] for s in samples[NGINX])
    if cpu >= 90:
        return ()
    return (
        f"nginx used {cpu:.0f}% of its core while the load side was {load:.0f}% busy: the load generator "
        "and upstream, not nginx, set the pace, so req/s ratios are an upper bound for us; "
        "'req per CPU-s' compares efficiency regardless",
    )


def small(ctx: Context) -> ScenarioResult:
    """1: the headline, small responses over 64 keep-alive connections, routing and metrics on."""
    result = _saturate(
        ctx, "1", f"small responses, {CONNECTIONS} keep-alive connections, routing + metrics on", "/small"
    )
    rps = result.median(NGINX, "req/s")
    if rps:
        ctx.memo["nginx_rps"] = rps
    return result


def large(ctx: Context) -> ScenarioResult:
    """2: 64 KiB responses."""
    return _saturate(ctx, "2", f"64 KiB responses, {CONNECTIONS} keep-alive connections", "/64k")


def streaming(ctx: Context) -> ScenarioResult:
    """3: one streamed download and one streamed upload of the blob per target and round."""
    size = ctx.files.stream_size

    # Small (--quick) transfers last ~0.1 s: repeat them so each sample covers at least 256 MiB.
    repeats = max(1, -(-256 * MIB // size))

    def measure(target: Target) -> Sample:
        usage = Usage(target.pid)
        down = [clients.download(target.port, size, ctx.cores.load) for _ in range(repeats)]
        down_rss = usage.peak_rss()
        usage = Usage(target.pid)
        up = [clients.upload(target.port, ctx.files.blob, ctx.cores.load) for _ in range(repeats)]
        return {
            "download MB/s": clients.Transfer.total(down).mb_per_s,
            "download peak RSS MiB": down_rss / MIB,
            "upload MB/s": clients.Transfer.total(up).mb_per_s,
            "upload peak RSS MiB": usage.peak_rss() / MIB,
        }

    for target in ctx.targets:  # warm-up: the first transfer through a path is slower for anyone
        clients.download(target.port, size, ctx.cores.load)
        clients.upload(target.port, ctx.files.blob, ctx.cores.load)
    human = f"{size / 2**30:g} GiB" if size >= 2**30 else f"{size // MIB} MiB"
    return ScenarioResult(
        "3",
        f"{human} streamed download and upload (curl, one transfer at a time"
        + (f", {repeats} per sample)" if repeats > 1 else ")"),
        ("download MB/s", "download peak RSS MiB", "upload MB/s", "upload peak RSS MiB"),
        ctx.alternate(measure),
        checks=(
            Check("download MB/s", ">=", 0.5),
            Check("upload MB/s", ">=", 0.5),
            Check("download peak RSS MiB", "<", 100, on="ours"),
            Check("upload peak RSS MiB", "<", 100, on="ours"),
        ),
        notes=(
            "nginx proxies /upload and /download with proxy_request_buffering off and proxy_buffering off "
            "(64 KiB buffers), so neither proxy buffers the body to disk; the download comes from the "
            "upstream nginx (sendfile of a sparse file), the upload goes through it to a discarding sink",
        ),
    )


def new_connections(ctx: Context) -> ScenarioResult:
    """4: `Connection: close` on every request, so each request pays for a TCP handshake and teardown."""
    return _saturate(
        ctx,
        "4",
        f"new connection per request (Connection: close), {CONNECTIONS} concurrent",
        "/small",
        close=True,
    )


def idle(ctx: Context) -> ScenarioResult:
    """5: memory per idle keep-alive client connection."""

    def measure(target: Target) -> Sample:
        with contextlib.ExitStack() as stack:
            if ctx.fresh is not None:
                target = stack.enter_context(ctx.fresh(target.key))
            clients.warm(target.port)
            time.sleep(0.5)
            res = clients.idle_connections(target.port, ctx.idle_count, lambda: rss_bytes(target.pid))
        return {
            "KiB per connection": res.bytes_per_conn / 1024,
            "RSS with idle conns MiB": res.rss_after / MIB,
            "open at measurement": float(res.still_open),
        }

    samples = ctx.alternate(measure)
    return ScenarioResult(
        "5",
        f"{ctx.idle_count:,} idle keep-alive client connections (one request each, then idle)",
        ("KiB per connection", "RSS with idle conns MiB", "open at measurement"),
        samples,
        checks=(Check("KiB per connection", "<", 10, on="ours"),),
        notes=(
            "each round starts a fresh instance of each proxy (same pinning), warms it with 200 requests, "
            "then takes the RSS delta of its process tree divided by the connection count; kernel socket "
            "buffers are not in RSS for either proxy",
        ),
    )


def fixed_rate(ctx: Context) -> ScenarioResult:
    """6: latency at half of nginx's saturation rate from scenario 1."""
    script = wrk.write_script(ctx.work, "s6", "/small", paced=True)
    nginx_rps = ctx.memo.get("nginx_rps")
    if nginx_rps is None:  # scenario 1 was not selected: measure nginx's saturation briefly
        sat = wrk.write_script(ctx.work, "s6-sat", "/small")
        nginx = next(t for t in ctx.targets if t.key == NGINX)
        nginx_rps = wrk.run(nginx.port, sat, CONNECTIONS, min(ctx.duration, 5), ctx.cores.load).rps
    rate = nginx_rps / 2
    conns = wrk.connections_for_rate(rate)
    for target in ctx.targets:
        wrk.run(target.port, script, conns, 1, ctx.cores.load)
    samples = ctx.alternate(lambda t: _wrk_sample(ctx, t, script, conns, ctx.duration))
    return ScenarioResult(
        "6",
        f"latency at a moderate rate: paced for {rate:,.0f} req/s (half of nginx's saturation)",
        ("req/s", "p50 ms", "p99 ms", "p99.9 ms", "CPU %", "errors"),
        samples,
        checks=(Check("p99 ms", "<=", 2.0),),
        notes=(
            f"wrk2 is not in Debian: wrk with {conns} connections, each pausing a random 5-15 ms after "
            "each response; latency excludes the pause. Closed loop, so a saturated proxy shows a lower "
            "req/s rather than unbounded queueing",
        ),
    )


def scaling(ctx: Context) -> ScenarioResult | None:
    """Worker scaling line: canary-proxy with 1 vs 2 workers on the headline workload."""
    if ctx.scaled is None:
        return None
    script = wrk.write_script(ctx.work, "s7", "/small")
    samples: dict[str, list[Sample]] = {OURS: [], NGINX: []}
    with contextlib.ExitStack() as stack:
        one = stack.enter_context(ctx.scaled(1))
        two = stack.enter_context(ctx.scaled(2))
        for target in (one, two):
            wrk.run(target.port, script, CONNECTIONS, 1, ctx.cores.load)
        for _ in range(ctx.rounds):
            samples[OURS].append(_wrk_sample(ctx, one, script, CONNECTIONS, ctx.duration))
            samples[NGINX].append(_wrk_sample(ctx, two, script, CONNECTIONS, ctx.duration))
    one_rps = statistics.median(s["req/s"] for s in samples[OURS])
    two_rps = statistics.median(s["req/s"] for s in samples[NGINX])
    line = f"scaling 1 -> 2 workers: {one_rps:,.0f} -> {two_rps:,.0f} req/s ({two_rps / max(one_rps, 1):.2f}x)"
    return ScenarioResult(
        "7",
        "scaling 1 -> 2 workers (canary-proxy only; 'nginx' column = canary-proxy --workers 2)",
        ("req/s", "p99 ms", "CPU %"),
        samples,
        extra=(line,),
        notes=(
            "both instances unpinned; with 2 CPUs the load generator and upstream share the cores, so this "
            "understates scaling",
        ),
    )


SCENARIOS: dict[int, Callable[[Context], ScenarioResult | None]] = {
    1: small,
    2: large,
    3: streaming,
    4: new_connections,
    5: idle,
    6: fixed_rate,
    7: scaling,
    8: tls_scenarios.keep_alive,
    9: tls_scenarios.handshakes,
}
