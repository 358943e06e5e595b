"""sample_events: realistic, deterministic, Go-shaped events that decode cleanly."""

from __future__ import annotations

import collections
import uuid

import orjson

from dispatch_celery.cli.sample import event_json, sample_events
from dispatch_celery.decode.events import decode_entry, header
from dispatch_celery.decode.records import build_record

GO_ORDER = [
    "LogID", "RequestID", "Method", "Path", "Status", "Duration", "ResponseHeaders",
    "ResponseBody", "RequestBody",
]  # fmt: skip


def test_deterministic_for_a_seed() -> None:
    assert list(sample_events(200, seed=3)) == list(sample_events(200, seed=3))
    assert list(sample_events(200, seed=3)) != list(sample_events(200, seed=4))


def test_events_are_go_shaped_and_average_about_1_8_kb() -> None:
    events = list(sample_events(5000, seed=1))
    assert len(events) == 5000
    average = sum(map(len, events)) / len(events)
    assert 1600 < average < 2000
    for data in events[:500]:
        obj = orjson.loads(data)
        assert list(obj) == GO_ORDER
        assert list(obj["ResponseHeaders"]) == sorted(obj["ResponseHeaders"])


def test_every_event_decodes_and_builds_a_record() -> None:
    kinds: collections.Counter[str] = collections.Counter()
    request_ids = set()
    for i, data in enumerate(sample_events(3000, seed=2)):
        event = decode_entry("llm-proxy-events", f"1736937000123-{i}", data)
        rec = build_record(event, max_body_bytes=1 << 20)
        if event.request_id:
            assert uuid.UUID(event.request_id).version == 4
            assert header(event, "X-Request-Id") in (None, event.request_id)
            request_ids.add(event.request_id)
        if rec["streamed"]:
            kinds["sse"] += 1
            assert rec["usage"] is not None
            assert rec["output"]["choices"][0]["message"]["content"]
        elif header(event, "Content-Encoding") == "gzip":
            kinds["gzip"] += 1
            assert rec["output"]["object"] == "chat.completion"
        elif event.method == "OPTIONS":
            kinds["options"] += 1
            assert event.request_id == ""
        elif event.method == "GET":
            kinds["models"] += 1
        elif event.status >= 400:
            kinds["error"] += 1
            assert rec["error"] is not None
        elif event.path == "/v1/embeddings":
            kinds["embeddings"] += 1
            assert rec["usage"] is not None
        else:
            kinds["chat"] += 1
            assert rec["usage"] is not None
            assert rec["model"]
    assert len(request_ids) == sum(kinds.values()) - kinds["options"]
    share = {kind: count / 3000 for kind, count in kinds.items()}
    assert 0.6 < share["chat"] < 0.76
    for kind in ("sse", "gzip", "embeddings", "error", "models", "options"):
        assert 0.005 < share[kind] < 0.16, kind


def test_event_json_escapes_like_go() -> None:
    data = event_json(request_id="r", headers={"X-Note": ["<a> & b"]}, response_body=b"\x00")
    assert b'"X-Note":["\\u003ca\\u003e \\u0026 b"]' in data
    assert b'"ResponseBody":"AA=="' in data
    assert b'"RequestBody":null' in data
    assert decode_entry("s", "1-0", data).response_headers["X-Note"] == ["<a> & b"]
