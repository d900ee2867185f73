"""The `tls:` sections: the listener's (top level) and each upstream's (`upstreams.NAME.tls`).

Every certificate, key and CA file is read and checked here, at load, so a missing, unreadable,
non-PEM or mismatched file is refused like any config error, with its key path and line; a reload
that brings one keeps the last good config (and its certificates) serving.
"""

from __future__ import annotations

import re

from proxy.config.certs import CertError, check_ca, check_pair
from proxy.config.model import CertPair, ListenerTLS, UpstreamTLS
from proxy.config.yamlnodes import Reader
from proxy.config.yamltree import Value

LISTENER_KEYS = ("cert", "key", "certificates", "client_ca", "min_version", "alpn")
UPSTREAM_KEYS = ("ca", "server_name", "verify", "cert", "key")
ALPN_KNOWN = ("h2", "http/1.1")
MIN_VERSIONS = {"1.2": "1.2", "1.3": "1.3", "tlsv1.2": "1.2", "tlsv1.3": "1.3"}
_SERVER_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?")


def read_listener_tls(r: Reader, v: Value) -> ListenerTLS | None:
    """`tls: {cert, key, certificates, client_ca, min_version, alpn}`; None after an error."""
    m = r.mapping(v, LISTENER_KEYS)
    if m is None:
        return None
    before = len(r.errors)
    cert, key = _pair(r, v, m)
    pairs: list[CertPair] = []
    if "certificates" in m:
        for item in r.sequence(m["certificates"]) or []:
            pm = r.mapping(item, ("cert", "key"), required=("cert", "key"))
            if pm is not None and "cert" in pm and "key" in pm:
                c, k = _pair(r, item, pm)
                if c is not None and k is not None:
                    pairs.append(CertPair(c, k))
    if cert is None and "cert" not in m and "key" not in m and not pairs and "certificates" not in m:
        r.error(v, 'needs "cert" and "key" (or a list of "certificates")')
    client_ca = _ca(r, m["client_ca"]) if "client_ca" in m else None
    min_version = _min_version(r, m["min_version"]) if "min_version" in m else "1.2"
    alpn = _alpn(r, m["alpn"]) if "alpn" in m else ALPN_KNOWN
    if len(r.errors) > before or min_version is None or alpn is None:
        return None
    return ListenerTLS(cert, key, tuple(pairs), client_ca, min_version, alpn)


def read_upstream_tls(r: Reader, v: Value) -> UpstreamTLS | None:
    """`upstreams.NAME.tls: {ca, server_name, verify, cert, key}`; None after an error."""
    m = r.mapping(v, UPSTREAM_KEYS)
    if m is None:
        return None
    before = len(r.errors)
    cert, key = _pair(r, v, m) if "cert" in m or "key" in m else (None, None)
    ca = _ca(r, m["ca"]) if "ca" in m else None
    verify = r.boolean(m["verify"]) if "verify" in m else True
    server_name = None
    if "server_name" in m:
        server_name = r.string(m["server_name"])
        if server_name is not None and (len(server_name) > 253 or not _SERVER_NAME.fullmatch(server_name)):
            r.error(m["server_name"], f'invalid server name "{server_name}" (a DNS name, without port)')
    if len(r.errors) > before or verify is None:
        return None
    return UpstreamTLS(ca, server_name.rstrip(".").lower() if server_name else None, verify, cert, key)


def _pair(r: Reader, at: Value, m: dict[str, Value]) -> tuple[str | None, str | None]:
    """`cert` + `key` of one mapping, both present and loadable together."""
    if ("cert" in m) != ("key" in m):
        r.error(at, f'set both "cert" and "key" (only "{"cert" if "cert" in m else "key"}" is set)')
        return None, None
    if "cert" not in m:
        return None, None
    cert, key = r.string(m["cert"]), r.string(m["key"])
    if cert is None or key is None:
        return None, None
    try:
        check_pair(cert, key)
    except CertError as e:
        r.error(m["cert"] if e.which == "cert" else m["key"], str(e))
        return None, None
    return cert, key


def _ca(r: Reader, v: Value) -> str | None:
    path = r.string(v)
    if path is None:
        return None
    try:
        check_ca(path)
    except CertError as e:
        r.error(v, str(e))
        return None
    return path


def _min_version(r: Reader, v: Value) -> str | None:
    text = r.text(v)
    if text is None:
        return None
    version = MIN_VERSIONS.get(text.strip().lower())
    if version is None:
        if text.strip().lower().removeprefix("tlsv") in ("1", "1.0", "1.1"):
            r.error(v, f'TLS {text} is refused (deprecated by RFC 8996): use "1.2" or "1.3"')
        else:
            r.error(v, f'invalid TLS version "{text}" (use "1.2" or "1.3")')
    return version


def _alpn(r: Reader, v: Value) -> tuple[str, ...] | None:
    names = r.list_of(v, _alpn_name, empty="must list at least one protocol (h2, http/1.1)")
    return None if names is None else tuple(dict.fromkeys(names))


def _alpn_name(text: str) -> str:
    name = text.strip().lower()
    if name not in ALPN_KNOWN:
        raise ValueError(f'unknown ALPN protocol "{text}" (use h2 or http/1.1; HTTP/3 is not supported)')
    return name
