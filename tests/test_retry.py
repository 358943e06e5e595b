"""The retry policy (``delivery.retry``): budget, backoff, give-up, crash guard, outage gate
arithmetic and the timing bound. Pure functions over the batch state, plus the settings."""

from __future__ import annotations

import random

import pytest

from dispatch_celery.batches.state import BatchRetryState
from dispatch_celery.delivery.retry import RetryPolicy, check_timing, format_duration
from dispatch_celery.errors import ConfigError
from dispatch_celery.settings import load_settings


def policy(**env: str) -> RetryPolicy:
    return RetryPolicy.from_settings(load_settings(env), rng=random.Random(7))


def simulate_outage(p: RetryPolicy, outage_s: float, attempt_s: float = 0.5) -> list[float]:
    """Attempt times of one batch against a server that fails for ``outage_s``; stops at the
    first success or when the policy gives up."""
    now, state, times = 0.0, BatchRetryState(), []
    while True:
        times.append(now)
        now += attempt_s
        state = BatchRetryState(attempts=state.attempts + 1, spent=state.spent, last=state.last)
        if times[-1] >= outage_s:
            return times  # delivered
        d = p.after_failure(state, now, "503")
        if d.give_up:
            return times
        state = BatchRetryState(attempts=state.attempts, spent=d.spent, last=d.last)
        now = d.due


def test_equal_jitter_stays_within_half_to_full_step_and_retry_after_wins() -> None:
    p = policy(DISPATCH_RETRY_BASE_DELAY="2", DISPATCH_RETRY_MAX_DELAY="300")
    for n in range(1, 12):
        step = min(300.0, 2.0 * 2 ** (n - 1))
        for _ in range(50):
            assert step / 2 <= p.backoff(n) <= step
    assert p.backoff(1, retry_after=45) == 45
    assert p.backoff(10, retry_after=1) >= 150  # a short Retry-After does not shorten it


def test_the_budget_is_a_duration_not_a_number_of_attempts() -> None:
    """Issue 8: full jitter over 8 attempts gave up inside a minute. With the defaults
    (budget 3600 s, base 2 s, cap 300 s), a 60-s outage is ridden out, and a longer one is
    given up after the hour, with the last attempt at the budget's end and few requests."""
    p = policy()
    assert p.budget == 3600 and p.cap == 300
    times = simulate_outage(p, 60)
    assert times[-1] >= 60 and len(times) <= 8  # delivered after the outage, not given up
    times = simulate_outage(p, 10**9)
    first_failure = 0.5
    assert times[-1] - first_failure == pytest.approx(3600, abs=1.0)  # the last at the end
    assert len(times) <= 25  # over an hour, one batch tries ~20 times, not hundreds


def test_give_up_names_the_duration_and_the_last_reason() -> None:
    p = policy(DISPATCH_RETRY_BUDGET="2")
    state = BatchRetryState(attempts=3, spent=1.5, last=100.0)
    d = p.after_failure(state, 100.6, "helicone: 503 Service Unavailable")
    assert d.give_up
    assert d.reason == "gave up after 2.1s without progress: helicone: 503 Service Unavailable"
    assert format_duration(3600) == "1h 0m" and format_duration(270) == "4m 30s"


def test_the_last_wait_is_cut_to_land_at_the_budgets_end() -> None:
    p = policy(DISPATCH_RETRY_BUDGET="100", DISPATCH_RETRY_BASE_DELAY="50")
    d = p.after_failure(BatchRetryState(attempts=5, spent=90.0, last=1000.0), 1000.0, "x")
    assert not d.give_up and d.due == pytest.approx(1010.0)


def test_progress_resets_the_clock() -> None:
    p = policy(DISPATCH_RETRY_BUDGET="10")
    d = p.after_failure(
        BatchRetryState(attempts=9, spent=9.9, last=50.0), 60.0, "x", progressed=True
    )
    assert not d.give_up and d.spent == 0 and d.last == 60.0
    assert d.due - 60.0 <= p.step(1)  # backoff starts over


def test_a_parked_batch_keeps_its_clock_running_and_gives_up_at_the_end() -> None:
    p = policy(DISPATCH_RETRY_BUDGET="60")
    state = BatchRetryState(attempts=1, spent=10.0, last=100.0)
    d = p.parked(state, 120.0, wake_at=500.0, spread=5.0, reason="503")
    assert not d.give_up and d.spent == 30.0
    assert d.due == pytest.approx(150.0)  # the gate ends after the budget: come back at its end
    d = p.parked(BatchRetryState(attempts=1, spent=59.0, last=100.0), 101.5, 500.0, 5.0, "503")
    assert d.give_up and "without progress: 503" in d.reason


def test_a_paused_service_stops_the_clock() -> None:
    p = policy(DISPATCH_CREDENTIALS_PROBE_INTERVAL="30")
    state = BatchRetryState(attempts=2, spent=40.0, last=100.0)
    prober = p.paused(state, 5000.0, prober=True)
    assert not prober.give_up and prober.spent == 40.0 and prober.last == 5000.0
    assert 5030.0 <= prober.due <= 5036.0
    parked = p.paused(state, 5000.0, prober=False)
    assert parked.due >= 5000.0 + p.cap  # parked until a probe wakes it


def test_the_crash_guard_trips_after_max_crashes() -> None:
    p = policy(DISPATCH_MAX_CRASHES="3")
    assert p.crashed_out(BatchRetryState(crashes=2)) is None
    reason = p.crashed_out(BatchRetryState(crashes=3))
    assert reason is not None and "killed their worker 3 times" in reason


def test_the_gate_doubles_from_the_base_to_the_cap_and_honours_retry_after() -> None:
    p = policy(DISPATCH_RETRY_BASE_DELAY="2", DISPATCH_RETRY_MAX_DELAY="300")
    delays = [0.0]
    for _ in range(10):
        delays.append(p.gate_delay(delays[-1], None))
    assert delays[1:] == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert p.gate_delay(0.0, retry_after=120) == 120


def test_timing_bound_and_the_retired_max_attempts() -> None:
    with pytest.raises(ConfigError, match=r"DISPATCH_TASK_TIME_LIMIT.*DISPATCH_VISIBILITY_TIMEOUT"):
        load_settings({"DISPATCH_VISIBILITY_TIMEOUT": "100", "DISPATCH_TASK_TIME_LIMIT": "95"})
    with pytest.raises(ConfigError, match="DISPATCH_RETRY_BASE_DELAY"):
        load_settings({"DISPATCH_RETRY_BASE_DELAY": "10", "DISPATCH_RETRY_MAX_DELAY": "5"})
    with pytest.raises(ConfigError, match=r"DISPATCH_MAX_ATTEMPTS.*DISPATCH_RETRY_BUDGET"):
        load_settings({"DISPATCH_MAX_ATTEMPTS": "8"})
    for name in ("DISPATCH_RETRY_BUDGET", "DISPATCH_MAX_CRASHES", "DISPATCH_QUEUE_LEASE"):
        with pytest.raises(ConfigError, match=name):
            load_settings({name: "soon"})
    s = load_settings({})
    check_timing(s)  # the defaults hold
    assert (s.retry_budget, s.max_crashes, s.credentials_probe_interval) == (3600, 5, 30)
    assert (s.retry_max_delay, s.queue_lease) == (300, 300)
