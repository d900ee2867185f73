"""Scalar formats of the config: durations, sizes, listen addresses, endpoint URLs, statuses.

Durations are seconds (float); sizes are bytes (int). Parsers raise ValueError with the exact
message the loader puts after the key path. The fmt_* helpers format values back for humans.
"""

from __future__ import annotations

import ipaddress
import math
import re
from urllib.parse import urlsplit

from proxy.config.model import Address, Endpoint, UpstreamTLS

DURATION_HINT = "use e.g. 500ms, 2s, 1m"
SIZE_HINT = "use e.g. 512B, 32KiB, 10MiB"

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# A Go-style duration: one or more <number><unit> parts, e.g. "1m30s", "1.5s", "250ms".
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")
_DURATION = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ms|s|m|h|d))+")
_PLAIN_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")

# k/K/KB mean 1024 here, like KiB: nobody sizing a header buffer means 1000 bytes.
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)")
_HOSTNAME = re.compile(r"[A-Za-z0-9.-]+")
_STATUS = re.compile(r"[1-5](?:xx|\d\d)")


def parse_duration(value: object) -> float:
    """A duration in seconds from a number (seconds) or a string like "500ms", "2s", "1m30s"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration, got boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        # A sign is parsed (not rejected as garbage) so "-1s" gets the clearer range error.
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.lstrip("+-")
        if _PLAIN_NUMBER.fullmatch(text):
            seconds = sign * float(text)
        elif _DURATION.fullmatch(text):
            seconds = sign * sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))
        else:
            raise ValueError(f'invalid duration "{value}" ({DURATION_HINT})')
    else:
        raise ValueError(f"expected a duration, got {type(value).__name__}")
    if not math.isfinite(seconds):
        raise ValueError("must be a finite duration")
    return seconds


def parse_size(value: object) -> int:
    """A size in bytes from an int or a string like "32KiB", "10MiB", "8k" (k = 1024)."""
    if isinstance(value, bool):
        raise ValueError("expected a size, got boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be a whole number of bytes")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a size, got {type(value).__name__}")
    m = _SIZE.fullmatch(value.strip())
    if m is None or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f'invalid size "{value}" ({SIZE_HINT})')
    size = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if not size.is_integer():
        raise ValueError(f'invalid size "{value}": not a whole number of bytes')
    return int(size)


def fmt_number(x: float) -> str:
    """95.0 -> "95", 99.5 -> "99.5": no trailing ".0", no float noise."""
    if float(x).is_integer():
        return str(int(x))
    return format(x, ".10g")


def fmt_duration(seconds: float) -> str:
    """0.8 -> "800ms", 4 -> "4s", 90 -> "90s", 120 -> "2m", 3600 -> "1h"."""
    if seconds != 0 and seconds < 1:
        return f"{fmt_number(round(seconds * 1000, 6))}ms"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{fmt_number(seconds / 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{fmt_number(seconds / 60)}m"
    return f"{fmt_number(seconds)}s"


def fmt_size(size: int) -> str:
    """32768 -> "32KiB", 10485760 -> "10MiB", 1000 -> "1000B"."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def parse_address(value: object) -> Address:
    """An Address from "host:port", "[ipv6]:port", ":port" (all interfaces) or a bare port number."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = f":{value}"  # `listen: 8080` means every interface
    if not isinstance(value, str):
        raise ValueError(f'expected "host:port", got {"null" if value is None else type(value).__name__}')
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            sep = ""
    else:
        host, sep, port = value.rpartition(":")
        if ":" in host:
            raise ValueError(f'IPv6 addresses need brackets, e.g. "[::1]:8080", got "{value}"')
        host = host or "0.0.0.0"
        sep = sep if _HOSTNAME.fullmatch(host) else ""
    if not sep:
        raise ValueError(f'expected "host:port", "[ipv6]:port" or ":port", got "{value}"')
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f'port must be 0..65535, got "{port}"')
    return Address(host, int(port))


def same_socket(a: Address, b: Address) -> bool:
    """Would binding both fail? Port 0 is always a fresh ephemeral port."""
    if a.port != b.port or a.port == 0:
        return False
    wildcard = ("0.0.0.0", "::")
    return a.host == b.host or a.host in wildcard or b.host in wildcard


def parse_endpoint(url: str) -> Endpoint:
    """An Endpoint from `http://host[:port]` (port 80 by default) or `https://host[:port]` (443;
    verified against the system CAs unless the upstream's `tls:` says otherwise)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f'invalid endpoint URL "{url}": {e}') from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f'invalid endpoint URL "{url}" (expected http://host:port or https://host:port)')
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username is not None:
        raise ValueError(f'endpoint URL must be just {parts.scheme}://host:port, got "{url}"')
    if port == 0:
        raise ValueError(f'invalid endpoint URL "{url}": port must be 1..65535')
    if parts.scheme == "https":
        return Endpoint(parts.hostname, 443 if port is None else port, UpstreamTLS())
    return Endpoint(parts.hostname, 80 if port is None else port)


def parse_webhook(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f'invalid webhook URL "{url}" (expected http://... or https://...)')
    return url


def parse_status(text: str) -> str:
    """Normalise a status class or code: "5XX" -> "5xx", "503" -> "503"."""
    status = text.strip().lower()
    if not _STATUS.fullmatch(status):
        raise ValueError(f'invalid status "{text}" (use a class like "5xx" or a code like 503)')
    return status


def parse_network(text: str) -> str:
    """A trusted-proxy entry: an address or CIDR, normalised ("127.0.0.1" -> "127.0.0.1/32")."""
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise ValueError(f'invalid IP address or CIDR "{text}"') from None
