"""A local OTLP/HTTP traces receiver that enforces the protocol, decoding with
``opentelemetry-proto``; also the Langfuse flavour of it (Basic auth, its answers).

It is strict where real receivers are (measured, ``shared/spec/otlp.md``): Phoenix accepts
exactly ``application/x-protobuf`` (415 for JSON or a ``charset`` suffix) and ``gzip`` /
``deflate`` encodings; Langfuse accepts protobuf and JSON (substring match), gzip only,
answers 400 for a bad type or body and ``{}`` (JSON) on success. Spans are stored by span
id, first write wins (Phoenix: ``ON CONFLICT (span_id) DO NOTHING``), and every POST of a
span is counted so tests can assert "exactly once".
"""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.vendor_servers import FakeVendor, _Handler

PROTOBUF = "application/x-protobuf"
JSON = "application/json"


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value_of(kv.value) for kv in value.kvlist_value.values}
    if kind is None:
        return None
    return getattr(value, kind)


def attributes(items: Any) -> dict[str, Any]:
    return {kv.key: value_of(kv.value) for kv in items}


@dataclass
class StoredSpan:
    span: Span
    resource: dict[str, Any]
    scope: str

    @property
    def attributes(self) -> dict[str, Any]:
        return attributes(self.span.attributes)

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()


def _ids_to_base64(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: (
                base64.b64encode(bytes.fromhex(v)).decode()
                if k in {"traceId", "spanId", "parentSpanId"} and isinstance(v, str)
                else _ids_to_base64(v)
            )
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_ids_to_base64(item) for item in node]
    return node


class _OtlpHandler(_Handler):
    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != self.vendor.path:
            self.vendor.violation(f"POST to {self.path}, expected {self.vendor.path}")
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            self._answer(404, {}, b"not found")
            return
        super().do_POST()

    def _answer(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        try:
            self.send_response(status)
            content_type = headers.get("Content-Type", JSON)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                if name != "Content-Type":
                    self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            self.close_connection = True


class FakeOtlp(FakeVendor):
    """``POST /v1/traces``. ``accept_json``: OTLP/JSON allowed (Phoenix: no).
    ``auth``: the exact Authorization header required, or None."""

    path = "/v1/traces"
    handler_class = _OtlpHandler

    def __init__(
        self,
        auth: str | None = None,
        *,
        accept_json: bool = True,
        langfuse: bool = False,
        path: str = "/v1/traces",
        delay: float = 0.0,
    ) -> None:
        super().__init__(api_key="", delay=delay)
        self.path = path
        self.auth = auth
        self.accept_json = accept_json
        self.langfuse = langfuse  # answers {} as JSON, 400 for a bad type, gzip only
        self.spans: dict[str, StoredSpan] = {}
        self.posts: dict[str, int] = {}  # span id -> requests that carried it
        self.requests: list[tuple[dict[str, str], int]] = []  # headers, spans per request
        self.reject: dict[str, str] = {}  # span id -> why (partial success)
        self.name_rejected = True  # say which spans in error_message
        self.refuse: set[str] = set()  # a request holding one of these span ids -> 400

    def check_auth(self, headers: Mapping[str, str]) -> bool:
        return self.auth is None or headers.get("authorization") == self.auth

    def _bad(self, status: int, why: str) -> tuple[int, dict[str, str], bytes]:
        self.violation(why)
        return status, {"Content-Type": "text/plain"}, why.encode()

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        if not self.check_auth(headers):
            return 401, {}, b'{"message":"Invalid credentials"}'
        content_type = headers.get("content-type", "")
        bad_type = 400 if self.langfuse else 415
        if self.langfuse:
            is_json = JSON in content_type.lower()
            ok = is_json or PROTOBUF in content_type.lower()
        else:
            is_json = content_type == JSON
            ok = content_type == PROTOBUF or (self.accept_json and is_json)
        if not ok:
            return self._bad(bad_type, f"unsupported Content-Type {content_type!r}")
        encoding = headers.get("content-encoding", "")
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate" and not self.langfuse:
                body = zlib.decompress(body)
            elif encoding:
                return self._bad(bad_type, f"unsupported Content-Encoding {encoding!r}")
        except (OSError, zlib.error, EOFError):
            return self._bad(400, "body does not decompress")
        request = ExportTraceServiceRequest()
        try:
            if is_json:
                json_format.ParseDict(_ids_to_base64(json.loads(body)), request)
            else:
                request.ParseFromString(body)
        except (DecodeError, ValueError, json_format.ParseError):
            return self._bad(400 if self.langfuse else 422, "invalid ExportTraceServiceRequest")
        carried = {
            span.span_id.hex()
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        }
        if carried & self.refuse:
            return 400, {"Content-Type": "text/plain"}, b"span attribute value invalid"
        rejected: list[str] = []
        count = 0
        with self.lock:
            for resource_spans in request.resource_spans:
                resource = attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        count += 1
                        span_id = span.span_id.hex()
                        if len(span.span_id) != 8 or len(span.trace_id) != 16:
                            self.violation("span or trace id of the wrong length")
                        self.posts[span_id] = self.posts.get(span_id, 0) + 1
                        if span_id in self.reject:
                            rejected.append(span_id)
                            continue
                        self.spans.setdefault(
                            span_id, StoredSpan(span, resource, scope_spans.scope.name)
                        )
            self.requests.append((headers, count))
        return self._success(rejected, is_json)

    def _success(self, rejected: list[str], is_json: bool) -> tuple[int, dict[str, str], bytes]:
        if self.langfuse and not rejected:
            return 200, {"Content-Type": JSON}, b"{}"
        response = ExportTraceServiceResponse()
        if rejected:
            response.partial_success.rejected_spans = len(rejected)
            reasons = "; ".join(f"span {s}: {self.reject[s]}" for s in rejected)
            response.partial_success.error_message = (
                reasons if self.name_rejected else "some spans were invalid"
            )
        if is_json:
            doc = json_format.MessageToDict(response)
            return 200, {"Content-Type": JSON}, json.dumps(doc).encode()
        return 200, {"Content-Type": PROTOBUF}, response.SerializeToString()

    def by_run(self, span_id_for: Any, run_id: str) -> StoredSpan:
        return self.spans[span_id_for(run_id).hex()]


def kv(key: str, value: Any) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))
