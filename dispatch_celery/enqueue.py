"""Publishing deliver tasks: small messages ``(service, batch_id, events)`` on the queue
named after the service. The call returns only once the broker has accepted the message
(Redis: the LPUSH returned; AMQP: publisher confirms), so the caller may then XACK."""

from __future__ import annotations

from celery import Celery

from dispatch_celery import constants as c


class Enqueuer:
    def __init__(self, app: Celery, service: str) -> None:
        self.app = app
        self.service = service
        self.queue = c.queue_name(service)

    def publish(self, batch_id: str, events: int) -> None:
        self.app.send_task(
            c.TASK_DELIVER,
            args=(self.service, batch_id, events),
            queue=self.queue,
            routing_key=self.queue,
            retry=True,
            retry_policy={"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5},
        )
