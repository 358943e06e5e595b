"""The batch blob: one compact, zstd-compressed binary record of a batch's raw entries.

A blob holds the stream key and group its entries came from (so the worker can XACK them
if the bridge could not) and, per entry, its id and raw ``data`` bytes, untouched. Entries
without a ``data`` field keep their other fields as JSON, so the worker can dead-letter
them with their raw bytes. The bridge never parses events; the worker decodes them.

Format: ``DCZ1`` + one zstd frame (content size in its header) of the ``DCB1`` record
``DCB1 | len(stream) len(group) | stream group | (len(id) len(data) id data)*``. Blobs are
what the buffer of an outage is made of, so they are compressed (ratio and speed measured
by ``benchmarks/compression.py``, see ``LEVEL``); the in-flight accounting counts their
compressed size against ``DISPATCH_HIGH_WATER_BYTES`` and their raw size for status.
``decode`` still reads the uncompressed ``DCB1`` blobs of earlier versions, so batches
in flight across an upgrade are delivered.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import orjson
import zstandard

from dispatch_celery import constants as c

_RECORD = b"DCB1"  # the uncompressed record (the whole blob before compression existed)
_MAGIC = b"DCZ1"  # a zstd frame of a DCB1 record
_HEAD = struct.Struct(">HH")  # len(stream), len(group)
_ENTRY = struct.Struct(">Hi")  # len(entry id), len(data) or -1 when the entry has no data
_LEN = struct.Struct(">i")

# Level 1, by measurement (python benchmarks/compression.py; 2 cores, zstandard 0.25, one
# core used): 100-event batches of the sample events compress 8.7x at level 1 (1.1 GB/s of
# raw input) and 8.8x at level 3 (0.64 GB/s); the spec vectors in one batch 2.7x / 2.8x.
# The bridge compresses everything it reads (~100k events/s is ~200 MB/s of raw JSON), so
# the 1 % better ratio is not worth half the speed. No shared dictionary: it must ship with
# the code and stay readable for every blob in flight, and it pays off on small blobs
# (one spec vector per blob: 1.45x -> 3.7x), i.e. at low traffic, where the buffer is not
# under pressure; on full batches its 13x on the sample events comes from the generator's
# small pool of texts, which a dictionary trained on that generator memorizes.
LEVEL = 1
# Bound of a frame written without its content size (ours always carry it): 100 events of
# DISPATCH_MAX_BODY_BYTES-sized bodies stay far below it.
MAX_RECORD_BYTES = 1 << 31


# Not frozen (made once per event; see ``decode.events.Event``), never modified in place.
@dataclass(slots=True)
class Entry:
    entry_id: str
    data: bytes | None  # the ``data`` field, None when absent
    other: bytes = b""  # JSON of the other fields when ``data`` is absent (for dead letters)


@dataclass(frozen=True, slots=True)
class Batch:
    stream: str  # the stream key the entries came from (ids are derived from it)
    group: str  # "" for batches that must not XACK (dead-letter replay)
    entries: list[Entry]


class _Codecs(threading.local):
    """zstd (de)compressors are not thread-safe: one pair per thread (a worker's thread
    pool decodes batches concurrently), created on first use."""

    def __init__(self) -> None:
        self.compressors: dict[int, zstandard.ZstdCompressor] = {}
        self.decompressor = zstandard.ZstdDecompressor()

    def compressor(self, level: int) -> zstandard.ZstdCompressor:
        found = self.compressors.get(level)
        if found is None:
            found = self.compressors[level] = zstandard.ZstdCompressor(
                level=level, write_content_size=True
            )
        return found


_codecs = _Codecs()


def batch_id_for(entries: Sequence[Entry], stream: str | None = None) -> str:
    """Stable id from the first and last entry ids (service is part of the key); prefixed
    with the stream when the bridge reads several (entry ids repeat across streams)."""
    ids = f"{entries[0].entry_id}_{entries[-1].entry_id}"
    return f"{stream}@{ids}" if stream else ids


def encode_record(stream: str, group: str, entries: Sequence[Entry]) -> bytes:
    """The uncompressed ``DCB1`` record (the blob format before compression)."""
    s, g = stream.encode(), group.encode()
    parts: list[bytes] = [_RECORD, _HEAD.pack(len(s), len(g)), s, g]
    append = parts.append
    pack = _ENTRY.pack
    for e in entries:
        eid = e.entry_id.encode()
        if e.data is None:
            append(pack(len(eid), -1))
            append(eid)
            append(_LEN.pack(len(e.other)))
            append(e.other)
        else:
            append(pack(len(eid), len(e.data)))
            append(eid)
            append(e.data)
    return b"".join(parts)


def encode(stream: str, group: str, entries: Sequence[Entry], *, level: int = LEVEL) -> bytes:
    """The blob stored in Redis: the record, zstd-compressed."""
    record = encode_record(stream, group, entries)
    return _MAGIC + _codecs.compressor(level).compress(record)


def decode(blob: bytes) -> Batch:
    """A batch from a blob of this version (``DCZ1``) or an earlier one (``DCB1``)."""
    if blob[:4] == _MAGIC:
        try:
            record = _codecs.decompressor.decompress(blob[4:], max_output_size=MAX_RECORD_BYTES)
        except zstandard.ZstdError as exc:
            raise ValueError(f"corrupt dispatch-celery batch blob: {exc}") from None
        return _decode_record(record)
    return _decode_record(blob)


def _decode_record(blob: bytes) -> Batch:
    if blob[:4] != _RECORD:
        raise ValueError("not a dispatch-celery batch blob")
    view = memoryview(blob)
    ls, lg = _HEAD.unpack_from(blob, 4)
    pos = 4 + _HEAD.size
    stream = bytes(view[pos : pos + ls]).decode()
    pos += ls
    group = bytes(view[pos : pos + lg]).decode()
    pos += lg
    entries: list[Entry] = []
    unpack = _ENTRY.unpack_from
    size = _ENTRY.size
    end = len(blob)
    while pos < end:
        lid, ldata = unpack(blob, pos)
        pos += size
        eid = bytes(view[pos : pos + lid]).decode()
        pos += lid
        if ldata < 0:
            (lother,) = _LEN.unpack_from(blob, pos)
            pos += _LEN.size
            entries.append(Entry(eid, None, bytes(view[pos : pos + lother])))
            pos += lother
        else:
            entries.append(Entry(eid, bytes(view[pos : pos + ldata])))
            pos += ldata
    return Batch(stream, group, entries)


def entry_from_fields(
    entry_id: bytes | str, fields: list[bytes] | dict[bytes, bytes] | None
) -> Entry:
    """The entry of a stream reply: ``fields`` as Redis sends them (``[name, value, ...]``)
    or as a dict. A repeated field name keeps its last value, as a dict would."""
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    if type(fields) is list:
        if len(fields) == 2 and fields[0] == c.DATA_FIELD:  # what llm-proxy writes
            return Entry(eid, fields[1])
        fields = dict(zip(fields[::2], fields[1::2], strict=False))
    found = cast(dict[bytes, bytes], fields or {})
    data = found.get(c.DATA_FIELD)
    if data is not None:
        return Entry(eid, data)
    other = {
        k.decode("utf-8", "backslashreplace"): v.decode("utf-8", "backslashreplace")
        for k, v in found.items()
    }
    return Entry(eid, None, orjson.dumps(other))


def raw_size(entries: Sequence[Entry]) -> int:
    """The events' own bytes (what ``dispatch status`` shows as raw)."""
    return sum(len(e.data) if e.data is not None else len(e.other) for e in entries)
