"""A third-party backend, packaged outside this repository: the test writes the plugin (its
own ``pyproject.toml`` with an entry point, and one module built on the public HTTP toolkit
``dispatch_celery.backends.http``), pip-installs it into this virtualenv, and delivers
through it with a real bridge and a real ``celery worker`` process. Uninstalled afterwards.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
from pytest_httpserver import HTTPServer
from werkzeug import Request as WRequest
from werkzeug import Response

from dispatch_celery import constants as c
from dispatch_celery import stats
from tests.harness import (
    bridge,
    event,
    make,
    spawn_worker,
    stop_proc,
    subprocess_env,
    wait_for,
    xadd_all,
)

DIST = "dispatch-example-collector"

# The complete plugin, as a plugin author writes it (the README shows the same text).
PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "dispatch-example-collector"
version = "0.1.0"
dependencies = ["dispatch-celery"]

[project.entry-points."dispatch_celery.backends"]
collector = "example_collector:CollectorBackend"

[tool.setuptools]
py-modules = ["example_collector"]
"""

MODULE = '''\
"""Runs as NDJSON to a collector; it answers {"retry": {run_id: reason}} for runs to resend."""

import orjson

from dispatch_celery.backends.http import DELIVERED, HttpBackend, Outcome, Request


class CollectorBackend(HttpBackend):
    name = "collector"  # DISPATCH_COLLECTOR_ENDPOINT, DISPATCH_COLLECTOR_API_KEY (Bearer)

    def encode(self, runs):
        body = b"".join(orjson.dumps(run.record) + b"\\n" for run in runs)
        yield Request(tuple(run.id for run in runs), body, "application/x-ndjson")

    def read(self, request, reply):
        retry = orjson.loads(reply.body or b"{}").get("retry", {})
        return {
            run_id: Outcome.transient(retry[run_id]) if run_id in retry else DELIVERED
            for run_id in request.runs
        }
'''

TOKEN = "collector-token-0123456789"  # noqa: S105 (a test secret)


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[Path]:
    src = tmp_path / "plugin"
    src.mkdir()
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "example_collector.py").write_text(MODULE)
    assert len(PYPROJECT.splitlines()) + len(MODULE.splitlines()) < 40
    done = _pip("install", "--no-deps", "--no-build-isolation", str(src))
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        yield src
    finally:
        _pip("uninstall", "-y", DIST)


def test_a_third_party_plugin_delivers_through_the_pipeline(
    plugin: Path, httpserver: HTTPServer, redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    lock = threading.Lock()
    posts: dict[str, int] = {}
    retry_once = {"00000000-0000-4000-8000-000000000007"}
    problems: list[str] = []

    def handler(request: WRequest) -> Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            problems.append("bad Authorization")
            return Response("{}", 401)
        if request.headers.get("Content-Type") != "application/x-ndjson":
            problems.append("bad Content-Type")
        retry = {}
        with lock:
            for line in request.get_data().splitlines():
                run_id = orjson.loads(line)["id"]
                posts[run_id] = posts.get(run_id, 0) + 1
                if run_id in retry_once:
                    retry_once.discard(run_id)
                    retry[run_id] = "busy, try again"
        return Response(orjson.dumps({"retry": retry}), 200, content_type="application/json")

    httpserver.expect_request("/runs", method="POST").respond_with_handler(handler)
    settings, app, env = make(
        redis_url, tmp_path, DISPATCH_BATCH_SIZE="10",
        DISPATCH_COLLECTOR_ENDPOINT=httpserver.url_for("/runs"), DISPATCH_COLLECTOR_API_KEY=TOKEN,
    )  # fmt: skip
    listed = subprocess.run(
        [sys.executable, "-m", "dispatch_celery", "backends"],
        env=subprocess_env(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "collector    configured" in listed.stdout, listed.stdout + listed.stderr

    total = 40
    xadd_all(r, "llm-proxy-events", [event(i) for i in range(total)])
    log = tmp_path / "worker.log"
    proc = spawn_worker(env, "collector", log)
    try:
        with bridge(settings, app, "collector"):
            wait_for(lambda: len(posts) == total, timeout=60, what="every run at the collector")
            wait_for(lambda: r.hlen(c.inflight_key("collector")) == 0, what="batches finished")
    finally:
        stop_proc(proc)
    assert not problems
    assert {run_id for run_id, n in posts.items() if n > 1} == {
        "00000000-0000-4000-8000-000000000007"
    }  # the retry re-sent only the run the collector asked for
    assert sum(posts.values()) == total + 1
    assert stats.read(r, "collector")["delivered"] == total
    assert r.xlen(c.deadletter_key("collector")) == 0
    assert TOKEN not in log.read_text()
