"""Fault 1: the Redis of the stream (also the Celery broker) restarts in the middle of a drain.

A private redis-server with ``appendonly yes``, ``appendfsync everysec``; a real bridge and a
real ``celery worker`` (prefork) deliver a backlog plus a steady producer into the file
backend. ``SHUTDOWN`` (the AOF is flushed) and a restart on the same port 5 s later: the
bridge and the worker ride it out (no exit, no busy loop in the logs) and every event
arrives. ``kill -9``: what ``everysec`` can lose is up to ~1 s of acknowledged writes (the
producer's XADDs and the pipeline's own XACKs / stage / finish); the pipeline must neither
wedge (a batch whose blob vanished is counted as ``blobs_lost`` and dropped from the
accounting, not retried forever) nor append twice beyond the duplicate bound.
"""

from __future__ import annotations

import time

import pytest

from dispatch_celery import constants as c
from dispatch_celery import stats
from tests.faults.kit import (
    STREAM,
    Figures,
    Lab,
    PrivateRedis,
    Producer,
    Stack,
    account,
    dead_letters,
    file_counts,
    settle,
    wait_resumed,
)
from tests.harness import pipeline_env, xrange

# One xdist worker runs the fault scenarios one after another: they time real outages.
pytestmark = [pytest.mark.faults, pytest.mark.xdist_group("faults")]

BACKLOG = 6000  # events waiting when the pipeline starts: the fault lands mid-drain
BATCH = 20
# appendfsync everysec: Redis fsyncs the AOF once a second, so kill -9 loses the writes of
# at most the last ~1 s (2 s allowed: the fsync of a busy second may run late).
EVERYSEC_WINDOW_S = 2.0


def _env(server: PrivateRedis, lab: Lab) -> dict[str, str]:
    # A small in-flight buffer keeps the bridge publishing as the worker delivers, so the
    # fault finds both of them at work (not the bridge idle with everything staged).
    return pipeline_env(
        server.url,
        lab.tmp,
        DISPATCH_LOG_FORMAT="json",
        DISPATCH_BATCH_SIZE=str(BATCH),
        DISPATCH_HIGH_WATER_BATCHES="10",
    )


def _quiet_logs(stack: Stack, start: float, end: float, seconds: float) -> None:
    """A clear line while waiting, not a busy loop: few log lines while Redis is away."""
    for name in stack.procs:
        n = stack.lines_between(name, start, end)
        assert n <= 10 + 4 * seconds, f"{name} wrote {n} log lines in {seconds:.0f}s of outage"
        said = stack.lines_between(name, start - 1, end, ("warning", "error"))
        assert said, f"{name} logged no warning while Redis was away"


def _no_wedge(server: PrivateRedis) -> None:
    r = server.client()
    try:
        assert r.hlen(c.inflight_key("file")) == 0, "batches still in flight"
        assert r.xpending(STREAM, c.default_group("file"))["pending"] == 0
        assert not r.keys(c.batch_key("file", "*")), "batch blobs left behind"
        assert r.zcard(f"{c.PREFIX}:due:file") == 0, "batches still due"
    finally:
        r.close()


def scenario_shutdown(
    lab: Lab, *, down_s: float = 5.0, rate: float = 150.0, cycles: int = 2
) -> Figures:
    fig = lab.figures_for("redis-shutdown-restart", down_s)
    server = PrivateRedis(lab.tmp / "redis")
    server.start()
    env = _env(server, lab)
    out = lab.tmp / "events.jsonl"
    stack = Stack(env, lab.tmp)
    producer = Producer(server.url, rate, first=1_000_000)
    r = server.client()
    try:
        producer.burst(BACKLOG)
        stack.bridge("file")
        stack.worker("file", concurrency=2)
        producer.start()
        resumes = []
        for _ in range(cycles):  # each restart is one more chance to catch a publish mid-way
            target = len(file_counts(out)) + 300
            stack.wait(lambda: len(file_counts(out)) >= target, 30, "the drain")  # noqa: B023
            down_at = time.time()
            server.shutdown()
            time.sleep(down_s)
            stack.assert_running()  # nobody exited while Redis was away
            server.start()
            up_at = time.time()
            resumes.append(wait_resumed(lambda: len(file_counts(out)), 60, stack))
            _quiet_logs(stack, down_at + 1, up_at, down_s)
        assert len(file_counts(out)) < BACKLOG, "the backlog was drained too soon; make it larger"
        fig.resume_s = max(resumes)
        time.sleep(2)
        producer.stop()
        published = producer.published()
        settle(lambda: set(file_counts(out)) >= set(published), timeout=60, stack=stack)
        settle(lambda: r.hlen(c.inflight_key("file")) == 0, timeout=20)
        stack.assert_running()
        account(fig, published, file_counts(out), dead_letters(r, "file"))
        _no_wedge(server)
        fig.extra.update(restarts=cycles, producer_errors=producer.errors)
    finally:
        producer.close()
        r.close()
        stack.close()
        server.close()
    return fig


def scenario_kill9(lab: Lab, *, down_s: float = 2.0, rate: float = 150.0) -> Figures:
    fig = lab.figures_for("redis-kill-9", down_s)
    server = PrivateRedis(lab.tmp / "redis")
    server.start()
    env = _env(server, lab)
    out = lab.tmp / "events.jsonl"
    stack = Stack(env, lab.tmp)
    producer = Producer(server.url, rate, first=2_000_000)
    try:
        producer.burst(BACKLOG)
        time.sleep(EVERYSEC_WINDOW_S)  # the backlog is on disk
        stack.bridge("file")
        stack.worker("file", concurrency=2)
        producer.start()
        stack.wait(lambda: len(file_counts(out)) >= 500, 30, "the drain under way")
        killed_at = time.time()
        server.kill9()
        assert len(file_counts(out)) < BACKLOG, "the backlog was drained before the kill"
        time.sleep(down_s)
        stack.assert_running()
        server.start()
        up_at = time.time()
        fig.resume_s = wait_resumed(lambda: len(file_counts(out)), 60, stack)
        time.sleep(2)
        producer.stop()
        published = producer.published()
        r = server.client()
        try:
            in_stream = {i.decode() for i, _ in xrange(r, STREAM)}
            vanished = [i for i in published if i not in in_stream]
            # what Redis itself lost: acknowledged XADDs of the last second before the kill
            old = [i for i in vanished if producer.acked_at[i] < killed_at - EVERYSEC_WINDOW_S]
            assert not old, f"{len(old)} entries older than the fsync window vanished: {old[:5]}"
            settle(lambda: set(file_counts(out)) >= in_stream, timeout=60, stack=stack)
            settle(lambda: r.hlen(c.inflight_key("file")) == 0, timeout=20)
            stack.assert_running()
            got = file_counts(out)
            counters = stats.read(r, "file")
            blobs_lost = counters.get("blobs_lost", 0)
            not_delivered = [i for i in vanished if i not in got]
            fig.extra.update(
                vanished_in_redis=len(not_delivered),
                blobs_lost=blobs_lost,
                producer_errors=producer.errors,
            )
            missing = in_stream - set(got) - set(dead_letters(r, "file"))
            # a batch whose blob vanished is counted (blobs_lost), never silently dropped
            assert len(missing) <= blobs_lost * BATCH, (
                f"{len(missing)} events in the stream never delivered, {blobs_lost} blobs "
                f"counted as lost: {sorted(missing)[:5]}"
            )
            account(
                fig,
                published,
                got,
                dead_letters(r, "file"),
                vanished=set(not_delivered) | missing,
            )
            fig.extra["blob_lost_events"] = len(missing)  # reported by the pipeline
        finally:
            r.close()
        _no_wedge(server)
        _quiet_logs(stack, killed_at + 1, up_at, down_s)
    finally:
        producer.close()
        stack.close()
        server.close()
    return fig


def test_redis_shutdown_and_restart_mid_drain_loses_nothing(lab: Lab) -> None:
    scenario_shutdown(lab)


def test_redis_kill_9_mid_drain_neither_wedges_nor_double_appends(lab: Lab) -> None:
    scenario_kill9(lab)
