"""The deliver task and its retry / dead-letter policy.

Every exit of ``deliver`` delivers, schedules a retry, or dead-letters:

* attempts are counted in Redis (``BatchStore.begin``), across retries *and* worker
  crashes, so a batch that kills its worker cannot loop forever;
* a transient failure retries only the runs still pending, after
  ``backoff(attempt, retry_after)``: exponential with full jitter, at least the server's
  Retry-After, capped at ``retry_max_delay`` (below the broker visibility timeout, see
  ``Settings.validate``). ``self.retry(countdown=...)`` is used rather than
  ``autoretry_for`` because Retry-After must win over the computed backoff and the attempt
  count must survive crashes;
* after ``max_attempts`` the pending runs are dead-lettered with the last reason;
* an attempt killed by the hard time limit (or any exception escaping the body) is
  re-published by ``on_failure``; the next attempt counts it.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from celery import Celery, Task

from dispatch_celery import constants as c
from dispatch_celery.delivery.attempt import Deliverer
from dispatch_celery.errors import ConfigError
from dispatch_celery.settings import Settings

log = logging.getLogger("dispatch_celery.delivery.task")


def backoff(attempt: int, retry_after: float | None, settings: Settings) -> float:
    """Seconds to wait before attempt ``attempt + 1``."""
    ceiling = min(settings.retry_max_delay, settings.retry_base_delay * 2 ** (attempt - 1))
    delay = random.uniform(settings.retry_base_delay / 2, max(ceiling, settings.retry_base_delay))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, settings.retry_max_delay)


def register(app: Celery, settings: Settings) -> None:
    deliverer = Deliverer(settings)

    class DeliverTask(Task):  # type: ignore[type-arg]
        def on_failure(
            self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
        ) -> None:
            # Reached only when an attempt died without deciding (hard time limit, a bug):
            # put the batch back on its queue; the attempt counter decides when to give up.
            service, batch_id = args[0], args[1]
            events = args[2] if len(args) > 2 else 0
            log.error(
                "batch %s/%s: attempt failed (%s); re-queued",
                service,
                batch_id,
                type(exc).__name__,
            )
            app.send_task(
                c.TASK_DELIVER,
                args=(service, batch_id, events),
                queue=c.queue_name(service),
                countdown=settings.retry_base_delay,
            )

    @app.task(
        bind=True,
        base=DeliverTask,
        name=c.TASK_DELIVER,
        acks_late=True,
        reject_on_worker_lost=True,
        max_retries=None,
        ignore_result=True,
        shared=False,
    )
    def deliver(self: Task, service: str, batch_id: str, events: int = 0) -> str:  # type: ignore[type-arg]
        """Deliver batch ``batch_id`` of ``service`` (``events`` is informational)."""
        started = time.monotonic()
        try:
            result = deliverer.run(service, batch_id)
        except ConfigError as exc:
            # The backend cannot even be built (its settings changed under a running
            # worker): keep the batch, retry slowly, say what to fix.
            log.error("batch %s/%s waits: %s", service, batch_id, exc)
            raise self.retry(countdown=settings.retry_max_delay, max_retries=None) from None
        attempt = result.attempt
        elapsed = time.monotonic() - started
        summary = (
            f"delivered={result.delivered} dead_lettered={result.dead_lettered} "
            f"filtered={result.filtered} pending={len(result.pending)}"
        )
        log.info(
            "batch %s",
            result.outcome,
            extra={
                "service": service,
                "batch_id": batch_id,
                "events": result.events,
                "attempt": attempt,
                "outcome": result.outcome,
                "duration_ms": round(elapsed * 1000, 1),
                "delivered": result.delivered,
                "dead_lettered": result.dead_lettered,
                "filtered": result.filtered,
                "pending": len(result.pending),
            },
        )
        if result.pending:
            countdown = backoff(attempt, result.retry_after, settings)
            raise self.retry(countdown=countdown, max_retries=None)
        return summary
