"""The dead-letter stream of a service (``dispatch:dlq:<service>``).

Each entry keeps what is needed to understand and replay it, and nothing secret: ``reason``
(redacted), ``data`` (the original entry bytes, sensitive values redacted), ``stream`` and
``stream_id`` (the entry it came from, so a replay keeps its time and stable id),
``event_id``, ``batch_id``, ``attempts`` and ``ts``. Dead letters are never trimmed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis

from dispatch_celery import constants as c
from dispatch_celery.batches.codec import Entry, encode, raw_size
from dispatch_celery.batches.state import BatchStore
from dispatch_celery.ingest.enqueue import Enqueuer


@dataclass(frozen=True, slots=True)
class DeadLetter:
    dlq_id: str
    reason: str
    data: bytes
    stream: str
    stream_id: str
    event_id: str
    batch_id: str
    attempts: int
    ts: float

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.dlq_id,
            "reason": self.reason,
            "data": self.data.decode("utf-8", "backslashreplace"),
            "stream": self.stream,
            "stream_id": self.stream_id,
            "event_id": self.event_id,
            "batch_id": self.batch_id,
            "attempts": self.attempts,
            "ts": self.ts,
        }


@dataclass(frozen=True, slots=True)
class NewDeadLetter:
    reason: str
    data: bytes
    stream_id: str
    event_id: str = ""


def _parse(dlq_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    def s(name: str) -> str:
        return fields.get(name.encode(), b"").decode("utf-8", "backslashreplace")

    return DeadLetter(
        dlq_id=dlq_id.decode(),
        reason=s("reason"),
        data=fields.get(b"data", b""),
        stream=s("stream"),
        stream_id=s("stream_id"),
        event_id=s("event_id"),
        batch_id=s("batch_id"),
        attempts=int(s("attempts") or 0),
        ts=float(s("ts") or 0),
    )


class DeadLetters:
    def __init__(self, client: redis.Redis, service: str) -> None:
        self.r = client
        self.service = service
        self.key = c.deadletter_key(service)

    def add(
        self,
        items: Sequence[NewDeadLetter],
        *,
        stream: str,
        batch_id: str,
        attempts: int,
        pipe: redis.client.Pipeline | None = None,
    ) -> None:
        """Append dead letters; on ``pipe`` when given (the caller executes it)."""
        if not items:
            return
        own = pipe is None
        pipe = self.r.pipeline(transaction=True) if pipe is None else pipe
        now = f"{time.time():.3f}"
        for item in items:
            pipe.xadd(
                self.key,
                {
                    "reason": item.reason,
                    "data": item.data,
                    "stream": stream,
                    "stream_id": item.stream_id,
                    "event_id": item.event_id,
                    "batch_id": batch_id,
                    "attempts": attempts,
                    "ts": now,
                },
            )
        if own:
            pipe.execute()

    def count(self) -> int:
        return int(self.r.xlen(self.key))

    def iter(self, limit: int | None = None) -> Iterator[DeadLetter]:
        last = "-"
        seen = 0
        while True:
            page = cast(
                list[tuple[bytes, dict[bytes, bytes]]],
                self.r.xrange(self.key, min=last, max="+", count=500),
            )
            if last != "-" and page:
                page = page[1:]
            if not page:
                return
            for dlq_id, fields in page:
                yield _parse(dlq_id, fields)
                seen += 1
                if limit is not None and seen >= limit:
                    return
            last = page[-1][0].decode()

    def get(self, dlq_id: str) -> DeadLetter | None:
        page = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            self.r.xrange(self.key, min=dlq_id, max=dlq_id, count=1),
        )
        return _parse(*page[0]) if page else None

    def purge(self, ids: Sequence[str] | None = None) -> int:
        if ids:
            return int(self.r.xdel(self.key, *ids))
        n = self.count()
        self.r.delete(self.key)
        return n

    def replay(
        self,
        enqueuer: Enqueuer,
        *,
        ids: Sequence[str] | None = None,
        batch_size: int = 100,
        owner: str = "replay",
    ) -> int:
        """Put dead letters back through delivery; each is removed once its task is queued.

        A replayed batch keeps the original stream key and entry ids, so ids and times are
        the same as on the first delivery; it is never XACKed (group ``""``).
        """
        letters = [d for d in (self.get(i) for i in ids) if d] if ids else list(self.iter())
        store = BatchStore(self.r, self.service)
        done = 0
        for start in range(0, len(letters), batch_size):
            chunk = letters[start : start + batch_size]
            by_stream: dict[str, list[DeadLetter]] = {}
            for d in chunk:
                by_stream.setdefault(d.stream, []).append(d)
            for stream, group in by_stream.items():
                entries = [Entry(d.stream_id or d.dlq_id, d.data) for d in group]
                batch_id = f"replay-{group[0].dlq_id}_{group[-1].dlq_id}"
                blob = encode(stream, "", entries)
                store.stage_many([(batch_id, blob, raw_size(entries))], owner)
                enqueuer.publish(batch_id, len(entries))
                store.confirm([batch_id], stream, "", [])
                self.r.xdel(self.key, *(d.dlq_id for d in group))
                done += len(group)
        return done
