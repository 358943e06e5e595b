"""OTLP/HTTP trace export, the wire part: spans -> ``ExportTraceServiceRequest`` bodies
(protobuf or OTLP/JSON, built with ``opentelemetry-proto``), split by a byte cap, and the
receiver's ``ExportTraceServiceResponse`` read back (``partial_success``).

No OpenTelemetry SDK here: its BatchSpanProcessor drops spans when its queue overflows and
hides per-request outcomes, and the delivery contract needs both (nothing lost, per-run
outcomes).
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    InstrumentationScope,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from dispatch_celery.backends.genai import SpanData

PROTOBUF = "http/protobuf"
JSON = "http/json"
PROTOCOLS = (PROTOBUF, JSON)
CONTENT_TYPES = {PROTOBUF: "application/x-protobuf", JSON: "application/json"}
# Room for the request's envelope (resource, scope) and each span's field header.
SPAN_FRAMING = 6


# Messages are filled in place (``attributes.add()``, field assignment) rather than built
# from keyword arguments: half the CPU with the upb runtime (20 attributes: 11 us against
# 25 us), and a span has a score of them.


def set_any_value(target: AnyValue, value: Any) -> None:
    """Store a Python value in ``target`` (bool before int: a bool is an int in Python)."""
    if isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, list | tuple):
        array = target.array_value
        array.SetInParent()  # an empty list is still an array value
        for item in value:
            set_any_value(array.values.add(), item)
    elif isinstance(value, bytes):
        target.bytes_value = value
    else:
        target.string_value = str(value)


def add_key_values(target: Any, attributes: Mapping[str, Any]) -> None:
    """Append ``attributes`` (None values left out) to a repeated ``KeyValue`` field."""
    for key, value in attributes.items():
        if value is not None:
            kv = target.add()
            kv.key = key
            set_any_value(kv.value, value)


def to_proto(span: SpanData) -> Span:
    out = Span(
        trace_id=span.trace_id,
        span_id=span.span_id,
        name=span.name,
        kind=Span.SPAN_KIND_CLIENT,
        start_time_unix_nano=span.start_ns,
        end_time_unix_nano=max(span.end_ns, span.start_ns),
    )
    add_key_values(out.attributes, span.attributes)
    if span.error is not None:
        out.status.code = Status.STATUS_CODE_ERROR
        out.status.message = span.error
    else:
        out.status.code = Status.STATUS_CODE_OK
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(message: Any, name: str, payload: bytes) -> bytes:
    """One length-delimited field of ``message`` (its number from the reference protos)."""
    number = message.DESCRIPTOR.fields_by_name[name].number
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


# The tag of ScopeSpans.spans, before each serialized span.
_SPAN_TAG = _varint(ScopeSpans.DESCRIPTOR.fields_by_name["spans"].number << 3 | 2)


@dataclass(frozen=True)
class Envelope:
    """What every request of a backend shares: resource and instrumentation scope."""

    resource: Mapping[str, Any]
    scope_name: str
    scope_version: str

    def _resource(self) -> Resource:
        resource = Resource()
        add_key_values(resource.attributes, self.resource)
        return resource

    def _scope(self) -> InstrumentationScope:
        return InstrumentationScope(name=self.scope_name, version=self.scope_version)

    def request(self, spans: Sequence[Span]) -> ExportTraceServiceRequest:
        request = ExportTraceServiceRequest()
        resource_spans = request.resource_spans.add()
        resource_spans.resource.CopyFrom(self._resource())
        scope_spans = resource_spans.scope_spans.add()
        scope_spans.scope.CopyFrom(self._scope())
        scope_spans.spans.extend(spans)
        return request

    @functools.cached_property
    def _framing(self) -> tuple[bytes, bytes]:
        """The serialized resource and scope fields, the same for every request."""
        resource = _field(ResourceSpans, "resource", self._resource().SerializeToString())
        scope = _field(ScopeSpans, "scope", self._scope().SerializeToString())
        return resource, scope

    def request_bytes(self, spans: Sequence[bytes]) -> bytes:
        """The protobuf body of ``request`` from spans serialized once each
        (``SerializeToString``), without building and copying the messages again: a
        message's encoding is its fields' encodings one after another, so the request is
        the envelope's fields around the spans' bytes (field numbers from the reference
        protos; tests parse the result with them). The same bytes ``request`` serializes to.
        """
        resource, scope = self._framing
        inner = scope + b"".join(_SPAN_TAG + _varint(len(span)) + span for span in spans)
        outer = resource + _field(ResourceSpans, "scope_spans", inner)
        return _field(ExportTraceServiceRequest, "resource_spans", outer)


def _hex_ids(node: Any) -> Any:
    """OTLP/JSON differs from the proto3 JSON mapping in one point: ids are hex, not base64."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in {"traceId", "spanId", "parentSpanId"} and isinstance(value, str):
                out[key] = _b64_to_hex(value)
            else:
                out[key] = _hex_ids(value)
        return out
    if isinstance(node, list):
        return [_hex_ids(item) for item in node]
    return node


def _b64_to_hex(value: str) -> str:
    import base64

    return base64.b64decode(value).hex()


def encode(request: ExportTraceServiceRequest, protocol: str) -> bytes:
    if protocol == JSON:
        as_dict = json_format.MessageToDict(request, use_integers_for_enums=True)
        return orjson.dumps(_hex_ids(as_dict))
    return request.SerializeToString()


def span_size(span: Span, protocol: str) -> int:
    """The span's share of an encoded request, close enough for a byte cap."""
    if protocol == JSON:
        return len(orjson.dumps(json_format.MessageToDict(span))) + 1  # the comma
    return span.ByteSize() + SPAN_FRAMING


def pack(sizes: Sequence[int], overhead: int, limit: int) -> list[list[int]]:
    """Greedy split of span indices into requests of at most ``limit`` bytes; a span that
    is larger than the limit on its own travels alone."""
    chunks: list[list[int]] = []
    current: list[int] = []
    size = overhead
    for index, extra in enumerate(sizes):
        if current and size + extra > limit:
            chunks.append(current)
            current, size = [], overhead
        current.append(index)
        size += extra
    if current:
        chunks.append(current)
    return chunks


def compress(body: bytes) -> bytes:
    return gzip.compress(body, compresslevel=6, mtime=0)


@dataclass(frozen=True)
class PartialSuccess:
    rejected: int
    message: str


def read_response(body: bytes, content_type: str | None) -> PartialSuccess | None:
    """The ``partial_success`` of a 2xx answer, or None when everything was accepted.

    The answer is read in the encoding its ``Content-Type`` names (Langfuse answers ``{}`` as
    JSON to a protobuf request); an answer that cannot be read is taken as full success:
    the status said so, and the OTLP spec makes ``partial_success`` the only way to say
    otherwise.
    """
    if not body.strip():
        return None
    kind = (content_type or "").lower()
    if "json" in kind or body.lstrip()[:1] == b"{":
        return _from_json(body)
    response = ExportTraceServiceResponse()
    try:
        response.ParseFromString(body)
    except DecodeError:
        return _from_json(body)
    if not response.HasField("partial_success"):
        return None
    partial = response.partial_success
    if partial.rejected_spans <= 0:
        return None  # an error_message alone is a warning, not a rejection
    return PartialSuccess(int(partial.rejected_spans), partial.error_message)


def _from_json(body: bytes) -> PartialSuccess | None:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    partial = doc.get("partialSuccess", doc.get("partial_success"))
    if not isinstance(partial, dict):
        return None
    raw: Any = partial.get("rejectedSpans", partial.get("rejected_spans", 0))
    try:
        rejected = int(raw)
    except (TypeError, ValueError):
        return None
    if rejected <= 0:
        return None
    message = partial.get("errorMessage", partial.get("error_message", ""))
    return PartialSuccess(rejected, str(message or ""))
