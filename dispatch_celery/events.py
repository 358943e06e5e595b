"""Decode llm-proxy stream entries into ``Event`` objects; stable ids.

(types fixed here; implementation to be completed)
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from dispatch_celery.errors import MalformedEventError

# Namespace of the uuid5 ids derived from (stream key, entry id) when RequestID is empty.
EVENT_ID_NAMESPACE = uuid.UUID("3b0f3a56-8a5e-4e58-9a43-5c1f0a9d7e21")


@dataclass(frozen=True, slots=True)
class Event:
    """One decoded stream entry (llm-proxy's event)."""

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


def decode_entry(stream_key: str, entry_id: str, data: bytes | None) -> Event:
    """Decode one entry's ``data`` field; ``MalformedEventError(reason)`` when it cannot be."""
    raise MalformedEventError("not implemented")
