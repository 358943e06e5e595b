"""Decode llm-proxy stream entries into ``Event`` objects; stable ids.

The entry's ``data`` field is the JSON that Go's ``encoding/json`` writes for llm-proxy's
event struct (see ``spec/stream.md``). Decoding is as tolerant as Go's decoder, because
anything Go would accept, a producer may legitimately write:

* key matching is case-insensitive (an exact match is tried first, it is the common case);
* unknown keys are ignored; missing keys, and ``null`` for strings and numbers, give the
  zero value; a later duplicate key wins, as in Go;
* ``ResponseHeaders`` may be ``null``; bodies may be ``null``, ``""`` or absent, and are
  standard base64 (padding may be left out, line breaks are skipped as Go does).

Everything else is a ``MalformedEventError`` with a short reason, which the worker puts
on the dead-letter stream together with the raw bytes.

This runs for every event, so it does one ``orjson`` parse, one pass over the keys and one
SIMD base64 decode per body (``pybase64``), and nothing else.
"""

from __future__ import annotations

import binascii
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from pybase64 import b64decode

from dispatch_celery.errors import MalformedEventError

# Namespace of the uuid5 ids derived from (stream key, entry id) when RequestID is empty.
EVENT_ID_NAMESPACE = uuid.UUID("3b0f3a56-8a5e-4e58-9a43-5c1f0a9d7e21")


# Not frozen: a frozen dataclass sets each field through ``object.__setattr__``, and that
# made building an Event 7x dearer (1.6 us against 0.2 us, once per event). Treat it as
# immutable all the same: derive a changed copy with ``dataclasses.replace``.
@dataclass(slots=True)
class Event:
    """One decoded stream entry (llm-proxy's event). Never modified in place."""

    stream_id: str  # Redis entry id, "<ms>-<seq>"
    event_id: str  # stable id: RequestID, else derived from stream key + entry id
    request_id: str
    method: str
    path: str
    status: int
    duration_ns: int
    response_headers: dict[str, list[str]]
    response_body: bytes | None
    request_body: bytes | None
    raw: bytes  # the entry's original ``data`` bytes


def stable_id(stream_key: str, entry_id: str) -> str:
    """The id of an event without a RequestID: the same entry always yields the same id."""
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{stream_key}/{entry_id}"))


# Field slots, in Go's order. LogID is recognised only so that it is skipped cheaply.
_LOGID, _REQUEST_ID, _METHOD, _PATH, _STATUS, _DURATION, _HEADERS, _RESP, _REQ = range(9)
_GO_NAMES = (
    "LogID", "RequestID", "Method", "Path", "Status", "Duration",
    "ResponseHeaders", "ResponseBody", "RequestBody",
)  # fmt: skip
_GO_KEYS = frozenset(_GO_NAMES)
_EXACT = {name: slot for slot, name in enumerate(_GO_NAMES)}
# casefold() rather than lower(): Go's EqualFold also folds e.g. U+017F (long s) to "s".
_FOLDED = {name.casefold(): slot for slot, name in enumerate(_GO_NAMES)}


def decode_entry(stream_key: str, entry_id: str, data: bytes | None) -> Event:
    """Decode one entry's ``data`` field; ``MalformedEventError(reason)`` when it cannot be.

    ``data`` is the raw value of the entry's ``data`` field, ``None`` when the entry has no
    such field. ``entry_id`` must be a Redis entry id (``<ms>-<seq>``).
    """
    if data is None:
        raise MalformedEventError("entry has no 'data' field")
    if not data:
        raise MalformedEventError("'data' field is empty")
    ms, dash, seq = entry_id.partition("-")
    if not (dash and ms.isdigit() and seq.isdigit() and entry_id.isascii()):
        raise MalformedEventError(f"invalid stream entry id {entry_id[:40]!r}")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise MalformedEventError(_not_json_reason(data, exc)) from None
    if type(obj) is not dict:
        raise MalformedEventError(f"event JSON is {_json_kind(obj)}, not an object")

    if obj.keys() == _GO_KEYS:
        # What llm-proxy writes: every key present, exactly spelled. Straight-line code,
        # about a third cheaper than the general loop below.
        request_id = _string(obj["RequestID"], "RequestID")
        method = _string(obj["Method"], "Method")
        path = _string(obj["Path"], "Path")
        status = _integer(obj["Status"], "Status")
        duration = _integer(obj["Duration"], "Duration")
        value = obj["ResponseHeaders"]
        headers = _headers(value, "ResponseHeaders") if value is not None else {}
        value = obj["ResponseBody"]
        response_body = _body(value, "ResponseBody") if value is not None else None
        value = obj["RequestBody"]
        request_body = _body(value, "RequestBody") if value is not None else None
    else:
        request_id, method, path, status, duration, headers, response_body, request_body = (
            _decode_fields(obj)
        )
    return Event(
        stream_id=entry_id,
        event_id=request_id or stable_id(stream_key, entry_id),
        request_id=request_id,
        method=method,
        path=path,
        status=status,
        duration_ns=duration,
        response_headers=headers,
        response_body=response_body,
        request_body=request_body,
        raw=data if type(data) is bytes else bytes(data),
    )


_Fields = tuple[str, str, str, int, int, dict[str, list[str]], bytes | None, bytes | None]


def _decode_fields(obj: dict[str, Any]) -> _Fields:
    """Go's rules: any key case, unknown keys skipped, missing keys zero, last one wins."""
    request_id = method = path = ""
    status = duration = 0
    headers: dict[str, list[str]] = {}
    response_body: bytes | None = None
    request_body: bytes | None = None
    for key, value in obj.items():
        slot = _EXACT.get(key)
        if slot is None:
            slot = _FOLDED.get(key.casefold())
            if slot is None or slot == _LOGID:
                continue
        elif slot == _LOGID:
            continue
        if value is None:
            # Go: null leaves a string or number field alone and sets a map/slice to nil.
            if slot == _HEADERS:
                headers = {}
            elif slot == _RESP:
                response_body = None
            elif slot == _REQ:
                request_body = None
            continue
        if slot == _REQUEST_ID:
            request_id = _string(value, key)
        elif slot == _METHOD:
            method = _string(value, key)
        elif slot == _PATH:
            path = _string(value, key)
        elif slot == _STATUS:
            status = _integer(value, key)
        elif slot == _DURATION:
            duration = _integer(value, key)
        elif slot == _HEADERS:
            headers = _headers(value, key)
        elif slot == _RESP:
            response_body = _body(value, key)
        else:
            request_body = _body(value, key)
    return request_id, method, path, status, duration, headers, response_body, request_body


def header(event: Event, name: str) -> str | None:
    """The first value of response header ``name`` (any case), like Go's ``Header.Get``."""
    headers = event.response_headers
    values = headers.get(name)
    if values is None:
        # llm-proxy writes canonical names; only other producers (or callers asking in
        # another case) get here.
        wanted = name.lower()
        for key, candidate in headers.items():
            if key.lower() == wanted:
                values = candidate
                break
        else:
            return None
    return values[0] if values else None


def header_values(event: Event, name: str) -> list[str]:
    """Every value of response header ``name`` (any case), across repeated keys."""
    wanted = name.lower()
    found: list[str] = []
    for key, values in event.response_headers.items():
        if key.lower() == wanted:
            found.extend(values)
    return found


# --- field decoders (the error paths build a reason; the happy paths are one type check) --


def _string(value: Any, key: str) -> str:
    if type(value) is not str:
        if value is None:  # Go leaves the zero value
            return ""
        raise MalformedEventError(f"{key} must be a string, got {_json_kind(value)}")
    return value


def _integer(value: Any, key: str) -> int:
    # bool is an int subclass in Python, but not a JSON number; floats are refused by Go too.
    if type(value) is not int:
        if value is None:
            return 0
        raise MalformedEventError(f"{key} must be an integer, got {_json_kind(value)}")
    return value


def _headers(value: Any, key: str) -> dict[str, list[str]]:
    if type(value) is not dict:
        raise MalformedEventError(f"{key} must be an object, got {_json_kind(value)}")
    fixed: dict[str, list[str]] | None = None
    for name, values in value.items():
        if type(values) is list and (
            (len(values) == 1 and type(values[0]) is str) or all(type(v) is str for v in values)
        ):
            continue
        if values is None:
            cleaned: list[str] = []
        elif type(values) is list and all(v is None or type(v) is str for v in values):
            cleaned = [v if v is not None else "" for v in values]
        else:
            raise MalformedEventError(
                f"{key}[{name[:40]!r}] must be an array of strings, got {_json_kind(values)}"
            )
        if fixed is None:
            fixed = dict(value)
        fixed[name] = cleaned
    return value if fixed is None else fixed


def _body(value: Any, key: str) -> bytes:
    if type(value) is not str:
        raise MalformedEventError(f"{key} must be a base64 string, got {_json_kind(value)}")
    try:
        # pybase64 (SIMD) is ~4x faster than binascii here and stricter: whatever it
        # refuses goes the way it always went (binascii's strict mode, then the lenient
        # path), so what is accepted, and how, is unchanged.
        return b64decode(value, validate=True)
    except ValueError:  # binascii.Error
        pass
    try:
        return binascii.a2b_base64(value, strict_mode=True)
    except ValueError:  # binascii.Error, or non-ASCII characters
        pass
    return _lenient_base64(value, key)


def _lenient_base64(value: str, key: str) -> bytes:
    """The slow path: Go skips CR/LF inside base64; other producers may omit padding."""
    cleaned = value.replace("\r", "").replace("\n", "")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        return binascii.a2b_base64(cleaned, strict_mode=True)
    except ValueError:
        raise MalformedEventError(f"{key} is not valid base64") from None


def _not_json_reason(data: bytes, exc: orjson.JSONDecodeError) -> str:
    try:
        bytes(data).decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"data is not UTF-8 (invalid byte at offset {bad.start})"
    # orjson's messages name the position, never the content.
    return f"data is not JSON ({str(exc)[:120]})"


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
