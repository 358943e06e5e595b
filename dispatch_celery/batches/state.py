"""Batch state in Redis: what is in flight, who may run it, and when it is due.

The blob itself is ``batches.codec``'s; this module keeps everything around it. Every
batch in flight is in one recovery index, the per-service **due index** (ZSET
``due_key``: batch id -> unix time at which a bridge must (re)publish the batch unless it
finished or the time was moved). There is no other recovery path.

Life of a batch (each step is one atomic Redis call):

1. ``stage`` (bridge): SET blob; HSET inflight sizes; INCRBY byte counters; HSET staged
   (owner, time); HSET ticket (a fresh token); ZADD due now + staged recovery.
2. the bridge publishes the task ``(service, batch_id, events, token)``; the broker
   accepted it.
3. ``confirm`` (bridge): XACK the entries (counted as enqueued), HDEL staged, ZADD due
   now + queue lease (unless a worker already began this task: then the due time is the
   worker's). The XACK happens only after the broker accepted the task, on every path
   (first publish and re-publish).
4. ``begin`` (worker): blob gone -> ``gone`` (finished by another copy: nothing to do);
   token is not the ticket -> ``stale`` (a newer copy was published); the batch's lease
   lock is held -> ``busy`` (a copy is running). Then the credentials pause and the outage
   gate are consulted (``paused`` / ``gated``: park, send nothing; or ``probe``). Else the
   attempt runs: ZADD due now + lease (if this worker dies, a bridge re-publishes after
   that), count the attempt and, if the previous one never ended, a crash; load the blob
   and the set of entries already settled.
5. an attempt that leaves runs pending asks ``delivery.retry``: give up (dead-letter and
   finish) or ``reschedule`` (due = now + backoff, lock released). No countdown waits in
   the broker.
6. ``finish``: DEL blob, done set, retry state, lease; HDEL ticket, staged, inflight;
   ZREM due; DECRBY byte counters; XACK (a failing XACK is counted and reported).
7. ``claim_due`` (bridge, every step): atomically takes the due ids (re-stamps them now +
   queue lease and gives each a new ticket), so two bridges never publish one batch. The
   bridge publishes them and confirms. A due batch whose blob vanished (Redis lost writes,
   an eviction) is dropped from the index and the accounting by ``drop_lost`` and counted
   as ``blobs_lost``; it is never retried forever.

A duplicate task (a broker redelivery, an older copy) therefore does nothing and counts
nothing: it is ``gone``, ``stale`` or ``busy``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from dispatch_celery import constants as c
from dispatch_celery.batches import scripts
from dispatch_celery.batches.codec import Batch, decode
from dispatch_celery.stats import Counter


@dataclass(frozen=True, slots=True)
class BatchRetryState:
    """What Redis remembers about a batch's attempts (its ``batch_state_key`` HASH); the
    retry policy (``delivery.retry``) reads it."""

    attempts: int = 0  # attempts in a row without progress, this one included once begun
    total: int = 0  # every attempt ever begun
    crashes: int = 0  # attempts in a row that never ended
    spent: float = 0.0  # seconds of budget used
    last: float = 0.0  # when the budget clock last ticked (0: not failing)

    @classmethod
    def from_redis(cls, raw: Mapping[str, str]) -> BatchRetryState:
        return cls(
            attempts=int(raw.get("attempts", 0) or 0),
            total=int(raw.get("total", 0) or 0),
            crashes=int(raw.get("crashes", 0) or 0),
            spent=float(raw.get("spent", 0) or 0),
            last=float(raw.get("last", 0) or 0),
        )

    def spent_at(self, now: float) -> float:
        """Budget used by ``now`` if the clock kept running since it last ticked."""
        return self.spent + (now - self.last if self.last else 0.0)


@dataclass
class Begun:
    """What ``begin`` found. ``status``: ``run``, ``probe`` (gate), ``probe-paused``,
    ``gated``, ``paused``, ``gone``, ``stale`` or ``busy``."""

    status: str
    batch: Batch | None = None
    done: set[str] = field(default_factory=set)
    state: BatchRetryState = field(default_factory=BatchRetryState)
    crashed: bool = False  # the previous attempt never ended
    info: dict[str, str] = field(default_factory=dict)  # gate or pause fields

    @property
    def runs(self) -> bool:
        return self.status in {"run", "probe", "probe-paused"}

    @property
    def probe(self) -> bool:
        return self.status in {"probe", "probe-paused"}


def _str_map(flat: Sequence[Any]) -> dict[str, str]:
    def s(v: Any) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    return {s(flat[i]): s(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def new_token() -> str:
    return secrets.token_hex(8)


class BatchStore:
    """The Redis side of a service's batches (see the module docstring)."""

    def __init__(self, client: redis.Redis, service: str) -> None:
        self.r = client
        self.service = service
        self.staged = c.staged_key(service)
        self.inflight = c.inflight_key(service)
        self.inflight_bytes = c.inflight_bytes_key(service)
        self.inflight_raw_bytes = c.inflight_raw_bytes_key(service)
        self.due = c.due_key(service)
        self.tickets = c.tickets_key(service)
        self.parked = c.parked_key(service)
        self.stats = c.stats_key(service)
        self._finish = client.register_script(scripts.FINISH)
        self._drop_lost = client.register_script(scripts.DROP_LOST)
        self._claim_due = client.register_script(scripts.CLAIM_DUE)
        self._confirm = client.register_script(scripts.CONFIRM)
        self._begin = client.register_script(scripts.BEGIN)
        self._wake = client.register_script(scripts.WAKE)
        self._close_gate = client.register_script(scripts.CLOSE_GATE)
        self._index = client.register_script(scripts.INDEX)

    def key(self, batch_id: str) -> str:
        return c.batch_key(self.service, batch_id)

    def _batch_keys(self, batch_id: str) -> dict[str, str]:
        s = self.service
        return {
            "blob": c.batch_key(s, batch_id),
            "done": c.batch_done_key(s, batch_id),
            "state": c.batch_state_key(s, batch_id),
            "lease": c.batch_lease_key(s, batch_id),
        }

    # --- bridge side -----------------------------------------------------------------------

    def stage_many(
        self, items: Sequence[tuple[str, bytes, int]], owner: str, recovery_s: float
    ) -> dict[str, str]:
        """Store blobs as in flight, staged and due in ``recovery_s``, atomically:
        (id, blob, raw bytes). Returns each batch's ticket token, for its task."""
        now = time.time()
        mark = f"{owner}|{now:.3f}"
        pipe = self.r.pipeline(transaction=True)
        compressed = raw = 0
        tokens: dict[str, str] = {}
        for batch_id, blob, size in items:
            tokens[batch_id] = new_token()
            pipe.set(self.key(batch_id), blob)
            pipe.hset(self.inflight, batch_id, f"{len(blob)} {size}")
            pipe.hset(self.staged, batch_id, mark)
            pipe.hset(self.tickets, batch_id, tokens[batch_id])
            pipe.zadd(self.due, {batch_id: now + recovery_s})
            compressed += len(blob)
            raw += size
        pipe.incrby(self.inflight_bytes, compressed)
        pipe.incrby(self.inflight_raw_bytes, raw)
        pipe.execute()
        return tokens

    def confirm(
        self,
        batches: Sequence[tuple[str, str, str, Sequence[str]]],
        lease_s: float,
    ) -> None:
        """The broker accepted these tasks: (batch id, stream, group, entry ids) each."""
        due = time.time() + lease_s
        pipe = self.r.pipeline(transaction=True)
        for batch_id, stream, group, ids in batches:
            keys = [self.staged, self.due, self.stats, stream if group else "", self.tickets]
            self._confirm(
                keys=[*keys, c.batch_state_key(self.service, batch_id)],
                args=[batch_id, f"{due:.3f}", group, Counter.ENQUEUED.value, *ids],
                client=pipe,
            )
        pipe.execute()

    def claim_due(self, lease_s: float, limit: int) -> list[tuple[str, str]]:
        """Take up to ``limit`` due batches (re-stamped now + ``lease_s``, each with a new
        ticket): [(batch id, token)]. Atomic: a batch goes to one claimer only."""
        raw = cast(
            list[bytes],
            self._claim_due(
                keys=[self.due, self.tickets, self.parked],
                args=[f"{time.time():.3f}", lease_s, limit, new_token()],
            ),
        )
        flat = [x.decode() for x in raw]
        return list(zip(flat[0::2], flat[1::2], strict=True))

    def load(self, batch_ids: Sequence[str]) -> dict[str, Batch | None]:
        pipe = self.r.pipeline(transaction=False)
        for batch_id in batch_ids:
            pipe.get(self.key(batch_id))
        blobs = cast(list[bytes | None], pipe.execute())
        return {
            b: (decode(blob) if blob is not None else None)
            for b, blob in zip(batch_ids, blobs, strict=True)
        }

    def drop_lost(self, batch_id: str) -> bool:
        """Forget a batch whose blob vanished while indexed; True when it did vanish."""
        k = self._batch_keys(batch_id)
        keys = [
            k["blob"], self.due, self.inflight, self.inflight_bytes, self.inflight_raw_bytes,
            self.staged, self.tickets, k["state"], k["done"], self.parked, k["lease"], self.stats,
        ]  # fmt: skip
        return bool(self._drop_lost(keys=keys, args=[batch_id, Counter.BLOBS_LOST.value]))

    def due_soon(self, batch_ids: Sequence[str], delay_s: float) -> None:
        """Publishing failed: make these due again shortly (still in flight only)."""
        if batch_ids:
            due = time.time() + delay_s
            self.r.zadd(self.due, dict.fromkeys(batch_ids, due), xx=True)

    def mine_due_now(self, owner: str) -> int:
        """A restarting bridge re-publishes its own staged batches at once."""
        now = time.time()
        ids = [b for b, (who, _) in self.staged_batches().items() if who == owner]
        if ids:
            self.r.zadd(self.due, dict.fromkeys(ids, now), xx=True)
        return len(ids)

    def index_unindexed(self, lease_s: float) -> int:
        """Put any in-flight batch missing from the due index into it (batches of an earlier
        version, which had no index): due after ``lease_s``. Returns how many. Each chunk
        is checked and added atomically, so a batch finishing meanwhile stays finished."""
        added = 0
        due = f"{time.time() + lease_s:.3f}"
        for chunk in self._scan_inflight(1000):
            added += int(self._index(keys=[self.inflight, self.due], args=[due, *chunk]))
        return added

    def _scan_inflight(self, count: int) -> Iterator[list[str]]:
        cursor = 0
        while True:
            cursor, page = cast(
                tuple[int, dict[bytes, bytes]], self.r.hscan(self.inflight, cursor, count=count)
            )
            if page:
                yield [k.decode() for k in page]
            if cursor == 0:
                return

    # --- worker side -----------------------------------------------------------------------

    def begin(self, batch_id: str, token: str | None, lease_s: float, probe_s: float) -> Begun:
        """One round trip: check, lock and (for a running attempt) count and load."""
        k = self._batch_keys(batch_id)
        s = self.service
        keys = [
            k["blob"], self.tickets, k["lease"], k["state"], self.due, k["done"],
            c.gate_key(s), c.gate_probe_key(s), c.pause_key(s), c.pause_probe_key(s), self.parked,
        ]  # fmt: skip
        args: list[str | int] = [
            batch_id,
            token or "",
            f"{time.time():.3f}",
            int(lease_s * 1000),
            int(probe_s * 1000),
        ]
        reply = cast(list[Any], self._begin(keys=keys, args=args))
        status = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        if len(reply) == 1:
            return Begun(status)
        raw_state = _str_map(reply[3])
        begun = Begun(
            status,
            state=BatchRetryState.from_redis(raw_state),
            info=_str_map(reply[4]),
            crashed=False,
        )
        if begun.runs:
            begun.batch = decode(reply[1])
            begun.done = {m.decode() for m in reply[2]}
            begun.crashed = int(reply[5]) == 1
        return begun

    def state_key(self, batch_id: str) -> str:
        return c.batch_state_key(self.service, batch_id)

    def load_one(self, batch_id: str) -> tuple[Batch | None, set[str]]:
        """A batch and the ids of its entries already settled."""
        pipe = self.r.pipeline(transaction=False)
        pipe.get(self.key(batch_id))
        pipe.smembers(c.batch_done_key(self.service, batch_id))
        blob, done = pipe.execute()
        if blob is None:
            return None, set()
        return decode(blob), {m.decode() for m in done}

    def finish(
        self, batch_id: str, batch: Batch, pipe: redis.client.Pipeline | None = None
    ) -> None:
        """The batch is settled (see the module docstring, step 6). Its reply is
        ``[in flight, XACK error]`` (in ``pipe``'s results when given)."""
        k = self._batch_keys(batch_id)
        keys = [
            k["blob"], self.staged, self.inflight, self.inflight_bytes, self.inflight_raw_bytes,
            k["done"], k["state"], k["lease"], self.due, self.tickets, self.parked, self.stats,
            batch.stream if batch.group else "",
        ]  # fmt: skip
        args: list[Any] = [
            batch_id,
            batch.group,
            Counter.XACK_FAILED.value,
            Counter.ENQUEUED.value,
            *(e.entry_id for e in batch.entries),
        ]
        self._finish(keys=keys, args=args, client=pipe)

    def mark_done(
        self, batch_id: str, entry_ids: Sequence[str], pipe: redis.client.Pipeline
    ) -> None:
        if entry_ids:
            pipe.sadd(c.batch_done_key(self.service, batch_id), *entry_ids)

    def reschedule(
        self,
        batch_id: str,
        due: float,
        pipe: redis.client.Pipeline,
        *,
        state: Mapping[str, str] | None = None,
        ended: bool = True,
        reset: Sequence[str] = (),
        park: bool = False,
    ) -> None:
        """The attempt (or parked begin) is over: come back at ``due``; release the lease.

        ``ended``: the attempt reached its end (clears the crash marker and count);
        ``state``: retry-state fields to store; ``reset``: fields to delete; ``park``: wait
        for a wake-up (outage gate, credentials pause)."""
        k = self._batch_keys(batch_id)
        if ended:
            pipe.hdel(k["state"], "open")
            pipe.hset(k["state"], "crashes", 0)
        if reset:
            pipe.hdel(k["state"], *reset)
        if state:
            pipe.hset(k["state"], mapping=dict(state))  # type: ignore[arg-type]
        pipe.zadd(self.due, {batch_id: due})  # the lease is held: the batch is in flight
        if park:
            pipe.zadd(self.parked, {batch_id: time.time()})
        pipe.delete(k["lease"])

    def abandon(self, batch_id: str, due: float) -> None:
        """An attempt raised past its handler: release the lease, come back at ``due``; the
        crash marker stays, so the next begin counts it."""
        pipe = self.r.pipeline(transaction=True)
        pipe.zadd(self.due, {batch_id: due}, xx=True)  # unless it finished meanwhile
        pipe.delete(c.batch_lease_key(self.service, batch_id))
        pipe.execute()

    def defer(self, batch_id: str, due: float) -> None:
        """Move a batch's due time (no attempt began: e.g. the backend cannot be built)."""
        self.r.zadd(self.due, {batch_id: due}, xx=True)

    # --- the service: gate and pause -------------------------------------------------------

    def close_gate(self, delay: float, reason: str, *, force: bool) -> tuple[float, bool]:
        """Close the outage gate for ``delay`` s (unless already closed and not ``force``).
        Returns (until, whether this call closed it)."""
        s = self.service
        until, _, closed = cast(
            list[Any],
            self._close_gate(
                keys=[c.gate_key(s), c.gate_probe_key(s)],
                args=[f"{time.time():.3f}", f"{delay:.3f}", reason, "1" if force else "0"],
            ),
        )
        return float(until), bool(closed)

    def gate(self) -> dict[str, str]:
        return {
            k.decode(): v.decode()
            for k, v in cast(dict[bytes, bytes], self.r.hgetall(c.gate_key(self.service))).items()
        }

    def open_gate(self) -> bool:
        """The service works again; True when a gate or pause was in place."""
        s = self.service
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(c.gate_key(s), c.pause_key(s))
        pipe.delete(c.gate_probe_key(s), c.pause_probe_key(s))
        n, _ = pipe.execute()
        return bool(n)

    def pause(self, reason: str, probe_s: float) -> bool:
        """Pause the service (bad credentials); True when it was not paused yet. The next
        probe is allowed after ``probe_s``."""
        s = self.service
        pipe = self.r.pipeline(transaction=True)
        pipe.hsetnx(c.pause_key(s), "since", f"{time.time():.3f}")
        pipe.hset(c.pause_key(s), "reason", reason)
        pipe.set(c.pause_probe_key(s), "1", px=int(probe_s * 1000))
        first, _, _ = pipe.execute()
        return bool(first)

    def release_probe(self) -> None:
        """A probe attempt sent nothing (every run filtered): another may probe."""
        s = self.service
        self.r.delete(c.gate_probe_key(s), c.pause_probe_key(s))

    def paused(self) -> dict[str, str]:
        return {
            k.decode(): v.decode()
            for k, v in cast(dict[bytes, bytes], self.r.hgetall(c.pause_key(self.service))).items()
        }

    def probe_now(self) -> bool:
        """A worker started: if the service is paused, the next attempt probes at once (the
        operator fixed the key and restarted): clear the probe interval and make the
        earliest batch due now. True when the service was paused."""
        s = self.service
        if not self.r.exists(c.pause_key(s)):
            return False
        self.r.delete(c.pause_probe_key(s))
        first = cast(list[bytes], self.r.zrange(self.due, 0, 0))
        if first:
            self.r.zadd(self.due, {first[0].decode(): time.time()}, xx=True)
        return True

    def wake(self, spread_s: float, limit: int = 100_000) -> int:
        """Parked batches become due now, spread over ``spread_s``; returns how many."""
        return int(
            self._wake(keys=[self.due, self.parked], args=[f"{time.time():.3f}", spread_s, limit])
        )

    def parked_count(self) -> int:
        return int(self.r.zcard(self.parked))

    # --- figures ---------------------------------------------------------------------------

    def in_flight(self) -> tuple[int, int]:
        """(batches, compressed bytes) stored by bridges and not yet finished."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hlen(self.inflight)
        pipe.get(self.inflight_bytes)
        count, size = pipe.execute()
        return int(count), int(size or 0)

    def in_flight_raw_bytes(self) -> int:
        """Raw (uncompressed event) bytes of the batches in flight."""
        return int(cast(bytes | None, self.r.get(self.inflight_raw_bytes)) or 0)

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

    def staged_among(self, batch_ids: Sequence[str]) -> set[str]:
        """Which of these batches are staged (their entries not yet acknowledged)."""
        if not batch_ids:
            return set()
        marks = cast(list[bytes | None], self.r.hmget(self.staged, list(batch_ids)))
        return {b for b, m in zip(batch_ids, marks, strict=True) if m is not None}

    def due_count(self) -> int:
        return int(self.r.zcard(self.due))
