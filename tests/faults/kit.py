"""The tools of the fault scenarios: servers to break, processes to run, and the accounting.

* ``PrivateRedis``: a redis-server of its own (AOF ``everysec``) that a test can ``SHUTDOWN``
  or ``kill -9`` and start again on the same port, without touching the suite's Redis.
* ``TcpProxy``: a local TCP proxy in front of a server (RabbitMQ); ``cut()`` closes every
  connection and refuses new ones, ``restore()`` listens again on the same port.
* ``OutageHelicone``: the contract-checking fake Helicone that can answer 503, go away
  (connection refused) and come back on its port; ``RawVendor``: a raw socket server that
  accepts and never answers, or answers one byte a second, or behaves.
* ``Producer``: writes events the way llm-proxy does (``XADD``, optionally ``MAXLEN ~``),
  paced, riding out a Redis that goes away; only entries Redis acknowledged are published.
* ``Stack``: ``dispatch bridge`` and ``celery worker`` subprocesses, JSON logs per process.
* ``Figures`` and ``account``: the accounting every case ends with: each published event is
  delivered, dead-lettered with a reason, or counted as trimmed; nothing else; duplicates at
  the receiver under 2 %.

The scenario functions of the test modules take a ``Lab`` (a scratch directory and a
disposable Redis) so that ``benchmarks/soak.py`` runs the same code with longer faults.
"""

from __future__ import annotations

import calendar
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import redis

from tests.conftest import _redis_server_binary, free_port
from tests.harness import REPO, dispatch, event, jsonl, pipeline_env, subprocess_env, wait_for
from tests.vendor_servers import FakeHelicone, RawHttpServer, _Handler

STREAM = "llm-proxy-events"
DUPLICATE_SHARE = 0.02  # duplicates at the receiver must stay under 2 % of the events

# --- figures and accounting ----------------------------------------------------------------


@dataclass
class Figures:
    """What one case measured; ``lost`` must be 0."""

    case: str
    published: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    trimmed: int = 0
    lost: int = 0
    duplicates: int = 0
    requests_during_outage: int | None = None
    resume_s: float | None = None
    fault_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        resume = "-" if self.resume_s is None else f"{self.resume_s:.2f}s"
        reqs = "-" if self.requests_during_outage is None else str(self.requests_during_outage)
        extra = " ".join(
            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in self.extra.items()
        )
        return (
            f"{self.case:<24} fault={self.fault_s:>5.1f}s published={self.published:<6} "
            f"delivered={self.delivered:<6} dead={self.dead_lettered:<5} "
            f"trimmed={self.trimmed:<5} lost={self.lost:<3} dups={self.duplicates:<4} "
            f"outage_requests={reqs:<5} resume={resume} {extra}"
        ).rstrip()

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def account(
    fig: Figures,
    published: Iterable[str],
    delivered: Mapping[str, int],
    dead: Mapping[str, str],
    *,
    trimmed: int = 0,
    vanished: Iterable[str] = (),
) -> None:
    """Fill ``fig`` and assert the accounting.

    ``published``: stream ids Redis acknowledged to the producer. ``delivered``: stream id ->
    times the receiver accepted it. ``dead``: stream id -> dead-letter reason. ``trimmed``:
    the count the pipeline reports for entries the producer trimmed before they were read:
    exactly the published events neither delivered nor dead-lettered. ``vanished``: entries
    Redis itself lost (kill -9 with ``appendfsync everysec``), not the pipeline's to account.
    """
    pub = list(published)
    pub_set = set(pub)
    assert len(pub_set) == len(pub), "the producer published an id twice"
    gone = set(vanished)
    unknown = (set(delivered) | set(dead)) - pub_set
    assert not unknown, (
        f"{len(unknown)} events arrived that nobody published: {sorted(unknown)[:5]}"
    )
    both = set(delivered) & set(dead)
    assert not both, f"{len(both)} events both delivered and dead-lettered: {sorted(both)[:5]}"
    no_reason = sorted(k for k, why in dead.items() if not why.strip())
    assert not no_reason, f"dead letters without a reason: {no_reason[:5]}"
    missing = pub_set - set(delivered) - set(dead) - gone
    fig.published = len(pub_set)
    fig.delivered = len(set(delivered))
    fig.dead_lettered = len(dead)
    fig.trimmed = trimmed
    fig.lost = max(0, len(missing) - trimmed)
    fig.duplicates = sum(n - 1 for n in delivered.values() if n > 1)
    assert len(missing) == trimmed, (
        f"{len(missing)} published events neither delivered nor dead-lettered, "
        f"{trimmed} counted as trimmed; first missing: {sorted(missing)[:5]}"
    )
    assert fig.duplicates < DUPLICATE_SHARE * max(1, fig.published), (
        f"{fig.duplicates} duplicates at the receiver for {fig.published} events"
    )


def dead_letters(r: redis.Redis, service: str) -> dict[str, str]:
    """Stream id -> reason of every entry in the service's dead-letter stream."""
    from dispatch_celery import constants as c

    out: dict[str, str] = {}
    for _, fields in cast(
        list[tuple[bytes, dict[bytes, bytes]]], r.xrange(c.deadletter_key(service))
    ):
        sid = fields.get(b"stream_id", b"").decode()
        out[sid] = fields.get(b"reason", b"").decode()
    return out


def file_counts(path: Path) -> Counter[str]:
    """Stream id -> lines in a JSONL receiver (file backend, test double); whole lines only."""
    return Counter(str(rec["stream_id"]) for rec in jsonl(path))


def settle(pred: Callable[[], bool], timeout: float, stack: Stack | None = None) -> bool:
    """Wait up to ``timeout`` for ``pred``; False instead of raising, so that the accounting
    that follows says exactly what is missing (early when a process of ``stack`` died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        if stack is not None and stack.crashed():
            break
        time.sleep(0.1)
    return pred()


def wait_resumed(
    count: Callable[[], int], timeout: float, stack: Stack | None = None, what: str = "delivery"
) -> float:
    """Seconds until ``count()`` grows past its value now (call it when the fault ends)."""
    start = time.monotonic()
    before = count()
    if stack is not None:
        stack.wait(lambda: count() > before, timeout, f"{what} to resume")
    else:
        wait_for(lambda: count() > before, timeout=timeout, what=f"{what} to resume")
    return round(time.monotonic() - start, 2)


def group_info(r: redis.Redis, stream: str, group: str) -> dict[str, Any]:
    """XINFO GROUPS of one group, names as str ({} when the group or stream is missing)."""
    try:
        groups: list[dict[str, Any]] = r.xinfo_groups(stream)
    except redis.ResponseError:
        return {}
    for g in groups:
        name = g.get("name")
        if (name.decode() if isinstance(name, bytes) else name) == group:
            return g
    return {}


# --- a scratch lab -------------------------------------------------------------------------


@dataclass
class Lab:
    """Where a scenario runs: a scratch directory and a disposable, flushed Redis."""

    tmp: Path
    redis_url: str
    figures: list[Figures] = field(default_factory=list)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def figures_for(self, case: str, fault_s: float) -> Figures:
        fig = Figures(case, fault_s=fault_s)
        self.figures.append(fig)
        return fig

    def env(self, **extra: str) -> dict[str, str]:
        return pipeline_env(self.redis_url, self.tmp, DISPATCH_LOG_FORMAT="json", **extra)


# --- a private Redis -----------------------------------------------------------------------


class PrivateRedis:
    """A redis-server of this test only: AOF on, ``everysec``, on a fixed port.

    ``shutdown()`` (SHUTDOWN: the AOF is flushed) and ``kill9()`` stop it; ``start()``
    brings it back on the same port with the same data directory.
    """

    def __init__(self, workdir: Path, port: int | None = None, binary: str | None = None) -> None:
        binary = binary or _redis_server_binary()
        if binary is None:
            raise RuntimeError("no redis-server found")
        self.binary = binary
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kw: Any) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kw)

    def start(self, timeout: float = 20.0) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.workdir),
                "--appendonly", "yes",
                "--appendfsync", "everysec",
                "--save", "",
                "--maxmemory-policy", "noeviction",
                "--logfile", str(self.log),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        client = self.client(socket_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()  # BusyLoadingError (a ConnectionError) while the AOF loads
                    return
                except (redis.ConnectionError, redis.TimeoutError):  # a slow start under load
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"redis-server did not start on {self.port}: "
                            + (self.log.read_text()[-2000:] if self.log.exists() else "")
                        ) from None
                    time.sleep(0.02)
        finally:
            client.close()

    def shutdown(self) -> None:
        """SHUTDOWN: Redis fsyncs the AOF and exits."""
        client = self.client(socket_timeout=5)
        with suppress(redis.ConnectionError):
            client.shutdown()
        client.close()
        if self.proc is not None:
            self.proc.wait(20)

    def kill9(self) -> None:
        """kill -9: whatever ``everysec`` had not written yet (up to ~1 s) is lost."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(name="private")
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A started ``PrivateRedis`` in the test's scratch directory, closed afterwards; a test
    module imports this to have the ``private`` fixture."""
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.close()


# --- a TCP proxy ---------------------------------------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream``; ``cut()`` makes the upstream unreachable
    for whoever connects through the proxy (and only for them)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.connections = 0
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(0.1)
        self._listener = listener
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._accept, args=(listener, self._stop), daemon=True, name="tcp-proxy"
        )
        self._thread.start()

    restore = start

    def cut(self) -> None:
        """Close every proxied connection and stop listening (new connects are refused)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            socks, self._socks = list(self._socks), set()
        for s in socks:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with suppress(OSError):
                s.close()

    close = cut

    def _accept(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if stop.is_set():
                    client.close()
                    server.close()
                    return
                self._socks |= {client, server}
                self.connections += 1
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


# --- vendors -------------------------------------------------------------------------------


class OutageHelicone(FakeHelicone):
    """The fake Helicone with an outage switch: ``mode`` "ok", "503" (every request is
    answered 503), or "down" (the port is closed: connection refused). Counts the requests
    it got in each mode and the runs it accepted, by stream id."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "ok"
        self.port = 0
        self.by_mode: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()
        self._conns: set[socket.socket] = set()
        self._url = ""

    def start(self) -> None:
        vendor = self

        class Handler(_Handler):
            def setup(self) -> None:
                super().setup()
                with vendor.lock:
                    vendor._conns.add(self.connection)

            def finish(self) -> None:
                with vendor.lock:
                    vendor._conns.discard(self.connection)
                with suppress(OSError):
                    super().finish()

        server = self._listen(Handler, self.port)
        self.port = int(server.server_address[1])
        self._url = f"http://127.0.0.1:{self.port}{self.path}"

    @property
    def url(self) -> str:
        return self._url

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        with self.lock:
            mode = self.mode
            self.by_mode[mode] += 1
        if mode != "ok":
            return 503, {}, b'{"error": "service unavailable"}'
        status, extra, payload = super().handle(headers, body)
        if status == 200:
            sid = json.loads(body)["providerRequest"]["meta"]["Helicone-Property-Stream-Id"]
            with self.lock:
                self.accepted[sid] += 1
        return status, extra, payload

    def answer_503(self) -> None:
        with self.lock:
            self.mode = "503"

    def go_down(self) -> None:
        """Close the port and every open connection: clients get connection refused."""
        with self.lock:
            self.mode = "down"
        self.stop()
        with self.lock:
            conns, self._conns = list(self._conns), set()
        for s in conns:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def recover(self) -> None:
        if self._server is None:
            self.start()
        with self.lock:
            self.mode = "ok"

    def counts(self) -> Counter[str]:
        with self.lock:
            return Counter(self.accepted)


_DRIP = (
    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'
)


class RawVendor(RawHttpServer):
    """A raw socket HTTP server: ``mode`` "silent" (accepts, reads the request, never
    answers), "drip" (answers one byte a second) or "ok" (answers 200, records the run)."""

    path = "/custom/v1/log"
    thread_name = "raw-vendor"

    def __init__(self, mode: str = "silent") -> None:
        super().__init__(backlog=256, accept_timeout=0.1)
        self.mode = mode
        self.accepted: Counter[str] = Counter()
        self.hung = 0  # requests held (silent or drip)

    def counts(self) -> Counter[str]:
        with self.lock:
            return Counter(self.accepted)

    def _recv(self, conn: socket.socket) -> bytes:
        while not self._stop.is_set():
            try:
                return conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return b""
        return b""

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        buf = b""
        try:
            while not self._stop.is_set():
                got = self._read_request(conn, buf)
                if got is None:
                    return
                body, buf = got
                mode = self.mode
                if mode == "ok":
                    sid = json.loads(body)["providerRequest"]["meta"]["Helicone-Property-Stream-Id"]
                    with self.lock:
                        self.accepted[sid] += 1
                    conn.sendall(_DRIP)
                    continue
                with self.lock:
                    self.hung += 1
                if mode == "silent":
                    while self._recv(conn):  # hold it until the client gives up
                        pass
                    return
                for i in range(len(_DRIP)):  # drip: one byte a second
                    conn.sendall(_DRIP[i : i + 1])
                    if self._stop.wait(1.0):
                        return
        except OSError:
            return
        finally:
            with suppress(OSError):
                conn.close()


# --- the producer --------------------------------------------------------------------------


class Producer:
    """llm-proxy in miniature: XADD one event at a time at ``rate`` per second (optionally
    ``MAXLEN ~ maxlen``), in a thread. A write Redis refused is not published (llm-proxy
    logs it and moves on); ``ids`` are the ids Redis acknowledged, ``acked_at`` their times.
    An XADD whose reply was lost (the connection dropped or timed out: a SHUTDOWN or kill -9
    right after Redis applied it, or a reply slower than the socket timeout under load) has
    an unknown outcome: ``published()`` looks such payloads up in the stream."""

    def __init__(
        self,
        url: str,
        rate: float,
        *,
        stream: str = STREAM,
        maxlen: int | None = None,
        first: int = 0,
    ) -> None:
        self.url = url
        self.rate = rate
        self.stream = stream
        self.maxlen = maxlen
        self.n = first
        self.ids: list[str] = []
        self.acked_at: dict[str, float] = {}
        self.errors = 0
        self.unknown: set[bytes] = set()  # payloads of XADDs whose reply was lost
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)

    def __enter__(self) -> Producer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _add(self, pipe_size: int = 1) -> None:
        datas = []
        for _ in range(pipe_size):
            datas.append(event(self.n))
            self.n += 1
        pipe = self._client.pipeline(transaction=False)
        for d in datas:
            pipe.xadd(self.stream, {"data": d}, maxlen=self.maxlen, approximate=True)
        try:
            got = pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError):
            with self._lock:
                self.unknown.update(datas)  # Redis may have applied them all the same
            raise
        now = time.time()
        with self._lock:
            for raw in got:
                sid = raw.decode()
                self.ids.append(sid)
                self.acked_at[sid] = now

    def burst(self, n: int, chunk: int = 500) -> list[str]:
        """Publish ``n`` events now (pipelined), in this thread."""
        before = len(self.ids)
        while n > 0:
            self._add(min(chunk, n))
            n -= chunk
        with self._lock:
            return self.ids[before:]

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True, name="producer")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def close(self) -> None:
        self.stop()
        self._client.close()

    def published(self) -> list[str]:
        """The ids Redis acknowledged, and those of XADDs whose reply was lost but which
        Redis applied (found in the stream; while Redis is away they are left out)."""
        with self._lock:
            ids, unknown = list(self.ids), set(self.unknown)
        if unknown:
            ids += self._applied(unknown)
        return ids

    def _applied(self, payloads: set[bytes]) -> list[str]:
        client = redis.Redis.from_url(self.url, socket_timeout=10, socket_connect_timeout=2)
        found: list[str] = []
        start = "-"
        try:
            while True:
                page = cast(
                    list[tuple[bytes, dict[bytes, bytes]]],
                    client.xrange(self.stream, start, "+", count=1000),
                )
                found += [i.decode() for i, f in page if f.get(b"data") in payloads]
                if len(page) < 1000:
                    return found
                start = "(" + page[-1][0].decode()
        except redis.RedisError:
            return found
        finally:
            client.close()

    def _run(self) -> None:
        interval = 1.0 / self.rate
        due = time.monotonic()
        while not self._stop.is_set():
            try:
                self._add()
            except redis.RedisError:
                self.errors += 1
                self._stop.wait(0.1)
                due = time.monotonic()
                continue
            due += interval
            delay = due - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            elif delay < -1.0:
                due = time.monotonic()  # fell behind (Redis slow): do not burst to catch up


# --- processes -----------------------------------------------------------------------------


def _cmd_bridge(service: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "dispatch_celery", "bridge", "--service", service, *args]


def _cmd_worker(queues: str, concurrency: int, name: str) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "dispatch_celery", "worker",
        "-Q", queues, "-c", str(concurrency), "-n", f"{name}@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO",
    ]  # fmt: skip


class Stack:
    """Bridges and workers as real subprocesses; one log file (JSON lines) per process."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env = env
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.expected_exit: set[str] = set()

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None) -> None:
        if name in self.procs and self.procs[name].poll() is None:
            raise RuntimeError(f"{name} is already running")
        full = subprocess_env({**self.env, **(env or {})})
        full["PYTHONUNBUFFERED"] = "1"
        self.procs[name] = subprocess.Popen(
            cmd,
            env=full,
            cwd=REPO,
            stdout=self.log_path(name).open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.expected_exit.discard(name)

    def bridge(
        self, service: str, *args: str, name: str = "", env: dict[str, str] | None = None
    ) -> str:
        name = name or f"bridge-{service}"
        self._spawn(name, _cmd_bridge(service, *args), env)
        return name

    def worker(
        self,
        queues: str,
        concurrency: int = 1,
        *,
        name: str = "worker",
        env: dict[str, str] | None = None,
    ) -> str:
        self._spawn(name, _cmd_worker(queues, concurrency, name), env)
        return name

    def log_path(self, name: str) -> Path:
        return self.logdir / f"{name}.log"

    def text(self, name: str) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def records(self, name: str) -> list[dict[str, Any]]:
        """The JSON log lines of a process (other lines, e.g. tracebacks, are skipped)."""
        out = []
        for line in self.text(name).splitlines():
            if line.startswith("{"):
                with suppress(ValueError):
                    out.append(orjson.loads(line))
        return out

    def tail(self, name: str, lines: int = 30) -> str:
        return "\n".join(self.text(name).splitlines()[-lines:])

    def stop(self, name: str, timeout: float = 30) -> int:
        proc = self.procs[name]
        self.expected_exit.add(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise AssertionError(
                f"{name} did not stop within {timeout}s:\n{self.tail(name)}"
            ) from None

    def assert_running(self, *names: str) -> None:
        """Every process (or the named ones) is still running: none crashed or exited."""
        for name in names or tuple(self.procs):
            proc = self.procs[name]
            if name not in self.expected_exit:
                assert proc.poll() is None, (
                    f"{name} exited with status {proc.returncode}:\n{self.tail(name)}"
                )

    def crashed(self) -> list[str]:
        """Processes that exited without being stopped."""
        return [
            n for n, p in self.procs.items() if n not in self.expected_exit and p.poll() is not None
        ]

    def wait(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        """``wait_for``, failing at once (with the log) when a process exits meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            self.assert_running()
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def lines_between(
        self, name: str, start: float, end: float, levels: tuple[str, ...] = ()
    ) -> int:
        """Log lines a process wrote between two wall-clock times (by their ``ts``), of the
        given levels (all when empty)."""
        n = 0
        for rec in self.records(name):
            if levels and rec.get("level") not in levels:
                continue
            ts = rec.get("ts")
            if not isinstance(ts, str):
                continue
            t = calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + float(
                "0" + ts[19:].rstrip("Z")
            )
            if start <= t <= end:
                n += 1
        return n

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for proc in self.procs.values():  # pool children left behind by a killed parent
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


def dispatch_cli(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the real ``dispatch`` command with the scenario's environment."""
    return dispatch(*args, env=env, timeout=timeout)


def scrape_metrics(env: dict[str, str], logdir: Path, timeout: float = 30) -> str:
    """Start ``dispatch metrics`` on a free port, scrape it once, stop it."""
    port = free_port()
    full = subprocess_env({**env, "DISPATCH_METRICS_PORT": str(port)})
    log = logdir / "metrics.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dispatch_celery", "metrics", "--address", "127.0.0.1"],
        env=full,
        cwd=REPO,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    body = ""
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    body = resp.read().decode()
                    break
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert body, f"dispatch metrics did not answer: {log.read_text()[-2000:]}"
    return body
