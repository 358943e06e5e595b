"""Flower with flower/flowerconfig.py: authentication required, batches visible (and nothing
of their content), state kept across restarts, and the tasks page seen in a real browser."""

from __future__ import annotations

import ast
import base64
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import redis

from dispatch_celery import constants as c
from tests.conftest import free_port, need_server
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
AUTH = "ops:flower-pw-4711"
PROMPT = "PROMPT-CONTENT-MARKER"
CONF = str(REPO / "flower" / "flowerconfig.py")
ARTIFACTS = REPO / "artifacts"


def count_lines(path: Path) -> int:
    """Complete lines a worker process has written so far (it may be writing one now)."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


def flower_cmd() -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "dispatch_celery",
        "flower",
        f"--conf={CONF}",
        "--address=127.0.0.1",
    ]


def get(url: str, auth: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)  # noqa: S310 (a local test URL)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except OSError:
        return 0, b""


@contextmanager
def flower(env: dict[str, str], log: Path) -> Iterator[str]:
    """Flower as ``web`` runs it: port from $PORT; yields its base URL once it is
    listening and its event receiver is connected."""
    port = free_port()
    full = subprocess_env({**env, "PORT": str(port)})
    mark = log.stat().st_size if log.exists() else 0
    proc = subprocess.Popen(
        flower_cmd(),
        env=full,
        cwd=REPO,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: proc.poll() is not None or get(f"{base}/healthcheck")[0] == 200,
            timeout=30,
            what="Flower listening",
        )
        assert proc.poll() is None, log.read_text()
        wait_for(
            lambda: "Connected to" in log.read_text()[mark:],
            timeout=15,
            what="Flower's event receiver",
        )
        _await_events(env, base)
        yield base
    finally:
        assert stop_proc(proc, timeout=15) == 0  # SIGTERM: a clean exit that saves the state


def _await_events(env: dict[str, str], base: str) -> None:
    """Until Flower shows a probe's heartbeat: "Connected to" is logged before its receiver
    has subscribed, and events published in between (a fast worker's) are lost to it."""
    from celery import Celery

    probe = Celery(broker=env.get("DISPATCH_BROKER_URL") or env["DISPATCH_REDIS_URL"])
    with probe.connection_for_write() as conn:
        dispatcher = probe.events.Dispatcher(conn, hostname="flower-probe@tests")

        def seen() -> bool:
            dispatcher.send("worker-heartbeat", freq=2.0, active=0, processed=0)
            status, body = get(f"{base}/workers?json=1", env.get("FLOWER_BASIC_AUTH"))
            return status == 200 and b"flower-probe@tests" in body

        wait_for(seen, timeout=15, what="Flower receiving events")
        dispatcher.close()


def api_tasks(base: str) -> dict[str, dict[str, Any]]:
    status, body = get(f"{base}/api/tasks", AUTH)
    assert status == 200, body
    tasks: dict[str, dict[str, Any]] = orjson.loads(body)
    return tasks


def test_flower_refuses_to_start_without_authentication(tmp_path: Path) -> None:
    base = {"DISPATCH_REDIS_URL": "redis://127.0.0.1:1/0", "FLOWER_DB": str(tmp_path / "f.db")}
    cases = {
        "none": {},
        "half-oauth": {"FLOWER_AUTH": ".*@example.com"},
        "no-password": {"FLOWER_BASIC_AUTH": "admin"},
    }
    procs = {
        name: subprocess.Popen(
            [*flower_cmd(), f"--port={free_port()}"],
            env=subprocess_env({**base, **extra}),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for name, extra in cases.items()
    }
    out = {name: p.communicate(timeout=60)[0].decode() for name, p in procs.items()}
    assert {name: p.returncode for name, p in procs.items()} == dict.fromkeys(cases, 2), out
    assert "refusing to start without authentication" in out["none"]
    assert "FLOWER_BASIC_AUTH=user:password" in out["none"]
    assert "DISPATCH_FLOWER_ALLOW_OPEN=1" in out["none"]
    assert "FLOWER_AUTH_PROVIDER" in out["half-oauth"]
    assert "user:password" in out["no-password"]


def test_an_open_flower_needs_the_explicit_switch(redis_url: str, tmp_path: Path) -> None:
    env = {
        "DISPATCH_REDIS_URL": redis_url,
        "FLOWER_DB": str(tmp_path / "flower.db"),
        "DISPATCH_FLOWER_ALLOW_OPEN": "1",
    }
    with flower(env, tmp_path / "flower.log") as base:
        assert get(f"{base}/tasks")[0] == 200
    assert "no authentication configured" in (tmp_path / "flower.log").read_text()


def _deliver_batches(r: redis.Redis, tmp_path: Path, n: int) -> None:
    xadd_all(r, STREAM, [event(i, content=PROMPT) for i in range(n)])
    wait_for(lambda: count_lines(tmp_path / "events.jsonl") == n, what="delivery")
    wait_for(lambda: r.hlen(c.inflight_key("file")) == 0, what="batches finished")


def test_flower_lists_batches_behind_auth_and_keeps_them_across_restarts(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    settings, app, env = make(redis_url, tmp_path, DISPATCH_BATCH_SIZE="10")
    fenv = {**env, "FLOWER_BASIC_AUTH": AUTH, "FLOWER_DB": str(tmp_path / "state" / "flower.db")}
    log = tmp_path / "flower.log"
    worker_proc = spawn_worker(env, "file", tmp_path / "worker.log")
    try:
        with flower(fenv, log) as base:
            assert get(f"{base}/tasks")[0] == 401
            assert get(f"{base}/api/tasks")[0] == 401
            assert get(f"{base}/tasks", "ops:wrong")[0] == 401
            with bridge(settings, app, "file"):
                _deliver_batches(r, tmp_path, 25)
            wait_for(lambda: len(api_tasks(base)) == 3, timeout=15, what="3 tasks in Flower")
            seen = api_tasks(base)
            status, page = get(f"{base}/tasks", AUTH)
            assert status == 200 and b"dispatch.deliver" not in page  # rendered later by JS
    finally:
        stop_proc(worker_proc)
    args = [ast.literal_eval(t["args"]) for t in seen.values()]  # Flower shows the tuple's repr
    assert sorted((a[0], a[2]) for a in args) == [("file", 5), ("file", 10), ("file", 10)]
    assert all(isinstance(a[1], str) and len(a) == 3 for a in args)
    assert all(t["name"] == c.TASK_DELIVER and t["state"] == "SUCCESS" for t in seen.values())
    raw = orjson.dumps(seen).decode()
    assert PROMPT not in raw and "reply 1" not in raw
    assert (tmp_path / "state").is_dir()  # the state directory was created for the db

    # a restarted Flower (no worker running now) still shows them: persistent state
    with flower(fenv, log) as base:
        again = api_tasks(base)
    assert set(again) == set(seen)
    assert {u: t["args"] for u, t in again.items()} == {u: t["args"] for u, t in seen.items()}


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        need_server("chromium (apt-get install -y chromium)")
    return str(found)


def _browse(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            *extra,
            url,
        ],
        capture_output=True,
        timeout=60,
        check=False,
        env={**os.environ, "HOME": str(profile)},
    )


def test_the_tasks_page_in_a_browser_shows_the_delivered_batches(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    _chromium()
    settings, app, env = make(redis_url, tmp_path, DISPATCH_BATCH_SIZE="10")
    fenv = {**env, "FLOWER_BASIC_AUTH": AUTH, "FLOWER_DB": str(tmp_path / "flower.db")}
    worker_proc = spawn_worker(env, "file", tmp_path / "worker.log")
    try:
        with flower(fenv, tmp_path / "flower.log") as base:
            with bridge(settings, app, "file"):
                _deliver_batches(r, tmp_path, 15)
            wait_for(lambda: len(api_tasks(base)) == 2, timeout=15, what="2 tasks in Flower")
            batches = [ast.literal_eval(t["args"])[1] for t in api_tasks(base).values()]
            host = base.removeprefix("http://")
            # The page is rendered by JavaScript from /tasks/datatable: --dump-dom prints the
            # DOM after the scripts ran, so the rows below were fetched by the browser itself.
            dom = _browse(f"http://{AUTH}@{host}/tasks", tmp_path / "profile", "--dump-dom")
            anonymous = _browse(f"{base}/tasks", tmp_path / "profile2", "--dump-dom")
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "flower-tasks.png"
            shot.unlink(missing_ok=True)
            _browse(
                f"http://{AUTH}@{host}/tasks",
                tmp_path / "profile3",
                "--hide-scrollbars",
                "--window-size=1600,700",
                f"--screenshot={shot}",
            )
    finally:
        stop_proc(worker_proc)
    page = dom.stdout.decode()
    assert dom.returncode == 0, dom.stderr.decode()[-2000:]
    assert "dispatch.deliver" in page
    for batch in batches:
        assert f"('file', '{batch}', " in page, batch
    assert "Showing 1 to 2 of 2" in page
    assert PROMPT not in page
    assert all(batch not in anonymous.stdout.decode() for batch in batches)
    assert shot.exists() and shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot of Flower's tasks page: {shot}")
