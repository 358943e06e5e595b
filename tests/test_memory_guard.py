"""The buffer never fills the Redis llm-proxy writes to: the bridge stops staging batches
when Redis uses DISPATCH_REDIS_MEMORY_MAX_PERCENT of its maxmemory, the producer's XADDs
keep succeeding, and reading resumes (everything delivered) once there is room again."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from dispatch_celery.batches.state import BatchStore
from tests.faults.kit import PrivateRedis, private_redis  # noqa: F401 (the fixture)
from tests.harness import bridge, event, jsonl, make, spawn_worker, stop_proc, wait_for, xadd_all

STREAM = "llm-proxy-events"


def test_the_bridge_pauses_before_redis_memory_runs_out_and_the_producer_keeps_writing(
    private: PrivateRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings, app, env = make(private.url, tmp_path, DISPATCH_REDIS_MEMORY_MAX_PERCENT="50")
    r = private.client()
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory", used * 3 // 2)  # Redis at ~66 % of its limit: above 50 %
    store = BatchStore(r, "file")
    with (
        caplog.at_level(logging.WARNING, "dispatch_celery.ingest.bridge"),
        bridge(settings, app, "file"),
    ):
        wait_for(
            lambda: any("of its maxmemory" in m for m in caplog.messages),
            timeout=15,
            what="the memory pause logged",
        )
        ids = xadd_all(r, STREAM, [event(i) for i in range(50)])  # the producer still writes
        time.sleep(1.5)
        assert store.in_flight()[0] == 0  # nothing staged while Redis is near its limit
        assert r.xlen(STREAM) == 50
        r.config_set("maxmemory", 0)
        w = spawn_worker(env, "file", tmp_path / "worker.log")
        try:
            wait_for(
                lambda: {rec["stream_id"] for rec in jsonl(tmp_path / "events.jsonl")} >= set(ids),
                timeout=30,
                what="every event once Redis has room",
            )
        finally:
            stop_proc(w)
    assert len(jsonl(tmp_path / "events.jsonl")) == 50
