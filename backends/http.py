"""The HTTP toolkit: one send loop for every HTTP backend, built in or third-party.

Public import path: ``dispatch_celery.backends.http``. A vendor module says three things,
and ``HttpBackend`` does the rest:

* how to **encode** runs into requests (bytes and a content type): ``encode_run`` for one
  request per run, or ``encode`` to pack many runs into one request;
* how to **authenticate**: an ``Auth`` (none, Bearer, Basic, custom headers, or a subclass
  that signs each request), by default read from the service's variables;
* how to **read per-run outcomes** from a 2xx answer (``read``; default: all delivered),
  given its body and ``Reply.content_type``; ``Outcome.split`` asks the loop to isolate the
  run(s) an answer refused without naming (below).

The loop owns the rest of the Backend contract: the attempt's time budget, a total
deadline per request (connect timeout, per-read silence timeout *and* a wall-clock limit
that a server dripping one byte a second cannot stretch), the shared rate limit
(``ctx.acquire``), 429 pauses for every worker (``ctx.slow_down``), status classification,
bounded concurrency, probe mode (``ctx.probe``: one request first; when it fails, the rest
stays unsent), isolating the run a batch endpoint refuses (a 4xx for a request of several
runs, or a 2xx whose ``read`` answers ``Outcome.split``: the halves are re-encoded and sent
until the refused run stands alone, and a refused run alone is rejected), credentials
refused part-way (runs already delivered stay delivered), and the ``DeliveryReport``.
Every message it builds is scrubbed of the credentials.

A complete backend for a collector that takes NDJSON and answers which runs it could not
store::

    import orjson
    from dispatch_celery.backends.http import DELIVERED, HttpBackend, Outcome, Request

    class CollectorBackend(HttpBackend):
        name = "collector"                       # DISPATCH_COLLECTOR_ENDPOINT (required)

        def encode(self, runs):
            body = b"".join(orjson.dumps(run.record) + b"\\n" for run in runs)
            yield Request(tuple(run.id for run in runs), body, "application/x-ndjson")

        def read(self, request, reply):          # {"failed": {run_id: reason}}
            failed = orjson.loads(reply.body or b"{}").get("failed", {})
            return {run_id: Outcome.transient(failed[run_id]) if run_id in failed
                    else DELIVERED for run_id in request.runs}

registered in the plugin's ``pyproject.toml``::

    [project.entry-points."dispatch_celery.backends"]
    collector = "my_collector:CollectorBackend"

Options every ``HttpBackend`` reads (``DISPATCH_<SERVICE>_<NAME>``): ``ENDPOINT``,
``API_KEY`` (Bearer) or ``USERNAME`` + ``PASSWORD`` (Basic) and/or ``HEADERS``
(``Name=value,Other=value``, values percent-decoded), ``CONNECT_TIMEOUT`` (5 s),
``READ_TIMEOUT`` (30 s without a byte), ``REQUEST_TIMEOUT`` (30 s for one whole request),
``CONCURRENCY`` (``default_concurrency``).
"""

from __future__ import annotations

import base64
import enum
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any, ClassVar, Self
from urllib.parse import unquote, urlparse

import orjson
import requests
import urllib3
import urllib3.connection
import urllib3.connectionpool
import urllib3.util
from requests.adapters import HTTPAdapter

from dispatch_celery.backend import DeliveryContext, DeliveryReport, Run
from dispatch_celery.errors import ConfigError, CredentialsError, TransientDeliveryError
from dispatch_celery.settings import Settings, redact_url

__all__ = [
    "DELIVERED",
    "Auth",
    "HttpBackend",
    "HttpClient",
    "HttpOptions",
    "Outcome",
    "Rejected",
    "Reply",
    "Request",
    "Verdict",
    "classify",
    "media_type",
    "parse_headers",
    "parse_retry_after",
    "summarize",
    "url_option",
    "vendor_uuid",
]

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 30.0  # the longest silence while reading an answer
DEFAULT_REQUEST_TIMEOUT_S = 30.0  # the longest one request may take, connect to last byte
DEFAULT_429_PAUSE_S = 1.0  # how long all senders pause after a 429 that gave no Retry-After
REASON_BODY_CHARS = 300  # how much of a vendor's error body goes into a reason
MIN_POOL_SIZE = 4  # keep-alive connections kept per process, at least
# Share of the task's soft time limit one deliver() may spend before it defers what is left:
# the soft limit's exception (or a hard kill) would lose the per-run report and make the
# retry re-send everything.
ATTEMPT_BUDGET_SHARE = 0.8
# Namespace of the UUIDs derived for run ids that are not UUIDs (vendors store run ids in
# uuid columns; llm-proxy's ids are UUIDs already, other producers' may not be).
VENDOR_ID_NAMESPACE = uuid.UUID("a8d5c2f4-6a0e-4c53-9b7e-2f6c1d9e8b34")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _user_agent() -> str:
    try:
        return f"dispatch-celery/{version('dispatch-celery')}"
    except PackageNotFoundError:
        return "dispatch-celery"


USER_AGENT = _user_agent()


def vendor_uuid(run_id: str) -> str:
    """The run id when it is a UUID (canonical form), else a UUID derived from it, stably."""
    try:
        return str(uuid.UUID(run_id))
    except ValueError:
        return str(uuid.uuid5(VENDOR_ID_NAMESPACE, run_id))


# --- options -------------------------------------------------------------------------------


def url_option(settings: Settings, service: str, name: str, default: str) -> str:
    """An http(s) URL option; ``ConfigError`` names the variable (``""`` default: required)."""
    var = settings.option_name(service, name)
    raw = settings.option(service, name, default) or default
    if not raw:
        raise ConfigError(f"{var} is required for the {service} backend")
    parsed = urlparse(raw)
    if parsed.scheme not in {"http", "https"} or not parsed.hostname:
        raise ConfigError(f"{var} must be an http(s) URL, got {redact_url(raw)!r}")
    return raw


@dataclass(frozen=True)
class HttpOptions:
    """Where an HTTP backend sends and how long it may take (no credentials: see Auth)."""

    service: str
    endpoint: str
    endpoint_var: str = "DISPATCH_<SERVICE>_ENDPOINT"
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout: float = DEFAULT_READ_TIMEOUT_S
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S
    max_pause: float = 120.0  # caps Retry-After: the core never waits longer than this either
    attempt_budget: float = 60.0  # seconds one deliver() may spend (see ATTEMPT_BUDGET_SHARE)

    @classmethod
    def from_settings(
        cls, service: str, settings: Settings, default_endpoint: str = ""
    ) -> HttpOptions:
        return cls(
            service=service,
            endpoint=url_option(settings, service, "ENDPOINT", default_endpoint),
            endpoint_var=settings.option_name(service, "ENDPOINT"),
            connect_timeout=settings.positive_float(
                service, "CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT_S
            ),
            read_timeout=settings.positive_float(service, "READ_TIMEOUT", DEFAULT_READ_TIMEOUT_S),
            request_timeout=settings.positive_float(
                service, "REQUEST_TIMEOUT", DEFAULT_REQUEST_TIMEOUT_S
            ),
            max_pause=settings.retry_max_delay,
            attempt_budget=settings.soft_time_limit * ATTEMPT_BUDGET_SHARE,
        )

    @property
    def safe_endpoint(self) -> str:
        return redact_url(self.endpoint)


# --- requests, credentials -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request of a delivery: the runs it carries (their ids) and its body."""

    runs: tuple[str, ...]
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A run ``encode`` cannot turn into a request: dead-lettered alone with the reason."""

    run: str
    reason: str


@dataclass(frozen=True)
class Auth:
    """How requests prove who we are: headers added to each request, the secrets masked in
    every message, and what a refusal tells the operator to fix (naming the variables).

    ``Auth()`` sends no credentials. Subclass and override ``headers_for`` to sign each
    request (e.g. an HMAC of the body); combine with ``+`` (Bearer plus a tenant header).
    """

    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    secrets: tuple[str, ...] = field(default=(), repr=False)
    fix: str = "no credentials are configured"

    @classmethod
    def bearer(cls, token: str, variable: str) -> Auth:
        return cls({"Authorization": f"Bearer {token}"}, (token,), f"check {variable}")

    @classmethod
    def basic(cls, username: str, password: str, variables: str) -> Auth:
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        return cls({"Authorization": f"Basic {token}"}, (password, token), f"check {variables}")

    @classmethod
    def header(cls, name: str, value: str, variable: str) -> Auth:
        return cls({name: value}, (value, value.rpartition(" ")[2]), f"check {variable}")

    def __add__(self, other: Auth) -> Auth:
        fixes = [a.fix for a in (self, other) if a.headers]
        return Auth(
            {**self.headers, **other.headers},
            self.secrets + other.secrets,
            " and ".join(fixes) or self.fix,
        )

    def headers_for(self, request: Request) -> Mapping[str, str]:
        """The headers that authenticate this request."""
        return self.headers

    def scrub(self, text: str) -> str:
        """The text with every secret masked."""
        for secret in sorted(self.secrets, key=len, reverse=True):
            if len(secret) >= 4:  # masking "ab" everywhere would garble the message, not hide
                text = text.replace(secret, "***")
        return text

    @classmethod
    def from_settings(cls, service: str, settings: Settings, *, required: bool = False) -> Auth:
        """``API_KEY`` (Bearer) or ``USERNAME`` + ``PASSWORD`` (Basic), plus ``HEADERS``."""
        key_var, user_var, pass_var, headers_var = (
            settings.option_name(service, name)
            for name in ("API_KEY", "USERNAME", "PASSWORD", "HEADERS")
        )
        key = settings.option(service, "API_KEY")
        user, password = settings.option(service, "USERNAME"), settings.option(service, "PASSWORD")
        if required and key is None:
            raise ConfigError(f"{key_var} is required for the {service} backend")
        if (user is None) != (password is None):
            raise ConfigError(f"{user_var} and {pass_var} go together: set both or neither")
        if key is not None and user is not None:
            raise ConfigError(f"set {key_var} or {user_var}/{pass_var}, not both")
        auth = cls(fix=f"no credentials are configured: set {key_var}, {user_var} and "
                   f"{pass_var}, or {headers_var}")  # fmt: skip
        if key is not None:
            auth = cls.bearer(key, key_var)
        elif user is not None and password is not None:
            auth = cls.basic(user, password, f"{user_var} and {pass_var}")
        extra = settings.option(service, "HEADERS")
        if extra is not None:
            headers = parse_headers(extra, headers_var)
            if auth.headers and any(name.lower() == "authorization" for name in headers):
                raise ConfigError(f"{headers_var} sets Authorization, and so does {key_var}")
            values = tuple(headers.values())
            auth = auth + cls(headers, values, f"check {headers_var}")
        return auth


def parse_headers(raw: str, var: str) -> dict[str, str]:
    """``Name=value,Other=value`` (values percent-decoded, like OTEL_EXPORTER_OTLP_HEADERS).
    Errors never quote the value: it usually holds a secret."""
    headers: dict[str, str] = {}
    for number, item in enumerate(raw.split(","), 1):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not _HEADER_NAME.match(name) or not value.strip():
            raise ConfigError(f"{var}: entry {number} is not Name=value")
        headers[name] = unquote(value.strip())
    return headers


_parse_headers = parse_headers  # the name the otlp backend imported first


# --- statuses ------------------------------------------------------------------------------


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"  # retry later: timeouts, connection errors, 408, 429, 5xx
    AUTH = "auth"  # credentials refused (or a redirect: endpoint wrong): the service pauses
    REJECTED = "rejected"  # this payload will never be accepted: dead-letter the run alone
    # Only from ``read``: the answer refused some of these runs without naming them. The loop
    # re-sends them in halves, like a 4xx for several runs, and never reports this verdict.
    SPLIT = "split"


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


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one run."""

    verdict: Verdict
    reason: str = ""
    retry_after: float | None = None

    @classmethod
    def transient(cls, reason: str, retry_after: float | None = None) -> Outcome:
        return cls(Verdict.TRANSIENT, reason, retry_after)

    @classmethod
    def rejected(cls, reason: str) -> Outcome:
        return cls(Verdict.REJECTED, reason)

    @classmethod
    def split(cls, reason: str) -> Outcome:
        """From ``read``: the answer refused one or more of the runs given this outcome, and
        did not say which. The loop handles them like a 4xx for a request of several runs:
        it re-encodes them in two halves and sends those, until each refused run stands
        alone in its request (that request's own answer decides). A run that is alone
        already (the only run of the request given this outcome) is rejected with
        ``reason``. Every run given it is sent again: use it only where a re-sent run is
        harmless (the receiver deduplicates by a stable id)."""
        return cls(Verdict.SPLIT, reason)


DELIVERED = Outcome(Verdict.DELIVERED)
BUDGET_SPENT = Outcome.transient(
    "not sent: this attempt's time budget is spent; sent on the next attempt"
)


@dataclass(frozen=True, slots=True)
class Reply:
    """What one request came to; ``status`` 0 means no answer (timeout, connection error)."""

    status: int
    body: bytes = b""
    retry_after: float | None = None
    error: str = ""  # transport error, already scrubbed
    location: str = ""  # of a redirect
    # The answer's media type, lower-cased and without parameters ("application/json" for
    # "Application/JSON; charset=utf-8"); "" when the answer has no Content-Type.
    content_type: str = ""


# --- hung connections ----------------------------------------------------------------------
# requests' read timeout bounds each recv(), so a server that drips one byte a second holds
# a request forever. A watchdog thread (one per process) shuts down the socket of a request
# past its wall-clock deadline: the blocked read returns at once, the connection is dropped
# (never returned to the pool) and the runs count as timed out.


class _Watch:
    __slots__ = ("at", "conns", "fired")

    def __init__(self, at: float) -> None:
        self.at = at
        self.conns: list[urllib3.connection.HTTPConnection] = []
        self.fired = False


def _shutdown(conn: urllib3.connection.HTTPConnection) -> None:
    sock: Any = conn.sock
    raw = getattr(sock, "socket", sock)  # urllib3's SSLTransport wraps the socket
    if isinstance(raw, socket.socket):
        with suppress(OSError):
            # socket.socket's own shutdown: an SSLSocket's would also drop its TLS state
            # under the reading thread's feet.
            socket.socket.shutdown(raw, socket.SHUT_RDWR)


class _Watchdog:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Fresh state; also in a forked child: the parent's thread and lock stay behind."""
        self._cond = threading.Condition()
        self._watches: set[_Watch] = set()
        # conn -> the watch of the request using it now: a connection back in the pool and
        # taken by another request is never shut down for the earlier one's deadline.
        self._owner: dict[urllib3.connection.HTTPConnection, _Watch] = {}
        self._local = threading.local()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watching(self, at: float) -> Iterator[_Watch]:
        """Shut down the connections this thread uses for one request once ``at`` passes."""
        watch = _Watch(at)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="dispatch-http-watchdog", daemon=True
                )
                self._thread.start()
            self._watches.add(watch)
            self._cond.notify()
        self._local.watch = watch
        try:
            yield watch
        finally:
            self._local.watch = None
            with self._cond:
                self._watches.discard(watch)
                for conn in watch.conns:
                    if self._owner.get(conn) is watch:
                        del self._owner[conn]

    def register(self, conn: urllib3.connection.HTTPConnection) -> None:
        watch: _Watch | None = getattr(self._local, "watch", None)
        if watch is None:
            return
        with self._cond:
            previous = self._owner.get(conn)
            if previous is not None and previous is not watch:
                previous.conns.remove(conn)
            self._owner[conn] = watch
            if conn not in watch.conns:
                watch.conns.append(conn)
            if watch.fired:  # connected after the deadline: no reading from it
                _shutdown(conn)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                upcoming = []
                for watch in self._watches:
                    if watch.fired:
                        continue
                    if watch.at <= now:
                        watch.fired = True
                        for conn in watch.conns:  # under the lock: the request is not done
                            _shutdown(conn)
                    else:
                        upcoming.append(watch.at)
                self._cond.wait(min(upcoming) - now if upcoming else None)


_watchdog = _Watchdog()
os.register_at_fork(after_in_child=_watchdog.reset)


class _WatchedConnection(urllib3.connection.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        _watchdog.register(self)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watchdog.register(self)
        super().request(*args, **kwargs)


class _WatchedTlsConnection(_WatchedConnection, urllib3.connection.HTTPSConnection):
    """``_WatchedConnection``'s hooks over TLS (its ``super()`` calls reach the TLS class)."""


class _Pool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _WatchedConnection


class _TlsPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _WatchedTlsConnection


_POOLS = {"http": _Pool, "https": _TlsPool}


class _WatchedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        manager.pool_classes_by_scheme = _POOLS
        return manager


@dataclass(frozen=True)
class _Route:
    """Where one client's requests go: the pool (direct, or through the proxy the
    environment names) and the URL to ask it for."""

    session: requests.Session  # owns the adapter and its pools
    pool: urllib3.connectionpool.HTTPConnectionPool
    url: str


def _route(endpoint: str, pool_size: int) -> _Route:
    """Resolve once what ``requests`` works out again for every request: ``HTTPS_PROXY`` /
    ``HTTP_PROXY`` / ``NO_PROXY``, ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` (else
    certifi's bundle), and the pool of the adapter that speaks to that proxy or host. The
    per-request path then skips ``Session.request`` (environment lookups, request
    preparation, hooks, cookies, the ``Response`` object): it took over half of a Helicone
    worker's CPU (py-spy, ``benchmarks/cost.py``), a request per run. ``~/.netrc`` is never
    read: ``Auth`` sets our credentials."""
    session = requests.Session()
    # No retries in urllib3: the core owns retry policy, and a retry here would re-send a
    # run the vendor may already have stored without us knowing.
    adapter = _WatchedAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    env = session.merge_environment_settings(endpoint, {}, None, None, None)
    prepared = requests.Request("POST", endpoint).prepare()
    pool: Any = adapter.get_connection_with_tls_context(
        prepared, env["verify"], proxies=env["proxies"], cert=env["cert"]
    )
    untyped: Any = adapter  # cert_verify has no annotations in types-requests
    untyped.cert_verify(pool, endpoint, env["verify"], env["cert"])
    return _Route(session, pool, adapter.request_url(prepared, env["proxies"]))


# What requests sent by default besides our own headers (answers may come compressed).
_ACCEPT_ENCODING = urllib3.util.make_headers(accept_encoding=True)["accept-encoding"]


class HttpClient:
    """Keep-alive connections to one endpoint, at most ``pool_size`` kept per process.

    Thread-safe for concurrent ``post`` calls (urllib3's pool is). Rebuilt after a fork, so
    a prefork child never shares its parent's sockets. ``post`` never raises: this is the
    one place where ``urllib3`` exceptions are caught.
    """

    def __init__(
        self, options: HttpOptions, auth: Auth, pool_size: int = 1, accept: str = "*/*"
    ) -> None:
        self.options = options
        self.auth = auth
        self.pool_size = pool_size
        self._pid = -1
        self._lock = threading.Lock()
        self._route: _Route | None = None
        self._headers = {
            "Accept": accept,
            "Accept-Encoding": _ACCEPT_ENCODING,
            "User-Agent": USER_AGENT,
        }

    @property
    def route(self) -> _Route:
        with self._lock:  # the first deliver() calls this from many threads at once
            if self._route is None or self._pid != os.getpid():
                self._route = _route(self.options.endpoint, self.pool_size)
                self._pid = os.getpid()
            return self._route

    def post(self, request: Request, until: float) -> Reply:
        """POST the request; every byte of the answer arrives before ``until`` (monotonic)."""
        opts = self.options
        remaining = until - time.monotonic()
        if remaining <= 0:
            return Reply(0, error="timeout: no time left for the request")
        headers = {
            **self._headers,
            "Content-Type": request.content_type,
            **self.auth.headers_for(request),
            **request.headers,
        }
        timeout = urllib3.Timeout(
            connect=min(opts.connect_timeout, remaining), read=min(opts.read_timeout, remaining)
        )
        route = self.route
        error = ""
        with _watchdog.watching(until) as watch:
            try:
                response = route.pool.urlopen(
                    "POST",
                    route.url,
                    body=request.body,
                    headers=headers,
                    redirect=False,  # a redirect would turn the POST into a GET
                    assert_same_host=False,
                    retries=False,
                    timeout=timeout,
                    preload_content=True,  # read fully: the connection goes back to the pool
                    decode_content=True,
                )
            except urllib3.exceptions.NewConnectionError as exc:  # a ConnectTimeoutError too
                error = f"connection to {opts.safe_endpoint} failed: {exc!r}"
            except urllib3.exceptions.TimeoutError as exc:
                error = f"timeout talking to {opts.safe_endpoint} ({exc})"
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                error = f"connection to {opts.safe_endpoint} failed: {exc!r}"
        if watch.fired:
            # Cut off mid-answer: what was parsed (a status line, part of the headers, an
            # empty body at the "end of file") is not an answer, whatever it looks like.
            error = (
                f"timeout talking to {opts.safe_endpoint}: no complete answer within "
                f"{remaining:.3g} s"
            )
        if error:
            return Reply(0, error=self.auth.scrub(error))
        answer = response.headers
        return Reply(
            response.status,
            response.data,
            retry_after=_capped(parse_retry_after(answer.get("Retry-After")), opts),
            location=answer.get("Location", ""),
            content_type=media_type(answer.get("Content-Type")),
        )

    def close(self) -> None:
        if self._route is not None and self._pid == os.getpid():
            self._route.session.close()
        self._route = None


def media_type(value: str | None) -> str:
    """A Content-Type header's media type: lower-cased, parameters dropped (``""`` if none)."""
    return (value or "").partition(";")[0].strip().lower()


def _capped(seconds: float | None, options: HttpOptions) -> float | None:
    return None if seconds is None else min(seconds, options.max_pause)


# --- the report ----------------------------------------------------------------------------


def summarize(service: str, outcomes: Mapping[str, Outcome]) -> DeliveryReport:
    """Outcomes per run id -> the Backend contract.

    Credentials refused and nothing settled -> ``CredentialsError``; refused part-way -> a
    report whose ``credentials_refused`` says what to fix, the runs delivered staying
    delivered and the others deferred. Every run transient -> ``TransientDeliveryError``.
    Otherwise a report naming exactly the runs not delivered.
    """
    report = DeliveryReport()
    hints: list[float] = []
    settled = False
    for run_id, outcome in outcomes.items():
        if outcome.verdict is Verdict.REJECTED:
            report.rejected[run_id] = outcome.reason
            settled = True
        elif outcome.verdict is Verdict.DELIVERED:
            settled = True
        else:
            report.deferred[run_id] = outcome.reason
            if outcome.verdict is Verdict.AUTH and report.credentials_refused is None:
                report.credentials_refused = outcome.reason
            if outcome.retry_after is not None:
                hints.append(outcome.retry_after)
    if report.credentials_refused is not None:
        if not settled:
            raise CredentialsError(report.credentials_refused)
        return report
    # The longest hint wins: retrying before it would only meet the same refusal.
    report.retry_after = max(hints) if hints else None
    if report.deferred and not settled:
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


# --- the send loop -------------------------------------------------------------------------


class HttpBackend:
    """A Backend that POSTs runs to one HTTP endpoint; subclass it per vendor.

    Class attributes to set: ``name``; ``default_endpoint`` (``""``: the ENDPOINT variable
    is required); ``default_concurrency`` (requests in flight per process and call);
    ``credentials_required`` (API_KEY must be set); ``auth_statuses`` (what means "bad
    credentials"); ``stop_on_transient`` (a failed request stops the attempt's other
    sends: right for batch endpoints, where one failure means the service is failing);
    ``content_type`` and ``accept``. Methods to override: ``encode_run`` or ``encode``,
    ``read``.
    """

    name: ClassVar[str] = "http"
    default_endpoint: ClassVar[str] = ""
    default_concurrency: ClassVar[int] = 1
    max_concurrency: ClassVar[int] = 256
    credentials_required: ClassVar[bool] = False
    auth_statuses: ClassVar[frozenset[int]] = frozenset({401, 403})
    stop_on_transient: ClassVar[bool] = True
    content_type: ClassVar[str] = "application/json"
    accept: ClassVar[str] = "application/json"

    def __init__(
        self, options: HttpOptions, auth: Auth | None = None, *, concurrency: int | None = None
    ) -> None:
        self.options = options
        self.auth = auth if auth is not None else Auth()
        self.concurrency = concurrency or self.default_concurrency
        self.client = HttpClient(
            options, self.auth, pool_size=max(self.concurrency, MIN_POOL_SIZE), accept=self.accept
        )
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = -1

    @classmethod
    def from_settings(cls, service: str, settings: Settings) -> Self:
        return cls(
            HttpOptions.from_settings(service, settings, cls.default_endpoint),
            Auth.from_settings(service, settings, required=cls.credentials_required),
            concurrency=settings.positive_int(
                service, "CONCURRENCY", cls.default_concurrency, maximum=cls.max_concurrency
            ),
        )

    # -- what a vendor module supplies ------------------------------------------------------

    def encode(self, runs: Sequence[Run]) -> Iterable[Request | Rejected]:
        """The requests carrying these runs (each run in exactly one), or ``Rejected`` for a
        run that cannot be encoded. Default: one request per run, body ``encode_run(run)``.
        Called again with a subset when a request of several runs was refused (4xx)."""
        for run in runs:
            try:
                body = self.encode_run(run)
            except (TypeError, ValueError, KeyError) as exc:  # orjson's errors are TypeErrors
                yield Rejected(run.id, f"{self.options.service}: cannot encode the run: {exc}")
                continue
            yield Request((run.id,), body, self.content_type)

    def encode_run(self, run: Run) -> bytes:
        """The body of a one-run request. Default: the run record as JSON."""
        return orjson.dumps(run.record)

    def read(self, request: Request, reply: Reply) -> Mapping[str, Outcome]:
        """Per-run outcomes of a 2xx answer; runs left out count as transient failures.
        ``Outcome.split`` for the runs among which the answer refused some without naming
        them: the loop re-sends them in halves until each refused run stands alone.
        Raise ``ValueError``/``TypeError``/``KeyError`` on an unreadable answer (transient)."""
        return dict.fromkeys(request.runs, DELIVERED)

    # -- the loop ---------------------------------------------------------------------------

    def deliver(self, runs: Sequence[Run], ctx: DeliveryContext) -> DeliveryReport:
        unique = {run.id: run for run in runs}  # a replayed entry twice in a batch: sent once
        if not unique:
            return DeliveryReport()
        sending = _Sending(self, ctx, unique)
        todo = sending.encode(list(unique.values()))
        if ctx.probe and todo:
            # Coming back from an outage or a pause: one request tells whether it is over.
            probe, todo = todo[0], todo[1:]
            verdict = sending.send(probe)
            if verdict in (Verdict.TRANSIENT, Verdict.AUTH):
                first = sending.outcomes.get(probe.runs[0], BUDGET_SPENT)
                sending.stop.set(
                    first
                    if verdict is Verdict.AUTH
                    else Outcome.transient(
                        f"not sent: the probe request failed: {first.reason}", first.retry_after
                    )
                )
        sending.send_all(todo)
        return summarize(self.options.service, sending.result())

    @property
    def pool(self) -> ThreadPoolExecutor:
        # Threads do not survive a fork: a prefork child builds its own pool.
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix=self.name)
            self._pool_pid = os.getpid()
        return self._pool

    def describe(self, reply: Reply) -> str:
        """A reason for a failed request: status and the start of the body, scrubbed."""
        if reply.status == 0:
            return f"{self.options.service}: {reply.error}"
        snippet = reply.body[:REASON_BODY_CHARS].decode("utf-8", "replace").strip()
        text = f"{self.options.service}: HTTP {reply.status}" + (f": {snippet}" if snippet else "")
        return self.auth.scrub(text)

    def refusal(self, reply: Reply) -> str:
        """Why the service pauses: names the variable to fix, never the secret."""
        opts = self.options
        if 300 <= reply.status < 400:
            where = redact_url(reply.location or "?")
            text = (
                f"{opts.service}: {opts.safe_endpoint} redirects to {where} "
                f"(HTTP {reply.status}); set {opts.endpoint_var} to the final URL"
            )
        else:
            text = (
                f"{opts.service} refused the credentials (HTTP {reply.status}) at "
                f"{opts.safe_endpoint}; {self.auth.fix}"
            )
        return self.auth.scrub(text)

    def close(self) -> None:
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None
        self.client.close()


class _Stop:
    """Set once by the first request that makes sending the others pointless (401, 429,
    a failing batch endpoint, the rate limit or the budget)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.outcome: Outcome | None = None

    def set(self, outcome: Outcome) -> None:
        with self._lock:
            if self.outcome is None:
                self.outcome = outcome


NOT_SENT = Outcome.transient("not sent: the attempt was interrupted")


class _Sending:
    """One deliver() call of an ``HttpBackend``: its requests, deadline and outcomes."""

    def __init__(self, backend: HttpBackend, ctx: DeliveryContext, runs: dict[str, Run]) -> None:
        self.backend = backend
        self.ctx = ctx
        self.runs = runs
        self.service = backend.options.service
        self.outcomes: dict[str, Outcome] = {}
        self.stop = _Stop()
        self.deadline = Deadline(backend.options.attempt_budget)
        self._lock = threading.Lock()

    def result(self) -> dict[str, Outcome]:
        return {run_id: self.outcomes.get(run_id, NOT_SENT) for run_id in self.runs}

    def record(self, run_ids: Iterable[str], outcome: Outcome) -> None:
        self.record_each(dict.fromkeys(run_ids, outcome))

    def record_each(self, outcomes: Mapping[str, Outcome]) -> None:
        scrub = self.backend.auth.scrub
        with self._lock:
            for run_id, outcome in outcomes.items():
                if run_id in self.runs:  # ids a vendor's answer made up are ignored
                    reason = scrub(outcome.reason) if outcome.reason else ""
                    self.outcomes[run_id] = Outcome(outcome.verdict, reason, outcome.retry_after)

    def encode(self, runs: Sequence[Run]) -> list[Request]:
        requests_: list[Request] = []
        for item in self.backend.encode(runs):
            if isinstance(item, Rejected):
                self.record([item.run], Outcome.rejected(item.reason))
            else:
                requests_.append(item)
        return requests_

    def send_all(self, requests_: Sequence[Request]) -> None:
        if self.backend.concurrency == 1 or len(requests_) <= 1:
            for request in requests_:
                self.send(request)
            return
        futures = [self.backend.pool.submit(self.send, request) for request in requests_]
        try:
            for future in futures:
                future.result()
        except BaseException:  # e.g. Celery's soft time limit: requests still queued stay unsent
            self.stop.set(NOT_SENT)
            raise

    def send(self, request: Request) -> Verdict:
        """Send one request (or not: stopped, budget spent) and record its runs' outcomes."""
        try:
            return self._send(request)
        except Exception as exc:  # a bug must cost these runs a retry, not the batch its report
            log.exception("%s: unexpected error sending %d runs", self.service, len(request.runs))
            self.record(
                request.runs,
                Outcome.transient(f"{self.service}: unexpected {type(exc).__name__}: {exc}"),
            )
            return Verdict.TRANSIENT

    def _blocked(self) -> Outcome | None:
        if self.stop.outcome is not None:
            return self.stop.outcome
        if self.deadline.passed:
            return BUDGET_SPENT
        try:
            self.ctx.acquire(1)
        except TransientDeliveryError as exc:  # the shared rate limit will not allow it in time
            self.stop.set(Outcome.transient(str(exc), exc.retry_after))
        return self.stop.outcome  # a 401 or 429 may have arrived while this request waited

    def _send(self, request: Request) -> Verdict:
        backend = self.backend
        blocked = self._blocked()
        if blocked is not None:
            self.record(request.runs, blocked)
            return blocked.verdict
        until = min(time.monotonic() + backend.options.request_timeout, self.deadline.at)
        reply = backend.client.post(request, until)
        verdict = classify(reply.status, backend.auth_statuses)
        if verdict is Verdict.DELIVERED:
            self._read(request, reply)
        elif verdict is Verdict.AUTH:
            refused = Outcome(Verdict.AUTH, backend.refusal(reply))
            self.stop.set(refused)  # do not hammer with a bad key
            self.record(request.runs, refused)
        elif verdict is Verdict.REJECTED:
            self._isolate(request.runs, backend.describe(reply))
        else:
            self._transient(request, reply)
        return verdict

    def _read(self, request: Request, reply: Reply) -> None:
        try:
            outcomes = self.backend.read(request, reply)
        except (ValueError, TypeError, KeyError) as exc:  # orjson's decode error is a ValueError
            # Re-sending is safe: run ids are stable, so vendors see a duplicate.
            unreadable = Outcome.transient(f"{self.service}: unreadable answer ({exc})")
            self.record(request.runs, unreadable)
            return
        missing = Outcome.transient(f"{self.service}: the answer names no outcome for the run")
        each = {run_id: outcomes.get(run_id, missing) for run_id in request.runs}
        split = [run_id for run_id, outcome in each.items() if outcome.verdict is Verdict.SPLIT]
        self.record_each({r: o for r, o in each.items() if o.verdict is not Verdict.SPLIT})
        if split:
            self._isolate(tuple(split), each[split[0]].reason)

    def _isolate(self, runs: tuple[str, ...], reason: str) -> None:
        """These runs hold one refused run or more, unnamed (a 4xx for their request, or
        ``Outcome.split``): halve them until each refused run stands alone, so the others
        still go."""
        if len(runs) == 1:
            self.record(runs, Outcome.rejected(reason))
            return
        middle = len(runs) // 2
        for half in (runs[:middle], runs[middle:]):
            for part in self.encode([self.runs[run_id] for run_id in half]):
                self.send(part)

    def _transient(self, request: Request, reply: Reply) -> None:
        reason = self.backend.describe(reply)
        retry_after = reply.retry_after
        if reply.status == 429:
            retry_after = DEFAULT_429_PAUSE_S if retry_after is None else retry_after
            _slow_down(self.ctx, retry_after)
            self.stop.set(Outcome.transient(f"not sent after a 429: {reason}", retry_after))
        elif self.backend.stop_on_transient:
            # A failing server gets no more requests from this attempt.
            self.stop.set(
                Outcome.transient(f"not sent after an earlier failure: {reason}", retry_after)
            )
        self.record(request.runs, Outcome.transient(reason, retry_after))


def _slow_down(ctx: DeliveryContext, seconds: float) -> None:
    """Ask every worker of the service to pause (vendor 429); best effort."""
    try:
        ctx.slow_down(seconds)
    except Exception:  # losing the shared pause must not lose the batch's per-run report
        log.warning("could not tell the other workers to slow down", exc_info=True)
