"""Drain benchmark: raw read limit vs the bridge alone vs the full pipeline.

    python benchmarks/drain.py                 # 100k events, ~1.8 KB each
    python benchmarks/drain.py --events 1000000 --only full   # peak RSS over 1M events

(a) raw: one redis-py loop of XREADGROUP COUNT 500 + XACK, no decoding, with the same
    client the project uses (hiredis parser); also shown with redis-py's pure-Python
    parser, for comparison with measurements made without hiredis;
(b) bridge: ``dispatch bridge --service file`` alone (tasks pile up on the queue);
(c) full: one bridge + one worker ``celery -A dispatch_celery worker -Q file`` with its
    default pool (prefork, one process per core: 2 here) into the file backend;
    ``--worker-args`` changes that (e.g. ``--worker-args="--pool solo"``), ``--env``
    a setting (``--env DISPATCH_BATCH_SIZE=500``).
Each phase starts from the same freshly filled stream; the fill is not timed. A private
redis-server is started on a free port unless DISPATCH_REDIS_URL is given. The ratios
compare phases of the same run (the machine's load is printed with them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from common import STREAM, bridge_cmd, drain, env_for, fill, load, peak_rss_mb, start_redis


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--only", choices=["raw", "bridge", "full"], action="append")
    ap.add_argument("--worker-args", default="", help="extra celery worker arguments")
    ap.add_argument("--env", action="append", default=[], help="NAME=value for the pipeline")
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
        print(load())
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
            env = dict(e.split("=", 1) for e in args.env)
            m = drain(url, client, work, n, env=env, worker_args=[args.worker_args.split()])
            results["full"] = m["rate"]
            print(
                f"(c) full drain to file  : {results['full']:>10,.0f} events/s"
                f"   (peak RSS bridge {m['rss_bridge']:.0f} MB, worker incl. pool "
                f"{m['rss_worker']:.0f} MB; CPU us/event: bridge {m['bridge_us']:.1f}, "
                f"worker {m['worker_us']:.1f}, Redis {m['redis_us']:.1f})"
            )
        if "raw" in results:
            for name in ("bridge", "full"):
                if name in results:
                    print(f"    {name}/raw = {results[name] / results['raw']:.2f}x")
        print(load())
    finally:
        client.close()
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
