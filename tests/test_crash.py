"""Crashes: kill -9 of workers and bridges during a drain loses nothing.

Real ``celery worker`` and ``dispatch bridge`` subprocesses; the flaky test double slows
each batch down so that kills land in the middle of one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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


def test_a_task_lost_by_a_worker_killed_in_its_soft_shutdown_is_republished(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    """The deploy defect of issue 8, reproduced. A worker in its soft shutdown (SIGTERM,
    REMAP_SIGTERM=SIGQUIT, waiting up to soft_shutdown_timeout for its running attempt) keeps
    a BRPOP outstanding for its free pool slot; the bridge's last flush publishes a task
    after the SIGTERM, the broker accepts it (so the bridge rightly XACKs its entries), the
    dying worker's BRPOP pops it, and honcho's SIGKILL (5 s after the first process exited,
    before the 10 s wait ended) loses it: in neither the queue nor ``unacked``. Nothing
    covered a batch whose first attempt never began; the due index re-publishes it once
    its queue lease is over."""
    from dispatch_celery.app import create_app
    from dispatch_celery.settings import load_settings
    from tests.harness import REPO, bridge, subprocess_env

    env = pipeline_env(redis_url, tmp_path, DISPATCH_BATCH_SIZE="1", DISPATCH_QUEUE_LEASE="3")
    settings = load_settings(env)
    app = create_app(settings)
    r.hset("test:flaky:flaky", "sleep", 30)  # the first attempt outlives the shutdown wait
    worker_env = subprocess_env(env) | {"REMAP_SIGTERM": "SIGQUIT"}
    args = ["worker", "-Q", "flaky", "-c", "2", "--without-heartbeat", "--without-gossip",
            "--without-mingle", "-l", "INFO", "--", "worker.soft_shutdown_timeout=10"]  # fmt: skip
    log = tmp_path / "worker1.log"
    first = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "dispatch_celery", *args],
        env=worker_env, cwd=REPO, stdout=log.open("ab"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        with bridge(settings, app, "flaky"):
            [busy] = xadd_all(r, STREAM, [event(0)])
            wait_for(lambda: r.llen("test:flaky:flaky:calls") >= 1, what="the first attempt")
            first.send_signal(signal.SIGTERM)  # the deploy: soft shutdown begins
            time.sleep(0.3)
            [late] = xadd_all(r, STREAM, [event(1)])  # the bridge's last flush
            wait_for(
                lambda: r.xpending(STREAM, "dispatch-flaky")["pending"] == 0,
                what="the late batch published and its entry XACKed",
            )
            time.sleep(4.7)
            kill_group(first)  # honcho: SIGKILL 5 s later
            r.hset("test:flaky:flaky", "sleep", 0)
            second = spawn_worker(env, "flaky", tmp_path / "worker2.log", name="w2")
            try:
                wait_for(
                    lambda: set(_delivered(tmp_path / "flaky.jsonl")) >= {busy, late},
                    timeout=40,
                    what="both batches delivered after the restart",
                )
                wait_for(lambda: r.hlen(c.inflight_key("flaky")) == 0, what="nothing in flight")
            finally:
                stop_proc(second)
    finally:
        if first.poll() is None:
            kill_group(first)
    assert r.zcard(c.due_key("flaky")) == 0
    assert "Initiating Soft Shutdown" in log.read_text()
