"""Helicone and Lunary end to end: real bridge, real Celery worker, local vendor servers
that enforce the documented contracts. Every assertion is about what the server got."""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path

import orjson
import redis

from dispatch_celery import constants as c
from dispatch_celery import stats
from tests.harness import bridge, event, make, wait_for, worker, xadd_all, xrange
from tests.vendor_servers import FakeHelicone, FakeLunary, Fault

STREAM = "llm-proxy-events"


def rid(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


def with_secret(i: int) -> bytes:
    """An event whose prompt carries an API key and whose response sets a cookie."""
    doc = orjson.loads(event(i))
    request = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "my key is sk-proj-abcdefghijklmnop1234"}],
    }
    doc["RequestBody"] = base64.b64encode(orjson.dumps(request)).decode()
    doc["ResponseHeaders"]["Set-Cookie"] = ["session=very-secret-cookie"]
    return orjson.dumps(doc)


def test_helicone_gets_every_run_once_and_retries_only_the_failed_ones(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    with FakeHelicone() as server:
        settings, app, _ = make(
            redis_url, tmp_path, DISPATCH_BATCH_SIZE="50",
            DISPATCH_HELICONE_API_KEY=server.api_key, DISPATCH_HELICONE_ENDPOINT=server.url,
        )  # fmt: skip
        for i in (3, 17, 41):
            server.fail_run(rid(i), Fault(status=500))
        server.fail_run(rid(20), Fault(status=429, headers={"Retry-After": "1"}))
        xadd_all(r, STREAM, [event(i) for i in range(60)] + [with_secret(60)])
        with bridge(settings, app, "helicone"), worker(app, "helicone"):
            wait_for(lambda: len(server.logs) == 61, what="61 runs at Helicone")
            wait_for(lambda: r.hlen(c.inflight_key("helicone")) == 0, what="batches finished")
        assert not server.violations
        assert {k for k, n in server.posts.items() if n == 2} == {rid(i) for i in (3, 17, 20, 41)}
        assert sum(server.posts.values()) == 61 + 4  # the retries re-sent only those four
        sent = orjson.dumps(server.logs[rid(60)]).decode()
        assert "sk-proj-abcdefghijklmnop1234" not in sent and "very-secret-cookie" not in sent
        log = server.logs[rid(5)]
        assert log["providerResponse"]["json"]["usage"]["total_tokens"] == 7
        assert stats.read(r, "helicone")["delivered"] == 61


def test_a_bad_helicone_key_pauses_the_service_without_hammering_then_resumes(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    """A refused key pauses the service: nothing is dead-lettered, the server gets a probe
    per interval (not a request per run per retry), `dispatch health` fails naming the
    variable, and delivery resumes once the key works (here: the vendor accepts it again)."""
    from dispatch_celery.ops.health import check_health

    with FakeHelicone() as server:
        settings, app, _ = make(
            redis_url, tmp_path, DISPATCH_HELICONE_API_KEY="sk-wrong-key-000000000000",
            DISPATCH_HELICONE_ENDPOINT=server.url, DISPATCH_HELICONE_CONCURRENCY="4",
            DISPATCH_BATCH_SIZE="10", DISPATCH_CREDENTIALS_PROBE_INTERVAL="1",
        )  # fmt: skip
        xadd_all(r, STREAM, [event(i) for i in range(30)])
        with bridge(settings, app, "helicone"), worker(app, "helicone"):
            wait_for(lambda: bool(r.exists(c.pause_key("helicone"))), what="the service paused")
            time.sleep(3)  # three probe intervals while paused
            assert r.xlen(c.deadletter_key("helicone")) == 0  # nothing dead-lettered
            assert not server.logs
            # the first answers (<= the concurrency of the attempts under way) and a probe
            # per interval, not 30 runs times every retry
            assert len(server.received) <= 4 * 3 + 6, len(server.received)
            report = check_health(settings, services=["helicone"], only=["paused"])
            assert not report.healthy
            paused = next(ch for ch in report.checks if ch.name == "paused")
            assert "DISPATCH_HELICONE_API_KEY" in paused.detail
            assert "sk-wrong-key" not in paused.detail
            assert r.hlen(c.inflight_key("helicone")) == 3  # the batches wait in flight
            server.api_key = "sk-wrong-key-000000000000"  # the vendor accepts the key now
            wait_for(lambda: len(server.logs) == 30, what="30 runs at Helicone after the fix")
            wait_for(lambda: r.hlen(c.inflight_key("helicone")) == 0, what="batches finished")
        assert not r.exists(c.pause_key("helicone"))
        assert check_health(settings, services=["helicone"], only=["paused"]).healthy
        assert r.xlen(c.deadletter_key("helicone")) == 0
        assert stats.read(r, "helicone")["delivered"] == 30
        assert set(server.posts.values()) == {1}  # each run accepted exactly once


def test_lunary_stores_start_and_end_and_a_failing_run_is_dead_lettered_alone(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    """Lunary's per-event errors are free text, so every one is transient: run 4 fails once
    and is stored on retry; run 9 keeps failing and is dead-lettered alone when its retry
    budget (2 s here) is spent, while the other 24 runs of its batch were delivered."""
    with FakeLunary() as server:
        settings, app, _ = make(
            redis_url, tmp_path, DISPATCH_LUNARY_API_KEY=server.api_key,
            DISPATCH_LUNARY_ENDPOINT=server.url, DISPATCH_RETRY_BUDGET="2",
        )  # fmt: skip
        server.fail_event(rid(4), "start", "Connection terminated unexpectedly")  # once
        server.fail_event(rid(9), "start", *["invalid input syntax for type json"] * 500)
        xadd_all(r, STREAM, [event(i) for i in range(25)] + [event(25, status=500)])
        with bridge(settings, app, "lunary"), worker(app, "lunary"):
            wait_for(
                lambda: r.hlen(c.inflight_key("lunary")) == 0 and len(server.runs) >= 25,
                what="batch finished",
            )
        assert not server.violations
        # the ends whose start failed were dropped by Lunary, so those runs were not counted
        # delivered: run 4 was retried (start and end again) and is stored complete
        assert {e["runId"] for e in server.dropped} == {rid(4), rid(9)}
        stored = {k: v for k, v in server.runs.items() if v["status"] in {"success", "error"}}
        assert set(stored) == {rid(i) for i in range(26)} - {rid(9)}
        assert stored[rid(0)]["tokens"] == {"prompt": 5, "completion": 2}
        assert stored[rid(25)]["status"] == "error"
        letters = xrange(r, c.deadletter_key("lunary"))
        assert len(letters) == 1 and letters[0][1][b"event_id"].decode() == rid(9)
        assert b"invalid input syntax" in letters[0][1][b"reason"]
        assert re.match(rb"gave up after 2\.\ds without progress: ", letters[0][1][b"reason"])
        assert stats.read(r, "lunary")["delivered"] == 25
