"""The admin listener: /metrics, /healthz, /readyz, /status, the status page and the POST actions.

A separate aiohttp server on its own address, so nothing here is reachable through the data port.
POSTs change the proxy; when the config has an admin token they need `Authorization: Bearer`.
Every error is a JSON 4xx (never a 500 with a traceback); proxy.control.adminguard checks Host, Origin and
Referer of POSTs and caps connections and header time.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy.analysis.rollout import COMMANDS, Command, CommandError
from proxy.control.adminguard import GuardedListener, cross_site, host_allowed
from proxy.control.fleet.errors import FleetUnavailable
from proxy.control.metrics import CONTENT_TYPE, make_registry, render
from proxy.control.status import build_status, rollout_status, rollouts_status

if TYPE_CHECKING:
    from proxy.control.view import AppView

log = logging.getLogger("canary_proxy.admin")

STATUS_PAGE = Path(__file__).parent / "static" / "status.html"
MAX_BODY = 64 * 1024  # POST bodies only carry an optional reason

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminServer:
    """The admin HTTP server of one `AppView`."""

    def __init__(self, app: AppView) -> None:
        self.app = app
        self.registry = make_registry(app)
        self._runner: web.AppRunner | None = None
        self.listener: GuardedListener | None = None

    def make_app(self) -> web.Application:
        """The aiohttp application (routes + token middleware)."""
        web_app = web.Application(middlewares=[self._errors, self._auth], client_max_size=MAX_BODY)
        web_app.router.add_get("/", self.page)
        web_app.router.add_get("/metrics", self.metrics)
        web_app.router.add_get("/healthz", self.healthz)
        web_app.router.add_get("/readyz", self.readyz)
        web_app.router.add_get("/status", self.status)
        for command in COMMANDS:
            web_app.router.add_post(f"/rollout/{command}", self._rollout_handler(command))
            web_app.router.add_post(f"/rollouts/{{name}}/{command}", self._rollout_handler(command))
        web_app.router.add_get("/rollouts", self.rollouts)
        web_app.router.add_post("/config/reload", self.reload)
        return web_app

    async def start(self, host: str, port: int) -> None:
        """Bind and serve (port 0 picks a free port: see `bound_port`)."""
        config = self.app.config
        runner = web.AppRunner(
            self.make_app(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=1.0,
            keepalive_timeout=config.admin_header_timeout,
        )
        await runner.setup()
        assert runner.server is not None
        listener = GuardedListener(runner.server, config.admin_max_connections, config.admin_header_timeout)
        try:
            await listener.start(host, port)
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.listener = listener

    async def stop(self) -> None:
        """Close the listener and any open admin connections."""
        runner, self._runner = self._runner, None
        listener, self.listener = self.listener, None
        if listener is not None:
            await listener.close()
        if runner is not None:
            await runner.cleanup()

    @property
    def bound_port(self) -> int:
        """The port actually bound (useful with port 0)."""
        assert self.listener is not None, "AdminServer not started"
        return self.listener.bound_port

    # -- middleware --------------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every error as JSON: aiohttp's own (404, 405, 413...) and anything unexpected."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            resp = _json({"ok": False, "error": exc.text or exc.reason}, status=exc.status)
            for name, value in exc.headers.items():  # e.g. Allow on a 405
                if name.lower() not in ("content-type", "content-length"):
                    resp.headers[name] = value
            return resp
        except Exception:
            log.exception("admin %s %s failed", request.method, request.path)
            return _json({"ok": False, "error": "the request could not be handled"}, status=400)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every POST needs the admin token when one is configured; GETs stay open (probes, scrapes)."""
        config = self.app.config
        if request.method == "POST":
            headers = request.headers
            host = headers.get("Host")
            if not host_allowed(host, config):
                # DNS rebinding: a page on an attacker's name that resolves to us. Its Origin and
                # Host agree, so only the name itself tells.
                return _json({"ok": False, "error": f"Host {host!r} is not this admin listener"}, 403)
            why = cross_site(headers.get("Origin"), headers.get("Referer"), host)
            if why is not None:
                # A browser page from elsewhere must not drive the rollout (CSRF); curl and the CLI
                # send no Origin, the status page sends its own.
                return _json({"ok": False, "error": why}, status=403)
        token = config.admin_token
        if request.method == "POST" and token and request.match_info.http_exception is None:
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            # surrogateescape: aiohttp hands undecodable bytes over as surrogates; they just mismatch
            ok = scheme.lower() == "bearer" and hmac.compare_digest(
                value.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8")
            )
            if not ok:
                return web.json_response(
                    {"ok": False, "error": "missing or wrong admin token"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="canary-proxy"'},
                )
        return await handler(request)

    # -- GET -----------------------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.StreamResponse:
        """The status page, when it ships with the package."""
        try:
            body = STATUS_PAGE.read_bytes()
        except OSError:
            raise web.HTTPNotFound(text="status page not installed; see /status") from None
        return web.Response(body=body, content_type="text/html", charset="utf-8")

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=render(self.registry), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok")

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        """Ready once the data listener is serving; 503 while draining so load balancers move away."""
        app = self.app
        if app.draining:
            return web.Response(status=503, text="draining")
        plane = app.plane
        if plane is None or plane.server is None or not plane.server.is_serving():
            return web.Response(status=503, text="not ready")
        return web.Response(text="ready")

    async def status(self, request: web.Request) -> web.StreamResponse:
        return _json(build_status(self.app))

    # -- POST ----------------------------------------------------------------------------------------

    def _rollout_handler(self, command: Command) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self.rollout(request, command)

        return handle

    async def rollouts(self, request: web.Request) -> web.StreamResponse:
        """Every rollout's status, in config order."""
        return _json(rollouts_status(self.app))

    async def rollout(self, request: web.Request, command: Command) -> web.StreamResponse:
        """Apply an operator command to `/rollouts/{name}/...` (or the only rollout for
        `/rollout/...`); 404 for an unknown name, 409 when there is no rollout, several and none
        named, or the command does not apply now. `promote?full=1` goes straight to 100%."""
        app = self.app
        name = request.match_info.get("name")
        if app.controller is None or not app.config.rollouts:
            return _json({"ok": False, "error": "no rollout is configured"}, status=409)
        if name is not None and app.config.rollout_named(name) is None:
            known = ", ".join(r.name for r in app.config.rollouts)
            return _json({"ok": False, "error": f'no rollout named "{name}" (known: {known})'}, status=404)
        if name is None and len(app.config.rollouts) > 1:
            names = ", ".join(r.name for r in app.config.rollouts)
            error = f"several rollouts ({names}): use /rollouts/{{name}}/{command}"
            return _json({"ok": False, "error": error}, status=409)
        name = name or app.config.rollouts[0].name
        full = request.query.get("full", "").lower() in ("1", "true", "yes")
        reason = await _reason(request)
        try:
            if app.fleet is not None:
                await app.fleet.command(command, reason, rollout=name, full=full)  # fleet-wide, through Redis
            else:
                app.controller.command(command, reason, rollout=name, full=full)
        except FleetUnavailable as exc:
            return _json({"ok": False, "error": str(exc), "rollout": rollout_status(app, name)}, status=503)
        except CommandError as exc:
            return _json({"ok": False, "error": str(exc), "rollout": rollout_status(app, name)}, status=409)
        except LookupError as exc:  # the rollout went away with a reload
            return _json({"ok": False, "error": str(exc)}, status=409)
        log.info("rollout %s: %s via admin API%s", name, command, f" ({reason})" if reason else "")
        return _json(rollout_status(app, name))

    async def reload(self, request: web.Request) -> web.StreamResponse:
        """Re-read the config file now; a refused config keeps the old one serving (422)."""
        app = self.app
        if not app.config.source_path:
            return _json({"ok": False, "error": "the config was not loaded from a file"}, status=400)
        ok, detail = await app.reload("admin")
        if not ok:
            return _json({"ok": False, "error": detail}, status=422)
        return _json({"ok": True, "hash": app.config.source_hash})


async def _reason(request: web.Request) -> str | None:
    """An optional `reason`: JSON body `{"reason": ...}` or query `?reason=...`."""
    reason = request.query.get("reason")
    if request.can_read_body:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise web.HTTPBadRequest(text='body must be JSON like {"reason": "..."}') from None
        if isinstance(body, dict) and isinstance(body.get("reason"), str):
            reason = body["reason"]
    if reason is None:
        return None
    return reason.strip()[:500] or None


def _json(data: Any, status: int = 200) -> web.Response:
    # default=str: event data is meant to be JSON scalars, but a stray value must not break /status
    return web.Response(text=json.dumps(data, default=str), status=status, content_type="application/json")
