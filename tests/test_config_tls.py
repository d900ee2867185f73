"""The `tls:` sections of the config: good values read exactly, bad ones refused with key path and line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from support.certs import CA, Issued

from proxy.config import ConfigError, parse_config
from proxy.config.model import CertPair, Endpoint, ListenerTLS, UpstreamTLS

BASE = """\
listen: 127.0.0.1:8443
upstreams:
  stable: {endpoints: ["http://127.0.0.1:9001"]}
routes:
  - {name: all, to: stable}
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[CA, Issued, Issued]:
    ca = CA(tmp_path_factory.mktemp("pki"))
    return ca, ca.issue("localhost", dns=["localhost"]), ca.issue("other.test", dns=["other.test"])


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, env={})
    return info.value.errors


def test_listener_tls_is_read_with_its_defaults(pki: tuple[CA, Issued, Issued]) -> None:
    _, a, b = pki
    cfg = parse_config(
        BASE + f"tls:\n  cert: {a.cert}\n  key: {a.key}\n  certificates:\n    - {{cert: {b.cert}, key: {b.key}}}\n"
    )
    assert cfg.tls == ListenerTLS(str(a.cert), str(a.key), (CertPair(str(b.cert), str(b.key)),))
    assert cfg.tls.min_version == "1.2" and cfg.tls.alpn == ("h2", "http/1.1")
    assert [p for p, _ in cfg.tls.pairs()] == ["tls", "tls.certificates[0]"]
    assert parse_config(BASE).tls is None  # no `tls:`: cleartext as before


def test_listener_options(pki: tuple[CA, Issued, Issued]) -> None:
    ca, a, _ = pki
    text = (
        BASE
        + f"tls:\n  cert: {a.cert}\n  key: {a.key}\n  client_ca: {ca.cert}\n  min_version: 1.3\n  alpn: [http/1.1]\n"
    )
    tls = parse_config(text).tls
    assert tls is not None
    assert (tls.client_ca, tls.min_version, tls.alpn) == (str(ca.cert), "1.3", ("http/1.1",))


def test_only_certificates_is_enough(pki: tuple[CA, Issued, Issued]) -> None:
    _, a, _ = pki
    tls = parse_config(BASE + f"tls:\n  certificates: [{{cert: {a.cert}, key: {a.key}}}]\n").tls
    assert tls is not None and tls.pairs() == (("tls.certificates[0]", CertPair(str(a.cert), str(a.key))),)


def test_bad_listener_values_have_key_paths_and_lines(pki: tuple[CA, Issued, Issued], tmp_path: Path) -> None:
    _, a, b = pki
    notpem = tmp_path / "notpem.crt"
    notpem.write_text("hello\n")
    keyonly = f"tls:\n  key: {a.key}\n"
    assert errors_of(BASE + keyonly) == ['tls: set both "cert" and "key" (only "key" is set) (line 6)']
    assert errors_of(BASE + "tls: {}\n") == ['tls: needs "cert" and "key" (or a list of "certificates") (line 6)']
    assert errors_of(BASE + f"tls:\n  cert: {tmp_path}/missing.crt\n  key: {a.key}\n") == [
        f'tls.cert: cannot read "{tmp_path}/missing.crt": No such file or directory (line 7)'
    ]
    assert errors_of(BASE + f"tls:\n  cert: {notpem}\n  key: {a.key}\n") == [
        f'tls.cert: "{notpem}" is not a PEM certificate (no "-----BEGIN CERTIFICATE-----" line) (line 7)'
    ]
    mismatched = f"tls:\n  cert: {a.cert}\n  key: {a.key}\n  certificates:\n    - {{cert: {a.cert}, key: {a.key}}}\n"
    mismatched += f"    - cert: {a.cert}\n      key: {b.key}\n"
    assert errors_of(BASE + mismatched) == [
        f'tls.certificates[1].key: "{b.key}" does not match the certificate "{a.cert}" (line 12)'
    ]
    assert errors_of(BASE + f"tls:\n  cert: {a.key}\n  key: {a.key}\n") == [
        f'tls.cert: "{a.key}" is not a PEM certificate (no "-----BEGIN CERTIFICATE-----" line) (line 7)'
    ]
    assert errors_of(BASE + f"tls:\n  cert: {a.cert}\n  key: {a.cert}\n") == [
        f'tls.key: "{a.cert}" is not a PEM private key (line 8)'
    ]


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ("  min_version: 1.0\n", 'tls.min_version: TLS 1.0 is refused (deprecated by RFC 8996): use "1.2" or "1.3"'),
        ('  min_version: "1.1"\n', 'tls.min_version: TLS 1.1 is refused (deprecated by RFC 8996): use "1.2" or "1.3"'),
        ("  min_version: 2\n", 'tls.min_version: invalid TLS version "2" (use "1.2" or "1.3")'),
        ("  alpn: [h3]\n", 'tls.alpn[0]: unknown ALPN protocol "h3" (use h2 or http/1.1; HTTP/3 is not supported)'),
        ("  alpn: []\n", "tls.alpn: must list at least one protocol (h2, http/1.1)"),
        (
            "  client_ca: /nonexistent/ca.pem\n",
            'tls.client_ca: cannot read "/nonexistent/ca.pem": No such file or directory',
        ),
        ("  bogus: 1\n", "tls.bogus: unknown key (allowed: cert, key, certificates, client_ca, min_version, alpn)"),
    ],
)
def test_bad_listener_options(pki: tuple[CA, Issued, Issued], extra: str, error: str) -> None:
    _, a, _ = pki
    assert errors_of(BASE + f"tls:\n  cert: {a.cert}\n  key: {a.key}\n" + extra) == [f"{error} (line 9)"]


def test_https_endpoints_and_upstream_tls(pki: tuple[CA, Issued, Issued]) -> None:
    ca, a, _ = pki
    text = BASE.replace('"http://127.0.0.1:9001"', '"https://canary.internal", "http://127.0.0.1:9001"')
    cfg = parse_config(text)
    assert cfg.upstreams["stable"].endpoints == (
        Endpoint("canary.internal", 443, UpstreamTLS()),  # verified against the system CAs
        Endpoint("127.0.0.1", 9001),
    )
    text = BASE.replace(
        '{endpoints: ["http://127.0.0.1:9001"]}',
        f'{{endpoints: ["https://127.0.0.1:9443"], tls: {{ca: {ca.cert}, server_name: Localhost, cert: {a.cert}, '
        f"key: {a.key}}}}}",
    )
    (ep,) = parse_config(text).upstreams["stable"].endpoints
    assert ep == Endpoint("127.0.0.1", 9443, UpstreamTLS(str(ca.cert), "localhost", True, str(a.cert), str(a.key)))
    assert ep.key == "127.0.0.1:9443" and ep.pool_key.startswith("https://127.0.0.1:9443#")
    off = BASE.replace('{endpoints: ["http://127.0.0.1:9001"]}', '{endpoints: ["https://h:1"], tls: {verify: false}}')
    assert parse_config(off).upstreams["stable"].endpoints[0].tls == UpstreamTLS(verify=False)


@pytest.mark.parametrize(
    ("upstream", "error"),
    [
        (
            '{endpoints: ["ftp://127.0.0.1:9001"]}',
            'upstreams.stable.endpoints[0]: invalid endpoint URL "ftp://127.0.0.1:9001" '
            "(expected http://host:port or https://host:port) (line 3)",
        ),
        (
            '{endpoints: ["http://127.0.0.1:9001"], tls: {verify: false}}',
            "upstreams.stable.tls: applies to https:// endpoints only, and this upstream has none (line 3)",
        ),
        (
            '{endpoints: ["https://h:1"], tls: {verify: "no"}}',
            "upstreams.stable.tls.verify: expected true or false, got string (line 3)",
        ),
        (
            '{endpoints: ["https://h:1"], tls: {server_name: "a b"}}',
            'upstreams.stable.tls.server_name: invalid server name "a b" (a DNS name, without port) (line 3)',
        ),
        (
            '{endpoints: ["https://h:1"], tls: {ca: /nonexistent/ca.pem}}',
            'upstreams.stable.tls.ca: cannot read "/nonexistent/ca.pem": No such file or directory (line 3)',
        ),
        (
            '{endpoints: ["https://h:1"], tls: {cert: /nonexistent/c.pem}}',
            'upstreams.stable.tls: set both "cert" and "key" (only "cert" is set) (line 3)',
        ),
    ],
)
def test_bad_upstream_tls(upstream: str, error: str) -> None:
    assert errors_of(BASE.replace('{endpoints: ["http://127.0.0.1:9001"]}', upstream)) == [error]


def test_mismatched_upstream_client_pair(pki: tuple[CA, Issued, Issued]) -> None:
    _, a, b = pki
    text = BASE.replace(
        '{endpoints: ["http://127.0.0.1:9001"]}',
        f'{{endpoints: ["https://h:1"], tls: {{cert: {a.cert}, key: {b.key}}}}}',
    )
    assert errors_of(text) == [
        f'upstreams.stable.tls.key: "{b.key}" does not match the certificate "{a.cert}" (line 3)'
    ]


def test_an_expired_certificate_is_a_warning_not_an_error(tmp_path: Path) -> None:
    from proxy.config.certs import cert_info
    from proxy.config.lint import config_warnings

    ca = CA(tmp_path)
    old = ca.issue("localhost", dns=["localhost"], days=0)  # valid until the second it was signed
    deadline = time.monotonic() + 5
    while not cert_info(str(old.cert)).expired and time.monotonic() < deadline:
        time.sleep(0.1)  # the clock passing its notAfter second, not a synchronisation
    cfg = parse_config(BASE + f"tls:\n  cert: {old.cert}\n  key: {old.key}\n")  # loads: served anyway
    (warning,) = config_warnings(cfg)
    assert warning.startswith(f'tls.cert: certificate "{old.cert}" expired on ')
    assert warning.endswith("; clients will refuse it")
