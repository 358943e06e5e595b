"""The ``otlp`` backend against a local OTLP/HTTP receiver that decodes every request with
``opentelemetry-proto`` (tests/peers/otlp_receiver.py); end to end through a real bridge
and worker; the real Arize Phoenix is in test_phoenix.py."""

from __future__ import annotations

import base64
import gzip
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from dispatch_celery import constants as c
from dispatch_celery.backend import Run
from dispatch_celery.backends.genai import span_id_for, trace_id_for, unix_ns
from dispatch_celery.backends.otlp import OtlpBackend, read_partial
from dispatch_celery.backends.otlp_wire import PartialSuccess
from dispatch_celery.decode.events import decode_entry
from dispatch_celery.decode.redact import Redactor
from dispatch_celery.errors import ConfigError, CredentialsError, TransientDeliveryError
from dispatch_celery.registry import create_backend
from dispatch_celery.settings import load_settings
from tests.harness import bridge, event, make, wait_for, worker, xadd_all, xrange
from tests.peers.otlp_receiver import FakeOtlp, StoredSpan
from tests.vendor_servers import (
    Fault,
    RecordingContext,
    backend_factory,
    chat_run,
    chat_runs,
    entry_data,
    run_from_data,
    vector_run,
)

Factory = Callable[..., OtlpBackend]
STREAM = "llm-proxy-events"
SECRET = "sk-proj-abcdefghijklmnop1234"  # noqa: S105 (a test credential)


@pytest.fixture
def server() -> Iterator[FakeOtlp]:
    with FakeOtlp() as fake:
        yield fake


@pytest.fixture
def make_backend(server: FakeOtlp) -> Iterator[Factory]:
    with backend_factory(OtlpBackend, "otlp", server, api_key=False) as make:
        yield make


def _ctx() -> Any:
    return RecordingContext("otlp").ctx


def stored(server: FakeOtlp, run: Run) -> StoredSpan:
    return server.spans[span_id_for(run.id).hex()]


def failed_run(request_id: str, status: int, message: str, index: int = 0) -> Run:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}
    data = entry_data(
        request_id, status=status, request=body,
        response={"error": {"message": message, "type": "requests"}},
    )  # fmt: skip
    return run_from_data(data, f"{1736937000123 + index}-0")


def test_a_chat_run_is_one_span_in_both_conventions(
    server: FakeOtlp, make_backend: Factory
) -> None:
    run = chat_run(str(uuid.uuid4()), temperature=0.2, max_tokens=50, user="alice")
    rec = RecordingContext("otlp")
    report = make_backend().deliver([run], rec.ctx)

    assert report.rejected == {} and report.deferred == {}
    assert server.violations == []
    (headers, count), = server.requests  # fmt: skip
    assert count == 1
    assert headers["content-type"] == "application/x-protobuf"  # exactly: Phoenix's rule
    assert rec.acquired == 1
    span = stored(server, run)
    assert span.trace_id == uuid.UUID(run.id).hex  # the trace is found by request id
    assert span.span.name == "chat gpt-4o-mini"
    assert span.span.kind == span.span.SPAN_KIND_CLIENT
    assert span.span.start_time_unix_nano == unix_ns(run.record["started_at"])
    assert span.span.end_time_unix_nano == unix_ns(run.record["ended_at"])
    assert span.span.end_time_unix_nano - span.span.start_time_unix_nano == 1234 * 10**6
    assert span.span.status.code == span.span.status.STATUS_CODE_OK
    assert span.resource == {"service.name": "llm-proxy"}
    assert span.scope == "dispatch-celery"
    a = span.attributes
    # OpenTelemetry GenAI semantic conventions
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == a["gen_ai.system"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o-mini"
    assert a["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    assert a["gen_ai.response.id"] == "chatcmpl-0"
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (9, 3)
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["gen_ai.request.temperature"] == 0.2
    assert a["gen_ai.request.max_tokens"] == 50
    assert a["user.id"] == "alice"
    # messages: JSON strings in the semconv "parts" shape, finish_reason on each output
    assert json.loads(a["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "Hello"}]}
    ]
    assert json.loads(a["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "Hi there!"}],
         "finish_reason": "stop"}
    ]  # fmt: skip
    # OpenInference
    assert a["openinference.span.kind"] == "LLM"
    assert a["llm.model_name"] == "gpt-4o-mini-2024-07-18"
    assert (a["llm.token_count.prompt"], a["llm.token_count.completion"]) == (9, 3)
    assert a["llm.token_count.total"] == 12
    assert a["llm.input_messages.0.message.role"] == "user"
    assert a["llm.input_messages.0.message.content"] == "Hello"
    assert a["llm.output_messages.0.message.role"] == "assistant"
    assert a["llm.output_messages.0.message.content"] == "Hi there!"
    assert json.loads(a["llm.invocation_parameters"]) == {"temperature": 0.2, "max_tokens": 50}
    assert json.loads(a["input.value"]) == run.record["input"]
    assert json.loads(a["output.value"]) == run.record["output"]
    assert a["input.mime_type"] == a["output.mime_type"] == "application/json"
    assert json.loads(a["metadata"])["stream_id"] == run.record["stream_id"]


def test_ids_are_derived_from_the_run_so_a_retry_is_the_same_span(
    server: FakeOtlp, make_backend: Factory
) -> None:
    runs = chat_runs(3)
    backend = make_backend()
    backend.deliver(runs, _ctx())
    backend.deliver(runs, _ctx())  # a replay
    assert len(server.spans) == 3
    assert set(server.posts.values()) == {2}
    other = "not-a-uuid-run-id"
    assert span_id_for(other) == span_id_for(other) and len(trace_id_for(other)) == 16


def test_a_failed_call_is_an_error_span(server: FakeOtlp, make_backend: Factory) -> None:
    run = failed_run(str(uuid.uuid4()), 429, "Rate limit reached for gpt-4o-mini")
    make_backend().deliver([run], _ctx())
    span = stored(server, run)
    assert span.span.status.code == span.span.status.STATUS_CODE_ERROR
    assert span.span.status.message == "HTTP 429: Rate limit reached for gpt-4o-mini"
    assert span.attributes["error.type"] == "429"
    assert "gen_ai.output.messages" not in span.attributes
    assert "Rate limit reached" in span.attributes["output.value"]


def test_metadata_only_sends_no_content(server: FakeOtlp, make_backend: Factory) -> None:
    run = chat_run(str(uuid.uuid4()), temperature=0.7)
    redacted = Run(Redactor(metadata_only=True).redact_record(run.record), run.event)
    make_backend().deliver([redacted], _ctx())
    a = stored(server, run).attributes
    raw = server.received[-1].body
    assert b"Hello" not in raw and b"Hi there" not in raw
    assert not any(k.startswith(("llm.input_messages", "llm.output_messages")) for k in a)
    for key in ("gen_ai.input.messages", "gen_ai.output.messages", "input.value",
                "output.value", "llm.invocation_parameters"):  # fmt: skip
        assert key not in a
    assert a["llm.model_name"] == "gpt-4o-mini-2024-07-18"  # metadata stays
    assert a["gen_ai.usage.input_tokens"] == 9


def test_stream_vectors(
    server: FakeOtlp, make_backend: Factory, vectors: dict[str, dict[str, Any]]
) -> None:
    names = [
        "chat_completion_json_200", "chat_completion_sse_stream_200",
        "audio_speech_binary_non_json_200", "proxy_401_token_not_found",
        "embeddings_post_generic_json_200",
    ]  # fmt: skip
    runs = [vector_run(vectors[name], i) for i, name in enumerate(names)]
    report = make_backend().deliver(runs, _ctx())
    assert report.rejected == {} and report.deferred == {}
    assert server.violations == [] and len(server.requests) == 1
    chat, sse, audio, _, embeddings = (stored(server, run).attributes for run in runs)

    assert chat["llm.output_messages.0.message.content"] == "Hi there!"
    assert sse["gen_ai.request.stream"] is True
    assert sse["gen_ai.response.finish_reasons"] == ["stop"]
    assert json.loads(sse["gen_ai.output.messages"])[0]["parts"][0]["content"] == "Hi there!"
    assert sse["llm.token_count.total"] == 12

    assert audio["gen_ai.operation.name"] == "generate_content"
    assert audio["gen_ai.request.model"] == "tts-1"
    assert json.loads(audio["output.value"])["_binary"] is True
    assert json.loads(audio["llm.invocation_parameters"]) == {"voice": "alloy"}

    denied_span = stored(server, runs[3]).span
    assert denied_span.status.code == denied_span.status.STATUS_CODE_ERROR
    assert denied_span.status.message == "HTTP 401: Token not found"

    assert embeddings["openinference.span.kind"] == "EMBEDDING"
    assert embeddings["gen_ai.operation.name"] == "embeddings"
    assert embeddings["embedding.model_name"] == "text-embedding-3-small"
    assert json.loads(embeddings["output.value"])["data"][0]["dimensions"] == 2
    assert "embedding" not in json.loads(embeddings["output.value"])["data"][0]


def test_tool_calls_and_the_responses_api_keep_the_parts_shape(
    server: FakeOtlp, make_backend: Factory
) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
    request = {"model": "gpt-4o", "messages": [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                                     {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]}  # fmt: skip
    response = {"id": "c1", "model": "gpt-4o", "choices": [
        {"index": 0, "finish_reason": "tool_calls",
         "message": {"role": "assistant", "content": None, "tool_calls": [call]}}]}  # fmt: skip
    chat = run_from_data(entry_data(str(uuid.uuid4()), request=request, response=response),
                         "1736937000123-0")  # fmt: skip
    responses = run_from_data(
        entry_data(
            str(uuid.uuid4()), path="/v1/responses",
            request={"model": "gpt-4.1", "input": "Hi", "instructions": "Be brief"},
            response={"id": "resp_1", "model": "gpt-4.1", "status": "completed", "output": [
                {"type": "message", "role": "assistant",
                 "content": [{"type": "output_text", "text": "Hello!"}]}],
                "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}},
        ),
        "1736937000124-0",
    )  # fmt: skip
    make_backend().deliver([chat, responses], _ctx())
    a = stored(server, chat).attributes
    inputs = json.loads(a["gen_ai.input.messages"])
    assert [m["role"] for m in inputs] == ["system", "user", "assistant", "tool"]
    assert inputs[1]["parts"][1] == {"type": "uri", "modality": "image", "uri": "https://x/y.png"}
    assert inputs[2]["parts"] == [
        {"type": "tool_call", "name": "weather", "id": "call_1", "arguments": {"city": "Paris"}}
    ]
    assert inputs[3]["parts"] == [
        {"type": "tool_call_response", "response": "sunny", "id": "call_1"}
    ]
    (out,) = json.loads(a["gen_ai.output.messages"])
    assert out["finish_reason"] == "tool_calls"
    assert a["llm.output_messages.0.message.tool_calls.0.tool_call.function.name"] == "weather"
    assert a["llm.input_messages.3.message.tool_call_id"] == "call_1"

    r = stored(server, responses).attributes
    assert json.loads(r["gen_ai.system_instructions"]) == [{"type": "text", "content": "Be brief"}]
    assert r["llm.input_messages.0.message.role"] == "system"
    assert r["llm.input_messages.1.message.content"] == "Hi"
    assert json.loads(r["gen_ai.output.messages"])[0]["finish_reason"] == "stop"
    assert r["llm.output_messages.0.message.content"] == "Hello!"
    assert (r["gen_ai.usage.input_tokens"], r["gen_ai.usage.output_tokens"]) == (5, 2)


def test_http_json_and_gzip(server: FakeOtlp, make_backend: Factory) -> None:
    runs = chat_runs(2)
    report = make_backend(protocol="http/json", compression="gzip").deliver(runs, _ctx())
    assert report.rejected == {} and report.deferred == {} and server.violations == []
    received = server.received[-1]
    assert received.headers["content-type"] == "application/json"
    assert received.headers["content-encoding"] == "gzip"
    doc = json.loads(gzip.decompress(received.body))
    span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert span["spanId"] == span_id_for(runs[0].id).hex()  # OTLP/JSON ids are hex
    assert span["traceId"] == uuid.UUID(runs[0].id).hex
    assert {stored(server, run).span.name for run in runs} == {"chat gpt-4o-mini"}


def test_requests_are_capped_in_bytes_and_a_run_is_never_split(
    server: FakeOtlp, make_backend: Factory
) -> None:
    limit = 16 * 1024
    runs = chat_runs(30, pad=1000)
    big = chat_run(str(uuid.uuid4()), 99, pad=3 * limit)
    report = make_backend(max_request_bytes=str(limit)).deliver([*runs, big], _ctx())
    assert report.rejected == {} and report.deferred == {}
    assert len(server.requests) > 3
    assert sum(n for _, n in server.requests) == 31 == len(server.spans)
    for received, (_, count) in zip(server.received, server.requests, strict=True):
        assert len(received.body) <= limit or count == 1


def test_partial_success_rejects_the_named_runs_alone(
    server: FakeOtlp, make_backend: Factory
) -> None:
    runs = chat_runs(5)
    server.reject[span_id_for(runs[1].id).hex()] = "attribute value too long"
    report = make_backend().deliver(runs, _ctx())
    assert list(report.rejected) == [runs[1].id]
    assert "attribute value too long" in report.rejected[runs[1].id]
    assert report.deferred == {}
    assert len(server.spans) == 4


@pytest.mark.parametrize(
    ("protocol", "bad"), [("http/protobuf", (5,)), ("http/json", (5,)), ("http/protobuf", (1, 6))]
)
def test_a_partial_success_naming_no_span_isolates_the_bad_runs(
    server: FakeOtlp, make_backend: Factory, protocol: str, bad: tuple[int, ...]
) -> None:
    """ "k spans rejected" without naming them: the runs are re-sent in halves until each
    bad one stands alone; the receiver keeps one span per span id, so the re-sent good
    spans are stored once."""
    runs = chat_runs(8)
    bad_ids = {runs[i].id for i in bad}
    for run_id in bad_ids:
        server.reject[span_id_for(run_id).hex()] = "bad"
    server.name_rejected = False
    report = make_backend(protocol=protocol).deliver(runs, _ctx())
    assert set(report.rejected) == bad_ids
    for run_id in bad_ids:
        assert "some spans were invalid" in report.rejected[run_id]
        assert "rejected the span (1 of 1)" in report.rejected[run_id]
    assert report.deferred == {}
    assert set(server.spans) == {span_id_for(run.id).hex() for run in runs} - {
        span_id_for(run_id).hex() for run_id in bad_ids
    }
    assert server.violations == []
    content_type = "application/json" if protocol == "http/json" else "application/x-protobuf"
    assert {headers["content-type"] for headers, _ in server.requests} == {content_type}
    if len(bad) == 1:  # 8 -> 4 + 4 -> 2 + 2 -> 1 + 1
        assert sorted((count for _, count in server.requests), reverse=True) == [
            8,
            4,
            4,
            2,
            2,
            1,
            1,
        ]
        assert server.posts[span_id_for(runs[5].id).hex()] == 4


def test_without_split_an_unnamed_partial_success_dead_letters_the_request(
    server: FakeOtlp,
) -> None:
    class NoSplit(OtlpBackend):
        split_partial_success = False

    runs = chat_runs(4)
    server.reject[span_id_for(runs[2].id).hex()] = "bad"
    server.name_rejected = False
    backend = NoSplit.from_settings("otlp", load_settings({"DISPATCH_OTLP_ENDPOINT": server.url}))
    try:
        report = backend.deliver(runs, _ctx())
    finally:
        backend.close()
    assert set(report.rejected) == {run.id for run in runs}  # dead-lettered, never dropped
    assert "rejected 1 of the 4 spans" in report.rejected[runs[0].id]
    assert "some spans were invalid" in report.rejected[runs[0].id]
    assert len(server.requests) == 1


def test_a_protobuf_partial_success_is_read_by_its_content_type(
    server: FakeOtlp, make_backend: Factory
) -> None:
    """A ``partial_success`` of 123 bytes serializes as ``\\n{...``: a body sniffed by its
    first byte would take it for JSON, fail to read it and count the rejected span as
    delivered."""
    runs = chat_runs(3)
    span_id = span_id_for(runs[1].id).hex()
    server.reject[span_id] = "x" * (119 - len(f"span {span_id}: "))  # error_message: 119 bytes
    report = make_backend().deliver(runs, _ctx())
    assert list(report.rejected) == [runs[1].id]
    assert len(server.requests) == 1

    partial = ExportTraceServiceResponse()
    partial.partial_success.rejected_spans = 1
    partial.partial_success.error_message = "y" * 119
    body = partial.SerializeToString()
    assert body.startswith(b"\n{")
    expected = PartialSuccess(1, "y" * 119)
    assert read_partial(body, "application/x-protobuf") == expected
    assert read_partial(body, "") == expected  # no header: a body that is not JSON
    doc = b'{"partialSuccess": {"rejectedSpans": "2", "errorMessage": "m"}}'
    assert read_partial(doc, "application/json") == PartialSuccess(2, "m")
    assert read_partial(doc, "") == PartialSuccess(2, "m")
    assert read_partial(doc, "application/x-protobuf") == PartialSuccess(2, "m")  # mislabelled
    assert read_partial(b"{}", "application/x-protobuf") is None  # Langfuse's answer
    assert read_partial(b"", "application/x-protobuf") is None


def test_a_400_isolates_the_refused_run(server: FakeOtlp, make_backend: Factory) -> None:
    runs = chat_runs(6)
    server.refuse.add(span_id_for(runs[4].id).hex())
    report = make_backend().deliver(runs, _ctx())
    assert list(report.rejected) == [runs[4].id]
    assert "HTTP 400" in report.rejected[runs[4].id]
    assert len(server.spans) == 5
    assert set(server.posts.values()) == {1}  # refused requests store nothing
    assert span_id_for(runs[4].id).hex() not in server.posts


def test_429_pauses_everyone_and_503_is_transient(server: FakeOtlp, make_backend: Factory) -> None:
    runs = chat_runs(3)
    server.fail_next(Fault(429, {"Retry-After": "2"}))
    rec = RecordingContext("otlp")
    with pytest.raises(TransientDeliveryError) as info:
        make_backend().deliver(runs, rec.ctx)
    assert info.value.retry_after == 2 and rec.slowed == [2]
    server.fail_next(Fault(503, body=b"Server is at capacity"))
    with pytest.raises(TransientDeliveryError, match="503"):
        make_backend().deliver(runs, _ctx())
    assert make_backend().deliver(runs, _ctx()).deferred == {}
    assert len(server.spans) == 3


def test_refused_credentials_pause_the_service_without_leaking_them() -> None:
    with FakeOtlp(auth="Bearer right-token-123456") as server:
        env = {
            "DISPATCH_OTLP_ENDPOINT": server.url,
            "DISPATCH_OTLP_HEADERS": "Authorization=Bearer%20wrong-token-987654,x-tenant=acme",
        }
        backend = OtlpBackend.from_settings("otlp", load_settings(env))
        with pytest.raises(CredentialsError) as info:
            backend.deliver(chat_runs(2), _ctx())
        backend.close()
    message = str(info.value)
    assert "HTTP 401" in message and "DISPATCH_OTLP_HEADERS" in message
    assert "wrong-token-987654" not in message


def test_standard_otel_variables_are_honoured_when_ours_are_unset() -> None:
    with FakeOtlp(auth="Basic " + base64.b64encode(b"u:p").decode()) as server:
        base = server.url.removesuffix("/v1/traces")
        auth = "Authorization=Basic%20" + base64.b64encode(b"u:p").decode()
        for env in (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": base + "/", "OTEL_EXPORTER_OTLP_HEADERS": auth},
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": server.url,
             "OTEL_EXPORTER_OTLP_TRACES_HEADERS": auth,
             "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9/ignored"},
            {"DISPATCH_OTLP_ENDPOINT": base, "OTEL_EXPORTER_OTLP_HEADERS": auth,
             "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/ignored"},
            {"DISPATCH_OTLP_ENDPOINT": server.url, "DISPATCH_OTLP_USERNAME": "u",
             "DISPATCH_OTLP_PASSWORD": "p", "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=x"},
        ):  # fmt: skip
            backend = OtlpBackend.from_settings("otlp", load_settings(env))
            assert backend.options.endpoint == server.url, env
            assert backend.deliver(chat_runs(1), _ctx()).deferred == {}
            backend.close()
        assert server.violations == []
    settings = load_settings(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
         "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip", "DISPATCH_OTLP_SERVICE_NAME": "gateway",
         "DISPATCH_OTLP_RESOURCE_ATTRIBUTES": "openinference.project.name=proxy,env=prod%20eu"}
    )  # fmt: skip
    backend = OtlpBackend.from_settings("otlp", settings)
    assert (backend.config.protocol, backend.config.gzip) == ("http/json", True)
    assert backend.config.resource == {
        "service.name": "gateway", "openinference.project.name": "proxy", "env": "prod eu"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({}, "DISPATCH_OTLP_ENDPOINT"),
        ({"DISPATCH_OTLP_ENDPOINT": "localhost:4318"}, "DISPATCH_OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://x"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"DISPATCH_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
         "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"DISPATCH_OTLP_ENDPOINT": "http://c:4318", "DISPATCH_OTLP_COMPRESSION": "zstd"},
         "DISPATCH_OTLP_COMPRESSION"),
        ({"DISPATCH_OTLP_ENDPOINT": "http://c:4318", "DISPATCH_OTLP_MAX_REQUEST_BYTES": "0"},
         "DISPATCH_OTLP_MAX_REQUEST_BYTES"),
        ({"DISPATCH_OTLP_ENDPOINT": "http://c", "DISPATCH_OTLP_RESOURCE_ATTRIBUTES": "novalue"},
         "DISPATCH_OTLP_RESOURCE_ATTRIBUTES"),
    ],
)  # fmt: skip
def test_bad_configuration_names_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        create_backend("otlp", load_settings(env))


def test_end_to_end_every_run_once_no_secret_and_a_bad_run_dead_lettered_alone(
    redis_url: str, r: redis.Redis, tmp_path: Path, vectors: dict[str, dict[str, Any]]
) -> None:
    """All 7 spec vectors, 40 chat events (a 503 burst and a 429 with Retry-After on the way),
    one carrying a secret, one the receiver refuses in a partial success."""
    with FakeOtlp() as server:
        settings, app, _ = make(
            redis_url, tmp_path, DISPATCH_BATCH_SIZE="20", DISPATCH_OTLP_ENDPOINT=server.url,
        )  # fmt: skip
        server.fail_next(Fault(503), Fault(503), Fault(429, {"Retry-After": "1"}))
        bad = "00000000-0000-4000-8000-000000000007"
        server.reject[span_id_for(bad).hex()] = "span rejected by policy"
        doc = orjson.loads(event(39))
        doc["RequestBody"] = base64.b64encode(orjson.dumps({
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"my key is {SECRET}"}],
        })).decode()  # fmt: skip
        doc["ResponseHeaders"]["Set-Cookie"] = ["session=very-secret-cookie"]
        datas = [v["xadd_fields"]["data"].encode() for v in vectors.values()]
        datas += [event(i) for i in range(39)] + [orjson.dumps(doc)]
        xadd_all(r, STREAM, datas)
        delivered = {vectors[n]["expected_record"]["id"] for n in vectors
                     if vectors[n]["expected_record"]["delivered"]}  # fmt: skip
        expected = {span_id_for(i).hex() for i in delivered} | {
            span_id_for(f"00000000-0000-4000-8000-{i:012d}").hex() for i in range(40) if i != 7
        }
        with bridge(settings, app, "otlp"), worker(app, "otlp"):
            wait_for(lambda: set(server.spans) >= expected, timeout=60, what="spans stored")
            wait_for(lambda: r.hlen(c.inflight_key("otlp")) == 0, what="batches finished")
        assert set(server.spans) == expected  # the filtered GET and OPTIONS never went out
        assert server.violations == []
        letters = xrange(r, c.deadletter_key("otlp"))
        assert len(letters) == 1 and letters[0][1][b"event_id"].decode() == bad
        assert b"span rejected by policy" in letters[0][1][b"reason"]
        everything = b"".join(received.body for received in server.received)
        assert SECRET.encode() not in everything and b"very-secret-cookie" not in everything
        assert {s: n for s, n in server.posts.items() if s in expected} == dict.fromkeys(
            expected, 1
        )  # exactly once: the 503s and the 429 were answered before anything was stored


def test_the_three_backends_are_listed_and_a_worker_refuses_to_start_unconfigured(
    redis_url: str, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from dispatch_celery.cli.commands import main
    from tests.harness import pipeline_env, spawn_worker

    env = pipeline_env(redis_url, tmp_path)
    listing = CliRunner().invoke(main, ["backends"], env=env, catch_exceptions=False).output
    for name, variable in (("otlp", "DISPATCH_OTLP_ENDPOINT"),
                           ("langfuse", "DISPATCH_LANGFUSE_PUBLIC_KEY"),
                           ("webhook", "DISPATCH_WEBHOOK_URL")):  # fmt: skip
        assert f"{name:<12} not configured: {variable} is required" in listing
    configured = {
        **env, "DISPATCH_OTLP_ENDPOINT": "http://127.0.0.1:4318",
        "LANGFUSE_PUBLIC_KEY": "pk-lf-1", "LANGFUSE_SECRET_KEY": "sk-lf-very-secret-1",
        "DISPATCH_WEBHOOK_URL": "http://127.0.0.1:9/hook",
        "DISPATCH_WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"k" * 32).decode(),
    }  # fmt: skip
    listing = CliRunner().invoke(main, ["backends"], env=configured).output
    assert all(f"{name:<12} configured" in listing for name in ("otlp", "langfuse", "webhook"))
    assert "sk-lf-very-secret-1" not in listing
    procs = {
        name: spawn_worker(env, name, tmp_path / f"{name}.log", name=name)
        for name in ("otlp", "langfuse", "webhook")
    }
    for name, proc in procs.items():
        assert proc.wait(60) == 2, name
        assert f"{name}" in (tmp_path / f"{name}.log").read_text()
    assert "DISPATCH_OTLP_ENDPOINT is required" in (tmp_path / "otlp.log").read_text()
    assert "DISPATCH_LANGFUSE_PUBLIC_KEY" in (tmp_path / "langfuse.log").read_text()
    assert "DISPATCH_WEBHOOK_URL is required" in (tmp_path / "webhook.log").read_text()


def test_request_bytes_are_what_the_reference_protos_serialize() -> None:
    """The protobuf body framed from spans serialized once is byte for byte the request
    opentelemetry-proto builds, and parses back to it."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from dispatch_celery.backends import otlp_wire as wire
    from dispatch_celery.backends.genai import build_span

    envelope = wire.Envelope({"service.name": "dispatch", "x.list": [1, "a", []]}, "s", "1.0")
    redactor = Redactor()
    spans = []
    for i in range(3):
        decoded = decode_entry(
            "llm-proxy-events", f"1736937000123-{i}", event(i, content="é" * 200)
        )
        spans.append(
            wire.to_proto(build_span(redactor.record_of(decoded, max_body_bytes=2**20)[0])[0])
        )
    for chosen in ([], spans[:1], spans):
        reference = envelope.request(chosen)
        framed = envelope.request_bytes([s.SerializeToString() for s in chosen])
        assert framed == reference.SerializeToString()
        assert ExportTraceServiceRequest.FromString(framed) == reference
