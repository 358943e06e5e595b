"""Helicone and Lunary end to end: real bridge, real Celery worker, local vendor servers
that enforce the documented contracts. Every assertion is about what the server got."""

from __future__ import annotations

import base64
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


def test_a_bad_helicone_key_dead_letters_the_batch_without_hammering(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    with FakeHelicone() as server:
        settings, app, _ = make(
            redis_url, tmp_path, DISPATCH_HELICONE_API_KEY="sk-wrong-key-000000000000",
            DISPATCH_HELICONE_ENDPOINT=server.url, DISPATCH_HELICONE_CONCURRENCY="4",
        )  # fmt: skip
        xadd_all(r, STREAM, [event(i) for i in range(30)])
        with bridge(settings, app, "helicone"), worker(app, "helicone"):
            wait_for(lambda: r.xlen(c.deadletter_key("helicone")) == 30, what="dead letters")
        assert sum(server.posts.values()) <= 4  # stopped at the first answers, not 30 tries
        letters = xrange(r, c.deadletter_key("helicone"))
        assert all(b"401" in f[b"reason"] for _, f in letters)
        assert not any(b"sk-wrong-key" in f[b"reason"] + f[b"data"] for _, f in letters)
        assert not server.logs


def test_lunary_stores_start_and_end_and_a_bad_run_is_dead_lettered_alone(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    with FakeLunary() as server:
        settings, app, _ = make(
            redis_url, tmp_path, DISPATCH_LUNARY_API_KEY=server.api_key,
            DISPATCH_LUNARY_ENDPOINT=server.url,
        )  # fmt: skip
        server.fail_event(rid(4), "start", "Connection terminated unexpectedly")  # transient
        server.fail_event(rid(9), "start", "invalid input syntax for type json")  # permanent
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
        assert stats.read(r, "lunary")["delivered"] == 25
