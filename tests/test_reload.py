"""Hot reload against the real proxy, real upstreams, real files and a real watcher.

The config file is rewritten the ways operators and Kubernetes do it: atomic rename, `cp` over
the file, an editor's rename-then-write, a plain in-place write, and the ConfigMap `..data`
symlink swap. Upstreams answer with their name, and splits are all-or-nothing, so "the split
follows the new config" is an exact check rather than a statistical one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from conftest import ProxyProcess, Upstream, config_text, wait_running
from support.polling import holds, wait_for, wait_until, wait_until_sync

from proxy.analysis.rollout import RolloutState
from proxy.analysis.statefile import save_state
from proxy.control.app import ProxyApp

StartProxy = Callable[..., Awaitable[ProxyApp]]
StartUpstream = Callable[..., Awaitable[Upstream]]

SPLIT = "  - name: default\n    split: {{stable: {stable}, canary: {canary}}}\n"
BETA = "  - name: beta\n    match: {headers: {x-canary: {exact: always}}}\n    to: canary\n"


def routes_to(target: str | None) -> str:
    """All traffic to `target`; None gives an invalid split (weights sum to 95)."""
    weights = {"stable": (100, 0), "canary": (0, 100), None: (95, 0)}[target]
    return SPLIT.format(stable=weights[0], canary=weights[1])


def text_for(stable: Upstream, canary: Upstream, target: str | None, rev: int = 0, extra: str = "") -> str:
    # The revision comment makes every write a real change of the file's bytes.
    return config_text(stable.url, canary.url, extra, routes_to(target)) + f"# rev {rev}\n"


def data_url(app: ProxyApp, path: str = "/") -> str:
    assert app.plane is not None
    return f"http://127.0.0.1:{app.plane.bound_port}{path}"


def admin_url(app: ProxyApp, path: str) -> str:
    assert app.admin is not None
    return f"http://127.0.0.1:{app.admin.bound_port}{path}"


async def who(session: aiohttp.ClientSession, url: str, **kw: Any) -> str:
    async with session.get(url, **kw) as r:
        assert r.status == 200, await r.text()
        return (await r.text()).split()[0]


class ConfigDir:
    """Writes `canary.yaml` in `root` the ways it happens in the wild."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "canary.yaml"
        self.side = root.parent / f"{root.name}-side.yaml"  # cp's source, outside the watched dir
        self.n = 0

    def k8s(self, text: str) -> None:
        """What the kubelet does for a ConfigMap volume: new timestamped dir, `..data` symlink
        swapped by rename, `canary.yaml -> ..data/canary.yaml`, old dir removed."""
        self.n += 1
        name = f"..2026_11_27_10_00_00.{self.n:06d}"
        (self.root / name).mkdir()
        (self.root / name / "canary.yaml").write_text(text)
        os.symlink(name, self.root / "..data_tmp")
        os.rename(self.root / "..data_tmp", self.root / "..data")
        if not self.path.is_symlink():
            os.symlink("..data/canary.yaml", self.root / ".canary.yaml.link")
            os.rename(self.root / ".canary.yaml.link", self.path)
        for entry in os.listdir(self.root):
            if entry.startswith("..2026_") and entry != name:
                shutil.rmtree(self.root / entry)

    def rename(self, text: str) -> None:
        """An atomic save: write a temp file beside it, rename over."""
        tmp = self.root / ".canary.yaml.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.path)

    def cp(self, text: str) -> None:
        """`cp other.yaml canary.yaml`: truncates and rewrites the same inode."""
        assert not self.path.is_symlink()
        self.side.write_text(text)
        subprocess.run(["cp", str(self.side), str(self.path)], check=True)

    def editor(self, text: str) -> None:
        """vim's default save: rename the original to a backup, write a new file."""
        assert not self.path.is_symlink()
        os.replace(self.path, self.root / "canary.yaml~")
        self.path.write_text(text)

    def inplace(self, text: str) -> None:
        assert not self.path.is_symlink()
        self.path.write_text(text)


@dataclass(frozen=True)
class Hit:
    start: float
    end: float
    who: str | None
    error: str | None


async def hammer(url: str, hits: list[Hit], stop: asyncio.Event) -> None:
    """Requests back to back on one keep-alive connection until `stop`."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
        while not stop.is_set():
            t0 = time.monotonic()
            name: str | None = None
            error: str | None = None
            try:
                async with s.get(url) as r:
                    body = await r.text()
                    if r.status == 200:
                        name = body.split()[0]
                    else:
                        error = f"status {r.status}: {body!r}"
            except (aiohttp.ClientError, OSError) as exc:
                error = repr(exc)
            hits.append(Hit(t0, time.monotonic(), name, error))


# -- the proof: 100 rewrites under continuous traffic -------------------------------------------

MODES = ("k8s", "k8s", "rename", "cp", "editor", "inplace", "k8s", "rename")  # never cp/edit a symlink
CLIENTS = 4


async def test_100_rewrites_under_load(
    tmp_path: Path, proxy_factory: StartProxy, upstream_factory: StartUpstream
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    root = tmp_path / "config"
    root.mkdir()
    cdir = ConfigDir(root)
    first = text_for(stable, canary, "stable", rev=-1)
    cdir.k8s(first)
    app = await proxy_factory(first, watch=True, name="config/canary.yaml")
    assert app.plane is not None

    hits: list[Hit] = []
    stop = asyncio.Event()
    clients = [asyncio.create_task(hammer(data_url(app), hits, stop)) for _ in range(CLIENTS)]
    try:
        expected = "stable"
        periods: list[tuple[float, float, str]] = []  # (switch seen, next valid write, target)
        switched_at = since = time.monotonic()
        lags: list[float] = []

        def served_since(t: float, n: int = 2 * CLIENTS) -> Callable[[], bool]:
            return lambda: sum(1 for h in hits[-4 * n :] if h.start > t) >= n

        await wait_until(served_since(since), 5.0, "the clients to get going")
        for i in range(100):
            mode = MODES[i % len(MODES)]
            valid = i % 5 != 3  # 20 invalid files; the last write is valid
            target = ("canary" if expected == "stable" else "stable") if valid else None
            failures = app.stats.reloads["failure"]
            written_at = time.monotonic()
            getattr(cdir, mode)(text_for(stable, canary, target, rev=i))
            seen = len(hits)
            if target is not None:
                periods.append((switched_at, written_at, expected))

                def followed(t: str = target, w: float = written_at, n: int = seen) -> bool:
                    return any(h.start > w and h.who == t for h in hits[n:])

                # The target is 1 s; the hard bound leaves room for a loaded CI machine (checked below).
                await wait_until(followed, 3.0, f"write {i} ({mode}) to route everything to {target}")
                switched_at = since = next(h.end for h in hits[seen:] if h.start > written_at and h.who == target)
                lags.append(switched_at - written_at)
                expected = target
            else:
                await wait_until(
                    lambda f=failures: app.stats.reloads["failure"] > f, 2.0, f"invalid write {i} ({mode}) refused"
                )
                since = time.monotonic()
            await wait_until(served_since(since), 2.0, "traffic on the current config")
        periods.append((switched_at, time.monotonic(), expected))
        # The clients' keep-alive connections lived through every reload: still the first four.
        served = sorted(c.served for c in app.plane.clients)
    finally:
        stop.set()
        await asyncio.gather(*clients)

    failed = [h for h in hits if h.error is not None]
    assert not failed, f"{len(failed)} of {len(hits)} requests failed, first: {failed[0]}"
    for since, until, target in periods:
        window = [h for h in hits if since < h.start and h.end < until]
        assert window, "every config got traffic"
        wrong = [h for h in window if h.who != target]
        assert not wrong, f"{len(wrong)} requests went elsewhere than {target} after the switch"
    assert app.stats.reloads["success"] == 80
    assert app.stats.reloads["failure"] >= 20  # a reader can catch cp/in-place writes half done
    assert app.last_error is None
    assert len(served) == CLIENTS and sum(served) >= len(hits) - CLIENTS
    lags.sort()
    median, p95 = lags[len(lags) // 2], lags[int(len(lags) * 0.95)]
    print(f"reload lags: median {median:.3f}s, p95 {p95:.3f}s, max {lags[-1]:.3f}s")
    assert sum(lag < 1.0 for lag in lags) >= 0.95 * len(lags), f"more than 5% of reloads took over 1 s: {lags[-5:]}"
    assert lags[-1] < 3.0


# -- the individual ways of saving ---------------------------------------------------------------


async def test_cp_over_editor_rename_and_atomic_rename_are_seen(
    tmp_path: Path, proxy_factory: StartProxy, upstream_factory: StartUpstream
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    app = await proxy_factory(text_for(stable, canary, "stable"), watch=True)
    cdir = ConfigDir(tmp_path)
    async with aiohttp.ClientSession() as s:
        assert await who(s, data_url(app)) == "stable"
        for rev, (mode, target) in enumerate(
            [("cp", "canary"), ("editor", "stable"), ("rename", "canary"), ("inplace", "stable")], 1
        ):
            getattr(cdir, mode)(text_for(stable, canary, target, rev))
            answers: list[str] = []

            async def follows(t: str = target, out: list[str] = answers) -> bool:
                out.append(await who(s, data_url(app)))
                return out[-1] == t

            await wait_for(follows, 2.0, f"{mode} save to take effect")
            assert app.config.source_hash == _hash_of(cdir.path)
    assert app.stats.reloads == {"success": 4, "failure": 0}


async def test_kubernetes_configmap_symlink_swap(
    tmp_path: Path, proxy_factory: StartProxy, upstream_factory: StartUpstream
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    root = tmp_path / "cm"
    root.mkdir()
    cdir = ConfigDir(root)
    cdir.k8s(text_for(stable, canary, "stable"))
    app = await proxy_factory(text_for(stable, canary, "stable"), watch=True, name="cm/canary.yaml")
    async with aiohttp.ClientSession() as s:
        for rev, target in enumerate(["canary", "stable", "canary"], 1):
            cdir.k8s(text_for(stable, canary, target, rev))
            await wait_until(lambda r=rev: app.stats.reloads["success"] == r, 2.0, f"swap {rev} to reload")
            assert await who(s, data_url(app)) == target
    # The watched path never changed: only the `..data` link did.
    assert os.readlink(cdir.path) == "..data/canary.yaml"
    assert app.config.source_path == str(cdir.path)


async def test_invalid_file_keeps_old_config_until_a_good_one(
    tmp_path: Path, proxy_factory: StartProxy, upstream_factory: StartUpstream
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    app = await proxy_factory(text_for(stable, canary, "stable"), watch=True)
    good_hash = app.config.source_hash
    cdir = ConfigDir(tmp_path)
    async with aiohttp.ClientSession() as s:
        assert _reload_count(await _text(s, admin_url(app, "/metrics")), "failure") == 0
        cdir.rename(text_for(stable, canary, None, rev=1))
        await wait_until(lambda: app.stats.reloads["failure"] == 1, 2.0, "the bad file to be refused")

        assert _reload_count(await _text(s, admin_url(app, "/metrics")), "failure") == 1
        async with s.get(admin_url(app, "/status")) as r:
            doc = await r.json()
        error = doc["config"]["last_error"]
        assert error.startswith("routes[0].split: weights sum to 95, expected 100")
        assert doc["config"]["last_error_at"] is not None
        assert doc["config"]["hash"] == good_hash
        assert [await who(s, data_url(app)) for _ in range(5)] == ["stable"] * 5

        cdir.rename(text_for(stable, canary, "canary", rev=2))
        await wait_until(lambda: app.stats.reloads["success"] == 1, 2.0, "the good file to load")
        async with s.get(admin_url(app, "/status")) as r:
            doc = await r.json()
        assert doc["config"]["last_error"] is None and doc["config"]["last_error_at"] is None
        assert doc["config"]["hash"] == app.config.source_hash != good_hash
        assert await who(s, data_url(app)) == "canary"
        assert _reload_count(await _text(s, admin_url(app, "/metrics")), "failure") == 1
        assert _reload_count(await _text(s, admin_url(app, "/metrics")), "success") == 1


async def test_unreadable_yaml_reports_and_keeps_serving(
    proxy_factory: StartProxy, upstream_factory: StartUpstream
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    app = await proxy_factory(text_for(stable, canary, "stable"))
    path = Path(app.config.source_path)
    path.write_text("routes: [unclosed\n")
    ok, message = await app.reload("admin")
    assert not ok and message == app.last_error
    path.unlink()
    ok, message = await app.reload("admin")
    assert not ok and "cannot read config file" in message
    assert app.stats.reloads == {"success": 0, "failure": 2}
    async with aiohttp.ClientSession() as s:
        assert await who(s, data_url(app)) == "stable"


# -- signals -------------------------------------------------------------------------------------


async def test_sighup_reloads_without_a_watcher(proxy_factory: StartProxy, upstream_factory: StartUpstream) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    app = await proxy_factory(text_for(stable, canary, "stable"), watch=False)
    Path(app.config.source_path).write_text(text_for(stable, canary, "canary", rev=1))
    loop = asyncio.get_running_loop()
    app.install_signals()
    try:
        async with aiohttp.ClientSession() as s:
            # Nothing watches the file: the change alone does nothing.
            await holds(lambda: app.stats.reloads["success"] == 0, 0.3, "no reload without a watcher")
            assert await who(s, data_url(app)) == "stable"
            os.kill(os.getpid(), signal.SIGHUP)
            await wait_until(lambda: app.stats.reloads["success"] == 1, 2.0, "SIGHUP to reload")
            assert await who(s, data_url(app)) == "canary"
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def test_sighup_reloads_a_running_process(proxy_process: Callable[..., ProxyProcess]) -> None:
    pp = proxy_process(config_text("http://127.0.0.1:9", "http://127.0.0.1:9"))
    wait_running(pp)
    pp.proc.send_signal(signal.SIGHUP)
    wait_until_sync(lambda: any("config reloaded (SIGHUP)" in line for line in pp.lines), 5.0, "a SIGHUP reload")
    assert pp.proc.poll() is None  # SIGHUP's default action would have killed it


# -- what a reload keeps and what it drops ------------------------------------------------------


async def test_removed_endpoint_is_retired_unchanged_endpoint_keeps_its_connection(
    tmp_path: Path, proxy_factory: StartProxy, upstream_factory: StartUpstream
) -> None:
    gate = asyncio.Event()
    transports: dict[str, list[asyncio.BaseTransport]] = {"stable": [], "canary": [], "canary2": []}

    def handler(name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            t = request.transport
            assert t is not None
            if t not in transports[name]:
                transports[name].append(t)
            if request.path == "/slow":
                await asyncio.wait_for(gate.wait(), 10.0)
            return web.Response(text=f"{name} {request.path} " + "x" * 10_000)

        return handle

    stable = await upstream_factory("stable", handler("stable"))
    canary = await upstream_factory("canary", handler("canary"))
    canary2 = await upstream_factory("canary2", handler("canary2"))
    routes = BETA + routes_to("stable")
    app = await proxy_factory(config_text(stable.url, canary.url, routes=routes))
    assert app.plane is not None
    beta = {"x-canary": "always"}
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            assert await who(s, data_url(app)) == "stable"
            assert await who(s, data_url(app), headers=beta) == "canary"
        stable_pool = app.plane.pools.pools[f"127.0.0.1:{stable.port}"]
        # One request holds a canary connection; another opens a second one that goes idle.
        slow = asyncio.create_task(_get(s, data_url(app, "/slow"), headers=beta))
        await wait_until(lambda: bool(canary.seen) and canary.seen[-1]["path"] == "/slow", 5.0, "slow request")
        assert await who(s, data_url(app), headers=beta) == "canary"
        assert len(transports["canary"]) == 2 and len(transports["stable"]) == 1
        busy, idle = transports["canary"]

        Path(app.config.source_path).write_text(config_text(stable.url, canary2.url, routes=routes))
        ok, _ = await app.reload("test")
        assert ok
        await wait_until(idle.is_closing, 2.0, "the removed endpoint's idle connection to close")
        assert not busy.is_closing()  # in flight: it finishes first
        assert await who(s, data_url(app), headers=beta) == "canary2"

        gate.set()
        status, body = await slow
        assert status == 200 and body == "canary /slow " + "x" * 10_000
        await wait_until(busy.is_closing, 2.0, "the removed endpoint's busy connection to close after use")

        for _ in range(3):
            assert await who(s, data_url(app)) == "stable"
    # The unchanged endpoint kept its pool and its one upstream connection.
    assert app.plane.pools.pools[f"127.0.0.1:{stable.port}"] is stable_pool
    assert stable_pool.connects == 1 and len(transports["stable"]) == 1
    assert not transports["stable"][0].is_closing()
    assert f"127.0.0.1:{canary.port}" not in app.plane.pools.pools


async def test_in_flight_request_finishes_on_its_snapshot(
    proxy_factory: StartProxy, upstream_factory: StartUpstream
) -> None:
    gate = asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        await asyncio.wait_for(gate.wait(), 10.0)
        return web.Response(text="stable held\n")

    stable = await upstream_factory("stable", held)
    canary = await upstream_factory("canary")
    app = await proxy_factory(text_for(stable, canary, "stable"))
    async with aiohttp.ClientSession() as s:
        pending = asyncio.create_task(_get(s, data_url(app)))
        await wait_until(lambda: bool(stable.seen), 5.0, "the request to reach stable")
        Path(app.config.source_path).write_text(text_for(stable, canary, "canary", rev=1))
        assert (await app.reload("test"))[0]
        assert await who(s, data_url(app)) == "canary"
        gate.set()
        assert await pending == (200, "stable held\n")


# -- rollout state across reloads ---------------------------------------------------------------


def rollout_text(stable: Upstream, canary: Upstream, state_file: Path, version: str, rev: int) -> str:
    extra = (
        "rollout:\n  canary: canary\n  baseline: stable\n  steps: [10, 50, 90]\n  interval: 1h\n"
        f"  state_file: {state_file}\n"
    )
    text = config_text(stable.url, canary.url, extra, routes=SPLIT.format(stable=50, canary=50))
    return text.replace("version: v2", f"version: {version}") + f"# rev {rev}\n"


async def test_rollout_step_and_latch_survive_reload_unless_version_changes(
    tmp_path: Path, proxy_factory: StartProxy, upstream_factory: StartUpstream
) -> None:
    stable, canary = await upstream_factory("stable"), await upstream_factory("canary")
    state_file = tmp_path / "state.json"
    now = time.time()
    save_state(str(state_file), RolloutState("progressing", "canary", "v2", 1, now, now))
    app = await proxy_factory(rollout_text(stable, canary, state_file, "v2", 0))
    controller = app.controller
    assert controller is not None and app.plane is not None
    assert controller.state is not None and controller.state.step_index == 1

    def canary_share() -> float:
        assert app.plane is not None
        ((_, _, split),) = app.plane.snapshot.effective
        assert split is not None
        return dict(split)["canary"]

    assert canary_share() == 50.0
    path = Path(app.config.source_path)
    path.write_text(rollout_text(stable, canary, state_file, "v2", 1).replace("interval: 1h", "interval: 2h"))
    assert (await app.reload("test"))[0]
    assert controller.state is not None and controller.state.step_index == 1 and canary_share() == 50.0

    controller.command("rollback", "test")
    assert controller.state is not None and controller.state.phase == "rolled_back"
    path.write_text(rollout_text(stable, canary, state_file, "v2", 2))
    assert (await app.reload("test"))[0]
    assert controller.state is not None and controller.state.phase == "rolled_back"
    assert canary_share() == 0.0
    async with aiohttp.ClientSession() as s:
        assert {await who(s, data_url(app)) for _ in range(20)} == {"stable"}

    # A failed reload does not touch the state either.
    path.write_text(rollout_text(stable, canary, state_file, "v3", 3).replace("steps: [10, 50, 90]", "steps: [9"))
    assert not (await app.reload("test"))[0]
    assert controller.state is not None and controller.state.phase == "rolled_back"

    path.write_text(rollout_text(stable, canary, state_file, "v3", 4))
    assert (await app.reload("test"))[0]
    state = controller.state
    assert state is not None and (state.phase, state.step_index, state.canary_version) == ("progressing", 0, "v3")
    assert canary_share() == 10.0
    assert [e.kind for e in controller.events if e.kind in ("reload", "reload_failed", "reset")][-3:] == [
        "reload_failed",
        "reset",
        "reload",
    ]


# -- helpers -------------------------------------------------------------------------------------


async def _get(s: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, str]:
    async with s.get(url, **kw) as r:
        return r.status, await r.text()


async def _text(s: aiohttp.ClientSession, url: str) -> str:
    async with s.get(url) as r:
        return await r.text()


def _reload_count(metrics: str, result: str) -> float:
    prefix = f'canary_proxy_config_reloads_total{{result="{result}"}} '
    for line in metrics.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    raise AssertionError(f"no {prefix!r} in /metrics")


def _hash_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
