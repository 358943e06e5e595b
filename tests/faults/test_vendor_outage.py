"""Fault 3: the vendor is down for a while (60 s in the soak, ~9 s here): first it answers
503 to everything, then it refuses connections (the server is stopped), then it recovers.

Shorter than the retry budget, so no batch may dead-letter; everything arrives after the
recovery; and the backoff must not hammer the failing server: the outage gate lets one
probe request through per backoff step, so the requests the server sees during the outage
stay under a bound computed from the backoff settings (not from the number of batches).
"""

from __future__ import annotations

import math
import time

import pytest

from dispatch_celery import constants as c
from dispatch_celery import stats
from tests.faults.kit import (
    Figures,
    Lab,
    OutageHelicone,
    Producer,
    Stack,
    account,
    dead_letters,
    settle,
    wait_resumed,
)

# One xdist worker runs the fault scenarios one after another: they time real outages.
pytestmark = [pytest.mark.faults, pytest.mark.xdist_group("faults")]

BATCH = 20
SLOTS = 2  # worker pool processes


def outage_request_bound(seconds: float, base: float, cap: float) -> int:
    """Requests a failing vendor may see in ``seconds``: the attempts that began before the
    gate closed (one per pool slot, a whole batch each), then one probe per backoff step;
    steps double from ``base`` to ``cap`` and equal jitter makes each at least half its
    delay, hence twice the steps."""
    steps = math.log2(max(cap / base, 1.0)) + 1 + seconds / cap
    return SLOTS * BATCH + math.ceil(2 * steps) + 2


def scenario(
    lab: Lab,
    *,
    answer_503_s: float = 5.0,
    refuse_s: float = 4.0,
    rate: float = 30.0,
    base: float = 0.5,
    cap: float = 2.0,
) -> Figures:
    fig = lab.figures_for("vendor-outage", answer_503_s + refuse_s)
    server = OutageHelicone()
    server.start()
    env = lab.env(
        DISPATCH_BATCH_SIZE=str(BATCH),
        DISPATCH_HELICONE_API_KEY=server.api_key,
        DISPATCH_HELICONE_ENDPOINT=server.url,
        DISPATCH_HELICONE_CONCURRENCY="4",
        DISPATCH_HELICONE_CONNECT_TIMEOUT="1",
        DISPATCH_HELICONE_READ_TIMEOUT="2",
        DISPATCH_RETRY_BASE_DELAY=str(base),
        DISPATCH_RETRY_MAX_DELAY=str(cap),
    )
    stack = Stack(env, lab.tmp)
    producer = Producer(lab.redis_url, rate)
    r = lab.client()
    try:
        producer.burst(100)
        stack.bridge("helicone")
        stack.worker("helicone", concurrency=SLOTS)
        stack.wait(lambda: len(server.counts()) >= 20, 30, "delivery under way")
        producer.start()
        time.sleep(1)
        server.answer_503()
        started = time.monotonic()
        retries_before = stats.read(r, "helicone").get("retries", 0)
        time.sleep(answer_503_s)
        server.go_down()
        time.sleep(refuse_s)
        stack.assert_running()
        during = server.by_mode["503"]
        fig.requests_during_outage = during
        fig.extra["attempts_retried_during_outage"] = (
            stats.read(r, "helicone").get("retries", 0) - retries_before
        )
        fig.fault_s = round(time.monotonic() - started, 1)
        assert not dead_letters(r, "helicone"), "a batch dead-lettered during a short outage"
        server.recover()
        fig.resume_s = wait_resumed(lambda: len(server.counts()), 60, stack)
        time.sleep(2)
        producer.stop()
        published = producer.published()
        settle(lambda: set(server.counts()) >= set(published), timeout=60, stack=stack)
        settle(lambda: r.hlen(c.inflight_key("helicone")) == 0, timeout=20, stack=stack)
        stack.assert_running()
        account(fig, published, server.counts(), dead_letters(r, "helicone"))
        assert fig.dead_lettered == 0
        assert not server.violations, server.violations[:5]
        bound = outage_request_bound(answer_503_s, base, cap)
        fig.extra["request_bound"] = bound
        assert during <= bound, (
            f"{during} requests hit the failing server in {answer_503_s:g}s (bound {bound})"
        )
    finally:
        producer.close()
        r.close()
        stack.close()
        server.stop()
    return fig


def test_a_vendor_outage_shorter_than_the_budget_delivers_everything_gently(lab: Lab) -> None:
    scenario(lab)
