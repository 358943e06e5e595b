"""The batch lifecycle with the due index (``batches.state``), against a real Redis, real
bridges and real Celery workers: stage / publish / confirm / begin / finish, atomic claims,
harmless duplicates, retries that wait in Redis (not in the broker), vanished blobs, the
crash guard, old three-argument tasks, and the outage gate against a real HTTP server."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import redis

from dispatch_celery import constants as c
from dispatch_celery import stats
from dispatch_celery.batches.codec import Entry, batch_id_for, encode, entry_from_fields, raw_size
from dispatch_celery.batches.state import BatchStore
from dispatch_celery.delivery.attempt import Deliverer
from dispatch_celery.ingest.bridge import Bridge
from dispatch_celery.ingest.enqueue import Enqueuer
from tests.faults.kit import OutageHelicone
from tests.harness import bridge, event, jsonl, make, read_as, wait_for, worker, xadd_all, xrange

STREAM = "llm-proxy-events"
GROUP = "dispatch-flaky"


def stage(
    r: redis.Redis, service: str, n_batches: int, size: int, *, consumer: str = "b0"
) -> tuple[BatchStore, list[tuple[str, str, list[Entry]]]]:
    """Do what a bridge does up to staging: read events as ``consumer`` and store them as
    batches (staged, in flight, due). Returns the store and (batch id, token, entries)."""
    group = c.default_group(service)
    r.xgroup_create(STREAM, group, id="0", mkstream=True)
    base = int(r.xlen(STREAM))
    xadd_all(r, STREAM, [event(base + i) for i in range(n_batches * size)])
    read = read_as(r, group, consumer, STREAM, n_batches * size)
    entries = [entry_from_fields(i, f) for i, f in read]
    store = BatchStore(r, service)
    out = []
    for k in range(n_batches):
        chunk = entries[k * size : (k + 1) * size]
        batch_id = batch_id_for(chunk)
        blob = encode(STREAM, group, chunk)
        tokens = store.stage_many([(batch_id, blob, raw_size(chunk))], consumer, 60.0)
        out.append((batch_id, tokens[batch_id], chunk))
    return store, out


def confirm(store: BatchStore, batch_id: str, entries: list[Entry], lease: float = 60.0) -> None:
    group = c.default_group(store.service)
    store.confirm([(batch_id, STREAM, group, [e.entry_id for e in entries])], lease)


def queued(r: redis.Redis, queue: str) -> list[tuple[Any, ...]]:
    """The args of the task messages waiting on a Redis broker queue."""
    out = []
    for raw in cast(list[bytes], r.lrange(queue, 0, -1)):
        message = orjson.loads(raw)
        body = orjson.loads(base64.b64decode(message["body"]))
        out.append(tuple(body[0]))
    return out


def calls(r: redis.Redis) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in cast(list[bytes], r.lrange("test:flaky:flaky:calls", 0, -1))]


def test_stage_publish_confirm_begin_finish_keeps_the_index_and_the_accounting(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    settings, app, _ = make(redis_url, tmp_path)
    store, [(batch_id, token, entries)] = stage(r, "flaky", 1, 5)
    blob_size = len(cast(bytes, r.get(store.key(batch_id))))
    now = time.time()
    # staged: in flight (compressed and raw sizes), due after the staged recovery time
    assert store.staged_among([batch_id]) == {batch_id}
    assert now + 55 < cast(float, r.zscore(c.due_key("flaky"), batch_id)) <= now + 60
    assert r.hget(c.tickets_key("flaky"), batch_id) == token.encode()
    assert r.hget(c.inflight_key("flaky"), batch_id) == f"{blob_size} {raw_size(entries)}".encode()
    assert store.in_flight() == (1, blob_size)
    assert store.in_flight_raw_bytes() == raw_size(entries)
    # published with its ticket, then confirmed: XACKed, unstaged, due after the queue lease
    Enqueuer(app, "flaky").publish(batch_id, len(entries), token)
    assert queued(r, "flaky") == [("flaky", batch_id, 5, token)]
    assert r.xpending(STREAM, GROUP)["pending"] == 5
    confirm(store, batch_id, entries, lease=settings.queue_lease)
    assert r.xpending(STREAM, GROUP)["pending"] == 0
    assert not store.staged_among([batch_id])
    lease_due = cast(float, r.zscore(c.due_key("flaky"), batch_id))
    assert lease_due == pytest.approx(time.time() + settings.queue_lease, abs=2)
    assert stats.read(r, "flaky")["enqueued_events"] == 5
    confirm(store, batch_id, entries)  # a re-publish does not count the events again
    assert stats.read(r, "flaky")["enqueued_events"] == 5
    # the attempt: delivered, and every key of the batch is gone
    result = Deliverer(settings).run("flaky", batch_id, token)
    assert (result.outcome, result.delivered, result.attempt) == ("delivered", 5, 1)
    assert len(jsonl(tmp_path / "flaky.jsonl")) == 5
    assert r.zcard(c.due_key("flaky")) == 0 and r.hlen(c.tickets_key("flaky")) == 0
    assert store.in_flight() == (0, 0) and store.in_flight_raw_bytes() == 0
    assert not r.keys(f"{c.PREFIX}:batch*")
    assert stats.read(r, "flaky")["xack_failed"] == 0


def test_a_stale_busy_or_duplicate_task_does_nothing_and_counts_nothing(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    settings, _, _ = make(redis_url, tmp_path)
    deliverer = Deliverer(settings)
    store, [(batch_id, first, entries)] = stage(r, "flaky", 1, 4)
    confirm(store, batch_id, entries, lease=0.0)  # its task is "lost": due at once
    [(claimed, second)] = store.claim_due(settings.queue_lease, 10)  # a bridge re-publishes
    assert claimed == batch_id and second != first
    state_key = c.batch_state_key("flaky", batch_id)

    assert deliverer.run("flaky", batch_id, first).outcome == "stale"  # the older copy
    assert not r.exists(state_key) and not r.exists(c.batch_lease_key("flaky", batch_id))
    r.set(c.batch_lease_key("flaky", batch_id), "another-copy", px=5000)  # a copy runs
    assert deliverer.run("flaky", batch_id, second).outcome == "busy"
    assert not r.exists(state_key)  # no attempt counted
    # ... but if that copy died, the batch comes back right after its lease, not a queue
    # lease (300 s) later
    assert cast(float, r.zscore(c.due_key("flaky"), batch_id)) <= time.time() + 6.5
    r.delete(c.batch_lease_key("flaky", batch_id))
    assert calls(r) == []  # the backend saw nothing so far

    result = deliverer.run("flaky", batch_id, second)
    assert (result.outcome, result.attempt) == ("delivered", 1)
    assert deliverer.run("flaky", batch_id, second).outcome == "gone"  # a redelivery
    assert len(calls(r)) == 1 and len(jsonl(tmp_path / "flaky.jsonl")) == 4
    assert stats.read(r, "flaky")["batches"] == 1


def test_two_bridges_claim_due_batches_atomically_and_publish_each_once(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    settings, app, _ = make(redis_url, tmp_path)
    _store, staged = stage(r, "flaky", 60, 3, consumer="dead-host")
    r.zadd(c.due_key("flaky"), {b: time.time() - 1 for b, _, _ in staged})  # all overdue
    bridges = [
        Bridge(settings, "flaky", Enqueuer(app, "flaky"), consumer=f"b{i}") for i in range(2)
    ]
    counts = [0, 0]
    go = threading.Barrier(2)

    def drain(i: int) -> None:
        go.wait()
        while True:
            n = bridges[i].publish_due()
            counts[i] += n
            if n == 0:
                return

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    published = [args[1] for args in queued(r, "flaky")]
    assert sorted(published) == sorted(b for b, _, _ in staged)  # each batch exactly once
    assert sum(counts) == 60
    assert r.xpending(STREAM, GROUP)["pending"] == 0  # the claimer XACKed the staged entries
    assert r.hlen(c.staged_key("flaky")) == 0
    raw = cast(dict[bytes, bytes], r.hgetall(c.tickets_key("flaky")))
    tickets = {k.decode(): v.decode() for k, v in raw.items()}
    assert all(tickets[args[1]] == args[3] for args in queued(r, "flaky"))  # newest ticket
    for b in bridges:
        b.r.close()


def test_a_retry_waits_as_a_due_time_in_redis_not_in_the_broker(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    settings, app, _ = make(redis_url, tmp_path)
    r.hset("test:flaky:flaky", mapping={"transient": 1, "retry_after": 2.5})
    xadd_all(r, STREAM, [event(i) for i in range(5)])
    with bridge(settings, app, "flaky"), worker(app, "flaky"):
        wait_for(lambda: len(calls(r)) == 1, what="the first attempt")
        wait_for(lambda: stats.read(r, "flaky")["retries"] == 1, what="the retry scheduled")
        time.sleep(0.3)
        # while it waits: no task on the queue nor held by a worker, no ETA anywhere
        assert r.llen("flaky") == 0 and r.hlen("unacked") == 0
        due = cast(list[tuple[bytes, float]], r.zrange(c.due_key("flaky"), 0, -1, withscores=True))
        assert len(due) == 1 and due[0][1] > time.time() + 1.5
        wait_for(lambda: len(jsonl(tmp_path / "flaky.jsonl")) == 5, what="delivered on retry")
        # the file is written before the attempt's finish transaction runs: wait for it
        wait_for(
            lambda: r.zcard(c.due_key("flaky")) == 0 and r.hlen(c.inflight_key("flaky")) == 0,
            timeout=10,
            what="the batch finished and out of the due index",
        )
    assert [x["attempt"] for x in calls(r)] == [1, 2]
    assert calls(r)[1]["t"] - calls(r)[0]["t"] >= 2.4  # Retry-After honoured


def test_a_retry_scheduled_before_the_bridge_confirmed_keeps_its_due_time(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    """A worker can begin a task, fail and schedule the retry before the bridge that
    published it confirms (a fast worker, a busy bridge): the confirm must not move that
    due time to the queue lease (it did: the retry came 300 s late, not 1 s)."""
    settings, _, _ = make(redis_url, tmp_path)
    r.hset("test:flaky:flaky", mapping={"transient": 1, "retry_after": 1})
    store, [(batch_id, token, entries)] = stage(r, "flaky", 1, 5)
    result = Deliverer(settings).run("flaky", batch_id, token)  # before the confirm
    assert result.outcome == "retry" and result.due is not None
    confirm(store, batch_id, entries, lease=settings.queue_lease)
    assert r.xpending(STREAM, GROUP)["pending"] == 0  # the entries are acknowledged all the same
    assert r.zscore(c.due_key("flaky"), batch_id) == pytest.approx(result.due, abs=0.01)
    # the next publish (a new ticket) is confirmed as usual: due after the queue lease
    r.zadd(c.due_key("flaky"), {batch_id: time.time() - 1}, xx=True)  # the retry is due
    [(claimed, _)] = store.claim_due(settings.queue_lease, 10)
    assert claimed == batch_id
    confirm(store, batch_id, [], lease=settings.queue_lease)
    due = cast(float, r.zscore(c.due_key("flaky"), batch_id))
    assert due == pytest.approx(time.time() + settings.queue_lease, abs=2)


def test_a_batch_whose_blob_vanished_is_dropped_counted_and_not_retried(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    settings, app, _ = make(redis_url, tmp_path)
    store, [(lost, _, lost_entries), (kept, _, kept_entries)] = stage(r, "flaky", 2, 3)
    confirm(store, lost, lost_entries, lease=0.0)
    confirm(store, kept, kept_entries, lease=0.0)
    r.delete(store.key(lost))  # Redis lost the write (kill -9, appendfsync everysec)
    b = Bridge(settings, "flaky", Enqueuer(app, "flaky"))
    assert b.publish_due() == 2
    assert [args[1] for args in queued(r, "flaky")] == [kept]  # the other one is published
    assert stats.read(r, "flaky")["blobs_lost"] == 1
    assert r.zscore(c.due_key("flaky"), lost) is None
    assert not r.hexists(c.inflight_key("flaky"), lost) and store.in_flight()[0] == 1
    assert b.publish_due() == 0  # never retried
    b.r.close()


def test_the_crash_guard_dead_letters_a_batch_that_keeps_killing_its_worker(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    settings, _, _ = make(redis_url, tmp_path, DISPATCH_MAX_CRASHES="2")
    store, [(batch_id, token, entries)] = stage(r, "flaky", 1, 3)
    confirm(store, batch_id, entries)
    for _ in range(2):  # an attempt begins, then its worker is killed (the lease runs out)
        assert store.begin(batch_id, token, 10.0, 30.0).status == "run"
        r.delete(c.batch_lease_key("flaky", batch_id))
    result = Deliverer(settings).run("flaky", batch_id, token)
    assert result.outcome == "dead-lettered" and result.dead_lettered == 3
    assert calls(r) == []  # not sent again
    letters = xrange(r, c.deadletter_key("flaky"))
    assert all(b"killed their worker 2 times" in f[b"reason"] for _, f in letters)
    assert r.hlen(c.inflight_key("flaky")) == 0 and r.zcard(c.due_key("flaky")) == 0


def test_a_task_of_an_earlier_version_without_a_token_still_runs(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    _settings, app, _ = make(redis_url, tmp_path)
    store, [(batch_id, _, entries)] = stage(r, "flaky", 1, 4)
    confirm(store, batch_id, entries)
    r.hdel(c.tickets_key("flaky"), batch_id)  # an earlier version kept no ticket
    with worker(app, "flaky"):
        app.send_task(c.TASK_DELIVER, args=("flaky", batch_id, 4), queue="flaky")
        wait_for(lambda: len(jsonl(tmp_path / "flaky.jsonl")) == 4, what="delivery")
        wait_for(lambda: r.hlen(c.inflight_key("flaky")) == 0, what="finished")


class TimedOutage(OutageHelicone):
    """The outage server, noting when each failed request arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_at: list[float] = []

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.mode != "ok":
            with self.lock:
                self.failed_at.append(time.monotonic())
        return super().handle(headers, body)


def test_the_outage_gate_keeps_requests_low_during_a_vendor_outage(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    """A real HTTP server answers 503 for 6 s to 20 batches of 10 runs. Without the gate
    every batch retries on its own backoff (with these short delays: 20 batches x 10 runs x
    ~6 attempts, over a thousand requests); with it, only the attempts already under way
    when the outage began send (at most 4 workers x 10 runs), then one probe per gate
    period (doubling to the 2 s cap) reaches the server. Nothing dead-letters."""
    server = TimedOutage()
    server.start()
    try:
        settings, app, _ = make(
            redis_url, tmp_path, DISPATCH_HELICONE_API_KEY=server.api_key,
            DISPATCH_HELICONE_ENDPOINT=server.url, DISPATCH_HELICONE_CONCURRENCY="4",
            DISPATCH_BATCH_SIZE="10",
        )  # fmt: skip
        server.answer_503()
        ids = xadd_all(r, STREAM, [event(i) for i in range(200)])
        with bridge(settings, app, "helicone"), worker(app, "helicone", concurrency=4):
            wait_for(lambda: server.by_mode["503"] > 0, what="the outage hit")
            time.sleep(6)
            assert r.exists(c.gate_key("helicone"))
            server.recover()
            failed_at = list(server.failed_at)
            wait_for(lambda: set(server.counts()) == set(ids), timeout=40, what="all delivered")
            wait_for(lambda: r.hlen(c.inflight_key("helicone")) == 0, what="finished")
        first_wave = [t for t in failed_at if t - failed_at[0] < 0.5]
        probes = len(failed_at) - len(first_wave)
        # the 4 attempts under way (10 runs each) and at most the gate's first two probes
        # (its periods start at the 0.1 s base delay: probes at ~0.1 s and ~0.3 s)
        assert len(first_wave) <= 4 * 10 + 2, len(first_wave)
        # then about one request per gate period (doubling to the 2 s cap: ~5 in the 6 s);
        # bounded over the whole outage, as a loaded machine stretches the first wave
        # past 0.5 s
        assert probes >= 2, probes
        assert len(failed_at) <= 4 * 10 + 2 + 10, (len(first_wave), probes)
        assert r.xlen(c.deadletter_key("helicone")) == 0
        assert stats.read(r, "helicone")["gated"] > 0  # batches waited instead of sending
        assert not r.exists(c.gate_key("helicone"))  # the successful probe opened it
        assert sum(server.counts().values()) == 200  # every run accepted once
    finally:
        server.stop()


def test_an_xack_failure_at_finish_is_counted_and_logged_not_swallowed(
    redis_url: str, r: redis.Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings, _, _ = make(redis_url, tmp_path)
    store, [(batch_id, token, _entries)] = stage(r, "flaky", 1, 2)
    r.delete(STREAM)
    r.set(STREAM, "not a stream any more")  # XACK answers WRONGTYPE
    result = Deliverer(settings).run("flaky", batch_id, token)
    assert result.outcome == "delivered"  # the batch is finished all the same
    assert stats.read(r, "flaky")["xack_failed"] == 1
    assert any("could not be acknowledged" in m and "WRONGTYPE" in m for m in caplog.messages)
    assert store.in_flight() == (0, 0)
