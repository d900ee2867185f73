"""A private certificate authority for the TLS tests, made with the `openssl` command line tool.

Every test gets its own CA (nothing shared, nothing checked in): `CA(tmp_path, "test-ca")`, then
`ca.issue("localhost", dns=["localhost"], ips=["127.0.0.1"])` for a server certificate (also good
for client authentication) with a known serial number.
"""

from __future__ import annotations

import itertools
import subprocess
from dataclasses import dataclass
from pathlib import Path

_serials = itertools.count(0x1000)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path
    serial: int

    @property
    def serial_hex(self) -> str:
        """As `openssl x509 -serial` prints it (upper-case hex)."""
        return f"{self.serial:X}"


class CA:
    """A self-signed EC P-256 CA in `directory/name.{crt,key}`."""

    def __init__(self, directory: Path, name: str = "test-ca") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.cert = directory / f"{name}.crt"
        self.key = directory / f"{name}.key"
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(self.key), "-out", str(self.cert), "-subj", f"/CN={name}", "-days", "30",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=directory,
        )  # fmt: skip

    def issue(
        self,
        cn: str,
        dns: tuple[str, ...] | list[str] = (),
        ips: tuple[str, ...] | list[str] = ("127.0.0.1",),
        *,
        stem: str | None = None,
        days: int = 30,
    ) -> Issued:
        """A leaf certificate signed by this CA (serverAuth and clientAuth)."""
        serial = next(_serials)
        stem = stem or f"{cn.replace('*', 'star')}-{serial:x}"
        key, csr, crt, ext = (self.dir / f"{stem}.{s}" for s in ("key", "csr", "crt", "ext"))
        sans = [f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips]
        lines = ["basicConstraints=CA:FALSE", "extendedKeyUsage=serverAuth,clientAuth"]
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n")
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}", cwd=self.dir,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-set_serial", str(serial), "-days", str(days), "-out", str(crt), "-extfile", str(ext),
            cwd=self.dir,
        )  # fmt: skip
        return Issued(crt, key, serial)


def s_client(port: int, *args: str, data: bytes = b"", timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """`openssl s_client -connect 127.0.0.1:PORT ARGS` with `data` on stdin (then EOF)."""
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
        input=data.decode("latin-1"),
        capture_output=True,
        text=True,
        errors="replace",  # after ALPN h2 the server's first bytes are an HTTP/2 SETTINGS frame
        timeout=timeout,
    )


def served_serial(port: int, server_name: str | None = None) -> str:
    """The serial number of the certificate the listener serves (for `server_name`), upper-case hex."""
    args = ("-servername", server_name) if server_name else ("-noservername",)
    out = s_client(port, *args).stdout
    pem = out[out.index("-----BEGIN CERTIFICATE-----") : out.index("-----END CERTIFICATE-----") + 25]
    x = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=pem, capture_output=True, text=True, check=True)
    return x.stdout.strip().removeprefix("serial=").lstrip("0") or "0"
