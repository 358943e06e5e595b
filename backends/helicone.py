"""Helicone: one log per run, POSTed to Helicone's custom log endpoint (the manual logger API).

Helicone has no batch endpoint, so a batch of N runs is N requests. They go out concurrently
from a thread pool kept for the backend's lifetime, bounded by ``DISPATCH_HELICONE_CONCURRENCY``,
over one keep-alive connection pool of the same size. Each run's outcome is tracked on its
own, so a retry re-sends only the runs that failed (3 failures out of 100 -> 3 requests).

Options (``DISPATCH_<SERVICE>_...``): ``API_KEY`` (required), ``ENDPOINT``, ``CONNECT_TIMEOUT``,
``READ_TIMEOUT``, ``CONCURRENCY``, ``PROVIDER_URL`` (the provider's base URL shown in Helicone).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import orjson

from dispatch_celery.backend import DeliveryContext, DeliveryReport, Run
from dispatch_celery.backends.http import (
    BUDGET_SPENT,
    DELIVERED,
    Deadline,
    HttpClient,
    HttpOptions,
    Outcome,
    Verdict,
    auth_message,
    int_option,
    pause_for,
    slow_down,
    summarize,
    url_option,
    vendor_uuid,
)
from dispatch_celery.decode.records import RunRecord
from dispatch_celery.errors import TransientDeliveryError
from dispatch_celery.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://api.worker.helicone.ai/custom/v1/log"
DEFAULT_PROVIDER_URL = "https://api.openai.com"
DEFAULT_CONCURRENCY = 32
MAX_CONCURRENCY = 256
# Response headers worth showing in Helicone. An allowlist, not a denylist: whatever else the
# upstream sent (cookies, organisation ids, ...) stays out of a third-party service.
FORWARDED_HEADERS = frozenset(
    {"content-type", "x-request-id", "openai-processing-ms", "openai-version", "openai-model"}
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _instant(iso: str) -> dict[str, int]:
    moment = datetime.fromisoformat(iso)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    ms = (moment - _EPOCH) // timedelta(milliseconds=1)  # integer maths: no float rounding
    return {"seconds": ms // 1000, "milliseconds": ms % 1000}


def _headers(run: Run, content_type: str | None) -> dict[str, str]:
    headers = {
        name.lower(): ", ".join(values)
        for name, values in (run.event.response_headers or {}).items()
        if name.lower() in FORWARDED_HEADERS and values
    }
    if content_type is not None:  # the body we send is JSON even when upstream streamed SSE
        headers["content-type"] = content_type
    return headers


def build_log(run: Run, provider_url: str) -> dict[str, Any]:
    """The Helicone log of one run (spec/backends.md, helicone)."""
    record = run.record
    request, output = record["input"], record["output"]
    request_id = vendor_uuid(record["id"])
    meta = {
        "Helicone-Request-Id": request_id,
        "Helicone-Property-Path": record["path"],
        "Helicone-Property-Stream-Id": record["stream_id"],
    }
    if request_id != record["id"]:
        meta["Helicone-Property-Run-Id"] = record["id"]
    user = request.get("user") if isinstance(request, dict) else None
    if isinstance(user, str) and user:
        meta["Helicone-User-Id"] = user

    if isinstance(request, dict):
        request_json = request
    else:  # truncated or non-JSON request bodies still have to travel inside an object
        request_json = {} if request is None else {"body": request}

    response: dict[str, Any] = {"status": record["status"]}
    text = _text_body(output)
    if text is not None:
        response["textBody"] = text
        response["headers"] = _headers(run, None)
    else:
        response["json"] = _json_body(record)
        response["headers"] = _headers(run, "application/json")

    return {
        "providerRequest": {
            "url": provider_url.rstrip("/") + record["path"],
            "json": request_json,
            "meta": meta,
        },
        "providerResponse": response,
        "timing": {
            "startTime": _instant(record["started_at"]),
            "endTime": _instant(record["ended_at"]),
        },
    }


def _text_body(output: Any) -> str | None:
    """The ``textBody`` of a response that is not JSON (text, or a binary marker)."""
    if isinstance(output, str):
        return output
    if isinstance(output, dict) and output.get("_binary"):
        kind = output.get("content_type") or "unknown type"
        return f"[binary response not forwarded: {output.get('bytes')} bytes of {kind}]"
    return None


def _json_body(record: RunRecord) -> dict[str, Any]:
    output = record["output"]
    if isinstance(output, dict):
        if output.get("_truncated"):
            # The capped body lost its usage; the record kept it, and Helicone's cost and
            # token figures read providerResponse.json.usage.
            extra = {key: record[key] for key in ("model", "usage") if record[key] is not None}
            return {**output, **extra}
        return output
    return {} if output is None else {"data": output}


class _Stop:
    """Set once by the first run that makes sending the others pointless (401, 429)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.outcome: Outcome | None = None

    def set(self, outcome: Outcome) -> None:
        with self._lock:
            if self.outcome is None:
                self.outcome = outcome


class HeliconeBackend:
    """Delivers each run as one Helicone log, concurrently, with per-run outcomes."""

    name: ClassVar[str] = "helicone"

    def __init__(
        self,
        options: HttpOptions,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        provider_url: str = DEFAULT_PROVIDER_URL,
    ) -> None:
        self.options = options
        self.concurrency = concurrency
        self.provider_url = provider_url
        self.client = HttpClient(options, pool_size=concurrency)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = -1

    @classmethod
    def from_settings(cls, service: str, settings: Settings) -> HeliconeBackend:
        return cls(
            HttpOptions.from_settings(service, settings, DEFAULT_ENDPOINT),
            concurrency=int_option(
                settings, service, "CONCURRENCY", DEFAULT_CONCURRENCY, maximum=MAX_CONCURRENCY
            ),
            provider_url=url_option(settings, service, "PROVIDER_URL", DEFAULT_PROVIDER_URL),
        )

    @property
    def pool(self) -> ThreadPoolExecutor:
        # Threads do not survive a fork: a prefork child builds its own pool.
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix=self.name)
            self._pool_pid = os.getpid()
        return self._pool

    def deliver(self, runs: Sequence[Run], ctx: DeliveryContext) -> DeliveryReport:
        unique = {run.id: run for run in runs}  # a replayed entry twice in a batch: one log
        if not unique:
            return DeliveryReport()
        stop, deadline = _Stop(), Deadline(self.options.attempt_budget)
        futures = {
            run_id: self.pool.submit(self._send, run, ctx, stop, deadline)
            for run_id, run in unique.items()
        }
        try:
            outcomes = {run_id: future.result() for run_id, future in futures.items()}
        except BaseException:  # e.g. Celery's soft time limit: runs still queued stay unsent
            stop.set(Outcome(Verdict.TRANSIENT, "not sent: the attempt was interrupted"))
            raise
        return summarize(self.options.service, outcomes)

    def _send(self, run: Run, ctx: DeliveryContext, stop: _Stop, deadline: Deadline) -> Outcome:
        try:
            return self._send_one(run, ctx, stop, deadline)
        except Exception as exc:  # a bug must cost this run a retry, not the batch its report
            log.exception("helicone: unexpected error sending run %s", run.id)
            return Outcome(
                Verdict.TRANSIENT,
                self.options.scrub(
                    f"{self.options.service}: unexpected {type(exc).__name__}: {exc}"
                ),
            )

    def _send_one(self, run: Run, ctx: DeliveryContext, stop: _Stop, deadline: Deadline) -> Outcome:
        if stop.outcome is not None:
            return stop.outcome
        if deadline.passed:
            return BUDGET_SPENT
        try:
            body = orjson.dumps(build_log(run, self.provider_url))
        except (TypeError, ValueError, KeyError) as exc:  # orjson.JSONEncodeError is a TypeError
            return Outcome(Verdict.REJECTED, f"{self.options.service}: cannot build the log: {exc}")
        try:
            ctx.acquire(1)
        except TransientDeliveryError as exc:  # the shared rate limit will not allow it in time
            outcome = Outcome(Verdict.TRANSIENT, str(exc), exc.retry_after)
            stop.set(outcome)
            return outcome
        if stop.outcome is not None:  # a 401 or 429 arrived while this run waited
            return stop.outcome
        reply = self.client.post(body)
        verdict = reply.verdict()
        if verdict is Verdict.DELIVERED:
            return DELIVERED
        if verdict is Verdict.AUTH:
            outcome = Outcome(Verdict.AUTH, auth_message(self.options, reply))
            stop.set(outcome)  # do not hammer with a bad key
            return outcome
        reason = reply.describe(self.options)
        if verdict is Verdict.REJECTED:
            return Outcome(Verdict.REJECTED, reason)
        if reply.status == 429:
            pause = pause_for(reply)
            slow_down(ctx, pause)
            stop.set(Outcome(Verdict.TRANSIENT, f"not sent after a 429: {reason}", pause))
            return Outcome(Verdict.TRANSIENT, reason, pause)
        return Outcome(Verdict.TRANSIENT, reason, reply.retry_after)

    def close(self) -> None:
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None
        self.client.close()
