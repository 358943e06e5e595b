"""RabbitMQ as the broker (``DISPATCH_BROKER_URL=amqp://...``) while the stream, batches and
counters stay in Redis: the bridge publishes with confirms, workers deliver, status reads
the queue depth from RabbitMQ."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import redis

from dispatch_celery import constants as c
from dispatch_celery import stats
from dispatch_celery.ops.status import queue_depth
from tests.conftest import need_server
from tests.harness import bridge, event, jsonl, make, wait_for, worker, xadd_all

# Shares the machine's RabbitMQ with the broker-outage scenario: the same xdist worker.
pytestmark = pytest.mark.xdist_group("faults")

AMQP_URL = os.environ.get("DISPATCH_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
STREAM = "llm-proxy-events"


def _rabbitmq_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


def test_rabbitmq_broker_end_to_end(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    if not _rabbitmq_up():
        need_server("RabbitMQ on 127.0.0.1:5672")
    settings, app, _ = make(
        redis_url, tmp_path, DISPATCH_BROKER_URL=AMQP_URL, DISPATCH_BATCH_SIZE="10"
    )
    assert app.conf.broker_transport_options == {"confirm_publish": True}
    with app.connection_for_write() as conn:  # a clean queue on the shared broker
        channel: Any = conn.default_channel  # the typed StdChannel lacks these
        channel.queue_declare(c.queue_name("file"), durable=True, auto_delete=False)
        channel.queue_purge(c.queue_name("file"))
    xadd_all(r, STREAM, [event(i) for i in range(45)])
    with bridge(settings, app, "file"):
        wait_for(lambda: queue_depth(app, "file") == 5, what="5 tasks waiting in RabbitMQ")
        with worker(app, "file"):
            wait_for(lambda: len(jsonl(tmp_path / "events.jsonl")) == 45, what="45 records")
            wait_for(lambda: r.hlen(c.inflight_key("file")) == 0, what="nothing in flight")
    assert queue_depth(app, "file") == 0
    assert stats.read(r, "file")["delivered"] == 45
    assert r.xpending(STREAM, "dispatch-file")["pending"] == 0
