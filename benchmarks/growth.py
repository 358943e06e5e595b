"""How cost grows: drain time and peak memory against the number and the size of events.

    python benchmarks/growth.py                        # 10k, 100k, 1M sample events; 1/8/64 KB
    python benchmarks/growth.py --counts 10000,100000 --sizes 1024,8192 --size-events 20000

Each drain: a fresh stream, one worker (default prefork pool) and one bridge, the file
backend, timed from the bridge's first publish to the last event settled. Linear time
shows as a flat events/s column; bounded memory as flat peak RSS (the bridge, the worker
with its pool). Redis's peak holds the stream itself (the producer's data), so it grows
with the events; what the pipeline adds is the in-flight blobs (compressed).
"""

from __future__ import annotations

import argparse

from common import drain, load, private_redis

HEADER = (
    "| events | event size | seconds | events/s | MB/s | peak RSS bridge MB "
    "| peak RSS worker MB | Redis peak MB |\n|---|---|---|---|---|---|---|---|"
)


def row(m: dict[str, float]) -> str:
    return (
        f"| {m['events']:,} | {m['size'] / 1024:.1f} KB | {m['seconds']:.1f} | {m['rate']:,.0f} "
        f"| {m['mb_s']:.1f} | {m['rss_bridge']:.0f} | {m['rss_worker']:.0f} "
        f"| {m['redis_peak_mb']:.0f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--counts", default="10000,100000,1000000")
    ap.add_argument("--sizes", default="1024,8192,65536")
    ap.add_argument("--size-events", type=int, default=20_000, help="events per size run")
    ap.add_argument("--env", action="append", default=[], help="NAME=value for the pipeline")
    args = ap.parse_args()
    env = dict(e.split("=", 1) for e in args.env)
    print(f"growth {env or ''}; {load()}")
    print(HEADER)
    runs: list[tuple[int, int | None]] = [(int(n), None) for n in args.counts.split(",") if n]
    runs += [(args.size_events, int(s)) for s in args.sizes.split(",") if s]
    for n, size in runs:
        # a fresh server each run: its peak memory is this run's
        with private_redis("dispatch-growth-") as (url, client, work):
            print(row(drain(url, client, work, n, size=size, env=env)), flush=True)
    print(load())


if __name__ == "__main__":
    main()
