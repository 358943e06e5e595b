"""The ``otlp`` backend against the real Arize Phoenix (from PyPI, on loopback), end to end:
a real bridge and a real Celery worker deliver, and the spans are read back through
Phoenix's REST API.

Slow (Phoenix installs once into a cached virtualenv, ~80 s, and starts in ~20 s), but it
runs in CI: under ``CI=true`` a Phoenix that cannot be installed or started fails the test;
on a laptop without network it is skipped. Figures (runs sent, spans read back, times) are
printed at the end.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from dispatch_celery import constants as c
from dispatch_celery.backends.genai import span_id_for
from tests.conftest import need_server
from tests.harness import bridge, make, wait_for, worker, xadd_all
from tests.peers.phoenix import PeerUnavailable, Phoenix, run_phoenix
from tests.vendor_servers import entry_data

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a first install takes ~100 s

PROJECT = "dispatch-test"
STREAM = "llm-proxy-events"
SECRET = "sk-proj-abcdefghijklmnop1234"  # noqa: S105 (a test credential)
OK_RUNS = 50
FAILED = {3: (429, "Rate limit reached for gpt-4o-mini"), 11: (500, "The server had an error")}


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Phoenix]:
    try:
        with run_phoenix(tmp_path_factory.mktemp("phoenix")) as server:
            yield server
    except PeerUnavailable as exc:
        need_server(f"Arize Phoenix ({exc})")


def rid(i: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"phoenix-test/{i}"))


def chat_entry(i: int, *, content: str | None = None) -> bytes:
    request = {
        "model": "gpt-4o-mini",
        "temperature": 0.2,
        "max_tokens": 64,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": content or f"question {i}"},
        ],
    }
    if i in FAILED:
        status, message = FAILED[i]
        response: Any = {"error": {"message": message, "type": "requests", "code": None}}
    else:
        status = 200
        response = {
            "id": f"chatcmpl-{i}", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"answer {i}"}}],
            "usage": {"prompt_tokens": 20 + i, "completion_tokens": 2, "total_tokens": 22 + i},
        }  # fmt: skip
    return entry_data(rid(i), status=status, request=request, response=response)


def test_phoenix_stores_every_run_once_as_an_llm_span(
    phoenix: Phoenix,
    redis_url: str,
    r: redis.Redis,
    tmp_path: Path,
    vectors: dict[str, dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings, app, _ = make(
        redis_url, tmp_path,
        DISPATCH_OTLP_ENDPOINT=phoenix.url,  # no path: /v1/traces is appended
        DISPATCH_OTLP_RESOURCE_ATTRIBUTES=f"openinference.project.name={PROJECT}",
        DISPATCH_BATCH_SIZE="25",
    )  # fmt: skip
    secret_entry = chat_entry(OK_RUNS, content=f"my key is {SECRET}")
    doc = orjson.loads(secret_entry)
    doc["ResponseHeaders"]["Set-Cookie"] = ["session=very-secret-cookie"]
    datas = [v["xadd_fields"]["data"].encode() for v in vectors.values()]
    datas += [chat_entry(i) for i in range(OK_RUNS)] + [orjson.dumps(doc)]
    vector_runs = {
        v["expected_record"]["id"]: name
        for name, v in vectors.items()
        if v["expected_record"]["delivered"]
    }
    expected = {rid(i) for i in range(OK_RUNS + 1)} | set(vector_runs)

    started = time.monotonic()
    xadd_all(r, STREAM, datas)
    with bridge(settings, app, "otlp"), worker(app, "otlp"):
        wait_for(lambda: r.hlen(c.inflight_key("otlp")) == 0 and r.xlen(STREAM) == len(datas)
                 and phoenix.record_count(PROJECT) >= len(expected),
                 timeout=120, what="Phoenix to hold every span")  # fmt: skip
    delivered_s = time.monotonic() - started
    spans = phoenix.spans(PROJECT)
    read_s = time.monotonic() - started

    by_span = {s["context"]["span_id"]: s for s in spans}
    assert len(spans) == len(by_span) == len(expected)  # every run once
    assert set(by_span) == {span_id_for(run_id).hex() for run_id in expected}
    assert r.xlen(c.deadletter_key("otlp")) == 0
    for i in range(OK_RUNS + 1):
        span = by_span[span_id_for(rid(i)).hex()]
        a = span["attributes"]
        assert span["span_kind"] == "LLM"
        assert span["context"]["trace_id"] == uuid.UUID(rid(i)).hex
        assert span["name"] == "chat gpt-4o-mini"
        assert a["llm.input_messages.0.message.role"] == "system"
        assert a["llm.input_messages.1.message.role"] == "user"
        if i in FAILED:
            status, message = FAILED[i]
            assert span["status_code"] == "ERROR"
            assert span["status_message"] == f"HTTP {status}: {message}"
            continue
        assert span["status_code"] == "OK"
        assert a["llm.model_name"] == "gpt-4o-mini-2024-07-18"
        assert a["llm.token_count.prompt"] == 20 + i
        assert a["llm.token_count.completion"] == 2
        assert a["llm.token_count.total"] == 22 + i
        assert a["llm.output_messages.0.message.role"] == "assistant"
        assert a["llm.output_messages.0.message.content"] == f"answer {i}"
        if i < OK_RUNS:
            assert a["llm.input_messages.1.message.content"] == f"question {i}"
    kinds = {vector_runs[run_id]: by_span[span_id_for(run_id).hex()]["span_kind"]
             for run_id in vector_runs}  # fmt: skip
    assert kinds["embeddings_post_generic_json_200"] == "EMBEDDING"
    assert kinds["chat_completion_sse_stream_200"] == "LLM"
    denied = by_span[
        span_id_for(vectors["proxy_401_token_not_found"]["expected_record"]["id"]).hex()
    ]
    assert denied["status_code"] == "ERROR"
    assert denied["status_message"] == "HTTP 401: Token not found"
    everything = orjson.dumps(spans)
    assert SECRET.encode() not in everything and b"very-secret-cookie" not in everything
    assert b"[REDACTED" in orjson.dumps(by_span[span_id_for(rid(OK_RUNS)).hex()])

    with capsys.disabled():
        print(
            f"\nphoenix figures: runs sent {len(expected)}, spans read back {len(spans)}, "
            f"delivered and ingested in {delivered_s:.1f} s, read back by {read_s:.1f} s; "
            f"install {phoenix.install_seconds:.1f} s (0 = cached), "
            f"start {phoenix.start_seconds:.1f} s"
        )


def test_phoenix_rejects_what_the_spec_says_and_the_backend_classifies_it(
    phoenix: Phoenix,
) -> None:
    """OTLP/JSON is answered 415 by Phoenix: a permanent refusal of the run, not a retry."""
    from dispatch_celery.backends.otlp import OtlpBackend
    from dispatch_celery.settings import load_settings
    from tests.vendor_servers import RecordingContext, run_from_data

    backend = OtlpBackend.from_settings(
        "otlp",
        load_settings(
            {"DISPATCH_OTLP_ENDPOINT": phoenix.url, "DISPATCH_OTLP_PROTOCOL": "http/json"}
        ),
    )
    run = run_from_data(chat_entry(999), "1736937000123-0")
    report = backend.deliver([run], RecordingContext("otlp").ctx)
    backend.close()
    assert list(report.rejected) == [run.id]
    assert "HTTP 415" in report.rejected[run.id]
