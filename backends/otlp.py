"""``otlp``: each run an OpenTelemetry span (GenAI semconv + OpenInference), OTLP/HTTP.

A batch of runs is one ``ExportTraceServiceRequest`` (``POST <endpoint>``), split by bytes
(``MAX_REQUEST_BYTES``, default 4 MiB, before compression); a run is never split. The
attributes are built in ``genai`` (both conventions, so Phoenix, Langfuse and generic OTel
backends all show model, tokens and messages); the wire format in ``otlp_wire``
(``opentelemetry-proto`` messages, no SDK). Sending, deadlines, rate limit, 429 pauses,
status classification, probe mode and the report are the HTTP toolkit's send loop.

Outcomes: 2xx delivered, unless the answer carries a ``partial_success`` with rejected
spans (read as protobuf or JSON by the answer's ``Content-Type``; the body decides only
when that header is missing or names neither): the runs the receiver names (by span,
trace or run id in its message) are rejected with its message, the others delivered; when
all of a request's spans are rejected, all its runs are. When it rejects some without
naming them, the unnamed runs are re-sent in halves until each rejected run stands alone
(``Outcome.split``), so only the bad runs are dead-lettered and the others delivered.

That last step departs, deliberately, from the OTLP specification: "The client MUST NOT
retry the request when it receives a partial success response". The halves carry again the
spans the receiver already accepted. That is harmless here because span ids are
deterministic (derived from run ids, ``genai.span_id_for``) and the receivers keep one span
per span id: Phoenix inserts ``ON CONFLICT (span_id) DO NOTHING`` (the first write wins),
Langfuse updates the same observation. The rule protects senders whose re-sent spans would
be stored twice; ours are not. Obeying it would cost more: every good run of the request
dead-lettered with the bad one, delivered only when someone replays it. The split costs
about 2 log2(n) more requests per bad run in a request of n runs, within the rate limit and
the attempt budget. A receiver that counted a re-sent, already stored span as rejected would
get that run dead-lettered though stored (harmless: a replay is idempotent). A preset for a
receiver that does not keep one span per span id sets ``split_partial_success = False``:
the request's runs are then all dead-lettered with the receiver's message, none re-sent.

408/429/5xx and connection errors transient (Retry-After honoured), 401/403 refused
credentials (the service pauses), other 4xx (400/413/415/422) rejected: a request of
several runs is halved until the refused run stands alone.

Options (``DISPATCH_<SERVICE>_...``; the standard ``OTEL_EXPORTER_OTLP_*`` variables are
honoured when ours are unset):

* ``ENDPOINT``: the full URL (a URL without a path gets ``/v1/traces``); else
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (as is), else ``OTEL_EXPORTER_OTLP_ENDPOINT`` +
  ``/v1/traces``. Required.
* ``PROTOCOL``: ``http/protobuf`` (default) or ``http/json``; else
  ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``.
* ``COMPRESSION``: ``none`` (default) or ``gzip``; else the ``OTEL_..._COMPRESSION`` pair.
* ``HEADERS`` (``Name=value,...``, percent-decoded), else
  ``OTEL_EXPORTER_OTLP_TRACES_HEADERS`` / ``OTEL_EXPORTER_OTLP_HEADERS``; ``API_KEY``
  (Bearer); ``USERNAME`` + ``PASSWORD`` (Basic).
* ``SERVICE_NAME`` (resource ``service.name``, default ``llm-proxy``),
  ``RESOURCE_ATTRIBUTES`` (``key=value,...``, e.g. ``openinference.project.name=proxy``).
* ``MAX_REQUEST_BYTES``, ``CONCURRENCY`` (1), ``CONNECT_TIMEOUT``, ``READ_TIMEOUT``,
  ``REQUEST_TIMEOUT``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, ClassVar, Self
from urllib.parse import unquote, urlparse

import orjson
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from dispatch_celery.backend import Run
from dispatch_celery.backends import otlp_wire as wire
from dispatch_celery.backends.genai import AttributeValue, Parsed, build_span, span_id_for
from dispatch_celery.backends.http import (
    DELIVERED,
    Auth,
    HttpBackend,
    HttpOptions,
    Outcome,
    Rejected,
    Reply,
    Request,
    parse_headers,
)
from dispatch_celery.decode.records import RunRecord
from dispatch_celery.errors import ConfigError
from dispatch_celery.settings import Settings, redact_url

DEFAULT_SERVICE_NAME = "llm-proxy"
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_REQUEST_BYTES_LIMIT = 64 * 1024 * 1024
TRACES_PATH = "/v1/traces"
SCOPE_NAME = "dispatch-celery"
COMPRESSIONS = ("none", "gzip")
PROTOBUF_TYPES = frozenset({"application/x-protobuf", "application/protobuf"})


def _scope_version() -> str:
    try:
        return version("dispatch-celery")
    except PackageNotFoundError:
        return "0"


def _foreign(settings: Settings, *names: str) -> tuple[str, str] | None:
    """The first of these (non-DISPATCH) variables that is set: (name, value)."""
    for name in names:
        value = settings.env.get(name, "").strip()
        if value:
            return name, value
    return None


def option_or_foreign(
    settings: Settings, service: str, name: str, *foreign: str
) -> tuple[str, str] | None:
    """(variable, value): our option ``name``, else the first of the ``foreign`` (non-DISPATCH)
    variables that is set; None when none is."""
    value = settings.option(service, name)
    if value is not None:
        return settings.option_name(service, name), value
    return _foreign(settings, *foreign)


def _option_or_otel(settings: Settings, service: str, name: str) -> tuple[str, str] | None:
    """Our option ``name``, else ``OTEL_EXPORTER_OTLP_TRACES_<name>``, else
    ``OTEL_EXPORTER_OTLP_<name>``."""
    return option_or_foreign(
        settings, service, name, f"OTEL_EXPORTER_OTLP_TRACES_{name}", f"OTEL_EXPORTER_OTLP_{name}"
    )


def check_url(var: str, url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in {"http", "https"} or not parsed.hostname:
        raise ConfigError(f"{var} must be an http(s) URL, got {redact_url(url)!r}")
    return url


def _with_traces_path(url: str) -> str:
    return url.rstrip("/") + TRACES_PATH


def resolve_endpoint(service: str, settings: Settings) -> tuple[str, str]:
    """(URL, the variable it came from) of the traces endpoint."""
    ours = settings.option(service, "ENDPOINT")
    if ours is not None:
        var = settings.option_name(service, "ENDPOINT")
        check_url(var, ours)
        path = urlparse(ours).path
        return (ours if path not in {"", "/"} else _with_traces_path(ours)), var
    found = _foreign(settings, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if found is not None:
        return check_url(*found), found[0]
    found = _foreign(settings, "OTEL_EXPORTER_OTLP_ENDPOINT")
    if found is not None:  # the spec: a base URL, the signal's path appended
        return _with_traces_path(check_url(*found)), found[0]
    var = settings.option_name(service, "ENDPOINT")
    raise ConfigError(
        f"{var} is required for the {service} backend (the OTLP/HTTP traces URL, e.g. "
        "http://localhost:4318/v1/traces; OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
        "OTEL_EXPORTER_OTLP_ENDPOINT are used when it is unset)"
    )


def _protocol(service: str, settings: Settings) -> str:
    found = _option_or_otel(settings, service, "PROTOCOL")
    if found is None:
        return wire.PROTOBUF
    var, value = found
    value = value.lower()
    if value not in wire.PROTOCOLS:
        raise ConfigError(
            f"{var} must be http/protobuf or http/json (dispatch-celery speaks OTLP over "
            f"HTTP only), got {value!r}"
        )
    return value


def _compression(service: str, settings: Settings) -> bool:
    found = _option_or_otel(settings, service, "COMPRESSION")
    if found is None:
        return False
    var, value = found
    if value.lower() not in COMPRESSIONS:
        raise ConfigError(f"{var} must be none or gzip, got {value!r}")
    return value.lower() == "gzip"


def _resource_attributes(service: str, settings: Settings) -> dict[str, str]:
    raw = settings.option(service, "RESOURCE_ATTRIBUTES")
    if raw is None:
        return {}
    var = settings.option_name(service, "RESOURCE_ATTRIBUTES")
    attributes: dict[str, str] = {}
    for number, item in enumerate(raw.split(","), 1):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{var}: entry {number} is not key=value")
        attributes[key.strip()] = unquote(value.strip())
    return attributes


def otlp_auth(service: str, settings: Settings) -> Auth:
    """The toolkit's API_KEY / USERNAME+PASSWORD / HEADERS, else the OTEL headers variables."""
    auth = Auth.from_settings(service, settings)
    if settings.option(service, "HEADERS") is not None:
        return auth
    found = _foreign(settings, "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
    if found is None:
        return auth
    var, raw = found
    headers = parse_headers(raw, var)
    fix = f"check {var} (or set {settings.option_name(service, 'HEADERS')}, which takes precedence)"
    if auth.headers:  # ours win over the standard variable's
        taken = {name.lower() for name in auth.headers}
        headers = {k: v for k, v in headers.items() if k.lower() not in taken}
        return auth + Auth(headers, tuple(headers.values()), fix) if headers else auth
    return Auth(headers, tuple(headers.values()), fix)


def read_partial(body: bytes, content_type: str = "") -> wire.PartialSuccess | None:
    """The ``partial_success`` of a 2xx answer (None: everything accepted), read in the
    encoding its media type names (``Reply.content_type``: the spec makes the receiver
    answer in the request's encoding, but Langfuse answers ``{}`` as JSON to protobuf).

    The body decides only when the header is missing or names neither encoding: a JSON
    document is JSON, anything else protobuf. Sniffing by the first byte is not enough: a
    protobuf ``partial_success`` of 123 bytes starts with ``\\n{``, like JSON.
    """
    if content_type == "application/json" or content_type.endswith("+json"):
        return wire.read_response(body, "application/json")
    if content_type not in PROTOBUF_TYPES:
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
        else:
            return wire.read_response(body, "application/json")
    response = ExportTraceServiceResponse()
    try:
        response.ParseFromString(body)
    except DecodeError:  # declared protobuf, yet not: JSON after all, or nothing readable
        return wire.read_response(body, "application/json")
    if not response.HasField("partial_success") or response.partial_success.rejected_spans <= 0:
        return None  # an error_message alone is a warning, not a rejection
    partial = response.partial_success
    return wire.PartialSuccess(int(partial.rejected_spans), partial.error_message)


@dataclasses.dataclass(frozen=True)
class OtlpConfig:
    protocol: str = wire.PROTOBUF
    gzip: bool = False
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    resource: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: {"service.name": DEFAULT_SERVICE_NAME}
    )

    @classmethod
    def from_settings(cls, service: str, settings: Settings) -> OtlpConfig:
        resource: dict[str, Any] = {
            "service.name": settings.option(service, "SERVICE_NAME", DEFAULT_SERVICE_NAME)
        }
        resource.update(_resource_attributes(service, settings))
        return cls(
            protocol=_protocol(service, settings),
            gzip=_compression(service, settings),
            max_request_bytes=settings.positive_int(
                service, "MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES,
                maximum=MAX_REQUEST_BYTES_LIMIT,
            ),
            resource=resource,
        )  # fmt: skip


class OtlpBackend(HttpBackend):
    """Runs as OTLP spans, many per request; per-run outcomes from ``partial_success``."""

    name: ClassVar[str] = "otlp"
    default_concurrency: ClassVar[int] = 1
    accept: ClassVar[str] = "application/x-protobuf, application/json"
    # A partial success that does not name its rejected spans: re-send the request's runs in
    # halves to find them (True), or dead-letter them all. Re-sending breaks the OTLP rule
    # against retrying a partial success: only for receivers that keep one span per span id
    # (see the module docstring).
    split_partial_success: ClassVar[bool] = True

    def __init__(
        self,
        options: HttpOptions,
        auth: Auth | None = None,
        *,
        config: OtlpConfig | None = None,
        concurrency: int | None = None,
    ) -> None:
        super().__init__(options, auth, concurrency=concurrency)
        self.config = config or OtlpConfig()
        self.envelope = wire.Envelope(self.config.resource, SCOPE_NAME, _scope_version())
        # What every request costs beside its spans (resource, scope, framing).
        self._overhead = len(wire.encode(self.envelope.request([]), self.config.protocol)) + 16

    @classmethod
    def from_settings(cls, service: str, settings: Settings) -> Self:
        endpoint, endpoint_var = resolve_endpoint(service, settings)
        options = dataclasses.replace(
            HttpOptions.from_settings(service, settings, endpoint),
            endpoint=endpoint,
            endpoint_var=endpoint_var,
        )
        return cls(
            options,
            otlp_auth(service, settings),
            config=OtlpConfig.from_settings(service, settings),
            concurrency=settings.positive_int(
                service, "CONCURRENCY", cls.default_concurrency, maximum=cls.max_concurrency
            ),
        )

    # -- what a vendor preset adds -----------------------------------------------------------

    def extra_attributes(self, record: RunRecord, parsed: Parsed) -> dict[str, AttributeValue]:
        """Attributes a preset adds to every span (Langfuse's own); none here."""
        return {}

    def request_headers(self) -> dict[str, str]:
        """Static headers of every request beside content type, encoding and auth."""
        return {}

    # -- the HTTP toolkit's hooks ------------------------------------------------------------

    def encode(self, runs: Sequence[Run]) -> Iterable[Request | Rejected]:
        protocol = self.config.protocol
        spans: list[Any] = []
        ids: list[str] = []
        sizes: list[int] = []
        for run in runs:
            try:
                data, parsed = build_span(run.record)
                data.attributes.update(self.extra_attributes(run.record, parsed))
                message = wire.to_proto(data)
                span: Any = message
                if protocol == wire.PROTOBUF:  # serialized once, framed by request_bytes
                    span = message.SerializeToString()
                    size = len(span) + wire.SPAN_FRAMING
                else:
                    size = wire.span_size(message, protocol)
            except (TypeError, ValueError, KeyError, OverflowError) as exc:
                yield Rejected(run.id, f"{self.options.service}: cannot build the span: {exc}")
                continue
            spans.append(span)
            ids.append(run.id)
            sizes.append(size)
        headers = self.request_headers()
        if self.config.gzip:
            headers["Content-Encoding"] = "gzip"
        content_type = wire.CONTENT_TYPES[protocol]
        for chunk in wire.pack(sizes, self._overhead, self.config.max_request_bytes):
            if protocol == wire.PROTOBUF:
                body = self.envelope.request_bytes([spans[i] for i in chunk])
            else:
                body = wire.encode(self.envelope.request([spans[i] for i in chunk]), protocol)
            if self.config.gzip:
                body = wire.compress(body)
            yield Request(tuple(ids[i] for i in chunk), body, content_type, headers)

    def read(self, request: Request, reply: Reply) -> Mapping[str, Outcome]:
        partial = read_partial(reply.body, reply.content_type)
        if partial is None:
            return dict.fromkeys(request.runs, DELIVERED)
        return self.partial_outcomes(request.runs, partial)

    def partial_outcomes(
        self, runs: Sequence[str], partial: wire.PartialSuccess
    ) -> dict[str, Outcome]:
        service, total = self.options.service, len(runs)
        message = partial.message.strip() or "no message"
        text = message.lower()
        named = [
            run_id for run_id in runs if span_id_for(run_id).hex() in text or run_id.lower() in text
        ]
        if named and len(named) >= min(partial.rejected, total):
            reason = Outcome.rejected(f"{service}: the receiver rejected the span: {message}")
            return {r: reason if r in named else DELIVERED for r in runs}
        if partial.rejected >= total:
            why = f"{service}: the receiver rejected the span ({partial.rejected} of {total}): "
            return dict.fromkeys(runs, Outcome.rejected(why + message))
        unnamed = f"{service}: the receiver rejected {partial.rejected} of the {total} spans of "
        if not self.split_partial_success:
            # Dead-letter them all rather than lose the refused ones.
            return dict.fromkeys(runs, Outcome.rejected(
                f"{unnamed}one request without naming them: {message} (all {total} "
                "dead-lettered; a replay is idempotent, span ids derive from run ids)"
            ))  # fmt: skip
        # Some or all of the rejected spans are not named: re-send the runs not named in
        # halves until each rejected one stands alone (a deliberate exception to the OTLP
        # rule against retrying a partial success: see the module docstring).
        named_reason = Outcome.rejected(f"{service}: the receiver rejected the span: {message}")
        split = Outcome.split(f"{unnamed}one request without naming this one: {message}")
        return {r: named_reason if r in named else split for r in runs}
