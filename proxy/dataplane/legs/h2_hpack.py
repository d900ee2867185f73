"""Client leg (HTTP/2): the HPACK encoder of our response headers.

It never inserts into the dynamic table (nginx does the same): a field's encoding then depends on
the field alone, so it is computed once and kept. Static-table matches are indexed, everything else
is a literal without indexing (RFC 7541 6.1, 6.2.2); never-indexed fields (x-request-id,
set-cookie) stay never-indexed literals (RFC 7541 6.2.3): their name part is kept, their value,
different every time, is sent as is (no Huffman coding: it would cost more CPU than it saves
bytes). Table size updates announced by :meth:`~.h2_client.H2ClientConnection.shrink_encoder` are
still emitted first (RFC 7541 4.2).

Not compiled: it extends the library's pure-Python encoder.
"""

from __future__ import annotations

from typing import Any

from hpack import Encoder, HeaderTuple
from hpack.hpack import INDEX_NEVER, INDEX_NONE, encode_integer

MEMO_MAX = 2048  # kept encodings per connection (dates, lengths, types...): cleared when full


class ResponseEncoder(Encoder):
    """:class:`hpack.Encoder` without dynamic-table insertions, its field encodings memoised."""

    def __init__(self) -> None:
        super().__init__()
        self.memo: dict[tuple[bytes, bytes], bytes] = {}
        self.never: dict[bytes, bytes] = {}  # never-indexed names: their encoded prefix

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        """The header block for `headers` (pairs of bytes, pseudo-headers first; never a dict)."""
        block: list[bytes] = []
        table = self.header_table
        if table.resized:
            block.append(self._encode_table_size_change())
            table.resized = False
        memo = self.memo
        for header in headers:
            name: bytes = header[0]
            value: bytes = header[1]
            if isinstance(header, HeaderTuple) and not header.indexable:
                prefix = self.never.get(name)
                if prefix is None:
                    if len(self.never) >= MEMO_MAX:
                        self.never.clear()
                    prefix = self.never[name] = self._never_name(name, huffman)
                n = len(value)
                block.append(prefix + (bytes((n,)) if n < 127 else bytes(encode_integer(n, 7))) + value)
                continue
            key = (name, value)
            field = memo.get(key)
            if field is None:
                if len(memo) >= MEMO_MAX:
                    memo.clear()
                field = memo[key] = self._field(name, value, INDEX_NONE, huffman)
            block.append(field)
        return b"".join(block)

    def _never_name(self, name: bytes, huffman: bool) -> bytes:
        """The name part of a never-indexed literal: a static-table index, or the name itself."""
        match = self.header_table.search(name, b"")
        if match is None:
            return self._encode_literal(name, b"", INDEX_NEVER, huffman)[:-1]  # drop the empty value
        prefix = encode_integer(match[0], 4)
        prefix[0] |= 0x10
        return bytes(prefix)

    def _field(self, name: bytes, value: bytes, indexbit: bytes, huffman: bool) -> bytes:
        match = self.header_table.search(name, value)  # the static table only: ours stays empty
        if match is None:
            return self._encode_literal(name, value, indexbit, huffman)
        index, _, perfect = match
        if perfect is not None:
            return self._encode_indexed(index)
        return self._encode_indexed_literal(index, value, indexbit, huffman)
