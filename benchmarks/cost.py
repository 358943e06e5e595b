"""Per-event cost: CPU microseconds per event in the bridge, the worker and Redis.

    python benchmarks/cost.py                          # file, helicone, lunary; 50k events
    python benchmarks/cost.py --backends file,otlp,langfuse,webhook --events 20000

For each backend: a fresh stream of the sample events, one worker (default prefork pool,
one process per core) consuming the service's queue and one bridge; the CPU time of each
process tree comes from ``/proc`` (user + system), Redis's from ``INFO CPU`` deltas. HTTP
backends send to ``benchmarks/sink.py``, a local endpoint that answers at once (its own
CPU is shown apart: it is not the pipeline's). The worker's figure includes Celery (its
consumer, the pool, the task events Flower needs) and the backend's own work.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import redis
from common import (
    Pipeline,
    backend_env,
    fill,
    load,
    redis_cpu,
    sink_mode,
    start_redis,
    start_sink,
    tree_cpu,
    wait_settled,
)

from dispatch_celery import stats


def measure(url: str, client: redis.Redis, service: str, n: int, work: Path) -> dict[str, float]:
    out = work / service
    out.mkdir()
    sink_url, sink = ("", None) if service == "file" else start_sink(sink_mode(service))
    pipeline = Pipeline(url, out, service, backend_env(service, sink_url))
    try:
        fill(client, n)
        pipeline.start_worker()
        pipeline.wait_ready(client)
        w0, r0 = tree_cpu(pipeline.procs["worker"].pid), redis_cpu(client)
        s0 = tree_cpu(sink.pid) if sink else 0.0
        pipeline.start_bridge()
        bridge = pipeline.procs["bridge"]
        while not client.exists(f"dispatch:stats:{service}"):  # the bridge's first publish
            pipeline.check()
            time.sleep(0.002)
        b0 = tree_cpu(bridge.pid)
        e0 = int(stats.read(client, service)["enqueued_events"])
        t0 = time.monotonic()
        t1 = wait_settled(client, pipeline, n, poll=0.02)
        b1, w1, r1 = tree_cpu(bridge.pid), tree_cpu(pipeline.procs["worker"].pid), redis_cpu(client)
        s1 = tree_cpu(sink.pid) if sink else 0.0
        return {
            "rate": n / (t1 - t0),
            "bridge": (b1 - b0) / max(1, n - e0) * 1e6,
            "worker": (w1 - w0) / n * 1e6,
            "redis": (r1 - r0) / n * 1e6,
            "sink": (s1 - s0) / n * 1e6,
        }
    finally:
        pipeline.stop()
        if sink is not None:
            sink.terminate()
            sink.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--backends", default="file,helicone,lunary")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dispatch-cost-"))
    url, proc = start_redis(work)
    client = redis.Redis.from_url(url)
    try:
        print(f"{args.events} sample events (~1.8 KB) per backend; {load()}")
        print("| backend | events/s | bridge us/event | worker us/event | Redis us/event "
              "| total | sink us/event |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for service in args.backends.split(","):
            m = measure(url, client, service, args.events, work)
            total = m["bridge"] + m["worker"] + m["redis"]
            sink = f"{m['sink']:.1f}" if service != "file" else "-"
            print(
                f"| {service} | {m['rate']:,.0f} | {m['bridge']:.1f} | {m['worker']:.1f} "
                f"| {m['redis']:.1f} | {total:.1f} | {sink} |",
                flush=True,
            )
        print(load())
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
