"""One delivery attempt of one batch: begin, decode, filter, redact, deliver, account.

Every entry of a batch ends in exactly one of: delivered, filtered (or sampled out),
dead-lettered, or pending (a transient failure: only those are tried again, when
``delivery.retry`` says so). Entries already settled by an earlier attempt are remembered
in Redis (``batch-done``), so a retry re-sends only what is left and a crashed attempt
resumes where it stopped. The dead letters, counters and the batch's end (or its next due
time) are written in one transaction: a crash cannot leave a batch finished without its
dead letters, or dead-lettered twice.

Whether an attempt may send at all is decided at ``begin`` (``batches.state``): a
duplicate task does nothing; while the outage gate is closed or the service is paused for
bad credentials, the batch is parked instead.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import redis
from celery.exceptions import SoftTimeLimitExceeded
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from dispatch_celery import stats
from dispatch_celery.backend import Backend, DeliveryContext, DeliveryReport, Run
from dispatch_celery.batches.codec import Batch, Entry
from dispatch_celery.batches.state import BatchStore, Begun
from dispatch_celery.decode.events import decode_entry
from dispatch_celery.decode.filters import EventFilter
from dispatch_celery.decode.redact import Redactor
from dispatch_celery.delivery import gcpause
from dispatch_celery.delivery.deadletters import DeadLetters, NewDeadLetter
from dispatch_celery.delivery.ratelimit import RateLimiter, RateLimitWait
from dispatch_celery.delivery.retry import Decision, RetryPolicy, gave_up_reason
from dispatch_celery.errors import (
    CredentialsError,
    MalformedEventError,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from dispatch_celery.registry import create_backend
from dispatch_celery.settings import Settings
from dispatch_celery.stats import Counter

log = logging.getLogger("dispatch_celery.delivery.attempt")

# Redis restarts (SHUTDOWN, a failover) take seconds: a worker's commands are retried
# through them (~10 s in all) instead of failing the attempt. A command whose reply was
# lost may run twice; every write here is idempotent or guarded, except counters.
REDIS_RETRIES = 8


def worker_redis(url: str) -> redis.Redis:
    """The Redis client of a worker process: reconnects and retries through a restart."""
    return redis.Redis.from_url(
        url,
        health_check_interval=30,
        socket_connect_timeout=5,
        socket_timeout=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), REDIS_RETRIES),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


@dataclass
class Attempt:
    """What one attempt (or one task that found nothing to do) did."""

    service: str
    batch_id: str
    status: str = "run"  # see ``Begun.status``
    attempt: int = 0  # attempts begun on this batch, this one included
    events: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    filtered: int = 0
    pending: dict[str, str] = field(default_factory=dict)  # entry id -> reason
    retry_after: float | None = None
    gave_up: bool = False
    due: float | None = None  # when the batch comes back (pending or parked)

    @property
    def outcome(self) -> str:
        if self.status in {"gone", "stale", "busy", "gated", "paused"}:
            return self.status
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
    limiter: RateLimiter
    store: BatchStore
    dlq: DeadLetters


@dataclass
class Plan:
    """A batch's entries turned into runs (and what settled without sending)."""

    runs: list[Run] = field(default_factory=list)
    by_run: dict[str, list[Entry]] = field(default_factory=dict)  # run id -> entries
    dead: list[NewDeadLetter] = field(default_factory=list)
    settled: list[str] = field(default_factory=list)  # entry ids settled by this attempt
    counts: dict[Counter, int] = field(default_factory=dict)
    delivered: list[Run] = field(default_factory=list)

    def count(self, name: Counter, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def entries(self, run_ids: Iterable[str]) -> list[Entry]:
        return [e for run_id in run_ids for e in self.by_run.get(run_id, ())]

    @property
    def size(self) -> int:
        return sum(len(es) for es in self.by_run.values()) + len(self.settled)


class _Limits:
    """The rate limiter as the backend sees it, noting whether the attempt was held back
    by our own limit or a vendor's 429 (then a failure is not an outage)."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter
        self.limited = False

    def acquire(self, cost: int = 1) -> None:
        try:
            self.limiter.acquire(cost)
        except RateLimitWait:
            self.limited = True
            raise

    def slow_down(self, seconds: float) -> None:
        self.limited = True
        self.limiter.slow_down(seconds)


@dataclass
class Sent:
    """What the backend call came to."""

    report: DeliveryReport
    limited: bool = False  # held back by a rate limit or a 429
    credentials: str | None = None  # the receiver refused our credentials: why
    verbatim: bool = False  # rejections are the core's own reasons (give up, crash guard)


class Deliverer:
    """Runs delivery attempts; holds one runtime per service (created lazily per process,
    so prefork children each get their own connections after the fork)."""

    def __init__(self, settings: Settings, client_factory: Callable[[], redis.Redis] | None = None):
        self.settings = settings
        self.policy = RetryPolicy.from_settings(settings)
        self._client_factory = client_factory or (lambda: worker_redis(settings.redis_url))
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

    def store(self, service: str) -> BatchStore:
        """The service's batch state, without building its backend."""
        rt = self._runtimes.get(service) if self._pid == os.getpid() else None
        return rt.store if rt is not None else BatchStore(self.client, service)

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
                dlq=DeadLetters(client, service, max_len=s.deadletter_max_len),
            )
            self._runtimes[service] = rt
        return rt

    def close(self) -> None:
        for rt in self._runtimes.values():
            rt.backend.close()
        self._runtimes = {}

    # --- one attempt -----------------------------------------------------------------------

    def run(self, service: str, batch_id: str, token: str | None = None) -> Attempt:
        """One attempt at the batch (the garbage collector paused meanwhile: ``gcpause``)."""
        with gcpause.paused():
            return self._run(service, batch_id, token)

    def _run(self, service: str, batch_id: str, token: str | None) -> Attempt:
        rt = self.runtime(service)
        begun = rt.store.begin(batch_id, token, self.policy.lease, self.policy.probe_interval)
        result = Attempt(service, batch_id, begun.status, begun.state.total)
        if begun.status in {"gone", "stale", "busy"}:
            return result  # another copy finished, superseded or runs it: nothing to do
        if begun.batch is None:  # gated or paused: send nothing
            return self._park(rt, batch_id, begun, result)
        plan = self._plan(rt, begun.batch, begun.done)
        result.events = plan.size
        crashed_out = self.policy.crashed_out(begun.state)
        if crashed_out is not None:
            log.error("%s batch %s: %s", service, batch_id, crashed_out)
            report = DeliveryReport(rejected={r.id: crashed_out for r in plan.runs})
            sent = Sent(report, verbatim=True)
        elif plan.runs:
            sent = self._deliver(rt, plan.runs, batch_id, begun)
        else:
            sent = Sent(DeliveryReport())
        decision = self._settle(rt, begun, plan, sent, result)
        self._commit(rt, batch_id, begun.batch, plan, result, decision)
        self._signal(rt, batch_id, begun, plan, sent)
        return result

    def abandon(self, service: str, batch_id: str) -> None:
        """An attempt raised past its handler: the batch comes back after backoff, and the
        next begin counts the attempt as a crash (the crash guard bounds such loops)."""
        store = self.store(service)
        crashes = int(store.r.hget(store.state_key(batch_id), "crashes") or 0)
        store.abandon(batch_id, time.time() + self.policy.backoff(crashes + 1))

    def _park(self, rt: ServiceRuntime, batch_id: str, begun: Begun, result: Attempt) -> Attempt:
        """The outage gate is closed or the service paused: send nothing, come back later,
        or give up when the budget ran out while the gate stayed closed."""
        now = time.time()
        if begun.status == "paused":
            decision = self.policy.paused(begun.state, now, prober=False)
        else:
            until = float(begun.info.get("until") or now)
            delay = float(begun.info.get("delay") or self.policy.base)
            wake_at = until if until > now else now + delay  # lost the probe: await it
            reason = begun.info.get("reason") or "the service is failing"
            spread = self.policy.gate_spread(delay)
            decision = self.policy.parked(begun.state, now, wake_at, spread, reason)
        if decision.give_up:
            return self._give_up_parked(rt, batch_id, begun, decision, result)
        pipe = rt.store.r.pipeline(transaction=True)
        rt.store.reschedule(
            batch_id, decision.due, pipe, state=_clock(decision), ended=False, park=True
        )
        stats.queue_add(pipe, rt.store.service, {Counter.GATED: 1})
        pipe.execute()
        result.due = decision.due
        return result

    def _give_up_parked(
        self, rt: ServiceRuntime, batch_id: str, begun: Begun, decision: Decision, result: Attempt
    ) -> Attempt:
        batch, done = rt.store.load_one(batch_id)
        result.status = "run"
        if batch is None:  # finished meanwhile (cannot happen while we hold the lease)
            result.status = "gone"
            return result
        plan = self._plan(rt, batch, done)
        result.events = plan.size
        log.warning("%s batch %s: %s", rt.store.service, batch_id, decision.reason)
        sent = Sent(
            DeliveryReport(rejected={r.id: decision.reason for r in plan.runs}), verbatim=True
        )
        self._settle(rt, begun, plan, sent, result)
        result.gave_up = True
        self._commit(rt, batch_id, batch, plan, result, None)
        return result

    def _plan(self, rt: ServiceRuntime, batch: Batch, done: set[str]) -> Plan:
        """Decode, filter and redact what is left of the batch into runs."""
        plan = Plan()
        for entry in batch.entries:
            if entry.entry_id in done:
                continue
            run = self._prepare(rt, batch, entry, plan)
            if run is None:
                plan.settled.append(entry.entry_id)
            elif run.id in plan.by_run:  # the same run twice in one batch: send it once
                plan.by_run[run.id].append(entry)
            else:
                plan.runs.append(run)
                plan.by_run[run.id] = [entry]
        return plan

    def _settle(
        self, rt: ServiceRuntime, begun: Begun, plan: Plan, sent: Sent, result: Attempt
    ) -> Decision | None:
        """Sort the report into delivered, dead letters and pending runs; ask the policy
        when the pending ones come back, or whether to give them up (then dead-lettered).
        Returns the decision for a batch with runs pending, else None."""
        report = sent.report
        prefix = "" if sent.verbatim else f"rejected by {rt.store.service}: "
        for run_id, reason in report.rejected.items():
            for entry in plan.by_run.get(run_id, ()):  # ids the backend made up are ignored
                plan.dead.append(self._dead(rt, entry, prefix + reason, run_id))
        for run_id, reason in report.deferred.items():
            for entry in plan.by_run.get(run_id, ()):
                result.pending[entry.entry_id] = reason
        unsent = report.rejected.keys() | report.deferred.keys()
        plan.delivered = [r for r in plan.runs if r.id not in unsent]
        delivered = plan.entries(r.id for r in plan.delivered)
        plan.count(Counter.DELIVERED, len(delivered))
        plan.settled += [e.entry_id for e in delivered + plan.entries(report.rejected)]
        result.delivered = len(delivered)
        result.retry_after = report.retry_after
        if not result.pending:
            return None
        now = time.time()
        if sent.credentials is not None:  # paused: the clock stops, nothing dead-letters
            decision = self.policy.paused(begun.state, now, prober=True)
        else:
            first = next(iter(result.pending.values()))
            progressed = bool(plan.settled)
            decision = self.policy.after_failure(
                begun.state, now, first, report.retry_after, progressed=progressed
            )
        if not decision.give_up:
            result.due = decision.due
            return decision
        log.warning("%s batch %s: %s", rt.store.service, result.batch_id, decision.reason)
        by_id = {e.entry_id: (e, run_id) for run_id, es in plan.by_run.items() for e in es}
        for entry_id, reason in result.pending.items():
            entry, run_id = by_id[entry_id]
            why = gave_up_reason(decision.spent, reason)
            plan.dead.append(self._dead(rt, entry, why, run_id))
        result.pending = {}
        result.gave_up = True
        return None

    def _commit(
        self,
        rt: ServiceRuntime,
        batch_id: str,
        batch: Batch,
        plan: Plan,
        result: Attempt,
        decision: Decision | None,
    ) -> None:
        """Dead letters, counters, and the batch's end or next due time: one transaction."""
        store = rt.store
        pipe = store.r.pipeline(transaction=True)
        dlq_at = rt.dlq.add(
            plan.dead, stream=batch.stream, batch_id=batch_id, attempts=result.attempt, pipe=pipe
        )
        plan.count(Counter.DEAD_LETTERED, len(plan.dead))
        plan.count(Counter.RETRIES if decision is not None else Counter.BATCHES)
        now = time.time()
        latencies = [
            now - int(r.record["stream_id"].partition("-")[0]) / 1000 for r in plan.delivered
        ]
        stats.queue_add(pipe, store.service, plan.counts, latencies)
        result.dead_lettered = len(plan.dead)
        result.filtered = plan.counts.get(Counter.FILTERED, 0) + plan.counts.get(
            Counter.SAMPLED_OUT, 0
        )
        if decision is not None:
            store.mark_done(batch_id, plan.settled, pipe)
            reset = ("attempts",) if plan.settled else ()
            store.reschedule(batch_id, decision.due, pipe, state=_clock(decision), reset=reset)
            results = pipe.execute()
            if dlq_at is not None:  # the dead-letter bound dropped old ones: logged
                rt.dlq.trimmed(results[dlq_at])
            return
        store.finish(batch_id, batch, pipe)
        results = pipe.execute()
        if dlq_at is not None:  # the dead-letter bound dropped old ones: logged
            rt.dlq.trimmed(results[dlq_at])
        _, xack_error = results[-1]
        if xack_error:
            log.error(
                "%s batch %s finished, but its stream entries could not be acknowledged "
                "(%s); counted as xack_failed",
                store.service,
                batch_id,
                xack_error.decode() if isinstance(xack_error, bytes) else xack_error,
            )

    def _signal(
        self, rt: ServiceRuntime, batch_id: str, begun: Begun, plan: Plan, sent: Sent
    ) -> None:
        """What the attempt tells about the service: paused (credentials), failing (close
        the outage gate), or working again (open it and wake the parked batches)."""
        store, policy = rt.store, self.policy
        service = store.service
        report = sent.report
        if sent.credentials is not None:
            store.pause(sent.credentials, policy.probe_interval)
            log.error(
                "%s is paused: %s. Nothing is dead-lettered; batches wait in flight and one "
                "attempt probes every %gs",
                service,
                sent.credentials,
                policy.probe_interval,
            )
            return
        answered = bool(plan.delivered) or (bool(report.rejected) and not sent.verbatim)
        if answered:
            if begun.probe and store.open_gate():
                woken = store.wake(policy.wake_spread(store.parked_count()))
                log.warning(
                    "%s answers again (probe succeeded): delivery resumes, %d parked batches woken",
                    service,
                    woken,
                )
            return
        outage = bool(plan.runs) and not sent.limited and len(report.deferred) == len(plan.runs)
        if outage and not sent.verbatim:
            previous = float(store.gate().get("delay") or 0)
            delay = policy.gate_delay(previous, report.retry_after)
            reason = next(iter(report.deferred.values()))
            until, closed = store.close_gate(delay, reason, force=begun.status == "probe")
            if closed:
                log.warning(
                    "%s is failing (every run of batch %s failed: %s): outage gate closed for "
                    "%.1fs; one probe at its end",
                    service,
                    batch_id,
                    reason,
                    until - time.time(),
                )
        elif begun.probe:  # nothing was sent: let another attempt probe
            store.release_probe()

    def _prepare(self, rt: ServiceRuntime, batch: Batch, entry: Entry, plan: Plan) -> Run | None:
        """The entry's Run, or None when it was filtered or dead-lettered."""
        try:
            event = decode_entry(batch.stream, entry.entry_id, entry.data)
        except MalformedEventError as exc:
            raw = entry.data if entry.data is not None else entry.other
            plan.dead.append(
                NewDeadLetter(
                    f"malformed event: {exc.reason}", rt.redactor.redact_raw(raw), entry.entry_id
                )
            )
            plan.count(Counter.MALFORMED)
            return None
        decision = rt.filter.decide(event)
        if decision != "deliver":
            plan.count(Counter.FILTERED if decision == "filtered" else Counter.SAMPLED_OUT)
            return None
        try:
            record, serialized = rt.redactor.record_of(
                event, max_body_bytes=self.settings.max_body_bytes
            )
        except Exception as exc:  # a bug must cost one event, never the batch
            log.exception("could not build the record of entry %s", entry.entry_id)
            plan.dead.append(
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
        # response headers), on first use; ``Run.raw`` is the redacted original entry;
        # ``Run.json`` the scan's serialization of the record (the file backend writes it).
        return Run(
            record,
            event,
            rt.redactor.redact_raw,
            redact_event=rt.redactor.redact_event,
            json=serialized,
        )

    def _dead(self, rt: ServiceRuntime, entry: Entry, reason: str, event_id: str) -> NewDeadLetter:
        raw = entry.data if entry.data is not None else entry.other
        return NewDeadLetter(
            rt.redactor.redact_text(reason), rt.redactor.redact_raw(raw), entry.entry_id, event_id
        )

    def _deliver(self, rt: ServiceRuntime, runs: list[Run], batch_id: str, begun: Begun) -> Sent:
        """Call the backend; translate what it raised into a report (the backend classifies,
        the core decides)."""
        limits = _Limits(rt.limiter)
        service = rt.store.service
        ctx = DeliveryContext(
            service=service,
            batch_id=batch_id,
            attempt=max(1, begun.state.total),
            acquire=limits.acquire,
            slow_down=limits.slow_down,
            probe=begun.probe,
        )
        redact = rt.redactor.redact_text
        retry_after: float | None = None
        reason: str
        try:
            report = rt.backend.deliver(runs, ctx)
        except CredentialsError as exc:
            why = self._credentials_reason(service, redact(str(exc)))
            return Sent(DeliveryReport(deferred={r.id: why for r in runs}), credentials=why)
        except TransientDeliveryError as exc:
            reason, retry_after = redact(str(exc)), exc.retry_after
        except PermanentDeliveryError as exc:
            log.error("%s refused batch %s for good: %s", service, batch_id, redact(str(exc)))
            return Sent(DeliveryReport(rejected={r.id: redact(str(exc)) for r in runs}))
        except SoftTimeLimitExceeded:
            reason = "attempt exceeded the task's soft time limit"
        except Exception as exc:  # a backend bug: retry, then dead-letter; never drop
            log.exception("backend %s failed unexpectedly", service)
            reason = f"unexpected {type(exc).__name__}: {redact(str(exc))}"
        else:
            refused = report.credentials_refused
            if refused is not None:
                refused = self._credentials_reason(service, redact(refused))
            return Sent(report, limits.limited, refused)
        deferred = {r.id: reason for r in runs}
        return Sent(DeliveryReport(deferred=deferred, retry_after=retry_after), limits.limited)

    def _credentials_reason(self, service: str, reason: str) -> str:
        """The pause reason must say which variable to fix."""
        if "DISPATCH_" in reason:
            return reason
        return f"{reason} (check {self.settings.option_name(service, 'API_KEY')})"


def _clock(decision: Decision) -> dict[str, str]:
    return {"spent": f"{decision.spent:.3f}", "last": f"{decision.last:.3f}"}
