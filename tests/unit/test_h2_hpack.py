"""The HTTP/2 response encoder: what it encodes decodes to the same fields, it never grows the
dynamic table, never-indexed fields stay so, and size updates still come first."""

from __future__ import annotations

from hpack import Decoder, NeverIndexedHeaderTuple

from proxy.dataplane.legs.h2_hpack import MEMO_MAX, ResponseEncoder

FIELDS = [
    (b":status", b"200"),  # static table, exact
    (b"content-type", b"text/plain"),  # static name
    (b"via", b"1.1 canary-proxy"),
    (b"x-custom", b"v"),  # literal name
    NeverIndexedHeaderTuple(b"x-request-id", b"3f2a"),
]


def test_round_trip_and_memo() -> None:
    enc, dec = ResponseEncoder(), Decoder()
    first = enc.encode(FIELDS)
    second = enc.encode(FIELDS)
    assert first == second  # stateless: the same fields, the same bytes
    for block in (first, second):
        decoded = dec.decode(block, raw=True)
        assert [(n, v) for n, v in decoded] == [(n, v) for n, v in FIELDS]
        assert not decoded[-1].indexable and decoded[1].indexable
    assert len(enc.header_table.dynamic_entries) == 0 and len(dec.header_table.dynamic_entries) == 0
    assert (b"x-request-id", b"3f2a") not in enc.memo and (b"via", b"1.1 canary-proxy") in enc.memo
    assert first[:1] == b"\x88"  # :status 200 is static index 8


def test_size_update_first_and_memo_bounded() -> None:
    enc, dec = ResponseEncoder(), Decoder()
    enc.header_table_size = 1024
    block = enc.encode([(b":status", b"200")])
    assert block.startswith(b"\x3f\xe1\x07")  # RFC 7541 4.2: size update to 1024 first
    dec.decode(block)
    assert dec.header_table_size == 1024
    for i in range(MEMO_MAX + 5):
        enc.encode([(b"x-n", b"%d" % i)])
    assert len(enc.memo) <= MEMO_MAX


def test_never_indexed_values_are_sent_as_is() -> None:
    enc, dec = ResponseEncoder(), Decoder()
    long = b"k=" + b"v" * 300
    fields = [
        NeverIndexedHeaderTuple(b"x-request-id", b"3f2a"),
        NeverIndexedHeaderTuple(b"set-cookie", long),  # static name (55), a length over 127
        NeverIndexedHeaderTuple(b"x-request-id", b""),
    ]
    block = enc.encode(fields)
    assert b"3f2a" in block and long in block  # not Huffman coded
    assert block[:1] == b"\x10"  # never indexed, literal name
    decoded = dec.decode(block, raw=True)
    assert [(n, v) for n, v in decoded] == [(n, v) for n, v in fields]
    assert all(not h.indexable for h in decoded)
    assert len(dec.header_table.dynamic_entries) == 0
