"""The Backend protocol: what a plugin author implements.

A backend turns LLM run records into one receiving service's API. It is registered under
the entry-point group ``dispatch_celery.backends``::

    [project.entry-points."dispatch_celery.backends"]
    mybackend = "my_package.module:MyBackend"

and is imported only when a worker or bridge for that service starts. An HTTP backend
subclasses ``dispatch_celery.backends.http.HttpBackend`` and supplies only the vendor
mapping (encode, auth, per-run outcomes): the toolkit's send loop keeps the contract below.
Any other class must offer

* ``from_settings(service, settings) -> instance`` (classmethod): read options through
  ``settings.option(service, "API_KEY")`` (i.e. ``DISPATCH_<SERVICE>_API_KEY``) and raise
  ``ConfigError`` naming the variable when something is missing or invalid;
* ``deliver(runs, ctx) -> DeliveryReport``: send the runs; classify failures;
* ``close()``: release connections.

Contract of ``deliver``:

* Raise ``TransientDeliveryError(retry_after=...)`` when nothing could be delivered and a
  later attempt may succeed (timeouts, connection errors, 408, 429, 5xx);
  ``CredentialsError`` when the receiver refused the credentials (401/403) or the endpoint
  is wrong (a redirect) and nothing was delivered: the service pauses, nothing is
  dead-lettered; ``PermanentDeliveryError`` when the whole batch will never be accepted.
* Otherwise return a ``DeliveryReport``: every run not named in it counts as delivered;
  ``rejected`` names runs refused for good (dead-lettered alone, with the reason);
  ``deferred`` names runs that failed transiently (only those are retried). Credentials
  refused part-way: the runs already delivered stay unnamed, the rest go in ``deferred``,
  and ``credentials_refused`` says which variable to fix.
* Be idempotent per run id: a retried or replayed run carries the same ``record["id"]``.
* Never put credentials in exception messages or reasons; translate the HTTP library's
  and the vendor's exceptions here, at this boundary.
* Call ``ctx.acquire()`` before each request when the backend is rate limited, and
  ``ctx.slow_down(seconds)`` when the vendor answered 429.
* With ``ctx.probe`` (the service is coming back from an outage or a pause), send one
  request first; when it fails transiently or is refused, defer the rest unsent.
* Bound each request by a total deadline (a server that drips a byte a second must not
  hold it) and the whole call by a share of the task's time limit.

The core owns everything else: decoding, filtering, redaction, size caps, retries with
backoff and jitter, dead-lettering, counting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

from dispatch_celery.decode.events import Event
from dispatch_celery.decode.records import RunRecord
from dispatch_celery.errors import PermanentDeliveryError, TransientDeliveryError
from dispatch_celery.settings import Settings


def _identity(data: bytes) -> bytes:
    return data


class Run:
    """One event ready for delivery: its record (redacted, capped) and its raw entry.

    ``raw`` is the original entry ``data`` with sensitive values redacted, and ``event``
    the decoded event with its sensitive headers redacted (``redact_event``); both are
    computed on first use only, since most backends never need them. ``json`` is the
    serialization of ``record`` (``orjson.dumps``) when the core already made it (the
    credential scan does), else None: a backend that writes the record as it is may
    reuse it instead of serializing again.
    """

    __slots__ = ("_event", "_raw", "_redact_event", "_redact_raw", "json", "record")

    def __init__(
        self,
        record: RunRecord,
        event: Event,
        redact_raw: Callable[[bytes], bytes] = _identity,
        *,
        redact_event: Callable[[Event], Event] | None = None,
        json: bytes | None = None,
    ) -> None:
        self.record = record
        self._event = event
        self._redact_event = redact_event
        self._redact_raw = redact_raw
        self._raw: bytes | None = None
        self.json = json

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def event(self) -> Event:
        if self._redact_event is not None:
            self._event = self._redact_event(self._event)
            self._redact_event = None
        return self._event

    @property
    def raw(self) -> bytes:
        if self._raw is None:
            self._raw = self._redact_raw(self._event.raw)
        return self._raw


@dataclass
class DeliveryReport:
    """Per-run outcome of one ``deliver`` call; runs not named here were delivered."""

    rejected: dict[str, str] = field(default_factory=dict)  # run id -> reason (permanent)
    deferred: dict[str, str] = field(default_factory=dict)  # run id -> reason (transient)
    retry_after: float | None = None  # server's hint for the deferred runs
    # Set when the receiver refused our credentials (401/403, a redirect to a login page)
    # part-way: the message names the variable to fix. Runs already delivered stay
    # delivered; the others are listed in ``deferred`` and the core pauses the service.
    credentials_refused: str | None = None


def _no_wait(cost: int = 1) -> None:
    return None


def _no_slow_down(seconds: float) -> None:
    return None


@dataclass(frozen=True)
class DeliveryContext:
    """What the core tells a backend about the current attempt."""

    service: str
    batch_id: str
    attempt: int  # 1-based
    # Always 0 (no attempt limit): retries end with DISPATCH_RETRY_BUDGET, a duration, not
    # a count. Kept, with a default, so that plugins written against the first contract
    # still build and run; new code should not read it.
    max_attempts: int = 0
    acquire: Callable[[int], None] = _no_wait  # blocks until the shared rate limit allows
    slow_down: Callable[[float], None] = _no_slow_down  # all workers pause (vendor 429)
    # The service is coming back from an outage or a credentials pause: send one request
    # first, and when it fails transiently (or is refused) defer the rest without sending.
    probe: bool = False


@runtime_checkable
class Backend(Protocol):
    """A delivery target. See the module docstring for the full contract."""

    name: ClassVar[str]

    @classmethod
    def from_settings(cls, service: str, settings: Settings) -> Backend: ...

    def deliver(self, runs: Sequence[Run], ctx: DeliveryContext) -> DeliveryReport: ...

    def close(self) -> None: ...


class RecordingBackend:
    """Test double: records what it was given; can be told to fail.

    ``fail_transient`` / ``fail_permanent``: number of calls that raise before succeeding.
    ``reject``: run ids refused for good. ``defer_once``: run ids that fail transiently once.
    """

    name: ClassVar[str] = "recording"

    def __init__(self) -> None:
        self.calls: list[list[Run]] = []
        self.fail_transient = 0
        self.fail_permanent = 0
        self.retry_after: float | None = None
        self.reject: set[str] = set()
        self.defer_once: set[str] = set()
        self.closed = False

    @classmethod
    def from_settings(cls, service: str, settings: Settings) -> RecordingBackend:
        return cls()

    @property
    def delivered(self) -> list[Run]:
        return [run for call in self.calls for run in call]

    def deliver(self, runs: Sequence[Run], ctx: DeliveryContext) -> DeliveryReport:
        if self.fail_permanent > 0:
            self.fail_permanent -= 1
            raise PermanentDeliveryError("recording backend: permanent failure")
        if self.fail_transient > 0:
            self.fail_transient -= 1
            raise TransientDeliveryError(
                "recording backend: transient failure", retry_after=self.retry_after
            )
        report = DeliveryReport()
        accepted: list[Run] = []
        for run in runs:
            if run.id in self.reject:
                report.rejected[run.id] = "recording backend: rejected"
            elif run.id in self.defer_once:
                self.defer_once.discard(run.id)
                report.deferred[run.id] = "recording backend: deferred"
            else:
                accepted.append(run)
        self.calls.append(accepted)
        return report

    def close(self) -> None:
        self.closed = True
