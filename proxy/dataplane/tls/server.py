"""The listener's TLS: server contexts per certificate, chosen by SNI, swappable while serving.

The listener is created once with a *dispatcher* context (`ListenerTLSState.dispatcher`). Its SNI
callback runs for every ClientHello (with or without a server name) and points the connection at
the current context for that name (`ssl_obj.context = ...`): a certificate reload only replaces
`current`, so new handshakes get the new certificate while established connections, and the
listening socket, are untouched. Settings OpenSSL takes from the connection's first context (the
minimum version, whether a client certificate is requested, session tickets) are kept in step on
the dispatcher itself.

Modern defaults: TLS 1.2 or newer, ECDHE with AES-GCM or ChaCha20 only (the TLS 1.3 suites are
all AEAD), no compression, no renegotiation; session resumption by tickets (OpenSSL's default,
whose keys live in the dispatcher, so they survive certificate reloads).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field

from proxy.analysis.stats import Stats
from proxy.config.certs import CertError, CertInfo, cert_info, check_ca
from proxy.config.model import CertPair, ListenerTLS
from proxy.dataplane.legs.base import ALPN_SUPPORTED
from proxy.dataplane.tls.handshakes import HandshakeMonitor, tracked_class

log = logging.getLogger("canary_proxy.tls")

CIPHERS_TLS12 = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TLSLoadError(Exception):
    """A certificate could not be loaded; `path` is its config key path (`tls.certificates[1].key`)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


def offered_alpn(tls: ListenerTLS) -> list[str]:
    """`tls.alpn` limited to what the client legs speak (`legs.base.ALPN_SUPPORTED`), in config order."""
    return [p for p in tls.alpn if p in ALPN_SUPPORTED]


def _base_context(tls: ListenerTLS) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ctx.set_ciphers(CIPHERS_TLS12)
    if tls.client_ca:
        ctx.load_verify_locations(cafile=tls.client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    alpn = offered_alpn(tls)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def _no_password() -> bytes:
    raise ValueError("encrypted private keys are not supported")


@dataclass
class ServerContexts:
    """One generation of certificates: a context per pair, and which serves which SNI name."""

    default: ssl.SSLContext
    exact: dict[str, ssl.SSLContext] = field(default_factory=dict)
    wildcard: dict[str, ssl.SSLContext] = field(default_factory=dict)  # "example.com" for *.example.com
    serials: dict[str, str] = field(default_factory=dict)  # cert file -> serial (for logs and tests)
    infos: dict[str, CertInfo] = field(default_factory=dict)  # cert file -> names, serial, expiry (/status)

    def select(self, server_name: str | None) -> ssl.SSLContext:
        """The context for a ClientHello's server name: exact name, then `*.parent`, else the default."""
        if not server_name:
            return self.default
        name = server_name.lower().rstrip(".")
        ctx = self.exact.get(name)
        if ctx is None:
            ctx = self.wildcard.get(name.partition(".")[2], self.default)
        return ctx


def build_contexts(tls: ListenerTLS) -> ServerContexts:
    """Load every certificate pair (blocking: run it in a thread when serving). Raises TLSLoadError."""
    pairs = tls.pairs()
    if tls.client_ca:
        try:
            check_ca(tls.client_ca)
        except CertError as e:
            raise TLSLoadError("tls.client_ca", str(e)) from None
    out: ServerContexts | None = None
    for path, pair in pairs:
        ctx = _pair_context(tls, path, pair)
        if out is None:
            out = ServerContexts(ctx)
        try:
            info = cert_info(pair.cert)
        except CertError as e:
            raise TLSLoadError(f"{path}.cert", str(e)) from None
        if info.expired:
            log.warning("%s.cert: certificate %s has expired; serving it anyway", path, pair.cert)
        out.serials[pair.cert] = info.serial
        out.infos[pair.cert] = info
        for name in info.names:
            if name.startswith("*."):
                out.wildcard.setdefault(name[2:], ctx)
            else:
                out.exact.setdefault(name, ctx)
    if out is None:
        raise TLSLoadError("tls", "no certificate configured")
    return out


def _pair_context(tls: ListenerTLS, path: str, pair: CertPair) -> ssl.SSLContext:
    ctx = _base_context(tls)
    try:
        ctx.load_cert_chain(pair.cert, pair.key, password=_no_password)
    except (ssl.SSLError, OSError, ValueError) as e:
        raise TLSLoadError(f"{path}.key", f'cannot load "{pair.cert}" with "{pair.key}": {e}') from None
    return ctx


class ListenerTLSState:
    """The contexts the listener serves now; :meth:`install` swaps in a new generation."""

    def __init__(self, tls: ListenerTLS, contexts: ServerContexts, stats: Stats, handshake_timeout: float) -> None:
        self.tls = tls
        self.current = contexts
        self.monitor = HandshakeMonitor(stats, handshake_timeout)
        # The dispatcher: what the listening socket is created with. It holds the default
        # certificate too, in case a handshake ever skips the SNI callback.
        self.dispatcher = _pair_context(tls, *tls.pairs()[0])
        self.dispatcher.sni_callback = self._select
        self.dispatcher.sslobject_class = tracked_class(self.monitor)

    def _select(self, ssl_obj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        ssl_obj.context = self.current.select(server_name)

    def install(self, tls: ListenerTLS, contexts: ServerContexts) -> None:
        """New handshakes use `contexts` from now on; established connections keep theirs."""
        self.current = contexts
        self.tls = tls
        d = self.dispatcher
        d.minimum_version = _VERSIONS[tls.min_version]
        if tls.client_ca:
            d.load_verify_locations(cafile=tls.client_ca)
            d.verify_mode = ssl.CERT_REQUIRED
        else:
            d.verify_mode = ssl.CERT_NONE
