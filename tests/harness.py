"""Helpers to run the real pipeline in tests: bridges in threads or processes, real Celery
workers (embedded with ``start_worker``, or ``celery worker`` subprocesses)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, cast

import orjson
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from dispatch_celery.app import create_app
from dispatch_celery.ingest.bridge import Bridge
from dispatch_celery.ingest.enqueue import Enqueuer
from dispatch_celery.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent

FAST = {
    "DISPATCH_FLUSH_INTERVAL": "0.1",
    "DISPATCH_RETRY_BASE_DELAY": "0.1",
    "DISPATCH_RETRY_MAX_DELAY": "2",
    "DISPATCH_VISIBILITY_TIMEOUT": "12",
    "DISPATCH_TASK_TIME_LIMIT": "8",
    "DISPATCH_CLAIM_IDLE": "2",
    "DISPATCH_STAGED_RECOVERY": "1",
    "DISPATCH_QUEUE_LEASE": "20",  # a task lost on its way is re-published after this
    "DISPATCH_BACKEND_FLAKY": "tests.doubles:FlakyBackend",
}


def pipeline_env(redis_url: str, tmp: Path, **extra: str) -> dict[str, str]:
    env = {
        "DISPATCH_REDIS_URL": redis_url,
        **FAST,
        "DISPATCH_FILE_PATH": str(tmp / "events.jsonl"),
        "DISPATCH_FLAKY_PATH": str(tmp / "flaky.jsonl"),
    }
    env.update(extra)
    return env


def make(redis_url: str, tmp: Path, **extra: str) -> tuple[Settings, Celery, dict[str, str]]:
    env = pipeline_env(redis_url, tmp, **extra)
    settings = load_settings(env)
    return settings, create_app(settings), env


def wait_for(pred: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@contextmanager
def worker(app: Celery, service: str, concurrency: int = 1) -> Iterator[None]:
    """A real Celery worker consuming the service's queue, in this process."""
    with start_worker(
        app,
        pool="threads",
        concurrency=concurrency,
        queues=[service],
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=20,
    ):
        yield


@contextmanager
def bridge(settings: Settings, app: Celery, service: str, **kw: Any) -> Iterator[Bridge]:
    b = Bridge(settings, service, Enqueuer(app, service), **kw)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            b.run(stop)
        except BaseException as exc:  # surfaced to the test below
            errors.append(exc)

    t = threading.Thread(target=run, name=f"bridge-{service}", daemon=True)
    t.start()
    try:
        yield b
    finally:
        stop.set()
        t.join(15)
        b.r.close()
    if errors:
        raise errors[0]


def xadd_all(
    r: redis.Redis, stream: str, datas: list[bytes], maxlen: int | None = None
) -> list[str]:
    pipe = r.pipeline(transaction=False)
    for d in datas:
        pipe.xadd(stream, {"data": d}, maxlen=maxlen, approximate=False)
    return [i.decode() for i in pipe.execute()]


def jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSONL file, read as a tailing reader must: a batch that is
    being appended right now may be visible in part, so the unterminated rest is left."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    return [orjson.loads(line) for line in complete.splitlines() if line.strip()]


def subprocess_env(env: dict[str, str]) -> dict[str, str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    full.update(env)
    full["PYTHONPATH"] = str(REPO) + os.pathsep + full.get("PYTHONPATH", "")
    return full


def dispatch(
    *args: str, env: dict[str, str], cwd: Path = REPO, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the real ``dispatch`` command (``python -m dispatch_celery``) with ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "dispatch_celery", *args],
        env=subprocess_env(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def spawn_worker(
    env: dict[str, str], service: str, log: Path, concurrency: int = 1, name: str = "w1"
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "dispatch_celery",
            "worker",
            "-Q",
            service,
            "-c",
            str(concurrency),
            "-n",
            f"{name}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "INFO",
        ],
        env=subprocess_env(env),
        cwd=REPO,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def spawn_bridge(
    env: dict[str, str], service: str, log: Path, *args: str
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "dispatch_celery", "bridge", "--service", service, *args],
        env=subprocess_env(env),
        cwd=REPO,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    proc.wait(10)


def stop_proc(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise


def event(
    n: int,
    *,
    method: str = "POST",
    status: int = 200,
    request_id: str | None = None,
    content: str = "hello",
) -> bytes:
    """A small valid llm-proxy event (chat completion)."""
    import base64

    req = orjson.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"{content} {n}"}]}
    )
    resp = orjson.dumps(
        {
            "id": f"chatcmpl-{n}",
            "object": "chat.completion",
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"reply {n}"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        }
    )
    rid = request_id if request_id is not None else f"00000000-0000-4000-8000-{n:012d}"
    return orjson.dumps(
        {
            "LogID": 0,
            "RequestID": rid,
            "Method": method,
            "Path": "/v1/chat/completions",
            "Status": status,
            "Duration": 250_000_000,
            "ResponseHeaders": {"Content-Type": ["application/json"]},
            "ResponseBody": base64.b64encode(resp).decode(),
            "RequestBody": base64.b64encode(req).decode() if method == "POST" else None,
        }
    )


Entries = list[tuple[bytes, dict[bytes, bytes]]]


def xrange(r: redis.Redis, key: str) -> Entries:
    """XRANGE of a whole stream, typed for the bytes client the tests use."""
    return cast(Entries, r.xrange(key))


def read_as(r: redis.Redis, group: str, consumer: str, stream: str, count: int) -> Entries:
    """XREADGROUP ``>`` as another consumer (e.g. a bridge about to die)."""
    reply = cast(
        list[tuple[bytes, Entries]], r.xreadgroup(group, consumer, {stream: ">"}, count=count)
    )
    return reply[0][1] if reply else []
