"""Plumbing shared by the HTTP backends: options, one pooled session, status classification.

This is the one boundary where ``requests``/``urllib3`` exceptions are caught: ``HttpClient.post``
never raises, it returns a ``Reply`` whose ``verdict`` says what the status means, and
``summarize`` turns per-run outcomes into a ``DeliveryReport`` or the whole-call errors of the
Backend contract. Every message built here is scrubbed of the API key.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from importlib.metadata import PackageNotFoundError, version
from urllib.parse import urlparse

import requests
import requests.auth
import urllib3
from requests.adapters import HTTPAdapter

from dispatch_celery.backend import DeliveryContext, DeliveryReport
from dispatch_celery.errors import ConfigError, PermanentDeliveryError, TransientDeliveryError
from dispatch_celery.settings import Settings, redact_url

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_429_PAUSE_S = 1.0  # how long all senders pause after a 429 that gave no Retry-After
REASON_BODY_CHARS = 300  # how much of a vendor's error body goes into a reason
# Share of the task's time limit one deliver() may spend before it defers what is left: a
# hard time limit kill would lose the per-run report and make the retry re-send everything.
ATTEMPT_BUDGET_SHARE = 0.5
# Namespace of the UUIDs derived for run ids that are not UUIDs (vendors store run ids in
# uuid columns; llm-proxy's ids are UUIDs already, other producers' may not be).
VENDOR_ID_NAMESPACE = uuid.UUID("a8d5c2f4-6a0e-4c53-9b7e-2f6c1d9e8b34")


def _user_agent() -> str:
    try:
        return f"dispatch-celery/{version('dispatch-celery')}"
    except PackageNotFoundError:
        return "dispatch-celery"


USER_AGENT = _user_agent()


# --- options -------------------------------------------------------------------------------


def int_option(
    settings: Settings, service: str, name: str, default: int, *, maximum: int | None = None
) -> int:
    """A positive integer option; ``ConfigError`` names the variable when it is not one."""
    raw = settings.option(service, name)
    if raw is None:
        return default
    var = settings.option_name(service, name)
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{var} must be a positive integer, got {raw!r}") from None
    if value <= 0 or (maximum is not None and value > maximum):
        limit = f" no larger than {maximum}" if maximum is not None else ""
        raise ConfigError(f"{var} must be a positive integer{limit}, got {raw!r}")
    return value


def float_option(settings: Settings, service: str, name: str, default: float) -> float:
    """A positive number of seconds; ``ConfigError`` names the variable when it is not one."""
    raw = settings.option(service, name)
    if raw is None:
        return default
    var = settings.option_name(service, name)
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{var} must be a positive number of seconds, got {raw!r}") from None
    if not 0 < value < float("inf"):
        raise ConfigError(f"{var} must be a positive number of seconds, got {raw!r}")
    return value


def url_option(settings: Settings, service: str, name: str, default: str) -> str:
    raw = settings.option(service, name, default) or default
    parsed = urlparse(raw)
    if parsed.scheme not in {"http", "https"} or not parsed.hostname:
        raise ConfigError(
            f"{settings.option_name(service, name)} must be an http(s) URL, got {redact_url(raw)!r}"
        )
    return raw


@dataclass(frozen=True)
class HttpOptions:
    """Where and how an HTTP backend sends; the key is kept out of ``repr``."""

    service: str
    endpoint: str
    api_key: str = field(repr=False)
    api_key_var: str = "DISPATCH_<SERVICE>_API_KEY"
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout: float = DEFAULT_READ_TIMEOUT_S
    max_pause: float = 120.0  # caps Retry-After: the core never waits longer than this either
    attempt_budget: float = 60.0  # seconds one deliver() may spend (see ATTEMPT_BUDGET_SHARE)

    @classmethod
    def from_settings(cls, service: str, settings: Settings, default_endpoint: str) -> HttpOptions:
        key_var = settings.option_name(service, "API_KEY")
        api_key = settings.option(service, "API_KEY")
        if api_key is None:
            raise ConfigError(f"{key_var} is required for the {service} backend")
        return cls(
            service=service,
            endpoint=url_option(settings, service, "ENDPOINT", default_endpoint),
            api_key=api_key,
            api_key_var=key_var,
            connect_timeout=float_option(
                settings, service, "CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT_S
            ),
            read_timeout=float_option(settings, service, "READ_TIMEOUT", DEFAULT_READ_TIMEOUT_S),
            max_pause=settings.retry_max_delay,
            attempt_budget=settings.task_time_limit * ATTEMPT_BUDGET_SHARE,
        )

    def scrub(self, text: str) -> str:
        """The text with every occurrence of the API key masked."""
        return text.replace(self.api_key, "***") if self.api_key else text

    @property
    def safe_endpoint(self) -> str:
        return redact_url(self.endpoint)


def vendor_uuid(run_id: str) -> str:
    """The run id when it is a UUID (canonical form), else a UUID derived from it, stably."""
    try:
        return str(uuid.UUID(run_id))
    except ValueError:
        return str(uuid.uuid5(VENDOR_ID_NAMESPACE, run_id))


# --- statuses ------------------------------------------------------------------------------


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"  # retry later: timeouts, connection errors, 408, 429, 5xx
    AUTH = "auth"  # bad credentials (or endpoint): the whole batch is refused, do not hammer
    REJECTED = "rejected"  # this payload will never be accepted: dead-letter the run alone


TRANSIENT_STATUSES = frozenset({408, 429})


def classify(status: int, auth_statuses: frozenset[int] = frozenset({401, 403})) -> Verdict:
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status == 0 or status in TRANSIENT_STATUSES or status >= 500:
        return Verdict.TRANSIENT
    if status in auth_statuses or 300 <= status < 400:
        # A redirect means a misconfigured endpoint: like a bad key, every run would fail.
        return Verdict.AUTH
    return Verdict.REJECTED


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None if unusable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive parse means "-0000"
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


# --- the client ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """What one POST came to; ``status`` 0 means no response (timeout, connection error)."""

    status: int
    body: bytes = b""
    retry_after: float | None = None
    error: str = ""  # transport error, already scrubbed

    def verdict(self, auth_statuses: frozenset[int] = frozenset({401, 403})) -> Verdict:
        return classify(self.status, auth_statuses)

    def describe(self, options: HttpOptions) -> str:
        if self.status == 0:
            return f"{options.service}: {self.error}"
        snippet = self.body[:REASON_BODY_CHARS].decode("utf-8", "replace").strip()
        text = f"{options.service}: HTTP {self.status}" + (f": {snippet}" if snippet else "")
        return options.scrub(text)


class _Bearer(requests.auth.AuthBase):
    def __init__(self, key: str) -> None:
        self._key = key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._key}"
        return request


class HttpClient:
    """A keep-alive ``requests.Session`` whose pool holds ``pool_size`` connections.

    Thread-safe for concurrent ``post`` calls (urllib3's pool is). Rebuilt after a fork, so
    a prefork child never shares its parent's sockets. ``post`` never raises.
    """

    def __init__(self, options: HttpOptions, pool_size: int = 1) -> None:
        self.options = options
        self.pool_size = pool_size
        self._pid = -1
        self._lock = threading.Lock()
        self._session: requests.Session | None = None
        # Explicit auth object rather than a header: with an auth given, requests never
        # swaps in ~/.netrc credentials (it still honours HTTPS_PROXY and friends).
        self._auth = _Bearer(options.api_key)
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }

    @property
    def session(self) -> requests.Session:
        with self._lock:  # the first deliver() calls this from many threads at once
            if self._session is None or self._pid != os.getpid():
                session = requests.Session()
                # No retries in urllib3: the core owns retry policy, and a retry here would
                # re-send a run the vendor may already have stored without us knowing.
                adapter = HTTPAdapter(
                    pool_connections=1, pool_maxsize=self.pool_size, max_retries=0
                )
                session.mount("http://", adapter)
                session.mount("https://", adapter)
                self._session, self._pid = session, os.getpid()
            return self._session

    def post(self, body: bytes) -> Reply:
        opts = self.options
        try:
            response = self.session.post(
                opts.endpoint,
                data=body,
                headers=self._headers,
                auth=self._auth,
                timeout=(opts.connect_timeout, opts.read_timeout),
                allow_redirects=False,  # a redirect would turn the POST into a GET
            )
            content = response.content  # read fully so the connection returns to the pool
        except requests.Timeout as exc:
            return Reply(0, error=opts.scrub(f"timeout talking to {opts.safe_endpoint} ({exc})"))
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            return Reply(0, error=opts.scrub(f"connection to {opts.safe_endpoint} failed: {exc!r}"))
        if 300 <= response.status_code < 400:
            # Treated as bad configuration of the whole backend, like bad credentials.
            where = redact_url(response.headers.get("Location", "?"))
            return Reply(
                response.status_code,
                content,
                error=opts.scrub(f"{opts.safe_endpoint} redirects to {where}"),
            )
        return Reply(
            response.status_code,
            content,
            retry_after=_capped(parse_retry_after(response.headers.get("Retry-After")), opts),
        )

    def close(self) -> None:
        if self._session is not None and self._pid == os.getpid():
            self._session.close()
        self._session = None


def _capped(seconds: float | None, options: HttpOptions) -> float | None:
    return None if seconds is None else min(seconds, options.max_pause)


def auth_message(options: HttpOptions, reply: Reply) -> str:
    """The whole-batch refusal message: names the variable to fix, never the key."""
    if 300 <= reply.status < 400:
        return (
            f"{reply.error}; set {options.api_key_var.replace('API_KEY', 'ENDPOINT')} "
            "to the final URL"
        )
    return (
        f"{options.service} refused the API key (HTTP {reply.status}) at "
        f"{options.safe_endpoint}; check {options.api_key_var}"
    )


# --- per-run outcomes ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    reason: str = ""
    retry_after: float | None = None


DELIVERED = Outcome(Verdict.DELIVERED)


def pause_for(reply: Reply) -> float:
    """How long every sender pauses after this 429."""
    return reply.retry_after if reply.retry_after is not None else DEFAULT_429_PAUSE_S


def slow_down(ctx: DeliveryContext, seconds: float) -> None:
    """Ask every worker of the service to pause (vendor 429); best effort."""
    try:
        ctx.slow_down(seconds)
    except Exception:  # losing the shared pause must not lose the batch's per-run report
        log.warning("could not tell the other workers to slow down", exc_info=True)


def summarize(service: str, outcomes: Mapping[str, Outcome]) -> DeliveryReport:
    """Outcomes per run id -> the Backend contract.

    Any refused credential -> ``PermanentDeliveryError`` for the batch; every run transient ->
    ``TransientDeliveryError``; otherwise a report naming exactly the runs not delivered.
    """
    for outcome in outcomes.values():
        if outcome.verdict is Verdict.AUTH:
            raise PermanentDeliveryError(outcome.reason)
    report = DeliveryReport()
    hints: list[float] = []
    for run_id, outcome in outcomes.items():
        if outcome.verdict is Verdict.REJECTED:
            report.rejected[run_id] = outcome.reason
        elif outcome.verdict is Verdict.TRANSIENT:
            report.deferred[run_id] = outcome.reason
            if outcome.retry_after is not None:
                hints.append(outcome.retry_after)
    # The longest hint wins: retrying before it would only meet the same refusal.
    report.retry_after = max(hints) if hints else None
    if report.deferred and len(report.deferred) == len(outcomes):
        first = next(iter(report.deferred.values()))
        raise TransientDeliveryError(
            f"{service}: none of {len(outcomes)} runs delivered; first reason: {first}",
            retry_after=report.retry_after,
        )
    return report


class Deadline:
    """The time budget of one deliver() call (monotonic clock)."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self.at


BUDGET_SPENT = Outcome(
    Verdict.TRANSIENT, "not sent: this attempt's time budget is spent; sent on the next attempt"
)
