"""The rollout keys that go beyond one canary and one ladder of weights: `rollouts:` (named
rollouts), step objects, progress deadlines, observe mode, Prometheus checks and webhooks.

Used by :mod:`proxy.config.loader`; every error carries its key path and line like the rest.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from yaml.nodes import MappingNode, ScalarNode

from proxy.config.model import Check, Gate, Rollout, Step, Webhook
from proxy.config.units import fmt_number, parse_webhook
from proxy.config.yamlnodes import Reader
from proxy.config.yamltree import Readers, Value

T = TypeVar("T")

STEP_KINDS = ("weight", "pause", "gate", "analysis")
EVENT_KINDS = ("step", "promoted", "rollback", "paused", "resumed", "reset", "stalled")  # what webhooks get
_NAME = re.compile(r"[A-Za-z0-9_.-]+")

ReadRollout = Callable[[Value], Rollout | None]


class RolloutKeys:
    """Readers for the rollout's newer keys, sharing the loader's Reader (and its error list)."""

    def __init__(self, reader: Reader) -> None:
        self.r = reader

    def readers(self) -> Readers:
        """The extra `rollout:` keys and their readers (merged into the loader's record)."""
        r = self.r
        return {
            "name": self.name,
            "progress_deadline": r.duration,
            "on_deadline": lambda x: self.choice(x, ("stall", "rollback")),
            "mode": lambda x: self.choice(x, ("enforce", "observe")),
            "checks": self.checks,
            "webhooks": self.webhooks,
        }

    def rollouts(self, v: Value, read: ReadRollout) -> tuple[Rollout, ...]:
        """`rollouts:` a non-empty list of named rollouts. Names must not repeat, and an upstream may
        be the canary or the baseline of one rollout only."""
        r = self.r
        items = r.sequence(v)
        if items is not None and not items:
            r.error(v, "must list at least one rollout")
        out: list[Rollout] = []
        names: dict[str, str] = {}
        owner: dict[str, str] = {}
        for item in items or []:
            if isinstance(item.node, MappingNode) and "name" not in r.entries(item):
                r.error(item, 'missing required key "name"')
                continue
            rollout = read(item)
            if rollout is None:
                continue
            m = r.entries(item)
            if rollout.name in names:
                r.error(m["name"], f'duplicate rollout name "{rollout.name}" (also {names[rollout.name]})')
                continue
            names[rollout.name] = item.path
            clash = False
            for key in ("canary", "baseline"):
                upstream = getattr(rollout, key)
                if upstream in owner:
                    r.error(m[key], f'upstream "{upstream}" is already in rollout "{owner[upstream]}"')
                    clash = True
            files = {o.state_file: o.name for o in out if o.state_file}
            if rollout.state_file and rollout.state_file in files:
                r.error(m["state_file"], f'same state file as rollout "{files[rollout.state_file]}"')
                clash = True
            if clash:
                continue
            if out and rollout.error_statuses != out[0].error_statuses:
                # The data plane counts a response as an error once, with one table for all.
                r.error(m.get("error_statuses", item), f'must be the same in every rollout (as in "{out[0].name}")')
                continue
            if out and set(rollout.grpc_error_statuses) != set(out[0].grpc_error_statuses):
                where = m.get("grpc_error_statuses", item)
                r.error(where, f'must be the same in every rollout (as in "{out[0].name}")')
                continue
            owner[rollout.canary] = owner[rollout.baseline] = rollout.name
            out.append(rollout)
        return tuple(out)

    # -- scalars ----------------------------------------------------------------------------------

    def name(self, v: Value) -> str | None:
        name = self.r.string(v)
        if name is not None and not _NAME.fullmatch(name):
            self.r.error(v, 'invalid rollout name (use letters, digits, ".", "_", "-")')
            return None
        return name

    def choice(self, v: Value, allowed: tuple[str, ...]) -> str | None:
        text = self.r.string(v)
        if text is not None and text not in allowed:
            self.r.error(v, f'expected one of {", ".join(allowed)}, got "{text}"')
            return None
        return text

    def url(self, v: Value) -> str | None:
        return self.r.convert(v, parse_webhook, raw=True)

    # -- steps ------------------------------------------------------------------------------------

    def steps(self, v: Value) -> tuple[Step, ...] | None:
        """Numbers (weights) or one-key step objects; weights must increase strictly."""
        r = self.r
        items = r.sequence(v)
        if items is None:
            return None
        out: list[Step] = []
        weight = 0.0  # the share a non-weight step keeps
        ok = True
        for item in items:
            step = self.step(item, weight)
            if step is None:
                ok = False
                continue
            if step.kind == "weight":
                if step.weight <= weight and any(s.kind == "weight" for s in out):
                    prev = fmt_number(weight)
                    r.error(item, f"steps must increase strictly ({fmt_number(step.weight)} after {prev})")
                    ok = False
                weight = step.weight
            out.append(step)
        return tuple(out) if ok else None

    def step(self, v: Value, weight: float) -> Step | None:
        r = self.r
        if isinstance(v.node, ScalarNode):
            w = r.number(v, 0, 100, lo_open=True)
            return Step("weight", w) if w is not None else None
        m = r.mapping(v, STEP_KINDS, keep_null=True)
        if m is None:
            return None
        if len(m) != 1:
            r.error(v, f"a step sets exactly one of {', '.join(STEP_KINDS)}")
            return None
        kind, sv = next(iter(m.items()))
        if kind == "weight":
            w = r.number(sv, 0, 100, lo_open=True)
            return Step("weight", w) if w is not None else None
        if kind == "pause":
            if sv.is_null or (isinstance(sv.node, MappingNode) and not sv.node.value):
                return Step("pause", weight)  # `pause: {}`: until promote
            if isinstance(sv.node, MappingNode):  # Argo's spelling: `pause: {duration: 10m}`
                pm = r.mapping(sv, ("duration",), required=("duration",))
                if pm is None or "duration" not in pm:
                    return None
                sv = pm["duration"]
            seconds = r.duration(sv)
            return Step("pause", weight, pause=seconds) if seconds is not None else None
        if kind == "gate":
            gate = r.record(sv, Gate, {"webhook": self.url, "timeout": r.duration}, required=("webhook",))
            return Step("gate", weight, gate=gate) if gate is not None else None
        analysis = r.mapping(sv, ("min_requests",), required=("min_requests",))
        if analysis is None or "min_requests" not in analysis:
            return None
        n = r.integer(analysis["min_requests"], lo=1)
        return Step("analysis", weight, min_requests=n) if n is not None else None

    # -- checks and webhooks ----------------------------------------------------------------------

    def _records(
        self,
        v: Value,
        cls: Callable[..., T],
        readers: Readers,
        required: tuple[str, ...],
        vet: Callable[[Value, T], T | None],
    ) -> tuple[T, ...] | None:
        """A list of records; `vet` checks each read one further (None: refused, error recorded)."""
        out: list[T] = []
        items = self.r.sequence(v) or []
        for item in items:
            rec = self.r.record(item, cls, readers, required=required)
            if rec is not None:
                rec = vet(item, rec)
            if rec is not None:
                out.append(rec)
        return tuple(out) if len(out) == len(items) else None

    def checks(self, v: Value) -> tuple[Check, ...] | None:
        r = self.r
        names: set[str] = set()

        def vet(item: Value, check: Check) -> Check | None:
            if check.max is None and check.min is None:
                r.error(item, 'set "max" or "min" (or both)')
                return None
            if check.max is not None and check.min is not None and check.min > check.max:
                r.error(item, f"min ({fmt_number(check.min)}) must not exceed max ({fmt_number(check.max)})")
                return None
            if check.name in names:
                r.error(r.entries(item)["name"], f'duplicate check name "{check.name}"')
                return None
            names.add(check.name)
            return check

        readers: Readers = {
            "name": r.string,
            "prometheus": self.url,
            "query": self.query,
            "max": r.number,
            "min": r.number,
            "timeout": r.duration,
            "failure_limit": lambda x: r.integer(x, lo=0),
        }
        return self._records(v, Check, readers, ("name", "prometheus", "query"), vet)

    def query(self, v: Value) -> str | None:
        # PromQL has braces of its own, so placeholders are plain text substitutions (see checks.py).
        return self.r.string(v)

    def webhooks(self, v: Value) -> tuple[Webhook, ...] | None:
        r = self.r

        def vet(item: Value, hook: Webhook) -> Webhook | None:
            if hook.secret_file is None:
                return hook
            secret = self.secret(r.entries(item)["secret_file"], hook.secret_file)
            if secret is None:
                return None
            return Webhook(hook.url, hook.events, hook.format, secret, hook.secret_file)

        readers: Readers = {
            "url": self.url,
            "events": self.events,
            "format": lambda x: self.choice(x, ("json", "slack")),
            "secret_file": r.string,
        }
        return self._records(v, Webhook, readers, ("url",), vet)

    def events(self, v: Value) -> tuple[str, ...] | None:
        r = self.r
        items = r.sequence(v)
        if items is None:
            return None
        out: list[str] = []
        for item in items:
            kind = self.choice(item, EVENT_KINDS)
            if kind is not None:
                out.append(kind)
        return tuple(out) if len(out) == len(items) else None

    def secret(self, v: Value, path: str) -> str | None:
        try:
            secret = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            self.r.error(v, f'cannot read "{path}": {getattr(e, "strerror", None) or e}')
            return None
        if not secret:
            self.r.error(v, f'"{path}" is empty')
            return None
        return secret
