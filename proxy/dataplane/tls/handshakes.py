"""Counting and logging failed client TLS handshakes.

uvloop (like asyncio) runs the server handshake inside its SSL protocol: a failure never reaches our
protocol (its `connection_made` is only called after a good handshake) and, being an OSError, is
not passed to the loop's exception handler either: it is dropped unless the loop is in debug mode
(uvloop sslproto `_fatal_error`). What uvloop does call is the context's SSL object: it creates one
per connection with `SSLContext.wrap_bio` (which instantiates `SSLContext.sslobject_class`) and calls
its `do_handshake()` until it succeeds or raises. So the listener's context gets the
:class:`TrackedSSLObject` class below: it sees every handshake error as it is raised, classifies it
and counts it; a handshake that never finished when its object is freed (the client closed the
connection, or uvloop's `ssl_handshake_timeout` aborted it) is counted as `eof` or `timeout`.
Per connection only: nothing here runs per request.
"""

from __future__ import annotations

import logging
import ssl
import time

from proxy.analysis.stats import Stats

log = logging.getLogger("canary_proxy.tls")

REASONS = (
    "protocol_version",  # the client offered only TLS versions below `min_version`
    "no_shared_cipher",
    "unknown_ca",  # mTLS: the client's certificate is not signed by `client_ca`
    "certificate_required",  # mTLS: the client sent no certificate
    "bad_certificate",  # mTLS: the client's certificate is invalid otherwise (expired, wrong use)
    "client_rejected_certificate",  # the client does not trust ours (alert unknown_ca/bad_certificate)
    "no_application_protocol",
    "http_request",  # plain HTTP sent to the TLS port
    "eof",  # the client closed the connection during the handshake
    "timeout",  # no complete handshake within the handshake timeout
    "other",
)
_BY_OPENSSL_REASON = {
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "VERSION_TOO_LOW": "protocol_version",
    "WRONG_SSL_VERSION": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "UNKNOWN_PROTOCOL": "protocol_version",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "NO_CIPHERS_AVAILABLE": "no_shared_cipher",
    "NO_SHARED_GROUPS": "no_shared_cipher",
    "NO_SUITABLE_KEY_SHARE": "no_shared_cipher",
    "NO_SUITABLE_SIGNATURE_ALGORITHM": "no_shared_cipher",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "certificate_required",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "certificate_required",
    "TLSV1_ALERT_UNKNOWN_CA": "client_rejected_certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "client_rejected_certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "client_rejected_certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "client_rejected_certificate",
    "TLSV1_ALERT_DECRYPT_ERROR": "client_rejected_certificate",
    "NO_APPLICATION_PROTOCOL": "no_application_protocol",
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": "no_application_protocol",
    "HTTP_REQUEST": "http_request",
    "HTTPS_PROXY_REQUEST": "http_request",
    "UNEXPECTED_EOF_WHILE_READING": "eof",
}
_UNKNOWN_ISSUER = (2, 19, 20, 21)  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT(_LOCALLY), SELF_SIGNED...
LOG_EVERY = 60.0  # seconds between two log lines of one reason


def classify(exc: BaseException) -> str:
    """The metric's `reason` for a handshake exception."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "unknown_ca" if exc.verify_code in _UNKNOWN_ISSUER else "bad_certificate"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionResetError):
        return "eof"
    reason = getattr(exc, "reason", None)
    return _BY_OPENSSL_REASON.get(str(reason), "other") if reason else "other"


class HandshakeMonitor:
    """Counts failures into `stats.tls_handshake_errors` and logs each reason at most once a minute."""

    def __init__(self, stats: Stats, timeout: float, log_every: float = LOG_EVERY) -> None:
        self.stats = stats
        self.timeout = timeout  # the listener's ssl_handshake_timeout, to tell timeouts from EOFs
        self.log_every = log_every
        self._logged: dict[str, float] = {}
        self._quiet: dict[str, int] = {}  # failures not logged since the last line, by reason

    def failed(self, reason: str, detail: str) -> None:
        counts = self.stats.tls_handshake_errors
        counts[reason] = counts.get(reason, 0) + 1
        now = time.monotonic()
        last = self._logged.get(reason)
        if last is not None and now - last < self.log_every:
            self._quiet[reason] = self._quiet.get(reason, 0) + 1
            return
        self._logged[reason] = now
        more = self._quiet.pop(reason, 0)
        since = f" ({more} more since the last report)" if more else ""
        log.warning(
            "TLS handshake failed: reason=%s (%s)%s; counted in canary_proxy_tls_handshake_errors_total, "
            "logged at most once per %gs per reason",
            reason,
            detail,
            since,
            self.log_every,
        )


class TrackedSSLObject(ssl.SSLObject):
    """The listener's SSL objects: they report their handshake's failure to `monitor`.

    Subclassed per listener by :func:`tracked_class` (the class carries the monitor: uvloop creates
    the instances through `SSLContext.wrap_bio`, which passes no extra arguments)."""

    monitor: HandshakeMonitor | None = None
    _started = 0.0  # monotonic time of the first do_handshake() call; 0: not started
    _done = False  # finished, well or badly (a failure was counted already)

    def do_handshake(self) -> None:
        if not self._started:
            self._started = time.monotonic()
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # more bytes to come: the normal course of a handshake
        except ssl.SSLError as e:
            self._done = True
            if self.monitor is not None:
                self.monitor.failed(classify(e), _describe(e))
            raise
        self._done = True

    def __del__(self) -> None:
        # uvloop closes the connection without calling us when the client hangs up or the
        # handshake timeout fires; the object is freed right after either.
        monitor = self.monitor
        if self._started and not self._done and monitor is not None:
            try:
                waited = time.monotonic() - self._started
                if waited >= monitor.timeout * 0.95:
                    monitor.failed("timeout", f"no complete handshake within {monitor.timeout:g}s")
                else:
                    monitor.failed("eof", f"the client closed the connection after {waited:.3f}s")
            except Exception:  # never raise from a finaliser (e.g. at interpreter exit)
                pass


def tracked_class(monitor: HandshakeMonitor) -> type[ssl.SSLObject]:
    """An SSLObject class reporting to `monitor`, for `SSLContext.sslobject_class`."""
    return type("ListenerSSLObject", (TrackedSSLObject,), {"monitor": monitor})


def _describe(e: ssl.SSLError) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"client certificate verify failed: {e.verify_message}"
    reason = getattr(e, "reason", None)
    if str(reason) == "HTTP_REQUEST":
        return "a plain HTTP request was sent to the TLS port"
    return str(reason or e).lower().replace("_", " ")
