"""``langfuse``: the ``otlp`` backend with a Langfuse preset (no second HTTP client).

Langfuse (v3 and later; its SDK is built on OpenTelemetry) ingests OTLP/HTTP at
``<host>/api/public/otel/v1/traces`` with HTTP Basic auth (public key : secret key). Each run
is a generation: the span carries the GenAI semconv and OpenInference attributes of
``otlp`` and, on top, Langfuse's own attributes as the official ``langfuse`` package names
them (``LangfuseOtelSpanAttributes``), which Langfuse reads before any other convention:

* ``langfuse.observation.type`` ``generation`` (``embedding`` for embeddings);
* ``langfuse.observation.model.name``, ``.model.parameters`` (JSON), ``.usage_details``
  (JSON: ``input`` / ``output`` / ``total``);
* ``langfuse.observation.input`` / ``.output`` (JSON: the OpenAI messages and the reply,
  which Langfuse renders as a chat), absent in metadata-only mode;
* ``langfuse.observation.level`` ``ERROR`` and ``.status_message`` for a failed call;
* ``langfuse.trace.name`` (the span name), ``user.id`` and ``session.id`` when the request
  carries them (``user`` / ``safety_identifier``; ``conversation`` or
  ``metadata.session_id``), ``langfuse.observation.metadata.<key>`` (path, status, stream
  id, ...), ``langfuse.environment`` when configured;
* no ``completion_start_time``: llm-proxy's events do not record when the first token came.

The trace id is the run id (a UUID), so the trace is found in Langfuse by request id; the
span id derives from it: a retried or replayed run updates the same observation.

Options: ``DISPATCH_LANGFUSE_HOST`` (else ``LANGFUSE_BASE_URL``, ``LANGFUSE_HOST``; default
the EU cloud ``https://cloud.langfuse.com``), ``DISPATCH_LANGFUSE_PUBLIC_KEY`` and
``DISPATCH_LANGFUSE_SECRET_KEY`` (else ``LANGFUSE_PUBLIC_KEY`` / ``LANGFUSE_SECRET_KEY``;
required), ``DISPATCH_LANGFUSE_ENVIRONMENT`` (else ``LANGFUSE_TRACING_ENVIRONMENT``),
``DISPATCH_LANGFUSE_COMPRESSION`` (``none`` / ``gzip``), ``DISPATCH_LANGFUSE_SERVICE_NAME``,
``DISPATCH_LANGFUSE_MAX_REQUEST_BYTES`` (3 MiB), and the toolkit's timeouts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self

import orjson

from dispatch_celery.backends import otlp_wire as wire
from dispatch_celery.backends.genai import AttributeValue, Parsed
from dispatch_celery.backends.http import Auth, HttpOptions
from dispatch_celery.backends.otlp import (
    COMPRESSIONS,
    DEFAULT_SERVICE_NAME,
    MAX_REQUEST_BYTES_LIMIT,
    OtlpBackend,
    OtlpConfig,
    check_url,
    option_or_foreign,
)
from dispatch_celery.decode.records import RunRecord
from dispatch_celery.errors import ConfigError
from dispatch_celery.settings import Settings

DEFAULT_HOST = "https://cloud.langfuse.com"  # EU; US: https://us.cloud.langfuse.com
OTEL_PATH = "/api/public/otel/v1/traces"
DEFAULT_MAX_REQUEST_BYTES = 3 * 1024 * 1024
# What the official SDK sends: Langfuse v4 processes such spans at once instead of batching
# them for minutes; older servers ignore it.
INGESTION_VERSION = "4"

# The names of the official package's LangfuseOtelSpanAttributes (langfuse/_client/attributes.py).
TRACE_NAME = "langfuse.trace.name"
TRACE_USER_ID = "user.id"
TRACE_SESSION_ID = "session.id"
OBSERVATION_TYPE = "langfuse.observation.type"
OBSERVATION_METADATA = "langfuse.observation.metadata"
OBSERVATION_LEVEL = "langfuse.observation.level"
OBSERVATION_STATUS_MESSAGE = "langfuse.observation.status_message"
OBSERVATION_INPUT = "langfuse.observation.input"
OBSERVATION_OUTPUT = "langfuse.observation.output"
OBSERVATION_MODEL = "langfuse.observation.model.name"
OBSERVATION_MODEL_PARAMETERS = "langfuse.observation.model.parameters"
OBSERVATION_USAGE_DETAILS = "langfuse.observation.usage_details"
ENVIRONMENT = "langfuse.environment"
IS_APP_ROOT = "langfuse.internal.is_app_root"  # the SDK sets it on a trace's root span


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _setting(settings: Settings, service: str, name: str, *foreign: str) -> tuple[str, str | None]:
    """(variable, value): ours, else the Langfuse SDK's; the variable names ours when unset."""
    found = option_or_foreign(settings, service, name, *foreign)
    return found or (settings.option_name(service, name), None)


def langfuse_attributes(
    record: RunRecord, parsed: Parsed, span_name: str, environment: str | None
) -> dict[str, AttributeValue]:
    """Langfuse's own attributes of the run's generation (see the module docstring)."""
    attrs: dict[str, Any] = {
        OBSERVATION_TYPE: "embedding" if parsed.kind == "EMBEDDING" else "generation",
        TRACE_NAME: span_name,
        IS_APP_ROOT: True,  # each run's span is the root of its own trace
    }
    model = record["model"] or parsed.request_model
    if model:
        attrs[OBSERVATION_MODEL] = model
    if parsed.params:
        attrs[OBSERVATION_MODEL_PARAMETERS] = _json(parsed.params)
    usage = record["usage"] or {}
    details = {
        ours: usage[theirs]  # type: ignore[literal-required]
        for ours, theirs in (
            ("input", "prompt_tokens"), ("output", "completion_tokens"), ("total", "total_tokens")
        )
        if theirs in usage
    }  # fmt: skip
    if details:
        attrs[OBSERVATION_USAGE_DETAILS] = _json(details)
    if parsed.openai_input is not None:
        attrs[OBSERVATION_INPUT] = _json(parsed.openai_input)
    if parsed.openai_output is not None:
        attrs[OBSERVATION_OUTPUT] = _json(parsed.openai_output)
    if parsed.error is not None:
        attrs[OBSERVATION_LEVEL] = "ERROR"
        attrs[OBSERVATION_STATUS_MESSAGE] = parsed.error
    if parsed.user:
        attrs[TRACE_USER_ID] = parsed.user
    if parsed.session:
        attrs[TRACE_SESSION_ID] = parsed.session
    if environment:
        attrs[ENVIRONMENT] = environment
    for key, value in parsed.metadata.items():
        attrs[f"{OBSERVATION_METADATA}.{key}"] = (
            value if isinstance(value, str | bool | int | float) else _json(value)
        )
    return attrs


def _key_variables(settings: Settings, service: str, pk_var: str, sk_var: str) -> str:
    """What a refusal tells to check: the variables the keys came from, and ours."""
    ours = (
        settings.option_name(service, "PUBLIC_KEY"),
        settings.option_name(service, "SECRET_KEY"),
    )
    if (pk_var, sk_var) == ours:
        return f"{pk_var} and {sk_var}"
    return f"{pk_var} and {sk_var} (or set {ours[0]} and {ours[1]}, which take precedence)"


class LangfuseBackend(OtlpBackend):
    """Runs as Langfuse generations through Langfuse's OTLP endpoint."""

    name: ClassVar[str] = "langfuse"

    def __init__(
        self,
        options: HttpOptions,
        auth: Auth | None = None,
        *,
        config: OtlpConfig | None = None,
        concurrency: int | None = None,
        environment: str | None = None,
    ) -> None:
        super().__init__(options, auth, config=config, concurrency=concurrency)
        self.environment = environment

    @classmethod
    def from_settings(cls, service: str, settings: Settings) -> Self:
        host_var, host = _setting(settings, service, "HOST", "LANGFUSE_BASE_URL", "LANGFUSE_HOST")
        host = check_url(host_var, host or DEFAULT_HOST)
        endpoint = host.rstrip("/") + OTEL_PATH
        pk_var, public_key = _setting(settings, service, "PUBLIC_KEY", "LANGFUSE_PUBLIC_KEY")
        sk_var, secret_key = _setting(settings, service, "SECRET_KEY", "LANGFUSE_SECRET_KEY")
        for var, value in ((pk_var, public_key), (sk_var, secret_key)):
            if value is None:
                raise ConfigError(
                    f"{var} is required for the {service} backend (a Langfuse project's API "
                    "key; LANGFUSE_PUBLIC_KEY / LANGFUSE_SECRET_KEY are used when unset)"
                )
        assert public_key is not None and secret_key is not None
        _, environment = _setting(settings, service, "ENVIRONMENT", "LANGFUSE_TRACING_ENVIRONMENT")
        compression = settings.option(service, "COMPRESSION", "none") or "none"
        if compression.lower() not in COMPRESSIONS:
            raise ConfigError(
                f"{settings.option_name(service, 'COMPRESSION')} must be none or gzip, "
                f"got {compression!r}"
            )
        config = OtlpConfig(
            protocol=wire.PROTOBUF,
            gzip=compression.lower() == "gzip",
            max_request_bytes=settings.positive_int(
                service, "MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES,
                maximum=MAX_REQUEST_BYTES_LIMIT,
            ),
            resource={
                "service.name": settings.option(service, "SERVICE_NAME", DEFAULT_SERVICE_NAME)
            },
        )  # fmt: skip
        options = dataclasses.replace(
            HttpOptions.from_settings(service, settings, endpoint),
            endpoint=endpoint,
            endpoint_var=host_var,
        )
        return cls(
            options,
            Auth.basic(public_key, secret_key, _key_variables(settings, service, pk_var, sk_var)),
            config=config,
            concurrency=settings.positive_int(
                service, "CONCURRENCY", cls.default_concurrency, maximum=cls.max_concurrency
            ),
            environment=environment,
        )

    def extra_attributes(self, record: RunRecord, parsed: Parsed) -> dict[str, AttributeValue]:
        from dispatch_celery.backends.genai import span_name

        return langfuse_attributes(record, parsed, span_name(record, parsed), self.environment)

    def request_headers(self) -> dict[str, str]:
        return {"x-langfuse-ingestion-version": INGESTION_VERSION}
