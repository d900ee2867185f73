"""Prometheus checks (Flagger metric templates, Argo AnalysisTemplates): a PromQL query per check,
asked every `interval`, whose first sample must stay <= `max` (and/or >= `min`).

An empty result or a failed query HOLDS the rollout (never passes, never fails); `failure_limit`
failed queries in a row trip like a breached threshold. Queries run in the background with their
own timeout: the tick only reads the latest results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from proxy.analysis.background import Background
from proxy.analysis.verdict import Breach, Healthy, InsufficientData, Verdict
from proxy.config.model import Check, Rollout

CheckStatus = Literal["pass", "breach", "hold"]


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The latest evaluation of one check."""

    name: str
    status: CheckStatus
    detail: str
    value: float | None = None
    at: float | None = None
    failures: int = 0  # failed queries in a row

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for /status)."""
        return {
            "name": self.name,
            "status": self.status,
            "detail": self.detail,
            "value": self.value,
            "at": self.at,
            "failures": self.failures,
        }


def render_query(check: Check, rollout: Rollout) -> str:
    """The query with {rollout}, {canary}, {baseline} and {window} (e.g. "60s") filled in."""
    window = f"{max(int(rollout.window), 1)}s"
    values = {"rollout": rollout.name, "canary": rollout.canary, "baseline": rollout.baseline, "window": window}
    query = check.query
    for key, value in values.items():
        query = query.replace("{" + key + "}", value)
    return query


def judge_value(check: Check, value: float) -> tuple[CheckStatus, str]:
    """Pass or breach for one sample value."""
    if check.max is not None and value > check.max:
        return "breach", f"{value:g} > max {check.max:g}"
    if check.min is not None and value < check.min:
        return "breach", f"{value:g} < min {check.min:g}"
    return "pass", f"{value:g} within bounds"


def first_sample(doc: Any) -> float | None:
    """The value of the first sample of an instant-query answer; None when empty. Raises
    ValueError on anything that is not a successful Prometheus answer."""
    if not isinstance(doc, dict) or doc.get("status") != "success":
        error = doc.get("error") if isinstance(doc, dict) else None
        raise ValueError(f"query failed: {error or 'not a Prometheus answer'}")
    data = doc.get("data")
    if not isinstance(data, dict):
        raise ValueError("no data in the answer")
    kind, result = data.get("resultType"), data.get("result")
    sample: Any
    if kind == "scalar" and isinstance(result, list) and len(result) == 2:
        sample = result
    elif kind == "vector" and isinstance(result, list):
        if not result:
            return None
        sample = result[0].get("value") if isinstance(result[0], dict) else None
    else:
        raise ValueError(f"unexpected result type {kind!r} (use an instant vector or scalar)")
    if not isinstance(sample, list) or len(sample) != 2:
        raise ValueError("malformed sample")
    value = float(sample[1])
    return None if math.isnan(value) else value


def combine(verdict: Verdict, results: dict[str, CheckResult]) -> Verdict:
    """The verdict with the checks: any breach is a breach, any hold keeps a healthy verdict waiting."""
    if isinstance(verdict, Breach):
        return verdict
    for r in results.values():
        if r.status == "breach":
            return Breach(f"check {r.name}: {r.detail}", verdict.figures)
    if isinstance(verdict, Healthy):
        for r in results.values():
            if r.status == "hold":
                return InsufficientData(f"check {r.name} holds: {r.detail}", verdict.figures)
    return verdict


class CheckRunner:
    """Asks every check of one rollout once per interval; keeps the results."""

    def __init__(self) -> None:
        self._bg = Background()
        self._asked: dict[str, float] = {}
        self._busy: set[str] = set()
        self._generation = 0  # bumped by `forget`: answers to older queries are dropped
        self.results: dict[str, CheckResult] = {}

    def forget(self) -> None:
        """Start afresh (a reset or a new canary): no result, no failure count, ask at once."""
        self._generation += 1
        self.results.clear()
        self._asked.clear()
        self._busy.clear()

    def poll(self, rollout: Rollout, now: float) -> dict[str, CheckResult]:
        """Start the queries that are due; the latest result of every check (hold until one came)."""
        for check in rollout.checks:
            asked = self._asked.get(check.name)
            if check.name in self._busy or (asked is not None and now - asked < rollout.interval):
                continue
            if self._bg.spawn(self._query(check, rollout, now)):
                self._busy.add(check.name)
            self._asked[check.name] = now
        names = {c.name for c in rollout.checks}
        for gone in set(self.results) - names:
            del self.results[gone]
        return {
            c.name: self.results.get(c.name, CheckResult(c.name, "hold", "not evaluated yet")) for c in rollout.checks
        }

    async def _query(self, check: Check, rollout: Rollout, now: float) -> None:
        generation = self._generation
        previous = self.results.get(check.name)
        failures = previous.failures if previous is not None else 0
        try:
            url = check.prometheus.rstrip("/") + "/api/v1/query"
            params = {"query": render_query(check, rollout)}
            async with self._bg.session().get(
                url, params=params, timeout=aiohttp.ClientTimeout(total=check.timeout)
            ) as resp:
                doc = await resp.json(content_type=None)
            value = first_sample(doc)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            failures += 1
            detail = f"query failed ({failures} in a row): {type(exc).__name__}: {exc}".rstrip(": ")
            tripped = check.failure_limit > 0 and failures >= check.failure_limit
            status: CheckStatus = "breach" if tripped else "hold"
            self._store(CheckResult(check.name, status, detail, None, now, failures), generation)
            return
        finally:
            if generation == self._generation:
                self._busy.discard(check.name)
        if value is None:
            self._store(CheckResult(check.name, "hold", "empty result", None, now, 0), generation)
            return
        verdict, detail = judge_value(check, value)
        self._store(CheckResult(check.name, verdict, detail, value, now, 0), generation)

    def _store(self, result: CheckResult, generation: int) -> None:
        if generation == self._generation:
            self.results[result.name] = result

    async def close(self) -> None:
        """Cancel queries in flight."""
        await self._bg.close()
