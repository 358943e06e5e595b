"""The batch blob: one compact binary record of a batch's raw stream entries.

A blob holds the stream key and group its entries came from (so the worker can XACK them
if the bridge could not) and, per entry, its id and raw ``data`` bytes, untouched. Entries
without a ``data`` field keep their other fields as JSON, so the worker can dead-letter
them with their raw bytes. The bridge never parses events; the worker decodes them.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from dispatch_celery import constants as c

_MAGIC = b"DCB1"
_HEAD = struct.Struct(">HH")  # len(stream), len(group)
_ENTRY = struct.Struct(">Hi")  # len(entry id), len(data) or -1 when the entry has no data


@dataclass(frozen=True, slots=True)
class Entry:
    entry_id: str
    data: bytes | None  # the ``data`` field, None when absent
    other: bytes = b""  # JSON of the other fields when ``data`` is absent (for dead letters)


@dataclass(frozen=True, slots=True)
class Batch:
    stream: str  # the stream key the entries came from (ids are derived from it)
    group: str  # "" for batches that must not XACK (dead-letter replay)
    entries: list[Entry]


def batch_id_for(entries: Sequence[Entry]) -> str:
    """Stable id from the first and last entry ids (service is part of the key)."""
    return f"{entries[0].entry_id}_{entries[-1].entry_id}"


def encode(stream: str, group: str, entries: Sequence[Entry]) -> bytes:
    s, g = stream.encode(), group.encode()
    parts: list[bytes] = [_MAGIC, _HEAD.pack(len(s), len(g)), s, g]
    append = parts.append
    pack = _ENTRY.pack
    for e in entries:
        eid = e.entry_id.encode()
        if e.data is None:
            append(pack(len(eid), -1))
            append(eid)
            append(struct.pack(">i", len(e.other)))
            append(e.other)
        else:
            append(pack(len(eid), len(e.data)))
            append(eid)
            append(e.data)
    return b"".join(parts)


def decode(blob: bytes) -> Batch:
    if blob[:4] != _MAGIC:
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
            (lother,) = struct.unpack_from(">i", blob, pos)
            pos += 4
            entries.append(Entry(eid, None, bytes(view[pos : pos + lother])))
            pos += lother
        else:
            entries.append(Entry(eid, bytes(view[pos : pos + ldata])))
            pos += ldata
    return Batch(stream, group, entries)


def entry_from_fields(entry_id: bytes | str, fields: dict[bytes, bytes] | None) -> Entry:
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    fields = fields or {}
    data = fields.get(c.DATA_FIELD)
    if data is not None:
        return Entry(eid, data)
    other = {
        k.decode("utf-8", "backslashreplace"): v.decode("utf-8", "backslashreplace")
        for k, v in fields.items()
    }
    return Entry(eid, None, orjson.dumps(other))


def raw_size(entries: Sequence[Entry]) -> int:
    return sum(len(e.data) if e.data is not None else len(e.other) for e in entries)
