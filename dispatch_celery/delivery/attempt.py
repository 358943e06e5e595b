"""One delivery attempt of one batch: load, decode, filter, redact, deliver, account.

Every entry of a batch ends in exactly one of: delivered, filtered (or sampled out),
dead-lettered, or pending (a transient failure; the task retries only those). A batch is
given up (its pending runs dead-lettered) after ``max_attempts`` attempts in a row that
settled nothing; an attempt that made progress resets the count. Entries
already settled by an earlier attempt are remembered in Redis (``batch-done``), so a
retry re-sends only what is left and a crashed attempt resumes where it stopped.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from celery.exceptions import SoftTimeLimitExceeded

from dispatch_celery import stats
from dispatch_celery.backend import Backend, DeliveryContext, DeliveryReport, Run
from dispatch_celery.batches.codec import Batch, Entry
from dispatch_celery.batches.state import BatchStore
from dispatch_celery.decode.events import decode_entry
from dispatch_celery.decode.filters import EventFilter
from dispatch_celery.decode.records import build_record
from dispatch_celery.decode.redact import Redactor
from dispatch_celery.delivery.deadletters import DeadLetters, NewDeadLetter
from dispatch_celery.delivery.ratelimit import RateLimiter
from dispatch_celery.errors import (
    MalformedEventError,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from dispatch_celery.registry import create_backend
from dispatch_celery.settings import Settings
from dispatch_celery.stats import Counter

log = logging.getLogger("dispatch_celery.delivery.attempt")


@dataclass
class Attempt:
    """What one attempt did; ``pending`` non-empty means: retry those."""

    service: str
    batch_id: str
    attempt: int
    found: bool = True
    events: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    filtered: int = 0
    pending: dict[str, str] = field(default_factory=dict)  # entry id -> reason
    retry_after: float | None = None
    gave_up: bool = False

    @property
    def outcome(self) -> str:
        if not self.found:
            return "gone"
        if self.pending:
            return "retry"
        if self.dead_lettered and not self.delivered:
            return "dead-lettered"
        if self.dead_lettered:
            return "partial"
        return "delivered"


@dataclass
class ServiceRuntime:
    """Per-process, per-service state: the backend and its pipeline pieces."""

    backend: Backend
    redactor: Redactor
    filter: EventFilter
    limiter: RateLimiter | None
    store: BatchStore
    dlq: DeadLetters


class Deliverer:
    """Runs delivery attempts; holds one runtime per service (created lazily per process,
    so prefork children each get their own connections after the fork)."""

    def __init__(self, settings: Settings, client_factory: Callable[[], redis.Redis] | None = None):
        self.settings = settings
        self._client_factory = client_factory or (
            lambda: redis.Redis.from_url(settings.redis_url, health_check_interval=30)
        )
        self._pid = -1
        self._client: redis.Redis | None = None
        self._runtimes: dict[str, ServiceRuntime] = {}

    @property
    def client(self) -> redis.Redis:
        if self._pid != os.getpid() or self._client is None:
            self._pid = os.getpid()
            self._client = self._client_factory()
            self._runtimes = {}
        return self._client

    def runtime(self, service: str) -> ServiceRuntime:
        client = self.client
        rt = self._runtimes.get(service)
        if rt is None:
            s = self.settings
            rt = ServiceRuntime(
                backend=create_backend(service, s),
                redactor=Redactor.from_settings(service, s),
                filter=EventFilter.from_settings(service, s),
                limiter=RateLimiter.from_settings(client, service, s),
                store=BatchStore(client, service),
                dlq=DeadLetters(client, service),
            )
            self._runtimes[service] = rt
        return rt

    def close(self) -> None:
        for rt in self._runtimes.values():
            rt.backend.close()
        self._runtimes = {}

    def run(self, service: str, batch_id: str) -> Attempt:
        rt = self.runtime(service)
        attempt, batch, done = rt.store.begin(batch_id)
        result = Attempt(service, batch_id, attempt)
        if batch is None:  # finished by an earlier copy of this task
            result.found = False
            return result
        todo = [e for e in batch.entries if e.entry_id not in done]
        result.events = len(todo)

        settled: list[str] = []
        dead: list[NewDeadLetter] = []
        runs: list[Run] = []
        by_run: dict[str, list[Entry]] = {}  # run id -> entries (a duplicated RequestID)
        counts: dict[Counter, int] = {}
        for entry in todo:
            run = self._prepare(rt, batch, entry, dead, counts)
            if run is None:
                settled.append(entry.entry_id)
            elif run.id in by_run:  # the same run twice in one batch: send it once
                by_run[run.id].append(entry)
            else:
                runs.append(run)
                by_run[run.id] = [entry]

        report = DeliveryReport()
        if runs:
            report = self._deliver(rt, runs, batch_id, attempt)
        delivered = [r for r in runs if r.id not in report.rejected and r.id not in report.deferred]
        for run_id, reason in report.rejected.items():
            for entry in by_run.get(run_id, ()):  # ids the backend made up are ignored
                dead.append(self._dead(rt, entry, f"rejected by {service}: {reason}", run_id))
        for run_id, reason in report.deferred.items():
            for entry in by_run.get(run_id, ()):
                result.pending[entry.entry_id] = reason
        result.retry_after = report.retry_after

        if result.pending and attempt >= self.settings.max_attempts:
            by_id = {e.entry_id: (e, run_id) for run_id, es in by_run.items() for e in es}
            for entry_id, reason in result.pending.items():
                entry, run_id = by_id[entry_id]
                why = f"gave up after {attempt} attempts without progress: {reason}"
                dead.append(self._dead(rt, entry, why, run_id))
            result.pending = {}
            result.gave_up = True

        # Dead letters, counters and the batch's end are written in one transaction: a crash
        # cannot leave a batch finished without its dead letters, or dead-lettered twice.
        pipe = rt.store.r.pipeline(transaction=True)
        rt.dlq.add(dead, stream=batch.stream, batch_id=batch_id, attempts=attempt, pipe=pipe)
        now = time.time()
        counts[Counter.DELIVERED] = sum(len(by_run[r.id]) for r in delivered)
        counts[Counter.DEAD_LETTERED] = counts.get(Counter.DEAD_LETTERED, 0) + len(dead)
        if result.pending:
            counts[Counter.RETRIES] = 1
        else:
            counts[Counter.BATCHES] = 1
        latencies = [now - int(r.event.stream_id.split("-", 1)[0]) / 1000 for r in delivered]
        stats.queue_add(pipe, service, counts, latencies)
        result.delivered = counts[Counter.DELIVERED]
        result.dead_lettered = len(dead)
        result.filtered = counts.get(Counter.FILTERED, 0) + counts.get(Counter.SAMPLED_OUT, 0)

        if result.pending:
            for run_id in [r.id for r in delivered] + list(report.rejected):
                settled += [e.entry_id for e in by_run.get(run_id, ())]
            rt.store.mark_done(batch_id, settled, pipe)
            if settled:  # progress (e.g. a slow rate limit): attempts count without progress
                rt.store.reset_attempts(batch_id, pipe)
        else:
            rt.store.finish(batch_id, batch, pipe)
        pipe.execute()
        return result

    def _prepare(
        self,
        rt: ServiceRuntime,
        batch: Batch,
        entry: Entry,
        dead: list[NewDeadLetter],
        counts: dict[Counter, int],
    ) -> Run | None:
        """The entry's Run, or None when it was filtered or dead-lettered."""
        try:
            event = decode_entry(batch.stream, entry.entry_id, entry.data)
        except MalformedEventError as exc:
            raw = entry.data if entry.data is not None else entry.other
            dead.append(
                NewDeadLetter(
                    f"malformed event: {exc.reason}", rt.redactor.redact_raw(raw), entry.entry_id
                )
            )
            counts[Counter.MALFORMED] = counts.get(Counter.MALFORMED, 0) + 1
            return None
        decision = rt.filter.decide(event)
        if decision != "deliver":
            name = Counter.FILTERED if decision == "filtered" else Counter.SAMPLED_OUT
            counts[name] = counts.get(name, 0) + 1
            return None
        try:
            record = rt.redactor.redact_record(
                build_record(event, max_body_bytes=self.settings.max_body_bytes)
            )
        except Exception as exc:  # a bug must cost one event, never the batch
            log.exception("could not build the record of entry %s", entry.entry_id)
            dead.append(
                NewDeadLetter(
                    "could not build record: "
                    f"{type(exc).__name__}: {rt.redactor.redact_text(str(exc))}",
                    rt.redactor.redact_raw(event.raw),
                    entry.entry_id,
                    event.event_id,
                )
            )
            return None
        # The event a backend sees has its sensitive headers redacted too (Helicone forwards
        # response headers); ``Run.raw`` is the redacted original entry.
        return Run(record, rt.redactor.redact_event(event), rt.redactor.redact_raw)

    def _dead(self, rt: ServiceRuntime, entry: Entry, reason: str, event_id: str) -> NewDeadLetter:
        raw = entry.data if entry.data is not None else entry.other
        return NewDeadLetter(
            rt.redactor.redact_text(reason), rt.redactor.redact_raw(raw), entry.entry_id, event_id
        )

    def _deliver(
        self, rt: ServiceRuntime, runs: list[Run], batch_id: str, attempt: int
    ) -> DeliveryReport:
        limiter = rt.limiter
        ctx_kwargs: dict[str, Any] = {}
        if limiter is not None:
            ctx_kwargs = {"acquire": limiter.acquire, "slow_down": limiter.slow_down}
        ctx = DeliveryContext(
            service=rt.store.service,
            batch_id=batch_id,
            attempt=attempt,
            max_attempts=self.settings.max_attempts,
            **ctx_kwargs,
        )
        redact = rt.redactor.redact_text
        try:
            return rt.backend.deliver(runs, ctx)
        except TransientDeliveryError as exc:
            reason, retry_after = redact(str(exc)), exc.retry_after
        except PermanentDeliveryError as exc:
            log.error(
                "%s refused batch %s for good: %s", rt.store.service, batch_id, redact(str(exc))
            )
            return DeliveryReport(rejected={r.id: redact(str(exc)) for r in runs})
        except SoftTimeLimitExceeded:
            reason, retry_after = "attempt exceeded the task's soft time limit", None
        except Exception as exc:  # a backend bug: retry, then dead-letter; never drop
            log.exception("backend %s failed unexpectedly", rt.store.service)
            reason, retry_after = f"unexpected {type(exc).__name__}: {redact(str(exc))}", None
        return DeliveryReport(deferred={r.id: reason for r in runs}, retry_after=retry_after)
