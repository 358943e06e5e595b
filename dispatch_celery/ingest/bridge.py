"""The bridge: stream -> batches -> tasks (one or more per service, one group per service).

Order of work, and why nothing is lost:

1. Start-up: create the group (at ``0``); put any in-flight batch that is missing from the
   due index into it (batches of an earlier version); make this consumer's own *staged*
   batches due at once and publish everything due (a crash between storing a batch and
   confirming its task); then re-read this consumer's own pending entries (read before
   the crash, never batched).
2. Loop: publish the batches that are due (``BatchStore.claim_due``: re-published tasks,
   retries whose wait is over, batches whose task was lost); pause reading while the
   service has more than the high-water mark of batches (or bytes) in flight; otherwise
   XREADGROUP ``>``; every few seconds claim entries idle in dead consumers' PELs
   (XAUTOCLAIM, within the headroom), count entries the producer trimmed before we read
   them, and refresh the heartbeat.
3. A batch is full at ``batch_size`` entries or ``batch_max_bytes`` raw bytes, or flushed
   ``flush_linger`` after its first entry arrived once a read came back short (the bridge
   caught up: quiet traffic waits no longer than the linger, like Kafka's ``linger.ms``),
   else ``flush_interval`` after it (while reads come back full, batches fill up
   instead). Flushing stores the blobs
   (staged, in flight, due), publishes one small task per batch, and only once the
   broker accepted them XACKs the entries (``BatchStore.confirm``). A publish that fails
   leaves them staged and pending.
Several streams (``DISPATCH_STREAM=a,b`` or a pattern, ``ingest.streamset``): one
XREADGROUP over every key (COUNT applies per stream, so a busy shard cannot starve a quiet
one), one group per service on each stream, a buffer per stream (a batch holds entries of
one stream), pending entries and idle claims per stream; a pattern is re-resolved every
``DISPATCH_STREAM_RESCAN`` seconds.

4. Redis or the broker going away (a restart, a failover, a network cut) is waited out:
   bounded exponential backoff (0.5 s to 10 s), one log line when it starts and one when
   it ends, no exit. After an error the bridge drops its in-memory buffer and redoes the
   start-up (the entries it held are still pending in the PEL, so they are re-read).
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
from kombu.exceptions import OperationalError

from dispatch_celery import constants as c
from dispatch_celery import stats
from dispatch_celery.batches.buffer import IntakeMeter
from dispatch_celery.batches.codec import Entry, batch_id_for, encode, entry_from_fields, raw_size
from dispatch_celery.batches.state import BatchStore
from dispatch_celery.errors import StreamError
from dispatch_celery.ingest.enqueue import Publisher
from dispatch_celery.ingest.streams import Reply, StreamAdmin, per_stream, raw_stream_client
from dispatch_celery.ingest.streamset import StreamBuffers, StreamSet, describe
from dispatch_celery.settings import Settings
from dispatch_celery.stats import Counter

log = logging.getLogger("dispatch_celery.ingest.bridge")

HOUSEKEEPING_EVERY_S = 5.0
PAUSE_SLEEP_S = 0.25
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
REMIND_EVERY_S = 60.0  # while waiting for Redis or the broker, say so again this often
DUE_PER_STEP = 500  # due batches published per loop step, at most
REPUBLISH_SOON_S = 1.0  # a due batch whose publish failed is due again after this


try:  # kombu >= 5.7 (the stubs do not know it yet)
    from kombu.exceptions import BatchPublishError  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - older kombu publishes one by one
    BatchPublishError = OperationalError

# Errors of the infrastructure, waited out with backoff. redis-py's BusyLoadingError (a
# restarted Redis loading its AOF) is a ConnectionError; kombu raises OperationalError
# (after its own publish retries) and BatchPublishError (a pipelined publish failed).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    OSError,
    OperationalError,
    BatchPublishError,
)


def default_consumer() -> str:
    """Stable across restarts on the same host (run several per host with --consumer)."""
    return socket.gethostname()


def bridge_redis(url: str) -> redis.Redis:
    """The bridge's Redis client: a dead server is noticed (socket timeouts above the
    XREADGROUP block time) rather than waited on forever."""
    return redis.Redis.from_url(
        url, health_check_interval=30, socket_connect_timeout=5, socket_timeout=15
    )


class Bridge:
    def __init__(
        self,
        settings: Settings,
        service: str,
        enqueuer: Publisher,
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
        self.r = client or bridge_redis(settings.redis_url)
        self.reader = raw_stream_client(self.r)  # entries' fields as lists, not dicts
        self.enqueuer = enqueuer
        self.store = BatchStore(self.r, service)
        self.streams = StreamSet(self.r, settings.stream, settings.stream_rescan)
        self.admins: dict[str, StreamAdmin] = {}  # one per stream key read
        self.buffer = StreamBuffers()
        self.meter = IntakeMeter()
        # Behind (after start, a pause, or a full read): read through StreamAdmin.read_counted,
        # which counts a trimmed gap and reads past it atomically (exact trim counts).
        self.behind = True
        self.paused = False
        self.memory_full = False  # Redis near its maxmemory (see ``check_memory``)
        self.read_total = 0
        self.errors: tuple[type[BaseException], ...] = (
            TRANSIENT_ERRORS + enqueuer.connection_errors()
        )
        self._next_housekeeping = 0.0
        self._indexed = False
        self._failing_since: float | None = None
        self._backoff = BACKOFF_FIRST_S
        self._reminded = 0.0
        self._last_error = ""

    # --- lifecycle -------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        log.info(
            "bridge %s/%s reading %s as %s (batch %d, flush %.2fs)",
            self.service,
            self.group,
            self.stream,  # the DISPATCH_STREAM value; start() logs what it resolves to
            self.consumer,
            self.settings.batch_size,
            self.settings.flush_interval,
        )
        started = False
        while not stop.is_set():
            try:
                if not started:
                    self.start()
                    started = True
                self.step()
            except redis.ResponseError as exc:
                self.response_error(exc)
                started = False
                self._wait(stop, exc)
            except StreamError as exc:
                if not isinstance(exc.__cause__, redis.ResponseError):
                    raise  # the key is not a stream: a configuration problem, stop
                started = False
                self._wait(stop, exc)
            except self.errors as exc:
                started = False
                self._wait(stop, exc)
            else:
                self._recovered()
        self.shutdown()

    def start(self) -> None:
        """The start-up sequence (also redone after every infrastructure error)."""
        self.buffer.clear()  # whatever it held is still pending in the PEL: re-read below
        self.admins = {}
        self.streams.reset()
        self.behind = True
        self.refresh_streams()
        indexed = 0 if self._indexed else self.store.index_unindexed(self.settings.queue_lease)
        self._indexed = True  # once per process: the index is kept by every step after
        if indexed:
            log.warning(
                "bridge %s: %d in-flight batches were not in the due index (an earlier "
                "version); they are re-published if no task begins them within %gs",
                self.service,
                indexed,
                self.settings.queue_lease,
            )
        self.store.mine_due_now(self.consumer)
        while self.publish_due() >= DUE_PER_STEP:
            pass
        for stream in list(self.admins):
            self.read_own_pending(stream)

    def refresh_streams(self) -> None:
        """Resolve DISPATCH_STREAM when due (patterns); a new key gets its group at 0."""
        new = self.streams.refresh()
        for stream in new:
            admin = StreamAdmin(self.r, stream, self.group, self.service)
            admin.ensure_group()
            self.admins[stream] = admin
        if new:
            log.info("bridge %s reads %s", self.service, describe(self.streams.keys, self.stream))

    def shutdown(self) -> None:
        errors: tuple[type[BaseException], ...] = (redis.RedisError, *self.errors)
        try:
            self.flush(force=True)
            self.r.delete(c.heartbeat_key(self.service, self.consumer))
        except errors as exc:
            log.warning(
                "bridge %s: could not flush at shutdown (%s); the entries stay pending and "
                "are re-read at the next start",
                self.service,
                exc,
            )
        log.info("bridge %s stopped", self.service)

    def response_error(self, exc: redis.ResponseError) -> None:
        """Log a Redis error reply as what it is (OOM, READONLY, ...). Only NOGROUP (the
        stream or group was deleted under us) is about the group; the start-up that follows
        every error re-creates it."""
        if "NOGROUP" in str(exc):
            log.error("bridge %s: %s; re-creating the group", self.service, exc)
        # any other reply is logged by _wait, as it is, once (and a reminder a minute)

    def _wait(self, stop: threading.Event, exc: BaseException) -> None:
        """Back off after an infrastructure error: one line when it starts, a reminder
        every minute, never a busy loop."""
        now = time.monotonic()
        what = f"{type(exc).__name__}: {exc}"
        # an error reply (OOM, READONLY, ...) is not an unreachable server: say which it is
        refused = isinstance(exc, redis.ResponseError) or isinstance(
            exc.__cause__, redis.ResponseError
        )
        headline = "Redis refused a command" if refused else "Redis or the broker is unavailable"
        if self._failing_since is None:
            self._failing_since = now
            self._reminded = now
            log.warning(
                "bridge %s: %s (%s); retrying with backoff (%.1fs to %.0fs); entries not yet "
                "acknowledged stay pending",
                self.service,
                headline,
                what,
                BACKOFF_FIRST_S,
                BACKOFF_MAX_S,
            )
        elif now - self._reminded >= REMIND_EVERY_S or what != self._last_error:
            self._reminded = now
            log.warning(
                "bridge %s: still waiting after %.0fs: %s (%s)",
                self.service,
                now - self._failing_since,
                headline,
                what,
            )
        self._last_error = what
        self.buffer.clear()
        stop.wait(self._backoff)
        self._backoff = min(BACKOFF_MAX_S, self._backoff * 2)

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.warning(
                "bridge %s: Redis and the broker answer again after %.1fs; resumed",
                self.service,
                time.monotonic() - self._failing_since,
            )
        self._failing_since = None
        self._backoff = BACKOFF_FIRST_S
        self._last_error = ""

    def step(self) -> None:
        now = time.monotonic()
        self.publish_due()
        if now >= self._next_housekeeping:
            self.housekeeping()
            self._next_housekeeping = now + HOUSEKEEPING_EVERY_S
        headroom = self.headroom()
        if headroom <= 0:
            if not self.paused:
                log.warning("bridge %s: high-water mark reached, pausing reads", self.service)
                self.paused = True
            self.flush(force=False)  # partial batches whose flush interval is over
            time.sleep(PAUSE_SLEEP_S)
            return
        if self.paused:
            log.info("bridge %s: below high-water mark, resuming", self.service)
            self.paused = False
            self.behind = True  # the producer may have trimmed while we were not reading
        self.read(headroom)
        self.flush(force=False)

    # --- reading ---------------------------------------------------------------------------

    def read(self, headroom: int) -> None:
        """One XREADGROUP over every stream; COUNT is per stream (fair to a quiet one).
        While behind, per stream without blocking, each read with its trim count.
        It blocks for at most a second, and no longer than the first retry delay: between
        reads the due index is polled, and a retry (or a parked batch at the gate's end)
        due in 0.1 s must not wait a whole block to be re-published."""
        block_ms = max(1, int(1000 * min(1.0, self.settings.retry_base_delay)))
        oldest = self.buffer.oldest()
        if oldest is not None:
            left = self.flush_wait() - (time.monotonic() - oldest)
            block_ms = max(1, min(block_ms, int(left * 1000)))
        keys = self.streams.keys
        if not keys:  # a pattern that matches no stream yet
            time.sleep(block_ms / 1000)
            return
        allowed = min(self.settings.read_count, headroom * self.settings.batch_size)
        count = max(1, allowed // len(keys))
        if self.behind:
            self.behind = False
            for stream in keys:
                entries = self.admins[stream].read_counted(self.consumer, count)
                self.take(stream, entries)
                self.behind = self.behind or len(entries) >= count
            return
        reply = self.reader.xreadgroup(
            self.group, self.consumer, dict.fromkeys(keys, ">"), count=count, block=block_ms
        )
        for key, entries in per_stream(reply):
            self.take(key.decode(), entries)
            self.behind = self.behind or len(entries) >= count

    def take(self, stream: str, entries: Reply) -> None:
        if not entries:
            return
        gone: list[str] = []
        kept: list[Entry] = []
        for entry_id, fields in entries:
            if not fields:  # a pending entry the producer trimmed before we batched it
                # (Redis answers it with no fields; a real entry always has one)
                gone.append(entry_id.decode())
                continue
            kept.append(entry_from_fields(entry_id, fields))
        self.buffer.add(stream, kept)
        self.read_total += len(entries)
        if gone:
            self.lost_while_pending(stream, gone)

    def lost_while_pending(self, stream: str, ids: Sequence[str]) -> None:
        log.warning(
            "%d pending entries of %s were trimmed before they were batched",
            len(ids),
            stream,
        )
        pipe = self.r.pipeline(transaction=True)
        stats.queue_add(pipe, self.service, {Counter.TRIMMED_UNREAD: len(ids)})
        pipe.hincrby(c.trimmed_streams_key(self.service), stream, len(ids))
        pipe.xack(stream, self.group, *ids)
        pipe.execute()

    def read_own_pending(self, stream: str) -> None:
        """Entries delivered to this consumer before a restart and never acknowledged."""
        last = "0-0"
        n = 0
        while True:
            found = per_stream(
                self.reader.xreadgroup(
                    self.group, self.consumer, {stream: last}, count=self.settings.read_count
                )
            )
            entries = found[0][1] if found else []
            if not entries:
                break
            self.take(stream, entries)
            n += len(entries)
            last = entries[-1][0].decode()
            self.flush(force=False)
        if n:
            log.info(
                "bridge %s: re-read %d pending entries of %s on %s",
                self.service,
                n,
                self.consumer,
                stream,
            )
        self.flush(force=True)

    def claim_idle(self, headroom: int) -> int:
        """XAUTOCLAIM entries idle in other (dead) consumers' PELs, at most as many as the
        headroom below the high-water mark allows (shared by the streams, in turn)."""
        allowed = max(0, headroom) * self.settings.batch_size
        claimed = 0
        for stream in list(self.admins):
            claimed += self._claim_idle(stream, allowed - claimed)
        return claimed

    def _claim_idle(self, stream: str, allowed: int) -> int:
        start = "0-0"
        claimed = 0
        idle_ms = int(self.settings.claim_idle * 1000)
        for _ in range(100):  # bounded: at most 100 pages per housekeeping round
            count = min(self.settings.read_count, allowed - claimed)
            if count <= 0:
                break
            reply: list[Any] = self.reader.xautoclaim(
                stream, self.group, self.consumer, idle_ms, start_id=start, count=count
            )
            start = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            entries = cast(Reply, reply[1])
            deleted = [d.decode() for d in reply[2]] if len(reply) > 2 else []
            if entries:
                self.take(stream, entries)
                claimed += len(entries)
                self.flush(force=False)
            if deleted:
                self.lost_while_pending(stream, deleted)
            if start == "0-0":
                break
        if claimed:
            log.info(
                "bridge %s: claimed %d idle entries of dead consumers on %s",
                self.service,
                claimed,
                stream,
            )
            self.flush(force=True)
        return claimed

    # --- writing ---------------------------------------------------------------------------

    def flush_wait(self) -> float:
        """How long a partial batch waits for more entries: the linger once the bridge has
        caught up (its last read came back short: more is not coming soon), else the flush
        interval (entries keep coming, so batches fill up: fewer, fuller tasks)."""
        s = self.settings
        return s.flush_interval if self.behind else min(s.flush_linger, s.flush_interval)

    def flush(self, *, force: bool) -> None:
        s = self.settings
        taken = self.buffer.take(
            s.batch_size, self.flush_wait(), force=force, max_bytes=s.batch_max_bytes
        )
        for stream, batches in taken:
            self.publish(stream, batches)

    def publish(self, stream: str, batches: Sequence[Sequence[Entry]]) -> None:
        """Stage, publish, and only then confirm (XACK): a failure in between leaves the
        batches staged (due after ``staged_recovery``) and their entries pending."""
        name = stream if self.streams.several else None  # entry ids repeat across streams
        items = [
            (batch_id_for(entries, name), encode(stream, self.group, entries), raw_size(entries))
            for entries in batches
        ]
        for (_, blob, raw), entries in zip(items, batches, strict=True):
            self.meter.staged(len(entries), len(blob), raw)
        tokens = self.store.stage_many(items, self.consumer, self.settings.staged_recovery)
        self.enqueuer.publish_many(
            [
                (batch_id, len(entries), tokens[batch_id])
                for (batch_id, _, _), entries in zip(items, batches, strict=True)
            ]
        )
        self.store.confirm(
            [
                (batch_id, stream, self.group, [e.entry_id for e in entries])
                for (batch_id, _, _), entries in zip(items, batches, strict=True)
            ],
            self.settings.queue_lease,
        )

    def publish_due(self) -> int:
        """Publish the batches that are due (atomically claimed: one bridge each); returns
        how many were claimed. A batch whose blob vanished is dropped and counted."""
        claimed = self.store.claim_due(self.settings.queue_lease, DUE_PER_STEP)
        if not claimed:
            return 0
        ids = [batch_id for batch_id, _ in claimed]
        staged = self.store.staged_among(ids)
        batches = self.store.load([b for b in ids if b in staged])
        present = self._present([b for b in ids if b not in staged])
        tasks: list[tuple[str, int, str]] = []
        confirms: list[tuple[str, str, str, Sequence[str]]] = []
        for batch_id, token in claimed:
            batch = batches.get(batch_id)
            if batch is None and not present.get(batch_id, False):
                self._lost(batch_id)
                continue
            if batch is not None:  # staged: its entries are XACKed by the confirm
                tasks.append((batch_id, len(batch.entries), token))
                ids_ = [e.entry_id for e in batch.entries]
                confirms.append((batch_id, batch.stream, batch.group, ids_))
            else:
                tasks.append((batch_id, 0, token))
                confirms.append((batch_id, "", "", []))
        if tasks:
            try:
                self.enqueuer.publish_many(tasks)
            except BaseException:
                self.store.due_soon([t[0] for t in tasks], REPUBLISH_SOON_S)
                raise
            self.store.confirm(confirms, self.settings.queue_lease)
            log.info("bridge %s: published %d due batches", self.service, len(tasks))
        return len(claimed)

    def _present(self, ids: Sequence[str]) -> dict[str, bool]:
        if not ids:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for batch_id in ids:
            pipe.exists(self.store.key(batch_id))
        return {b: bool(n) for b, n in zip(ids, pipe.execute(), strict=True)}

    def _lost(self, batch_id: str) -> None:
        if self.store.drop_lost(batch_id):
            log.error(
                "bridge %s: batch %s is in flight but its blob is gone from Redis (writes "
                "lost in a crash with appendfsync everysec, or keys evicted: check "
                "maxmemory-policy noeviction); dropped from the due index and counted as "
                "blobs_lost. Entries not yet acknowledged are re-read from the stream; "
                "acknowledged ones are lost",
                self.service,
                batch_id,
            )

    # --- health ----------------------------------------------------------------------------

    def headroom(self) -> int:
        """How many more batches may be read before the high-water mark (<= 0: pause)."""
        if self.memory_full:
            return 0
        batches, size = self.store.in_flight()
        if size >= self.settings.high_water_bytes:
            return 0
        buffered = len(self.buffer) // self.settings.batch_size
        return self.settings.high_water_batches - batches - buffered

    def check_memory(self) -> None:
        """Pause staging while Redis uses ``redis_memory_max_percent`` of its ``maxmemory``.

        The buffer lives in the Redis llm-proxy writes to: a long outage must never fill it
        to the point where the producer's XADD is refused (``noeviction``). Whatever the
        producer trims while we do not read is counted (``trimmed_unread``); a refused XADD
        would be the proxy's failure, and nobody would count it."""
        memory = self.r.info("memory")
        limit = int(memory.get("maxmemory", 0) or 0)
        used = int(memory.get("used_memory", 0) or 0)
        full = limit > 0 and used * 100 >= limit * self.settings.redis_memory_max_percent
        if full and not self.memory_full:
            log.warning(
                "bridge %s: Redis uses %d%% of its maxmemory (%d of %d bytes): pausing reads so "
                "the producer's writes keep succeeding (DISPATCH_REDIS_MEMORY_MAX_PERCENT=%d)",
                self.service,
                used * 100 // limit,
                used,
                limit,
                self.settings.redis_memory_max_percent,
            )
        elif self.memory_full and not full:
            log.info("bridge %s: Redis memory below the limit again", self.service)
        self.memory_full = full

    def housekeeping(self) -> None:
        self.check_memory()
        self.refresh_streams()
        self.meter.observe(self.r, self.streams.keys, self.read_total)
        self.heartbeat()
        for admin in self.admins.values():
            admin.check_trimmed()
        if not self.paused:
            self.claim_idle(self.headroom())

    def heartbeat(self) -> None:
        beat = {
            "service": self.service,
            "consumer": self.consumer,
            "group": self.group,
            "stream": self.stream,
            "streams": self.streams.keys,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "ts": time.time(),
            "paused": self.paused,
            "read_total": self.read_total,
            **self.meter.heartbeat(self.settings),  # intake rate, buffer shape and marks
        }
        self.r.set(
            c.heartbeat_key(self.service, self.consumer), orjson.dumps(beat), ex=c.HEARTBEAT_TTL_S
        )
