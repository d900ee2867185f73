"""gRPC status codes by name and number, and how they are grouped (pure tables).

`rollout.grpc_error_statuses` names the codes that count as errors for the analysis; the metric
`canary_proxy_grpc_responses_total` groups codes into `ok`, `client_error` (the caller's fault or
choice) and `server_error` (the rest). Shared by the config reader and the data plane.
"""

from __future__ import annotations

from typing import Final

# The 17 codes of grpc/status.h, by number.
NAMES: Final = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
CODES: Final = {name: code for code, name in enumerate(NAMES)}
NCODES: Final = len(NAMES)

OK: Final = 0
DEADLINE_EXCEEDED: Final = 4
UNIMPLEMENTED: Final = 12
UNAVAILABLE: Final = 14

# What the default counts as a failure of the server: UNKNOWN, DEADLINE_EXCEEDED,
# RESOURCE_EXHAUSTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
DEFAULT_ERRORS: Final = ("UNKNOWN", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS")

# Codes that say the request was refused for a reason of the caller's (code class `client_error`).
CLIENT_ERRORS: Final = frozenset(
    CODES[n]
    for n in (
        "CANCELLED",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNAUTHENTICATED",
        "UNIMPLEMENTED",
    )
)


def parse_code(value: object) -> int:
    """A code from its name (any case, `UNAVAILABLE`) or number (0-16); raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"not a gRPC status: {value!r}")
    if isinstance(value, int):
        code = value
    else:
        text = str(value).strip()
        code = int(text) if text.isdigit() else CODES.get(text.upper(), -1)
    if not 0 <= code < NCODES:
        raise ValueError(f"not a gRPC status: {value!r} (use a name like UNAVAILABLE or a number 0-16)")
    return code


def code_class(code: int) -> str:
    """`ok`, `client_error` or `server_error` (the metric's `code_class` label)."""
    if code == OK:
        return "ok"
    return "client_error" if code in CLIENT_ERRORS else "server_error"


def error_table(names: tuple[str, ...]) -> tuple[bool, ...]:
    """`table[code]` is True when a response with that grpc-status counts as an error."""
    codes = {parse_code(n) for n in names}
    return tuple(i in codes for i in range(NCODES))


def parse_status_value(value: bytes) -> int:
    """A grpc-status header value -> its code; an unparseable or unknown one is UNKNOWN (2), as
    gRPC clients treat it."""
    if value.isdigit() and len(value) <= 2:
        code = int(value)
        if code < NCODES:
            return code
    return 2


def from_http_status(status: int) -> int:
    """The gRPC code for an error the proxy answers itself with HTTP `status` (Envoy's mapping,
    except that our own response timeout is DEADLINE_EXCEEDED)."""
    if status == 504 or status == 408:
        return DEADLINE_EXCEEDED
    if status == 404:
        return UNIMPLEMENTED
    if status in (429, 502, 503):
        return UNAVAILABLE
    if status == 401:
        return 16  # UNAUTHENTICATED
    if status == 403:
        return 7  # PERMISSION_DENIED
    if status == 413:
        return 8  # RESOURCE_EXHAUSTED
    if status in (400, 414, 431):
        return 13  # INTERNAL
    return 2  # UNKNOWN
