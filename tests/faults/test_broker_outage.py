"""Fault 2: the RabbitMQ broker is unreachable for a while (30 s in the soak, 8 s here).

The pipeline talks to the machine's RabbitMQ (127.0.0.1:5672, guest/guest) through a local
TCP proxy that the test cuts (every connection closed, new ones refused) and restores, so
other users of RabbitMQ are not disturbed. The stream, batches and counters stay in Redis.
While the bridge cannot publish it must not acknowledge stream entries (an XACK without a
task on the broker would lose the entry): the group's acknowledged count stays put and the
backlog (lag + pending) grows; afterwards the bridge catches up and the worker reconnects.
"""

from __future__ import annotations

import secrets
import socket
import time
from typing import Any

import pytest

from dispatch_celery import constants as c
from dispatch_celery import stats
from tests.conftest import need_server
from tests.faults.kit import (
    STREAM,
    Figures,
    Lab,
    Producer,
    Stack,
    TcpProxy,
    account,
    dead_letters,
    file_counts,
    group_info,
    settle,
    wait_resumed,
)

# One xdist worker runs the fault scenarios one after another: they time real outages.
pytestmark = [pytest.mark.faults, pytest.mark.xdist_group("faults")]

RABBITMQ = ("127.0.0.1", 5672)
SETTLE_S = 2.0  # a publish in flight when the connection dropped may still be decided


def rabbitmq_up() -> bool:
    try:
        with socket.create_connection(RABBITMQ, timeout=1):
            return True
    except OSError:
        return False


def _acked(info: dict[str, Any]) -> int:
    """Entries the group has acknowledged: read (``entries-read``) minus pending."""
    read = info.get("entries-read")
    assert read is not None, "this Redis does not report entries-read (needs Redis >= 7)"
    return int(read) - int(info.get("pending", 0))


def _backlog(info: dict[str, Any]) -> int:
    return int(info.get("lag") or 0) + int(info.get("pending", 0))


def _delete_queue(name: str) -> None:
    from kombu import Connection

    with Connection(f"amqp://guest:guest@{RABBITMQ[0]}:{RABBITMQ[1]}//") as conn:
        channel: Any = conn.default_channel
        try:
            channel.queue_delete(name)
        except Exception:  # already gone, or never declared
            return


def scenario(lab: Lab, *, outage_s: float = 8.0, rate: float = 100.0) -> Figures:
    fig = lab.figures_for("broker-outage", outage_s)
    service = f"fault-rmq-{secrets.token_hex(3)}"  # a queue of its own on the shared broker
    var = service.upper().replace("-", "_")
    out = lab.tmp / f"{service}.jsonl"
    group = c.default_group(service)
    proxy = TcpProxy(RABBITMQ)
    proxy.start()
    env = lab.env(
        DISPATCH_BROKER_URL=f"amqp://guest:guest@127.0.0.1:{proxy.port}//",
        DISPATCH_BATCH_SIZE="20",
        **{
            f"DISPATCH_BACKEND_{var}": "dispatch_celery.backends.file:FileBackend",
            f"DISPATCH_{var}_PATH": str(out),
        },
    )
    stack = Stack(env, lab.tmp)
    producer = Producer(lab.redis_url, rate)
    r = lab.client()
    try:
        stack.bridge(service)
        stack.worker(service, concurrency=2)
        producer.start()
        stack.wait(lambda: len(file_counts(out)) >= 200, 30, "delivery under way")
        proxy.cut()
        cut_at = time.monotonic()
        time.sleep(SETTLE_S)
        before = group_info(r, STREAM, group)
        enqueued_before = stats.read(r, service)["enqueued_events"]
        published_before = len(producer.published())
        time.sleep(max(0.0, outage_s - (time.monotonic() - cut_at)))
        after = group_info(r, STREAM, group)
        published_during = len(producer.published()) - published_before
        stack.assert_running()  # no crash loop: the bridge and the worker wait
        assert _acked(after) == _acked(before), (
            f"the bridge acknowledged {_acked(after) - _acked(before)} stream entries while "
            "the broker was unreachable (an XACK without a task loses the entry)"
        )
        assert stats.read(r, service)["enqueued_events"] == enqueued_before
        grew = _backlog(after) - _backlog(before)
        assert grew >= published_during - 5, (
            f"the backlog (lag + pending) grew by {grew} while {published_during} arrived"
        )
        fig.extra["backlog_at_end_of_outage"] = _backlog(after)
        proxy.restore()
        fig.resume_s = wait_resumed(lambda: len(file_counts(out)), 60, stack)
        time.sleep(2)
        producer.stop()
        published = producer.published()
        settle(lambda: set(file_counts(out)) >= set(published), timeout=60, stack=stack)
        settle(lambda: r.hlen(c.inflight_key(service)) == 0, timeout=20, stack=stack)
        stack.assert_running()
        account(fig, published, file_counts(out), dead_letters(r, service))
        assert r.xpending(STREAM, group)["pending"] == 0
        fig.extra["proxy_connections"] = proxy.connections
    finally:
        producer.close()
        r.close()
        stack.close()
        proxy.close()
        if rabbitmq_up():
            _delete_queue(c.queue_name(service))
    return fig


def test_broker_outage_holds_entries_pending_and_catches_up(lab: Lab) -> None:
    if not rabbitmq_up():
        need_server("RabbitMQ on 127.0.0.1:5672")
    scenario(lab)
