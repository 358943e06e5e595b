"""HeliconeBackend against a local fake Helicone that enforces the documented contract."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from dispatch_celery.backends.helicone import DEFAULT_ENDPOINT, HeliconeBackend
from dispatch_celery.errors import ConfigError, CredentialsError, TransientDeliveryError
from dispatch_celery.registry import backend_class
from dispatch_celery.settings import load_settings
from tests.vendor_servers import (
    FakeHelicone,
    Fault,
    RecordingContext,
    backend_factory,
    chat_run,
    chat_runs,
    entry_data,
    run_from_data,
    vector_run,
)

Factory = Callable[..., HeliconeBackend]


@pytest.fixture
def server() -> Iterator[FakeHelicone]:
    with FakeHelicone() as fake:
        yield fake


@pytest.fixture
def make_backend(server: FakeHelicone) -> Iterator[Factory]:
    with backend_factory(HeliconeBackend, "helicone", server) as make:
        yield make


def _instant(ms: int) -> dict[str, int]:
    return {"seconds": ms // 1000, "milliseconds": ms % 1000}


def test_log_follows_the_documented_shape(
    server: FakeHelicone, make_backend: Factory, vectors: dict[str, dict[str, Any]]
) -> None:
    run = vector_run(vectors["chat_completion_json_200"])
    rec = RecordingContext("helicone")
    report = make_backend().deliver([run], rec.ctx)

    assert report.rejected == {}
    assert report.deferred == {}
    assert server.violations == []
    received = server.received[0]
    assert received.headers["authorization"] == f"Bearer {server.api_key}"
    assert received.headers["content-type"] == "application/json"
    log = server.logs[run.id]
    request = log["providerRequest"]
    assert request["url"] == "https://api.openai.com/v1/chat/completions"
    assert request["json"]["messages"] == [{"role": "user", "content": "Hello"}]
    assert request["meta"]["Helicone-Request-Id"] == "6f1c2d3e-4b5a-4c6d-8e7f-901a2b3c4d5e"
    assert request["meta"]["Helicone-Property-Path"] == "/v1/chat/completions"
    response = log["providerResponse"]
    assert response["status"] == 200
    assert response["headers"]["content-type"] == "application/json"
    usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    assert response["json"]["usage"] == usage
    # The request's real start and end: entry time 1736937000123 ms, duration 1234 ms.
    assert log["timing"]["startTime"] == {"seconds": 1736936998, "milliseconds": 889}
    assert log["timing"]["endTime"] == {"seconds": 1736937000, "milliseconds": 123}
    assert rec.acquired == 1


def test_stream_vectors(
    server: FakeHelicone, make_backend: Factory, vectors: dict[str, dict[str, Any]]
) -> None:
    names = [
        "chat_completion_sse_stream_200",
        "audio_speech_binary_non_json_200",
        "proxy_401_token_not_found",
        "embeddings_post_generic_json_200",
    ]
    runs = [vector_run(vectors[name], i) for i, name in enumerate(names)]
    report = make_backend().deliver(runs, RecordingContext("helicone").ctx)

    assert report.rejected == {}
    assert report.deferred == {}
    assert server.violations == []
    sse, audio, denied, embeddings = (server.logs[run.id] for run in runs)

    # SSE: the merged completion carries the upstream usage, sent as JSON.
    assert sse["providerResponse"]["json"]["choices"][0]["message"]["content"] == "Hi there!"
    assert sse["providerResponse"]["json"]["usage"]["completion_tokens"] == 3
    assert sse["providerResponse"]["headers"]["content-type"] == "application/json"
    assert sse["providerRequest"]["json"]["stream"] is True
    assert sse["timing"]["startTime"] == _instant(1736937000123 + 0 - 2500)

    # Binary audio: a textBody that says so, never base64 of the bytes.
    body = audio["providerResponse"]["textBody"]
    assert "binary" in body
    assert "audio/mpeg" in body
    assert "json" not in audio["providerResponse"]
    assert audio["providerRequest"]["url"] == "https://api.openai.com/v1/audio/speech"
    assert audio["providerResponse"]["headers"]["content-type"] == "audio/mpeg"

    # The proxy's own 401 is a run like any other: delivered with its status and error.
    assert denied["providerResponse"]["status"] == 401
    assert denied["providerResponse"]["json"]["error"] == "Token not found"

    usage = {"prompt_tokens": 1, "total_tokens": 1}
    assert embeddings["providerResponse"]["json"]["usage"] == usage
    assert embeddings["providerRequest"]["json"]["model"] == "text-embedding-3-small"


def test_batch_goes_out_concurrently_over_keep_alive(make_backend: Factory) -> None:
    with FakeHelicone(delay=0.05) as slow:
        backend = make_backend(endpoint=slow.url, api_key=slow.api_key, concurrency=8)
        ctx = RecordingContext("helicone").ctx
        backend.deliver(chat_runs(24, "a"), ctx)
        backend.deliver(chat_runs(24, "b"), ctx)

        assert len(slow.logs) == 48
        assert slow.max_in_flight == 8  # bounded, and actually concurrent
        assert slow.connections <= 8  # the second batch reused the pooled connections


def test_retry_resends_only_the_failed_runs(server: FakeHelicone, make_backend: Factory) -> None:
    runs = chat_runs(100)
    failing = {runs[7].id, runs[42].id, runs[99].id}
    for run_id in failing:
        server.fail_run(run_id, Fault(500, body=b'{"error":"boom"}'))
    backend = make_backend(concurrency=16)

    report = backend.deliver(runs, RecordingContext("helicone").ctx)
    assert set(report.deferred) == failing
    assert report.rejected == {}
    assert "HTTP 500" in report.deferred[runs[7].id]

    again = backend.deliver([r for r in runs if r.id in failing], RecordingContext("helicone").ctx)
    assert again.deferred == {}
    assert again.rejected == {}
    assert len(server.received) == 103  # 100 + exactly the 3 that failed
    assert len(server.logs) == 100
    assert {rid for rid, n in server.posts.items() if n == 2} == failing


def test_nothing_delivered_raises_transient(server: FakeHelicone, make_backend: Factory) -> None:
    server.fail_next(*[Fault(503) for _ in range(3)])
    with pytest.raises(TransientDeliveryError) as info:
        make_backend().deliver(chat_runs(3), RecordingContext("helicone").ctx)
    assert "HTTP 503" in str(info.value)
    assert server.logs == {}


def test_429_honours_retry_after_and_slows_everyone(
    server: FakeHelicone, make_backend: Factory
) -> None:
    server.fail_next(Fault(429, {"Retry-After": "3"}))
    rec = RecordingContext("helicone")
    with pytest.raises(TransientDeliveryError) as info:
        make_backend(concurrency=1).deliver(chat_runs(5), rec.ctx)
    assert info.value.retry_after == 3
    assert rec.slowed == [3]
    assert len(server.received) == 1  # the other runs were not thrown at a throttling server


def test_429_retry_after_as_http_date(server: FakeHelicone, make_backend: Factory) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    runs = chat_runs(2)
    server.fail_run(runs[1].id, Fault(429, {"Retry-After": when}))
    rec = RecordingContext("helicone")
    report = make_backend(concurrency=1).deliver(runs, rec.ctx)
    assert set(report.deferred) == {runs[1].id}
    assert report.retry_after is not None
    assert 27 <= report.retry_after <= 30
    assert rec.slowed
    assert 27 <= rec.slowed[0] <= 30


@pytest.mark.parametrize("status", [401, 403])
def test_refused_key_pauses_the_service_for_the_batch(
    server: FakeHelicone, make_backend: Factory, status: int
) -> None:
    server.fail_next(*[Fault(status, body=b'{"error":"Unauthorized"}') for _ in range(20)])
    with pytest.raises(CredentialsError) as info:
        make_backend(concurrency=2).deliver(chat_runs(20), RecordingContext("helicone").ctx)
    assert "DISPATCH_HELICONE_API_KEY" in str(info.value)
    assert server.api_key not in str(info.value)
    assert len(server.received) <= 2  # stopped at once: a bad key is not hammered


def test_key_refused_part_way_keeps_delivered_runs_delivered(
    server: FakeHelicone, make_backend: Factory
) -> None:
    runs = chat_runs(10)
    server.fail_next(Fault(), Fault(), Fault(), *[Fault(401) for _ in range(10)])
    report = make_backend(concurrency=1).deliver(runs, RecordingContext("helicone").ctx)

    assert set(server.logs) == {run.id for run in runs[:3]}
    assert set(report.deferred) == {run.id for run in runs[3:]}  # not rejected: paused
    assert report.rejected == {}
    assert report.credentials_refused is not None
    assert "DISPATCH_HELICONE_API_KEY" in report.credentials_refused
    assert server.api_key not in report.credentials_refused
    assert len(server.received) == 4  # nothing after the refusal


def test_a_redirect_pauses_naming_the_endpoint(server: FakeHelicone, make_backend: Factory) -> None:
    server.fail_next(*[Fault(307, {"Location": "https://eu.helicone.ai/custom/v1/log"})] * 3)
    with pytest.raises(CredentialsError) as info:
        make_backend(concurrency=1).deliver(chat_runs(3), RecordingContext("helicone").ctx)
    assert "DISPATCH_HELICONE_ENDPOINT" in str(info.value)
    assert "eu.helicone.ai" in str(info.value)
    assert len(server.received) == 1


def test_probe_sends_one_log_first(server: FakeHelicone, make_backend: Factory) -> None:
    server.fail_next(Fault(503))
    with pytest.raises(TransientDeliveryError, match="HTTP 503"):
        make_backend().deliver(chat_runs(20), RecordingContext("helicone", probe=True).ctx)
    assert len(server.received) == 1  # the other 19 stayed unsent
    report = make_backend().deliver(chat_runs(20), RecordingContext("helicone", probe=True).ctx)
    assert report.deferred == {}
    assert len(server.logs) == 20


def test_wrong_key_is_never_echoed(make_backend: Factory, server: FakeHelicone) -> None:
    backend = make_backend(api_key="sk-wrong-secret-key")
    with pytest.raises(CredentialsError) as info:
        backend.deliver(chat_runs(1), RecordingContext("helicone").ctx)
    assert "sk-wrong-secret-key" not in str(info.value)
    assert "HTTP 401" in str(info.value)


def test_other_4xx_rejects_that_run_only(server: FakeHelicone, make_backend: Factory) -> None:
    runs = chat_runs(5)
    server.fail_run(runs[2].id, Fault(422, body=b'{"error":"unprocessable"}'))
    report = make_backend().deliver(runs, RecordingContext("helicone").ctx)
    assert list(report.rejected) == [runs[2].id]
    assert "422" in report.rejected[runs[2].id]
    assert report.deferred == {}
    assert set(server.logs) == {r.id for r in runs} - {runs[2].id}


def test_408_is_transient(server: FakeHelicone, make_backend: Factory) -> None:
    runs = chat_runs(2)
    server.fail_run(runs[0].id, Fault(408))
    report = make_backend().deliver(runs, RecordingContext("helicone").ctx)
    assert list(report.deferred) == [runs[0].id]


def test_reset_and_timeout_are_transient_for_those_runs(
    server: FakeHelicone, make_backend: Factory
) -> None:
    runs = chat_runs(3)
    server.fail_next(Fault(reset=True), Fault(delay=0.6))
    backend = make_backend(concurrency=1, read_timeout=0.2)

    report = backend.deliver(runs, RecordingContext("helicone").ctx)
    assert set(report.deferred) == {runs[0].id, runs[1].id}
    assert "failed" in report.deferred[runs[0].id]
    assert "timeout" in report.deferred[runs[1].id]
    assert runs[2].id in server.logs

    backend.deliver(runs[:2], RecordingContext("helicone").ctx)
    assert set(server.logs) == {r.id for r in runs}


def test_connection_refused_is_transient(make_backend: Factory) -> None:
    with FakeHelicone() as gone:
        url = gone.url
    with pytest.raises(TransientDeliveryError):
        make_backend(endpoint=url).deliver(chat_runs(2), RecordingContext("helicone").ctx)


def test_reasons_never_contain_the_key(server: FakeHelicone, make_backend: Factory) -> None:
    runs = chat_runs(2)
    echo = f'{{"error":"upstream said: Bearer {server.api_key}"}}'.encode()
    server.fail_run(runs[0].id, Fault(500, body=echo))
    report = make_backend().deliver(runs, RecordingContext("helicone").ctx)
    reason = report.deferred[runs[0].id]
    assert server.api_key not in reason
    assert "***" in reason


def test_non_uuid_run_ids_get_a_stable_uuid(server: FakeHelicone, make_backend: Factory) -> None:
    data = entry_data("req-not-a-uuid", request={"model": "m", "messages": [], "user": "alice"})
    run = run_from_data(data, "1736937000123-0")
    backend = make_backend()
    backend.deliver([run], RecordingContext("helicone").ctx)
    backend.deliver([run], RecordingContext("helicone").ctx)
    assert server.violations == []
    (request_id,) = server.logs  # the same id both times
    uuid.UUID(request_id)
    meta = server.logs[request_id]["providerRequest"]["meta"]
    assert meta["Helicone-Property-Run-Id"] == "req-not-a-uuid"
    assert meta["Helicone-User-Id"] == "alice"


def test_duplicate_runs_in_a_batch_are_sent_once(
    server: FakeHelicone, make_backend: Factory
) -> None:
    run = chat_run(str(uuid.uuid4()))
    make_backend().deliver([run, run], RecordingContext("helicone").ctx)
    assert len(server.received) == 1


def test_from_settings_validates_and_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="DISPATCH_HELICONE_API_KEY"):
        HeliconeBackend.from_settings("helicone", load_settings({}))
    base = {"DISPATCH_HELICONE_API_KEY": "sk-secret-xyz"}
    for name, value in [
        ("CONCURRENCY", "0"), ("CONCURRENCY", "many"), ("CONCURRENCY", "100000"),
        ("ENDPOINT", "ftp://example.com/log"), ("ENDPOINT", "not a url"),
        ("READ_TIMEOUT", "-1"), ("CONNECT_TIMEOUT", "soon"), ("PROVIDER_URL", "x"),
    ]:  # fmt: skip
        env = {**base, f"DISPATCH_HELICONE_{name}": value}
        with pytest.raises(ConfigError, match=f"DISPATCH_HELICONE_{name}"):
            HeliconeBackend.from_settings("helicone", load_settings(env))
    backend = HeliconeBackend.from_settings("helicone", load_settings(base))
    assert backend.options.endpoint == DEFAULT_ENDPOINT
    assert "sk-secret-xyz" not in repr(backend.options)
    backend.close()


def test_registered_by_entry_point() -> None:
    assert backend_class("helicone") is HeliconeBackend
