"""Wires the proxy together: config, data plane, rollout controller, admin listener, reloads,
signals and graceful shutdown. `ProxyApp` is what `canary-proxy run` starts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Callable
from typing import IO

from proxy import __version__
from proxy.accesslog import AccessLogger
from proxy.admin import AdminServer
from proxy.analysis.controller import RolloutController
from proxy.analysis.rollout import RolloutState
from proxy.compile import Snapshot, compile_snapshot
from proxy.config import Config, ConfigError, load_config
from proxy.dataplane import DataPlane
from proxy.reload import ConfigWatcher
from proxy.stats import Stats

log = logging.getLogger("canary_proxy")


class ProxyApp:
    """One proxy process. Start with :meth:`start`, stop with :meth:`stop` (or signals)."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time, watch: bool = True) -> None:
        self.config = config
        self.clock = clock
        self.watch = watch
        horizon = int(max(600.0, (config.rollout.window * 2) if config.rollout else 0.0))
        self.stats = Stats(window_horizon=horizon)
        self.loaded_at = clock()
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.plane: DataPlane | None = None
        self.controller: RolloutController | None = None
        self.admin: AdminServer | None = None
        self.watcher: ConfigWatcher | None = None
        self.stopping = asyncio.Event()
        self._signals = 0
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[tuple[bool, str]]] = set()
        self._controller_task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, listen_sock: socket.socket | None = None, reuse_port: bool = False) -> None:
        """Compile the config, open both listeners, start the background loops."""
        loop = asyncio.get_running_loop()
        self.controller = RolloutController(
            config=self.config, stats=self.stats, clock=self.clock, on_change=self._rollout_changed
        )
        await self.controller.start()
        self.plane = DataPlane(self.stats, loop)
        self.plane.swap(self._compile(self.config, self.controller.state))
        if self.config.access_log.enabled:
            self.plane.access_log = AccessLogger(_open_log(self.config.access_log.path))
            self.plane.access_log.start()
        await self.plane.start(self.config.listen.host, self.config.listen.port, reuse_port, listen_sock)
        self._controller_task = loop.create_task(self.controller.run())
        self.admin = AdminServer(self)
        await self.admin.start(self.config.admin.host, self.config.admin.port)
        if self.watch and self.config.source_path:
            self.watcher = ConfigWatcher(self.config.source_path, self.reload)
            self.watcher.start()
        log.info(
            "canary-proxy %s listening on %s:%d (admin %s), config %s hash %s",
            __version__,
            self.config.listen.host,
            self.plane.bound_port,
            self.config.admin,
            self.config.source_path or "<inline>",
            self.config.source_hash,
        )

    def _compile(self, config: Config, state: RolloutState | None) -> Snapshot:
        assert self.plane is not None
        return compile_snapshot(config, self.stats, self.plane.pools, state, self.loaded_at)

    def _rollout_changed(self, state: RolloutState) -> None:
        """The controller moved a step or tripped: rebuild the weights, swap one reference."""
        if self.plane is not None:
            self.plane.swap(self._compile(self.config, state))

    async def reload(self, reason: str = "file") -> tuple[bool, str]:
        """Load, validate and compile the config file; swap it in only if all of that succeeded."""
        async with self._reload_lock:
            path = self.config.source_path
            try:
                new = load_config(path)
                if (new.listen, new.admin) != (self.config.listen, self.config.admin):
                    log.warning("listen/admin address changes need a restart; keeping the old listeners")
                state = self.controller.reconfigure(new) if self.controller is not None else None
                assert self.plane is not None
                snapshot = compile_snapshot(new, self.stats, self.plane.pools, state)
            except ConfigError as exc:
                self.stats.reloads["failure"] += 1
                self.last_error = "; ".join(exc.errors)
                self.last_error_at = self.clock()
                log.error("config reload (%s) refused, old config keeps serving: %s", reason, self.last_error)
                if self.controller is not None:
                    self.controller.record_event("reload_failed", self.last_error, {})
                return False, self.last_error
            if new.source_hash == self.config.source_hash and reason == "file":
                self.last_error = self.last_error_at = None
                return True, "unchanged"
            self.config = new
            self.loaded_at = snapshot.loaded_at
            self.last_error = None
            self.last_error_at = None
            assert self.plane is not None
            self.plane.swap(snapshot)
            self.stats.reloads["success"] += 1
            log.info("config reloaded (%s): hash %s", reason, new.source_hash)
            if self.controller is not None:
                self.controller.record_event("reload", f"config {new.source_hash} loaded ({reason})", {})
            return True, new.source_hash

    def install_signals(self) -> None:
        """SIGTERM/SIGINT drain (a second one exits at once); SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)

    def _on_stop_signal(self) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second stop signal: exiting now")
            raise SystemExit(1)
        self.stopping.set()

    def _on_hup(self) -> None:
        if self.watcher is not None:
            self.watcher.request("SIGHUP")
        else:
            task = asyncio.get_running_loop().create_task(self.reload("SIGHUP"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @property
    def draining(self) -> bool:
        return self.plane is not None and self.plane.draining

    async def stop(self) -> bool:
        """Drain in-flight work within `shutdown_grace`, then close everything."""
        clean = True
        if self.plane is not None:
            clean = await self.plane.drain(self.config.shutdown_grace)
        if self.watcher is not None:
            await self.watcher.stop()
        if self._controller_task is not None:
            self._controller_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._controller_task
            self._controller_task = None
        if self.controller is not None:
            await self.controller.stop()
        if self.admin is not None:
            await self.admin.stop()
        if self.plane is not None:
            if self.plane.access_log is not None:
                await self.plane.access_log.close()
            await self.plane.close()
        return clean

    async def run_forever(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit code."""
        self.install_signals()
        await self.stopping.wait()
        log.info("stop signal: draining (grace %.0fs)", self.config.shutdown_grace)
        clean = await self.stop()
        log.info("stopped%s", "" if clean else " (grace period over: some connections were cut)")
        return 0


def _open_log(path: str | None) -> IO[str] | None:
    return open(path, "a", buffering=1) if path else None  # noqa: SIM115
