"""Request and response bodies -> values a run record can carry.

Helpers of ``records``: undo ``Content-Encoding``, turn bytes into JSON / text / a binary
marker, and cap a value at a serialized size with a visible truncation marker.

Markers are plain JSON objects whose first key starts with ``_`` so that backends and
readers can tell them from real payloads:

* ``{"_binary": true, "bytes": N, "content_type": ...}`` for bytes that are not text
  (audio, images, an undecodable compressed body: never base64 of compressed bytes);
* ``{"_truncated": true, "original_bytes": N, "max_bytes": M, "text": "<prefix>"}`` for a
  value over the cap: the prefix of its text (or of its JSON text), never a silent drop.
"""

from __future__ import annotations

import threading
import zlib
from typing import Any

import brotli
import orjson

# Content types that are binary whatever their bytes look like.
_BINARY_TYPES = (
    "audio/", "image/", "video/", "font/", "application/octet-stream", "application/pdf",
    "application/zip", "application/gzip", "application/x-protobuf", "application/grpc",
)  # fmt: skip
# A parsed value re-serializes to at most ~5x its JSON source (``1e15`` becomes
# ``1000000000000000.0``); a merged SSE object adds a few fixed keys. Under this bound the
# exact (serializing) size check is skipped: it is the common case and costs nothing.
_GROWTH = 8
_FIXED_OVERHEAD = 1024
# Fewer brackets than this cannot nest deeper than orjson serializes (254 levels) even with
# the headroom below for the record and a backend payload around the value.
_HEADROOM_LEVELS = 32
_SAFE_BRACKETS = 254 - _HEADROOM_LEVELS
# Room for the keys of a truncation marker around its text.
_MARKER_OVERHEAD = 128


class ContentDecodingError(Exception):
    """A Content-Encoding that is unsupported or whose data is corrupt."""


def binary_marker(size: int, content_type: str | None, **extra: Any) -> dict[str, Any]:
    """The marker that stands for ``size`` bytes of non-text data."""
    marker: dict[str, Any] = {"_binary": True, "bytes": size, "content_type": content_type}
    marker.update(extra)
    return marker


def is_binary_type(content_type: str | None) -> bool:
    return content_type is not None and content_type.lower().startswith(_BINARY_TYPES)


def to_value(body: bytes, content_type: str | None, *, check_depth: bool = True) -> Any:
    """JSON when ``body`` parses, else text when it is UTF-8, else a binary marker.

    A body cut inside a multi-byte character (llm-proxy truncates request bodies at
    64 KiB without saying so) is still text: the incomplete last character is dropped.
    ``check_depth=False`` leaves out ``too_deep``, for a caller that checks the depth of
    the whole record at once (``dumps_with_headroom``).
    """
    if is_binary_type(content_type):
        return binary_marker(len(body), content_type)
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    else:
        if not (check_depth and too_deep(body, value)):
            return value
    text = utf8_text(body)
    if text is None:
        return binary_marker(len(body), content_type)
    return text


def too_deep(source: bytes, value: Any) -> bool:
    """Whether ``value`` is nested too deeply to be serialized inside a backend payload.

    orjson parses 1024 levels but serializes only 254; records and payloads wrap a body
    in a few more levels. Such a value is carried as text instead. Counting brackets is
    cheap and rules out almost every body before the (rare) serialization test.
    """
    if source.count(b"[") + source.count(b"{") <= _SAFE_BRACKETS:
        return False
    wrapped = value
    for _ in range(_HEADROOM_LEVELS):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
    except orjson.JSONEncodeError:
        return True
    return False


def dumps_with_headroom(record: Any) -> bytes:
    """``orjson.dumps(record)``, raising ``orjson.JSONEncodeError`` when a value of the
    record fails ``too_deep``: the record is serialized inside the headroom's levels, less
    the one it adds itself. One serialization checks every body of a record at once, where
    ``too_deep`` counts the brackets of each body (a pass over its bytes)."""
    nest = getattr(_nests, "nest", None)
    if nest is None:  # built once per thread: 31 lists per record cost more than the dumps
        inner: list[Any] = [None]
        outer = inner
        for _ in range(_HEADROOM_LEVELS - 2):
            outer = [outer]
        nest = _nests.nest = (outer, inner)
    outer, inner = nest
    inner[0] = record
    try:
        data = orjson.dumps(outer)
    finally:
        inner[0] = None
    return data[_HEADROOM_LEVELS - 1 : len(data) - (_HEADROOM_LEVELS - 1)]


_nests = threading.local()


def utf8_text(body: bytes) -> str | None:
    """``body`` as text, or None when it is not UTF-8 text (bad bytes, or NULs)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason != "unexpected end of data":
            return None
        text = body[: exc.start].decode("utf-8", errors="strict")
    # Valid UTF-8 with NUL bytes is a binary format, not a prompt or a completion.
    return None if "\x00" in text else text


def content_encodings(values: list[str]) -> list[str]:
    """The codings of Content-Encoding header values, in the order they were applied."""
    codings: list[str] = []
    for value in values:
        for part in value.split(","):
            coding = part.strip().lower()
            if coding and coding != "identity":
                codings.append(coding)
    return codings


def decode_content(body: bytes, codings: list[str], limit: int) -> bytes:
    """Undo ``codings`` (last applied first), producing at most about ``limit`` bytes.

    A stream cut short (llm-proxy caps bodies at 256 KiB, compressed) yields what could
    be decompressed. Raises ``ContentDecodingError`` for unknown codings and corrupt data.
    """
    for coding in reversed(codings):
        if coding in ("gzip", "x-gzip"):
            body = _gunzip(body, limit)
        elif coding == "deflate":
            body = _inflate(body, limit)
        elif coding == "br":
            body = _unbrotli(body, limit)
        else:
            raise ContentDecodingError(f"unsupported Content-Encoding {coding!r}")
    return body


def _gunzip(data: bytes, limit: int) -> bytes:
    out: list[bytes] = []
    produced = 0
    # A gzip body may hold several members; zlib handles one member per object.
    while data and produced < limit:
        inflater = zlib.decompressobj(wbits=31)
        try:
            chunk = inflater.decompress(data, limit - produced)
        except zlib.error as exc:
            if out:  # trailing garbage after a complete member: Go ignores it too
                break
            raise ContentDecodingError(f"bad gzip data ({exc})") from None
        out.append(chunk)
        produced += len(chunk)
        data = inflater.unused_data if inflater.eof else b""
    return b"".join(out)


def _inflate(data: bytes, limit: int) -> bytes:
    # HTTP "deflate" is meant to be zlib-wrapped, but raw deflate is common in the wild.
    for wbits in (15, -15):
        try:
            return zlib.decompressobj(wbits=wbits).decompress(data, limit)
        except zlib.error:
            continue
    raise ContentDecodingError("bad deflate data")


def _unbrotli(data: bytes, limit: int) -> bytes:
    decompressor = brotli.Decompressor()
    try:
        try:
            result = decompressor.process(data, output_buffer_limit=limit)
        except TypeError:  # brotli < 1.2 has no output limit
            result = decompressor.process(data)
    except brotli.error as exc:
        raise ContentDecodingError(f"bad br data ({exc})") from None
    return bytes(result[:limit])


def cap(value: Any, source_bytes: int, max_bytes: int) -> Any:
    """``value`` if its serialized size is at most ``max_bytes``, else a truncation marker.

    ``source_bytes`` is the size of what ``value`` was parsed from; it lets the common case
    (small bodies) skip serializing.
    """
    if value is None or source_bytes * _GROWTH + _FIXED_OVERHEAD <= max_bytes:
        return value
    serialized = orjson.dumps(value)
    if len(serialized) <= max_bytes:
        return value
    if isinstance(value, str):
        return truncation_marker(value, len(value.encode("utf-8")), max_bytes)
    return truncation_marker(serialized.decode("utf-8"), len(serialized), max_bytes)


def truncation_marker(text: str, original_bytes: int, max_bytes: int) -> dict[str, Any]:
    """A marker holding the longest prefix of ``text`` that keeps it within ``max_bytes``.

    When ``max_bytes`` is smaller than the marker's own keys, the text is empty and the
    marker is still returned: a visible marker beats a silent drop.
    """
    prefix = text[: max(0, max_bytes - _MARKER_OVERHEAD)]
    while True:
        marker = {
            "_truncated": True,
            "original_bytes": original_bytes,
            "max_bytes": max_bytes,
            "text": prefix,
        }
        excess = len(orjson.dumps(marker)) - max_bytes
        if excess <= 0 or not prefix:
            return marker
        # Every character costs at least one byte, so this converges in a step or two.
        prefix = prefix[: max(0, len(prefix) - excess)]
