"""TLS towards upstreams: the client context of `https://` endpoints, and the log of their failures.

:func:`upstream_context` is the one place such a context is built; the HTTP/2 upstream leg calls it
with `alpn=("h2",)`. Verification is on by default, against the system CAs (or `tls.ca`); the name
checked (and sent as SNI) is `tls.server_name`, else the endpoint's host (the pool passes it as
`server_hostname`).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Sequence

from proxy.config.model import Config, UpstreamTLS

log = logging.getLogger("canary_proxy.tls")

LOG_EVERY = 10.0  # seconds between two lines about the same upstream endpoint and reason
_last_logged: dict[tuple[str, str, str], tuple[float, int]] = {}


def _no_password() -> bytes:
    raise ValueError("encrypted private keys are not supported")


def upstream_context(tls: UpstreamTLS, alpn: Sequence[str] = ("http/1.1",)) -> ssl.SSLContext:
    """A client context for `tls` (blocking: reads the CA and key files). Raises OSError/ssl.SSLError."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    if tls.verify:
        if tls.ca:
            ctx.load_verify_locations(cafile=tls.ca)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.cert and tls.key:
        ctx.load_cert_chain(tls.cert, tls.key, password=_no_password)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def upstream_contexts(config: Config) -> dict[UpstreamTLS, ssl.SSLContext]:
    """A context for each distinct `tls` setting of the config's `https://` endpoints (blocking)."""
    out: dict[UpstreamTLS, ssl.SSLContext] = {}
    for up in config.upstreams.values():
        for ep in up.endpoints:
            if ep.tls is not None and ep.tls not in out:
                out[ep.tls] = upstream_context(ep.tls)
    return out


def tls_failure(exc: BaseException) -> str | None:
    """A readable reason when `exc` is a TLS failure (else None), e.g. "certificate verify failed:
    unable to get local issuer certificate"."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None)
        return f"TLS handshake failed: {str(reason).lower().replace('_', ' ') if reason else exc}"
    if isinstance(exc, ConnectionResetError | ConnectionAbortedError) and "SSL" in str(exc):
        return f"TLS handshake failed: {exc}"
    return None


def log_upstream_failure(upstream: str, endpoint: str, reason: str) -> None:
    """One line per upstream, endpoint and reason, repeated at most every LOG_EVERY seconds."""
    key = (upstream, endpoint, reason)
    now = time.monotonic()
    last = _last_logged.get(key)
    if last is not None and now - last[0] < LOG_EVERY:
        _last_logged[key] = (last[0], last[1] + 1)
        return
    more = f" ({last[1]} more since the last report)" if last is not None and last[1] else ""
    _last_logged[key] = (now, 0)
    if len(_last_logged) > 1000:  # bounded: endpoints come from config, but reloads can rename them
        _last_logged.clear()
    log.error(
        "upstream %s endpoint https://%s: %s; answered 502, counted as a connect failure%s",
        upstream,
        endpoint,
        reason,
        more,
    )
