"""Event -> normalized LLM run record (stream.md, "What a consumer should make of an event").

The record is what the ``file`` backend writes, one per line, and what every backend
builds its payload from. Derivation, field by field:

* ``id`` / ``request_id`` / ``stream_id`` / ``method`` / ``path`` / ``status``: the event's;
* ``ended_at``: the entry id's millisecond part (the producer wrote the entry right after
  the response finished); ``started_at = ended_at - duration_ms``; both RFC 3339 UTC with
  milliseconds and ``Z``. ``duration_ms`` is ``Duration`` (ns) floored to ms;
* ``input``: the request body as JSON, else text, else a binary marker (``bodies``);
* ``output``: the response body with ``Content-Encoding`` undone, SSE merged into one
  completion (``sse``), then JSON, else text, else a binary marker;
* ``model``: the response's ``model``, else the request's; ``provider``: ``openai``;
* ``usage``: ``prompt_tokens`` / ``completion_tokens`` / ``total_tokens`` as the upstream
  reported them (Responses API ``input_tokens`` / ``output_tokens`` renamed), or None;
* ``error`` (status >= 400 only): the body's error object; an error string becomes
  ``{"message": ...}`` with its sibling scalars; no usable body gives
  ``{"status": N, "message": "<reason phrase>"}``;
* ``streamed``: the response was an SSE stream.

``input``, ``output`` and ``error`` are each capped at ``max_body_bytes`` of serialized
size; a value over it becomes a truncation marker (see ``bodies``). Model, usage and
error are taken from the full value before capping.
"""

from __future__ import annotations

import time
from http import HTTPStatus
from typing import Any, TypedDict, cast

from dispatch_celery.decode import bodies, sse
from dispatch_celery.decode.events import Event, header, header_values

PROVIDER = "openai"
_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")
# Responses API (and Anthropic-style) usage names -> the record's names.
_USAGE_ALIASES = (("input_tokens", "prompt_tokens"), ("output_tokens", "completion_tokens"),
                  ("total_tokens", "total_tokens"))  # fmt: skip
# Compressed bodies are capped by the producer (256 KiB) but may inflate a lot; stop
# decompressing well past any cap instead of letting one event take the worker's memory.
_MIN_DECOMPRESS_LIMIT = 8 * 1024 * 1024
_DECOMPRESS_FACTOR = 16
_SECONDS: dict[int, str] = {}
_SECONDS_CACHED = 4096
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))


class Usage(TypedDict, total=False):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class RunRecord(TypedDict):
    id: str
    request_id: str
    stream_id: str
    method: str
    path: str
    status: int
    duration_ms: int
    started_at: str  # RFC 3339, milliseconds, UTC
    ended_at: str
    provider: str
    model: str | None
    input: Any
    output: Any
    usage: Usage | None
    error: Any
    streamed: bool


def build_record(event: Event, *, max_body_bytes: int, check_depth: bool = True) -> RunRecord:
    """The run record of ``event`` (see the module docstring); never raises for bad bodies.

    ``check_depth=False`` skips the per-body depth test (``bodies.too_deep``): for a caller
    that serializes the record with ``bodies.dumps_with_headroom`` and, when that raises,
    builds it again with the test (``Redactor.record_of`` does).
    """
    try:
        ended_ms = int(event.stream_id.partition("-")[0])
    except ValueError:  # decode_entry validates ids; an Event built by hand may not be
        ended_ms = 0
    # A negative duration cannot come from Go's time.Since; never report one.
    duration_ms = max(0, event.duration_ns // 1_000_000)

    request_body = event.request_body
    request_value = (
        bodies.to_value(request_body, None, check_depth=check_depth) if request_body else None
    )
    output_value, streamed, output_source = _response_value(event, max_body_bytes, check_depth)

    model = _model(output_value) or _model(request_value)
    error = _error(event.status, output_value) if event.status >= 400 else None
    return {
        "id": event.event_id,
        "request_id": event.request_id,
        "stream_id": event.stream_id,
        "method": event.method,
        "path": event.path,
        "status": event.status,
        "duration_ms": duration_ms,
        "started_at": rfc3339_ms(ended_ms - duration_ms),
        "ended_at": rfc3339_ms(ended_ms),
        "provider": PROVIDER,
        "model": model,
        "input": bodies.cap(request_value, len(request_body or b""), max_body_bytes),
        "output": bodies.cap(output_value, output_source, max_body_bytes),
        "usage": _usage(output_value),
        "error": bodies.cap(error, output_source, max_body_bytes),
        "streamed": streamed,
    }


def rfc3339_ms(ms: int) -> str:
    """``ms`` since the epoch as ``YYYY-MM-DDTHH:MM:SS.mmmZ``."""
    seconds, millis = divmod(ms, 1000)
    # Formatting a time costs more than the rest of a small record; events close in time
    # share their seconds, so the seconds part is cached (bounded; races are harmless).
    prefix = _SECONDS.get(seconds)
    if prefix is None:
        if len(_SECONDS) >= _SECONDS_CACHED:
            _SECONDS.clear()
        prefix = _SECONDS[seconds] = _format_seconds(seconds)
    return prefix + _MILLIS[millis]


def _format_seconds(seconds: int) -> str:
    try:
        t = time.gmtime(seconds)
    except (OverflowError, OSError, ValueError):
        t = time.gmtime(0)
    return (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
        f"T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    )


def _response_value(
    event: Event, max_body_bytes: int, check_depth: bool = True
) -> tuple[Any, bool, int]:
    """(output value, streamed, size of the bytes it came from)."""
    body = event.response_body
    if not body:
        return None, False, 0
    content_type = header(event, "Content-Type")
    codings = bodies.content_encodings(header_values(event, "Content-Encoding"))
    if not codings and body.startswith(b"\x1f\x8b"):
        codings = ["gzip"]  # gzip magic without the header: try, fall back to the bytes
    if codings:
        limit = max(_MIN_DECOMPRESS_LIMIT, max_body_bytes * _DECOMPRESS_FACTOR)
        try:
            body = bodies.decode_content(body, codings, limit)
        except bodies.ContentDecodingError as exc:
            return _undecodable(body, content_type, codings, str(exc)), False, 0
    if sse.looks_like_sse(body, content_type):
        merged = sse.merge_sse(body)
        if merged is not None and not (check_depth and bodies.too_deep(body, merged)):
            return merged, True, len(body)
    return bodies.to_value(body, content_type, check_depth=check_depth), False, len(body)


def _undecodable(body: bytes, content_type: str | None, codings: list[str], why: str) -> Any:
    # Some servers label plain text or JSON as compressed; compressed data is never valid
    # UTF-8 text, so text means the label was wrong.
    value = bodies.to_value(body, content_type)
    if not (isinstance(value, dict) and value.get("_binary")):
        return value
    return bodies.binary_marker(
        len(body), content_type, content_encoding=", ".join(codings), error=why
    )


def _model(value: Any) -> str | None:
    if isinstance(value, dict):
        model = value.get("model")
        if isinstance(model, str) and model:
            return model
    return None


def _usage(value: Any) -> Usage | None:
    if not isinstance(value, dict):
        return None
    upstream = value.get("usage")
    if not isinstance(upstream, dict):
        return None
    usage: dict[str, int] = {}
    for key in _USAGE_KEYS:
        count = upstream.get(key)
        if type(count) is int:
            usage[key] = count
    if "prompt_tokens" not in usage and "completion_tokens" not in usage:
        for alias, key in _USAGE_ALIASES:
            count = upstream.get(alias)
            if type(count) is int:
                usage[key] = count
    return cast(Usage, usage) if usage else None


def _error(status: int, value: Any) -> Any:
    if isinstance(value, dict) and not value.get("_binary"):
        err = value.get("error")
        if isinstance(err, dict):
            return err
        if isinstance(err, str) and err:
            # llm-proxy's own errors: {"error": "Token not found", "code": "token_not_found"}
            flat: dict[str, Any] = {"message": err}
            for key, item in value.items():
                if key != "error" and isinstance(item, str | int | float | bool):
                    flat.setdefault(key, item)
            return flat
        for key in ("message", "detail"):
            if isinstance(value.get(key), str):
                return {"message": value[key], "status": status}
    if isinstance(value, str) and value.strip():
        return {"message": value.strip(), "status": status}
    return {"message": _reason_phrase(status), "status": status}


def _reason_phrase(status: int) -> str:
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"
