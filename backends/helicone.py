"""Helicone: one log per run, POSTed to Helicone's custom log endpoint (the manual logger API).

This module is the vendor mapping only (``build_log``); the send loop is ``HttpBackend``.
Helicone has no batch endpoint, so a batch of N runs is N requests. They go out concurrently
from a thread pool kept for the backend's lifetime, bounded by ``DISPATCH_HELICONE_CONCURRENCY``,
over one keep-alive connection pool of the same size. Each run's outcome is tracked on its
own, so a retry re-sends only the runs that failed (3 failures out of 100 -> 3 requests); a
5xx for one run does not stop the others.

Options (``DISPATCH_<SERVICE>_...``): ``API_KEY`` (required), ``ENDPOINT``, ``CONNECT_TIMEOUT``,
``READ_TIMEOUT``, ``REQUEST_TIMEOUT``, ``CONCURRENCY`` (32), ``PROVIDER_URL`` (the
provider's base URL shown in Helicone), ``HEADERS`` (extra headers, e.g. for a proxy)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Self

import orjson

from dispatch_celery.backend import Run
from dispatch_celery.backends.http import Auth, HttpBackend, HttpOptions, url_option, vendor_uuid
from dispatch_celery.decode.records import RunRecord
from dispatch_celery.settings import Settings

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


class HeliconeBackend(HttpBackend):
    """Delivers each run as one Helicone log, concurrently, with per-run outcomes."""

    name: ClassVar[str] = "helicone"
    default_endpoint: ClassVar[str] = DEFAULT_ENDPOINT
    default_concurrency: ClassVar[int] = DEFAULT_CONCURRENCY
    max_concurrency: ClassVar[int] = MAX_CONCURRENCY
    credentials_required: ClassVar[bool] = True
    # One log per request: a 5xx for one run says little about the others, so they go on.
    stop_on_transient: ClassVar[bool] = False

    def __init__(
        self,
        options: HttpOptions,
        auth: Auth | None = None,
        *,
        concurrency: int | None = None,
        provider_url: str = DEFAULT_PROVIDER_URL,
    ) -> None:
        super().__init__(options, auth, concurrency=concurrency)
        self.provider_url = provider_url

    @classmethod
    def from_settings(cls, service: str, settings: Settings) -> Self:
        backend = super().from_settings(service, settings)
        backend.provider_url = url_option(settings, service, "PROVIDER_URL", DEFAULT_PROVIDER_URL)
        return backend

    def encode_run(self, run: Run) -> bytes:
        return orjson.dumps(build_log(run, self.provider_url))
