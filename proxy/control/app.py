"""Wires the proxy together: config, data plane, rollout controller, admin listener, reloads,
signals and graceful shutdown. `ProxyApp` is what `canary-proxy run` starts."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import IO

from proxy import __version__, native
from proxy.analysis.fastfail import FastFail
from proxy.analysis.faults import descriptor_budget
from proxy.analysis.manager import RolloutManager
from proxy.analysis.rollout import RolloutState, finished, reconcile
from proxy.analysis.stats import Stats
from proxy.config import Config, ConfigError, load_config
from proxy.control import tuning
from proxy.control.admin import AdminServer
from proxy.control.adminguard import exposure_problem, warn_if_insecure
from proxy.control.fleet.setup import FleetMember, make_member
from proxy.control.reload import ConfigWatcher
from proxy.control.tls_runtime import TLSRuntime, prepare
from proxy.control.workers import FollowerSync, LeaderSync, WorkerRole, merged_stats
from proxy.dataplane.accesslog import AccessLogger
from proxy.dataplane.plane import DataPlane
from proxy.dataplane.snapshot import Snapshot, compile_snapshot

log = logging.getLogger("canary_proxy")


class ProxyApp:
    """One proxy process. Start with :meth:`start`, stop with :meth:`stop` (or signals)."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        watch: bool = True,
        role: WorkerRole | None = None,
    ) -> None:
        self.config = config
        self.role = role  # None: a single process; else a worker of `run --workers N`
        self.clock = clock
        self.watch = watch
        horizon = int(max([600.0, *(r.window * 2 for r in config.rollouts)]))
        self.stats = Stats(window_horizon=horizon)
        self.loaded_at = clock()
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.plane: DataPlane | None = None
        self.controller: RolloutManager | None = None
        self.admin: AdminServer | None = None
        self.watcher: ConfigWatcher | None = None
        self.stopping = asyncio.Event()
        self._signals = 0
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[tuple[bool, str]]] = set()
        self._controller_task: asyncio.Task[None] | None = None
        self.leader_sync: LeaderSync | None = None
        self.follower_sync: FollowerSync | None = None
        self.remote_state: RolloutState | None = None  # followers: the leader's (first) rollout state
        self.remote_states: dict[str, RolloutState] = {}  # followers: every rollout's, by name
        self.fleet: FleetMember | None = None  # fleet mode: this replica's membership (worker 0 only)
        self._follower_fast_fail: dict[str, FastFail] = {}  # followers: by rollout name
        self.tls = TLSRuntime(self.stats)  # listener certificates, upstream TLS contexts, file watch

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, listen_sock: socket.socket | None = None, reuse_port: bool = False) -> None:
        """Compile the config, open both listeners, start the background loops."""
        loop = asyncio.get_running_loop()
        role = self.role
        follower = role is not None and not role.leader
        problem = exposure_problem(self.config) if not follower else None
        if problem is not None:
            raise ConfigError([problem], self.config.source_path)
        if not follower:
            warn_if_insecure(self.config)
            self.fleet = make_member(self.config, self.stats, lambda: self.config, workers=role is not None)
            seams = self.fleet.store if self.fleet is not None else None
            self.controller = RolloutManager(
                config=self.config,
                stats=self.stats,
                clock=self.clock,
                on_change=self._rollout_changed,
                observations=seams,
                gate=seams,
                store=seams,
                replica=self.fleet.replica if self.fleet is not None else None,
            )
            await self.controller.start()
            if self.fleet is not None:
                self.fleet.attach(self.controller)
                await self.fleet.start()
        self.plane = DataPlane(self.stats, loop)
        admin_budget = 0 if follower else self.config.admin_max_connections
        self.plane.fd_clients = descriptor_budget(self.config.limits.max_connections, admin_budget)
        listener_tls = self.tls.start(self.config, self.plane, prepare(self.config))
        self.plane.swap(self._compile(self.config, self._state()))
        if self.config.access_log.enabled:
            self.plane.access_log = AccessLogger(_open_log(self.config.access_log.path))
            self.plane.access_log.start()
        reuse_port = reuse_port or role is not None
        listen = self.config.listen
        timeout = self.config.timeouts.client_header  # a silent TLS client holds no slot for longer
        await self.plane.start(listen.host, listen.port, reuse_port, listen_sock, listener_tls, timeout)
        if role is not None and role.leader:
            self.leader_sync = LeaderSync(self, role.control)
            await self.leader_sync.start()
        if follower:
            assert role is not None
            self.follower_sync = FollowerSync(self, role)
            self._arm_follower_fast_fail()
            self.follower_sync.start()
        else:
            assert self.controller is not None
            self._controller_task = loop.create_task(self.controller.run())
            self.admin = AdminServer(self)
            await self.admin.start(self.config.admin.host, self.config.admin.port)
        if self.watch and self.config.source_path:
            self.watcher = ConfigWatcher(
                self.config.source_path,
                self.reload,
                known=self.config.source_hash,
                max_size=self.config.max_config_size,
            )
            self.watcher.start()
            self.tls.watch(lambda: self.config, self._request_reload)
        log.log(
            logging.DEBUG if follower else logging.INFO,  # `--workers N`: the leader says it once
            "canary-proxy %s listening on %s:%d (admin %s), config %s hash %s, hot path %s",
            __version__,
            self.config.listen.host,
            self.plane.bound_port,
            self.config.admin,
            self.config.source_path or "<inline>",
            self.config.source_hash,
            native.state(),
        )
        if follower:
            assert role is not None
            listen = self.config.listen
            log.info("worker %d/%d ready on %s:%d", role.index, role.count, listen.host, self.plane.bound_port)
        tuning.tune_malloc()
        tuning.freeze_loaded_objects()

    def _state(self) -> dict[str, RolloutState]:
        if self.controller is not None:
            return self.controller.states
        return self.remote_states

    def _arm_follower_fast_fail(self, fresh: bool | frozenset[str] = False) -> None:
        """In a follower, fast-fail asks the leader to trip (it owns the decision). Armed only while
        a trip can change anything; `fresh` (a new or reset rollout; or the names of those) forgets
        old consecutive errors."""
        sync = self.follower_sync
        if sync is None:
            return
        names = {r.name for r in self.config.rollouts}
        for name in [n for n in self._follower_fast_fail if n not in names]:
            self._follower_fast_fail.pop(name).disarm()
        for rollout in self.config.rollouts:
            ff = self._follower_fast_fail.get(rollout.name)
            if ff is None:
                ff = self._follower_fast_fail[rollout.name] = FastFail(
                    self.stats, functools.partial(_request_trip, sync, rollout.name), repeat=True
                )
            renew = fresh is True or (isinstance(fresh, frozenset) and rollout.name in fresh)
            ff.update(rollout, self.config.metrics.buckets, self.remote_states.get(rollout.name), renew)

    def apply_remote_state(self, state: RolloutState | Mapping[str, RolloutState] | None) -> None:
        """Followers: adopt the leader's rollout states (swap only when they changed)."""
        if isinstance(state, RolloutState):
            first = self.config.rollout
            states = {first.name: state} if first is not None else {}
        else:
            states = dict(state or {})
        old = self.remote_states
        if states == old:
            return
        self.remote_states = states
        first = self.config.rollout
        self.remote_state = states.get(first.name) if first is not None else None
        fresh = frozenset(
            name
            for name in states
            if old.get(name) is None or finished(old[name])
        )
        self._arm_follower_fast_fail(fresh=fresh)
        self._rollout_changed(states)

    def metrics_stats(self) -> Stats:
        """The counters /metrics shows: this process', plus every worker's in a leader."""
        if self.leader_sync is None:
            return self.stats
        return merged_stats(self.stats, self.leader_sync.peer_counters())

    def _compile(self, config: Config, state: RolloutState | Mapping[str, RolloutState] | None) -> Snapshot:
        assert self.plane is not None
        return compile_snapshot(config, self.stats, self.plane.pools, state, self.loaded_at)

    def _rollout_changed(self, state: RolloutState | Mapping[str, RolloutState] | None) -> None:
        """The controller moved a step or tripped: rebuild the weights, swap one reference."""
        if self.plane is not None:
            self.plane.swap(self._compile(self.config, state))

    async def reload(self, reason: str = "file") -> tuple[bool, str]:
        """Load, validate and compile the config file; swap it in only if all of that succeeded.

        Returns (ok, message): the new hash or "unchanged", else every error with its key path.
        Nothing changes before the new snapshot is compiled; then one reference is swapped, so
        requests in flight finish on the snapshot they started with.
        """
        async with self._reload_lock:
            old = self.config
            path = old.source_path
            if not path:
                return False, "the config was not loaded from a file"
            try:
                # In a thread: a slow disk or a big file must not stall the data plane.
                new = await asyncio.to_thread(load_config, path, None, old.max_config_size)
                if new.source_hash == old.source_hash and reason == "file":
                    # An editor touched the file, or a bad edit was reverted: nothing to swap.
                    if self.last_error is not None:
                        log.info("config file is valid again (hash %s); error cleared", new.source_hash)
                    self.last_error = self.last_error_at = None
                    return True, "unchanged"
                if (new.listen, new.admin) != (old.listen, old.admin):
                    log.warning("listen/admin address changes need a restart; keeping the old listeners")
                    new = replace(new, listen=old.listen, admin=old.admin)
                if new.fleet != old.fleet:
                    log.warning("fleet section changes need a restart; keeping the old one")
                    new = replace(new, fleet=old.fleet)
                if (new.tls is None) != (old.tls is None):
                    log.warning("turning the listener's TLS on or off needs a restart; keeping it as it is")
                    new = replace(new, tls=old.tls)
                # Certificates are read again on every reload (in a thread, like the file).
                tls_ready = await asyncio.to_thread(prepare, new)
                # Compile against the state the controller *would* adopt, without touching it.
                tentative: dict[str, RolloutState] = {}
                if self.controller is None:
                    tentative = self._state()  # a follower: the leader re-sends it if it changes
                else:
                    current = self.controller.states
                    # Rollouts added by this reload: their state files are read now, before the
                    # commit (a bad one gives a held state; it never fails the commit).
                    added = self.controller.preload(new)
                    for ro in new.rollouts:
                        canary = new.upstreams.get(ro.canary)
                        version = canary.version if canary is not None else None
                        saved = current.get(ro.name) or added.get(ro.name)
                        tentative[ro.name] = reconcile(saved, ro, version, self.clock())
                assert self.plane is not None
                loaded_at = self.clock()
                snapshot = compile_snapshot(new, self.stats, self.plane.pools, tentative, loaded_at)
            except Exception as exc:
                if isinstance(exc, ConfigError):
                    message = "; ".join(exc.errors)
                else:  # a bug, not a bad file: still never worth taking the proxy down
                    log.exception("config reload (%s) crashed", reason)
                    message = f"internal error while loading the config: {exc!r}"
                self.stats.reloads["failure"] += 1
                self.last_error = message
                self.last_error_at = self.clock()
                log.error("config reload (%s) refused, old config keeps serving: %s", reason, message)
                if self.controller is not None:
                    self.controller.record_event("reload_failed", message, {"reason": reason})
                return False, message
            # Commit. No await from here on: nothing can observe a half-applied reload.
            try:
                if self.controller is not None:
                    state = self.controller.reconfigure(new)
                    if state != tentative:  # e.g. a rollout added by this reload found a state file
                        snapshot = compile_snapshot(new, self.stats, self.plane.pools, state, loaded_at)
            except Exception as exc:  # a bug: still reported where operators look
                log.exception("config reload (%s) failed while committing", reason)
                self.stats.reloads["failure"] += 1
                self.last_error = f"internal error while applying the config: {exc!r}"
                self.last_error_at = self.clock()
                return False, self.last_error
            if self.watcher is not None:
                self.watcher.max_size = new.max_config_size
            self.tls.commit(new, self.plane, tls_ready)
            self.config = new
            self.loaded_at = loaded_at
            self.last_error = self.last_error_at = None
            self.plane.swap(snapshot)  # also retires the pools of removed endpoints
            self._arm_follower_fast_fail()  # a follower picks up a changed fast_fail setting
            self.stats.reloads["success"] += 1
            # With `--workers N` every worker reloads; only the leader (or a lone process) says so.
            quiet = self.role is not None and not self.role.leader
            log.log(logging.DEBUG if quiet else logging.INFO, "config reloaded (%s): hash %s", reason, new.source_hash)
            if self.controller is not None:
                self.controller.record_event(
                    "reload", f"config {new.source_hash} loaded ({reason})", {"hash": new.source_hash}
                )
            return True, new.source_hash

    def install_signals(self) -> None:
        """SIGTERM/SIGINT drain (a second one exits at once); SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)

    def _on_stop_signal(self, signum: int = signal.SIGTERM) -> None:
        self._signals += 1
        if self._signals > 1:
            # At once means at once: no draining, no task cancellation, no thread joins.
            log.warning("second stop signal (%s): exiting now", signal.Signals(signum).name)
            for handler in logging.getLogger().handlers:
                with contextlib.suppress(Exception):
                    handler.flush()
            os._exit(128 + signum)  # the shell's convention for death by signal
        log.info("%s received: draining", signal.Signals(signum).name)
        self.stopping.set()

    def _request_reload(self, reason: str) -> None:
        """Reload soon (debounced with file events when the config file is watched)."""
        if self.watcher is not None:
            self.watcher.request(reason)
        else:
            task = asyncio.get_running_loop().create_task(self.reload(reason))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _on_hup(self) -> None:
        if self.plane is None:
            log.warning("SIGHUP before the proxy started: ignored (the file is read at start)")
            return
        log.info("SIGHUP received: reloading the config")
        self._request_reload("SIGHUP")  # debounced together with the file events

    @property
    def draining(self) -> bool:
        return self.plane is not None and self.plane.draining

    async def stop(self) -> bool:
        """Drain in-flight work within `shutdown_grace`, then close everything.

        Returns True when every client connection finished on its own (nothing was cut).
        """
        clean = True
        if self.plane is not None:
            # First: /readyz turns 503 and the listener closes at once. A reload while draining
            # is harmless (in-flight requests keep their snapshot).
            clean = await self.plane.drain(self.config.shutdown_grace)
        if self.watcher is not None:
            await self.watcher.stop()  # its watch thread must not outlive the loop
            self.watcher = None
        await self.tls.stop()
        for task in list(self._tasks):
            task.cancel()
        if self._controller_task is not None:
            self._controller_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._controller_task
            self._controller_task = None
        if self.follower_sync is not None:
            await self.follower_sync.stop()
            self.follower_sync = None
        if self.fleet is not None:
            await self.fleet.stop()
            self.fleet = None
        if self.controller is not None:
            await self.controller.stop()
        if self.leader_sync is not None:
            await self.leader_sync.stop()
            self.leader_sync = None
        if self.admin is not None:
            await self.admin.stop()
            self.admin = None
        if self.plane is not None:
            if self.plane.access_log is not None:
                await self.plane.access_log.close()
                self.plane.access_log = None
            await self.plane.close()
        return clean

    async def run_forever(self) -> int:
        """Run until SIGTERM/SIGINT, then drain; returns the exit code (0 after a drain, even one
        the grace period cut short: the stop was asked for and done)."""
        self.install_signals()
        await self.stopping.wait()
        log.info("stop signal: draining (grace %gs)", self.config.shutdown_grace)
        clean = await self.stop()
        log.info("stopped%s", "" if clean else " (grace period over: some connections were cut)")
        return 0


def _request_trip(sync: FollowerSync, rollout: str, why: str) -> None:
    sync.request_trip(why, rollout)


def _open_log(path: str | None) -> IO[str] | None:
    return open(path, "a", buffering=1) if path else None
