"""The deliver task: ``deliver(service, batch_id, events, token)`` runs one attempt.

It only calls the attempt (``delivery.attempt``) and through it the retry policy
(``delivery.retry``); it decides nothing itself. Every run of the task ends with its
message acknowledged: the batch's next attempt, if any, is due in Redis (the due index of
``batches.state``) and a bridge re-publishes it then. There are no countdown retries in the
broker: under saturation they would outlive the visibility timeout and run twice.

* A duplicate or superseded copy (``gone`` / ``stale`` / ``busy``) does nothing.
* An exception escaping the attempt (a bug, a Redis outage longer than the client's
  retries) is handled by ``on_failure``: the batch comes back after backoff and the next
  begin counts the attempt as a crash (``DISPATCH_MAX_CRASHES`` bounds such loops). When
  even that cannot be written, the due index re-publishes the batch when its lease ends.
* ``events`` is informational (Flower shows it); ``token`` is the batch's ticket (tasks of
  an earlier version carry none and still run).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery, Task

from dispatch_celery import constants as c
from dispatch_celery.delivery.attempt import Attempt, Deliverer
from dispatch_celery.errors import ConfigError
from dispatch_celery.settings import Settings

log = logging.getLogger("dispatch_celery.delivery.task")


class _SoftLimitGuard:
    """Soft time limits land only inside an attempt.

    The prefork pool's parent process times each job and signals the child (SIGUSR1) when
    its soft limit passes. While the parent's event loop is blocked (Celery's consumer
    reconnecting to a restarted Redis broker blocks it for as long as Redis is away), it
    cannot see that a job already finished; when the loop resumes, the stale timer fires
    into a child that is writing its result or waiting for the next job, the
    ``SoftTimeLimitExceeded`` escapes there, the result pipe is corrupted and the worker
    stops with "Unrecoverable error: UnpicklingError". Installed in each pool child at its
    first attempt (after billiard's own handler), this handler raises only while an attempt
    runs and ignores a late signal (the hard time limit still stops a hung child)."""

    def __init__(self) -> None:
        self.running = False
        self.installed_in = -1

    def install(self) -> None:
        import os

        sig = getattr(signal, "SIGUSR1", None)
        if sig is None or self.installed_in == os.getpid():
            return
        if threading.current_thread() is not threading.main_thread():
            return  # the threads pool has no per-task signals
        self.installed_in = os.getpid()
        previous = signal.getsignal(sig)
        if not callable(previous):
            return  # no soft time limits in this process

        def handler(signum: int, frame: Any) -> None:
            if self.running:
                previous(signum, frame)
            else:
                log.warning(
                    "ignored a soft time limit that arrived after its attempt ended (the "
                    "worker's main process was blocked, e.g. reconnecting to the broker)"
                )

        signal.signal(sig, handler)

    @contextmanager
    def attempt(self) -> Iterator[None]:
        self.install()
        self.running = True
        try:
            yield
        finally:
            self.running = False


def _log_attempt(result: Attempt, elapsed: float) -> str:
    summary = (
        f"delivered={result.delivered} dead_lettered={result.dead_lettered} "
        f"filtered={result.filtered} pending={len(result.pending)}"
    )
    level = logging.DEBUG if result.outcome in {"gone", "stale", "busy"} else logging.INFO
    log.log(
        level,
        "batch %s",
        result.outcome,
        extra={
            "service": result.service,
            "batch_id": result.batch_id,
            "events": result.events,
            "attempt": result.attempt,
            "outcome": result.outcome,
            "duration_ms": round(elapsed * 1000, 1),
            "delivered": result.delivered,
            "dead_lettered": result.dead_lettered,
            "filtered": result.filtered,
            "pending": len(result.pending),
            "due_in_s": None if result.due is None else round(result.due - time.time(), 1),
        },
    )
    return f"{result.outcome}: {summary}"


def _make_base(deliverer: Deliverer) -> type[Task]:  # type: ignore[type-arg]
    class DeliverTask(Task):  # type: ignore[type-arg]
        def on_failure(
            self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
        ) -> None:
            # Reached only when an attempt raised past its handler: bring the batch back
            # after backoff; the crash guard counts this attempt at the next begin.
            service, batch_id = args[0], args[1]
            try:
                deliverer.abandon(service, batch_id)
            except Exception as again:  # Redis is away: the due index re-publishes later
                log.error(
                    "batch %s/%s: attempt failed (%s) and could not be rescheduled (%s); "
                    "a bridge re-publishes it when its lease ends",
                    service,
                    batch_id,
                    type(exc).__name__,
                    type(again).__name__,
                )
                return
            log.error(
                "batch %s/%s: attempt failed (%s); rescheduled",
                service,
                batch_id,
                type(exc).__name__,
            )

    return DeliverTask


def register(app: Celery, settings: Settings) -> Deliverer:
    """Register ``dispatch.deliver`` on ``app``; returns the deliverer it runs."""
    deliverer = Deliverer(settings)
    guard = _SoftLimitGuard()

    @app.task(
        bind=True,
        base=_make_base(deliverer),
        name=c.TASK_DELIVER,
        acks_late=True,
        reject_on_worker_lost=True,
        max_retries=0,
        ignore_result=True,
        shared=False,
    )
    def deliver(
        self: Task,  # type: ignore[type-arg]
        service: str,
        batch_id: str,
        events: int = 0,
        token: str | None = None,
    ) -> str:
        """Deliver batch ``batch_id`` of ``service`` (one attempt)."""
        started = time.monotonic()
        try:
            with guard.attempt():
                result = deliverer.run(service, batch_id, token)
        except ConfigError as exc:
            # The backend cannot even be built (its settings changed under a running
            # worker): keep the batch, come back slowly, say what to fix.
            log.error("batch %s/%s waits: %s", service, batch_id, exc)
            deliverer.store(service).defer(batch_id, time.time() + settings.retry_max_delay)
            return "waiting: configuration error"
        return _log_attempt(result, time.monotonic() - started)

    return deliverer
