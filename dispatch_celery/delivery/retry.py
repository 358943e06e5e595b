"""The retry policy: the one module that decides when a batch is tried again, when it is
given up, and when a service is too broken to send to at all.

Nothing else decides. The batch state it reads and writes lives in Redis
(``batches.state``: one HASH per batch, kept across worker crashes); this module is pure
arithmetic over that state plus the two per-service switches below, so it is tested
without a worker.

Per batch:

* **Budget.** ``DISPATCH_RETRY_BUDGET`` seconds (default 3600) of attempts *without
  progress*: the clock starts when an attempt fails, keeps running while the batch waits,
  and resets when an attempt settles anything (a run delivered or rejected). Time spent
  while the service is paused for bad credentials does not count. When it is spent, the
  pending runs are dead-lettered with "gave up after <duration> without progress: <last
  reason>".
* **Backoff.** ``d = min(DISPATCH_RETRY_MAX_DELAY, DISPATCH_RETRY_BASE_DELAY * 2^(n-1))``
  for the n-th failure in a row, with *equal* jitter ``d/2 + U(0, d/2)``: it spreads load
  but never halves the budget the way full jitter over many attempts does. A server's
  Retry-After wins when longer. The last wait is cut to land exactly at the budget's end,
  so the final attempt happens at the end, not before it.
* **Crash guard.** An attempt that began and never ended (its worker was killed, the task
  raised past the handler) is counted at the next begin; after ``DISPATCH_MAX_CRASHES``
  such attempts in a row (default 5) the batch is dead-lettered ("killed its worker N
  times"). Crashed attempts are spaced by the lease (a killed attempt is re-published
  when its lease ends) or by backoff (an exception).
* Waits are **not** broker countdowns: the batch stays in Redis with a due time and a
  bridge re-publishes it when due (see ``batches.state``). A countdown task that waits in
  the broker longer than the visibility timeout is redelivered and runs twice; the due
  index has no such limit, so waits can be as long as the budget needs.

Per service:

* **Outage gate.** When an attempt fails at the service level (every run transient: 5xx,
  connection refused, timeout), the gate closes for ``delay`` (doubling per failed probe
  from the base delay up to the max delay, at least the Retry-After). Batches that begin
  while it is closed send nothing: they are parked until its end plus jitter (not counted
  as attempts; their budget clock runs). At the gate's end one attempt wins the probe and
  runs with ``DeliveryContext.probe`` (one request first; on failure the rest stays
  unsent). Any attempt that delivers something opens the gate and wakes the parked
  batches. An outage of an hour thus costs a few requests per gate period, not one per
  batch per backoff step.
* **Credentials pause.** ``CredentialsError`` (or ``DeliveryReport.credentials_refused``)
  pauses the service: nothing is dead-lettered, runs already delivered stay delivered,
  the reason (naming the variable to fix) is kept for ``dispatch health``. One attempt
  probes every ``DISPATCH_CREDENTIALS_PROBE_INTERVAL`` seconds (default 30); the others
  stay parked. A probe that delivers resumes the service and wakes everyone. A worker
  that starts clears the probe interval, so after fixing the key and restarting, the next
  attempt probes at once.

Timing bound (``check_timing``, called by ``Settings.validate``): an attempt holds its
task message unacknowledged for at most ``task_time_limit``; that plus the lease margin
must stay below the broker's visibility timeout, or the Redis transport redelivers a
running task (harmless now, the copy finds the batch busy, but wasteful). Nothing else
waits in the broker.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatch_celery.batches.state import BatchRetryState
from dispatch_celery.errors import ConfigError

if TYPE_CHECKING:
    from dispatch_celery.settings import Settings


def lease_margin(task_time_limit: float) -> float:
    """Slack after an attempt's hard time limit before its lease ends (kill, cleanup)."""
    return max(2.0, min(10.0, task_time_limit * 0.1))


def check_timing(settings: Settings) -> None:
    """The settings' timing rules; ``ConfigError`` naming the variables otherwise."""
    held = settings.task_time_limit + lease_margin(settings.task_time_limit)
    if held >= settings.visibility_timeout:
        raise ConfigError(
            f"DISPATCH_TASK_TIME_LIMIT ({settings.task_time_limit} s) plus its margin "
            f"({lease_margin(settings.task_time_limit):g} s) must stay below "
            f"DISPATCH_VISIBILITY_TIMEOUT ({settings.visibility_timeout} s), or the broker "
            "redelivers running tasks"
        )
    if settings.retry_base_delay > settings.retry_max_delay:
        raise ConfigError(
            f"DISPATCH_RETRY_BASE_DELAY ({settings.retry_base_delay:g} s) must not exceed "
            f"DISPATCH_RETRY_MAX_DELAY ({settings.retry_max_delay:g} s)"
        )


def format_duration(seconds: float) -> str:
    """``"1h 0m"``, ``"4m 30s"``, ``"2.0s"``: for reasons people read."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes}m"


def gave_up_reason(spent: float, reason: str) -> str:
    """The dead-letter reason of a run whose budget ran out."""
    return f"gave up after {format_duration(spent)} without progress: {reason}"


@dataclass(frozen=True, slots=True)
class Decision:
    """After a failed attempt (or a parked begin): give up, or come back at ``due``."""

    give_up: bool
    due: float = 0.0
    reason: str = ""  # the dead-letter reason when giving up
    spent: float = 0.0  # budget used, to store
    last: float = 0.0  # clock tick, to store


@dataclass(frozen=True)
class RetryPolicy:
    base: float
    cap: float
    budget: float
    max_crashes: int
    probe_interval: float
    lease: float  # an attempt's lease: task time limit plus margin
    rng: random.Random

    @classmethod
    def from_settings(cls, settings: Settings, rng: random.Random | None = None) -> RetryPolicy:
        limit = settings.task_time_limit
        return cls(
            base=settings.retry_base_delay,
            cap=settings.retry_max_delay,
            budget=settings.retry_budget,
            max_crashes=settings.max_crashes,
            probe_interval=settings.credentials_probe_interval,
            lease=limit + lease_margin(limit),
            rng=rng or random.Random(),
        )

    # --- one batch -----------------------------------------------------------------------

    def step(self, n: int) -> float:
        """The un-jittered n-th backoff step (n >= 1)."""
        return min(self.cap, self.base * 2.0 ** max(0, n - 1))

    def backoff(self, n: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the n-th failure in a row: equal jitter, Retry-After wins."""
        d = self.step(n)
        delay = d / 2 + self.rng.uniform(0, d / 2)
        if retry_after is not None and retry_after > delay:
            delay = retry_after
        return delay

    def after_failure(
        self,
        state: BatchRetryState,
        now: float,
        reason: str,
        retry_after: float | None = None,
        *,
        progressed: bool = False,
    ) -> Decision:
        """An attempt left runs pending: come back after backoff, or give up."""
        if progressed:  # progress resets the clock: this failure starts a new budget
            return Decision(False, now + self.backoff(1, retry_after), spent=0.0, last=now)
        spent = state.spent_at(now)
        if spent >= self.budget:
            return self._give_up(spent, reason, now)
        delay = min(self.backoff(max(1, state.attempts), retry_after), self.budget - spent)
        return Decision(False, now + delay, spent=spent, last=now)

    def parked(
        self, state: BatchRetryState, now: float, wake_at: float, spread: float, reason: str
    ) -> Decision:
        """A batch that began while the outage gate was closed: it sends nothing and comes
        back at the gate's end plus jitter. Its budget clock runs (it is failing), so a
        batch whose budget ends first gives up at the end of its budget."""
        spent = state.spent_at(now) if state.last else 0.0
        if spent >= self.budget:
            return self._give_up(spent, reason, now)
        due = max(wake_at, now) + self.rng.uniform(0, max(spread, 0.0))
        due = min(due, now + (self.budget - spent))
        return Decision(False, due, spent=spent, last=now)

    def paused(self, state: BatchRetryState, now: float, *, prober: bool) -> Decision:
        """The service is paused: the clock stops. The prober comes back after one probe
        interval (it probes again), the others stay parked until a probe wakes them, or
        after the max delay at the latest."""
        if prober:
            due = now + self.probe_interval * (1 + self.rng.uniform(0, 0.2))
        else:
            wait = max(self.cap, self.probe_interval)
            due = now + wait * (1 + self.rng.uniform(0, 0.5))
        return Decision(False, due, spent=state.spent, last=now if state.last else 0.0)

    def after_crash(self, state: BatchRetryState, now: float) -> float:
        """Due time after an attempt raised past the handler (counted as a crash later)."""
        return now + self.backoff(max(1, state.crashes + 1))

    def crashed_out(self, state: BatchRetryState) -> str | None:
        """The dead-letter reason when the crash guard trips, else None."""
        if state.crashes >= self.max_crashes:
            return (
                f"gave up: the attempts on this batch killed their worker {state.crashes} times "
                "in a row (never reached an end)"
            )
        return None

    def _give_up(self, spent: float, reason: str, now: float) -> Decision:
        return Decision(True, reason=gave_up_reason(spent, reason), spent=spent, last=now)

    # --- the service ---------------------------------------------------------------------

    def gate_delay(self, previous: float, retry_after: float | None) -> float:
        """How long the gate closes: the base delay first, doubling per failed probe up to
        the max delay, and at least the server's Retry-After."""
        delay = self.base if previous <= 0 else min(self.cap, previous * 2)
        return max(delay, retry_after or 0.0)

    def gate_spread(self, delay: float) -> float:
        """Parked batches wake over this many seconds after the gate's end."""
        return max(self.base, delay / 2)

    def wake_spread(self, parked: int) -> float:
        """Woken batches are spread over this many seconds (roughly 100 per second)."""
        return min(self.cap, max(0.0, parked / 100.0))
