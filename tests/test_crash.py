"""Crashes: kill -9 of workers and bridges during a drain loses nothing.

Real ``celery worker`` and ``dispatch bridge`` subprocesses; the flaky test double slows
each batch down so that kills land in the middle of one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import redis

from dispatch_celery import constants as c
from tests.harness import (
    event,
    jsonl,
    kill_group,
    pipeline_env,
    spawn_bridge,
    spawn_worker,
    stop_proc,
    wait_for,
    xadd_all,
)

STREAM = "llm-proxy-events"


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(x) for x in out.stdout.split()]


def _delivered(path: Path) -> Counter[str]:
    return Counter(rec["stream_id"] for rec in jsonl(path))


def test_kill_9_of_pool_children_mid_batch_loses_nothing(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    env = pipeline_env(redis_url, tmp_path, DISPATCH_BATCH_SIZE="50")
    r.hset("test:flaky:flaky", "sleep", 0.25)
    ids = xadd_all(r, STREAM, [event(i) for i in range(1500)])
    bridge = spawn_bridge(env, "flaky", tmp_path / "bridge.log")
    worker = spawn_worker(env, "flaky", tmp_path / "worker.log", concurrency=2)
    try:
        wait_for(lambda: r.llen("test:flaky:flaky:calls") >= 2, what="worker busy")
        killed = 0
        for _ in range(4):
            time.sleep(0.6)
            children = _children(worker.pid)
            if children:
                os.kill(children[0], signal.SIGKILL)  # a pool child dies mid-batch
                killed += 1
        assert killed >= 3
        wait_for(
            lambda: set(_delivered(tmp_path / "flaky.jsonl")) >= set(ids),
            timeout=90,
            what="every event delivered",
        )
        wait_for(lambda: r.hlen(c.inflight_key("flaky")) == 0, what="nothing in flight")
    finally:
        stop_proc(bridge)
        stop_proc(worker)
    got = _delivered(tmp_path / "flaky.jsonl")
    duplicates = sum(n - 1 for n in got.values())
    assert duplicates <= killed * 50  # at most the batches that were cut short
    assert "WorkerLostError" in (tmp_path / "worker.log").read_text()


def test_kill_9_of_bridges_between_enqueue_and_ack_loses_nothing(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    env = pipeline_env(redis_url, tmp_path, DISPATCH_BATCH_SIZE="20")
    ids = xadd_all(r, STREAM, [event(i) for i in range(3000)])
    worker = spawn_worker(env, "file", tmp_path / "worker.log", concurrency=2)
    try:
        for _ in range(5):  # the same consumer restarts again and again, as under systemd
            bridge = spawn_bridge(env, "file", tmp_path / "bridge.log", "--consumer", "b1")
            time.sleep(1.2)
            kill_group(bridge)
        bridge = spawn_bridge(env, "file", tmp_path / "bridge.log", "--consumer", "b1")
        wait_for(
            lambda: set(_delivered(tmp_path / "events.jsonl")) >= set(ids),
            timeout=90,
            what="every event delivered",
        )
        wait_for(lambda: r.hlen(c.inflight_key("file")) == 0, what="nothing in flight")
        stop_proc(bridge)
    finally:
        stop_proc(worker)
    got = _delivered(tmp_path / "events.jsonl")
    assert sum(n - 1 for n in got.values()) <= 5 * 500  # few: at most one read per kill
    assert r.xpending(STREAM, "dispatch-file")["pending"] == 0
    assert r.hlen(c.staged_key("file")) == 0


def test_a_worker_killed_outright_is_redelivered_within_the_visibility_timeout(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    env = pipeline_env(redis_url, tmp_path, DISPATCH_BATCH_SIZE="10")
    visibility = int(env["DISPATCH_VISIBILITY_TIMEOUT"])
    r.hset("test:flaky:flaky", "sleep", 30)  # the first worker never finishes
    ids = xadd_all(r, STREAM, [event(i) for i in range(10)])
    bridge = spawn_bridge(env, "flaky", tmp_path / "bridge.log")
    first = spawn_worker(env, "flaky", tmp_path / "worker1.log", name="w1")
    try:
        wait_for(lambda: r.llen("test:flaky:flaky:calls") >= 1, what="task started")
        r.hset("test:flaky:flaky", "sleep", 0)
        killed_at = time.monotonic()
        kill_group(first)  # the host dies: main process and pool children at once
        second = spawn_worker(env, "flaky", tmp_path / "worker2.log", name="w2")
        try:
            wait_for(
                lambda: set(_delivered(tmp_path / "flaky.jsonl")) >= set(ids),
                timeout=visibility + 20,
                what="redelivery",
            )
            took = time.monotonic() - killed_at
        finally:
            stop_proc(second)
    finally:
        stop_proc(bridge)
    assert took < visibility + 10, took
