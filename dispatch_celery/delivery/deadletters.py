"""The dead-letter stream of a service (``dispatch:dlq:<service>``).

Each entry keeps what is needed to understand and replay it, and nothing secret: ``reason``
(redacted), ``data`` (the original entry bytes, sensitive values redacted), ``stream`` and
``stream_id`` (the entry it came from, so a replay keeps its time and stable id),
``event_id``, ``batch_id``, ``attempts`` and ``ts``.

The stream is bounded (``DISPATCH_DEADLETTER_MAX_LEN``, 100,000 by default): Redis runs with
``noeviction``, so an unbounded dead-letter stream (every batch of a broken service
dead-lettering at the input rate) would grow until Redis refuses writes, llm-proxy's
included. Each append trims exactly to the bound (``XADD MAXLEN = N``) in one Lua call that
also counts the oldest dead letters it dropped (``Counter.DEAD_LETTERS_TRIMMED``, shown by
``dispatch status`` and the metrics), so the loss is never silent; the worker logs it as a
warning. The call works inside the worker's transaction (dead letters, counters and the
batch's end are written together).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis

from dispatch_celery import constants as c
from dispatch_celery.batches.codec import Entry, encode, raw_size
from dispatch_celery.batches.state import BatchStore
from dispatch_celery.ingest.enqueue import Enqueuer
from dispatch_celery.stats import Counter

log = logging.getLogger("dispatch_celery.delivery.deadletters")

# KEYS: dead-letter stream, stats hash.  ARGV: max length, counter field, fields per entry,
# then the field/value pairs of each entry in turn. Appends every entry with exact
# trimming and returns how many old entries the trimming dropped (also counted).
_ADD = """
local maxlen = tonumber(ARGV[1])
local per = tonumber(ARGV[3])
local before = redis.call('XLEN', KEYS[1])
local added = 0
for i = 4, #ARGV, per do
  redis.call('XADD', KEYS[1], 'MAXLEN', '=', maxlen, '*', unpack(ARGV, i, i + per - 1))
  added = added + 1
end
local trimmed = before + added - redis.call('XLEN', KEYS[1])
if trimmed > 0 then redis.call('HINCRBY', KEYS[2], ARGV[2], trimmed) end
return trimmed
"""


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
    def __init__(
        self, client: redis.Redis, service: str, *, max_len: int = c.DEFAULT_DEADLETTER_MAX_LEN
    ) -> None:
        self.r = client
        self.service = service
        self.key = c.deadletter_key(service)
        self.max_len = max_len
        self._add = client.register_script(_ADD)

    def add(
        self,
        items: Sequence[NewDeadLetter],
        *,
        stream: str,
        batch_id: str,
        attempts: int,
        pipe: redis.client.Pipeline | None = None,
    ) -> int | None:
        """Append dead letters, trimming the stream exactly to ``max_len``.

        Without ``pipe``: runs now, logs and returns how many old dead letters the bound
        dropped. With ``pipe`` (the caller executes it): returns the index of that count
        in the pipeline's results, to be passed to ``trimmed``; None when nothing was
        queued."""
        if not items:
            return None if pipe is not None else 0
        now = f"{time.time():.3f}"
        args: list[Any] = [self.max_len, Counter.DEAD_LETTERS_TRIMMED.value, 16]
        for item in items:
            args += [
                "reason", item.reason,
                "data", item.data,
                "stream", stream,
                "stream_id", item.stream_id,
                "event_id", item.event_id,
                "batch_id", batch_id,
                "attempts", attempts,
                "ts", now,
            ]  # fmt: skip
        keys = [self.key, c.stats_key(self.service)]
        if pipe is None:
            return self.trimmed(self._add(keys=keys, args=args))
        index = len(pipe)
        self._add(keys=keys, args=args, client=pipe)
        return index

    def trimmed(self, result: Any) -> int:
        """The count an ``add`` returned (or its pipeline result); logs a warning when the
        bound dropped old dead letters."""
        n = int(result or 0)
        if n > 0:
            log.warning(
                "dead-letter stream %s is at its bound (DISPATCH_DEADLETTER_MAX_LEN=%d): "
                "the %d oldest dead letters were dropped (counted as %s)",
                self.key,
                self.max_len,
                n,
                Counter.DEAD_LETTERS_TRIMMED.value,
            )
        return n

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
        recovery_s: float = c.DEFAULT_STAGED_RECOVERY_S,
        lease_s: float = c.DEFAULT_QUEUE_LEASE_S,
    ) -> int:
        """Put dead letters back through delivery; each is removed once its task is queued.

        A replayed batch keeps the original stream key and entry ids, so ids and times are
        the same as on the first delivery; it is never XACKed (group ``""``). It follows the
        batch lifecycle of ``batches.state`` (staged and due, published, confirmed), so a
        replay that dies half-way is finished by a bridge of the service.
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
                tokens = store.stage_many([(batch_id, blob, raw_size(entries))], owner, recovery_s)
                enqueuer.publish(batch_id, len(entries), tokens[batch_id])
                store.confirm([(batch_id, stream, "", [])], lease_s)
                self.r.xdel(self.key, *(d.dlq_id for d in group))
                done += len(group)
        return done
