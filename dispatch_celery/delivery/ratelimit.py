"""A rate limit per backend, shared by every worker process on every host, kept in Redis.

``DISPATCH_<SERVICE>_RATE_LIMIT`` (``150/m``, ``20/s``, ``1000/h``; optional
``DISPATCH_<SERVICE>_RATE_LIMIT_BURST``, default 1) sets it. It is a GCRA (generic cell rate
algorithm): one key holds the theoretical arrival time (TAT) of the next request, and one
Lua script, run atomically by Redis against Redis's own clock (so hosts need not agree on
time), either admits a request and moves the TAT on, or says how many milliseconds to wait.
Requests are spaced evenly; at most ``burst`` go out back to back. In any window of T
seconds at most ``burst + T * rate`` requests are admitted.

A vendor's 429 slows every sender: ``slow_down(seconds)`` sets a pause key that the same
script checks first, so every worker's ``acquire`` waits until it expires. That part works
without a configured rate too: ``from_settings`` always returns a limiter, a pause-only one
when no rate is set. A pause-only limiter that found no pause admits without asking Redis
again for ``PAUSE_RECHECK_S``: a request per run then costs no Redis round trip (it was a
quarter of a Helicone worker's CPU, measured with ``benchmarks/cost.py`` and py-spy), and
a 429 met by another worker holds this one back within 50 ms (the worker that met it is
held back at once).

Why not the ``limits`` package: its Redis strategies (fixed/moving/sliding window) answer
"allowed now?" but neither how long to wait under even spacing nor a shared pause; a
blocking ``acquire`` would have to poll. One script call per request does both.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass

import redis

from dispatch_celery import constants as c
from dispatch_celery.errors import ConfigError, TransientDeliveryError
from dispatch_celery.settings import Settings

log = logging.getLogger(__name__)

# A blocked acquire() gives up after this share of the task's time limit and lets the core
# retry the rest later, so waiting never runs into the hard time limit.
MAX_WAIT_SHARE = 0.25
# A pause-only limiter re-reads the shared 429 pause at most this often.
PAUSE_RECHECK_S = 0.05
_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE_RE = re.compile(
    r"^\s*(?P<count>\d+(?:\.\d+)?)\s*/\s*(?P<n>\d+(?:\.\d+)?)?\s*"
    r"(?P<unit>s|sec|second|m|min|minute|h|hr|hour|d|day)s?\s*$",
    re.IGNORECASE,
)

# KEYS[1] TAT key, KEYS[2] pause key. ARGV: interval ms (0 = pause only), burst, cost.
# Returns {1, 0} when admitted, else {0, ms to wait}.
_ACQUIRE = """
local pause = redis.call('PTTL', KEYS[2])
if pause > 0 then return {0, pause} end
local interval = tonumber(ARGV[1])
if interval <= 0 then return {1, 0} end
local burst, cost = tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval * cost
local wait = new_tat - interval * burst - now
if wait > 0 then return {0, math.ceil(wait)} end
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1000)
return {1, 0}
"""

# KEYS[1] pause key. ARGV[1] ms. Extends a pause, never shortens one another worker set.
_SLOW_DOWN = """
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then
  redis.call('SET', KEYS[1], '1', 'PX', ms)
  return 1
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` requests per ``period`` seconds."""

    count: float
    period: float

    @property
    def interval(self) -> float:
        """Seconds between two requests at the steady rate."""
        return self.period / self.count

    def __str__(self) -> str:
        return f"{self.count:g}/{self.period:g}s"


def parse_rate(spec: str, variable: str = "rate limit") -> Rate:
    """``"150/m"``, ``"20/s"``, ``"1000/h"``, ``"10/5m"`` -> ``Rate``; ``ConfigError`` otherwise."""
    match = _RATE_RE.match(spec)
    if match is None:
        raise ConfigError(
            f"{variable} must look like 150/m, 20/s or 1000/h (requests per second, minute, "
            f"hour or day), got {spec!r}"
        )
    count = float(match["count"])
    period = float(match["n"] or 1) * _PERIODS[match["unit"][0].lower()]
    if count <= 0 or period <= 0:
        raise ConfigError(f"{variable} must allow at least some requests, got {spec!r}")
    return Rate(count, period)


class RateLimitWait(TransientDeliveryError):
    """``acquire`` would have to wait longer than allowed; ``retry_after`` says how long."""


class RateLimiter:
    """Shared GCRA rate limit and 429 pause of one service (see the module docstring).

    ``acquire(cost)`` blocks until admitted; it raises ``RateLimitWait`` when the wait would
    exceed ``max_wait`` and ``TransientDeliveryError`` when Redis cannot be reached, both of
    which backends treat as "retry the rest later". ``rate=None`` gives a pause-only limiter.
    """

    def __init__(
        self,
        client: redis.Redis,
        service: str,
        rate: Rate | None,
        burst: int = 1,
        *,
        max_wait: float | None = None,
    ) -> None:
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.client = client
        self.service = service
        self.rate = rate
        self.burst = burst
        self.max_wait = max_wait
        self._keys = [c.ratelimit_key(service), c.ratelimit_pause_key(service)]
        self._acquire = client.register_script(_ACQUIRE)
        self._slow_down = client.register_script(_SLOW_DOWN)
        self._clear_until = 0.0  # pause-only: no pause was set when last checked, until then

    @classmethod
    def from_settings(cls, client: redis.Redis, service: str, settings: Settings) -> RateLimiter:
        """The service's limiter; pause-only when ``DISPATCH_<SERVICE>_RATE_LIMIT`` is unset."""
        rate_var = settings.option_name(service, "RATE_LIMIT")
        raw = settings.option(service, "RATE_LIMIT")
        rate = parse_rate(raw, rate_var) if raw is not None else None
        burst_var = settings.option_name(service, "RATE_LIMIT_BURST")
        raw_burst = settings.option(service, "RATE_LIMIT_BURST", "1") or "1"
        try:
            burst = int(raw_burst)
        except ValueError:
            burst = 0
        if burst < 1:
            raise ConfigError(f"{burst_var} must be a positive integer, got {raw_burst!r}")
        return cls(client, service, rate, burst, max_wait=settings.task_time_limit * MAX_WAIT_SHARE)

    @property
    def limited(self) -> bool:
        return self.rate is not None

    def _interval_ms(self) -> float:
        return 0.0 if self.rate is None else self.rate.interval * 1000.0

    def try_acquire(self, cost: int = 1) -> float:
        """One attempt: 0.0 when admitted, else the seconds to wait before trying again."""
        if cost > self.burst and self.rate is not None:
            raise ValueError(f"cost {cost} can never be admitted with burst {self.burst}")
        try:
            admitted, wait_ms = self._acquire(
                keys=self._keys, args=[f"{self._interval_ms():.6f}", self.burst, cost]
            )
        except redis.RedisError as exc:
            raise TransientDeliveryError(
                f"{self.service}: rate limiter unavailable ({type(exc).__name__}: {exc})"
            ) from exc
        return 0.0 if int(admitted) == 1 else max(int(wait_ms), 1) / 1000.0

    def acquire(self, cost: int = 1, max_wait: float | None = None) -> None:
        """Block until ``cost`` requests are admitted (see the class docstring)."""
        limit = self.max_wait if max_wait is None else max_wait
        waited = 0.0
        pause_only = self.rate is None
        if pause_only and time.monotonic() < self._clear_until:
            return
        while True:
            wait = self.try_acquire(cost)
            if wait <= 0:
                if pause_only:
                    self._clear_until = time.monotonic() + PAUSE_RECHECK_S
                return
            if limit is not None and waited + wait > limit:
                raise RateLimitWait(
                    f"{self.service}: rate limit would hold this request {wait:.1f} s more "
                    f"(already waited {waited:.1f} s)",
                    retry_after=wait,
                )
            time.sleep(wait)  # exactly what the script said: it is the earliest admission
            waited += wait

    def slow_down(self, seconds: float) -> None:
        """Pause every worker of the service for ``seconds`` (vendor 429); best effort."""
        ms = math.ceil(seconds * 1000)
        if ms <= 0:
            return
        self._clear_until = 0.0  # this worker's next acquire sees the pause
        try:
            self._slow_down(keys=self._keys[1:], args=[ms])
        except redis.RedisError:
            log.warning(
                "%s: could not set the shared rate-limit pause", self.service, exc_info=True
            )

    def pause_remaining(self) -> float:
        """Seconds left of the shared pause (0.0 when none)."""
        ms = int(self.client.pttl(self._keys[1]))
        return ms / 1000.0 if ms > 0 else 0.0
