"""LunaryBackend against a local fake Lunary that behaves like Lunary's ingest handler."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from dispatch_celery.backends.lunary import DEFAULT_ENDPOINT, LunaryBackend
from dispatch_celery.errors import ConfigError, CredentialsError, TransientDeliveryError
from dispatch_celery.registry import backend_class
from dispatch_celery.settings import load_settings
from tests.vendor_servers import (
    DUPLICATE,
    FakeLunary,
    Fault,
    RecordingContext,
    backend_factory,
    chat_run,
    chat_runs,
    entry_data,
    run_from_data,
    vector_run,
)

Factory = Callable[..., LunaryBackend]


@pytest.fixture
def server() -> Iterator[FakeLunary]:
    with FakeLunary() as fake:
        yield fake


@pytest.fixture
def make_backend(server: FakeLunary) -> Iterator[Factory]:
    with backend_factory(LunaryBackend, "lunary", server) as make:
        yield make


def _ctx() -> Any:
    return RecordingContext("lunary").ctx


def _runs_per_request(server: FakeLunary) -> list[list[str]]:
    """For each request received: its runIds, each run listed once per event."""
    return [[e["runId"] for e in r.json["events"]] for r in server.received if r.json]


def test_run_is_a_start_and_an_end_in_one_request(
    server: FakeLunary, make_backend: Factory
) -> None:
    run = chat_run(str(uuid.uuid4()), temperature=0.2, max_tokens=50, user="alice")
    rec = RecordingContext("lunary")
    report = make_backend().deliver([run], rec.ctx)

    assert report.rejected == {}
    assert report.deferred == {}
    assert server.violations == []
    (received,) = server.received
    assert received.headers["authorization"] == f"Bearer {server.api_key}"
    assert received.headers["content-type"] == "application/json"
    start, end = received.json["events"]
    assert (start["event"], end["event"]) == ("start", "end")
    assert start["timestamp"] == run.record["started_at"]
    assert end["timestamp"] == run.record["ended_at"]
    stored = server.runs[run.id]
    assert stored["type"] == "llm"
    assert stored["name"] == "gpt-4o-mini-2024-07-18"
    assert stored["input"] == [{"role": "user", "content": "Hello"}]
    assert stored["params"] == {"temperature": 0.2, "max_tokens": 50}
    assert stored["userId"] == "alice"
    assert stored["status"] == "success"
    assert stored["output"] == {"role": "assistant", "content": "Hi there!"}
    assert stored["tokens"] == {"prompt": 9, "completion": 3}
    assert stored["metadata"]["path"] == "/v1/chat/completions"
    assert all(isinstance(v, str | int | float | bool) for v in stored["metadata"].values())
    assert rec.acquired == 1


def test_stream_vectors(
    server: FakeLunary, make_backend: Factory, vectors: dict[str, dict[str, Any]]
) -> None:
    names = [
        "chat_completion_sse_stream_200",
        "audio_speech_binary_non_json_200",
        "proxy_401_token_not_found",
        "embeddings_post_generic_json_200",
    ]
    runs = [vector_run(vectors[name], i) for i, name in enumerate(names)]
    report = make_backend().deliver(runs, _ctx())

    assert report.rejected == {}
    assert report.deferred == {}
    assert server.violations == []
    assert server.dropped == []
    assert len(server.received) == 1
    sse, audio, denied, embeddings = (server.runs[run.id] for run in runs)

    assert sse["type"] == "llm"
    assert sse["output"] == {"role": "assistant", "content": "Hi there!"}
    assert sse["tokens"] == {"prompt": 9, "completion": 3}
    assert sse["params"] == {"stream": True}
    assert sse["metadata"]["streamed"] is True

    assert audio["type"] == "tool"  # a stored type; "log" would be lost
    assert audio["name"] == "tts-1"
    assert audio["input"] == "Hello"
    assert audio["params"] == {"voice": "alloy"}
    assert audio["output"]["_binary"] is True
    assert audio["status"] == "success"

    assert denied["status"] == "error"
    assert denied["error"]["message"] == "HTTP 401: Token not found"
    assert denied["error"]["stack"] is None

    assert embeddings["type"] == "tool"
    assert embeddings["input"] == "hello"
    assert embeddings["tokens"] == {"prompt": 1}
    assert embeddings["output"]["data"][0]["dimensions"] == 2
    assert "embedding" not in embeddings["output"]["data"][0]


def test_responses_api_is_an_llm_run(server: FakeLunary, make_backend: Factory) -> None:
    request = {"model": "gpt-4.1", "input": "Hi", "instructions": "Be brief", "temperature": 0}
    response = {
        "id": "resp_1", "object": "response", "model": "gpt-4.1-2025-04-14",
        "output": [{"type": "message", "role": "assistant",
                    "content": [{"type": "output_text", "text": "Hello!"}]}],
        "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7},
    }  # fmt: skip
    data = entry_data(str(uuid.uuid4()), path="/v1/responses", request=request, response=response)
    run = run_from_data(data, "1736937000123-0")
    make_backend().deliver([run], _ctx())

    stored = server.runs[run.id]
    assert stored["type"] == "llm"
    assert stored["input"] == [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "Hi"},
    ]
    assert stored["params"] == {"temperature": 0}
    assert stored["output"] == {"role": "assistant", "content": "Hello!"}
    assert stored["tokens"] == {"prompt": 5, "completion": 2}


def test_duplicate_start_counts_as_delivered(server: FakeLunary, make_backend: Factory) -> None:
    runs = chat_runs(3)
    backend = make_backend()
    backend.deliver(runs, _ctx())
    report = backend.deliver(runs, _ctx())  # a replay: every start already exists

    assert report.rejected == {}
    assert report.deferred == {}
    assert len(server.received) == 2  # the replay was sent ...
    assert len(server.runs) == 3  # ... and stored nothing twice


def test_per_event_failures_are_per_run(server: FakeLunary, make_backend: Factory) -> None:
    a, b, c, d = runs = chat_runs(4)
    server.fail_event(a.id, "start", "Connection terminated unexpectedly")
    server.fail_event(b.id, "start", 'invalid input syntax for type json: "\\u0000"')
    server.fail_event(c.id, "end", "timeout exceeded when trying to connect")
    backend = make_backend()

    report = backend.deliver(runs, _ctx())
    # Lunary's results are free text naming no event: every failure is transient (retried,
    # dead-lettered with the reason only when the retry budget is spent), none a guess.
    assert set(report.deferred) == {a.id, b.id, c.id}
    assert report.rejected == {}
    assert "Connection terminated unexpectedly" in report.deferred[a.id]
    assert "invalid input syntax" in report.deferred[b.id]
    assert "timeout exceeded" in report.deferred[c.id]
    assert server.runs[d.id]["status"] == "success"
    # b's end was acknowledged but dropped (no stored start): why a failed start fails the run.
    assert [e["runId"] for e in server.dropped] == [a.id, b.id]

    again = backend.deliver([a, b, c], _ctx())  # the core passes only the deferred runs
    assert again.deferred == {}
    assert again.rejected == {}
    assert _runs_per_request(server)[-1] == [a.id, a.id, b.id, b.id, c.id, c.id]
    assert server.runs[a.id]["status"] == "success"
    assert server.runs[b.id]["status"] == "success"
    assert server.runs[c.id]["status"] == "success"  # its start answered "already exists"


def test_results_are_mapped_by_identity_not_order(
    server: FakeLunary, make_backend: Factory
) -> None:
    """Results in any order (a proxy reordering them, clock skew in the vendor's sort) and
    results for ids we never sent change nothing: each run is judged by its own results."""
    a, b = runs = chat_runs(2)
    ids = [a.id, a.id, b.id, b.id]
    server.fail_next(
        Fault(200, body=json.dumps({"results": [
            {"id": b.id, "success": False, "error": DUPLICATE},  # b's start: stored before
            {"id": "00000000-0000-4000-8000-999999999999", "success": True},
            {"id": a.id, "success": True},
            {"id": b.id, "success": True},
            {"id": a.id, "success": False, "error": "deadlock detected"},
        ]}).encode()),
    )  # fmt: skip
    report = make_backend().deliver(runs, _ctx())
    assert _runs_per_request(server) == [ids]
    assert set(report.deferred) == {a.id}
    assert "deadlock detected" in report.deferred[a.id]
    assert report.rejected == {}


def test_a_missing_result_is_transient(server: FakeLunary, make_backend: Factory) -> None:
    a, b = runs = chat_runs(2)
    body = {"results": [{"id": a.id, "success": True}] * 2 + [{"id": b.id, "success": True}]}
    server.fail_next(Fault(200, body=json.dumps(body).encode()))
    report = make_backend().deliver(runs, _ctx())
    assert list(report.deferred) == [b.id]
    assert "1 results for the run, expected 2" in report.deferred[b.id]


def test_a_skewed_start_never_sorts_after_its_end(
    server: FakeLunary, make_backend: Factory
) -> None:
    run = chat_run(str(uuid.uuid4()))
    run.record["started_at"] = "2030-01-01T00:00:00.000Z"  # a producer's clock gone wrong
    assert make_backend().deliver([run], _ctx()).deferred == {}
    start, end = server.received[0].json["events"]
    assert start["timestamp"] == end["timestamp"] == run.record["ended_at"]
    assert server.dropped == []
    assert server.runs[run.id]["status"] == "success"


def test_batches_split_by_bytes_never_splitting_a_run(
    server: FakeLunary, make_backend: Factory
) -> None:
    limit = 8 * 1024
    runs = chat_runs(30, pad=1000)
    big = chat_run(str(uuid.uuid4()), 99, pad=3 * limit)  # alone, over the limit
    report = make_backend(max_request_bytes=limit).deliver([*runs[:10], big, *runs[10:]], _ctx())

    assert report.deferred == {}
    assert report.rejected == {}
    assert server.violations == []
    requests_ = _runs_per_request(server)
    assert len(requests_) > 3
    for received, ids in zip(server.received, requests_, strict=True):
        # Every run's start and end travel together.
        assert all(ids.count(run_id) == 2 for run_id in ids)
        if big.id in ids:
            assert set(ids) == {big.id}
        else:
            assert len(received.body) <= limit
    assert len(server.runs) == 31
    assert all(run["status"] == "success" for run in server.runs.values())


@pytest.mark.parametrize(
    ("key", "status"),
    [("6b1f2b4c-0000-4000-8000-000000000000", 401), ("lk-not-a-project-uuid", 402)],
)
def test_refused_key_pauses_the_service_for_the_batch(
    make_backend: Factory, key: str, status: int
) -> None:
    with pytest.raises(CredentialsError) as info:
        make_backend(api_key=key).deliver(chat_runs(3), _ctx())
    assert f"HTTP {status}" in str(info.value)
    assert "DISPATCH_LUNARY_API_KEY" in str(info.value)
    assert key not in str(info.value)


def test_key_refused_part_way_keeps_the_stored_chunks_delivered(
    server: FakeLunary, make_backend: Factory
) -> None:
    runs = chat_runs(9, pad=1000)
    server.fail_next(Fault(), Fault(401, body=b'{"message": "This project does not exist"}'))
    report = make_backend(max_request_bytes=8 * 1024).deliver(runs, _ctx())

    delivered = set(server.runs)
    assert delivered
    assert set(report.deferred) == {r.id for r in runs} - delivered
    assert report.rejected == {}
    assert report.credentials_refused is not None
    assert "DISPATCH_LUNARY_API_KEY" in report.credentials_refused
    assert "HTTP 401" in report.credentials_refused
    assert len(server.received) == 2


def test_probe_sends_one_chunk_first(server: FakeLunary, make_backend: Factory) -> None:
    runs = chat_runs(9, pad=1000)
    server.fail_next(Fault(reset=True))
    rec = RecordingContext("lunary", probe=True)
    with pytest.raises(TransientDeliveryError, match="reset"):
        make_backend(max_request_bytes=8 * 1024).deliver(runs, rec.ctx)
    assert len(server.received) == 1  # the other chunks stayed unsent
    assert rec.acquired == 1


def test_429_slows_everyone_and_defers_the_rest(server: FakeLunary, make_backend: Factory) -> None:
    runs = chat_runs(9, pad=1000)
    server.fail_next(Fault(), Fault(429, {"Retry-After": "2"}))
    rec = RecordingContext("lunary")
    report = make_backend(max_request_bytes=8 * 1024).deliver(runs, rec.ctx)

    assert len(server.received) == 2  # nothing more after the 429
    delivered = set(server.runs)
    assert delivered
    assert set(report.deferred) == {r.id for r in runs} - delivered
    assert report.retry_after == 2
    assert rec.slowed == [2]


def test_5xx_burst_then_recovery(server: FakeLunary, make_backend: Factory) -> None:
    runs = chat_runs(5)
    server.fail_next(Fault(500, body=b'{"error":"db down"}'), Fault(503))
    backend = make_backend()
    for status in ("HTTP 500", "HTTP 503"):
        with pytest.raises(TransientDeliveryError, match=status):
            backend.deliver(runs, _ctx())
    report = backend.deliver(runs, _ctx())
    assert report.deferred == {}
    assert len(server.runs) == 5


def test_4xx_isolates_the_refused_run(server: FakeLunary, make_backend: Factory) -> None:
    runs = chat_runs(8)
    server.refuse_runs.add(runs[5].id)
    report = make_backend().deliver(runs, _ctx())

    assert list(report.rejected) == [runs[5].id]
    assert report.deferred == {}
    assert set(server.runs) == {r.id for r in runs} - {runs[5].id}
    assert len(server.received) <= 7  # halving: 1 + 2 + 2 + 2


def test_timeout_and_reset_are_transient(server: FakeLunary, make_backend: Factory) -> None:
    backend = make_backend(read_timeout=0.2)
    server.fail_next(Fault(reset=True), Fault(delay=0.6))
    runs = chat_runs(2)
    with pytest.raises(TransientDeliveryError, match="failed"):
        backend.deliver(runs, _ctx())
    with pytest.raises(TransientDeliveryError, match="timeout"):
        backend.deliver(runs, _ctx())
    assert backend.deliver(runs, _ctx()).deferred == {}
    assert len(server.runs) == 2


def test_unreadable_answer_is_transient_and_safe_to_resend(
    server: FakeLunary, make_backend: Factory
) -> None:
    server.fail_next(Fault(200, body=b"<html>proxy</html>"))
    runs = chat_runs(2)
    backend = make_backend()
    with pytest.raises(TransientDeliveryError, match="unreadable"):
        backend.deliver(runs, _ctx())
    assert backend.deliver(runs, _ctx()).deferred == {}


def test_non_uuid_run_ids_get_a_stable_uuid(server: FakeLunary, make_backend: Factory) -> None:
    run = run_from_data(entry_data("req-123", request={"model": "m", "messages": []}), "1-0")
    backend = make_backend()
    backend.deliver([run], _ctx())
    assert backend.deliver([run], _ctx()).deferred == {}  # the replay is a duplicate start
    assert server.violations == []
    (stored,) = server.runs.values()
    assert stored["metadata"]["recordId"] == "req-123"


def test_the_fake_enforces_lunarys_contract(server: FakeLunary) -> None:
    auth = {"Authorization": f"Bearer {server.api_key}"}
    event = {"type": "llm", "event": "end", "runId": str(uuid.uuid4()), "timestamp": "2025-01-01"}
    post = requests.post
    bare = post(server.url, json=[event], headers=auth, timeout=5)
    assert (bare.status_code, bare.json()) == (500, {"error": "Missing events payload."})
    for body in ({}, {"events": None}):
        assert post(server.url, json=body, headers=auth, timeout=5).status_code == 500
    plain = post(server.url, data=json.dumps({"events": [event]}), headers=auth, timeout=5)
    assert plain.status_code == 500  # no Content-Type: application/json
    assert post(server.url, json={"events": [event]}, timeout=5).status_code == 402
    orphan = post(server.url, json={"events": [event]}, headers=auth, timeout=5)
    assert orphan.json() == {"results": [{"id": event["runId"], "success": True}]}
    assert server.dropped == [event]  # acknowledged, and lost
    huge = b'{"events": "' + b"x" * (20 * 1024 * 1024) + b'"}'
    big = post(
        server.url, data=huge, headers={**auth, "Content-Type": "application/json"}, timeout=5
    )
    assert big.status_code == 413
    start = {**event, "event": "start", "runId": str(uuid.uuid4())}
    post(server.url, json={"events": [start]}, headers=auth, timeout=5)
    dup = post(server.url, json={"events": [start]}, headers=auth, timeout=5).json()
    assert dup["results"][0] == {"id": start["runId"], "success": False, "error": DUPLICATE}


def test_from_settings_validates_and_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="DISPATCH_LUNARY_API_KEY"):
        LunaryBackend.from_settings("lunary", load_settings({}))
    base = {"DISPATCH_LUNARY_API_KEY": "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"}
    for name, value in [
        ("MAX_REQUEST_BYTES", "0"), ("MAX_REQUEST_BYTES", "1MB"),
        ("MAX_REQUEST_BYTES", str(30 * 1024 * 1024)), ("ENDPOINT", "lunary.ai"),
        ("READ_TIMEOUT", "0"),
    ]:  # fmt: skip
        env = {**base, f"DISPATCH_LUNARY_{name}": value}
        with pytest.raises(ConfigError, match=f"DISPATCH_LUNARY_{name}"):
            LunaryBackend.from_settings("lunary", load_settings(env))
    backend = LunaryBackend.from_settings("lunary", load_settings(base))
    assert backend.options.endpoint == DEFAULT_ENDPOINT
    assert backend.max_request_bytes == 1024 * 1024
    backend.close()


def test_registered_by_entry_point() -> None:
    assert backend_class("lunary") is LunaryBackend
