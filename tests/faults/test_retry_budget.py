"""Fault 4: the vendor outage outlasts the retry budget (an hour by default; shortened here
with ``DISPATCH_RETRY_BUDGET``). Every batch dead-letters with the reason ("gave up after
<duration> without progress: <last reason>"), no earlier than the budget allows; after the
vendor recovers, the real ``dispatch dlq replay --service helicone`` delivers each dead
letter exactly once at the receiver (the run ids are stable), and the dead-letter stream is
empty afterwards.
"""

from __future__ import annotations

import time

import pytest

from dispatch_celery import constants as c
from tests.faults.kit import (
    Figures,
    Lab,
    OutageHelicone,
    Producer,
    Stack,
    account,
    dead_letters,
    dispatch_cli,
    settle,
)
from tests.harness import xrange

# One xdist worker runs the fault scenarios one after another: they time real outages.
pytestmark = [pytest.mark.faults, pytest.mark.xdist_group("faults")]


def scenario(
    lab: Lab, *, budget_s: float = 3.0, events: int = 60, base: float = 0.2, cap: float = 1.0
) -> Figures:
    fig = lab.figures_for("outage-beyond-budget", budget_s)
    server = OutageHelicone()
    server.start()
    server.answer_503()
    env = lab.env(
        DISPATCH_BATCH_SIZE="20",
        DISPATCH_HELICONE_API_KEY=server.api_key,
        DISPATCH_HELICONE_ENDPOINT=server.url,
        DISPATCH_HELICONE_CONCURRENCY="4",
        DISPATCH_RETRY_BUDGET=str(budget_s),
        DISPATCH_RETRY_BASE_DELAY=str(base),
        DISPATCH_RETRY_MAX_DELAY=str(cap),
    )
    stack = Stack(env, lab.tmp)
    producer = Producer(lab.redis_url, 1.0)
    r = lab.client()
    dlq = c.deadletter_key("helicone")
    try:
        published = producer.burst(events)
        stack.bridge("helicone")
        stack.worker("helicone", concurrency=2)
        stack.wait(lambda: server.by_mode["503"] > 0, 30, "the first request")
        first_failure = time.time()
        stack.wait(lambda: r.xlen(dlq) >= events, budget_s + 30, "every event dead-lettered")
        fig.fault_s = round(time.time() - first_failure, 1)
        fig.requests_during_outage = server.by_mode["503"]
        letters = dead_letters(r, "helicone")
        assert set(letters) == set(published)
        assert r.xlen(dlq) == events, "an event was dead-lettered twice"
        for why in letters.values():
            assert "gave up after" in why and "without progress" in why, why
            assert "503" in why, why  # the last reason is kept
        # the budget is a duration: nothing gave up before it was spent
        fields = [f for _, f in xrange(r, dlq)]
        earliest = min(float(f[b"ts"]) for f in fields)
        assert earliest - first_failure >= budget_s * 0.9, (
            f"dead-lettered {earliest - first_failure:.1f}s after the first failure, "
            f"budget {budget_s}s"
        )
        assert not server.counts(), "a run was accepted during the outage"
        fig.extra["dead_lettered_before_replay"] = len(letters)

        server.recover()
        replayed_at = time.monotonic()
        replay = dispatch_cli(env, "dlq", "replay", "--service", "helicone")
        assert replay.returncode == 0, replay.stderr
        assert f"replayed {events}" in replay.stdout, replay.stdout
        # from the replay on (nothing was accepted before it, asserted above): the replayed
        # batches may be delivered before the CLI process has even exited
        stack.wait(lambda: len(server.counts()) > 0, 60, "delivery to resume")
        fig.resume_s = round(time.monotonic() - replayed_at, 2)
        settle(lambda: set(server.counts()) >= set(published), timeout=60, stack=stack)
        settle(lambda: r.hlen(c.inflight_key("helicone")) == 0, timeout=20, stack=stack)
        stack.assert_running()
        got = server.counts()
        account(fig, published, got, dead_letters(r, "helicone"))
        assert max(got.values()) == 1, "a replayed dead letter was delivered twice"
        assert r.xlen(dlq) == 0, "the dead-letter stream is not empty after the replay"
        assert not server.violations, server.violations[:5]
    finally:
        producer.close()
        r.close()
        stack.close()
        server.stop()
    return fig


def test_an_outage_beyond_the_budget_dead_letters_and_replay_delivers_once(lab: Lab) -> None:
    scenario(lab)
