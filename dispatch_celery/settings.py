"""Settings: built once at the edge (CLI, Celery app module), frozen, passed explicitly.

This is the only module that reads ``os.environ``. Precedence: command-line flag >
environment > default. Every invalid value raises ``ConfigError`` naming the variable, so
a process with bad configuration stops at start with a message that says what to fix.

Backend options (``DISPATCH_<SERVICE>_API_KEY`` and the like) are kept in ``env`` and read
by each backend's ``from_settings`` through :meth:`Settings.option`, so that adding a
backend never touches this module.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote, urlparse

from dispatch_celery import constants as c
from dispatch_celery.errors import ConfigError

_SERVICE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_REDIS_SCHEMES = {"redis", "rediss", "unix", "redis+socket"}
_BROKER_SCHEMES = _REDIS_SCHEMES | {"amqp", "amqps", "pyamqp", "memory"}
# Variables of other programs that we honour as defaults (llm-proxy's own names).
_FOREIGN = ("REDIS_ADDR", "REDIS_DB", "REDIS_PASSWORD", "REDIS_STREAM_KEY", "SENTRY_DSN")
# Prefixes of other programs' variables that backends honour when ours are unset (the
# OpenTelemetry exporter variables for ``otlp``, the Langfuse SDK's for ``langfuse``).
_FOREIGN_PREFIXES = ("OTEL_EXPORTER_OTLP_", "LANGFUSE_")


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a positive integer, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {raw!r}")
    return value


def _positive_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a positive number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ConfigError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {raw!r}")
    return value


def _url(name: str, value: str, schemes: set[str]) -> str:
    scheme = urlparse(value).scheme
    if scheme not in schemes:
        raise ConfigError(
            f"{name} must be a URL with one of the schemes {', '.join(sorted(schemes))}; "
            f"got {redact_url(value)!r}"
        )
    return value


def redact_url(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)
    return parsed._replace(netloc=netloc).geturl()


def env_name(*parts: str) -> str:
    """``DISPATCH_<PART>_...``, upper-cased, '-' as '_' (``helicone-eu`` ->
    ``DISPATCH_HELICONE_EU_API_KEY``): the one home of the variable-naming rule."""
    return "_".join(["DISPATCH", *(p.upper().replace("-", "_") for p in parts)])


def validate_service(service: str) -> str:
    if not _SERVICE_RE.match(service):
        raise ConfigError(
            f"service name {service!r} is invalid: use lowercase letters, digits, '-' or '_' "
            "(it names the Celery queue and the consumer group)"
        )
    return service


def _default_redis_url(env: Mapping[str, str]) -> str:
    if env.get("DISPATCH_REDIS_URL", "").strip():
        return _url("DISPATCH_REDIS_URL", env["DISPATCH_REDIS_URL"].strip(), _REDIS_SCHEMES)
    addr = env.get("REDIS_ADDR", "").strip()
    if not addr:
        return c.DEFAULT_REDIS_URL
    db = env.get("REDIS_DB", "0").strip() or "0"
    if not db.isdigit():
        raise ConfigError(f"REDIS_DB (llm-proxy's setting) must be a database number, got {db!r}")
    password = env.get("REDIS_PASSWORD", "")
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{addr}/{db}"


@dataclass(frozen=True)
class Settings:
    """Everything a dispatch-celery process needs to know, validated."""

    redis_url: str = c.DEFAULT_REDIS_URL
    broker_url: str = c.DEFAULT_REDIS_URL
    stream: str = c.DEFAULT_STREAM
    batch_size: int = c.DEFAULT_BATCH_SIZE
    batch_max_bytes: int = c.DEFAULT_BATCH_MAX_BYTES
    flush_interval: float = c.DEFAULT_FLUSH_INTERVAL_S
    flush_linger: float = c.DEFAULT_FLUSH_LINGER_S
    read_count: int = c.DEFAULT_READ_COUNT
    visibility_timeout: int = c.DEFAULT_VISIBILITY_TIMEOUT_S
    task_time_limit: int = c.DEFAULT_TASK_TIME_LIMIT_S
    retry_base_delay: float = c.DEFAULT_RETRY_BASE_DELAY_S
    retry_max_delay: float = c.DEFAULT_RETRY_MAX_DELAY_S
    retry_budget: float = c.DEFAULT_RETRY_BUDGET_S
    max_crashes: int = c.DEFAULT_MAX_CRASHES
    credentials_probe_interval: float = c.DEFAULT_CREDENTIALS_PROBE_INTERVAL_S
    queue_lease: float = c.DEFAULT_QUEUE_LEASE_S
    high_water_batches: int = c.DEFAULT_HIGH_WATER_BATCHES
    high_water_bytes: int = c.DEFAULT_HIGH_WATER_BYTES  # compressed bytes stored in Redis
    deadletter_max_len: int = c.DEFAULT_DEADLETTER_MAX_LEN
    # The bridge stops staging batches when Redis uses this share of its maxmemory, so the
    # producer's XADDs keep succeeding whatever the buffer holds (no effect without one).
    redis_memory_max_percent: int = c.DEFAULT_REDIS_MEMORY_MAX_PERCENT
    stream_rescan: float = c.DEFAULT_STREAM_RESCAN_S
    claim_idle: float = c.DEFAULT_CLAIM_IDLE_S
    staged_recovery: float = c.DEFAULT_STAGED_RECOVERY_S
    max_body_bytes: int = c.DEFAULT_MAX_BODY_BYTES
    log_level: str = "info"
    log_format: str = "text"
    metrics_port: int = c.DEFAULT_METRICS_PORT
    sentry_dsn: str | None = None
    # All DISPATCH_* variables (and a few foreign ones), for backend options.
    env: Mapping[str, str] = field(default_factory=dict, repr=False)

    def option(self, service: str, name: str, default: str | None = None) -> str | None:
        """``DISPATCH_<SERVICE>_<NAME>``, e.g. ``option("helicone", "API_KEY")``."""
        value = self.env.get(self.option_name(service, name))
        if value is None or value.strip() == "":
            return default
        return value.strip()

    def option_name(self, service: str, name: str) -> str:
        """The variable of a per-service option, ``DISPATCH_<SERVICE>_<NAME>``."""
        return env_name(service, name)

    @property
    def soft_time_limit(self) -> int:
        """The task's soft time limit (s): where an overrunning attempt is interrupted,
        a tenth (at least 5 s) before the hard ``task_time_limit``."""
        return max(1, self.task_time_limit - max(5, self.task_time_limit // 10))

    def positive_int(
        self,
        service: str,
        name: str,
        default: int,
        *,
        maximum: int | None = None,
        zero_ok: bool = False,
    ) -> int:
        """A backend's integer option ``DISPATCH_<SERVICE>_<NAME>``: positive (or 0 when
        ``zero_ok``), at most ``maximum``; ``ConfigError`` names the variable otherwise."""
        var = self.option_name(service, name)
        if zero_ok and self.option(service, name) == "0":
            return 0
        value = _positive_int(self.env, var, default)
        if maximum is not None and value > maximum:
            raise ConfigError(f"{var} must be at most {maximum}, got {self.env[var]!r}")
        return value

    def positive_float(self, service: str, name: str, default: float) -> float:
        """A backend's number of seconds ``DISPATCH_<SERVICE>_<NAME>``: positive and finite."""
        var = self.option_name(service, name)
        value = _positive_float(self.env, var, default)
        if value == float("inf"):
            raise ConfigError(f"{var} must be a finite number of seconds, got {self.env[var]!r}")
        return value

    def scoped_option(self, service: str, name: str) -> tuple[str, str | None]:
        """(variable, value) of ``DISPATCH_<SERVICE>_<NAME>``, else of the service-wide
        default ``DISPATCH_<NAME>``: the variable is the one to name in an error."""
        value = self.option(service, name)
        if value is not None:
            return self.option_name(service, name), value
        return env_name(name), self.global_option(name)

    def global_option(self, name: str, default: str | None = None) -> str | None:
        """``DISPATCH_<NAME>``, a setting shared by every service unless overridden."""
        value = self.env.get(env_name(name))
        if value is None or value.strip() == "":
            return default
        return value.strip()

    def with_overrides(self, **overrides: Any) -> Settings:
        """Apply command-line flags (flag > env); ``None`` means 'not given'."""
        given = {k: v for k, v in overrides.items() if v is not None}
        new = replace(self, **given)
        new.validate()
        return new

    def validate(self) -> None:
        if not 0 < self.redis_memory_max_percent < 100:
            raise ConfigError(
                "DISPATCH_REDIS_MEMORY_MAX_PERCENT must be a percentage between 1 and 99, "
                f"got {self.redis_memory_max_percent}"
            )
        if self.flush_interval <= 0:
            raise ConfigError("--flush-interval / DISPATCH_FLUSH_INTERVAL must be > 0")
        if self.batch_size <= 0:
            raise ConfigError("--batch-size / DISPATCH_BATCH_SIZE must be > 0")
        from dispatch_celery.delivery.retry import check_timing  # the policy owns the rule

        check_timing(self)
        if self.staged_recovery >= self.claim_idle:
            raise ConfigError("DISPATCH_STAGED_RECOVERY must be shorter than DISPATCH_CLAIM_IDLE")


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings from the environment (``os.environ`` when not given)."""
    env = dict(os.environ if environ is None else environ)
    redis_url = _default_redis_url(env)
    broker_raw = env.get("DISPATCH_BROKER_URL", "").strip()
    broker_url = (
        _url("DISPATCH_BROKER_URL", broker_raw, _BROKER_SCHEMES) if broker_raw else redis_url
    )
    stream = (env.get("DISPATCH_STREAM") or env.get("REDIS_STREAM_KEY") or c.DEFAULT_STREAM).strip()
    visibility = _positive_int(env, "DISPATCH_VISIBILITY_TIMEOUT", c.DEFAULT_VISIBILITY_TIMEOUT_S)
    if env.get("DISPATCH_MAX_ATTEMPTS", "").strip():
        # Not translated: 8 attempts were ~1 minute of retries, the budget is an hour now.
        raise ConfigError(
            "DISPATCH_MAX_ATTEMPTS is no longer supported: the retry budget is a duration; "
            "remove it and set DISPATCH_RETRY_BUDGET (seconds of attempts without progress "
            f"before dead-lettering, default {c.DEFAULT_RETRY_BUDGET_S:g})"
        )
    settings = Settings(
        redis_url=redis_url,
        broker_url=broker_url,
        stream=stream,
        batch_size=_positive_int(env, "DISPATCH_BATCH_SIZE", c.DEFAULT_BATCH_SIZE),
        batch_max_bytes=_positive_int(env, "DISPATCH_BATCH_MAX_BYTES", c.DEFAULT_BATCH_MAX_BYTES),
        flush_interval=_positive_float(env, "DISPATCH_FLUSH_INTERVAL", c.DEFAULT_FLUSH_INTERVAL_S),
        flush_linger=_positive_float(env, "DISPATCH_FLUSH_LINGER", c.DEFAULT_FLUSH_LINGER_S),
        read_count=_positive_int(env, "DISPATCH_READ_COUNT", c.DEFAULT_READ_COUNT),
        visibility_timeout=visibility,
        task_time_limit=_positive_int(
            env, "DISPATCH_TASK_TIME_LIMIT", min(c.DEFAULT_TASK_TIME_LIMIT_S, visibility // 3)
        ),
        retry_base_delay=_positive_float(
            env, "DISPATCH_RETRY_BASE_DELAY", c.DEFAULT_RETRY_BASE_DELAY_S
        ),
        retry_max_delay=_positive_float(
            env, "DISPATCH_RETRY_MAX_DELAY", c.DEFAULT_RETRY_MAX_DELAY_S
        ),
        retry_budget=_positive_float(env, "DISPATCH_RETRY_BUDGET", c.DEFAULT_RETRY_BUDGET_S),
        max_crashes=_positive_int(env, "DISPATCH_MAX_CRASHES", c.DEFAULT_MAX_CRASHES),
        credentials_probe_interval=_positive_float(
            env, "DISPATCH_CREDENTIALS_PROBE_INTERVAL", c.DEFAULT_CREDENTIALS_PROBE_INTERVAL_S
        ),
        queue_lease=_positive_float(env, "DISPATCH_QUEUE_LEASE", c.DEFAULT_QUEUE_LEASE_S),
        high_water_batches=_positive_int(
            env, "DISPATCH_HIGH_WATER_BATCHES", c.DEFAULT_HIGH_WATER_BATCHES
        ),
        high_water_bytes=_positive_int(
            env, "DISPATCH_HIGH_WATER_BYTES", c.DEFAULT_HIGH_WATER_BYTES
        ),
        redis_memory_max_percent=_positive_int(
            env, "DISPATCH_REDIS_MEMORY_MAX_PERCENT", c.DEFAULT_REDIS_MEMORY_MAX_PERCENT
        ),
        deadletter_max_len=_positive_int(
            env, "DISPATCH_DEADLETTER_MAX_LEN", c.DEFAULT_DEADLETTER_MAX_LEN
        ),
        stream_rescan=_positive_float(env, "DISPATCH_STREAM_RESCAN", c.DEFAULT_STREAM_RESCAN_S),
        claim_idle=_positive_float(env, "DISPATCH_CLAIM_IDLE", c.DEFAULT_CLAIM_IDLE_S),
        staged_recovery=_positive_float(
            env, "DISPATCH_STAGED_RECOVERY", c.DEFAULT_STAGED_RECOVERY_S
        ),
        max_body_bytes=_positive_int(env, "DISPATCH_MAX_BODY_BYTES", c.DEFAULT_MAX_BODY_BYTES),
        log_level=_choice(env, "DISPATCH_LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
        log_format=_choice(env, "DISPATCH_LOG_FORMAT", "text", ("text", "json")),
        metrics_port=_positive_int(env, "DISPATCH_METRICS_PORT", c.DEFAULT_METRICS_PORT),
        sentry_dsn=(env.get("SENTRY_DSN") or "").strip() or None,
        env={
            k: v
            for k, v in env.items()
            if k.startswith(("DISPATCH_", "FLOWER_", *_FOREIGN_PREFIXES)) or k in _FOREIGN
        },
    )
    if not settings.stream.replace(",", "").strip():  # several keys: ingest/streamset.py
        raise ConfigError("DISPATCH_STREAM must name at least one stream key or pattern")
    settings.validate()
    return settings
