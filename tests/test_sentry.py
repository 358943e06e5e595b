"""Sentry: bridges and workers report errors to a real (local) ingest endpoint, scrubbed.

The real sentry-sdk sends to a pytest-httpserver that plays Sentry's ingest
(``POST /api/1/envelope/``); the tests decode the envelopes and look for what must and
must not be in them.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import brotli
import orjson
import redis
from pytest_httpserver import HTTPServer

from dispatch_celery import constants as c
from dispatch_celery.backend import DeliveryContext, DeliveryReport, Run
from dispatch_celery.ops.logs import Scrubber
from dispatch_celery.ops.sentry import EventScrubber, init_sentry
from dispatch_celery.settings import Settings, load_settings
from tests.harness import (
    REPO,
    bridge,
    event,
    make,
    spawn_worker,
    stop_proc,
    subprocess_env,
    wait_for,
    xadd_all,
)

STREAM = "llm-proxy-events"
PLANTED = "sk-live-SECRET123"  # a credential in an exception message
API_KEY = "leaky-configured-key-0042"  # a configured credential that matches no pattern
PROMPT = "PROMPT-CONTENT-MARKER"


class LeakyBackend:
    """A backend whose error message carries credentials and whose locals carry the events:
    ``DISPATCH_BACKEND_LEAKY=tests.test_sentry:LeakyBackend``."""

    name: ClassVar[str] = "leaky"

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key

    @classmethod
    def from_settings(cls, service: str, settings: Settings) -> LeakyBackend:
        return cls(settings.option(service, "API_KEY") or "")

    def deliver(self, runs: Sequence[Run], ctx: DeliveryContext) -> DeliveryReport:
        bodies = [orjson.dumps(run.record).decode() for run in runs]  # a local with content
        raise RuntimeError(
            f"upstream refused key {self.api_key} (Authorization: Bearer {PLANTED}); "
            f"{len(bodies)} runs"
        )

    def close(self) -> None:
        pass


def _envelopes(server: HTTPServer) -> list[list[dict[str, Any]]]:
    """Every envelope received so far, as its list of JSON lines (headers and payloads)."""
    out = []
    for request, _ in list(server.log):
        body = request.get_data()
        encoding = request.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "br":
            body = brotli.decompress(body)
        items = []
        for line in body.splitlines():
            if line.strip():
                try:
                    items.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    items.append({"_raw": line.decode("utf-8", "replace")})
        out.append(items)
    return out


def _events(server: HTTPServer) -> list[dict[str, Any]]:
    found = []
    for items in _envelopes(server):
        for i, item in enumerate(items[:-1]):
            if item.get("type") == "event":
                found.append(items[i + 1])
    return found


def _raw(server: HTTPServer) -> str:
    return "\n".join(orjson.dumps(items).decode() for items in _envelopes(server))


def _ingest(httpserver: HTTPServer) -> str:
    httpserver.expect_request("/api/1/envelope/", method="POST").respond_with_json({})
    return f"http://public@127.0.0.1:{httpserver.port}/1"


def test_init_sentry_does_nothing_without_a_dsn() -> None:
    assert init_sentry(load_settings({}), "bridge") is False


def test_event_scrubber_drops_locals_request_and_credentials() -> None:
    hooks = EventScrubber(Scrubber([API_KEY]))
    event = {
        "message": f"refused {API_KEY}",
        "request": {"data": PROMPT, "headers": {"Authorization": "Bearer abc"}},
        "extra": {"sys.argv": ["flower", "--basic-auth=admin:pw"], "note": f"key={PLANTED}"},
        "exception": {
            "values": [
                {
                    "value": f"Bearer {PLANTED}",
                    "stacktrace": {"frames": [{"function": "deliver", "vars": {"bodies": PROMPT}}]},
                }
            ]
        },
        "breadcrumbs": {"values": [{"message": "x" * 5000}]},
    }
    cleaned = hooks.before_send(event, {})  # type: ignore[arg-type]
    text = orjson.dumps(cleaned).decode()
    for gone in (API_KEY, PLANTED, PROMPT, "admin:pw", "x" * 600):
        assert gone not in text
    assert "request" not in text and "vars" not in text
    assert "[REDACTED]" in text and "deliver" in text


def test_a_bridge_process_reports_an_unhandled_error_scrubbed(
    httpserver: HTTPServer, tmp_path: Path
) -> None:
    dsn = _ingest(httpserver)
    script = (
        "from dispatch_celery.ops.sentry import init_sentry\n"
        "from dispatch_celery.settings import load_settings\n"
        "assert init_sentry(load_settings(), 'bridge')\n"
        "import logging; logging.getLogger('dispatch_celery.ingest.bridge').error(\n"
        f"    'cannot reach redis://:redis-password-77@redis:6379/0')\n"
        f"raise RuntimeError('Redis said: token {PLANTED} / key {API_KEY}')\n"
    )
    env = subprocess_env({"SENTRY_DSN": dsn, "DISPATCH_HELICONE_API_KEY": API_KEY})
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr.decode()
    wait_for(lambda: len(_events(httpserver)) >= 2, timeout=10, what="two Sentry events")
    events = _events(httpserver)
    crash = next(e for e in events if e.get("exception"))
    assert crash["exception"]["values"][-1]["type"] == "RuntimeError"
    assert crash["tags"]["component"] == "bridge"
    assert "[REDACTED]" in crash["exception"]["values"][-1]["value"]
    raw = _raw(httpserver)
    for secret in (PLANTED, API_KEY, "redis-password-77"):
        assert secret not in raw


def test_a_worker_reports_a_backend_failure_scrubbed(
    httpserver: HTTPServer, redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    dsn = _ingest(httpserver)
    settings, app, env = make(
        redis_url,
        tmp_path,
        SENTRY_DSN=dsn,
        DISPATCH_RETRY_BUDGET="1",  # the failing backend's runs dead-letter after 1 s
        DISPATCH_BACKEND_LEAKY="tests.test_sentry:LeakyBackend",
        DISPATCH_LEAKY_API_KEY=API_KEY,
    )
    proc = spawn_worker(env, "leaky", tmp_path / "worker.log")  # prefork, like production
    try:
        with bridge(settings, app, "leaky"):
            xadd_all(r, STREAM, [event(i, content=PROMPT) for i in range(3)])
            wait_for(lambda: r.xlen(c.deadletter_key("leaky")) == 3, what="dead letters")
        wait_for(
            lambda: any(e.get("exception") for e in _events(httpserver)),
            timeout=15,
            what="the worker's Sentry event",
        )
        time.sleep(0.5)  # let any follow-up envelope arrive before looking for leaks
    finally:
        stop_proc(proc)
    events = _events(httpserver)
    report = next(e for e in events if e.get("exception"))
    assert report["tags"]["component"] == "worker"
    assert report["exception"]["values"][-1]["type"] == "RuntimeError"
    assert report["logger"] == "dispatch_celery.delivery.attempt"
    raw = _raw(httpserver)
    for leaked in (PLANTED, API_KEY, PROMPT, "reply 0"):
        assert leaked not in raw, leaked
    assert '"vars"' not in raw  # no frame locals at all
