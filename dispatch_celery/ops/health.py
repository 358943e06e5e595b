"""``dispatch health``: is the deployment delivering? Exit code 0 (healthy) or 1.

Checks, each ``ok``, ``warn`` (shown, does not fail) or ``fail``:

``redis``         Redis answers PING (nothing else is checked when it does not).
``eviction``      ``maxmemory-policy`` is ``noeviction``: with any other policy, Redis may
                  evict batch blobs and stream entries under memory pressure, i.e. lose
                  events. Fails when another policy is set together with a ``maxmemory``
                  limit; warns when no limit is set (nothing is evicted until one is) or
                  when ``CONFIG GET`` is not allowed (managed Redis).
``bridges``       per service, at least one bridge heartbeat younger than its TTL (30 s);
                  warns when a bridge is paused at the high-water mark.
``workers``       per service, at least one worker answers ``inspect active_queues`` for
                  the service's queue within ``DISPATCH_HEALTH_TIMEOUT`` seconds (2).
``lag``           per service, unread entries <= ``DISPATCH_HEALTH_MAX_LAG`` (5000: half
                  of llm-proxy's default MAXLEN ~10000, so this fails before the producer
                  trims unread entries away).
``dead-letters``  per service, dead letters <= ``DISPATCH_HEALTH_MAX_DEAD_LETTERS`` (100);
                  any dead letter is a warning; dead letters dropped at the stream's bound
                  (``DISPATCH_DEADLETTER_MAX_LEN``) are a failure.
``buffer``        per service, the in-flight buffer below ``DISPATCH_HEALTH_MAX_BUFFER``
                  percent (80) of its high-water mark (batches or compressed bytes): it
                  fails *before* the bridge has to stop reading (after which the producer's
                  trimming loses events); the detail says how long the buffer lasts at the
                  current intake rate. Warns when Redis' ``maxmemory`` could not hold a
                  full buffer (Redis would refuse writes, llm-proxy's included, first).
``paused``        per service, not paused for bad credentials (fails naming the variable
                  to fix; batches wait in flight, nothing dead-letters, one attempt probes
                  every ``DISPATCH_CREDENTIALS_PROBE_INTERVAL``); warns while the outage
                  gate is closed (the vendor is failing; requests are held back).

Thresholds can be set per service too (``DISPATCH_<SERVICE>_HEALTH_MAX_LAG``). Without
``--service``, the services checked are those in use: a consumer group on the stream or a
live bridge heartbeat. ``--only`` narrows the checks (e.g. a container health check:
``--only redis``, or ``--service file --only workers`` for a worker container).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import redis
from celery import Celery

from dispatch_celery import constants as c
from dispatch_celery.app import create_app
from dispatch_celery.batches.buffer import BufferStatus, human_bytes, human_seconds
from dispatch_celery.errors import ConfigError
from dispatch_celery.ops.status import bridges, known_services, service_status
from dispatch_celery.settings import Settings, redact_url

CHECKS = c.HEALTH_CHECKS
_STATUS_CHECKS = frozenset({"lag", "dead-letters", "buffer"})  # read service_status
DEFAULT_MAX_LAG = 5000
DEFAULT_MAX_DEAD_LETTERS = 100
DEFAULT_MAX_BUFFER_PERCENT = 80
DEFAULT_TIMEOUT_S = 2.0
_HEARTBEAT_RE = re.compile(rf"^{c.PREFIX}:bridge:([^:]+):")


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn" or "fail"
    detail: str
    service: str | None = None


@dataclass
class HealthReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return all(check.status != "fail" for check in self.checks)

    def add(self, name: str, status: str, detail: str, service: str | None = None) -> None:
        self.checks.append(Check(name, status, detail, service))

    def as_json(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "checks": [asdict(ch) for ch in self.checks]}

    def lines(self) -> list[str]:
        out = []
        for ch in self.checks:
            where = f"{ch.name}[{ch.service}]" if ch.service else ch.name
            out.append(f"{ch.status.upper():<5} {where:<24} {ch.detail}")
        out.append("healthy" if self.healthy else "UNHEALTHY")
        return out


def _threshold(settings: Settings, service: str, name: str, default: int) -> int:
    raw = settings.option(service, name) or settings.global_option(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"DISPATCH_{name} must be a whole number, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"DISPATCH_{name} must be >= 0, got {raw!r}")
    return value


def health_timeout(settings: Settings) -> float:
    """Seconds to wait for worker replies (``DISPATCH_HEALTH_TIMEOUT``)."""
    raw = settings.global_option("HEALTH_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"DISPATCH_HEALTH_TIMEOUT must be a positive number, got {raw!r}")
    return value


def services_in_use(client: redis.Redis, stream: str) -> list[str]:
    """Services with a consumer group on the stream or a live bridge heartbeat."""
    found = set(known_services(client, stream, []))
    for key in client.scan_iter(match=f"{c.PREFIX}:bridge:*", count=100):
        match = _HEARTBEAT_RE.match(key.decode() if isinstance(key, bytes) else str(key))
        if match:
            found.add(match.group(1))
    return sorted(found)


def _check_eviction(client: redis.Redis, report: HealthReport) -> None:
    try:
        policy = cast(dict[str, str], client.config_get("maxmemory-policy")).get(
            "maxmemory-policy", ""
        )
        maxmemory = int(cast(dict[str, str], client.config_get("maxmemory")).get("maxmemory", 0))
    except redis.ResponseError as exc:
        report.add(
            "eviction", "warn", f"cannot read maxmemory-policy ({exc}); make sure it is noeviction"
        )
        return
    if policy == "noeviction":
        report.add("eviction", "ok", "maxmemory-policy noeviction")
    elif maxmemory == 0:
        report.add(
            "eviction",
            "warn",
            f"maxmemory-policy {policy} (no maxmemory set yet); "
            "set noeviction, or Redis may evict undelivered events",
        )
    else:
        report.add(
            "eviction",
            "fail",
            f"maxmemory-policy {policy} with maxmemory {maxmemory}: "
            "Redis may evict undelivered events; set maxmemory-policy noeviction",
        )


def _check_bridges(client: redis.Redis, service: str, report: HealthReport) -> None:
    live = [b for b in bridges(client, service) if b.get("age_s", 1e9) < c.HEARTBEAT_TTL_S]
    if not live:
        report.add(
            "bridges", "fail", f"no bridge alive (no heartbeat in {c.HEARTBEAT_TTL_S} s)", service
        )
        return
    names = ", ".join(sorted(str(b.get("consumer")) for b in live))
    paused = [b for b in live if b.get("paused")]
    if paused:
        report.add(
            "bridges",
            "warn",
            f"{len(live)} alive ({names}); {len(paused)} paused at "
            "the high-water mark (workers are behind)",
            service,
        )
    else:
        report.add("bridges", "ok", f"{len(live)} alive ({names})", service)


def worker_queues(app: Celery, timeout: float) -> dict[str, list[str]]:
    """Queue name -> names of the workers that answered and consume it."""
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    by_queue: dict[str, list[str]] = {}
    for worker, queues in replies.items():
        for q in queues or []:
            by_queue.setdefault(str(q.get("name")), []).append(worker)
    return by_queue


def _check_workers(
    queues: dict[str, list[str]] | None,
    error: str,
    service: str,
    report: HealthReport,
    timeout: float,
) -> None:
    if queues is None:
        report.add("workers", "fail", f"cannot ask the workers: {error}", service)
        return
    found = sorted(queues.get(c.queue_name(service), []))
    if found:
        report.add("workers", "ok", f"{len(found)} answering ({', '.join(found)})", service)
    else:
        report.add(
            "workers",
            "fail",
            f"no worker consuming queue {c.queue_name(service)!r} answered within {timeout:g} s",
            service,
        )


def check_health(
    settings: Settings,
    *,
    services: Sequence[str] = (),
    only: Iterable[str] = (),
    app: Celery | None = None,
    timeout: float | None = None,
) -> HealthReport:
    """Run the checks; ``ConfigError`` for a bad threshold setting."""
    wanted = set(only) or set(CHECKS)
    timeout = health_timeout(settings) if timeout is None else timeout
    report = HealthReport()
    # Short socket timeouts: a health check must answer, not hang on a dead server.
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        try:
            client.ping()
        except redis.RedisError as exc:
            report.add("redis", "fail", f"{redact_url(settings.redis_url)} unreachable: {exc}")
            return report
        report.add("redis", "ok", f"{redact_url(settings.redis_url)} answers")
        if "eviction" in wanted:
            _check_eviction(client, report)
        per_service = wanted & ({"bridges", "workers"} | _STATUS_CHECKS)
        names = list(services) or services_in_use(client, settings.stream)
        if per_service and not names:
            report.add(
                "services",
                "warn",
                f"no service in use on stream {settings.stream!r} "
                "(no consumer group, no bridge); nothing else to check",
            )
            return report
        queues: dict[str, list[str]] | None = None
        error = ""
        if "workers" in wanted and names:
            try:
                if app is None:
                    app = create_app(settings)
                queues = worker_queues(app, timeout)
            except Exception as exc:  # broker down or refusing: a failed check, not a crash
                error = f"{type(exc).__name__}: {exc}"
        for service in names:
            _check_service(
                settings=settings,
                client=client,
                service=service,
                wanted=wanted,
                queues=queues,
                error=error,
                timeout=timeout,
                report=report,
            )
    finally:
        client.close()
    return report


def _check_paused(client: redis.Redis, service: str, report: HealthReport) -> None:
    """The credentials pause and the outage gate of ``delivery.retry``."""
    from dispatch_celery.batches.state import BatchStore

    store = BatchStore(client, service)
    paused = store.paused()
    if paused:
        since = float(paused.get("since") or 0)
        age = f" for {time.time() - since:.0f}s" if since else ""
        report.add(
            "paused",
            "fail",
            f"delivery paused{age}: {paused.get('reason', 'credentials refused')}; nothing is "
            "dead-lettered, batches wait in flight and resume once a probe gets through",
            service,
        )
        return
    gate = store.gate()
    until = float(gate.get("until") or 0)
    if gate and until > time.time():
        report.add(
            "paused",
            "warn",
            f"outage gate closed for {until - time.time():.0f}s more (the service is failing: "
            f"{gate.get('reason', '?')}); one probe at its end",
            service,
        )
        return
    report.add("paused", "ok", "delivering", service)


def _check_service(
    *,
    settings: Settings,
    client: redis.Redis,
    service: str,
    wanted: set[str],
    queues: dict[str, list[str]] | None,
    error: str,
    timeout: float,
    report: HealthReport,
) -> None:
    if "bridges" in wanted:
        _check_bridges(client, service, report)
    if "workers" in wanted:
        _check_workers(queues, error, service, report, timeout)
    if "paused" in wanted:
        _check_paused(client, service, report)
    if not wanted & _STATUS_CHECKS:
        return
    status = service_status(client, settings.stream, service, settings=settings)
    if "lag" in wanted:
        max_lag = _threshold(settings, service, "HEALTH_MAX_LAG", DEFAULT_MAX_LAG)
        if not status.group_exists:
            report.add("lag", "warn", f"no consumer group {status.group!r} yet", service)
        elif status.lag is None:
            report.add("lag", "warn", "Redis cannot tell the lag of this group", service)
        elif status.lag > max_lag:
            report.add("lag", "fail", f"{status.lag} entries unread (max {max_lag})", service)
        else:
            report.add("lag", "ok", f"{status.lag} entries unread (max {max_lag})", service)
    if "dead-letters" in wanted:
        limit = _threshold(settings, service, "HEALTH_MAX_DEAD_LETTERS", DEFAULT_MAX_DEAD_LETTERS)
        n = status.dead_letters
        level = "fail" if n > limit else "warn" if n else "ok"
        hint = f"; see `dispatch dlq list --service {service}`" if n else ""
        if status.dead_letters_trimmed:
            level = "fail"
            hint += (
                f"; {status.dead_letters_trimmed} older ones dropped at the bound "
                f"(DISPATCH_DEADLETTER_MAX_LEN={settings.deadletter_max_len})"
            )
        report.add("dead-letters", level, f"{n} (max {limit}){hint}", service)
    if "buffer" in wanted:
        limit = _threshold(settings, service, "HEALTH_MAX_BUFFER", DEFAULT_MAX_BUFFER_PERCENT)
        _check_buffer(client, status.buffer, limit, service, report)


def _maxmemory(client: redis.Redis) -> int:
    """Redis' maxmemory (0: none, or not readable)."""
    try:
        return int(cast(dict[str, str], client.config_get("maxmemory")).get("maxmemory", 0))
    except (redis.ResponseError, ValueError):
        return 0


def _check_buffer(
    client: redis.Redis, buf: BufferStatus, limit: int, service: str, report: HealthReport
) -> None:
    percent = buf.fill * 100
    rate = (
        f"; at {buf.intake_eps:,.0f} events/s it holds {human_seconds(buf.seconds_to_full)} "
        "of an outage"
        if buf.intake_eps is not None
        else ""
    )
    detail = (
        f"{percent:.0f} % full (max {limit} %): {buf.batches} of {buf.high_water_batches} "
        f"batches, {human_bytes(buf.compressed_bytes)} of {human_bytes(buf.high_water_bytes)} "
        f"compressed ({human_bytes(buf.raw_bytes)} raw){rate}"
    )
    if percent >= limit:
        report.add(
            "buffer",
            "fail",
            f"{detail}; the bridge stops reading when it is full and the producer's "
            "trimming then loses events: workers are behind or the vendor is failing",
            service,
        )
        return
    maxmemory = _maxmemory(client)
    if maxmemory and buf.high_water_bytes > maxmemory * 0.8:
        report.add(
            "buffer",
            "warn",
            f"{detail}; DISPATCH_HIGH_WATER_BYTES ({human_bytes(buf.high_water_bytes)}) is "
            f"over 80 % of Redis maxmemory ({human_bytes(maxmemory)}): Redis would refuse "
            "writes (llm-proxy's too) before the buffer is full; lower it or raise maxmemory",
            service,
        )
        return
    report.add("buffer", "ok", detail, service)
