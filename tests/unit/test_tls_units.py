"""Pure pieces of the TLS code: SNI selection, handshake error reasons, file checks."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from support.certs import CA

from proxy.config.certs import CertError, cert_info, check_pair
from proxy.config.model import CertPair, ListenerTLS
from proxy.dataplane.tls.handshakes import REASONS, classify
from proxy.dataplane.tls.server import build_contexts, offered_alpn


def test_sni_selection_exact_wildcard_cn_and_default(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    a = ca.issue("a.test", dns=["a.test", "www.a.test"])
    w = ca.issue("w.test", dns=["*.w.test"])
    cn = ca.issue("cn.test", ips=())
    tls = ListenerTLS(str(a.cert), str(a.key), (CertPair(str(w.cert), str(w.key)), CertPair(str(cn.cert), str(cn.key))))
    got = build_contexts(tls)
    default = got.default
    assert got.select(None) is default and got.select("nothing.test") is default
    assert got.select("WWW.A.TEST.") is default  # case and a trailing dot do not matter
    wild = got.select("x.w.test")
    assert wild is not default and got.select("y.x.w.test") is default and got.select("w.test") is default
    assert got.select("cn.test") not in (default, wild)
    assert cert_info(str(cn.cert)).names == ("cn.test",)
    assert cert_info(str(a.cert)).names == ("a.test", "www.a.test")
    assert got.serials[str(w.cert)] == w.serial_hex


def test_alpn_is_limited_to_what_the_legs_speak() -> None:
    from proxy.dataplane.legs.base import ALPN_SUPPORTED

    assert offered_alpn(ListenerTLS(alpn=("h2", "http/1.1"))) == [p for p in ("h2", "http/1.1") if p in ALPN_SUPPORTED]
    assert "http/1.1" in ALPN_SUPPORTED


def test_encrypted_and_mismatched_keys_are_refused(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    a, b = ca.issue("a.test"), ca.issue("b.test")
    with pytest.raises(CertError) as info:
        check_pair(str(a.cert), str(b.key))
    assert info.value.which == "key" and "does not match" in str(info.value)
    enc = tmp_path / "enc.key"
    enc.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nxx\n-----END ENCRYPTED PRIVATE KEY-----\n")
    with pytest.raises(CertError) as info:
        check_pair(str(a.cert), str(enc))
    assert "encrypted" in str(info.value)


def _ssl_error(reason: str) -> ssl.SSLError:
    e = ssl.SSLError(1, f"[SSL: {reason}] x")
    e.reason = reason  # type: ignore[attr-defined]
    return e


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("UNSUPPORTED_PROTOCOL", "protocol_version"),
        ("NO_SHARED_CIPHER", "no_shared_cipher"),
        ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "certificate_required"),
        ("HTTP_REQUEST", "http_request"),
        ("TLSV1_ALERT_UNKNOWN_CA", "client_rejected_certificate"),
        ("WRONG_VERSION_NUMBER", "other"),
    ],
)
def test_handshake_reasons(reason: str, expected: str) -> None:
    assert classify(_ssl_error(reason)) == expected
    assert expected in REASONS


def test_verify_failures_and_eof() -> None:
    e = ssl.SSLCertVerificationError(1, "verify failed")
    e.verify_code = 20  # unable to get local issuer certificate
    assert classify(e) == "unknown_ca"
    e.verify_code = 10  # expired
    assert classify(e) == "bad_certificate"
    assert classify(ssl.SSLEOFError(8, "eof")) == "eof"
