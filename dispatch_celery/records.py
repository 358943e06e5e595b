"""Event -> normalized LLM run record (stream.md, "What a consumer should make of an event")."""

from __future__ import annotations

from typing import Any, TypedDict

from dispatch_celery.events import Event


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


def build_record(event: Event, *, max_body_bytes: int) -> RunRecord:
    raise NotImplementedError
