"""Rollback time under load: how long a bad canary keeps hurting users.

Real processes: two upstreams (one each, so the canary can be killed), `python -m proxy run`, and an
open-loop asyncio client in this process (users with `x-user-id`, keep-alive, a sticky 90/10
split). After a healthy warm-up the canary goes bad: every request a 500, half of them, the process
killed, or hung (it accepts and reads requests but never answers). We measure the seconds from that
moment to the canary's weight reaching 0 (the rollback event's `at`, and /status polled every
50 ms), the user requests that failed meanwhile, and the requests that waited more than 5 s.

    python -m loadtests.rollback_time            # every scenario, warm-up = the window (~5 min)
    python -m loadtests.rollback_time --quick    # 10 s warm-ups
    python -m loadtests.rollback_time --only tight
    python -m loadtests.rollback_time --rate 200 --only default --failure hung --repeat 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from loadtests.harness import child_env

ROOT = Path(__file__).resolve().parent.parent
USERS = 2000
CANARY_PERCENT = 10

# rollout: blocks, each under `rollout:`; "default" leaves every threshold at the shipped default.
PROFILES = {
    "default": ("", 60.0),  # window 60s, min_requests 100, fast_fail 20
    "tight": ("  window: 10s\n  min_requests: 20\n  fast_fail: {consecutive_errors: 5}\n", 10.0),
}
FAILURES = {"500 all": 1.0, "500 half": 0.5, "killed": -1.0, "hung": -2.0}
SLOW = 5.0  # seconds: a user request waiting longer than this counts as a long wait


@dataclass(frozen=True)
class Scenario:
    profile: str
    failure: str

    @property
    def name(self) -> str:
        return f"{self.profile} / {self.failure}"


@dataclass(frozen=True)
class Result:
    scenario: Scenario
    rate: float  # achieved requests per second after the flip
    to_event: float | None  # rollback event `at` minus the flip
    to_weight0: float | None  # first /status poll showing weight 0, minus the flip
    reason: str
    sent_after_flip: int
    failed: int  # user requests sent after the flip that failed (5xx or connection error)
    failed_after_rollback: int  # ... of those, sent after the poll saw weight 0
    canary_after_rollback: int  # requests sent after the poll saw weight 0 yet served by the canary
    slow: int = 0  # user requests sent after the flip that waited longer than SLOW seconds
    longest: float = 0.0  # the longest wait of those, seconds


# -- upstream process --------------------------------------------------------------------------------


def serve(name: str, port: int) -> None:
    """Run one upstream: `GET /` answers with its name; `POST /_fail?rate=R` makes it fail R of requests
    (R = -2: hang, never answering)."""
    fail = {"rate": 0.0}
    rng = random.Random(name)
    never = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        if fail["rate"] == -2.0:
            await never.wait()  # hung: the request is read, no answer ever comes
        if fail["rate"] and rng.random() < fail["rate"]:
            return web.Response(status=500, text=f"{name} broken\n", headers={"X-Upstream": name})
        return web.Response(text=f"{name} ok\n", headers={"X-Upstream": name})

    async def control(request: web.Request) -> web.Response:
        fail["rate"] = float(request.query["rate"])
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_post("/_fail", control)
    app.router.add_get("/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# -- helpers ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def start(args: list[str], log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
    cmd = [sys.executable, *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=child_env(cmd))


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def proxy_config(port: int, admin: int, stable: int, canary: int, profile: str) -> str:
    return (
        f"listen: 127.0.0.1:{port}\nadmin: 127.0.0.1:{admin}\naccess_log: false\nshutdown_grace: 2s\n"
        "upstreams:\n"
        f"  stable: {{endpoints: [http://127.0.0.1:{stable}], version: v1}}\n"
        f"  canary: {{endpoints: [http://127.0.0.1:{canary}], version: v2}}\n"
        "routes:\n"
        "  - name: default\n"
        f"    split: {{stable: {100 - CANARY_PERCENT}, canary: {CANARY_PERCENT}}}\n"
        "    sticky: {header: x-user-id}\n"
        "rollout:\n  canary: canary\n  baseline: stable\n" + PROFILES[profile][0]
    )


# -- traffic ------------------------------------------------------------------------------------------


class Load:
    """Open-loop GETs at `rate` per second; records (sent at, status, served by) of every request."""

    def __init__(self, port: int, rate: int) -> None:
        self.url = f"http://127.0.0.1:{port}/"
        self.rate = rate
        self.records: list[tuple[float, int, str]] = []
        self.waits: list[tuple[float, float]] = []  # (sent at, seconds to the whole response)
        self.rng = random.Random(42)

    async def one(self, session: aiohttp.ClientSession) -> None:
        sent = time.time()
        headers = {"x-user-id": f"user-{self.rng.randrange(USERS)}"}
        try:
            async with session.get(self.url, headers=headers) as resp:
                await resp.read()
                self.records.append((sent, resp.status, resp.headers.get("X-Upstream", "?")))
        except (aiohttp.ClientError, TimeoutError):
            self.records.append((sent, 0, "error"))
        self.waits.append((sent, time.time() - sent))

    async def run(self, stop: asyncio.Event) -> None:
        tick = 0.01
        connector = aiohttp.TCPConnector(limit=128)
        timeout = aiohttp.ClientTimeout(total=40)  # longer than timeouts.response: a hung wait shows in full
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            pending: set[asyncio.Task[None]] = set()
            t0 = time.monotonic()
            n = 0
            while not stop.is_set():
                due = int((time.monotonic() - t0) * self.rate)
                for _ in range(due - n):
                    task = asyncio.create_task(self.one(session))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                n = max(n, due)
                await asyncio.sleep(tick)
            if pending:
                await asyncio.wait(pending, timeout=40)


async def get_json(session: aiohttp.ClientSession, url: str) -> dict[str, object]:
    async with session.get(url) as resp:
        doc: dict[str, object] = await resp.json()
        return doc


def canary_weight(doc: dict[str, object]) -> float | None:
    for route in doc["routes"]:  # type: ignore[attr-defined]
        if route["name"] == "default":
            return float(route["weights"]["canary"])
    return None


# -- one scenario ---------------------------------------------------------------------------------------


async def run_scenario(sc: Scenario, rate: int, warmup: float, settle: float, workdir: Path) -> Result:
    ports = {name: free_port() for name in ("stable", "canary", "proxy", "admin")}
    ups = {
        name: start(["-m", "loadtests.rollback_time", "--serve", name, str(ports[name])])
        for name in ("stable", "canary")
    }
    cfg = workdir / f"{sc.profile}-{sc.failure.replace(' ', '-')}.yaml"
    cfg.write_text(proxy_config(ports["proxy"], ports["admin"], ports["stable"], ports["canary"], sc.profile))
    log = cfg.with_suffix(".log")
    proxy = start(["-m", "proxy", "run", "-c", str(cfg)], log)
    admin = f"http://127.0.0.1:{ports['admin']}"
    try:
        for port in ports.values():
            await asyncio.to_thread(wait_port, port)
        load = Load(ports["proxy"], rate)
        halt = asyncio.Event()
        traffic = asyncio.create_task(load.run(halt))
        async with aiohttp.ClientSession() as session:
            await asyncio.sleep(warmup)
            doc = await get_json(session, f"{admin}/status")
            if doc["rollout"]["phase"] != "steady":  # type: ignore[index]
                raise RuntimeError(f"{sc.name}: the healthy canary was judged {doc['rollout']}")
            rate_fail = FAILURES[sc.failure]
            flipped = time.time()
            if rate_fail == -1.0:
                ups["canary"].kill()
            else:
                async with session.post(f"http://127.0.0.1:{ports['canary']}/_fail?rate={rate_fail}") as r:
                    r.raise_for_status()
            to_weight0: float | None = None
            deadline = time.monotonic() + settle
            while time.monotonic() < deadline:
                doc = await get_json(session, f"{admin}/status")
                if canary_weight(doc) == 0:
                    to_weight0 = time.time() - flipped
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # traffic after the rollback: none of it may fail or reach the canary
            halt.set()
            await traffic
            doc = await get_json(session, f"{admin}/status")
        rollout = doc["rollout"]
        events = [e for e in doc["events"] if e["kind"] == "rollback"]  # type: ignore[attr-defined]
        to_event = events[0]["at"] - flipped if events else None
        after = [r for r in load.records if r[0] >= flipped]
        seconds = max(r[0] for r in after) - flipped if after else 0.0
        back = flipped + to_weight0 if to_weight0 is not None else float("inf")
        failed = [r for r in after if r[1] == 0 or r[1] >= 500]
        waits = [w for sent, w in load.waits if sent >= flipped]
        return Result(
            scenario=sc,
            rate=len(after) / seconds if seconds else 0.0,
            to_event=to_event,
            to_weight0=to_weight0,
            reason=str(rollout.get("reason") or "-"),  # type: ignore[attr-defined]
            sent_after_flip=len(after),
            failed=len(failed),
            failed_after_rollback=sum(1 for r in failed if r[0] >= back),
            canary_after_rollback=sum(1 for r in after if r[0] >= back and r[2] == "canary"),
            slow=sum(1 for w in waits if w > SLOW),
            longest=max(waits, default=0.0),
        )
    finally:
        stop(proxy)
        for proc in ups.values():
            stop(proc)


def _fmt(v: float | None) -> str:
    return "never" if v is None else f"{v:.2f}"


def table(results: list[Result], rate: int, warmup: str) -> str:
    head = (
        f"rollback time at {rate} req/s offered, canary {CANARY_PERCENT}% (sticky), warm-up {warmup}\n"
        f"{'scenario':22s} {'req/s':>6s} {'event s':>8s} {'weight0 s':>9s} {'failed':>7s} "
        f"{'after rb':>8s} {'canary after rb':>15s} {'waits>5s':>8s} {'longest s':>9s}  reason"
    )
    rows = [head, "-" * len(head.splitlines()[-1])]
    for r in results:
        rows.append(
            f"{r.scenario.name:22s} {r.rate:6.0f} {_fmt(r.to_event):>8s} {_fmt(r.to_weight0):>9s} "
            f"{r.failed:7d} {r.failed_after_rollback:8d} {r.canary_after_rollback:15d} {r.slow:8d}"
            f" {r.longest:9.2f}  {r.reason[:70]}"
        )
    return "\n".join(rows)


async def main_async(opts: argparse.Namespace) -> int:
    profiles = [opts.only] if opts.only else list(PROFILES)
    results = []
    with tempfile.TemporaryDirectory(prefix="rollback-time-") as tmp:
        for profile in profiles:
            warmup = opts.warmup if opts.warmup is not None else PROFILES[profile][1]
            for failure in [opts.failure] if opts.failure else list(FAILURES):
                for _ in range(opts.repeat):
                    sc = Scenario(profile, failure)
                    print(f"running {sc.name} (warm-up {warmup:g}s) ...", file=sys.stderr, flush=True)
                    results.append(await run_scenario(sc, opts.rate, warmup, opts.settle, Path(tmp)))
    print(table(results, opts.rate, "the window" if opts.warmup is None else f"{opts.warmup:g}s"))
    if opts.json:
        print(json.dumps([r.__dict__ | {"scenario": r.scenario.name} for r in results], indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.rollback_time", description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=int, default=400, help="offered requests per second (default 400)")
    parser.add_argument("--warmup", type=float, default=None, help="healthy seconds before the flip (default: window)")
    parser.add_argument("--quick", action="store_true", help="10 s warm-ups")
    parser.add_argument("--settle", type=float, default=60.0, help="give up waiting for the rollback after this")
    parser.add_argument("--only", choices=list(PROFILES), help="one threshold profile")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--failure", choices=list(FAILURES), help="one failure mode")
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario (default 1)")
    parser.add_argument("--serve", nargs=2, metavar=("NAME", "PORT"), help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.serve:
        serve(opts.serve[0], int(opts.serve[1]))
        return 0
    if opts.quick and opts.warmup is None:
        opts.warmup = 10.0
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run(main_async(opts))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
