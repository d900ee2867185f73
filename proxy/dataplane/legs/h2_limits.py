"""Client leg (HTTP/2), the limits: the settings we announce and the counters that end a connection
that abuses the protocol (README, "HTTP/2": what each attack gets).

Each defence answers with GOAWAY or RST_STREAM and keeps memory per connection bounded:
- concurrent streams: SETTINGS_MAX_CONCURRENT_STREAMS (`limits.http2_max_concurrent_streams`); a
  client opening more gets GOAWAY PROTOCOL_ERROR from the library (RFC 9113 5.1.2);
- header lists: SETTINGS_MAX_HEADER_LIST_SIZE from `limits.max_header_size`; the HPACK decoder
  enforces it on the decoded size (an HPACK bomb: GOAWAY ENHANCE_YOUR_CALM); within it
  `max_headers` / `max_header_size` are checked exactly (431, like HTTP/1.1); the HPACK table
  stays at the 4096 bytes default;
- rapid reset (CVE-2023-44487): more than :data:`RESET_LIMIT` streams reset by the client within
  :data:`FLOOD_PERIOD` seconds: GOAWAY ENHANCE_YOUR_CALM, connection closed; every reset stream
  stops its upstream work at once;
- CONTINUATION floods: an unfinished header block over :func:`header_block_cap` bytes, or more than
  64 CONTINUATION frames (the library's own bound): GOAWAY;
- PING / SETTINGS / PRIORITY / empty DATA floods: more than :data:`CONTROL_LIMIT` such frames
  within :data:`FLOOD_PERIOD` seconds: GOAWAY ENHANCE_YOUR_CALM; bytes queued towards a client
  that does not read beyond :data:`MAX_QUEUED` close the connection.
"""

from __future__ import annotations

from typing import Final

from h2.settings import SettingCodes

from proxy.config.model import Limits

FLOOD_PERIOD: Final = 10.0  # seconds: the window the flood counters count in
RESET_LIMIT: Final = 200  # client RST_STREAMs per window (a browser cancels a handful)
CONTROL_LIMIT: Final = 1000  # PING + SETTINGS + PRIORITY + empty DATA frames per window
MAX_QUEUED: Final = 1 << 20  # bytes waiting in the transport for a client that stopped reading
STREAM_BUFFER: Final = 64 * 1024  # response bytes held per stream beyond the client's window
CONNECTION_WINDOW: Final = 1 << 20  # our receive window for the whole connection (all streams)
STREAM_WINDOW: Final = 65535  # our receive window per stream (the protocol's default)
ENCODER_TABLE: Final = 1024  # our HPACK encoder's table (bytes; at most what the client allows): small
# enough that finding a field in it is cheap, large enough for the fields every response repeats
HPACK_OVERHEAD: Final = 32  # RFC 7541 4.1: the size of a header field counts 32 bytes more


def local_settings(limits: Limits) -> dict[SettingCodes, int]:
    """The SETTINGS we announce: stream limit, header list size, windows."""
    return {
        SettingCodes.MAX_CONCURRENT_STREAMS: limits.http2_max_concurrent_streams,
        SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size(limits),
        SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        SettingCodes.HEADER_TABLE_SIZE: 4096,
        SettingCodes.ENABLE_PUSH: 0,
    }


def max_header_list_size(limits: Limits) -> int:
    """The decoded header list bound (HPACK counts 32 bytes per field more than we do)."""
    return limits.max_header_size + HPACK_OVERHEAD * min(limits.max_headers + 8, 1024)


def header_block_cap(limits: Limits) -> int:
    """Bytes of an unfinished (HEADERS + CONTINUATION) header block we keep: compressed, it is
    never much larger than the decoded list it may become."""
    return max_header_list_size(limits) + 16384


class Counter:
    """Counts events in fixed windows of `period` seconds; :meth:`hit` says when `limit` is passed."""

    __slots__ = ("count", "limit", "period", "start")

    def __init__(self, limit: int, period: float = FLOOD_PERIOD) -> None:
        self.limit = limit
        self.period = period
        self.start = 0.0
        self.count = 0

    def hit(self, now: float) -> bool:
        """One more event at `now`; True once more than `limit` fell in the current window."""
        if now - self.start >= self.period:
            self.start = now
            self.count = 0
        self.count += 1
        return self.count > self.limit
