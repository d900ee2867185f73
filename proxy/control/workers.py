"""`canary-proxy run --workers N`: N processes sharing the data port (SO_REUSEPORT).

Worker 0 is the leader: it runs the admin listener and the one rollout controller. Every other
worker (a follower) syncs with it over a Unix socket twice a second: it sends its counters and its
completed per-second analysis slices, and gets the current rollout state back, which it applies to
its own routing. So there is one `/metrics` adding up all workers, one rollout state and one
decision-maker, and every worker follows a weight change or rollback within a second.

The master process only starts workers, forwards signals and restarts a worker that crashed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from proxy.analysis.statefile import state_from_dict, state_to_dict
from proxy.analysis.stats import RouteCounts, Stats, UpstreamStats

if TYPE_CHECKING:
    from proxy.control.view import AppView

log = logging.getLogger("canary_proxy.workers")

SYNC_EVERY = 0.5


@dataclass(frozen=True, slots=True)
class WorkerRole:
    index: int
    count: int
    control: str  # Unix socket path of the leader's sync endpoint

    @property
    def leader(self) -> bool:
        return self.index == 0


# -- counters: snapshot in a follower, merged in the leader ----------------------------------------


def counters_snapshot(stats: Stats) -> dict[str, Any]:
    """The cumulative counters of one process, JSON-ready."""
    return {
        "in_flight": stats.in_flight,
        "rejected": stats.rejected,
        "retries": stats.retries,
        "ejections": stats.ejections,
        "local_errors": stats.local_errors,
        "tls_handshake_errors": stats.tls_handshake_errors,
        "grpc": stats.grpc,
        "routes": [[rc.route, rc.upstream, rc.by_class] for rc in stats.route_counts.values()],
        "upstreams": {
            name: {
                "buckets": list(us.buckets),
                "counts": us.duration_counts,
                "sum": us.duration_sum,
                "count": us.duration_count,
                "errors": us.errors,
            }
            for name, us in stats.upstreams.items()
        },
        "mirrors": [
            [ms.route, ms.upstream, list(ms.buckets), ms.by_class, ms.skipped, ms.duration_counts, ms.duration_sum]
            for ms in stats.mirrors.values()
        ],
    }


def merged_stats(own: Stats, peers: list[dict[str, Any]]) -> Stats:
    """A scrape-time Stats: this process' counters plus every peer's latest snapshot."""
    out = Stats(window_horizon=1)
    out.reloads = dict(own.reloads)
    out.rollbacks = dict(own.rollbacks)
    for snap in [counters_snapshot(own), *peers]:
        out.in_flight += int(snap["in_flight"])
        out.rejected += int(snap["rejected"])
        for key in ("retries", "ejections", "local_errors", "tls_handshake_errors"):
            dst: dict[str, int] = getattr(out, key)
            for name, n in snap.get(key, {}).items():
                dst[name] = dst.get(name, 0) + int(n)
        for name, codes in snap.get("grpc", {}).items():
            grpc = out.grpc.setdefault(name, [0] * 17)
            for code, n in enumerate(codes[:17]):
                grpc[code] += int(n)
        for route, upstream, by_class in snap["routes"]:
            rc = out.route_counts.setdefault((route, upstream), RouteCounts(route, upstream))
            rc.by_class = [a + int(b) for a, b in zip(rc.by_class, by_class, strict=True)]
        for name, u in snap["upstreams"].items():
            buckets = tuple(float(b) for b in u["buckets"])
            us = out.upstreams.get(name)
            if us is None or us.buckets != buckets:
                us = out.upstreams[name] = UpstreamStats(name, buckets, 1)
            us.duration_counts = [a + int(b) for a, b in zip(us.duration_counts, u["counts"], strict=True)]
            us.duration_sum += float(u["sum"])
            us.duration_count += int(u["count"])
            us.errors = [a + int(b) for a, b in zip(us.errors, u["errors"], strict=True)]
        for route, upstream, buckets, by_class, skipped, counts, total in snap.get("mirrors", ()):
            ms = out.mirror_for(route, upstream, tuple(float(b) for b in buckets))
            ms.by_class = [a + int(b) for a, b in zip(ms.by_class, by_class, strict=True)]
            ms.skipped = [a + int(b) for a, b in zip(ms.skipped, skipped, strict=True)]
            ms.duration_counts = [a + int(b) for a, b in zip(ms.duration_counts, counts, strict=True)]
            ms.duration_sum += float(total)
    return out


# -- leader side ----------------------------------------------------------------------------------


class LeaderSync:
    """The leader's Unix-socket endpoint followers sync with."""

    def __init__(self, app: AppView, path: str) -> None:
        self.app = app
        self.path = path
        self.peers: dict[int, dict[str, Any]] = {}
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        webapp = web.Application()
        webapp.router.add_post("/sync", self.sync)
        self.runner = web.AppRunner(webapp, access_log=None)
        await self.runner.setup()
        await web.UnixSite(self.runner, self.path).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def peer_counters(self) -> list[dict[str, Any]]:
        return [p["counters"] for p in self.peers.values()]

    async def sync(self, request: web.Request) -> web.Response:
        body = await request.json()
        index = int(body["worker"])
        self.peers[index] = body
        app = self.app
        buckets = app.config.metrics.buckets
        for name, slices in body.get("slices", {}).items():
            window = app.stats.upstream(name, buckets).window
            for stamp, requests, errors, hist in slices:
                counts = {int(k): int(v) for k, v in hist.items()}
                window.merge_slice(int(stamp), int(requests), int(errors), counts)
        trip = body.get("trip")
        controller = app.controller
        theirs = body.get("states")
        if isinstance(theirs, dict) and theirs and controller is not None:
            # A restarted leader must not forget what its followers still hold (a rollback).
            try:
                controller.offer({str(k): state_from_dict(v) for k, v in theirs.items()})
            except ValueError as exc:
                log.warning("worker %d sent an unusable rollout state: %s", index, exc)
        if trip and controller is not None:
            rollout = body.get("trip_rollout")
            controller.trip(
                f"fast fail on worker {index}: {trip}",
                {"worker": index},
                rollout=rollout if isinstance(rollout, str) else None,
            )
        state = controller.state if controller is not None else None
        states = controller.states if controller is not None else {}
        return web.json_response(
            {
                "state": None if state is None else state_to_dict(state),
                "states": {name: state_to_dict(s) for name, s in states.items()},
                "config_hash": app.config.source_hash,
                "canary_try_timeouts": controller.canary_try_timeouts if controller is not None else {},
            }
        )


# -- follower side --------------------------------------------------------------------------------


class FollowerSync:
    """Pushes this worker's figures to the leader and applies the rollout state it answers with."""

    def __init__(self, app: AppView, role: WorkerRole) -> None:
        self.app = app
        self.role = role
        self.sent_upto = int(time.time()) - 1  # seconds <= this were already sent
        self.trip: str | None = None
        self.trip_rollout: str | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def request_trip(self, why: str, rollout: str | None = None) -> None:
        """Called from the hot path when fast-fail fires in this worker: sync at once."""
        self.trip = why
        self.trip_rollout = rollout
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def payload(self) -> dict[str, Any]:
        now_sec = int(time.time())
        upto = now_sec - 1  # only completed seconds, each sent once
        slices = {
            name: us.window.export_slices(self.sent_upto, upto)
            for name, us in self.app.stats.upstreams.items()
        }
        self.sent_upto = upto
        trip, self.trip = self.trip, None
        return {
            "worker": self.role.index,
            "pid": os.getpid(),
            "counters": counters_snapshot(self.app.stats),
            "slices": {k: v for k, v in slices.items() if v},
            "trip": trip,
            "trip_rollout": self.trip_rollout if trip else None,
            "states": {name: state_to_dict(s) for name, s in self.app.remote_states.items()},
        }

    async def _run(self) -> None:
        connector = aiohttp.UnixConnector(path=self.role.control)
        async with aiohttp.ClientSession(connector=connector) as session:
            while True:
                try:
                    async with session.post(
                        "http://leader/sync", json=self.payload(), timeout=aiohttp.ClientTimeout(total=2)
                    ) as resp:
                        answer = await resp.json()
                    raw_all = answer.get("states")
                    if isinstance(raw_all, dict):
                        self.app.apply_remote_state({k: state_from_dict(v) for k, v in raw_all.items()})
                    else:
                        raw = answer.get("state")
                        self.app.apply_remote_state(None if raw is None else state_from_dict(raw))
                    self._apply_try_timeouts(answer.get("canary_try_timeouts"))
                except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
                    log.debug("worker %d: sync with the leader failed: %s", self.role.index, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), SYNC_EVERY)
                self._wake.clear()


    def _apply_try_timeouts(self, timeouts: object) -> None:
        """The leader derives each canary's per-try timeout; every worker's data plane uses it."""
        if not isinstance(timeouts, dict):
            return
        buckets = self.app.config.metrics.buckets
        for name, seconds in timeouts.items():
            if isinstance(name, str) and isinstance(seconds, int | float) and name in self.app.config.upstreams:
                self.app.stats.upstream(name, buckets).try_timeout = float(seconds)


# -- master ---------------------------------------------------------------------------------------


def run_workers(config_path: str, count: int, log_level: str = "info") -> int:
    """Start `count` worker processes and supervise them until SIGTERM/SIGINT; returns the exit code."""
    control = os.path.join(tempfile.mkdtemp(prefix="canary-proxy-"), "leader.sock")
    procs: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False
    signals_seen = 0

    def spawn(index: int) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "proxy", "--log-level", log_level, "run", "-c", config_path]
        cmd += ["--workers", str(count), "--worker-index", str(index), "--control", control]
        return subprocess.Popen(cmd)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping, signals_seen
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
            signals_seen += 1
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    procs[0] = spawn(0)
    time.sleep(0.3)  # the leader opens the control socket first
    for i in range(1, count):
        procs[i] = spawn(i)
    log.info("started %d workers (pids %s)", count, ", ".join(str(p.pid) for p in procs.values()))
    codes: dict[int, int] = {}
    next_spawn: dict[int, float] = {}
    while True:
        time.sleep(0.1)
        for i, p in list(procs.items()):
            rc = p.poll()
            if rc is None:
                continue
            if stopping:
                codes[i] = rc
                del procs[i]
            elif time.monotonic() >= next_spawn.get(i, 0.0):
                log.error("worker %d (pid %d) exited with %d; restarting it", i, p.pid, rc)
                next_spawn[i] = time.monotonic() + 1.0  # a crash loop restarts at most once a second
                procs[i] = spawn(i)
        if stopping and not procs:
            break
    with contextlib.suppress(OSError):
        os.unlink(control)
        os.rmdir(os.path.dirname(control))
    return 0 if all(rc == 0 for rc in codes.values()) else 1
