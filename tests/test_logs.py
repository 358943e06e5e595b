"""Logs: one structured line per batch outcome, JSON on demand, nothing sensitive in them."""

from __future__ import annotations

import ast
import base64
import io
import logging
import sys
from pathlib import Path
from typing import Any

import orjson
import redis

from dispatch_celery import constants as c
from dispatch_celery.ops.logs import JsonFormatter, Scrubber, TextFormatter, known_secrets
from dispatch_celery.settings import load_settings
from tests.harness import (
    bridge,
    event,
    make,
    spawn_worker,
    stop_proc,
    wait_for,
    xadd_all,
)

STREAM = "llm-proxy-events"
CREDENTIAL = "flaky-credential-value-77"  # DISPATCH_FLAKY_API_KEY: matches no pattern
PROMPT = "PROMPT-CONTENT-MARKER"


def count_lines(path: Path) -> int:
    """Complete lines a worker process has written so far (it may be writing one now)."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _record(msg: str, *args: Any, exc: bool = False, **extra: Any) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError(f"upstream refused Authorization: Bearer sk-live-abc123def456 {msg}")
        except RuntimeError:
            exc_info = sys.exc_info()
    record = logging.LogRecord(
        "dispatch_celery.test", logging.ERROR, __file__, 1, msg, args, exc_info
    )
    for k, v in extra.items():
        setattr(record, k, v)
    return record


def test_json_lines_keep_fields_and_scrub_credentials() -> None:
    fmt = JsonFormatter(Scrubber(["plain-secret-42"]))
    line = fmt.format(
        _record(
            "key %s rejected",
            "plain-secret-42",
            exc=True,
            service="helicone",
            batch_id="1-0_2-0",
            events=3,
            url="redis://:hunter2hunter2@redis:6379/0",
            header="x-api-key: abcdef123456",
        )
    )
    doc = orjson.loads(line)
    assert doc["level"] == "error" and doc["logger"] == "dispatch_celery.test"
    assert (doc["service"], doc["batch_id"], doc["events"]) == ("helicone", "1-0_2-0", 3)
    assert doc["msg"] == "key [REDACTED] rejected"
    assert doc["url"] == "redis://:[REDACTED]@redis:6379/0"
    assert doc["header"] == "x-api-key: [REDACTED]"
    assert "RuntimeError" in doc["exc"] and "Bearer [REDACTED]" in doc["exc"]
    for secret in ("plain-secret-42", "hunter2hunter2", "abcdef123456", "sk-live-abc123def456"):
        assert secret not in line


def test_text_lines_scrub_credentials_and_keep_ordinary_words() -> None:
    line = TextFormatter(Scrubber(["plain-secret-42"])).format(
        _record(
            "batch delivered; token=tok_0123456789 total_tokens=7 api_key: plain-secret-42",
            outcome="delivered",
        )
    )
    assert "tok_0123456789" not in line and "plain-secret-42" not in line
    assert "total_tokens=7" in line and "outcome=delivered" in line
    assert "token=[REDACTED]" in line


def test_known_secrets_are_the_credential_settings() -> None:
    settings = load_settings(
        {
            "DISPATCH_REDIS_URL": "redis://:redispass99@localhost:6379/0",
            "DISPATCH_HELICONE_API_KEY": "sk-helicone-abc",
            "DISPATCH_LUNARY_API_KEY": "lunary-key-1234",
            "FLOWER_BASIC_AUTH": "admin:flower-pw-1,ops:flower-pw-2",
            "DISPATCH_BATCH_SIZE": "100",
            "DISPATCH_HELICONE_PROVIDER_URL": "https://api.openai.com",
        }
    )
    found = set(known_secrets(settings))
    assert {
        "redispass99",
        "sk-helicone-abc",
        "lunary-key-1234",
        "flower-pw-1",
        "flower-pw-2",
    } <= found
    assert "100" not in found and "https://api.openai.com" not in found


def test_configure_logging_json_to_a_stream() -> None:
    from dispatch_celery.ops.logs import configure_logging

    out = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("info", "json", stream=out, secrets=["s3cr3t-value"])
        logging.getLogger("dispatch_celery.x").info("using s3cr3t-value", extra={"n": 1})
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    doc = orjson.loads(out.getvalue().strip())
    assert doc["msg"] == "using [REDACTED]" and doc["n"] == 1


def test_worker_logs_a_json_line_per_batch_outcome_without_content_or_credentials(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    settings, app, env = make(
        redis_url,
        tmp_path,
        DISPATCH_LOG_FORMAT="json",
        DISPATCH_FLAKY_API_KEY=CREDENTIAL,
        DISPATCH_BATCH_SIZE="10",
    )
    log = tmp_path / "worker.log"
    proc = spawn_worker(env, "flaky", log)
    try:
        r.hset("test:flaky:flaky", "transient", 1)  # first attempt retried, second delivered
        datas = [event(i, content=PROMPT) for i in range(10)]
        with bridge(settings, app, "flaky"):
            xadd_all(r, STREAM, datas)
            wait_for(lambda: count_lines(tmp_path / "flaky.jsonl") == 10, what="delivery")
            r.hset("test:flaky:flaky", "permanent", 1)  # next batch refused for good
            xadd_all(r, STREAM, [event(i, content=PROMPT) for i in range(10, 15)])
            wait_for(lambda: r.xlen(c.deadletter_key("flaky")) == 5, what="dead letters")
            wait_for(lambda: r.hlen(c.inflight_key("flaky")) == 0, what="batches finished")
    finally:
        stop_proc(proc)
    text = log.read_text()
    lines = [orjson.loads(ln) for ln in text.splitlines() if ln.startswith("{")]
    batches = [d for d in lines if d["logger"] == "dispatch_celery.delivery.task"]
    # a retry due before the outage gate the failure closed has reopened waits for it
    # ("gated": parked, nothing sent); the attempts themselves are these three
    batches = [d for d in batches if d["outcome"] != "gated"]
    assert [d["outcome"] for d in batches] == ["retry", "delivered", "dead-lettered"]
    for d in batches:
        assert d["service"] == "flaky" and d["batch_id"] and isinstance(d["duration_ms"], float)
        assert d["level"] == "info" and d["ts"].endswith("Z")
    assert [(d["events"], d["attempt"]) for d in batches] == [(10, 1), (10, 2), (5, 1)]

    # Celery's own "received" / "succeeded" lines: the task arguments are only
    # (service, batch id, event count).
    received = [
        d for d in lines if d["msg"].startswith("Task dispatch.deliver[") and "received" in d["msg"]
    ]
    assert len(received) >= 3
    for d in received:
        service, batch_id, count = ast.literal_eval(d["data"]["args"])
        assert service == "flaky" and isinstance(batch_id, str) and isinstance(count, int)

    # Nothing of the events' content, nothing of the credentials, at any level.
    body_b64 = orjson.loads(datas[0])["RequestBody"]
    assert PROMPT not in text and "reply 0" not in text
    assert body_b64 not in text and base64.b64decode(body_b64).decode() not in text
    assert CREDENTIAL not in text
