"""The bridge: stream -> batches -> tasks (one or more per service, one group per service).

Order of work, and why nothing is lost:

1. At start: create the group (at ``0``), re-publish this consumer's *staged* batches (a
   crash between storing a batch and confirming its task), then re-read this consumer's
   own pending entries (read before the crash, never batched).
2. Loop: pause while the service has more than the high-water mark of batches (or bytes)
   in flight; otherwise XREADGROUP ``>``; every few seconds claim entries idle in dead
   consumers' PELs (XAUTOCLAIM), re-publish staged batches of dead bridges, count entries
   the producer trimmed before we read them, and refresh the heartbeat.
3. A batch is full at ``batch_size`` entries, or flushed ``flush_interval`` after its
   first entry arrived. Flushing stores the blobs (staged + in flight), publishes one small
   task per batch, and only then XACKs the entries (``BatchStore.confirm``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any, cast

import orjson
import redis

from dispatch_celery import constants as c
from dispatch_celery import stats
from dispatch_celery.batches.codec import (
    Entry,
    batch_id_for,
    decode,
    encode,
    entry_from_fields,
    raw_size,
)
from dispatch_celery.batches.state import BatchStore
from dispatch_celery.ingest.enqueue import Enqueuer
from dispatch_celery.ingest.streams import StreamAdmin
from dispatch_celery.settings import Settings
from dispatch_celery.stats import Counter

log = logging.getLogger("dispatch_celery.ingest.bridge")

HOUSEKEEPING_EVERY_S = 5.0
PAUSE_SLEEP_S = 0.25

_Reply = list[tuple[bytes, dict[bytes, bytes] | None]]


def default_consumer() -> str:
    """Stable across restarts on the same host (run several per host with --consumer)."""
    return socket.gethostname()


class Bridge:
    def __init__(
        self,
        settings: Settings,
        service: str,
        enqueuer: Enqueuer,
        *,
        group: str | None = None,
        consumer: str | None = None,
        client: redis.Redis | None = None,
    ) -> None:
        self.settings = settings
        self.service = service
        self.stream = settings.stream
        self.group = group or c.default_group(service)
        self.consumer = consumer or default_consumer()
        self.r = client or redis.Redis.from_url(settings.redis_url, health_check_interval=30)
        self.enqueuer = enqueuer
        self.store = BatchStore(self.r, service)
        self.admin = StreamAdmin(self.r, self.stream, self.group, service)
        self.buffer: list[Entry] = []
        self.buffer_since = 0.0
        self.paused = False
        self.read_total = 0
        self._next_housekeeping = 0.0

    # --- lifecycle -------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        log.info(
            "bridge %s/%s reading %s as %s (batch %d, flush %.2fs)",
            self.service,
            self.group,
            self.stream,
            self.consumer,
            self.settings.batch_size,
            self.settings.flush_interval,
        )
        self.admin.ensure_group()
        self.recover_staged(own=True)
        self.read_own_pending()
        while not stop.is_set():
            try:
                self.step()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                log.warning("bridge %s: %s; retrying in 1 s", self.service, exc)
                stop.wait(1.0)
            except redis.ResponseError as exc:  # the stream or group was deleted under us
                log.error("bridge %s: %s; re-creating the group in 1 s", self.service, exc)
                stop.wait(1.0)
                self.admin.ensure_group()
        self.flush(force=True)
        self.r.delete(c.heartbeat_key(self.service, self.consumer))
        log.info("bridge %s stopped", self.service)

    def step(self) -> None:
        now = time.monotonic()
        if now >= self._next_housekeeping:
            self.housekeeping()
            self._next_housekeeping = now + HOUSEKEEPING_EVERY_S
        headroom = self.headroom()
        if headroom <= 0:
            if not self.paused:
                log.warning("bridge %s: high-water mark reached, pausing reads", self.service)
                self.paused = True
            if self.buffer and now - self.buffer_since >= self.settings.flush_interval:
                self.flush(force=True)
            time.sleep(PAUSE_SLEEP_S)
            return
        if self.paused:
            log.info("bridge %s: below high-water mark, resuming", self.service)
            self.paused = False
        block_ms = 1000
        if self.buffer:
            left = self.settings.flush_interval - (now - self.buffer_since)
            block_ms = max(1, min(block_ms, int(left * 1000)))
        reply = cast(
            list[tuple[bytes, _Reply]] | None,
            self.r.xreadgroup(
                self.group,
                self.consumer,
                {self.stream: ">"},
                count=min(self.settings.read_count, headroom * self.settings.batch_size),
                block=block_ms,
            ),
        )
        if reply:
            self.take(reply[0][1])
        self.flush(force=False)

    # --- reading ---------------------------------------------------------------------------

    def take(self, entries: _Reply) -> None:
        if not entries:
            return
        if not self.buffer:
            self.buffer_since = time.monotonic()
        gone: list[str] = []
        for entry_id, fields in entries:
            if not fields:  # a pending entry the producer trimmed before we batched it
                # (Redis answers it with no fields; a real entry always has one)
                gone.append(entry_id.decode())
                continue
            self.buffer.append(entry_from_fields(entry_id, fields))
        self.read_total += len(entries)
        if gone:
            self.lost_while_pending(gone)

    def lost_while_pending(self, ids: Sequence[str]) -> None:
        log.warning(
            "%d pending entries of %s were trimmed before they were batched",
            len(ids),
            self.stream,
        )
        stats.add(self.r, self.service, {Counter.TRIMMED_UNREAD: len(ids)})
        self.r.xack(self.stream, self.group, *ids)

    def read_own_pending(self) -> None:
        """Entries delivered to this consumer before a restart and never acknowledged."""
        last = "0-0"
        n = 0
        while True:
            reply = cast(
                list[tuple[bytes, _Reply]] | None,
                self.r.xreadgroup(
                    self.group, self.consumer, {self.stream: last}, count=self.settings.read_count
                ),
            )
            entries = reply[0][1] if reply else []
            if not entries:
                break
            self.take(entries)
            n += len(entries)
            last = entries[-1][0].decode()
            self.flush(force=False)
        if n:
            log.info("bridge %s: re-read %d pending entries of %s", self.service, n, self.consumer)
        self.flush(force=True)

    def claim_idle(self) -> int:
        """XAUTOCLAIM entries idle in other (dead) consumers' PELs."""
        start = "0-0"
        claimed = 0
        idle_ms = int(self.settings.claim_idle * 1000)
        for _ in range(100):  # bounded: at most 100 pages per housekeeping round
            reply: list[Any] = self.r.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                idle_ms,
                start_id=start,
                count=self.settings.read_count,
            )
            start = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            entries = cast(_Reply, reply[1])
            deleted = [d.decode() for d in reply[2]] if len(reply) > 2 else []
            if entries:
                self.take(entries)
                claimed += len(entries)
                self.flush(force=False)
            if deleted:
                self.lost_while_pending(deleted)
            if start == "0-0":
                break
        if claimed:
            log.info("bridge %s: claimed %d idle entries of dead consumers", self.service, claimed)
            self.flush(force=True)
        return claimed

    # --- writing ---------------------------------------------------------------------------

    def flush(self, *, force: bool) -> None:
        size = self.settings.batch_size
        if not self.buffer:
            return
        due = force or time.monotonic() - self.buffer_since >= self.settings.flush_interval
        n_full = len(self.buffer) // size * size
        take = len(self.buffer) if due else n_full
        if take == 0:
            return
        chunk, self.buffer = self.buffer[:take], self.buffer[take:]
        if self.buffer:
            self.buffer_since = time.monotonic()
        self.publish([chunk[i : i + size] for i in range(0, len(chunk), size)])

    def publish(self, batches: Sequence[Sequence[Entry]]) -> None:
        items = []
        for entries in batches:
            batch_id = batch_id_for(entries)
            items.append((batch_id, encode(self.stream, self.group, entries), raw_size(entries)))
        self.store.stage_many(items, self.consumer)
        self.enqueuer.publish_many(
            [
                (batch_id, len(entries))
                for (batch_id, _, _), entries in zip(items, batches, strict=True)
            ]
        )
        ids = [e.entry_id for entries in batches for e in entries]
        self.store.confirm([i[0] for i in items], self.stream, self.group, ids)

    def recover_staged(self, *, own: bool) -> int:
        """Re-publish batches stored but never confirmed (their bridge died mid-flush)."""
        now = time.time()
        n = 0
        for batch_id, (owner, ts) in self.store.staged_batches().items():
            mine = owner == self.consumer
            if not ((own and mine) or now - ts >= self.settings.staged_recovery):
                continue
            blob = cast(bytes | None, self.r.get(self.store.key(batch_id)))
            if blob is None:  # a worker finished it already (and acked its entries)
                self.r.hdel(self.store.staged, batch_id)
                continue
            batch = decode(blob)
            self.enqueuer.publish(batch_id, len(batch.entries))
            self.store.confirm(
                [batch_id], batch.stream, batch.group, [e.entry_id for e in batch.entries]
            )
            n += 1
        if n:
            log.warning("bridge %s: re-published %d staged batches", self.service, n)
        return n

    # --- health ----------------------------------------------------------------------------

    def headroom(self) -> int:
        """How many more batches may be read before the high-water mark (<= 0: pause)."""
        batches, size = self.store.in_flight()
        if size >= self.settings.high_water_bytes:
            return 0
        buffered = len(self.buffer) // self.settings.batch_size
        return self.settings.high_water_batches - batches - buffered

    def recover_orphans(self) -> int:
        """Re-publish in-flight batches whose task was lost after an attempt began (a retry
        that could not be published, say). Any live task of such a batch would have begun
        another attempt by now: retries wait at most ``retry_max_delay``, an attempt lasts
        at most ``task_time_limit``, a dead worker's task returns after the visibility
        timeout. A duplicate task is harmless: it finds the blob gone, or the file
        backend's journal, or the vendor's dedup by run id."""
        s = self.settings
        orphans = self.store.claim_orphans(
            s.visibility_timeout + s.retry_max_delay + s.task_time_limit
        )
        live = [b for b in orphans if self.r.exists(self.store.key(b))]
        if live:
            self.enqueuer.publish_many([(b, 0) for b in live])
            log.warning(
                "bridge %s: re-published %d batches whose task was lost", self.service, len(live)
            )
        return len(live)

    def housekeeping(self) -> None:
        self.heartbeat()
        self.admin.check_trimmed()
        self.recover_staged(own=False)
        self.recover_orphans()
        if not self.paused:
            self.claim_idle()

    def heartbeat(self) -> None:
        beat = {
            "service": self.service,
            "consumer": self.consumer,
            "group": self.group,
            "stream": self.stream,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "ts": time.time(),
            "paused": self.paused,
            "read_total": self.read_total,
        }
        self.r.set(
            c.heartbeat_key(self.service, self.consumer), orjson.dumps(beat), ex=c.HEARTBEAT_TTL_S
        )
