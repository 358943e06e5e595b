"""Publishing deliver tasks: small messages ``(service, batch_id, events, token)`` on the
queue named after the service. The calls return only once the broker has accepted the
messages (Redis: the LPUSHes were executed; AMQP: publisher confirms), and raise
otherwise, so the caller may XACK after a return and must not after a raise.

Several tasks are published through kombu's ``Producer.batch()``: on the Redis transport
that is one pipelined round trip instead of one per task (measured: the bridge spent ~40%
of its time in per-task publishing); other transports publish one by one. A failed
pipeline raises ``BatchPublishError`` ("delivery is uncertain": some LPUSHes may have run);
the caller then does not XACK, and a task that did reach the queue in spite of the error is
harmless: the batch's ticket makes every copy but one do nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from celery import Celery

from dispatch_celery import constants as c


class Publisher(Protocol):
    """What a bridge needs from an enqueuer (``Enqueuer``; ``RecordingEnqueuer`` in tests
    and benchmarks)."""

    def connection_errors(self) -> tuple[type[BaseException], ...]: ...

    def publish_many(self, batches: Sequence[tuple[str, int, str]]) -> None: ...


class RecordingEnqueuer:
    """Test double: a broker that accepts every task and only records it
    ``(batch id, events, token)``."""

    def __init__(self) -> None:
        self.tasks: list[tuple[str, int, str]] = []

    def connection_errors(self) -> tuple[type[BaseException], ...]:
        return ()

    def publish_many(self, batches: Sequence[tuple[str, int, str]]) -> None:
        self.tasks.extend(batches)


class Enqueuer:
    def __init__(self, app: Celery, service: str) -> None:
        self.app = app
        self.service = service
        self.queue = c.queue_name(service)

    def connection_errors(self) -> tuple[type[BaseException], ...]:
        """The broker transport's connection and channel errors (e.g. amqp's), which a
        publisher waits out like kombu's OperationalError."""
        conn = self.app.connection_for_write()  # not connected: only asks the transport
        try:
            return tuple(conn.connection_errors) + tuple(conn.channel_errors)
        finally:
            conn.release()

    def publish(self, batch_id: str, events: int, token: str) -> None:
        self.publish_many([(batch_id, events, token)])

    def publish_many(self, batches: Sequence[tuple[str, int, str]]) -> None:
        """One task per (batch id, events, token); raises if the broker did not take them."""
        if not batches:
            return
        with self.app.producer_or_acquire() as producer, producer.batch():
            for batch_id, events, token in batches:
                args = (self.service, batch_id, events, token)
                self.app.send_task(
                    c.TASK_DELIVER,
                    args=args,
                    argsrepr=repr(args[:3]),
                    queue=self.queue,
                    routing_key=self.queue,
                    producer=producer,
                )
