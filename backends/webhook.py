"""``webhook``: run records POSTed to any HTTP endpoint, signed per Standard Webhooks.

One request per batch (``{"runs": [record, ...]}``, split by bytes:
``DISPATCH_WEBHOOK_MAX_REQUEST_BYTES``, default 4 MiB), or one request per run
(``DISPATCH_WEBHOOK_PER_RUN=true``, same body shape with one record, sent concurrently:
``DISPATCH_WEBHOOK_CONCURRENCY``, default 8). The records are the ``file`` backend's:
redacted by the core, without bodies in metadata-only mode.

Signing (https://www.standardwebhooks.com, as its reference library verifies):

* ``webhook-id``: ``msg_`` + a digest of the body, so the same runs re-sent (a retry, a
  replay) carry the same id and receivers can deduplicate; other runs, another id;
* ``webhook-timestamp``: Unix seconds, taken when the request is sent (after any rate-limit
  wait: receivers refuse timestamps more than 5 minutes off);
* ``webhook-signature``: ``v1,`` + base64 HMAC-SHA256 of ``<id>.<timestamp>.<body>`` with
  the key in ``DISPATCH_WEBHOOK_SECRET`` (``whsec_<base64>``, as the spec defines it).

Outcomes as for every HTTP backend: 2xx delivered; 408/429/5xx and connection errors
transient (Retry-After honoured); 401/403 refused credentials (the service pauses); other
4xx rejected, a request of several runs halved until the refused run stands alone.

Options: ``URL`` (required; ``ENDPOINT`` is accepted too), ``SECRET`` (required),
``HEADERS`` (``Name=value,...``, extra static headers, percent-decoded), ``API_KEY``
(Bearer) or ``USERNAME`` + ``PASSWORD`` (Basic) when the receiver also wants those,
``PER_RUN``, ``MAX_REQUEST_BYTES``, ``CONCURRENCY``, and the toolkit's timeouts.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar, Self

import orjson

from dispatch_celery.backend import Run
from dispatch_celery.backends.http import Auth, HttpBackend, HttpOptions, Rejected, Request
from dispatch_celery.backends.otlp import check_url
from dispatch_celery.errors import ConfigError
from dispatch_celery.settings import Settings

SECRET_PREFIX = "whsec_"  # noqa: S105 (the spec's prefix, not a secret)
MIN_SECRET_BYTES = 24  # the spec: secrets of 24 to 64 random bytes
MAX_SECRET_BYTES = 64
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_REQUEST_BYTES_LIMIT = 64 * 1024 * 1024
DEFAULT_PER_RUN_CONCURRENCY = 8
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_START, _END = b'{"runs":[', b"]}"
_OVERHEAD = len(_START) + len(_END)


def decode_secret(raw: str, var: str) -> bytes:
    """The signing key of a ``whsec_<base64>`` secret; errors never quote the secret."""
    text = raw.strip().removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(
            f"{var} must be a Standard Webhooks secret: whsec_ followed by base64"
        ) from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise ConfigError(
            f"{var} must hold {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes of key "
            f"(base64 after whsec_), it holds {len(key)}"
        )
    return key


def message_id(body: bytes) -> str:
    """Stable per content: the same runs re-sent carry the same id."""
    return "msg_" + hashlib.sha256(body).hexdigest()[:32]


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


@dataclasses.dataclass(frozen=True)
class SigningAuth(Auth):
    """The configured auth headers plus a fresh Standard Webhooks signature per request."""

    key: bytes = dataclasses.field(default=b"", repr=False)

    def headers_for(self, request: Request) -> Mapping[str, str]:
        msg_id = request.headers.get("webhook-id") or message_id(request.body)
        timestamp = int(time.time())
        return {
            **self.headers,
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.key, msg_id, timestamp, request.body),
        }


class WebhookBackend(HttpBackend):
    """Run records to one URL, signed per Standard Webhooks."""

    name: ClassVar[str] = "webhook"
    default_concurrency: ClassVar[int] = 1

    def __init__(
        self,
        options: HttpOptions,
        auth: Auth | None = None,
        *,
        concurrency: int | None = None,
        per_run: bool = False,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        super().__init__(options, auth, concurrency=concurrency)
        self.per_run = per_run
        self.max_request_bytes = max_request_bytes

    @classmethod
    def from_settings(cls, service: str, settings: Settings) -> Self:
        url_var, url = settings.option_name(service, "URL"), settings.option(service, "URL")
        if url is None and settings.option(service, "ENDPOINT") is not None:
            url_var, url = (
                settings.option_name(service, "ENDPOINT"),
                settings.option(service, "ENDPOINT"),
            )
        if url is None:
            raise ConfigError(f"{url_var} is required for the {service} backend")
        check_url(url_var, url)
        secret_var = settings.option_name(service, "SECRET")
        secret = settings.option(service, "SECRET")
        if secret is None:
            raise ConfigError(
                f"{secret_var} is required for the {service} backend (whsec_<base64>, the "
                "Standard Webhooks signing secret the receiver verifies with)"
            )
        key = decode_secret(secret, secret_var)
        per_run_var = settings.option_name(service, "PER_RUN")
        per_run_raw = (settings.option(service, "PER_RUN", "false") or "false").lower()
        if per_run_raw not in _TRUE + _FALSE:
            raise ConfigError(f"{per_run_var} must be true or false, got {per_run_raw!r}")
        per_run = per_run_raw in _TRUE
        base = Auth.from_settings(service, settings)
        auth = SigningAuth(
            base.headers,
            (*base.secrets, secret, secret.removeprefix(SECRET_PREFIX)),
            base.fix if base.headers else f"check {url_var} and {secret_var}",
            key=key,
        )
        options = dataclasses.replace(
            HttpOptions.from_settings(service, settings, url), endpoint=url, endpoint_var=url_var
        )
        default_concurrency = DEFAULT_PER_RUN_CONCURRENCY if per_run else cls.default_concurrency
        return cls(
            options,
            auth,
            concurrency=settings.positive_int(
                service, "CONCURRENCY", default_concurrency, maximum=cls.max_concurrency
            ),
            per_run=per_run,
            max_request_bytes=settings.positive_int(
                service, "MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES,
                maximum=MAX_REQUEST_BYTES_LIMIT,
            ),
        )  # fmt: skip

    def encode(self, runs: Sequence[Run]) -> Iterable[Request | Rejected]:
        items: list[tuple[str, bytes]] = []
        for run in runs:
            try:
                items.append((run.id, orjson.dumps(run.record)))
            except (TypeError, ValueError) as exc:  # orjson.JSONEncodeError is a TypeError
                yield Rejected(run.id, f"{self.options.service}: cannot encode the run: {exc}")
        chunk: list[tuple[str, bytes]] = []
        size = _OVERHEAD
        for item in items:
            extra = len(item[1]) + (1 if chunk else 0)
            if chunk and (self.per_run or size + extra > self.max_request_bytes):
                yield self._request(chunk)
                chunk, size, extra = [], _OVERHEAD, len(item[1])
            chunk.append(item)
            size += extra
        if chunk:
            yield self._request(chunk)

    def _request(self, chunk: Sequence[tuple[str, bytes]]) -> Request:
        body = _START + b",".join(record for _, record in chunk) + _END
        return Request(tuple(run_id for run_id, _ in chunk), body, "application/json")
