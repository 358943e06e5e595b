"""Batches travel by reference: one compact blob in Redis, a tiny task on the broker.

A blob holds the stream key and group its entries came from (so the worker can XACK them
if the bridge could not) and, per entry, its id and raw ``data`` bytes, untouched. Entries
without a ``data`` field keep their other fields, so the worker can dead-letter them with
their raw bytes.

Life of a batch (every transition is one atomic Redis call):

1. ``stage``: SET blob, HSET staged (owner, time), HSET inflight (bytes), INCRBY bytes.
2. the bridge publishes the task; the broker accepts it.
3. ``confirm``: HDEL staged, XACK the entries.
4. the worker delivers or dead-letters, then ``finish``: DEL blob and its progress keys,
   HDEL staged and inflight (DECRBY bytes only if it was there), XACK the entries.

A bridge that dies between 1 and 3 leaves a staged batch; the next bridge of the service
re-publishes it (``recover``). A duplicate task finds no blob and does nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, cast

import redis

from dispatch_celery import constants as c
from dispatch_celery.batches.codec import Batch, decode
from dispatch_celery.stats import Counter

# KEYS: blob, staged, inflight, inflight-bytes, done-set, attempts, stream, touched
# ARGV: batch id, group, entry ids...
_FINISH = """
redis.call('DEL', KEYS[1], KEYS[5], KEYS[6])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[8], ARGV[1])
local size = redis.call('HGET', KEYS[3], ARGV[1])
if size then
  redis.call('HDEL', KEYS[3], ARGV[1])
  local left = redis.call('DECRBY', KEYS[4], tonumber(size))
  if left < 0 then redis.call('SET', KEYS[4], 0) end
end
if KEYS[7] ~= '' and ARGV[2] ~= '' and #ARGV > 2 then
  local ok, err = pcall(redis.call, 'XACK', KEYS[7], ARGV[2], unpack(ARGV, 3))
end
return size and 1 or 0
"""

# KEYS: touched.  ARGV: older than (s), now (s).  Claims (re-stamps) and returns up to 100
# batches whose last attempt began before ARGV[1], so one bridge re-publishes each.
_ORPHANS = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""


class BatchStore:
    """The Redis side of a service's batches (see the module docstring)."""

    def __init__(self, client: redis.Redis, service: str) -> None:
        self.r = client
        self.service = service
        self.staged = c.staged_key(service)
        self.inflight = c.inflight_key(service)
        self.inflight_bytes = c.inflight_bytes_key(service)
        self.touched = c.touched_key(service)
        self._finish = client.register_script(_FINISH)
        self._orphans = client.register_script(_ORPHANS)

    def key(self, batch_id: str) -> str:
        return c.batch_key(self.service, batch_id)

    def stage_many(self, items: Sequence[tuple[str, bytes, int]], owner: str) -> None:
        """Store blobs and mark them staged and in flight, atomically: (id, blob, raw bytes)."""
        now = f"{owner}|{time.time():.3f}"
        pipe = self.r.pipeline(transaction=True)
        total = 0
        for batch_id, blob, size in items:
            pipe.set(self.key(batch_id), blob)
            pipe.hset(self.staged, batch_id, now)
            pipe.hset(self.inflight, batch_id, size)
            total += size
        pipe.incrby(self.inflight_bytes, total)
        pipe.execute()

    def confirm(
        self, batch_ids: Sequence[str], stream: str, group: str, ids: Sequence[str]
    ) -> None:
        """The broker accepted the tasks: unstage and XACK, atomically."""
        pipe = self.r.pipeline(transaction=True)
        if batch_ids:
            pipe.hdel(self.staged, *batch_ids)
        if ids and stream and group:
            pipe.xack(stream, group, *ids)
            # counted here, in the same round trip: events handed to the broker
            pipe.hincrby(c.stats_key(self.service), Counter.ENQUEUED.value, len(ids))
        pipe.execute()

    def begin(self, batch_id: str) -> tuple[int, Batch | None, set[str]]:
        """Count one more attempt (across retries and worker crashes, so a poison batch
        cannot loop) and load the batch (None once finished) with the ids of its entries
        already settled, in one round trip."""
        attempts = c.batch_attempts_key(self.service, batch_id)
        pipe = self.r.pipeline(transaction=False)
        pipe.incr(attempts)
        pipe.expire(attempts, 7 * 24 * 3600)
        pipe.zadd(self.touched, {batch_id: time.time()})
        pipe.get(self.key(batch_id))
        pipe.smembers(c.batch_done_key(self.service, batch_id))
        attempt, _, _, blob, done = pipe.execute()
        if blob is None:
            self.r.delete(attempts)
            self.r.zrem(self.touched, batch_id)
            return int(attempt), None, set()
        return int(attempt), decode(blob), {m.decode() for m in done}

    def finish(
        self, batch_id: str, batch: Batch, pipe: redis.client.Pipeline | None = None
    ) -> None:
        keys = [
            self.key(batch_id),
            self.staged,
            self.inflight,
            self.inflight_bytes,
            c.batch_done_key(self.service, batch_id),
            c.batch_attempts_key(self.service, batch_id),
            batch.stream,
            self.touched,
        ]
        args: list[Any] = [batch_id, batch.group, *(e.entry_id for e in batch.entries)]
        self._finish(keys=keys, args=args, client=pipe)

    def mark_done(
        self, batch_id: str, entry_ids: Sequence[str], pipe: redis.client.Pipeline
    ) -> None:
        if entry_ids:
            pipe.sadd(c.batch_done_key(self.service, batch_id), *entry_ids)

    def claim_orphans(self, older_than_s: float) -> list[str]:
        """Batches whose task was lost after an attempt began (see ``touched_key``)."""
        now = time.time()
        ids = cast(list[bytes], self._orphans(keys=[self.touched], args=[now - older_than_s, now]))
        return [i.decode() for i in ids]

    def reset_attempts(self, batch_id: str, pipe: redis.client.Pipeline) -> None:
        """An attempt made progress: count the next ones afresh."""
        pipe.delete(c.batch_attempts_key(self.service, batch_id))

    def in_flight(self) -> tuple[int, int]:
        """(batches, raw bytes) staged or enqueued and not yet finished."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hlen(self.inflight)
        pipe.get(self.inflight_bytes)
        count, size = pipe.execute()
        return int(count), int(size or 0)

    def staged_batches(self) -> dict[str, tuple[str, float]]:
        """batch id -> (owner consumer, staging time)."""
        raw = cast(dict[bytes, bytes], self.r.hgetall(self.staged))
        out: dict[str, tuple[str, float]] = {}
        for k, v in raw.items():
            owner, _, ts = v.decode().rpartition("|")
            try:
                out[k.decode()] = (owner, float(ts))
            except ValueError:
                out[k.decode()] = (owner, 0.0)
        return out
