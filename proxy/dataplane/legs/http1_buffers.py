"""Per-connection buffer bounds shared by both legs, and the one read buffer they share.

A transport's write buffer above WRITE_HIGH pauses reading on the other side until it drains below
WRITE_LOW: bytes in flight per direction per connection stay bounded whatever the peers' speeds
(nginx's `proxy_buffers` and Envoy's per-connection buffer limits do the same).
"""

from __future__ import annotations

from typing import Final

WRITE_HIGH: Final = 16 * 1024
WRITE_LOW: Final = 4 * 1024
# Reads take at most what the peer's write buffer still has room for within READ_BUDGET (never
# less than READ_MIN), and READ_MAX while the peer keeps up (nothing queued). A write the peer's
# socket takes only in part keeps the WHOLE object it came from alive (uvloop queues a view of
# it), so a peer that stalls holds up to one READ_MAX read plus READ_BUDGET: about 54 KiB per
# connection in all with 32/16 KiB, measured by loadtests/memory.py (64/32 KiB held 68 KiB).
READ_BUDGET: Final = 16 * 1024
READ_MIN: Final = 4 * 1024
READ_MAX: Final = 32 * 1024

# One read buffer for every connection of both legs: reads are handled synchronously (get_buffer,
# recv_into, buffer_updated), so they never overlap, and an idle connection costs no buffer.
READ_BUF: Final = bytearray(READ_MAX)
READ_VIEW: Final = memoryview(READ_BUF)


def read_view(peer_buffered: int) -> memoryview:
    """Where to read into, given how many bytes are queued towards the peer (uvloop alone would
    read 256 KiB whatever the peer's speed)."""
    if not peer_buffered:
        return READ_VIEW
    room = READ_BUDGET - peer_buffered
    return READ_VIEW[: room if room > READ_MIN else READ_MIN]
