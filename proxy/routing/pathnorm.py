"""Path normalisation for route matching (like Envoy's `normalize_path`, RFC 3986 6.2.2).

`path_prefix` is matched on the normalised path, so `/beta/%2e%2e/admin` (which an upstream
resolves to `/admin`) does not match `/beta`. Percent-encoded unreserved characters are decoded
(`%7E` -> `~`, `%2E` -> `.`), other escapes are kept (`%2F` stays: it is not a separator), and dot
segments are removed. The request is still forwarded as the client sent it.
"""

from __future__ import annotations

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = b"0123456789ABCDEFabcdef"


def normalize_path(path: bytes) -> bytes:
    """The path with unreserved escapes decoded and `.`/`..` segments removed."""
    if b"%" not in path and b"/." not in path:
        return path  # nearly every request: nothing to do
    if b"%" in path:
        path = _decode_unreserved(path)
    if b"/." not in path:
        return path
    return _remove_dot_segments(path)


def _decode_unreserved(path: bytes) -> bytes:
    out = bytearray()
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c == 0x25 and i + 2 < n and path[i + 1] in _HEX and path[i + 2] in _HEX:
            byte = int(path[i + 1 : i + 3], 16)
            if byte in _UNRESERVED:
                out.append(byte)
            else:
                out += path[i : i + 3].upper()
            i += 3
            continue
        out.append(c)
        i += 1
    return bytes(out)


def _remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 5.2.4 on an absolute path."""
    segments = path.split(b"/")
    out: list[bytes] = []
    for seg in segments[1:]:
        if seg == b".":
            continue
        if seg == b"..":
            if out:
                out.pop()
            continue
        out.append(seg)
    result = b"/" + b"/".join(out)
    if segments[-1] in (b".", b"..") and result != b"/":
        result += b"/"  # `/a/b/..` -> `/a/`
    return result
