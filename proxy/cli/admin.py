"""CLI verbs that talk to a running proxy's admin API: status, promote, rollback, pause, resume, reset.

`canary-proxy status` prints the rollout the way `kubectl argo rollouts get rollout` does: a header
block, then routes, upstreams and the latest events. The other verbs POST `/rollout/<verb>`.
Plain urllib: a CLI call is one request, so there is nothing to gain from an event loop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from proxy.config import ConfigError, load_config
from proxy.control.fleet.report import format_fleet
from proxy.control.status import admin_url

DEFAULT_ADMIN = "http://127.0.0.1:9901"
TOKEN_ENV = "CANARY_PROXY_ADMIN_TOKEN"
ROLLOUT_VERBS = {
    "promote": "take the next step now (ends a pause or gate); --full: 100%% now, analysis stops",
    "rollback": "send the canary's traffic to the baseline now (latched until reset)",
    "pause": "freeze the rollout at its current step (a breach still rolls back)",
    "resume": "continue a paused rollout",
    "reset": "restart the rollout from its first step (clears a rollback)",
}
SYMBOLS = {"progressing": "◌", "steady": "✔", "paused": "॥", "promoted": "✔", "rolled_back": "✖", "unknown_state": "?"}
ASCII_SYMBOLS = {
    "progressing": "~", "steady": "+", "paused": "||", "promoted": "+", "rolled_back": "x", "unknown_state": "?",
}  # fmt: skip
VERDICT_SYMBOLS = {"healthy": "✔", "breach": "✖", "insufficient_data": "…"}
ASCII_VERDICT_SYMBOLS = {"healthy": "+", "breach": "x", "insufficient_data": "?"}
EVENTS_SHOWN = 5


class AdminError(Exception):
    """The admin API could not be reached or refused the request (message is user-facing)."""


# -- argparse ----------------------------------------------------------------------------------------


def add_admin_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `status` and the rollout verbs; each sets `func(args) -> int`."""
    status = sub.add_parser("status", help="show the rollout, routes and upstreams of a running proxy")
    _common(status)
    status.add_argument("--json", action="store_true", help="print the raw /status JSON")
    status.set_defaults(func=cmd_status)
    for verb, help_text in ROLLOUT_VERBS.items():
        p = sub.add_parser(verb, help=help_text)
        _common(p)
        p.add_argument(
            "rollout", nargs="?", help="the rollout's name (needed when the proxy runs several)"
        )
        p.add_argument("--reason", help="why (kept in the rollout events and the webhook)")
        if verb == "promote":
            p.add_argument("--full", action="store_true", help="skip every remaining step: 100%% now")
        p.set_defaults(func=cmd_rollout, verb=verb)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admin", metavar="URL", help=f"admin API base URL (default {DEFAULT_ADMIN})")
    p.add_argument("-c", "--config", help="read the admin address and token from this config file")
    p.add_argument("--token", help=f"admin token for POSTs (default: ${TOKEN_ENV}, or the config's)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the proxy (default 5)")


def _target(args: argparse.Namespace) -> tuple[str, str | None]:
    """(base URL, token) from --admin/--token, the environment and -c CONFIG, in that order."""
    url: str | None = args.admin
    token: str | None = args.token or os.environ.get(TOKEN_ENV) or None
    if args.config:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            raise AdminError(f"cannot read {args.config}: " + "; ".join(exc.errors)) from None
        url = url or admin_url(config)
        token = token or config.admin_token
    return (url or DEFAULT_ADMIN).rstrip("/"), token


# -- HTTP --------------------------------------------------------------------------------------------


def call_admin(
    base: str,
    method: str,
    path: str,
    token: str | None = None,
    body: dict[str, Any] | None = None,
    timeout: float = 5.0,
) -> Any:
    """One admin request; returns the decoded JSON or raises AdminError with a readable message."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        detail = _error_detail(exc.read())
        hint = f"; pass --token or set {TOKEN_ENV}" if exc.code == 401 else ""
        raise AdminError(f"{method} {path} failed: {exc.code} {detail}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminError(f"cannot reach the admin API at {base}: {reason}") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise AdminError(f"{method} {path}: the answer is not JSON (is {base} a canary-proxy?)") from None


def _error_detail(raw: bytes) -> str:
    try:
        doc = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace").strip()[:300]
    if isinstance(doc, dict) and doc.get("error"):
        return str(doc["error"])
    return json.dumps(doc)[:300]


# -- handlers ----------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    """`canary-proxy status`: the readable summary (or `--json`)."""
    try:
        base, token = _target(args)
        doc = call_admin(base, "GET", "/status", token, timeout=args.timeout)
    except AdminError as exc:
        print(f"canary-proxy: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=False))
    else:
        print(format_status(doc, base=base, ascii_only=not _can_print_unicode()))
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    """`canary-proxy promote|rollback|pause|resume|reset`."""
    body = {"reason": args.reason} if args.reason else None
    try:
        base, token = _target(args)
        path = f"/rollouts/{args.rollout}/{args.verb}" if args.rollout else f"/rollout/{args.verb}"
        if getattr(args, "full", False):
            path += "?full=1"
        doc = call_admin(base, "POST", path, token, body, timeout=args.timeout)
    except AdminError as exc:
        print(f"canary-proxy: {exc}", file=sys.stderr)
        return 1
    print(f"{args.verb}: {describe_rollout(doc)}")
    return 0


# -- formatting --------------------------------------------------------------------------------------


def describe_rollout(ro: dict[str, Any] | None) -> str:
    """One line: `canary canary is paused at step 2/5 (weight 10%)`."""
    if not ro:
        return "no rollout configured"
    named = f"rollout {ro['name']}: " if ro.get("name") and ro.get("name") != "default" else ""
    parts = [f"{named}canary {ro.get('canary')} is {_phase_word(ro.get('phase'))}"]
    steps = ro.get("steps") or []
    if steps and ro.get("phase") in ("progressing", "paused"):
        parts.append(f"at step {_step_text(ro)}")
    if ro.get("canary_weight") is not None:
        parts.append(f"(weight {_pct(ro['canary_weight'])})")
    if ro.get("reason"):
        parts.append(f"- {ro['reason']}")
    return " ".join(parts)


def format_status(doc: dict[str, Any], *, base: str = "", ascii_only: bool = False) -> str:
    """The human-readable `status` output for a /status document."""
    now = float(doc.get("now") or time.time())
    arrow = "->" if ascii_only else "→"
    lines = _header(doc, now, base, ascii_only)
    lines += ["", "ROUTES", *_routes_table(doc.get("routes") or [], arrow)]
    ups = doc.get("upstreams") or {}
    window = next((u.get("window", {}).get("seconds") for u in ups.values()), None)
    title = "UPSTREAMS" + (f" (last {window:g}s)" if isinstance(window, int | float) else "")
    lines += ["", title, *_upstreams_table(ups)]
    lines += ["", "EVENTS", *_events_table(doc.get("events") or [])]
    if isinstance(doc.get("fleet"), dict):
        lines += ["", "FLEET", *format_fleet(doc["fleet"], now)]
    return "\n".join(lines)


def _header(doc: dict[str, Any], now: float, base: str, ascii_only: bool) -> list[str]:
    sym = ASCII_SYMBOLS if ascii_only else SYMBOLS
    where = f" at {base}" if base else ""
    head: list[tuple[str, str]] = [("Proxy", f"canary-proxy {doc.get('version', '?')}{where}")]
    if doc.get("draining"):
        head.append(("Draining", "yes: shutting down, not accepting new connections"))
    cfg = doc.get("config") or {}
    loaded = f"  (loaded {_ago(cfg.get('loaded_at'), now)})" if cfg.get("loaded_at") else ""
    head.append(("Config", f"{cfg.get('hash') or '-'}  {cfg.get('path') or '<inline>'}{loaded}"))
    if cfg.get("last_error"):
        when = _ago(cfg.get("last_error_at"), now)
        head.append(("", f"{sym['rolled_back']} last reload failed {when}: {cfg['last_error']}"))
    ro = doc.get("rollout")
    rollouts = doc.get("rollouts") or ([ro] if ro else [])
    if not rollouts:
        head.append(("Rollout", "none configured"))
    for one in rollouts:
        named = len(rollouts) > 1 or one.get("name") not in (None, "default")
        head += _rollout_lines(one, now, ascii_only, named=named)
    width = max(len(k) for k, _ in head) + 2
    return [(f"{k}:" if k else "").ljust(width) + v for k, v in head]


def _rollout_lines(ro: dict[str, Any], now: float, ascii_only: bool, *, named: bool) -> list[tuple[str, str]]:
    """The header block of one rollout."""
    sym = ASCII_SYMBOLS if ascii_only else SYMBOLS
    vsym = ASCII_VERDICT_SYMBOLS if ascii_only else VERDICT_SYMBOLS
    arrow = "->" if ascii_only else "→"
    head: list[tuple[str, str]] = []
    phase = ro.get("phase")
    name = f"{ro.get('name')}: " if named else ""
    head.append(("Rollout", f"{name}{ro.get('canary')} vs baseline {ro.get('baseline')}"))
    status = f"{sym.get(phase or '', '?')} {_phase_word(phase).capitalize()}"
    if ro.get("stalled"):
        status += " (stalled: no step within the progress deadline)"
    head.append(("Status", status))
    if ro.get("mode") == "observe":
        head.append(("Mode", "observe: decisions are logged, weights stay as configured"))
    if ro.get("steps"):
        on_step = ""
        if phase in ("progressing", "paused") and ro.get("step_started_at"):
            on_step = f", on this step for {_duration(now - float(ro['step_started_at']))}"
        kind = ro.get("step_kind")
        what = f" {kind}" if kind and kind != "weight" else ""
        head.append(("Step", f"{_step_text(ro)}{what}  ({_step_ladder(ro, arrow)}){on_step}"))
    weight = ro.get("canary_weight")
    head.append(("Canary weight", _pct(weight) if weight is not None else "as configured"))
    gate = ro.get("gate")
    if gate:
        head.append(("Gate", f"{'open' if gate.get('open') else 'closed'} ({gate.get('answer')})"))
    for check in ro.get("checks") or []:
        head.append(("Check", f"{check.get('name')}: {check.get('status')} - {check.get('detail')}"))
    verdict = ro.get("last_verdict")
    text = "none yet"
    if verdict:
        result = str(verdict.get("result"))
        text = f"{vsym.get(result, '?')} {result}"
        if verdict.get("reason"):
            text += f": {verdict['reason']}"
        if verdict.get("at"):
            text += f" ({_ago(verdict['at'], now)})"
    head.append(("Last verdict", text))
    if ro.get("reason"):
        head.append(("Reason", str(ro["reason"])))
    return head


def _routes_table(routes: list[dict[str, Any]], arrow: str) -> list[str]:
    rows = [["NAME", "TARGET", "WEIGHTS", "STICKY"]]
    for r in routes:
        target = _route_target(r, arrow)
        rows.append([str(r.get("name")), target, _weights(r.get("weights")), r.get("sticky") or "-"])
    return _table(rows)


def _upstreams_table(ups: dict[str, Any]) -> list[str]:
    rows = [["NAME", "VERSION", "ENDPOINTS", "REQUESTS", "RPS", "ERRORS", "P50", "P95", "P99"]]
    for name, u in ups.items():
        w = u.get("window") or {}
        eps = u.get("endpoints") or []
        ejected = u.get("ejected") or []
        rows.append(
            [
                name,
                u.get("version") or "-",
                f"{len(eps) - len(ejected)}/{len(eps)} up",
                str(w.get("requests", 0)),
                f"{float(w.get('rps') or 0.0):.1f}",
                f"{w.get('errors', 0)} ({_pct(100.0 * float(w.get('error_rate') or 0.0), 2)})",
                _secs(w.get("p50")),
                _secs(w.get("p95")),
                _secs(w.get("p99")),
            ]
        )
    return _table(rows)


def _events_table(events: list[dict[str, Any]]) -> list[str]:
    latest = sorted(events, key=lambda e: float(e.get("at") or 0.0))[-EVENTS_SHOWN:]
    if not latest:
        return ["  (none)"]
    rows = [["TIME", "KIND", "MESSAGE"]]
    rows += [[_clock(e.get("at")), str(e.get("kind")), str(e.get("message"))] for e in reversed(latest)]
    return _table(rows)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _route_target(r: dict[str, Any], arrow: str) -> str:
    if r.get("weights") is not None:
        return "split"
    to, eff = r.get("to"), r.get("effective_to")
    if eff and to and eff != to:
        return f"{to} {arrow} {eff}"
    return str(eff or to or "-")


def _weights(weights: dict[str, float] | None) -> str:
    if not weights:
        return "-"
    return ", ".join(f"{name} {_pct(w)}" for name, w in weights.items())


def _phase_word(phase: Any) -> str:
    return str(phase or "unknown").replace("_", " ")


def _step_text(ro: dict[str, Any]) -> str:
    steps = ro.get("steps") or []
    index = min(int(ro.get("step") or 0), max(len(steps) - 1, 0))
    return f"{index + 1}/{len(steps)}"


def _step_ladder(ro: dict[str, Any], arrow: str) -> str:
    steps = ro.get("steps") or []
    index = int(ro.get("step") or 0)
    return f" {arrow} ".join(f"[{s:g}]" if i == index else f"{s:g}" for i, s in enumerate(steps))


def _pct(value: float, digits: int = 1) -> str:
    text = f"{float(value):.{digits}f}".rstrip("0").rstrip(".")
    return f"{text}%"


def _secs(value: Any) -> str:
    if value is None:
        return "-"
    v = float(value)
    return f"{v * 1000:.1f}ms" if v < 1.0 else f"{v:.2f}s"


def _duration(seconds: float) -> str:
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _ago(at: Any, now: float) -> str:
    if at is None:
        return "at an unknown time"
    return f"{_duration(now - float(at))} ago"


def _clock(at: Any) -> str:
    if at is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(float(at)))


def _can_print_unicode() -> bool:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "".join(SYMBOLS.values()).encode(encoding)
        "→…".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True
