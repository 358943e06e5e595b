"""RabbitMQ as the broker (``DISPATCH_BROKER_URL=amqp://...``) while the stream, batches and
counters stay in Redis: the bridge publishes with confirms, workers deliver, status reads
the queue depth from RabbitMQ."""

from __future__ import annotations

import os
import secrets
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
    # a queue of its own on the shared broker (another test run on this machine may be
    # using RabbitMQ at the same time): the file backend under a service name of its own
    service = f"rmq-{secrets.token_hex(3)}"
    var = service.upper().replace("-", "_")
    out = tmp_path / f"{service}.jsonl"
    settings, app, _ = make(
        redis_url, tmp_path, DISPATCH_BROKER_URL=AMQP_URL, DISPATCH_BATCH_SIZE="10",
        **{f"DISPATCH_BACKEND_{var}": "dispatch_celery.backends.file:FileBackend",
           f"DISPATCH_{var}_PATH": str(out)},
    )  # fmt: skip
    assert app.conf.broker_transport_options == {"confirm_publish": True}
    with app.connection_for_write() as conn:
        channel: Any = conn.default_channel  # the typed StdChannel lacks these
        channel.queue_declare(c.queue_name(service), durable=True, auto_delete=False)
        try:
            xadd_all(r, STREAM, [event(i) for i in range(45)])
            with bridge(settings, app, service):
                wait_for(lambda: queue_depth(app, service) == 5, what="5 tasks in RabbitMQ")
                with worker(app, service):
                    wait_for(lambda: len(jsonl(out)) == 45, what="45 records")
                    wait_for(lambda: r.hlen(c.inflight_key(service)) == 0, what="none in flight")
            assert queue_depth(app, service) == 0
        finally:
            channel.queue_delete(c.queue_name(service))
    assert stats.read(r, service)["delivered"] == 45
    assert r.xpending(STREAM, c.default_group(service))["pending"] == 0
