"""The shared rate limiter against a real Redis: spacing, burst, 429 pause, several processes."""

from __future__ import annotations

import itertools
import multiprocessing
import time
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dispatch_celery import constants as c
from dispatch_celery.backend import DeliveryContext
from dispatch_celery.backends.helicone import HeliconeBackend
from dispatch_celery.delivery.ratelimit import Rate, RateLimiter, RateLimitWait, parse_rate
from dispatch_celery.errors import ConfigError, TransientDeliveryError
from dispatch_celery.settings import load_settings
from tests.conftest import free_port
from tests.vendor_servers import FakeHelicone, Fault, chat_runs


@pytest.mark.parametrize(
    ("spec", "count", "period"),
    [("150/m", 150, 60), ("20/s", 20, 1), ("1000/h", 1000, 3600), (" 10 / 5min ", 10, 300),
     ("2.5/sec", 2.5, 1), ("86400/d", 86400, 86400)],
)  # fmt: skip
def test_parse_rate(spec: str, count: float, period: float) -> None:
    assert parse_rate(spec) == Rate(count, period)


@pytest.mark.parametrize("spec", ["", "150", "abc/m", "0/s", "10/x", "-1/s", "10/0s", "1/m/s"])
def test_invalid_rate_names_the_variable(r: redis.Redis, spec: str) -> None:
    settings = load_settings({"DISPATCH_LUNARY_RATE_LIMIT": spec or "  /m"})
    with pytest.raises(ConfigError, match="DISPATCH_LUNARY_RATE_LIMIT"):
        RateLimiter.from_settings(r, "lunary", settings)


def test_invalid_burst_names_the_variable(r: redis.Redis) -> None:
    env = {"DISPATCH_LUNARY_RATE_LIMIT": "1/s", "DISPATCH_LUNARY_RATE_LIMIT_BURST": "0"}
    with pytest.raises(ConfigError, match="DISPATCH_LUNARY_RATE_LIMIT_BURST"):
        RateLimiter.from_settings(r, "lunary", load_settings(env))


def test_from_settings(r: redis.Redis) -> None:
    env = {"DISPATCH_LUNARY_RATE_LIMIT": "150/m", "DISPATCH_LUNARY_RATE_LIMIT_BURST": "3"}
    limiter = RateLimiter.from_settings(r, "lunary", load_settings(env))
    assert limiter.rate == Rate(150, 60)
    assert limiter.burst == 3
    assert limiter.rate.interval == pytest.approx(0.4)
    unlimited = RateLimiter.from_settings(r, "helicone", load_settings({}))
    assert not unlimited.limited  # pause-only: a 429 must still slow everyone


def test_requests_are_spaced_by_the_rate(r: redis.Redis) -> None:
    limiter = RateLimiter(r, "svc", Rate(20, 1))
    started = time.monotonic()
    for _ in range(7):
        limiter.acquire()
    elapsed = time.monotonic() - started
    assert 0.27 <= elapsed < 0.6  # the first is free, then 6 x 50 ms
    assert r.exists(c.ratelimit_key("svc"))


def test_burst_goes_at_once_then_the_rate_applies(r: redis.Redis) -> None:
    limiter = RateLimiter(r, "svc", Rate(10, 1), burst=5)
    assert [limiter.try_acquire() for _ in range(5)] == [0.0] * 5
    wait = limiter.try_acquire()
    assert 0.05 < wait <= 0.1
    with pytest.raises(ValueError, match="burst"):
        limiter.try_acquire(cost=6)


def test_slow_down_pauses_every_limiter_of_the_service(r: redis.Redis, redis_url: str) -> None:
    other_worker = redis.Redis.from_url(redis_url)
    mine = RateLimiter(r, "svc", None)  # pause-only: no rate configured
    theirs = RateLimiter(other_worker, "svc", Rate(1000, 1))
    elsewhere = RateLimiter(other_worker, "another-svc", None)

    mine.slow_down(0.3)
    mine.slow_down(0.05)  # never shortens a pause another worker set
    assert 0.2 < theirs.pause_remaining() <= 0.3
    started = time.monotonic()
    theirs.acquire()
    assert time.monotonic() - started >= 0.25
    assert elsewhere.try_acquire() == 0.0
    other_worker.close()


def test_acquire_gives_up_after_max_wait(r: redis.Redis) -> None:
    limiter = RateLimiter(r, "svc", Rate(1, 60), max_wait=0.1)
    limiter.acquire()
    started = time.monotonic()
    with pytest.raises(RateLimitWait) as info:
        limiter.acquire()
    assert time.monotonic() - started < 0.1  # told at once, not after sleeping
    assert info.value.retry_after is not None
    assert 59 < info.value.retry_after <= 60
    assert isinstance(info.value, TransientDeliveryError)


def test_unreachable_redis_is_transient() -> None:
    client = redis.Redis(port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    limiter = RateLimiter(client, "svc", Rate(1, 1))
    with pytest.raises(TransientDeliveryError, match="rate limiter unavailable"):
        limiter.acquire()
    limiter.slow_down(1)  # best effort: logs, does not raise


def _hammer(url: str, window: float, go: Any, start: Any, out: Any) -> None:
    client = redis.Redis.from_url(url)
    limiter = RateLimiter(client, "shared", Rate(20, 1))
    client.ping()
    out.put("ready")
    go.wait(60)
    until = start.value + window
    stamps = []
    while True:
        limiter.acquire()
        now = time.time()
        if now >= until:
            break
        stamps.append(now)
    out.put(stamps)


def test_processes_share_one_limit(redis_url: str, r: redis.Redis) -> None:
    # spawn, not fork: a child forked from a process with threads (pytest-xdist's, or those
    # an earlier test left) can inherit a lock held by one of them and hang
    ctx = multiprocessing.get_context("spawn")
    out, go, start_at = ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    window = 1.5
    procs = [
        ctx.Process(target=_hammer, args=(redis_url, window, go, start_at, out)) for _ in range(2)
    ]
    for proc in procs:
        proc.start()
    assert [out.get(timeout=60) for _ in procs] == ["ready", "ready"]
    start = start_at.value = time.time() + 0.3  # both children are running before it opens
    go.set()
    per_process = [out.get(timeout=30) for _ in procs]
    for proc in procs:
        proc.join(5)
    stamps = sorted(s for batch in per_process for s in batch if s >= start)
    # GCRA bound: at most burst + window * rate admissions in the window.
    assert len(stamps) <= 1 + window * 20 + 1  # +1: a clock tick at the window's edge
    assert len(stamps) >= window * 20 * 0.8  # and the limit is not starving them either
    assert all(len(batch) > 5 for batch in per_process)  # both made progress
    # Even spacing across processes: no two admissions closer than the interval, minus jitter.
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert min(gaps) > 0.02


def _helicone(server: FakeHelicone, concurrency: int) -> HeliconeBackend:
    env = {
        "DISPATCH_HELICONE_API_KEY": server.api_key,
        "DISPATCH_HELICONE_ENDPOINT": server.url,
        "DISPATCH_HELICONE_CONCURRENCY": str(concurrency),
    }
    return HeliconeBackend.from_settings("helicone", load_settings(env))


def _ctx(limiter: RateLimiter) -> DeliveryContext:
    return DeliveryContext("helicone", "b", 1, acquire=limiter.acquire, slow_down=limiter.slow_down)


def test_a_vendor_429_pauses_every_worker(r: redis.Redis, redis_url: str) -> None:
    settings = load_settings({})
    limiter = RateLimiter.from_settings(r, "helicone", settings)  # no rate: pause only
    with FakeHelicone() as server:
        server.fail_next(Fault(429, {"Retry-After": "1"}))
        backend = _helicone(server, 1)
        with pytest.raises(TransientDeliveryError):
            backend.deliver(chat_runs(3), _ctx(limiter))
        backend.close()
    other_worker = RateLimiter(redis.Redis.from_url(redis_url), "helicone", None)
    assert 0.5 < other_worker.pause_remaining() <= 1.0
    assert other_worker.try_acquire() > 0.5


def test_concurrent_sends_respect_the_shared_rate(r: redis.Redis) -> None:
    limiter = RateLimiter(r, "helicone", Rate(40, 1))
    with FakeHelicone() as server:
        backend = _helicone(server, 8)
        started = time.monotonic()
        report = backend.deliver(chat_runs(9), _ctx(limiter))
        elapsed = time.monotonic() - started
        backend.close()
        assert report.deferred == {}
        assert len(server.logs) == 9
    assert elapsed >= 8 / 40 * 0.9  # 9 requests: the first free, then 25 ms apart


def _evalsha_calls(r: redis.Redis) -> int:
    stats: dict[str, Any] = r.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_a_pause_only_limiter_asks_redis_rarely_and_still_sees_a_pause_soon(
    r: redis.Redis, redis_url: str
) -> None:
    """No rate configured: a request per run costs no round trip each, a 429 another worker
    met holds this one back within PAUSE_RECHECK_S, and the worker that met it at once."""
    from dispatch_celery.delivery.ratelimit import PAUSE_RECHECK_S

    mine = RateLimiter(r, "svc", None)
    before = _evalsha_calls(r)
    for _ in range(200):
        mine.acquire()
    assert _evalsha_calls(r) - before <= 3  # one check per PAUSE_RECHECK_S, not 200
    other = redis.Redis.from_url(redis_url)
    theirs = RateLimiter(other, "svc", None)
    theirs.slow_down(0.5)  # another worker met a 429
    time.sleep(PAUSE_RECHECK_S * 1.5)
    started = time.monotonic()
    mine.acquire()
    assert time.monotonic() - started >= 0.3  # waited out the shared pause
    theirs.acquire()  # past the pause now: admitted
    theirs.slow_down(0.3)  # the worker that met it is held back at once, cache or not
    started = time.monotonic()
    theirs.acquire()
    assert time.monotonic() - started >= 0.2
    other.close()
