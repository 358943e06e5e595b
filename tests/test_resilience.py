"""Bridges and workers ride out Redis restarts and broker outages (issue 8).

A private redis-server with AOF (``appendfsync everysec``) is shut down and started again on
the same port; the pipeline's processes must not exit, must not busy-loop, and must deliver
everything afterwards. Fast versions; tests/faults/ has the longer scenarios with figures.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from dispatch_celery import constants as c
from tests.faults.kit import PrivateRedis, private_redis  # noqa: F401 (the fixture)
from tests.harness import (
    bridge,
    event,
    jsonl,
    make,
    pipeline_env,
    spawn_worker,
    stop_proc,
    wait_for,
    xadd_all,
)

STREAM = "llm-proxy-events"


def delivered(path: Path) -> list[str]:
    return [rec["stream_id"] for rec in jsonl(path)]


def test_the_bridge_survives_a_redis_restart_and_delivers_everything(
    private: PrivateRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings, app, env = make(private.url, tmp_path)
    r = private.client()
    first = xadd_all(r, STREAM, [event(i) for i in range(50)])
    w = spawn_worker(env, "file", tmp_path / "worker.log")
    try:
        with caplog.at_level(logging.WARNING, "dispatch_celery.ingest.bridge"):
            with bridge(settings, app, "file") as b:
                wait_for(lambda: len(delivered(tmp_path / "events.jsonl")) == 50, what="first 50")
                private.shutdown()
                time.sleep(5)
                private.start()
                r = private.client()
                second = xadd_all(r, STREAM, [event(i) for i in range(50, 100)])
                wait_for(
                    lambda: set(delivered(tmp_path / "events.jsonl")) >= set(first + second),
                    timeout=40,
                    what="every event after the restart",
                )
                assert b.read_total >= 100
            assert w.poll() is None, "the worker exited"
    finally:
        stop_proc(w)
    waits = [m for m in caplog.messages if "unavailable" in m or "still waiting" in m]
    assert 1 <= len(waits) <= 3, waits  # a clear line, not a busy loop
    assert any("answer again" in m for m in caplog.messages)
    assert r.xpending(STREAM, "dispatch-file")["pending"] == 0
    ids = delivered(tmp_path / "events.jsonl")
    assert len(ids) - len(set(ids)) <= 20  # at most a batch or so twice


def test_a_broker_outage_leaves_entries_pending_and_loses_nothing(
    private: PrivateRedis, redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    """The broker (here a Redis of its own) is away for 4 s while events arrive: the bridge
    cannot publish, so it does not XACK; the entries stay pending and go out afterwards."""
    settings, app, env = make(redis_url, tmp_path, DISPATCH_BROKER_URL=private.url)
    w = spawn_worker(env, "file", tmp_path / "worker.log")
    try:
        with bridge(settings, app, "file") as b:
            first = xadd_all(r, STREAM, [event(i) for i in range(30)])
            wait_for(lambda: len(delivered(tmp_path / "events.jsonl")) == 30, what="first 30")
            private.shutdown()
            second = xadd_all(r, STREAM, [event(i) for i in range(30, 90)])
            wait_for(lambda: b.read_total >= 90, what="read while the broker is away")
            time.sleep(3)
            # nothing acknowledged without a task on the broker: all of it is still pending
            # or staged for a re-publish
            pending = r.xpending(STREAM, "dispatch-file")["pending"]
            assert pending == 60, pending
            assert len(delivered(tmp_path / "events.jsonl")) == 30
            private.start()
            wait_for(
                lambda: set(delivered(tmp_path / "events.jsonl")) >= set(first + second),
                timeout=40,
                what="every event after the broker came back",
            )
            wait_for(lambda: r.hlen(c.inflight_key("file")) == 0, what="nothing in flight")
        assert w.poll() is None, "the worker exited"
    finally:
        stop_proc(w)
    assert r.xpending(STREAM, "dispatch-file")["pending"] == 0
    ids = delivered(tmp_path / "events.jsonl")
    assert len(ids) - len(set(ids)) <= 20


def test_a_worker_survives_a_redis_restart_in_the_middle_of_an_attempt(
    private: PrivateRedis, tmp_path: Path
) -> None:
    """The worker (prefork, as in production) is delivering a batch when Redis (its broker
    and the batch store) goes away for 5 s. The attempt rides it out (its Redis commands
    are retried) and ends while the worker's main process is still blocked reconnecting;
    the soft time limit (3 s here) may pass meanwhile, and its stale timer fire once the
    main loop resumes (see the next test). The worker must not exit (it used to:
    "Unrecoverable error: UnpicklingError"), and every event is delivered, later ones by the
    same worker."""
    env = pipeline_env(private.url, tmp_path, DISPATCH_BATCH_SIZE="10")
    settings, app, _ = make(private.url, tmp_path, DISPATCH_BATCH_SIZE="10")
    r = private.client()
    r.hset("test:flaky:flaky", "sleep", 1)
    ids = xadd_all(r, STREAM, [event(i) for i in range(10)])
    w = spawn_worker(env, "flaky", tmp_path / "worker.log", concurrency=1)
    try:
        with bridge(settings, app, "flaky"):
            wait_for(lambda: r.llen("test:flaky:flaky:calls") >= 1, what="the attempt began")
            private.shutdown()
            time.sleep(5)
            private.start()
            r = private.client()
            wait_for(
                lambda: set(delivered(tmp_path / "flaky.jsonl")) >= set(ids),
                timeout=40,
                what="the batch delivered",
            )
            r.hset("test:flaky:flaky", "sleep", 0)
            more = xadd_all(r, STREAM, [event(i) for i in range(10, 30)])
            wait_for(
                lambda: set(delivered(tmp_path / "flaky.jsonl")) >= set(ids + more),
                timeout=30,
                what="later events delivered by the same worker",
            )
            wait_for(lambda: r.hlen(c.inflight_key("flaky")) == 0, what="nothing in flight")
            log = (tmp_path / "worker.log").read_text()
            assert w.poll() is None, log[-3000:]
        assert "Unrecoverable error" not in log
        assert "Pool process" not in log  # no pool child killed by a stale timer either
    finally:
        stop_proc(w)


def test_a_soft_time_limit_arriving_after_its_attempt_is_ignored() -> None:
    """The prefork parent signals a soft time limit (SIGUSR1) by its own clock; when its
    event loop was blocked (reconnecting to the broker) the signal can reach a child whose
    attempt already ended, and billiard's handler then raised in the child's job loop: the
    child died or corrupted the result pipe ("Unrecoverable error: UnpicklingError"). The
    guard raises only inside an attempt."""
    import os
    import signal

    from celery.exceptions import SoftTimeLimitExceeded

    from dispatch_celery.delivery.task import _SoftLimitGuard

    def billiards(signum: int, frame: Any) -> None:  # what billiard installs in a child
        raise SoftTimeLimitExceeded()

    previous = signal.signal(signal.SIGUSR1, billiards)
    try:
        guard = _SoftLimitGuard()
        with guard.attempt():
            pass  # the first attempt installs the guard
        os.kill(os.getpid(), signal.SIGUSR1)  # late: between attempts
        time.sleep(0.05)  # nothing raised

        def attempt() -> None:
            with guard.attempt():
                os.kill(os.getpid(), signal.SIGUSR1)  # in time: the attempt is interrupted
                time.sleep(1)

        with pytest.raises(SoftTimeLimitExceeded):
            attempt()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_closing_a_channel_whose_connection_is_gone_is_not_fatal(redis_url: str) -> None:
    """kombu's Redis transport restores unacknowledged messages when a channel closes; after
    the broker connection was lost, its transport's client may already be None, and the
    restore raised AttributeError ('NoneType' object has no attribute 'hostname'), which
    Celery treats as unrecoverable: the worker exited (issue 8). With the patch of
    ``delivery.broker`` the channel uses its last good connection parameters."""
    from kombu import Connection, Exchange, Producer, Queue

    from dispatch_celery.delivery.broker import patch_kombu_redis

    patch_kombu_redis()
    conn = Connection(redis_url)
    channel: Any = conn.channel()
    queue = Queue("resilience-test", Exchange("resilience-test"), "resilience-test")
    queue(channel).declare()
    Producer(channel).publish({"n": 1}, exchange="resilience-test", routing_key="resilience-test")
    assert queue(channel).get(no_ack=False) is not None  # delivered, not acknowledged
    transport = channel.connection
    channel._disconnect_pools()  # the state after the connection was lost and closed
    transport.client = None
    conn.maybe_close_channel(channel)  # raised AttributeError before the patch
    r = redis.Redis.from_url(redis_url)
    assert r.hlen("unacked") == 0 and r.llen("resilience-test") == 1  # restored at close
    r.close()


def test_a_redis_error_reply_is_logged_as_what_it_is_and_waited_out(
    private: PrivateRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis refuses writes (OOM under ``noeviction``): the bridge says so as it is (not
    "group deleted"), backs off, and delivers everything once Redis has room again."""
    settings, app, env = make(private.url, tmp_path)
    r = private.client()
    w = spawn_worker(env, "file", tmp_path / "worker.log")
    try:
        with (
            caplog.at_level(logging.WARNING, "dispatch_celery.ingest.bridge"),
            bridge(settings, app, "file"),
        ):
            first = xadd_all(r, STREAM, [event(i) for i in range(20)])
            wait_for(lambda: len(delivered(tmp_path / "events.jsonl")) == 20, what="20")
            r.config_set("maxmemory", 100 * 1024)  # below what it uses: writes are refused
            with pytest.raises(redis.ResponseError, match="maxmemory"):
                r.set("probe", "x")  # the producer's XADDs fail too now
            wait_for(
                lambda: any(refusal(m) for m in caplog.messages),
                timeout=20,
                what="the OOM reply logged",
            )
            r.config_set("maxmemory", 0)
            second = xadd_all(r, STREAM, [event(i) for i in range(20, 40)])
            wait_for(
                lambda: set(delivered(tmp_path / "events.jsonl")) >= set(first + second),
                timeout=30,
                what="every event once Redis has room",
            )
    finally:
        stop_proc(w)
    # every line quoting the OOM reply names it as a refusal (the memory guard's own
    # "Redis uses N% of its maxmemory" line may come first: it quotes no reply)
    oom = [m for m in caplog.messages if "command not allowed" in m]
    assert oom and all(refusal(m) for m in oom), oom
    assert not any("re-creating the group" in m for m in caplog.messages)
    # the worker rode it out (an ack refused with OOM used to make it exit)
    assert "Unrecoverable error" not in (tmp_path / "worker.log").read_text()


def refusal(message: str) -> bool:
    return "Redis refused a command" in message and "maxmemory" in message


def test_an_ack_refused_for_lack_of_memory_is_redone_when_redis_has_room(
    private: PrivateRedis,
) -> None:
    """A task finished just as Redis ran out of memory (``noeviction``): the ack's
    transaction is refused with OOM, a ResponseError rather than a connection error, and
    Celery stopped the worker ("Unrecoverable error: OutOfMemoryError"). The ack now waits
    and is redone once Redis has room."""
    from kombu import Connection, Exchange, Producer, Queue

    from dispatch_celery.delivery.broker import patch_kombu_redis, retry_pending

    patch_kombu_redis()
    conn = Connection(private.url)
    channel: Any = conn.channel()
    queue = Queue("oom-test", Exchange("oom-test"), "oom-test")
    queue(channel).declare()
    Producer(channel).publish({"n": 1}, exchange="oom-test", routing_key="oom-test")
    message = queue(channel).get(no_ack=False)
    assert message is not None
    r = private.client()
    r.config_set("maxmemory", 1)
    try:
        message.ack()  # refused: no error, the ack waits
        assert retry_pending() == 1
        assert r.hlen("unacked") == 1
    finally:
        r.config_set("maxmemory", 0)
    assert retry_pending() == 0
    assert r.hlen("unacked") == 0 and r.llen("oom-test") == 0  # acked, not redelivered
    r.close()
    conn.release()


def test_an_ack_while_redis_is_away_is_redone_when_it_is_back(private: PrivateRedis) -> None:
    """A task finished while Redis was away: its ack failed, the message stayed in
    ``unacked`` and the visibility-timeout sweep redelivered it (a duplicate). The patched
    QoS keeps the ack and redoes it once Redis answers (``retry_pending``, run by the
    consumer's RetryPending bootstep after each reconnect and every few seconds)."""
    from kombu import Connection, Exchange, Producer, Queue

    from dispatch_celery.delivery.broker import patch_kombu_redis, retry_pending

    patch_kombu_redis()
    conn = Connection(private.url)
    channel: Any = conn.channel()
    queue = Queue("ack-test", Exchange("ack-test"), "ack-test")
    queue(channel).declare()
    Producer(channel).publish({"n": 1}, exchange="ack-test", routing_key="ack-test")
    message = queue(channel).get(no_ack=False)
    assert message is not None
    private.shutdown()
    message.ack()  # Redis is away: no error, the ack waits
    assert retry_pending() == 1
    private.start()
    assert retry_pending() == 0
    r = private.client()
    assert r.hlen("unacked") == 0 and r.llen("ack-test") == 0  # acked, not redelivered
    r.close()
