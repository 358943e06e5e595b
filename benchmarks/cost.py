"""Per-event cost: CPU microseconds per event in the bridge, the worker and Redis.

    python benchmarks/cost.py                          # file, helicone, lunary; 50k events
    python benchmarks/cost.py --backends file,otlp,langfuse,webhook --events 20000
    python benchmarks/cost.py --env DISPATCH_BATCH_SIZE=500

For each backend: a fresh stream of the sample events, one worker (default prefork pool,
one process per core) consuming the service's queue and one bridge; the CPU time of each
process tree comes from ``/proc`` (user + system), Redis's from ``INFO CPU`` deltas. HTTP
backends send to ``benchmarks/sink.py``, a local endpoint that answers at once (its own
CPU is shown apart: it is not the pipeline's). The worker's figure includes Celery (its
consumer, the pool, the task events Flower needs) and the backend's own work.
"""

from __future__ import annotations

import argparse

from common import drain, load, private_redis


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--backends", default="file,helicone,lunary")
    ap.add_argument("--env", action="append", default=[], help="NAME=value for the pipeline")
    args = ap.parse_args()
    env = dict(e.split("=", 1) for e in args.env)
    with private_redis("dispatch-cost-") as (url, client, work):
        print(f"{args.events} sample events (~1.8 KB) per backend {env or ''}; {load()}")
        print("| backend | events/s | bridge us/event | worker us/event | Redis us/event "
              "| total | sink us/event |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for service in args.backends.split(","):
            m = drain(url, client, work, args.events, service=service, env=env)
            total = m["bridge_us"] + m["worker_us"] + m["redis_us"]
            sink = f"{m['sink_us']:.1f}" if service != "file" else "-"
            print(
                f"| {service} | {m['rate']:,.0f} | {m['bridge_us']:.1f} | {m['worker_us']:.1f} "
                f"| {m['redis_us']:.1f} | {total:.1f} | {sink} |",
                flush=True,
            )
        print(load())


if __name__ == "__main__":
    main()
