"""The ``webhook`` backend against a local receiver that verifies every request with the
``standardwebhooks`` package (the Standard Webhooks reference implementation), not with
our own verifier."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from dispatch_celery import constants as c
from dispatch_celery.backend import Run
from dispatch_celery.backends.webhook import WebhookBackend
from dispatch_celery.decode.redact import Redactor
from dispatch_celery.errors import ConfigError, CredentialsError, TransientDeliveryError
from dispatch_celery.registry import create_backend
from dispatch_celery.settings import load_settings
from tests.harness import bridge, event, make, wait_for, worker, xadd_all, xrange
from tests.vendor_servers import FakeVendor, Fault, RecordingContext, chat_run, chat_runs

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
STREAM = "llm-proxy-events"


class FakeReceiver(FakeVendor):
    """A webhook endpoint: verifies the signature, stores runs by id, can refuse runs."""

    path = "/hooks/llm"

    def __init__(self, secret: str = SECRET) -> None:
        super().__init__(api_key="")
        self.webhook = Webhook(secret)
        self.runs: dict[str, dict[str, Any]] = {}
        self.posts: dict[str, int] = {}
        self.ids: list[str] = []
        self.refuse: set[str] = set()  # a request holding one of these run ids -> 422
        self.bearer: str | None = None

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        try:
            payload = self.webhook.verify(body, headers)
        except WebhookVerificationError as exc:
            self.violation(f"signature: {exc}")
            return 401, {}, b'{"error":"bad signature"}'
        if self.bearer is not None and headers.get("authorization") != f"Bearer {self.bearer}":
            return 403, {}, b'{"error":"forbidden"}'
        if headers.get("content-type") != "application/json":
            self.violation("content type")
        runs = payload["runs"]
        if any(run["id"] in self.refuse for run in runs):
            return 422, {}, b'{"error":"unprocessable run"}'
        with self.lock:
            self.ids.append(headers["webhook-id"])
            for run in runs:
                self.posts[run["id"]] = self.posts.get(run["id"], 0) + 1
                self.runs[run["id"]] = run
        return 204, {}, b""


@pytest.fixture
def server() -> Iterator[FakeReceiver]:
    with FakeReceiver() as fake:
        yield fake


def backend_for(server: FakeReceiver, **env: str) -> WebhookBackend:
    base = {"DISPATCH_WEBHOOK_URL": server.url, "DISPATCH_WEBHOOK_SECRET": SECRET}
    return WebhookBackend.from_settings("webhook", load_settings({**base, **env}))


def _ctx() -> Any:
    return RecordingContext("webhook").ctx


def test_a_batch_is_one_signed_request_of_run_records(server: FakeReceiver) -> None:
    runs = chat_runs(5)
    backend = backend_for(server)
    report = backend.deliver(runs, _ctx())
    backend.deliver(runs, _ctx())  # the same runs again: the same webhook-id
    backend.deliver(runs[:2], _ctx())  # other content: another id
    backend.close()
    assert report.rejected == {} and report.deferred == {}
    assert server.violations == []  # standardwebhooks verified every request
    assert server.ids[0] == server.ids[1] != server.ids[2]
    assert all(i.startswith("msg_") for i in server.ids)
    first = server.received[0]
    assert set(first.json) == {"runs"}
    assert [r["id"] for r in first.json["runs"]] == [run.id for run in runs]
    assert first.json["runs"][0] == json.loads(orjson.dumps(runs[0].record))
    assert abs(int(first.headers["webhook-timestamp"]) - time.time()) < 60
    assert first.headers["webhook-signature"].startswith("v1,")


def test_a_wrong_secret_fails_verification_at_the_receiver(server: FakeReceiver) -> None:
    other = "whsec_" + base64.b64encode(b"another-secret-of-32-bytes-long!").decode()
    backend = backend_for(server, DISPATCH_WEBHOOK_SECRET=other)
    with pytest.raises(CredentialsError) as info:  # the receiver answers 401
        backend.deliver(chat_runs(2), _ctx())
    backend.close()
    assert "DISPATCH_WEBHOOK_SECRET" in str(info.value)
    assert other.removeprefix("whsec_") not in str(info.value)
    assert server.runs == {}


def test_per_run_requests_headers_and_bearer(server: FakeReceiver) -> None:
    server.bearer = "tok-1234567890"
    runs = chat_runs(6)
    backend = backend_for(
        server, DISPATCH_WEBHOOK_PER_RUN="true", DISPATCH_WEBHOOK_API_KEY="tok-1234567890",
        DISPATCH_WEBHOOK_HEADERS="X-Tenant=acme%20eu",
    )  # fmt: skip
    report = backend.deliver(runs, _ctx())
    backend.close()
    assert report.rejected == {} and report.deferred == {}
    assert server.violations == []
    assert len(server.received) == 6 and len(set(server.ids)) == 6
    assert all(len(r.json["runs"]) == 1 for r in server.received)
    assert {r.headers["x-tenant"] for r in server.received} == {"acme eu"}


def test_a_refused_run_is_dead_lettered_alone_and_429_is_honoured(server: FakeReceiver) -> None:
    runs = chat_runs(8)
    server.refuse.add(runs[5].id)
    backend = backend_for(server)
    report = backend.deliver(runs, _ctx())
    assert list(report.rejected) == [runs[5].id]
    assert "HTTP 422" in report.rejected[runs[5].id]
    assert set(server.runs) == {run.id for run in runs} - {runs[5].id}
    assert set(server.posts.values()) == {1}
    server.fail_next(Fault(429, {"Retry-After": "3"}))
    rec = RecordingContext("webhook")
    with pytest.raises(TransientDeliveryError) as info:
        backend.deliver(chat_runs(2, seed="more"), rec.ctx)
    assert info.value.retry_after == 3 and rec.slowed == [3]
    backend.close()


def test_requests_are_capped_in_bytes(server: FakeReceiver) -> None:
    runs = chat_runs(20, pad=2000)
    backend = backend_for(server, DISPATCH_WEBHOOK_MAX_REQUEST_BYTES=str(12 * 1024))
    backend.deliver(runs, _ctx())
    backend.close()
    assert len(server.received) > 3
    assert all(len(r.body) <= 12 * 1024 for r in server.received)
    assert len(server.runs) == 20 and set(server.posts.values()) == {1}


def test_metadata_only_records_carry_no_bodies(server: FakeReceiver) -> None:
    run = chat_run(str(uuid.uuid4()))
    hidden = Run(Redactor(metadata_only=True).redact_record(run.record), run.event)
    backend = backend_for(server)
    backend.deliver([hidden], _ctx())
    backend.close()
    got = server.runs[run.id]
    assert got["input"] is None and got["output"] is None
    assert got["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({}, "DISPATCH_WEBHOOK_URL"),
        ({"DISPATCH_WEBHOOK_URL": "http://h/x"}, "DISPATCH_WEBHOOK_SECRET"),
        ({"DISPATCH_WEBHOOK_URL": "http://h/x", "DISPATCH_WEBHOOK_SECRET": "whsec_%%%"},
         "DISPATCH_WEBHOOK_SECRET"),
        ({"DISPATCH_WEBHOOK_URL": "http://h/x", "DISPATCH_WEBHOOK_SECRET": "whsec_c2hvcnQ="},
         "DISPATCH_WEBHOOK_SECRET"),
        ({"DISPATCH_WEBHOOK_URL": "h/x", "DISPATCH_WEBHOOK_SECRET": SECRET},
         "DISPATCH_WEBHOOK_URL"),
        ({"DISPATCH_WEBHOOK_URL": "http://h/x", "DISPATCH_WEBHOOK_SECRET": SECRET,
          "DISPATCH_WEBHOOK_PER_RUN": "maybe"}, "DISPATCH_WEBHOOK_PER_RUN"),
        ({"DISPATCH_WEBHOOK_URL": "http://h/x", "DISPATCH_WEBHOOK_SECRET": SECRET,
          "DISPATCH_WEBHOOK_HEADERS": "novalue"}, "DISPATCH_WEBHOOK_HEADERS"),
    ],
)  # fmt: skip
def test_bad_configuration_names_the_variable(env: Mapping[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names) as info:
        create_backend("webhook", load_settings(dict(env)))
    assert "%%%" not in str(info.value) and "c2hvcnQ" not in str(info.value)


def test_end_to_end_vectors_and_a_secret_through_a_real_worker(
    redis_url: str, r: redis.Redis, tmp_path: Path, vectors: dict[str, dict[str, Any]]
) -> None:
    with FakeReceiver() as server:
        settings, app, _ = make(
            redis_url, tmp_path, DISPATCH_WEBHOOK_URL=server.url,
            DISPATCH_WEBHOOK_SECRET=SECRET, DISPATCH_BATCH_SIZE="10",
        )  # fmt: skip
        doc = orjson.loads(event(30))
        doc["RequestBody"] = base64.b64encode(orjson.dumps({
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "key sk-proj-abcdefghijklmnop1234"}],
        })).decode()  # fmt: skip
        doc["ResponseHeaders"]["Set-Cookie"] = ["session=very-secret-cookie"]
        bad = "00000000-0000-4000-8000-000000000003"
        server.refuse.add(bad)
        server.fail_next(Fault(500), Fault(503))
        datas = [v["xadd_fields"]["data"].encode() for v in vectors.values()]
        xadd_all(r, STREAM, [*datas, *(event(i) for i in range(30)), orjson.dumps(doc)])
        delivered = {v["expected_record"]["id"] for v in vectors.values()
                     if v["expected_record"]["delivered"]}  # fmt: skip
        expected = delivered | {f"00000000-0000-4000-8000-{i:012d}" for i in range(31)} - {bad}
        with bridge(settings, app, "webhook"), worker(app, "webhook"):
            wait_for(lambda: set(server.runs) >= expected, what="every run at the receiver")
            wait_for(lambda: r.hlen(c.inflight_key("webhook")) == 0, what="batches finished")
        assert set(server.runs) == expected and set(server.posts.values()) == {1}
        assert server.violations == []
        letters = xrange(r, c.deadletter_key("webhook"))
        assert [f[b"event_id"].decode() for _, f in letters] == [bad]
        raw = b"".join(received.body for received in server.received)
        assert b"sk-proj-abcdefghijklmnop1234" not in raw and b"very-secret-cookie" not in raw
