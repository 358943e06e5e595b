"""The ``langfuse`` backend (the ``otlp`` backend with a Langfuse preset) against a local
receiver that behaves like Langfuse's OTLP endpoint: Basic auth, protobuf decoded with
``opentelemetry-proto``, ``{}`` answered as JSON. The reference comparison emits the same
generation with the official ``langfuse`` SDK, pointed at that receiver."""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from dispatch_celery import constants as c
from dispatch_celery.backend import Run
from dispatch_celery.backends.genai import span_id_for
from dispatch_celery.backends.langfuse import DEFAULT_HOST, OTEL_PATH, LangfuseBackend
from dispatch_celery.decode.redact import Redactor
from dispatch_celery.errors import ConfigError, CredentialsError
from dispatch_celery.registry import create_backend
from dispatch_celery.settings import load_settings
from tests.harness import bridge, event, make, wait_for, worker, xadd_all
from tests.peers.otlp_receiver import FakeOtlp, StoredSpan
from tests.vendor_servers import RecordingContext, chat_run, entry_data, run_from_data, vector_run

PUBLIC_KEY = "pk-lf-1234567890"
SECRET_KEY = "sk-lf-abcdef-secret-0987"  # noqa: S105 (a test credential)
BASIC = "Basic " + base64.b64encode(f"{PUBLIC_KEY}:{SECRET_KEY}".encode()).decode()
STREAM = "llm-proxy-events"


@pytest.fixture
def server() -> Iterator[FakeOtlp]:
    with FakeOtlp(auth=BASIC, langfuse=True, path=OTEL_PATH) as fake:
        yield fake


def host(server: FakeOtlp) -> str:
    return server.url.removesuffix(OTEL_PATH)


def backend_for(server: FakeOtlp, **env: str) -> LangfuseBackend:
    settings = load_settings(
        {
            "DISPATCH_LANGFUSE_HOST": host(server),
            "DISPATCH_LANGFUSE_PUBLIC_KEY": PUBLIC_KEY,
            "DISPATCH_LANGFUSE_SECRET_KEY": SECRET_KEY,
            **env,
        }
    )
    return LangfuseBackend.from_settings("langfuse", settings)


def _ctx() -> Any:
    return RecordingContext("langfuse").ctx


def stored(server: FakeOtlp, run: Run) -> StoredSpan:
    return server.spans[span_id_for(run.id).hex()]


def failed_run(request_id: str) -> Run:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}
    data = entry_data(
        request_id, status=500, request=body,
        response={"error": {"message": "upstream exploded", "type": "server_error"}},
    )  # fmt: skip
    return run_from_data(data, "1736937000123-0")


def test_runs_are_generations_over_otlp_with_basic_auth(server: FakeOtlp) -> None:
    run = chat_run(str(uuid.uuid4()), temperature=0.2, user="alice", metadata={"session_id": "s-1"})
    backend = backend_for(server)
    report = backend.deliver([run], _ctx())
    backend.deliver([run], _ctx())  # a replay: the same observation
    backend.close()

    assert report.rejected == {} and report.deferred == {}
    assert server.violations == []  # Basic auth, path and content type as Langfuse wants
    headers = server.requests[0][0]
    assert headers["content-type"] == "application/x-protobuf"
    assert headers["x-langfuse-ingestion-version"] == "4"
    assert len(server.spans) == 1 and server.posts[span_id_for(run.id).hex()] == 2
    span = stored(server, run)
    assert span.trace_id == uuid.UUID(run.id).hex
    a = span.attributes
    assert a["langfuse.observation.type"] == "generation"
    assert a["langfuse.observation.model.name"] == "gpt-4o-mini-2024-07-18"
    assert json.loads(a["langfuse.observation.usage_details"]) == {
        "input": 9, "output": 3, "total": 12
    }  # fmt: skip
    assert json.loads(a["langfuse.observation.model.parameters"]) == {"temperature": 0.2}
    assert json.loads(a["langfuse.observation.input"]) == [{"role": "user", "content": "Hello"}]
    assert json.loads(a["langfuse.observation.output"]) == {
        "role": "assistant", "content": "Hi there!"
    }  # fmt: skip
    assert (a["user.id"], a["session.id"]) == ("alice", "s-1")
    assert a["langfuse.trace.name"] == "chat gpt-4o-mini"
    assert a["langfuse.observation.metadata.path"] == "/v1/chat/completions"
    assert "langfuse.observation.level" not in a
    # the GenAI and OpenInference attributes ride along (Langfuse reads its own first)
    assert a["gen_ai.usage.input_tokens"] == 9 and a["llm.token_count.prompt"] == 9


@pytest.fixture(scope="module")
def sdk() -> Iterator[tuple[FakeOtlp, Any]]:
    """One receiver and one official SDK client for the module: the SDK keeps one client
    per public key per process, so it is built once (and shut down at the end)."""
    from langfuse import Langfuse

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("LANGFUSE_")}
    try:
        with FakeOtlp(auth=BASIC, langfuse=True, path=OTEL_PATH) as receiver:
            client = Langfuse(public_key=PUBLIC_KEY, secret_key=SECRET_KEY, base_url=host(receiver))
            yield receiver, client
            client.shutdown()
    finally:
        os.environ.update(saved)


def _sdk_span(server: FakeOtlp, client: Any, run: Run) -> StoredSpan:
    """The same generation, emitted by the official SDK with the run's own values."""
    from langfuse import propagate_attributes

    record = run.record
    request = record["input"]
    failed = record["status"] >= 400
    output = record["error"] if failed else record["output"]["choices"][0]["message"]
    usage = record["usage"] or {}
    usage_details = {
        k: usage[u]  # type: ignore[literal-required]
        for k, u in (("input", "prompt_tokens"), ("output", "completion_tokens"),
                     ("total", "total_tokens"))
        if u in usage
    }  # fmt: skip
    name = f"chat {request['model']}"
    before = set(server.spans)
    with propagate_attributes(trace_name=name, user_id=request.get("user")):
        generation = client.start_observation(
            name=name,
            as_type="generation",
            model=record["model"],
            input=request["messages"],
            output=output,
            usage_details=usage_details or None,
            model_parameters={k: v for k, v in request.items() if k == "temperature"} or None,
            metadata={"path": record["path"], "status": record["status"]},
            level="ERROR" if failed else None,
            status_message=f"HTTP {record['status']}: upstream exploded" if failed else None,
        )
        generation.end()
    client.flush()
    (new,) = set(server.spans) - before
    return server.spans[new]


# Attributes of the SDK's span that ours does not copy, and why.
SDK_ONLY: dict[str, str] = {}


@pytest.mark.parametrize("kind", ["ok", "failed"])
def test_our_span_carries_what_the_official_sdk_sends(sdk: tuple[FakeOtlp, Any], kind: str) -> None:
    server, client = sdk
    run = (
        chat_run(str(uuid.uuid4()), temperature=0.3, user="bob")
        if kind == "ok"
        else failed_run(str(uuid.uuid4()))
    )
    backend = backend_for(server)
    backend.deliver([run], _ctx())
    backend.close()
    ours = stored(server, run)
    theirs = _sdk_span(server, client, run)
    assert server.violations == []
    mine, ref = ours.attributes, theirs.attributes
    missing = set(ref) - set(mine) - set(SDK_ONLY)
    assert not missing, f"the SDK sends {sorted(missing)} and we do not"
    for key in ("langfuse.observation.type", "langfuse.observation.model.name",
                "langfuse.trace.name", "langfuse.internal.is_app_root"):  # fmt: skip
        assert mine[key] == ref[key], key
    json_keys = ("usage_details", "input", "output", "model.parameters")
    for key in (f"langfuse.observation.{name}" for name in json_keys):
        if key in ref:
            assert json.loads(mine[key]) == json.loads(ref[key]), key
    assert mine.get("langfuse.observation.level") == ref.get("langfuse.observation.level")
    error = ours.span.status.STATUS_CODE_ERROR  # OK vs unset: both "not an error" to Langfuse
    assert (ours.span.status.code == error) == (theirs.span.status.code == error)
    if kind == "failed":
        assert mine["langfuse.observation.level"] == "ERROR"
        assert (
            mine["langfuse.observation.status_message"]
            == (ref["langfuse.observation.status_message"])
        )
        assert ours.span.status.message == theirs.span.status.message
    # metadata keys match; values are native OTel values here, JSON text in SDK v5
    assert (
        json.loads(ref["langfuse.observation.metadata.path"])
        == (mine["langfuse.observation.metadata.path"])
    )


def test_stream_vectors_and_metadata_only(
    server: FakeOtlp, vectors: dict[str, dict[str, Any]]
) -> None:
    names = ["chat_completion_sse_stream_200", "proxy_401_token_not_found",
             "embeddings_post_generic_json_200", "audio_speech_binary_non_json_200"]  # fmt: skip
    runs = [vector_run(vectors[n], i) for i, n in enumerate(names)]
    plain = chat_run(str(uuid.uuid4()))
    hidden = Run(Redactor(metadata_only=True).redact_record(plain.record), plain.event)
    backend = backend_for(server)
    report = backend.deliver([*runs, hidden], _ctx())
    backend.close()
    assert report.rejected == {} and report.deferred == {}
    sse, denied, embeddings, audio, meta = (stored(server, r).attributes for r in [*runs, hidden])
    assert json.loads(sse["langfuse.observation.output"])["content"] == "Hi there!"
    assert denied["langfuse.observation.level"] == "ERROR"
    assert denied["langfuse.observation.status_message"] == "HTTP 401: Token not found"
    assert embeddings["langfuse.observation.type"] == "embedding"
    assert audio["langfuse.observation.model.name"] == "tts-1"
    assert "langfuse.observation.input" not in meta and "langfuse.observation.output" not in meta
    hidden_span = stored(server, hidden).span.SerializeToString()
    assert b"Hello" not in hidden_span and b"Hi there" not in hidden_span


def test_refused_keys_pause_the_service_naming_the_variables(server: FakeOtlp) -> None:
    backend = backend_for(server, DISPATCH_LANGFUSE_SECRET_KEY="sk-lf-wrong-secret-42")  # noqa: S106
    with pytest.raises(CredentialsError) as info:
        backend.deliver([chat_run(str(uuid.uuid4()))], _ctx())
    backend.close()
    message = str(info.value)
    assert "DISPATCH_LANGFUSE_PUBLIC_KEY" in message and "DISPATCH_LANGFUSE_SECRET_KEY" in message
    assert "sk-lf-wrong-secret-42" not in message


def test_the_sdk_variables_are_honoured(server: FakeOtlp) -> None:
    for env in (
        {"LANGFUSE_BASE_URL": host(server), "LANGFUSE_HOST": "http://127.0.0.1:9"},
        {"LANGFUSE_HOST": host(server)},
    ):
        settings = load_settings(
            {**env, "LANGFUSE_PUBLIC_KEY": PUBLIC_KEY, "LANGFUSE_SECRET_KEY": SECRET_KEY}
        )
        backend = LangfuseBackend.from_settings("langfuse", settings)
        assert backend.deliver([chat_run(str(uuid.uuid4()))], _ctx()).deferred == {}
        backend.close()
    assert server.violations == []
    settings = load_settings({"LANGFUSE_PUBLIC_KEY": "pk", "LANGFUSE_SECRET_KEY": "sk"})
    assert create_backend("langfuse", settings).options.endpoint == DEFAULT_HOST + OTEL_PATH  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({}, "DISPATCH_LANGFUSE_PUBLIC_KEY"),
        ({"DISPATCH_LANGFUSE_PUBLIC_KEY": "pk"}, "DISPATCH_LANGFUSE_SECRET_KEY"),
        ({"LANGFUSE_PUBLIC_KEY": "pk", "LANGFUSE_SECRET_KEY": "sk", "LANGFUSE_HOST": "nohost"},
         "LANGFUSE_HOST"),
        ({"LANGFUSE_PUBLIC_KEY": "pk", "LANGFUSE_SECRET_KEY": "sk",
          "DISPATCH_LANGFUSE_COMPRESSION": "br"}, "DISPATCH_LANGFUSE_COMPRESSION"),
    ],
)  # fmt: skip
def test_bad_configuration_names_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        create_backend("langfuse", load_settings(env))


def test_end_to_end_every_run_once_without_secrets(
    redis_url: str, r: redis.Redis, tmp_path: Path, vectors: dict[str, dict[str, Any]]
) -> None:
    with FakeOtlp(auth=BASIC, langfuse=True, path=OTEL_PATH) as server:
        settings, app, _ = make(
            redis_url, tmp_path, DISPATCH_LANGFUSE_HOST=host(server),
            DISPATCH_LANGFUSE_PUBLIC_KEY=PUBLIC_KEY, DISPATCH_LANGFUSE_SECRET_KEY=SECRET_KEY,
            DISPATCH_LANGFUSE_COMPRESSION="gzip",
        )  # fmt: skip
        doc = orjson.loads(event(20))
        doc["RequestBody"] = base64.b64encode(orjson.dumps({
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "key sk-proj-abcdefghijklmnop1234"}],
        })).decode()  # fmt: skip
        datas = [v["xadd_fields"]["data"].encode() for v in vectors.values()]
        xadd_all(r, STREAM, [*datas, *(event(i) for i in range(20)), orjson.dumps(doc)])
        delivered = sum(v["expected_record"]["delivered"] for v in vectors.values())
        with bridge(settings, app, "langfuse"), worker(app, "langfuse"):
            wait_for(lambda: len(server.spans) == delivered + 21, what="all generations")
            wait_for(lambda: r.hlen(c.inflight_key("langfuse")) == 0, what="batches finished")
        assert server.violations == []
        assert set(server.posts.values()) == {1}
        raw = b"".join(received.body for received in server.received)
        assert all(h["content-encoding"] == "gzip" for h, _ in server.requests)
        assert b"sk-proj-abcdefghijklmnop1234" not in raw  # (gzip: checked decoded, below)
        spans = b"".join(s.span.SerializeToString() for s in server.spans.values())
        assert b"sk-proj-abcdefghijklmnop1234" not in spans


def test_bad_keys_pause_the_service_and_the_fixed_keys_deliver_every_run_once(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    """A wrong secret: nothing dead-letters, the service is paused naming the variables.
    The operator fixes the key and restarts the worker: every run arrives exactly once."""
    with FakeOtlp(auth=BASIC, langfuse=True, path=OTEL_PATH) as server:
        common = {
            "DISPATCH_LANGFUSE_HOST": host(server), "DISPATCH_LANGFUSE_PUBLIC_KEY": PUBLIC_KEY,
            "DISPATCH_CREDENTIALS_PROBE_INTERVAL": "1", "DISPATCH_BATCH_SIZE": "10",
        }  # fmt: skip
        wrong = "sk-lf-wrong-secret-0000"
        settings, app, _ = make(redis_url, tmp_path, **common, DISPATCH_LANGFUSE_SECRET_KEY=wrong)
        xadd_all(r, STREAM, [event(i) for i in range(30)])
        with bridge(settings, app, "langfuse"), worker(app, "langfuse"):
            wait_for(lambda: r.exists(c.pause_key("langfuse")) == 1, what="the pause")
            refused = len(server.received)
        reason = r.hget(c.pause_key("langfuse"), "reason")
        assert reason is not None and b"DISPATCH_LANGFUSE_SECRET_KEY" in reason
        assert wrong.encode() not in reason
        assert r.xlen(c.deadletter_key("langfuse")) == 0 and server.spans == {}
        assert refused <= 4  # a probe, not a flood

        settings, app, _ = make(
            redis_url, tmp_path, **common, DISPATCH_LANGFUSE_SECRET_KEY=SECRET_KEY
        )
        with bridge(settings, app, "langfuse"), worker(app, "langfuse"):
            wait_for(lambda: len(server.spans) == 30, timeout=60, what="every run delivered")
            wait_for(lambda: r.hlen(c.inflight_key("langfuse")) == 0, what="batches finished")
        assert set(server.posts.values()) == {1}
        assert r.xlen(c.deadletter_key("langfuse")) == 0
        assert r.exists(c.pause_key("langfuse")) == 0
