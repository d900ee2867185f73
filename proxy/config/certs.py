"""Certificate and key files, checked the way the TLS listener and upstream connections load them.

Each check raises :class:`CertError` naming which of the two files is at fault (`which` is
"cert" or "key"), so the loader can report the right key path (`tls.cert`,
`tls.certificates[1].key`). Blocking file reads: the loader runs in a thread on reloads.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from typing import Any

PEM_CERT = "-----BEGIN CERTIFICATE-----"
MAX_PEM = 1024 * 1024  # a certificate chain or key file beyond 1 MiB is no certificate


class CertError(ValueError):
    """A certificate/key problem; `which` is "cert", "key" or "ca"."""

    def __init__(self, which: str, message: str) -> None:
        super().__init__(message)
        self.which = which


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What the listener needs to know about a certificate: its names, serial and expiry."""

    names: tuple[str, ...]  # DNS names (lower-cased, "*.example.com" kept), CN when there is no SAN
    serial: str
    not_after: float  # epoch seconds

    @property
    def expired(self) -> bool:
        return self.not_after < time.time()


def _read(path: str, which: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM + 1)
    except OSError as e:
        raise CertError(which, f'cannot read "{path}": {e.strerror or e}') from None
    if len(data) > MAX_PEM:
        raise CertError(which, f'"{path}" is larger than 1 MiB: not a PEM file')
    return data.decode("latin-1")


def cert_info(path: str) -> CertInfo:
    """Parse the first certificate of a PEM file (the leaf). Raises CertError("cert", ...)."""
    if PEM_CERT not in _read(path, "cert"):
        raise CertError("cert", f'"{path}" is not a PEM certificate (no "{PEM_CERT}" line)')
    try:
        # The stdlib's own PEM decoder (what getpeercert() returns): no extra dependency.
        decoded: dict[str, Any] = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
    except (ssl.SSLError, OSError, ValueError) as e:
        raise CertError("cert", f'"{path}" is not a valid PEM certificate ({_reason(e)})') from None
    names = [str(value).lower() for kind, value in decoded.get("subjectAltName", ()) if kind == "DNS"]
    if not names:  # legacy certificates: the subject's common name (as browsers used to)
        for rdn in decoded.get("subject", ()):
            names += [str(value).lower() for attr, value in rdn if attr == "commonName"]
    try:
        not_after = float(ssl.cert_time_to_seconds(str(decoded.get("notAfter", ""))))
    except ValueError:
        not_after = 0.0
    return CertInfo(tuple(dict.fromkeys(names)), str(decoded.get("serialNumber", "")), not_after)


def _no_password() -> bytes:
    raise CertError("key", "the private key is encrypted (a passphrase is not supported): store it unencrypted")


def check_pair(cert: str, key: str) -> CertInfo:
    """The pair loads into a TLS context: both PEM, the key matches the certificate. Raises CertError."""
    info = cert_info(cert)
    text = _read(key, "key")
    if "PRIVATE KEY-----" not in text:
        raise CertError("key", f'"{key}" is not a PEM private key')
    if "ENCRYPTED" in text:
        _no_password()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # The password callback keeps OpenSSL from ever prompting on a terminal.
        ctx.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e) or "key values mismatch" in str(e):
            raise CertError("key", f'"{key}" does not match the certificate "{cert}"') from None
        raise CertError("key", f'"{key}" cannot be loaded with "{cert}" ({_reason(e)})') from None
    except OSError as e:
        raise CertError("key", f'cannot read "{key}": {e.strerror or e}') from None
    return info


def check_ca(path: str) -> None:
    """A CA bundle file: PEM certificates that load as trust anchors. Raises CertError("ca", ...)."""
    if PEM_CERT not in _read(path, "ca"):
        raise CertError("ca", f'"{path}" is not a PEM certificate bundle (no "{PEM_CERT}" line)')
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as e:
        raise CertError("ca", f'"{path}" cannot be loaded as CA certificates ({_reason(e)})') from None


def _reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None)
    return str(reason).lower().replace("_", " ") if reason else str(e)
