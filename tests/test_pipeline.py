"""End to end through a real Redis, a real bridge and a real Celery worker."""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path
from typing import cast

import orjson
import redis
from click.testing import CliRunner

from dispatch_celery import constants as c
from dispatch_celery import stats
from dispatch_celery.batches.codec import Entry, batch_id_for, encode, entry_from_fields, raw_size
from dispatch_celery.batches.state import BatchStore
from dispatch_celery.cli.commands import main
from tests.conftest import need_server
from tests.harness import (
    bridge,
    event,
    jsonl,
    make,
    read_as,
    wait_for,
    worker,
    xadd_all,
    xrange,
)

STREAM = "llm-proxy-events"


def test_events_flow_to_the_file_in_batches(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    settings, app, _ = make(redis_url, tmp_path, DISPATCH_BATCH_SIZE="10")
    ids = xadd_all(r, STREAM, [event(i) for i in range(95)])
    with bridge(settings, app, "file"), worker(app, "file"):
        wait_for(lambda: len(jsonl(tmp_path / "events.jsonl")) >= 95, what="95 records")
        wait_for(lambda: r.hlen(c.inflight_key("file")) == 0, what="no batch in flight")
    records = jsonl(tmp_path / "events.jsonl")
    assert [rec["stream_id"] for rec in records] == ids  # one worker: in order, once each
    assert records[0]["output"]["choices"][0]["message"]["content"] == "reply 0"
    counters = stats.read(r, "file")
    assert counters["delivered"] == 95
    assert counters["batches"] == 10  # 9 full batches of 10 and one flushed partial
    group = r.xinfo_groups(STREAM)[0]
    assert group["pending"] == 0
    assert not r.keys("dispatch:batch:*")  # every blob deleted after delivery


def test_filtered_events_are_counted_not_lost(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    settings, app, _ = make(redis_url, tmp_path)
    xadd_all(r, STREAM, [event(i, method="GET" if i % 3 == 0 else "POST") for i in range(30)])
    with bridge(settings, app, "file"), worker(app, "file"):
        wait_for(
            lambda: stats.read(r, "file")["batches"] >= 1 and r.hlen(c.inflight_key("file")) == 0,
            what="batch finished",
        )
    counters = stats.read(r, "file")
    assert counters["filtered"] == 10
    assert counters["delivered"] == 20
    assert len(jsonl(tmp_path / "events.jsonl")) == 20


POISON = [
    (b"this is not json", "not JSON"),
    (b"[1, 2, 3]", "array"),
    (b'{"RequestID": "x", "Method": "POST", "ResponseBody": "!!!not base64!!!"}', "base64"),
    (b"", "empty"),
    (b"\xff\xfe\x00garbage", "UTF-8"),
]


def test_poison_entries_are_dead_lettered_and_the_rest_delivered(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    settings, app, _ = make(redis_url, tmp_path)
    xadd_all(r, STREAM, [event(0)])
    for data, _ in POISON:
        r.xadd(STREAM, {"data": data})
    nodata_id = cast(bytes, r.xadd(STREAM, {"payload": "no data field here"})).decode()
    xadd_all(r, STREAM, [event(i) for i in range(1, 11)])
    with bridge(settings, app, "file"), worker(app, "file"):
        wait_for(lambda: len(jsonl(tmp_path / "events.jsonl")) == 11, what="11 good records")
        wait_for(lambda: r.xlen(c.deadletter_key("file")) == 6, what="6 dead letters")

    result = CliRunner().invoke(
        main, ["dlq", "list", "--service", "file", "--json"], env={"DISPATCH_REDIS_URL": redis_url}
    )
    assert result.exit_code == 0, result.output
    letters = orjson.loads(result.output)
    assert len(letters) == 6
    by_data = {d["data"]: d["reason"] for d in letters}
    for data, hint in POISON:
        key = data.decode("utf-8", "backslashreplace")
        assert key in by_data, key
        assert hint.lower() in by_data[key].lower(), (hint, by_data[key])
    nodata = next(d for d in letters if d["stream_id"] == nodata_id)
    assert "data" in nodata["reason"] and "no data field here" in nodata["data"]
    raw = xrange(r, c.deadletter_key("file"))
    assert {fields[b"data"] for _, fields in raw} >= {d for d, _ in POISON}  # raw bytes kept


def test_transient_failures_back_off_honour_retry_after_then_deliver(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    settings, app, _ = make(redis_url, tmp_path)
    r.hset("test:flaky:flaky", mapping={"transient": 2, "retry_after": 0.6})
    xadd_all(r, STREAM, [event(i) for i in range(5)])
    with bridge(settings, app, "flaky"), worker(app, "flaky"):
        wait_for(lambda: len(jsonl(tmp_path / "flaky.jsonl")) == 5, what="delivery")
    calls = [orjson.loads(x) for x in cast(list[bytes], r.lrange("test:flaky:flaky:calls", 0, -1))]
    assert [x["attempt"] for x in calls] == [1, 2, 3]
    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(calls)]
    assert all(g >= 0.55 for g in gaps), gaps  # Retry-After wins over the shorter backoff
    assert all(g < 2.5 for g in gaps), gaps  # ... and stays under the configured cap
    assert stats.read(r, "flaky")["retries"] == 2
    assert r.xlen(c.deadletter_key("flaky")) == 0


def test_an_exhausted_budget_dead_letters_never_drops(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    # the budget is a duration: 2 s of attempts without progress, then dead letters
    settings, app, _ = make(redis_url, tmp_path, DISPATCH_RETRY_BUDGET="2")
    r.hset("test:flaky:flaky", mapping={"transient": 1000})
    xadd_all(r, STREAM, [event(i) for i in range(4)])
    with bridge(settings, app, "flaky"), worker(app, "flaky"):
        wait_for(lambda: r.xlen(c.deadletter_key("flaky")) == 4, what="dead letters")
        wait_for(lambda: r.hlen(c.inflight_key("flaky")) == 0, what="batch finished")
    calls = [orjson.loads(x) for x in cast(list[bytes], r.lrange("test:flaky:flaky:calls", 0, -1))]
    letters = xrange(r, c.deadletter_key("flaky"))
    assert all(
        re.match(rb"gave up after 2\.\ds without progress: ", f[b"reason"]) for _, f in letters
    )
    assert all(b"flaky: transient failure" in f[b"reason"] for _, f in letters)
    assert all(int(f[b"attempts"]) == len(calls) for _, f in letters)
    # the batch gives up at the budget's end, ~2 s after the first failure: by a last
    # attempt, or parked (its budget clock runs) when that attempt met the outage gate shut
    gave_up_at = min(float(f[b"ts"]) for _, f in letters)
    assert 1.8 <= gave_up_at - calls[0]["t"] <= 3.5, (gave_up_at, calls)
    assert not (tmp_path / "flaky.jsonl").exists()
    assert r.zcard(c.due_key("flaky")) == 0 and not r.keys("dispatch:batch*")

    # replay puts them back through delivery (the backend works again now; the outage gate
    # the last attempts closed may still be shut for a moment: the replayed batch then
    # waits in the due index, and a bridge publishes it at the gate's end, as in production)
    r.hset("test:flaky:flaky", "transient", 0)
    with bridge(settings, app, "flaky"), worker(app, "flaky"):
        result = CliRunner().invoke(
            main,
            ["dlq", "replay", "--service", "flaky"],
            env=dict(_env(redis_url, tmp_path).items()),
        )
        assert result.exit_code == 0, result.output
        wait_for(lambda: len(jsonl(tmp_path / "flaky.jsonl")) == 4, what="replayed delivery")
    assert r.xlen(c.deadletter_key("flaky")) == 0


def _env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    from tests.harness import pipeline_env

    return pipeline_env(redis_url, tmp_path)


def test_per_run_rejections_and_deferrals(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    settings, app, _ = make(redis_url, tmp_path)
    bad = "00000000-0000-4000-8000-000000000003"
    later = "00000000-0000-4000-8000-000000000005"
    r.sadd("test:flaky:flaky:reject", bad)
    r.sadd("test:flaky:flaky:defer", later)
    xadd_all(r, STREAM, [event(i) for i in range(8)])
    with bridge(settings, app, "flaky"), worker(app, "flaky"):
        wait_for(lambda: len(jsonl(tmp_path / "flaky.jsonl")) == 7, what="7 delivered")
        wait_for(lambda: r.hlen(c.inflight_key("flaky")) == 0, what="batch finished")
    calls = [orjson.loads(x) for x in cast(list[bytes], r.lrange("test:flaky:flaky:calls", 0, -1))]
    assert [x["runs"] for x in calls] == [8, 1]  # the retry re-sends only the deferred run
    letters = xrange(r, c.deadletter_key("flaky"))
    assert len(letters) == 1 and letters[0][1][b"event_id"].decode() == bad
    ids = [x["id"] for x in jsonl(tmp_path / "flaky.jsonl")]
    assert len(ids) == len(set(ids)) == 7


def test_permanent_failure_dead_letters_the_batch_at_once(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    settings, app, _ = make(redis_url, tmp_path)
    r.hset("test:flaky:flaky", "permanent", 1)
    xadd_all(r, STREAM, [event(i) for i in range(3)])
    with bridge(settings, app, "flaky"), worker(app, "flaky"):
        wait_for(lambda: r.xlen(c.deadletter_key("flaky")) == 3, what="dead letters")
    assert r.llen("test:flaky:flaky:calls") == 1  # not hammered


def test_backpressure_pauses_reading_and_resumes(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    settings, app, _ = make(
        redis_url, tmp_path, DISPATCH_BATCH_SIZE="20", DISPATCH_HIGH_WATER_BATCHES="5"
    )
    xadd_all(r, STREAM, [event(i) for i in range(1000)])
    with bridge(settings, app, "file") as b:
        wait_for(lambda: b.paused, what="pause at the high-water mark")
        time.sleep(1.0)
        in_flight = r.hlen(c.inflight_key("file"))
        memory = r.info("memory")["used_memory"]
        read = b.read_total
        time.sleep(1.5)
        assert r.hlen(c.inflight_key("file")) == in_flight <= 6
        assert b.read_total == read <= 6 * 20 + settings.read_count
        assert r.info("memory")["used_memory"] < memory + 256 * 1024  # not growing
        with worker(app, "file"):
            wait_for(
                lambda: len(jsonl(tmp_path / "events.jsonl")) == 1000,
                timeout=60,
                what="drain after resume",
            )
    assert stats.read(r, "file")["delivered"] == 1000


def test_trimmed_before_read_is_counted_and_reported(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    if int(str(cast(dict[str, object], r.info("server"))["redis_version"]).split(".")[0]) < 7:
        need_server("Redis >= 7 (entries-read / entries-added)")
    settings, app, env = make(redis_url, tmp_path)
    xadd_all(r, STREAM, [event(i) for i in range(10)])
    with bridge(settings, app, "file"), worker(app, "file"):
        wait_for(lambda: len(jsonl(tmp_path / "events.jsonl")) == 10, what="first 10")
    # the group falls behind and the producer trims (MAXLEN 20, exact)
    xadd_all(r, STREAM, [event(i) for i in range(10, 110)], maxlen=20)
    with bridge(settings, app, "file"), worker(app, "file"):
        wait_for(lambda: len(jsonl(tmp_path / "events.jsonl")) == 30, what="retained 20")
        wait_for(lambda: stats.read(r, "file")["trimmed_unread"] > 0, what="trim counted")
    assert stats.read(r, "file")["trimmed_unread"] == 80
    result = CliRunner().invoke(main, ["status", "--json", "--service", "file"], env=env)
    assert result.exit_code == 0, result.output
    assert orjson.loads(result.output)[0]["trimmed_unread"] == 80


def test_pending_entries_of_a_dead_bridge_are_claimed_under_traffic(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    settings, app, _ = make(redis_url, tmp_path)
    r.xgroup_create(STREAM, "dispatch-file", id="0", mkstream=True)
    first = xadd_all(r, STREAM, [event(i) for i in range(50)])
    # a bridge on another host read these and died before batching them
    read_as(r, "dispatch-file", "dead-host", STREAM, 50)
    with bridge(settings, app, "file", consumer="live-host"), worker(app, "file"):
        for k in range(8):  # steady traffic: the live bridge is never idle
            xadd_all(r, STREAM, [event(1000 + k * 10 + j) for j in range(10)])
            time.sleep(0.4)
        wait_for(
            lambda: len(jsonl(tmp_path / "events.jsonl")) == 130,
            timeout=30,
            what="claimed + live entries",
        )
    got = [rec["stream_id"] for rec in jsonl(tmp_path / "events.jsonl")]
    assert set(first) <= set(got) and len(got) == len(set(got))
    assert r.xpending(STREAM, "dispatch-file")["pending"] == 0


def stage_as_bridge(r: redis.Redis, consumer: str, n: int) -> tuple[BatchStore, str, list[Entry]]:
    """Do what a bridge does up to staging: n new events read as ``consumer`` and stored as
    one batch (staged, in flight), not yet published."""
    r.xgroup_create(STREAM, "dispatch-file", id="0", mkstream=True)
    xadd_all(r, STREAM, [event(i) for i in range(n)])
    entries = [entry_from_fields(i, f) for i, f in read_as(r, "dispatch-file", consumer, STREAM, n)]
    store = BatchStore(r, "file")
    batch_id = batch_id_for(entries)
    blob = encode(STREAM, "dispatch-file", entries)
    store.stage_many([(batch_id, blob, raw_size(entries))], consumer, recovery_s=1.0)
    return store, batch_id, entries


def test_a_staged_batch_of_a_dead_bridge_is_published_once(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    settings, app, _ = make(redis_url, tmp_path)
    # the dead bridge stored the batch, then died before publishing the task
    stage_as_bridge(r, "dead-host", 7)
    with bridge(settings, app, "file", consumer="live-host"), worker(app, "file"):
        wait_for(lambda: len(jsonl(tmp_path / "events.jsonl")) == 7, what="recovered batch")
        time.sleep(3)  # past the claim-idle time: the entries must not be claimed again
    assert len(jsonl(tmp_path / "events.jsonl")) == 7
    assert r.xpending(STREAM, "dispatch-file")["pending"] == 0
    assert r.hlen(c.staged_key("file")) == 0
    assert r.zcard(c.due_key("file")) == 0
    assert stats.read(r, "file")["enqueued_events"] == 7  # counted once, at its XACK


def test_the_seven_spec_vectors_end_to_end(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    """stream-vectors.json through a real bridge and worker into the file backend."""
    from tests.test_vectors import load_vectors, require_vectors

    require_vectors()
    vectors = load_vectors()
    assert len(vectors) == 7
    settings, app, _ = make(redis_url, tmp_path)
    ids = [
        cast(bytes, r.xadd(v["stream_key"], {"data": v["xadd_fields"]["data"]})).decode()
        for v in vectors
    ]
    delivered = [v for v in vectors if v["expected_record"]["delivered"]]
    with bridge(settings, app, "file"), worker(app, "file"):
        wait_for(lambda: len(jsonl(tmp_path / "events.jsonl")) == len(delivered), what="records")
        wait_for(lambda: stats.read(r, "file")["filtered"] == 2, what="filtered counted")
    by_id = {rec["stream_id"]: rec for rec in jsonl(tmp_path / "events.jsonl")}
    for v, sid in zip(vectors, ids, strict=True):
        want = v["expected_record"]
        if not want["delivered"]:
            assert sid not in by_id
            continue
        rec = by_id[sid]
        for key in ("id", "request_id", "method", "path", "status", "duration_ms", "model"):
            assert rec[key] == want[key], (v["name"], key)
        assert rec["usage"] == want["usage"], v["name"]
        ms = int(sid.split("-")[0])
        assert rec["ended_at"].endswith("Z") and rec["started_at"] < rec["ended_at"]
        assert rec["duration_ms"] == want["duration_ms"] and ms > 0
        if "output_text" in want:
            assert rec["output"]["choices"][0]["message"]["content"] == want["output_text"]
        if "streamed" in want:
            assert rec["streamed"] is want["streamed"]
        if want.get("finish_reason"):
            assert rec["output"]["choices"][0]["finish_reason"] == want["finish_reason"]
        if want.get("error_present"):
            assert rec["error"]
        if want.get("output_is_binary_marker"):
            assert isinstance(rec["output"], dict) and "base64" not in str(rec["output"]).lower()
    assert stats.read(r, "file")["delivered"] == 5


def test_a_batch_whose_task_was_lost_is_republished(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    """The broker accepted the task and confirmed it (entries XACKed), then the task was
    lost before any attempt began (a worker killed with the message read but not yet
    recorded, say): the blob is in flight with no task. The due index re-publishes it once
    its queue lease is over, touched or not."""
    settings, app, _ = make(redis_url, tmp_path, DISPATCH_QUEUE_LEASE="2")
    store, batch_id, entries = stage_as_bridge(r, "b0", 6)
    store.confirm([(batch_id, STREAM, "dispatch-file", [e.entry_id for e in entries])], 2.0)
    assert r.xpending(STREAM, "dispatch-file")["pending"] == 0  # nothing left to re-read
    with bridge(settings, app, "file"), worker(app, "file"):
        wait_for(lambda: len(jsonl(tmp_path / "events.jsonl")) == 6, what="lost task's batch")
        wait_for(lambda: r.hlen(c.inflight_key("file")) == 0, what="nothing in flight")
    assert r.zcard(c.due_key("file")) == 0
    assert len(jsonl(tmp_path / "events.jsonl")) == 6


def test_pending_entries_trimmed_before_batching_are_counted_not_dead_lettered(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    settings, app, _ = make(redis_url, tmp_path)
    r.xgroup_create(STREAM, "dispatch-file", id="0", mkstream=True)
    ids = xadd_all(r, STREAM, [event(i) for i in range(5)])
    read_as(r, "dispatch-file", "b1", STREAM, 5)  # read by this consumer, then it crashed
    r.xdel(STREAM, *ids[:2])  # the producer trimmed two of them meanwhile
    with bridge(settings, app, "file", consumer="b1"), worker(app, "file"):  # it restarts
        wait_for(lambda: len(jsonl(tmp_path / "events.jsonl")) == 3, what="3 records")
    assert stats.read(r, "file")["trimmed_unread"] == 2
    assert r.xlen(c.deadletter_key("file")) == 0
    assert r.xpending(STREAM, "dispatch-file")["pending"] == 0
