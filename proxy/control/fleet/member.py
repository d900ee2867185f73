"""One replica's fleet loop: lease, state sync, latches, evidence, reports. Runs on the event loop
beside the data plane and never blocks it: every Redis call is awaited here, with short timeouts.

Each round (every 0.25 s, at once when pub/sub says a state changed or a trip wants out):
renew or try the lease; read each rollout's state and apply a new version; publish local trips
(latch-only) and the leader's decisions (fenced); once a second push evidence, report in, read the
fleet's reports and verdicts, and (leader) merge the fleet's window and publish the verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import replace

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from proxy.analysis.controller import RolloutController
from proxy.analysis.manager import RolloutManager
from proxy.analysis.rollout import Command, RolloutEvent, canary_weight, reconcile
from proxy.analysis.stats import Stats
from proxy.config.model import Config, Fleet, Rollout
from proxy.control.fleet import keys as K
from proxy.control.fleet.codec import RemoteState, decode_state, encode_state
from proxy.control.fleet.commands import run_command
from proxy.control.fleet.connection import Backoff, LinkState, make_client
from proxy.control.fleet.errors import DOWN
from proxy.control.fleet.evidence import EvidenceMerger, EvidencePusher, canary_version
from proxy.control.fleet.roster import Roster
from proxy.control.fleet.store import FleetStore, PendingWrite

log = logging.getLogger("canary_proxy.fleet")
TICK = 0.25


def rollouts_of(config: Config) -> list[Rollout]:
    """The rollouts of a config, each keyed by its name."""
    return list(config.rollouts)


class FleetMember:
    """Fleet membership of one replica (with `--workers N`: of worker 0, which owns the controller)."""

    def __init__(
        self, fleet: Fleet, replica: str, stats: Stats, get_config: Callable[[], Config], *, lag: int = 1
    ) -> None:
        self.fleet = fleet
        self.replica = replica
        self.instance = f"{replica} {secrets.token_hex(4)}"  # two processes named alike never share a lease
        self.stats = stats
        self.get_config = get_config
        self.keys = K.Keys(fleet.namespace)
        self.link = LinkState(fleet.redis)
        self.merger = EvidenceMerger(self.keys)
        self.pusher = EvidencePusher(self.keys, lag)
        self.store = FleetStore(stats, self.link, self.merger)
        self.manager: RolloutManager | None = None
        self.client: Redis | None = None
        self.roster = Roster(self.keys, self._complain)  # who reports in, the leader's verdicts
        self._missing: set[str] = set()  # rollouts whose state key does not exist
        self._garbage: set[str] = set()  # rollouts whose state key holds something not ours
        self._complained: set[str] = set()
        self._lease_at = -1e9
        self._second = 0
        self._tasks: list[asyncio.Task[None]] = []

    def attach(self, manager: RolloutManager) -> None:
        """The rollouts (their controllers) whose states this member keeps in sync."""
        self.manager = manager

    def controller(self, name: str) -> RolloutController | None:
        """The controller of rollout `name`."""
        return self.manager.controller(name) if self.manager is not None else None

    async def start(self) -> None:
        """Create the client (no I/O yet) and start the loop and the pub/sub listener."""
        self.client = make_client(self.fleet.redis)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run()), loop.create_task(self._listen())]

    async def stop(self) -> None:
        """Publish a rollback still waiting for Redis (briefly), stop the loops, close the connections."""
        if self.store.latches and self.client is not None and self.link.connected:
            for rollout in rollouts_of(self.get_config()):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._publish_latch(self.client, rollout), 1.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()
            self.client = None

    # -- loops ---------------------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = Backoff()
        while True:
            wait = TICK
            try:
                await self._round()
                self.link.up()
                backoff.reset()
            except DOWN as exc:
                self.link.down(exc)
                self._lose_lease(None)
                self._lease_at = -1e9  # the next round starts with a real round trip
                await self._drop_connections()
                wait = backoff.next()
            except ResponseError as exc:  # Redis answers but refuses (foreign data, a read-only replica)
                self.link.up()
                self._complain(f"round:{str(exc)[:60]}", f"Redis refused a command: {exc}")
                wait = 1.0
            except Exception:  # a bug must not end fleet membership; the next round tries again
                log.exception("fleet: round failed")
                wait = 1.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.store.wake.wait(), wait)
            self.store.wake.clear()

    async def _drop_connections(self) -> None:
        """After a failure every pooled connection is suspect (a restarted Redis closed them all):
        start afresh rather than discover them one failure (and one log line) at a time."""
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.connection_pool.disconnect()

    async def _listen(self) -> None:
        """Pub/sub: a state write anywhere wakes the loop at once (polling is the safety net)."""
        backoff = Backoff()
        while True:
            client = self.client
            if client is None:
                return
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self.keys.channel)
                backoff.reset()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                    if message is not None:
                        self.store.wake.set()
            except (RedisError, *DOWN):
                pass
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(backoff.next())

    async def _round(self) -> None:
        client = self.client
        assert client is not None
        config = self.get_config()
        rollouts = rollouts_of(config)
        await self._lease(client)
        self.link.up()  # Redis answered: the rest of the round may act on that
        for rollout in rollouts:
            await self._read_state(client, rollout, config)
            await self._publish_latch(client, rollout)
            await self._publish_pending(client, rollout)
            await self._bootstrap(client, rollout, config)
        now = time.time()
        if int(now) != self._second:
            self._second = int(now)
            await self.pusher.push(client, config, rollouts, self.stats)
            leader = self.store.is_leader()
            for rollout in rollouts:
                if leader:
                    await self.merger.refresh(client, config, rollout, now)
                    await self.roster.publish_verdict(client, self.controller(rollout.name), rollout, self.replica)
            states = self.manager.states if self.manager is not None else {}
            extra = {"leader": leader, "versions": {r.name: self.store.applied.get(r.name) for r in rollouts},
                     "evidence_pushed_at": self.pusher.last_push}  # fmt: skip
            await self.roster.report(client, self.replica, states, rollouts, extra, now)
            await self.roster.read(client, rollouts, now, prune=self.store.is_leader())

    # -- lease ----------------------------------------------------------------------------------------

    async def _lease(self, client: Redis) -> None:
        lease = self.fleet.lease
        started = time.monotonic()
        if started - self._lease_at < min(lease / 4, 1.0):
            return
        ms = int(lease * 1000)
        value = str(await client.eval(K.LEASE, 2, self.keys.leader, self.keys.fence, self.instance, ms,
                                      self.store.lease_value or ""))  # fmt: skip
        self._lease_at = started
        holder = value.split(" ", 1)[0]
        self.store.leader = holder
        if value.startswith(self.instance + " "):
            if self.store.lease_value is None:
                log.info("fleet: this replica (%s) is now the leader (fencing token %s)", self.replica,
                         value.rsplit(" ", 1)[-1])  # fmt: skip
            self.store.lease_value = value
            # Act as leader for a little less than the lease, so a slow clock never overlaps a successor.
            self.store.lease_until = started + lease * 0.8
        else:
            self._lose_lease(holder)

    def _lose_lease(self, holder: str | None) -> None:
        if self.store.lease_value is not None:
            log.warning("fleet: this replica is no longer the leader (%s)", f"now {holder}" if holder else "Redis lost")
        self.store.lease_value = None
        self.store.pending.clear()

    # -- state ----------------------------------------------------------------------------------------

    async def _read_state(self, client: Redis, rollout: Rollout, config: Config) -> None:
        name = rollout.name
        key = self.keys.state(name)
        raw: object
        try:
            raw = await client.get(key)
        except ResponseError as exc:  # e.g. WRONGTYPE: someone else's data under our key
            raw = exc
        if raw is None:
            self._missing.add(name)
            return
        self._missing.discard(name)
        try:
            doc = decode_state(raw)
        except ValueError as exc:
            self._garbage.add(name)
            self._complain(key, str(exc))
            return
        self._garbage.discard(name)
        self._apply(rollout, config, doc)

    def _apply(self, rollout: Rollout, config: Config, doc: RemoteState) -> None:
        """A state version read from Redis: apply it here (once), as this replica's config sees it."""
        name = rollout.name
        store = self.store
        first = name not in store.applied
        store.remote[name] = doc
        controller = self.controller(name)
        if controller is None:
            return
        version = canary_version(config, rollout)
        mine = (rollout.canary, version)
        if name in store.latches and doc.state.phase != "rolled_back" and (doc.state.canary,
                                                                           doc.state.canary_version) == mine:
            return  # our own rollback goes in first; applying this would un-latch us for a moment
        now = time.time()
        view = store.view(doc.state, rollout, version, now)
        if store.applied.get(name) != doc.version:
            store.applied[name] = doc.version
            controller.adopt(view, [] if first else list(doc.events))
            log.info("fleet: rollout %s state v%d applied (%s, canary weight %s) from %s", name, doc.version,
                     view.phase, canary_weight(view, rollout), doc.by)  # fmt: skip
        # The leader also publishes what its config changes (checked on every read: a reload may
        # have changed the config since this version was applied).
        if not store.is_leader() or name in store.pending:
            return
        if view.phase == "held":
            # The leader's config names another canary (version): it starts afresh, which also
            # clears a latched rollback, as a new version does on a single node.
            new = reconcile(None, rollout, version, now)
            msg = f"new canary {rollout.canary} version {version} (fleet had {doc.state.canary} version " \
                  f"{doc.state.canary_version}): rollout restarts"  # fmt: skip
            store.pending[name] = PendingWrite(doc.version, new, (RolloutEvent("reset", now, msg, {}),))
        elif view != doc.state:
            store.pending[name] = PendingWrite(doc.version, view, ())  # e.g. the steps changed

    async def _bootstrap(self, client: Redis, rollout: Rollout, config: Config) -> None:
        """The leader writes a state where there is none (or only garbage): its own if it had one."""
        name = rollout.name
        if not self.store.is_leader() or name in self.store.pending or name in self.store.latches:
            return
        if name not in self._missing and name not in self._garbage:
            return
        controller = self.controller(name)
        local = controller.state if controller is not None else None
        now = time.time()
        if local is None or local.phase == "held":
            local = reconcile(None, rollout, canary_version(config, rollout), now)
        base = self.store.applied.get(name, 0) if name in self._garbage else 0
        if name in self._garbage:
            log.warning("fleet: replacing unreadable state of rollout %s with this leader's (%s)", name, local.phase)
        await self._write_and_adopt(client, rollout, PendingWrite(base, local, ()))

    async def _publish_pending(self, client: Redis, rollout: Rollout) -> None:
        pending = self.store.pending.pop(rollout.name, None)
        if pending is not None and self.store.is_leader():
            await self._write_and_adopt(client, rollout, pending)

    async def _write_and_adopt(self, client: Redis, rollout: Rollout, pending: PendingWrite) -> bool:
        version = await self.write(client, rollout, pending, fenced=True)
        if version is None:
            return False
        controller = self.controller(rollout.name)
        if controller is not None:
            controller.adopt(pending.state, list(pending.events), webhook=True)
        return True

    async def write(self, client: Redis, rollout: Rollout, pending: PendingWrite, *, fenced: bool) -> int | None:
        """Compare-and-set; fenced: only while our lease is the one in Redis. The new version, or None."""
        name = rollout.name
        lease = self.store.lease_value or "" if fenced else ""
        if fenced and not lease:
            return None
        # Events name the replica that caused them, also where other replicas log them.
        events = [e if "replica" in e.data else replace(e, data={**e.data, "replica": self.replica})
                  for e in pending.events]  # fmt: skip
        payload = encode_state(pending.state, self.replica, time.time(), events)
        result = await client.eval(K.WRITE, 2, self.keys.state(name), self.keys.leader, pending.base_version, lease,
                                   payload, self.keys.channel, name)  # fmt: skip
        code = int(result[0])
        if code > 0:
            doc = RemoteState(code, pending.state, self.replica, time.time(), pending.events)
            self.store.remote[name] = doc
            self.store.applied[name] = code
            self._missing.discard(name)
            self._garbage.discard(name)
            return code
        if code == -1:
            self._lose_lease("lease lost before the write")
        elif code == -2:
            self._complain(self.keys.state(name), "unreadable state; only the leader replaces it")
        return None

    async def _publish_latch(self, client: Redis, rollout: Rollout) -> None:
        """A local rollback, into Redis with the latch-only script."""
        name = rollout.name
        state = self.store.latches.get(name)
        if state is None:
            return
        now = time.time()
        msg = f"canary {rollout.canary} rolled back on replica {self.replica}: {state.reason}"
        events = [RolloutEvent("rollback", state.changed_at, msg, {"replica": self.replica, "reason": state.reason})]
        full = encode_state(state, self.replica, now, events)
        result = await client.eval(K.LATCH, 1, self.keys.state(name), state.canary, state.canary_version or "",
                                   state.reason or "", state.changed_at, json.dumps([e.to_dict() for e in events]),
                                   self.replica, full, self.keys.channel, name, now)  # fmt: skip
        code, what = int(result[0]), str(result[1])
        if code > 0:
            del self.store.latches[name]
            if what == "ok":
                self.store.applied[name] = code
                log.info("fleet: rollback of %s latched for the fleet (state v%d)", rollout.canary, code)
        elif code == -3:
            del self.store.latches[name]
            log.warning("fleet: local rollback of %s not published: the fleet moved to another canary version",
                        rollout.canary)  # fmt: skip
        else:
            self._complain(self.keys.state(name), "unreadable state; the latch waits for the leader to replace it")

    async def command(self, command: Command, reason: str | None, *, rollout: str, full: bool = False) -> None:
        """Apply an operator command fleet-wide (see `proxy.control.fleet.commands.run_command`)."""
        await run_command(self, command, reason, rollout, full)

    def _complain(self, key: str, what: str) -> None:
        """Foreign data under our keys: one log line per key, then silence."""
        if key in self._complained:
            return
        if len(self._complained) > 10_000:
            self._complained.clear()
        self._complained.add(key)
        log.warning("fleet: ignoring unexpected data in %s: %s", key, what)
