"""Certificate reload in a real proxy process: in-place renewal and a Kubernetes Secret swap under
load (no failed request, new handshakes get the new certificate), a bad new pair refused while the
old one keeps serving, a config reload switching certificates, and `--workers`."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ProxyProcess
from support.certs import CA, Issued, served_serial

pytestmark = pytest.mark.timeout(180)

UPSTREAM = "http://127.0.0.1:{port}"


@pytest.fixture
def backend() -> Iterator[int]:
    """A threaded plain HTTP upstream (the proxy under test is a separate process)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = b"ok\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def wait_for(check: Callable[[], object], timeout: float) -> None:
    """Poll `check()` until truthy (sync: the proxy is another process); fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s; last value: {last!r}")


def config(port: int, cert: Path, key: Path) -> str:
    return (
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\naccess_log: false\n"
        f"upstreams:\n  stable: {{endpoints: ['http://127.0.0.1:{port}']}}\n"
        "routes:\n  - {name: all, to: stable}\n"
        f"tls:\n  cert: {cert}\n  key: {key}\n"
    )


def install(issued: Issued, cert: Path, key: Path) -> None:
    """Renew in place, as cert-manager's writes look to a watcher: the certificate, then the key."""
    cert.write_bytes(issued.cert.read_bytes())
    key.write_bytes(issued.key.read_bytes())


class Load:
    """Two client threads until stopped: one keep-alive connection, one new connection per request."""

    def __init__(self, port: int, ca: Path) -> None:
        self.port = port
        self.ctx = ssl.create_default_context(cafile=str(ca))
        self.ok = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(keep,), daemon=True) for keep in (True, False)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def run(self, keep_alive: bool) -> None:
        conn: http.client.HTTPSConnection | None = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=10)
                conn.request("GET", "/")
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200 or body != b"ok\n":
                    self.failures.append(f"{resp.status} {body!r}")
                else:
                    self.ok += 1
            except Exception as e:
                self.failures.append(repr(e))
            if not keep_alive and conn is not None:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()


def status(pp: ProxyProcess) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{pp.admin_port}/status", timeout=10) as resp:
        doc: dict[str, object] = json.loads(resp.read())
        return doc


def test_rotation_under_load_in_place_and_by_secret_swap(
    tmp_path: Path, backend: int, proxy_process: Callable[..., ProxyProcess]
) -> None:
    ca = CA(tmp_path / "pki")
    old, renewed, swapped = (ca.issue("localhost", dns=["localhost"]) for _ in range(3))
    # A Kubernetes Secret volume: files are symlinks through `..data` to a timestamped directory.
    secret = tmp_path / "secret"
    first = secret / "..2026_11_30_01"
    first.mkdir(parents=True)
    install(old, first / "tls.crt", first / "tls.key")
    (secret / "..data").symlink_to(first.name)
    for name in ("tls.crt", "tls.key"):
        (secret / name).symlink_to(f"..data/{name}")
    pp = proxy_process(config(backend, secret / "tls.crt", secret / "tls.key"))
    assert served_serial(pp.port) == old.serial_hex
    with Load(pp.port, ca.cert) as load:
        wait_for(lambda: load.ok > 20, timeout=20)
        # 1. cert-manager style: the files behind the links are rewritten in place.
        install(renewed, first / "tls.crt", first / "tls.key")
        wait_for(lambda: served_serial(pp.port) == renewed.serial_hex, timeout=20)
        seen = load.ok
        wait_for(lambda: load.ok > seen + 20, timeout=20)
        # 2. Kubernetes style: a new directory, then `..data` swapped atomically by rename.
        second = secret / "..2026_11_30_02"
        second.mkdir()
        install(swapped, second / "tls.crt", second / "tls.key")
        (secret / "..data_tmp").symlink_to(second.name)
        os.rename(secret / "..data_tmp", secret / "..data")
        shutil.rmtree(first)
        wait_for(lambda: served_serial(pp.port) == swapped.serial_hex, timeout=20)
        seen = load.ok
        wait_for(lambda: load.ok > seen + 20, timeout=20)
    assert load.failures == [], load.failures[:5]
    assert load.ok > 60
    assert status(pp)["config"]["last_error"] is None  # type: ignore[index]


def test_bad_new_pair_is_refused_and_the_old_one_keeps_serving(
    tmp_path: Path, backend: int, proxy_process: Callable[..., ProxyProcess]
) -> None:
    ca = CA(tmp_path / "pki")
    old, other, fixed = (ca.issue("localhost", dns=["localhost"]) for _ in range(3))
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    install(old, cert, key)
    pp = proxy_process(config(backend, cert, key))
    # A key that belongs to another certificate.
    shutil.copy(other.key, key)
    try:
        wait_for(lambda: status(pp)["config"]["last_error"], timeout=20)  # type: ignore[index]
    except AssertionError:
        print("".join(pp.lines))
        raise
    error = status(pp)["config"]["last_error"]  # type: ignore[index]
    assert error == f'tls.key: "{key}" does not match the certificate "{cert}" (line 10)'
    wait_for(lambda: any("refused, old config keeps serving: tls.key" in line for line in pp.lines), timeout=10)
    assert served_serial(pp.port) == old.serial_hex
    # Not PEM at all.
    cert.write_text("not a certificate\n")
    wait_for(lambda: "is not a PEM certificate" in str(status(pp)["config"]["last_error"]), timeout=20)  # type: ignore[index]
    assert served_serial(pp.port) == old.serial_hex
    # Fixed: the new pair is served, the error clears.
    install(fixed, cert, key)
    wait_for(lambda: served_serial(pp.port) == fixed.serial_hex, timeout=20)
    assert status(pp)["config"]["last_error"] is None  # type: ignore[index]


def test_config_reload_switches_certificates_and_workers_share_the_port(
    tmp_path: Path, backend: int, proxy_process: Callable[..., ProxyProcess]
) -> None:
    ca = CA(tmp_path / "pki")
    one, two = ca.issue("localhost", dns=["localhost"]), ca.issue("localhost", dns=["localhost"])
    pp = proxy_process(config(backend, one.cert, one.key), args=("--workers", "2"))
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    for _ in range(10):  # new connections, spread over both workers by the kernel
        conn = http.client.HTTPSConnection("127.0.0.1", pp.port, context=ctx, timeout=10)
        conn.request("GET", "/")
        assert conn.getresponse().read() == b"ok\n"
        conn.close()
    pp.config.write_text(config(backend, two.cert, two.key).replace("127.0.0.1:0", f"127.0.0.1:{pp.port}", 1))
    # Every worker reloads: many new handshakes all see the new certificate.
    wait_for(lambda: all(served_serial(pp.port) == two.serial_hex for _ in range(6)), timeout=30)
    out = subprocess.run(
        ["curl", "-sS", "--cacert", str(ca.cert), f"https://127.0.0.1:{pp.port}/"], capture_output=True, text=True
    )
    assert out.stdout == "ok\n", out.stderr
